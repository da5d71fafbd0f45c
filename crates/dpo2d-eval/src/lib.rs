//! `dpo2d eval`: answer a question set with a model and have an LLM judge
//! (any OpenAI-compatible server, `dpo2d serve` included) grade the answers,
//! as the 2D-DPO paper evaluates: MT-Bench (1-10 grades), AlpacaEval and
//! Arena-Hard (pairwise against a baseline, in both orders, with a
//! length-controlled win rate), and the five aspects per answer.
//!
//! Pieces: [`sets`] loads the questions, [`answer`] generates the answers,
//! [`judge`] writes the judge's prompts and reads its answers, [`run`]
//! drives a run through the cache, [`stats`] and [`report`] sum it up;
//! [`explain`] draws a trained policy's implicit reward token by token;
//! [`arithmetic`] is a task whose answers a program checks, sentence by sentence.

pub mod answer;
pub mod arithmetic;
pub mod explain;
pub mod judge;
pub mod report;
pub mod run;
pub mod sets;
pub mod stats;

pub use report::{compare, Results};
pub use run::{evaluate, Answerer, EvalOptions};
