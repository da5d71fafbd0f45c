//! `dpo2d`: the command-line face of the toolkit. Each subcommand lives in
//! `cmd/<name>.rs`, parses its options and calls the library crates.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cmd;

#[derive(Parser)]
#[command(name = "dpo2d", version, about = "2D-DPO: preference optimisation with segment-level, multi-aspect scores")]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the embedded default model, train 2D-DPO on the shipped data, compare answers.
    Quickstart(cmd::quickstart::Args),
    /// Fetch and convert models.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Generate answers with a model (chat template, KV cache, greedy or sampling).
    Generate(cmd::generate::Args),
    /// Per-token log-probabilities of responses under a model.
    Logprobs(cmd::logprobs::Args),
    /// Measure training and generation speed of a model on this machine.
    Bench(cmd::bench::Args),
    /// Train a policy with 2D-DPO or a baseline preference loss.
    Train(cmd::train::Args),
    /// Check a preference data file and report every bad line.
    Validate(cmd::validate::Args),
    /// Split responses into sentence segments.
    Segment(cmd::segment::Args),
    /// Score every segment on five aspects with an LLM judge.
    Annotate(cmd::annotate::Args),
    /// Build preference pairs from HelpSteer2-style rows or TRL-style pairs.
    BuildPairs(cmd::build_pairs::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let result = match cli.command {
        Command::Quickstart(a) => cmd::quickstart::run(a),
        Command::Model(c) => cmd::model::run(c),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Logprobs(a) => cmd::logprobs::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Validate(a) => cmd::validate::run(a),
        Command::Segment(a) => cmd::segment::run(a),
        Command::Annotate(a) => cmd::annotate::run(a),
        Command::BuildPairs(a) => cmd::build_pairs::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
