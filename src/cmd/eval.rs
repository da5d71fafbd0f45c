//! `dpo2d eval`: answer a question set with a model and have an LLM judge
//! grade the answers; `dpo2d eval compare A B`: two runs side by side.

use anyhow::{Context, Result};
use dpo2d_eval::answer::AnswerSettings;
use dpo2d_eval::sets::SetSpec;
use dpo2d_eval::{Answerer, EvalOptions, Results};
use dpo2d_model::fetch;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<EvalCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum EvalCommand {
    /// Two evaluation runs side by side (headline, categories, aspects, paired difference).
    Compare {
        /// Output directory (or results.json) of the first run.
        a: PathBuf,
        /// Output directory (or results.json) of the second run.
        b: PathBuf,
        /// Also draw both runs' aspect ratings into this PNG [default: none].
        #[arg(long, value_name = "FILE")]
        plot: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The question set: mt-bench, alpaca-eval, arena-hard, arithmetic or arithmetic-L (levels 1-6, no judge), or a JSONL file
    /// (`prompt` or `turns`; optional `id`, `category`, `reference`, `baseline`).
    #[arg(long, required = true, value_name = "SET")]
    bench: Option<SetSpec>,
    /// The model to evaluate: Hugging Face directory, .gguf file, LoRA checkpoint, or smollm2.
    #[arg(long, required = true)]
    model_path: Option<String>,
    /// Its name in reports [default: --model-path].
    #[arg(long)]
    model_id: Option<String>,
    /// Judge pairwise against this model's answers instead of the set's own baseline [default: the set's].
    #[arg(long)]
    baseline_path: Option<String>,
    /// The baseline's name in reports [default: --baseline-path].
    #[arg(long)]
    baseline_id: Option<String>,
    /// Evaluate only N questions, taken in turn from every category [default: all].
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Longest answer the model may write, in tokens.
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    /// Answers generated together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Skip the five-aspect ratings (one judge request per answer fewer).
    #[arg(long)]
    no_aspects: bool,
    /// Where results.json, report.md and the charts go.
    #[arg(short, long, required = true)]
    output_dir: Option<PathBuf>,
    /// SQLite file of answers and judgements, shared by runs so that a rerun asks only what is missing [default: CACHE_DIR/eval/cache.sqlite].
    #[arg(long, value_name = "PATH")]
    cache: Option<PathBuf>,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: super::DeviceArg,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
    cache_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    // The judge: the block that `annotate`, `eval` and `iterate` share.
    #[command(flatten)]
    judge: super::judge::JudgeArgs,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(EvalCommand::Compare { a, b, plot }) = args.command {
        let (ra, rb) = (Results::load(&a)?, Results::load(&b)?);
        print!("{}", dpo2d_eval::compare(&ra, &rb, 0));
        if let Some(p) = plot {
            let series = [&ra, &rb].map(|r| (r.model.clone(), r.summary.aspects.iter().map(|(k, v)| (k.clone(), *v)).collect()));
            dpo2d_eval::report::bar_chart(&p, "aspect ratings (1-10)", &series, 0.0, 10.0)?;
            eprintln!("wrote {}", p.display());
        }
        return Ok(());
    }
    let r = args.run;
    let (Some(bench), Some(model_path), Some(output_dir)) = (r.bench, r.model_path, r.output_dir) else {
        anyhow::bail!("eval needs --bench, --model-path and -o OUTPUT_DIR (see --help)");
    };
    let cache_root = fetch::cache_dir(r.cache_dir.as_deref())?;
    let answerer = |spec: &str, id: Option<String>| -> Result<Answerer> {
        let path = fetch::resolve_model(spec, r.cache_dir.as_deref())?;
        Ok(Answerer { path, name: id.unwrap_or_else(|| spec.to_string()) })
    };
    let opts = EvalOptions {
        set: bench,
        model: answerer(&model_path, r.model_id)?,
        baseline: r.baseline_path.as_deref().map(|b| answerer(b, r.baseline_id.clone())).transpose()?,
        load: r.device.load_options()?,
        judge: r.judge.given().then(|| r.judge.settings(None)).transpose()?,
        limit: r.limit,
        answer: AnswerSettings { max_new_tokens: r.max_new_tokens, batch_size: r.batch_size.max(1) },
        aspects: !r.no_aspects,
        cache: r.cache.unwrap_or_else(|| cache_root.join("eval").join("cache.sqlite")),
        data_cache: cache_root,
        seed: r.seed,
        progress: !r.no_progress,
    };
    let results = dpo2d_eval::evaluate(&opts)?;
    let files = results.save(&output_dir).with_context(|| format!("writing the results into {}", output_dir.display()))?;
    print!("{}", results.markdown());
    eprintln!("wrote {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}
