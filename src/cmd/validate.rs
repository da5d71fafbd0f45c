//! `dpo2d validate`: check a pair file, list every bad line, summarise the data.
use anyhow::{bail, Result};
use dpo2d_data::{load_pairs, DataStats, Limits, LoadOptions, Requirement};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Pair file (.jsonl or .jsonl.gz; `-` reads standard input).
    pub file: PathBuf,
    /// Require segmented responses with every segment scored (what the 2-D losses need).
    #[arg(long)]
    pub require_scores: bool,
    /// Require segmented responses, scores optional (what `dpo2d annotate` takes).
    #[arg(long, conflicts_with = "require_scores")]
    pub require_segments: bool,
    /// Report bad lines as "would be skipped" and exit 0 (training with --skip-invalid drops them).
    #[arg(long)]
    pub skip_invalid: bool,
    /// Most segments allowed in one response.
    #[arg(long, default_value_t = Limits::default().max_segments)]
    pub max_segments: usize,
    /// Most characters allowed in one response.
    #[arg(long, default_value_t = Limits::default().max_response_chars)]
    pub max_chars: usize,
    /// Most characters allowed in a prompt.
    #[arg(long, default_value_t = Limits::default().max_prompt_chars)]
    pub max_prompt_chars: usize,
    /// How many bad lines to list.
    #[arg(long, default_value_t = 20)]
    pub max_errors: usize,
    /// Write the valid pairs (normalised) to this file [default: none].
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let requirement = if args.require_scores {
        Requirement::Scored
    } else if args.require_segments {
        Requirement::Segmented
    } else {
        Requirement::Plain
    };
    let opts = LoadOptions {
        requirement,
        limits: Limits {
            max_segments: args.max_segments,
            max_response_chars: args.max_chars,
            max_prompt_chars: args.max_prompt_chars,
            ..Limits::default()
        },
        skip_invalid: args.skip_invalid,
        max_listed: args.max_errors,
    };
    let loaded = load_pairs(&args.file, &opts)?;
    let stats = DataStats::from_pairs(&loaded.pairs);
    println!("{}: {} valid pair(s)", args.file.display(), loaded.pairs.len());
    print!("{stats}");
    if !loaded.skipped.is_empty() {
        println!(
            "{} of {} line(s) invalid and would be skipped:\n{}",
            loaded.skipped.lines_skipped, loaded.skipped.lines_read, loaded.skipped
        );
    }
    if let Some(out) = &args.output {
        let n = dpo2d_data::io::write_jsonl(out, &loaded.pairs)?;
        println!("wrote {n} pair(s) to {}", out.display());
    }
    if loaded.pairs.is_empty() {
        bail!("{}: no valid pairs", args.file.display());
    }
    Ok(())
}
