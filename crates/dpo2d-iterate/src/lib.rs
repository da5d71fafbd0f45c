//! Iterative 2D-DPO (docs/method.md §8): rounds of
//!
//! 1. **sample** K answers per prompt from the current policy,
//! 2. **score** every segment of every answer with a [`Scorer`] (a reward
//!    model, an LLM judge, or a program that checks the answers),
//! 3. **pair** the best answer of each prompt against its worst
//!    ([`dpo2d_data::rank`]), and
//! 4. **train** on those pairs (2D-DPO, or any loss `train` has),
//!
//! the next round starting from the trained policy. Answers are sampled
//! with dpo2d's own decoder, or through any OpenAI-compatible serving engine
//! ([`sampler`]). Every round lives in
//! `<output_dir>/round-<n>/` and every phase writes its results as it goes,
//! so a run that is stopped resumes inside the phase it stopped in.

pub mod prompts;
pub mod run;
pub mod sampler;
pub mod scorer;

pub use prompts::PromptRecord;
pub use run::{iterate, IterateConfig, IterateOutcome, IterateRun, Phase, RoundReport, SamplingSettings, StopAt};
pub use sampler::ServerSampler;
pub use scorer::{ArithmeticScorer, JudgeScorer, RewardModelScorer, Sampled, Scorer};
