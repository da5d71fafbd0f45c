//! Training: tokenization and segment alignment, the preference losses, the
//! reference model, and the trainer loop with checkpoints and metrics.

pub mod align;
pub mod loss;
pub mod charts;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod checkpoint;
pub mod trainer;
