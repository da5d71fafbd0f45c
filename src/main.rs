//! `dpo2d`: the command-line face of the toolkit. Each subcommand lives in
//! `cmd/<name>.rs`, parses its options and calls the library crates.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cmd;

// Training allocates and frees many large activation buffers per step; the
// system allocator returns them to the kernel, which then zeroes fresh pages
// on every reuse. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Train(Box<cmd::train::Args>),
    /// Check a preference data file and report every bad line.
    Validate(cmd::validate::Args),
    /// Split responses into sentence segments.
    Segment(cmd::segment::Args),
    /// Score every segment on five aspects with an LLM judge.
    Annotate(cmd::annotate::Args),
    /// Build preference pairs from HelpSteer2-style rows or TRL-style pairs.
    BuildPairs(cmd::build_pairs::Args),
    /// Serve a model over an OpenAI-compatible HTTP API (chat completions, streaming).
    Serve(cmd::serve::Args),
    /// Evaluate a model with an LLM judge: MT-Bench, AlpacaEval, Arena-Hard or your own questions.
    Eval(cmd::eval::Args),
    /// The 2-D reward model: train it on 2-D pairs, or score every segment of responses with it.
    #[command(subcommand)]
    Rm(cmd::rm::RmCommand),
    /// Rounds of: sample answers from the policy, score every segment, pair best against worst, train.
    Iterate(Box<cmd::iterate::Args>),
    /// Colour every token of a pair by a trained policy's implicit reward (HTML + PNG).
    Explain(cmd::explain::Args),
}

fn main() -> ExitCode {
    tune_runtime();
    let cli = Cli::parse();
    // A server logs one line per request by default.
    let quiet = if matches!(cli.command, Command::Serve(_)) { "warn,dpo2d_serve=info" } else { "warn" };
    init_tracing(cli.verbose, quiet);
    let result = on_worker_thread(move || run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Stack of the thread that runs the command (candle's backward pass walks
/// the graph recursively, as deep as the model is long).
const COMMAND_STACK: usize = 256 << 20;

/// Runs the command on a worker of the rayon pool that the matrix products
/// and the fused kernels split their work over, so that each of their
/// parallel sections forks from inside the pool (the caller works on one
/// part while another worker steals the rest) instead of handing every
/// section from an outside thread to the pool and sleeping until it is done
/// (two extra thread wake-ups per op, tens of thousands per training step).
fn on_worker_thread(f: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    let threads = candle_core::utils::get_num_threads();
    match rayon::ThreadPoolBuilder::new().num_threads(threads).stack_size(COMMAND_STACK).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quickstart(a) => cmd::quickstart::run(a),
        Command::Model(c) => cmd::model::run(c),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Logprobs(a) => cmd::logprobs::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Train(a) => cmd::train::run(*a),
        Command::Validate(a) => cmd::validate::run(a),
        Command::Segment(a) => cmd::segment::run(a),
        Command::Annotate(a) => cmd::annotate::run(a),
        Command::BuildPairs(a) => cmd::build_pairs::run(a),
        Command::Serve(a) => cmd::serve::run(a, cli.verbose > 0),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Explain(a) => cmd::explain::run(a),
        Command::Iterate(a) => cmd::iterate::run(*a),
        Command::Rm(c) => cmd::rm::run(c),
    }
}

/// Runtime settings that make CPU training fast, each overridable from the
/// environment. Runs first, while the process has a single thread.
fn tune_runtime() {
    // candle runs element-wise ops on its own spinning thread pool next to the
    // rayon pool of the matrix products; with few cores the two pools fight
    // for them (measured: up to 2x slower steps on a loaded 2-core machine,
    // and a third more CPU time on an idle one). Keep element-wise ops on the
    // calling thread unless the user asks otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Without RAYON_NUM_THREADS candle re-reads the CPU topology from /proc
    // on every matrix product; pin it to the count candle picks (physical cores).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // Never hand freed activation memory back to the kernel between steps:
    // re-faulting and zeroing those pages cost about a quarter of a step.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        /// `mi_option_purge_delay` in mimalloc 2's `mi_option_e`.
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: sets a plain integer option; no allocation is in flight.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn init_tracing(verbose: u8, quiet: &str) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => quiet,
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // No colour codes in logs redirected to a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every option of every command says in one line what it does, and one
    /// that takes a value shows what it is when not given (clap's
    /// `[default: X]`, or the same words in the help where the default is
    /// not one value).
    #[test]
    fn every_option_has_one_line_help_and_shows_its_default() {
        let mut problems = vec![];
        check(&Cli::command(), "dpo2d", &mut problems);
        assert!(problems.is_empty(), "{} option(s) without proper help:\n{}", problems.len(), problems.join("\n"));
    }

    fn check(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
        for a in cmd.get_arguments().filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version")) {
            let name = a.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| format!("<{}>", a.get_id()));
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                problems.push(format!("{path} {name}: no help"));
            } else if help.contains('\n') {
                problems.push(format!("{path} {name}: help of more than one line"));
            }
            let optional_value = a.get_action().takes_values() && !a.is_positional() && !a.is_required_set();
            if optional_value && a.get_default_values().is_empty() && !help.contains("[default: ") {
                problems.push(format!("{path} {name}: no [default: ...]"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            check(sub, &format!("{path} {}", sub.get_name()), problems);
        }
    }
}
