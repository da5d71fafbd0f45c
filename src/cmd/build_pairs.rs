//! `dpo2d build-pairs`: HelpSteer2-style rated rows (or TRL pairs) to pair JSONL.
use anyhow::Result;
use dpo2d_data::helpsteer::{build_pairs_from_file, BuildOptions, TieBreak};
use dpo2d_data::{segment_response, Response, SegmentOptions};
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TieBreakArg {
    /// Drop prompts whose two responses have equal helpfulness.
    Drop,
    /// Order equal-helpfulness responses by correctness, then coherence.
    Attributes,
}

#[derive(clap::Args)]
pub struct Args {
    /// Input: HelpSteer2-style rows (prompt, response, helpfulness, ...),
    /// HelpSteer2-Preference rows (prompt, response_1, response_2,
    /// preference_strength) or TRL pairs (prompt, chosen, rejected);
    /// .jsonl, .jsonl.gz or .parquet.
    pub input: PathBuf,
    /// Output pair file (.jsonl, or .jsonl.gz to compress); `-` is standard output.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Smallest helpfulness difference (or preference strength) to keep a pair.
    #[arg(long, default_value_t = 1)]
    pub min_margin: i64,
    /// What to do when both responses have the same helpfulness.
    #[arg(long, value_enum, default_value = "drop")]
    pub tie_break: TieBreakArg,
    /// Drop malformed rows (reported) instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Also split the responses into (unscored) segments, ready for `dpo2d annotate`.
    #[arg(long)]
    pub segment: bool,
    /// Keep only rows whose `split` column has this value, e.g. train [default: all rows].
    #[arg(long)]
    pub split: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let opts = BuildOptions {
        min_margin: args.min_margin,
        tie_break: match args.tie_break {
            TieBreakArg::Drop => TieBreak::Drop,
            TieBreakArg::Attributes => TieBreak::Attributes,
        },
        skip_invalid: args.skip_invalid,
        split: args.split.clone(),
        ..BuildOptions::default()
    };
    let (mut pairs, report) = build_pairs_from_file(&args.input, &opts)?;
    if args.segment {
        let seg = SegmentOptions::default();
        for p in &mut pairs {
            for r in [&mut p.chosen, &mut p.rejected] {
                if let Response::Plain(t) = r {
                    *r = segment_response(t, &seg);
                }
            }
        }
    }
    let n = dpo2d_data::io::write_jsonl(&args.output, &pairs)?;
    eprint!("{report}");
    eprintln!("wrote {n} pair(s) to {}", args.output.display());
    if n == 0 {
        anyhow::bail!("no pairs were built from {}", args.input.display());
    }
    Ok(())
}
