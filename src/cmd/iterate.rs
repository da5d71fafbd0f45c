//! `dpo2d iterate`: rounds of sampling from the policy, scoring every
//! segment, pairing best against worst, and training (crate `dpo2d-iterate`).
//! Training options are `dpo2d train`'s; `--model` is the starting policy.

use anyhow::{bail, Context, Result};
use dpo2d_iterate::{
    iterate, ArithmeticScorer, IterateConfig, IterateRun, JudgeScorer, RewardModelScorer, SamplingSettings, Scorer, ServerSampler,
};
use dpo2d_train::config::Preset;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(clap::Args, Debug)]
#[command(mut_args(super::judge::prefixed_only))]
pub struct Args {
    /// Prompts to sample answers for: a JSONL file with a "prompt" per line, or arithmetic:N / arithmetic-L:N (N generated word problems; levels 1-6: 1-3 steps, tiny to larger numbers; plain arithmetic is level 5).
    #[arg(long)]
    prompts: String,
    /// What scores the answers: check:arithmetic, judge:URL (an OpenAI-compatible server) or rm:DIR (a reward model).
    #[arg(long)]
    scorer: ScorerSpec,
    /// Rounds of sample -> score -> train (a finished run continues with more rounds).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Answers sampled per prompt (K).
    #[arg(long, default_value_t = SamplingSettings::default().samples_per_prompt)]
    samples_per_prompt: usize,
    /// Sampling temperature of the answers.
    #[arg(long, default_value_t = SamplingSettings::default().temperature)]
    temperature: f64,
    /// Nucleus sampling of the answers.
    #[arg(long, default_value_t = SamplingSettings::default().top_p)]
    top_p: f64,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = SamplingSettings::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Answers decoded together.
    #[arg(long, default_value_t = SamplingSettings::default().batch_size)]
    sampling_batch_size: usize,
    /// Sample through an OpenAI-compatible server (vLLM, dpo2d serve, ...) serving the round's policy, at this base URL, e.g. http://localhost:8000/v1 [default: none: dpo2d's own decoder].
    #[arg(long, value_name = "URL", help_heading = "Sampling server")]
    sampler: Option<String>,
    /// Command that serves the round's policy at --sampler, started before sampling and stopped after; {model} is replaced by the policy's path, e.g. "vllm serve {model} --port 8000" [default: none: the server is already up].
    #[arg(long, value_name = "CMD", requires = "sampler", help_heading = "Sampling server")]
    sampler_command: Option<String>,
    /// Model name sent to the sampling server [default: the policy's path, as vLLM names a served directory].
    #[arg(long, value_name = "NAME", requires = "sampler", help_heading = "Sampling server")]
    sampler_model: Option<String>,
    /// Sampling requests in flight at once (one per prompt, n answers each).
    #[arg(long, value_name = "N", default_value_t = 8, requires = "sampler", help_heading = "Sampling server")]
    sampler_concurrency: usize,
    /// Per-request timeout of the sampling server, and the longest wait for a started one, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600.0, requires = "sampler", help_heading = "Sampling server")]
    sampler_timeout: f64,
    /// TOML file of training options, as `dpo2d train --config` [default: none].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Training preset, as `dpo2d train --preset`: paper or quickstart [default: none].
    #[arg(long, value_name = "NAME")]
    preset: Option<Preset>,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
    cache_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    device: super::DeviceArg,
    #[command(flatten)]
    o: super::train::Overrides,
    // The judge: the block that `annotate`, `eval` and `iterate` share.
    #[command(flatten)]
    judge: super::judge::JudgeArgs,
}

/// `--scorer`, parsed once.
#[derive(Debug, Clone)]
enum ScorerSpec {
    Arithmetic,
    Judge(String),
    RewardModel(PathBuf),
}

impl FromStr for ScorerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("check", "arithmetic")) => Ok(ScorerSpec::Arithmetic),
            Some(("judge", url)) if !url.is_empty() => Ok(ScorerSpec::Judge(url.to_string())),
            Some(("rm", dir)) if !dir.is_empty() => Ok(ScorerSpec::RewardModel(PathBuf::from(dir))),
            _ => Err(format!("expected check:arithmetic, judge:URL or rm:DIR, got {s:?}")),
        }
    }
}

impl Args {
    fn sampler(&self) -> Result<Option<ServerSampler>> {
        let Some(base_url) = &self.sampler else { return Ok(None) };
        let timeout = std::time::Duration::try_from_secs_f64(self.sampler_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--sampler-timeout must be a positive number of seconds")?;
        Ok(Some(ServerSampler {
            base_url: base_url.clone(),
            command: self.sampler_command.clone(),
            model: self.sampler_model.clone(),
            concurrency: self.sampler_concurrency.max(1),
            timeout,
        }))
    }

    fn scorer(&self) -> Result<Box<dyn Scorer>> {
        Ok(match &self.scorer {
            ScorerSpec::Arithmetic => Box::new(ArithmeticScorer),
            ScorerSpec::RewardModel(dir) => Box::new(RewardModelScorer {
                path: dir.clone(),
                model: dpo2d_train::reward::RewardModel::load(dir, &self.device.device.device()?)?,
                batch_size: self.sampling_batch_size,
            }),
            ScorerSpec::Judge(url) => {
                let judge = self.judge.settings(Some(url)).context("judge:URL")?;
                let options = dpo2d_annotate::Options { judge, aspects: dpo2d_annotate::Aspect::ALL.to_vec(), progress: !self.no_progress };
                Box::new(JudgeScorer { options })
            }
        })
    }
}

pub fn run(mut args: Args) -> Result<()> {
    if args.o.train_file.is_some() {
        bail!("iterate trains on the pairs each round builds; give prompts with --prompts instead of --train-file");
    }
    if args.o.output_dir.is_none() {
        args.o.output_dir = Some(PathBuf::from("runs/iterate"));
    }
    let mut train = super::train::resolve(args.preset, args.config.as_deref(), &args.o)?;
    // Each round's pairs go in `train_file` as it starts.
    train.train_file = None;
    let prompts = dpo2d_iterate::prompts::from_spec(&args.prompts, train.seed)?;
    let scorer = args.scorer()?;
    let sampling = SamplingSettings {
        samples_per_prompt: args.samples_per_prompt,
        temperature: args.temperature,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        batch_size: args.sampling_batch_size,
        seed: train.seed,
    };
    let cfg = IterateConfig { train, rounds: args.rounds, sampling };
    let progress = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stop_signal = super::train::stop_on_ctrl_c()?;
    let run = IterateRun {
        device: args.device.device,
        cache_dir: args.cache_dir.clone(),
        progress,
        quiet: false,
        stop_at: None,
        stop_signal: Some(stop_signal),
        sampler: args.sampler()?,
    };
    let outcome = iterate(&cfg, &prompts, scorer.as_ref(), &run)?;
    if outcome.interrupted {
        eprintln!("interrupted: run the same command again to continue where it stopped");
        std::process::exit(super::train::INTERRUPTED);
    }
    println!("| round | prompts | pairs | no pair | mean answer score | chosen | rejected | policy |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &outcome.rounds {
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {} |",
            r.round,
            r.prompts,
            r.pairs,
            r.ties,
            r.mean_score,
            r.chosen_mean_score,
            r.rejected_mean_score,
            r.policy.display()
        );
    }
    Ok(())
}
