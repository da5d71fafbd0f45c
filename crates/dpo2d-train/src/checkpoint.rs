//! Checkpoints: model weights in Hugging Face form (full safetensors
//! directory, or a PEFT LoRA adapter), optimizer state and trainer state,
//! written into a temporary directory and renamed into place, so a
//! checkpoint directory is either complete or absent.

use crate::metrics::{Accumulator, Record};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use dpo2d_model::llama::CausalLM;
use dpo2d_model::source::TextSide;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// PEFT stores adapter tensors under this prefix.
pub const PEFT_PREFIX: &str = "base_model.model.";

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
    /// State of the LoRA dropout-mask stream (absent in older checkpoints).
    #[serde(default)]
    pub dropout_rng: Option<u64>,
}

/// Write `model.safetensors` + `config.json` + tokenizer files (full
/// fine-tuning) or `adapter_model.safetensors` + `adapter_config.json`
/// (LoRA) into `dir`.
pub fn save_weights(dir: &Path, model: &CausalLM, text: &TextSide, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match model.lora_config() {
        None => {
            let map: HashMap<String, Tensor> = model.hf_tensors()?.into_iter().collect();
            let p = dir.join("model.safetensors");
            candle_core::safetensors::save(&map, &p).with_context(|| format!("writing {}", p.display()))?;
            write_text_side(dir, model, text)?;
        }
        Some(lc) => {
            let map: HashMap<String, Tensor> = model.lora_tensors().into_iter().map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t)).collect();
            let p = dir.join("adapter_model.safetensors");
            candle_core::safetensors::save(&map, &p).with_context(|| format!("writing {}", p.display()))?;
            let cfg = serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "r": lc.r,
                "lora_alpha": lc.alpha,
                "lora_dropout": lc.dropout,
                "target_modules": lc.targets.iter().map(|t| t.hf_name()).collect::<Vec<_>>(),
                "bias": "none",
                "fan_in_fan_out": false,
                "inference_mode": true,
            });
            std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?)?;
        }
    }
    Ok(())
}

/// LoRA weights merged into the base: a plain HF model directory.
pub fn save_merged(dir: &Path, model: &CausalLM, text: &TextSide) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let map: HashMap<String, Tensor> = model.merged_hf_tensors()?.into_iter().collect();
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(&map, &p).with_context(|| format!("writing {}", p.display()))?;
    write_text_side(dir, model, text)
}

fn write_text_side(dir: &Path, model: &CausalLM, text: &TextSide) -> Result<()> {
    std::fs::write(dir.join("config.json"), model.config().to_hf_json_string())?;
    text.tokenizer
        .save_dir(dir, Some(text.chat.source()), "PreTrainedTokenizerFast")
        .with_context(|| format!("writing the tokenizer into {}", dir.display()))?;
    Ok(())
}

/// Restore LoRA adapter weights from a saved adapter directory.
pub fn load_adapter(dir: &Path, model: &CausalLM) -> Result<()> {
    let p = dir.join("adapter_model.safetensors");
    let map = candle_core::safetensors::load(&p, model.device()).with_context(|| format!("reading {}", p.display()))?;
    let map: HashMap<String, Tensor> = map.into_iter().map(|(k, v)| (k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_string(), v)).collect();
    model.set_lora_tensors(&map, &p.display().to_string())
}

/// Write a checkpoint atomically: everything goes into `<dir>.tmp`, which is
/// then renamed to `dir` (an older `dir` is replaced).
pub fn write_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().context("checkpoint path has no name")?.to_string_lossy().to_string();
    let tmp = dir.with_file_name(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fill(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    Ok(())
}

pub fn save_state(dir: &Path, state: &TrainerState) -> Result<()> {
    std::fs::write(dir.join("trainer_state.json"), serde_json::to_string_pretty(state)?)
        .with_context(|| format!("writing trainer state into {}", dir.display()))
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state file", p.display()))
}

/// The complete checkpoint with the highest step in `output_dir`.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return Ok(None);
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) else {
            continue;
        };
        if !e.path().join("trainer_state.json").is_file() {
            continue;
        }
        if best.as_ref().map(|(b, _)| n > *b).unwrap_or(true) {
            best = Some((n, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Resolve `--resume [PATH]`: a checkpoint directory, or the latest in `output_dir`.
pub fn resolve_resume(arg: &str, output_dir: &Path) -> Result<PathBuf> {
    if arg.is_empty() || arg == "latest" {
        return latest_checkpoint(output_dir)?
            .with_context(|| format!("--resume: no checkpoint-* directory with a trainer_state.json in {}", output_dir.display()));
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
    let mut cps: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    cps.sort();
    while cps.len() > limit {
        let (_, p) = cps.remove(0);
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
            write_atomic(&d.path().join(format!("checkpoint-{step}")), |tmp| {
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
                    },
                )
            })?;
        }
        // A failed write leaves only its temp dir, never a half checkpoint.
        let r = write_atomic(&d.path().join("checkpoint-15"), |_| bail!("disk full"));
        assert!(r.is_err());
        assert!(!d.path().join("checkpoint-15").exists());
        let latest = latest_checkpoint(d.path())?.unwrap();
        assert!(latest.ends_with("checkpoint-10"));
        assert_eq!(load_state(&latest)?.global_step, 10);
        rotate(d.path(), 1)?;
        assert!(!d.path().join("checkpoint-5").exists());
        Ok(())
    }
}
