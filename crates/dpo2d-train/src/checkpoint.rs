//! Checkpoints: model weights in Hugging Face form (full safetensors
//! directory, or a PEFT LoRA adapter, through [`dpo2d_model::save`]),
//! optimizer state and trainer state, written as one directory with
//! [`dpo2d_fs::write_dir`], so a checkpoint directory is either complete
//! (and flushed to disk) or absent.

use crate::metrics::{Accumulator, Record};
use crate::optim::AdamW;
use crate::reward::{save_reward_model, RewardHead};
use anyhow::{bail, Context, Result};
use dpo2d_model::llama::CausalLM;
use dpo2d_model::save;
use dpo2d_model::source::TextSide;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything besides weights and optimizer that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub global_step: usize,
    /// Micro-batches consumed (position in the data stream).
    pub micro_step: usize,
    pub max_steps: usize,
    pub epoch: f64,
    pub seed: u64,
    /// Order of the training pairs in the current epoch (derived from seed
    /// and epoch; stored for inspection and checked on resume).
    pub data_order: Vec<usize>,
    /// Every record logged so far (what metrics.jsonl holds).
    pub log_history: Vec<Record>,
    /// Metrics of micro-batches since the last logging step.
    pub window: Accumulator,
    pub window_tokens: usize,
    /// Hash of the resolved configuration's training-relevant part.
    pub config_hash: String,
    /// The resolved configuration of the run (its identity, with
    /// `data_fingerprint`; absent in older checkpoints).
    #[serde(default)]
    pub config: Option<crate::config::TrainConfig>,
    /// Hash of the token ids of the training and held-out pairs.
    #[serde(default)]
    pub data_fingerprint: Option<String>,
    /// Updates skipped because the loss or gradient was not finite.
    #[serde(default)]
    pub nonfinite_updates: usize,
    /// State of the LoRA dropout-mask stream (absent in older checkpoints).
    #[serde(default)]
    pub dropout_rng: Option<u64>,
}

/// What a checkpoint holds besides its trainer state.
pub struct Contents<'a> {
    pub policy: &'a CausalLM,
    pub text: &'a TextSide,
    /// Recorded as the adapter's `base_model_name_or_path` (LoRA).
    pub base_model: &'a str,
    /// Saved for resuming (intermediate checkpoints).
    pub optimizer: Option<&'a AdamW>,
    /// Also write the LoRA weights merged into the base under `merged/`.
    pub merged: bool,
    /// A reward model's head: the model is saved as a token classifier.
    pub head: Option<&'a RewardHead>,
}

/// Write the checkpoint `dir`: `model.safetensors` + `config.json` +
/// tokenizer (full fine-tuning) or `adapter_model.safetensors` +
/// `adapter_config.json` (LoRA), `optimizer.safetensors`, `trainer_state.json`.
pub fn save(dir: &Path, c: &Contents, state: &TrainerState) -> Result<()> {
    dpo2d_fs::write_dir(dir, |tmp| {
        save_weights(tmp, c)?;
        if c.merged && c.policy.lora_config().is_some() {
            save_model_dir(&tmp.join("merged"), c, true)?;
        }
        if let Some(opt) = c.optimizer {
            opt.save(&tmp.join("optimizer.safetensors"))?;
        }
        save_state(tmp, state)
    })
    .with_context(|| format!("writing checkpoint {}", dir.display()))
}

/// The model: a full directory, or a LoRA adapter (a reward model's head
/// beside it in [`crate::reward::HEAD_FILE`]).
fn save_weights(dir: &Path, c: &Contents) -> Result<()> {
    if c.policy.lora_config().is_none() {
        return save_model_dir(dir, c, false);
    }
    if let Some(head) = c.head {
        save::save_safetensors(&head.tensors(), &dir.join(crate::reward::HEAD_FILE))?;
    }
    save::save_lora_adapter(c.policy, dir, c.base_model)
}

/// A whole model directory with its tokenizer files (`merged`: LoRA
/// adapters merged in): a causal LM, or a reward model as a token classifier.
fn save_model_dir(dir: &Path, c: &Contents, merged: bool) -> Result<()> {
    if let Some(head) = c.head {
        return save_reward_model(dir, c.policy, head, c.text, merged);
    }
    if merged {
        save::save_merged(c.policy, dir, None)?;
    } else {
        save::save_full(c.policy, dir, None)?;
    }
    save::save_text_side(dir, c.text)
}

/// Restore LoRA adapter weights from a saved adapter directory.
pub fn load_adapter(dir: &Path, model: &CausalLM) -> Result<()> {
    save::load_lora_adapter(model, dir)
}

fn save_state(dir: &Path, state: &TrainerState) -> Result<()> {
    std::fs::write(dir.join("trainer_state.json"), serde_json::to_string_pretty(state)?)
        .with_context(|| format!("writing trainer state into {}", dir.display()))
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state file", p.display()))
}

/// `checkpoint-N` directories of `output_dir`, newest (highest N) first.
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return vec![];
    };
    let mut v: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_string_lossy().strip_prefix("checkpoint-")?.parse::<usize>().ok()?, e.path())))
        .filter(|(_, p)| p.is_dir())
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v
}

/// Why `dir` cannot be resumed from, if it cannot: its trainer state must
/// parse, and its weights and optimizer files must be readable safetensors.
pub fn check_complete(dir: &Path) -> Result<TrainerState> {
    let state = load_state(dir)?;
    let weights = ["model.safetensors", "adapter_model.safetensors"].iter().map(|f| dir.join(f)).find(|p| p.is_file());
    let weights = weights.with_context(|| format!("{}: no model.safetensors or adapter_model.safetensors", dir.display()))?;
    for f in [weights, dir.join("optimizer.safetensors")] {
        dpo2d_model::weights::check_file(&f)?;
    }
    Ok(state)
}

/// The newest checkpoint in `output_dir` that is complete and readable;
/// each newer one that is not is reported through `say` with the reason.
pub fn latest_checkpoint_with(output_dir: &Path, say: &dyn Fn(&str)) -> Option<PathBuf> {
    for (_, dir) in checkpoints(output_dir) {
        match check_complete(&dir) {
            Ok(_) => return Some(dir),
            Err(e) => say(&format!("skipping {}: {e:#}", dir.display())),
        }
    }
    None
}

/// [`latest_checkpoint_with`], silently.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(latest_checkpoint_with(output_dir, &|_| {}))
}

/// Resolve `--resume [PATH]`: a checkpoint directory, or the newest
/// complete one in `output_dir` (saying which newer ones it skipped).
pub fn resolve_resume(arg: &str, output_dir: &Path) -> Result<PathBuf> {
    if arg.is_empty() || arg == "latest" {
        return latest_checkpoint_with(output_dir, &|s| eprintln!("warning: {s}"))
            .with_context(|| format!("--resume: no complete checkpoint-* directory in {}", output_dir.display()));
    }
    let p = PathBuf::from(arg);
    if !p.join("trainer_state.json").is_file() {
        bail!("--resume {}: not a checkpoint directory (no trainer_state.json)", p.display());
    }
    Ok(p)
}

/// Remove the oldest checkpoints beyond `limit` (0 = keep all).
pub fn rotate(output_dir: &Path, limit: usize) -> Result<()> {
    if limit == 0 {
        return Ok(());
    }
    for (_, p) in checkpoints(output_dir).into_iter().skip(limit) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_latest() -> Result<()> {
        let d = tempfile::tempdir()?;
        for step in [5usize, 10] {
            dpo2d_fs::write_dir(&d.path().join(format!("checkpoint-{step}")), |tmp| {
                save_state(
                    tmp,
                    &TrainerState {
                        global_step: step,
                        micro_step: step,
                        max_steps: 10,
                        epoch: 0.0,
                        seed: 1,
                        data_order: vec![],
                        dropout_rng: None,
                        log_history: vec![],
                        window: Accumulator::default(),
                        window_tokens: 0,
                        config_hash: String::new(),
                        config: None,
                        data_fingerprint: None,
                        nonfinite_updates: 0,
                    },
                )?;
                // Stand-ins for the weights and the optimizer state (any readable safetensors).
                let t = std::collections::HashMap::from([(
                    "x".to_string(),
                    candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)?,
                )]);
                candle_core::safetensors::save(&t, tmp.join("model.safetensors"))?;
                Ok(candle_core::safetensors::save(&t, tmp.join("optimizer.safetensors"))?)
            })?;
        }
        // A failed write leaves only its temp dir, never a half checkpoint.
        let r = dpo2d_fs::write_dir(&d.path().join("checkpoint-15"), |_| bail!("disk full"));
        assert!(r.is_err());
        assert!(!d.path().join("checkpoint-15").exists());
        let latest = latest_checkpoint(d.path())?.unwrap();
        assert!(latest.ends_with("checkpoint-10"));
        assert_eq!(load_state(&latest)?.global_step, 10);
        rotate(d.path(), 1)?;
        assert!(!d.path().join("checkpoint-5").exists());
        Ok(())
    }

    #[test]
    fn trainer_state_floats_round_trip_bit_for_bit() {
        // Resumed metrics are exact only if every saved float reads back
        // to the same bits (serde_json's `float_roundtrip`).
        let mut rng = crate::sampler::SplitMix(1);
        let mut window = Accumulator::default();
        let mut values = vec![];
        for i in 0..20_000 {
            let v = f64::from_bits(rng.next_u64() >> 2) * if i % 2 == 0 { 1.0 } else { -1.0 };
            let v = if v.is_finite() { v } else { 0.5 };
            values.push(v);
            window.add(&format!("k{i}"), v);
        }
        let text = serde_json::to_string(&window).unwrap();
        let back: Accumulator = serde_json::from_str(&text).unwrap();
        let means = back.clone().take_means("");
        for (i, v) in values.iter().enumerate() {
            assert_eq!(means[&format!("k{i}")].to_bits(), v.to_bits(), "value {v:e}");
        }
    }
}
