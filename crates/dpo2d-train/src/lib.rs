//! Training: tokenization and segment alignment, the preference losses, the
//! reference model, and the trainer loop with checkpoints and metrics.

pub mod align;
pub mod loss;
