//! `dpo2d train`: preference training with 2D-DPO or a baseline loss.
//! Options come from defaults < `--preset` < `--config FILE.toml` < flags;
//! flag names follow TRL (`--learning_rate` and `--learning-rate` both work).

use anyhow::{Context, Result};
use dpo2d_train::config::{Task, TrainConfig};
use dpo2d_train::loss::LossType;
use dpo2d_train::sampler::SamplingStrategy;
use dpo2d_train::schedule::SchedulerType;
use dpo2d_train::trainer::{train, RunOptions};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file with training options (same names as the flags, underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Named preset applied before the config file: `paper` (METHOD §6) or `quickstart`.
    #[arg(long)]
    preset: Option<String>,
    /// Continue from the latest checkpoint in output_dir, or from the given checkpoint directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
    /// Cache directory for precomputed reference log-probs (default: $DPO2D_CACHE or the user cache).
    #[arg(long)]
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

/// Flags that override configuration keys; field names are the keys.
#[derive(clap::Args, Debug, Serialize, Default)]
pub(crate) struct Overrides {
    /// Policy model: HF directory, .gguf file, or `smollm2` (fetched).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<String>,
    /// Reference model (default: a frozen copy of the starting policy).
    #[arg(long, alias = "ref_model")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ref_model: Option<String>,
    /// Training pairs (JSONL).
    #[arg(long, alias = "train_file", alias = "data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) train_file: Option<PathBuf>,
    /// Held-out pairs (JSONL).
    #[arg(long, alias = "eval_file")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_file: Option<PathBuf>,
    /// Share of the training pairs held out when no eval file is given.
    #[arg(long, alias = "eval_split")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_split: Option<f64>,
    #[arg(long, alias = "output_dir")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) output_dir: Option<PathBuf>,
    /// dpo, ipo, kto, orpo, simpo, tdpo1, tdpo2, 1d-dpo, 2d-dpo.
    #[arg(long, alias = "loss_type", alias = "loss")]
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_type: Option<LossType>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    beta: Option<f64>,
    /// Weight of the SFT term on the chosen response.
    #[arg(long, alias = "sft_weight")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sft_weight: Option<f64>,
    /// Five comma-separated weights: helpfulness,correctness,safety,completeness,clarity.
    #[arg(long, alias = "aspect_weights", value_delimiter = ',', num_args = 5)]
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect_weights: Option<Vec<f64>>,
    #[arg(long, alias = "simpo_gamma")]
    #[serde(skip_serializing_if = "Option::is_none")]
    simpo_gamma: Option<f64>,
    #[arg(long, alias = "tdpo_alpha")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tdpo_alpha: Option<f64>,
    #[arg(long, alias = "label_smoothing")]
    #[serde(skip_serializing_if = "Option::is_none")]
    label_smoothing: Option<f64>,
    #[arg(long, alias = "learning_rate", alias = "lr")]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    /// cosine, linear, constant, constant_with_warmup.
    #[arg(long, alias = "lr_scheduler_type")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_scheduler_type: Option<SchedulerType>,
    #[arg(long, alias = "warmup_ratio")]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_ratio: Option<f64>,
    #[arg(long, alias = "warmup_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<usize>,
    #[arg(long, alias = "weight_decay")]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    #[arg(long, alias = "adam_beta1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    #[arg(long, alias = "adam_beta2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    #[arg(long, alias = "adam_epsilon")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_epsilon: Option<f64>,
    #[arg(long, alias = "max_grad_norm")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    #[arg(long, alias = "per_device_train_batch_size", alias = "batch-size")]
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_train_batch_size: Option<usize>,
    #[arg(long, alias = "per_device_eval_batch_size")]
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_eval_batch_size: Option<usize>,
    /// Order of training pairs: `random` (seeded shuffle per epoch) or `sequential` (file order).
    #[arg(long, alias = "train_sampling_strategy")]
    #[serde(skip_serializing_if = "Option::is_none")]
    train_sampling_strategy: Option<SamplingStrategy>,
    /// Pairs per forward/backward pass inside a micro-batch (0 = all; less = less memory).
    #[arg(long, alias = "pairs_per_forward")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pairs_per_forward: Option<usize>,
    #[arg(long, alias = "gradient_accumulation_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_accumulation_steps: Option<usize>,
    #[arg(long, alias = "num_train_epochs")]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_train_epochs: Option<f64>,
    /// Optimizer updates (overrides num_train_epochs when > 0).
    #[arg(long, alias = "max_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[arg(long, alias = "max_length")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_length: Option<usize>,
    #[arg(long, alias = "max_prompt_length")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_prompt_length: Option<usize>,
    #[arg(long, alias = "logging_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_steps: Option<usize>,
    #[arg(long, alias = "eval_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_steps: Option<usize>,
    #[arg(long, alias = "save_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_steps: Option<usize>,
    #[arg(long, alias = "save_total_limit")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_total_limit: Option<usize>,
    /// With LoRA, also write the merged model to final/merged/ (default true).
    #[arg(long, alias = "save_merged")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_merged: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bf16: Option<bool>,
    #[arg(long, alias = "gradient_checkpointing")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing: Option<bool>,
    #[arg(long, alias = "use_lora")]
    #[serde(skip_serializing_if = "Option::is_none")]
    use_lora: Option<bool>,
    #[arg(long, alias = "lora_r")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_r: Option<usize>,
    #[arg(long, alias = "lora_alpha")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    #[arg(long, alias = "lora_dropout")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    /// Comma-separated, e.g. q_proj,v_proj or all-linear.
    #[arg(long, alias = "lora_target_modules", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_target_modules: Option<Vec<String>>,
    #[arg(long, alias = "precompute_ref_log_probs")]
    #[serde(skip_serializing_if = "Option::is_none")]
    precompute_ref_log_probs: Option<bool>,
    /// Skip invalid data lines (reported) instead of stopping.
    #[arg(long, alias = "skip_invalid")]
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_invalid: Option<bool>,
    /// Skip an update whose loss or gradient is not finite (counted as nonfinite_updates) instead of stopping.
    #[arg(long, alias = "skip_nonfinite_updates")]
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_nonfinite_updates: Option<bool>,
}

/// The resolved configuration of `dpo2d train` arguments (shared with quickstart).
pub fn resolve(preset: Option<&str>, config: Option<&std::path::Path>, o: &impl Serialize) -> Result<TrainConfig> {
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
    let mut cfg = resolve(args.preset.as_deref(), args.config.as_deref(), &args.o)?;
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
