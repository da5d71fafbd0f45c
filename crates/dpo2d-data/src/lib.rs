//! Preference data: the 2-D pair format, its validation, segmentation of
//! responses into sentences, and building pairs from rated responses.

pub mod pair;

pub use pair::{Message, Pair, Prompt, Response, Scores, Segment, ASPECTS};
