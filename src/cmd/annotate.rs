//! `dpo2d annotate`: score every segment of every pair on the five aspects
//! with an LLM judge behind any OpenAI-compatible chat-completions server;
//! `dpo2d annotate compare A B`: agreement between two annotations.
use anyhow::{bail, Context, Result};
use dpo2d_annotate::batch_api::BatchLimits;
use dpo2d_annotate::{annotate_file, AnnotateJob, Aspect, Options, Route};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<AnnotateCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum AnnotateCommand {
    /// Per-aspect agreement (exact and within one point) between two annotated files.
    Compare {
        /// First annotated pair file (.jsonl).
        a: PathBuf,
        /// Second annotated pair file, same pairs and segments.
        b: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Pairs to annotate (.jsonl): segmented or plain responses (plain ones are segmented first).
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Where to write the scored pairs (written atomically at the end).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// SQLite file of finished judgements, from which a rerun resumes [default: OUTPUT.cache.sqlite].
    #[arg(long, value_name = "PATH")]
    cache: Option<PathBuf>,
    /// Write the pairs that could not be annotated, with the reasons, to this JSONL file [default: none].
    #[arg(long, value_name = "FILE")]
    failed_out: Option<PathBuf>,
    /// Print the request bodies (JSONL) instead of sending them.
    #[arg(long)]
    dry_run: bool,
    /// Send the requests through the server's Batch API (OpenAI's /v1/batches: half the price, answers within 24 h); a rerun resumes polling.
    #[arg(long, conflicts_with_all = ["dry_run", "batch_write", "batch_read"])]
    batch: bool,
    /// Seconds between polls of a running batch.
    #[arg(long, value_name = "SECS", default_value_t = dpo2d_annotate::batch_api::DEFAULT_POLL_INTERVAL.as_secs_f64())]
    batch_poll_interval: f64,
    /// Most requests in one batch file (the API's limit) [default: 50000].
    #[arg(long, value_name = "N", hide = true)]
    batch_max_requests: Option<usize>,
    /// Write the requests not yet judged as a Batch API input file (JSONL), e.g. for vLLM's run_batch, and stop [default: none].
    #[arg(long, value_name = "FILE", conflicts_with_all = ["dry_run", "batch_read"])]
    batch_write: Option<PathBuf>,
    /// Read the answers from a batch results file (the Batch API's or vLLM run_batch's output) instead of asking a server [default: none].
    #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
    batch_read: Option<PathBuf>,
    /// Aspects to request; the others must already be scored in the input [default: all five].
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    aspects: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    // The judge: the block that `annotate`, `eval` and `iterate` share.
    #[command(flatten)]
    judge: super::judge::JudgeArgs,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(AnnotateCommand::Compare { a, b }) = args.command {
        let c = dpo2d_annotate::compare::compare_files(&a, &b)?;
        print!("{c}");
        return Ok(());
    }
    let r = args.run;
    let (Some(input), Some(output)) = (r.input, r.output) else {
        bail!("annotate needs INPUT and -o OUTPUT (see --help)");
    };
    let aspects = if r.aspects.is_empty() {
        Aspect::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for name in &r.aspects {
            let a =
                Aspect::parse(name).with_context(|| format!("unknown aspect {name:?}; choose from {}", dpo2d_data::ASPECTS.join(", ")))?;
            if !v.contains(&a) {
                v.push(a);
            }
        }
        v
    };
    let route = if r.dry_run {
        Route::DryRun
    } else if let Some(path) = r.batch_write {
        Route::WriteRequests(path)
    } else if let Some(path) = r.batch_read {
        Route::ReadResults(path)
    } else if r.batch {
        let poll_interval = std::time::Duration::try_from_secs_f64(r.batch_poll_interval)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--batch-poll-interval must be a positive number of seconds")?;
        let mut limits = BatchLimits::default();
        if let Some(n) = r.batch_max_requests {
            limits.max_requests = n.max(1);
        }
        Route::Batch { poll_interval, limits }
    } else {
        Route::Direct
    };
    // Printing or writing requests, or reading results, needs no server.
    let offline = matches!(route, Route::DryRun | Route::WriteRequests(_) | Route::ReadResults(_));
    let judge = r.judge.settings((offline && r.judge.judge_base_url.is_empty()).then_some("http://localhost:8000/v1"))?;
    let opts = Options { judge, aspects, progress: !r.no_progress };
    let job = AnnotateJob { input, output, cache: r.cache, failed_out: r.failed_out, route };
    let summary = annotate_file(&job, &opts)?;
    eprintln!("{summary}");
    if !summary.failed.is_empty() && job.failed_out.is_none() {
        eprintln!("(pass --failed-out FILE to save the failed pairs with their reasons)");
    }
    Ok(())
}
