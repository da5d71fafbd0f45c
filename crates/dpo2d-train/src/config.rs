//! Training configuration: one flat set of options with TRL's names where
//! TRL has the option (`beta`, `loss_type`, `learning_rate`, `max_length`,
//! ...), plus dpo2d's own (`aspect_weights`, `sft_weight`, LoRA options).
//!
//! Sources are layered: built-in defaults < `--preset` < `--config` TOML file
//! < command-line overrides. Unknown keys in a TOML file are an error that
//! names the key, so a typo never silently falls back to a default. Options
//! with a fixed set of values are enums, parsed once here by serde: a bad
//! value fails when the configuration is read, naming the key and the
//! allowed values.

use crate::loss::{AspectWeights, LossConfig, LossType};
use crate::sampler::SamplingStrategy;
use crate::schedule::SchedulerType;
use anyhow::{anyhow, bail, Context, Result};
use dpo2d_model::lora::LoraTarget;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a training run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// A policy, with a preference loss (`dpo2d train`).
    #[default]
    Preference,
    /// A 2-D reward model: per-segment scores by regression (`dpo2d rm train`).
    RewardModel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Policy model: a Hugging Face directory, a GGUF file, or `smollm2`.
    pub model: String,
    /// Reference model; default: a frozen copy of the starting policy.
    pub ref_model: Option<String>,
    /// Training pairs (JSONL).
    pub train_file: Option<PathBuf>,
    /// Held-out pairs (JSONL); alternative to `eval_split`.
    pub eval_file: Option<PathBuf>,
    /// Share of the training pairs held out for evaluation when no eval file is given.
    pub eval_split: f64,
    pub output_dir: PathBuf,
    /// What is trained: a policy on preferences, or a 2-D reward model
    /// (`dpo2d rm train`; the loss options do not apply to it).
    pub task: Task,

    // Loss.
    pub loss_type: LossType,
    pub beta: f64,
    /// Weight of the SFT term (mean NLL per chosen token); paper: 0.1.
    pub sft_weight: f64,
    /// Aspect weights W (helpfulness, correctness, safety, completeness, clarity).
    pub aspect_weights: AspectWeights,
    /// SimPO target margin gamma (paper: 0.5).
    pub simpo_gamma: f64,
    /// TDPO alpha (paper: 0.5).
    pub tdpo_alpha: f64,
    /// DPO label smoothing (conservative DPO); 0 = plain DPO.
    pub label_smoothing: f64,

    // Optimisation.
    pub learning_rate: f64,
    pub lr_scheduler_type: SchedulerType,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    /// Pairs per forward/backward pass inside a micro-batch (0 = the whole
    /// micro-batch). Smaller = less activation memory, same gradient (KTO
    /// always uses the whole micro-batch).
    pub pairs_per_forward: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// Number of optimizer updates; > 0 overrides `num_train_epochs`.
    pub max_steps: usize,
    pub seed: u64,
    /// `random`: a seeded permutation of the training pairs per epoch;
    /// `sequential`: file order (TRL's `train_sampling_strategy`).
    pub train_sampling_strategy: SamplingStrategy,

    // Sequences.
    pub max_length: usize,
    pub max_prompt_length: usize,

    // Logging, evaluation, checkpoints.
    pub logging_steps: usize,
    /// Evaluate every N updates (0 = only at the end when there is eval data).
    pub eval_steps: usize,
    /// Checkpoint every N updates (0 = only at the end).
    pub save_steps: usize,
    /// Keep at most this many intermediate checkpoints (0 = all).
    pub save_total_limit: usize,
    /// A LoRA run also writes its adapters merged into the base weights
    /// (`final/merged/`, a whole model: 15 GB for a 7B one); off, `final/`
    /// holds the adapter alone, which `generate`, `logprobs`, `serve` and
    /// `eval` load on top of the base model. Reward models always write it
    /// (`rm score` reads it).
    pub save_merged: bool,

    // Precision / device / memory.
    pub bf16: bool,
    /// Recompute each decoder block in backward instead of keeping its
    /// activations (TRL's and transformers' name).
    pub gradient_checkpointing: bool,

    // LoRA.
    pub use_lora: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Modules that get adapters (`q_proj`, ..., or `all-linear`).
    #[serde(with = "lora_targets")]
    pub lora_target_modules: Vec<LoraTarget>,

    // Reference model handling.
    /// Precompute reference log-probs once and cache them on disk (TRL's
    /// `precompute_ref_log_probs`); ignored for losses that need the
    /// reference's full distribution.
    pub precompute_ref_log_probs: bool,
    /// Skip invalid data lines (reported) instead of failing.
    pub skip_invalid: bool,
    /// An update whose loss or gradient norm is not finite is skipped
    /// (counted as `nonfinite_updates` in the metrics) instead of stopping
    /// the run with an error.
    pub skip_nonfinite_updates: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let loss = LossConfig::default();
        TrainConfig {
            model: "smollm2".into(),
            ref_model: None,
            train_file: None,
            eval_file: None,
            eval_split: 0.0,
            output_dir: PathBuf::from("runs/train"),
            task: Task::Preference,
            loss_type: loss.loss_type,
            beta: loss.beta,
            sft_weight: loss.sft_weight,
            aspect_weights: loss.aspect_weights,
            simpo_gamma: loss.simpo_gamma,
            tdpo_alpha: loss.tdpo_alpha,
            label_smoothing: loss.label_smoothing,
            learning_rate: 1e-6,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            pairs_per_forward: 2,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: 0,
            train_sampling_strategy: SamplingStrategy::Random,
            seed: 42,
            max_length: 1024,
            max_prompt_length: 512,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 500,
            save_total_limit: 0,
            save_merged: true,
            bf16: false,
            gradient_checkpointing: false,
            use_lora: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
            precompute_ref_log_probs: true,
            skip_invalid: false,
            skip_nonfinite_updates: false,
        }
    }
}

/// `lora_target_modules` as PEFT writes them (`["q_proj", ...]`); reading
/// also takes `all-linear` and short names, through [`LoraTarget::parse_list`].
mod lora_targets {
    use dpo2d_model::lora::LoraTarget;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(targets: &[LoraTarget], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(targets.iter().map(|t| t.hf_name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LoraTarget>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        LoraTarget::parse_list(&names.join(",")).map_err(serde::de::Error::custom)
    }
}

/// Options that do not change the trained weights, so a resumed run may
/// set them differently (paths are covered by the data fingerprint).
pub const MAY_CHANGE_ON_RESUME: &[&str] = &[
    "output_dir",
    "train_file",
    "eval_file",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "save_merged",
    "per_device_eval_batch_size",
    "skip_invalid",
    "skip_nonfinite_updates",
];

/// A named set of options applied before the config file (`--preset`); the
/// same TOML text ships in `configs/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// docs/method.md §6: beta 0.2, lr 1e-7 cosine, batch 1 x grad-accum 8,
    /// 700 steps, bf16. The paper's global batch of 64 came from 8 GPUs; one
    /// device gets 8.
    Paper,
    /// The settings `dpo2d quickstart` trains with.
    Quickstart,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Paper, Preset::Quickstart];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Quickstart => "quickstart",
        }
    }

    /// The preset's options, as TOML text.
    pub fn toml(self) -> &'static str {
        match self {
            Preset::Paper => include_str!("../../../configs/paper.toml"),
            Preset::Quickstart => include_str!("../../../configs/quickstart.toml"),
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Preset::ALL.into_iter().find(|p| p.name() == s.trim()).with_context(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("unknown preset {s:?}; expected one of: {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TrainConfig {
    /// Layer defaults < preset < file < overrides, then validate.
    pub fn resolve(preset: Option<Preset>, file: Option<&Path>, overrides: toml::Table) -> Result<Self> {
        let mut table = toml::Table::new();
        if let Some(p) = preset {
            let t: toml::Table = toml::from_str(p.toml()).with_context(|| format!("parsing preset {p}"))?;
            check_keys(&t, &format!("preset {p}"))?;
            table.extend(t);
        }
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading config {}", f.display()))?;
            let t: toml::Table = toml::from_str(&text).with_context(|| format!("parsing config {}", f.display()))?;
            check_keys(&t, &f.display().to_string())?;
            table.extend(t);
        }
        check_keys(&overrides, "command line")?;
        table.extend(overrides);
        let cfg = from_table(table)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the types cannot express (ranges, combinations).
    pub fn validate(&self) -> Result<()> {
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            bail!("eval_split must be in [0, 1), got {}", self.eval_split);
        }
        if self.max_length < 2 {
            bail!("max_length must be at least 2");
        }
        if self.learning_rate < 0.0 || !self.learning_rate.is_finite() {
            bail!("learning_rate must be a finite non-negative number");
        }
        if self.max_steps == 0 && self.num_train_epochs <= 0.0 {
            bail!("set max_steps or num_train_epochs to a positive value");
        }
        self.loss_config().validate()
    }

    /// Training needs every response split into scored segments.
    pub fn needs_segment_scores(&self) -> bool {
        self.task == Task::RewardModel || self.loss_type.needs_segment_scores()
    }

    /// Training needs a reference model.
    pub fn needs_reference(&self) -> bool {
        self.task == Task::Preference && self.loss_type.needs_reference()
    }

    /// The loss hyper-parameters of this configuration.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            loss_type: self.loss_type,
            beta: self.beta,
            sft_weight: self.sft_weight,
            simpo_gamma: self.simpo_gamma,
            tdpo_alpha: self.tdpo_alpha,
            label_smoothing: self.label_smoothing,
            aspect_weights: self.aspect_weights,
            ..LossConfig::default()
        }
    }

    /// The options that differ from `earlier` (a checkpoint's), as
    /// `name: old -> new`, leaving out those a resumed run may change
    /// ([`MAY_CHANGE_ON_RESUME`]).
    pub fn changes_from(&self, earlier: &TrainConfig) -> Result<Vec<String>> {
        let (now, then) = (toml::Table::try_from(self)?, toml::Table::try_from(earlier)?);
        let mut keys: Vec<&String> = now.keys().chain(then.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
        Ok(keys
            .into_iter()
            .filter(|k| !MAY_CHANGE_ON_RESUME.contains(&k.as_str()) && now.get(*k) != then.get(*k))
            .map(|k| format!("{k}: {} -> {}", show(then.get(k)), show(now.get(k))))
            .collect())
    }

    /// The configuration as TOML (written to the output directory).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// Reject keys that are not options, naming them and the source.
fn check_keys(t: &toml::Table, source: &str) -> Result<()> {
    let known = toml::Value::try_from(TrainConfig::default())?;
    let known = known.as_table().expect("config serialises to a table");
    let optional = ["ref_model", "train_file", "eval_file"];
    for k in t.keys() {
        if !known.contains_key(k) && !optional.contains(&k.as_str()) {
            bail!("{source}: unknown option {k:?}");
        }
    }
    Ok(())
}

/// The configuration from merged TOML keys. When a value does not fit its
/// option, the error names the key (serde alone may not), found by reading
/// each key on its own over the defaults.
fn from_table(table: toml::Table) -> Result<TrainConfig> {
    let err = match toml::Value::Table(table.clone()).try_into::<TrainConfig>() {
        Ok(cfg) => return Ok(cfg),
        Err(e) => e,
    };
    let defaults = toml::Value::try_from(TrainConfig::default())?;
    for (k, v) in &table {
        let mut one = defaults.as_table().cloned().unwrap_or_default();
        one.insert(k.clone(), v.clone());
        if let Err(e) = toml::Value::Table(one).try_into::<TrainConfig>() {
            return Err(anyhow!("option `{k}`: {}", e.to_string().trim()));
        }
    }
    Err(anyhow!(err).context("invalid training configuration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layering_and_presets() -> Result<()> {
        let cfg = TrainConfig::resolve(Some(Preset::Paper), None, toml::Table::new())?;
        assert_eq!(cfg.beta, 0.2);
        assert_eq!(cfg.learning_rate, 1e-7);
        assert_eq!(cfg.gradient_accumulation_steps, 8);
        assert_eq!(cfg.per_device_train_batch_size, 1);
        assert_eq!(cfg.max_steps, 700);
        assert_eq!(cfg.lr_scheduler_type, SchedulerType::Cosine);
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "beta = 0.5\nlearning_rate = 2e-6\n")?;
        let mut o = toml::Table::new();
        o.insert("beta".into(), toml::Value::Float(0.7));
        let cfg = TrainConfig::resolve(Some(Preset::Paper), Some(&f), o)?;
        assert_eq!(cfg.beta, 0.7);
        assert_eq!(cfg.learning_rate, 2e-6);
        assert_eq!(cfg.max_steps, 700);
        Ok(())
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "betta = 0.5\n").unwrap();
        let e = TrainConfig::resolve(None, Some(&f), toml::Table::new()).unwrap_err();
        assert!(format!("{e:#}").contains("betta"), "{e:#}");
        let e = "nope".parse::<Preset>().unwrap_err();
        assert!(format!("{e:#}").contains("\"nope\"; expected one of: paper, quickstart"), "{e:#}");
        assert_eq!("quickstart".parse::<Preset>().unwrap(), Preset::Quickstart);
    }

    #[test]
    fn bad_weights_rejected() {
        let mut o = toml::Table::new();
        o.insert("aspect_weights".into(), toml::Value::try_from([0.5, 0.5, 0.5, 0.0, 0.0]).unwrap());
        assert!(TrainConfig::resolve(None, None, o).is_err());
    }

    #[test]
    fn bad_enum_values_name_the_key_and_the_choices() {
        for (key, value, allowed) in [
            ("loss_type", "dpp", "2d-dpo"),
            ("lr_scheduler_type", "cosin", "cosine"),
            ("train_sampling_strategy", "shuffled", "sequential"),
            ("lora_target_modules", "qq_proj", "all-linear"),
        ] {
            let mut o = toml::Table::new();
            let v = if key == "lora_target_modules" { toml::Value::try_from([value]).unwrap() } else { toml::Value::from(value) };
            o.insert(key.into(), v);
            let e = format!("{:#}", TrainConfig::resolve(None, None, o).unwrap_err());
            assert!(e.contains(key) && e.contains(value) && e.contains(allowed), "{e}");
        }
    }

    #[test]
    fn one_default_per_hyper_parameter() {
        let (cfg, loss) = (TrainConfig::default(), LossConfig::default());
        assert_eq!(cfg.loss_config(), loss);
        let all = toml::Value::try_from(&cfg).unwrap();
        let back: TrainConfig = all.try_into().unwrap();
        assert_eq!(back, cfg);
    }
}
