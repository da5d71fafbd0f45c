//! LLM annotation: turning preference pairs into 2-D pairs by asking a judge
//! model (any OpenAI-compatible chat-completions server) to score every
//! segment of both responses on each aspect, one request per (pair, aspect).
//!
//! Pieces: [`prompt`] builds the requests, [`parse`] reads the ratings back,
//! [`client`] talks HTTP with retries, [`cache`] makes runs resumable,
//! [`run`] drives it all (or [`batch`], through the Batch API or files), [`compare`] measures agreement of two annotations.

pub mod batch;
pub mod batch_api;
pub mod cache;
pub mod client;
pub mod compare;
pub mod expectation;
pub mod judge;
pub mod parse;
pub mod prompt;
pub mod run;
#[cfg(any(test, feature = "test-server"))]
pub mod test_server;

pub use client::{RetryPolicy, Secret};
pub use judge::JudgeSettings;
pub use prompt::{Aspect, ResponseFormat};
pub use run::{annotate_file, AnnotateJob, AspectStats, FailedPair, Options, Route, Summary};
