//! One module per subcommand: option parsing and a call into the library.
pub mod annotate;
pub mod bench;
pub mod build_pairs;
pub mod generate;
pub mod logprobs;
pub mod model;
pub mod quickstart;
pub mod segment;
pub mod train;
pub mod validate;
