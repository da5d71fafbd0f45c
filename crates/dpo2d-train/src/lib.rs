//! Training: tokenization and segment alignment, the preference losses, the
//! reference model, and the trainer loop with checkpoints and metrics.

pub mod align;
pub mod charts;
pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod trainer;
