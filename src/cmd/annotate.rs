//! `dpo2d annotate`: score every segment of every pair on the five aspects
//! with an LLM judge behind any OpenAI-compatible chat-completions server;
//! `dpo2d annotate compare A B`: agreement between two annotations.
use anyhow::{bail, Context, Result};
use dpo2d_annotate::{annotate_file, AnnotateJob, Aspect, Options};
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
    // A dry run sends nothing, so it needs no server.
    let judge = r.judge.settings(r.dry_run.then_some("http://localhost:8000/v1"))?;
    let opts = Options { judge, aspects, progress: !r.no_progress };
    let job = AnnotateJob { input, output, cache: r.cache, failed_out: r.failed_out, dry_run: r.dry_run };
    let summary = annotate_file(&job, &opts)?;
    eprintln!("{summary}");
    if !summary.failed.is_empty() && job.failed_out.is_none() {
        eprintln!("(pass --failed-out FILE to save the failed pairs with their reasons)");
    }
    Ok(())
}
