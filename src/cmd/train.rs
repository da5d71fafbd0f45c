//! `dpo2d train`: preference training with 2D-DPO or a baseline loss.
//! Options come from defaults < `--preset` < `--config FILE.toml` < flags;
//! flag names follow TRL (`--learning_rate` and `--learning-rate` both work).

use anyhow::{Context, Result};
use dpo2d_train::config::{Preset, Task, TrainConfig};
use dpo2d_train::loss::{AspectWeights, LossType};
use dpo2d_train::sampler::SamplingStrategy;
use dpo2d_train::schedule::SchedulerType;
use dpo2d_train::trainer::{train, RunOptions};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file of training options, named as the flags with underscores [default: none].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Named options applied before the config file: paper (docs/method.md §6) or quickstart [default: none].
    #[arg(long, value_name = "NAME")]
    preset: Option<Preset>,
    /// Continue from the latest checkpoint in output_dir, or from this checkpoint directory [default: latest].
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
    cache_dir: Option<PathBuf>,
    /// No progress bar (log lines instead).
    #[arg(long)]
    no_progress: bool,
    /// Replace an earlier run's checkpoints and metrics in output_dir (otherwise such a directory is refused).
    #[arg(long, alias = "overwrite_output_dir")]
    overwrite_output_dir: bool,
    /// Stop after this many optimizer steps as if interrupted (checkpoints written so far stay).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    #[command(flatten)]
    device: super::DeviceArg,

    #[command(flatten)]
    o: Overrides,
}

/// Flags that override configuration keys; field names are the keys. Each
/// has no clap default (it would override presets and config files): the
/// help shows the built-in one ([`show_default`]).
#[derive(clap::Args, Debug, Serialize, Default)]
#[command(mut_args(show_default))]
pub(crate) struct Overrides {
    /// Policy model: a Hugging Face directory, a .gguf file, or smollm2 (fetched).
    #[arg(long, value_name = "MODEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<String>,
    /// Reference model [default: a frozen copy of the starting policy].
    #[arg(long, alias = "ref_model", value_name = "MODEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ref_model: Option<String>,
    /// Training pairs (.jsonl) [default: none; required].
    #[arg(long, alias = "train_file", alias = "data", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) train_file: Option<PathBuf>,
    /// Held-out pairs (.jsonl) [default: none; see --eval-split].
    #[arg(long, alias = "eval_file", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_file: Option<PathBuf>,
    /// Share of the training pairs held out when no eval file is given.
    #[arg(long, alias = "eval_split", value_name = "SHARE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_split: Option<f64>,
    /// Where checkpoints, metrics, charts and the final model go.
    #[arg(long, alias = "output_dir", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) output_dir: Option<PathBuf>,
    /// The loss: dpo, ipo, kto, orpo, simpo, tdpo1, tdpo2, 1d-dpo or 2d-dpo.
    #[arg(long, alias = "loss_type", alias = "loss", value_name = "LOSS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_type: Option<LossType>,
    /// Strength of the implicit KL penalty (TRL's beta; the paper's 0.2 is in --preset paper).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    beta: Option<f64>,
    /// Weight of the SFT term (mean NLL per chosen token).
    #[arg(long, alias = "sft_weight", value_name = "W")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sft_weight: Option<f64>,
    /// Weights of helpfulness, correctness, safety, completeness and clarity, summing to 1.
    #[arg(long, alias = "aspect_weights", value_name = "H,C,S,CO,CL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect_weights: Option<AspectWeights>,
    /// SimPO's target reward margin gamma.
    #[arg(long, alias = "simpo_gamma", value_name = "GAMMA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    simpo_gamma: Option<f64>,
    /// TDPO2's weight alpha of the sequential KL term.
    #[arg(long, alias = "tdpo_alpha", value_name = "ALPHA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tdpo_alpha: Option<f64>,
    /// Label smoothing of DPO (conservative DPO); 0 is plain DPO.
    #[arg(long, alias = "label_smoothing", value_name = "EPS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    label_smoothing: Option<f64>,
    /// Peak learning rate of AdamW.
    #[arg(long, alias = "learning_rate", alias = "lr", value_name = "LR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    /// Learning-rate schedule: cosine, linear, constant or constant_with_warmup.
    #[arg(long, alias = "lr_scheduler_type", value_name = "SCHEDULE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_scheduler_type: Option<SchedulerType>,
    /// Share of the updates spent warming the learning rate up from 0.
    #[arg(long, alias = "warmup_ratio", value_name = "SHARE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_ratio: Option<f64>,
    /// Warm-up updates (overrides --warmup-ratio when > 0).
    #[arg(long, alias = "warmup_steps", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<usize>,
    /// AdamW's decoupled weight decay.
    #[arg(long, alias = "weight_decay", value_name = "W")]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    /// AdamW's decay rate of the first moment.
    #[arg(long, alias = "adam_beta1", value_name = "B1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    /// AdamW's decay rate of the second moment.
    #[arg(long, alias = "adam_beta2", value_name = "B2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    /// AdamW's epsilon.
    #[arg(long, alias = "adam_epsilon", value_name = "EPS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_epsilon: Option<f64>,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, alias = "max_grad_norm", value_name = "NORM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    /// Pairs per micro-batch.
    #[arg(long, alias = "per_device_train_batch_size", alias = "batch-size", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_train_batch_size: Option<usize>,
    /// Pairs per evaluation batch.
    #[arg(long, alias = "per_device_eval_batch_size", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_eval_batch_size: Option<usize>,
    /// Order of the training pairs: random (a seeded shuffle per epoch) or sequential (file order).
    #[arg(long, alias = "train_sampling_strategy", value_name = "ORDER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    train_sampling_strategy: Option<SamplingStrategy>,
    /// Pairs per forward/backward pass inside a micro-batch (0 = all; fewer = less memory).
    #[arg(long, alias = "pairs_per_forward", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pairs_per_forward: Option<usize>,
    /// Micro-batches per optimizer update.
    #[arg(long, alias = "gradient_accumulation_steps", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_accumulation_steps: Option<usize>,
    /// Passes over the training pairs (fractions allowed).
    #[arg(long, alias = "num_train_epochs", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_train_epochs: Option<f64>,
    /// Optimizer updates (overrides --num-train-epochs when > 0).
    #[arg(long, alias = "max_steps", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<usize>,
    /// Seed of the data order, dropout and LoRA initialisation.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Most tokens of prompt and response together (longer responses are cut).
    #[arg(long, alias = "max_length", value_name = "TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_length: Option<usize>,
    /// Most prompt tokens (longer prompts keep their end).
    #[arg(long, alias = "max_prompt_length", value_name = "TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_prompt_length: Option<usize>,
    /// Write the training metrics every N updates.
    #[arg(long, alias = "logging_steps", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_steps: Option<usize>,
    /// Evaluate every N updates (0 = only at the end, when there is held-out data).
    #[arg(long, alias = "eval_steps", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_steps: Option<usize>,
    /// Write a checkpoint every N updates (0 = only at the end).
    #[arg(long, alias = "save_steps", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_steps: Option<usize>,
    /// Keep at most this many intermediate checkpoints (0 = all).
    #[arg(long, alias = "save_total_limit", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_total_limit: Option<usize>,
    /// With LoRA, also write the merged model to final/merged/.
    #[arg(long, alias = "save_merged", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_merged: Option<bool>,
    /// Mixed precision: bf16 weights and activations, f32 master weights.
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    bf16: Option<bool>,
    /// Recompute each decoder block in backward instead of keeping its activations.
    #[arg(long, alias = "gradient_checkpointing", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing: Option<bool>,
    /// Train LoRA adapters instead of every weight.
    #[arg(long, alias = "use_lora", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    use_lora: Option<bool>,
    /// LoRA rank.
    #[arg(long, alias = "lora_r", value_name = "R")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_r: Option<usize>,
    /// LoRA scale numerator (the update is scaled by alpha / r).
    #[arg(long, alias = "lora_alpha", value_name = "ALPHA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA path's input.
    #[arg(long, alias = "lora_dropout", value_name = "P")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    /// Modules that get adapters, comma-separated (q_proj,...,down_proj, or all-linear).
    #[arg(long, alias = "lora_target_modules", value_delimiter = ',', value_name = "MODULES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_target_modules: Option<Vec<String>>,
    /// Compute the reference log-probs once and cache them on disk (TRL's option).
    #[arg(long, alias = "precompute_ref_log_probs", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    precompute_ref_log_probs: Option<bool>,
    /// Skip invalid data lines (reported) instead of stopping.
    #[arg(long, alias = "skip_invalid", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_invalid: Option<bool>,
    /// Skip an update whose loss or gradient is not finite (counted as nonfinite_updates) instead of stopping.
    #[arg(long, alias = "skip_nonfinite_updates", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_nonfinite_updates: Option<bool>,
}

/// Appends the built-in default of the configuration key an option
/// overrides to its help, as clap shows a default (`[default: 0.1]`): the
/// one default, read from [`TrainConfig::default`], not written twice.
pub(crate) fn show_default(a: clap::Arg) -> clap::Arg {
    static DEFAULTS: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    show_default_from(a, DEFAULTS.get_or_init(|| defaults_of(None)))
}

/// [`show_default`] for `quickstart`, whose defaults are its preset's.
pub(crate) fn show_quickstart_default(a: clap::Arg) -> clap::Arg {
    static DEFAULTS: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    show_default_from(a, DEFAULTS.get_or_init(|| defaults_of(Some(Preset::Quickstart))))
}

/// Every option's value with no flag and no config file: the built-in
/// defaults under the preset.
fn defaults_of(preset: Option<Preset>) -> toml::Table {
    let cfg = TrainConfig::resolve(preset, None, toml::Table::new()).unwrap_or_default();
    toml::Table::try_from(cfg).expect("a configuration serialises")
}

fn show_default_from(a: clap::Arg, defaults: &toml::Table) -> clap::Arg {
    let Some(value) = defaults.get(a.get_id().as_str()) else { return a };
    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
    if help.contains("[default: ") {
        return a;
    }
    let shown = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(x) => format!("{x:?}"),
        toml::Value::Array(items) => items.iter().map(|v| v.to_string().trim_matches('"').to_string()).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    };
    a.help(format!("{help} [default: {shown}]"))
}

/// The resolved configuration of `dpo2d train` arguments (shared with quickstart).
pub fn resolve(preset: Option<Preset>, config: Option<&std::path::Path>, o: &impl Serialize) -> Result<TrainConfig> {
    let table = toml::Table::try_from(o).context("command-line options")?;
    TrainConfig::resolve(preset, config, table)
}

/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const INTERRUPTED: i32 = 130;

/// A flag set by the first Ctrl-C (or SIGTERM): the trainer finishes the
/// current update, writes a checkpoint and stops. A second one stops at once.
pub fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: stopping now (no checkpoint)");
            std::process::exit(INTERRUPTED);
        }
        eprintln!("\ninterrupt: finishing the current update and writing a checkpoint (Ctrl-C again to stop at once)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

pub fn run(args: Args) -> Result<()> {
    run_task(args, Task::Preference)
}

/// Train a policy or (`dpo2d rm train`) a reward model.
pub fn run_task(mut args: Args, task: Task) -> Result<()> {
    if task == Task::RewardModel && args.o.output_dir.is_none() {
        args.o.output_dir = Some(PathBuf::from("runs/rm"));
    }
    let mut cfg = resolve(args.preset, args.config.as_deref(), &args.o)?;
    cfg.task = task;
    let resume = match &args.resume {
        Some(r) => Some(dpo2d_train::checkpoint::resolve_resume(r, &cfg.output_dir)?),
        None => None,
    };
    let progress = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stop_signal = stop_on_ctrl_c()?;
    let run = RunOptions {
        resume,
        progress,
        stop_after: args.stop_after,
        cache_dir: args.cache_dir.clone(),
        quiet: false,
        device: args.device.device,
        overwrite_output_dir: args.overwrite_output_dir,
        stop_signal: Some(stop_signal.clone()),
    };
    let outcome = match train(&cfg, &run) {
        Err(e) if stop_signal.load(Ordering::SeqCst) => {
            eprintln!("error: {e:#}");
            eprintln!("interrupted before the first update; nothing to resume");
            std::process::exit(INTERRUPTED);
        }
        other => other?,
    };
    if let Some(cp) = &outcome.checkpoint {
        eprintln!("interrupted: stopped after step {}; checkpoint written to {}", outcome.global_step, cp.display());
        eprintln!("resume with the same command and --resume (or --resume {})", cp.display());
        std::process::exit(INTERRUPTED);
    }
    if outcome.interrupted {
        eprintln!("stopped after step {} (checkpoints in {})", outcome.global_step, outcome.output_dir.display());
        return Ok(());
    }
    println!("{}", outcome.summary);
    println!("model:   {}", outcome.final_model_dir.display());
    println!("metrics: {}", outcome.output_dir.join("metrics.jsonl").display());
    for c in &outcome.charts {
        println!("chart:   {}", c.display());
    }
    Ok(())
}
