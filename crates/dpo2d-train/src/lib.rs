//! Training: tokenization and segment alignment, the preference losses, the
//! reference model, and the trainer loop with checkpoints and metrics.
//!
//! The data flows through the modules in this order: [`align`] (tokens and
//! segments) -> [`sampler`] (split and order) -> `packing` (packed forward
//! passes) -> `reference` (reference log-probs) -> `batch` (loss inputs) ->
//! [`loss`] -> [`optim`] / [`schedule`] -> [`trainer`] (the loop) ->
//! [`checkpoint`], [`metrics`], [`charts`].

pub mod align;
mod batch;
pub mod charts;
pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod metrics;
pub mod optim;
mod packing;
mod phases;
mod reference;
pub mod reward;
pub mod sampler;
pub mod schedule;
pub mod trainer;

pub use reference::RefLogps;
