//! What a person sees of a long run, shared by every stage: progress bars
//! ([`progress`]) and PNG charts ([`charts`]). Kept apart from the stages so
//! that annotation, evaluation and iteration draw the same way as training
//! without depending on the trainer.

pub mod charts;
pub mod progress;

pub use indicatif::ProgressBar;
