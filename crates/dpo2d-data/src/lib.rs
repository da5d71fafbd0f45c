//! Preference data: the 2-D pair format, its validation, segmentation of
//! responses into sentences, and building pairs from rated responses.
//!
//! - [`pair`]: the types (one [`Pair`] per JSONL line).
//! - [`validate`]: [`load_pairs`] with strict / skip-invalid modes.
//! - [`segment`]: [`segment_spans`], exact-cover sentence segmentation.
//! - [`helpsteer`]: HelpSteer2-style rated rows (JSONL / gz / Parquet) to pairs.
//! - [`stats`]: summary numbers for `dpo2d validate`.
//! - [`rank`]: one number per scored response; pairs from scored samples.
//! - [`io`]: JSONL reading and writing, gzip-aware.
//! - [`weights`]: [`AspectWeights`], how the five aspects combine.

pub mod helpsteer;
pub mod io;
pub mod pair;
pub mod rank;
pub mod segment;
pub mod stats;
pub mod validate;
pub mod weights;

pub use pair::{Message, Pair, Prompt, Response, Scores, Segment, ASPECTS};
pub use segment::{segment, segment_response, segment_spans, segment_with, SegmentKind, SegmentOptions, Span};
pub use stats::DataStats;
pub use validate::{
    check_pair, load_pairs, load_pairs_from_str, parse_pair_line, parse_pair_value, require_scored, scored_problem, InvalidData, Limits,
    LineProblem, LoadOptions, LoadedPairs, Problem, ProblemCode, Requirement, SkipReport,
};
pub use weights::AspectWeights;
