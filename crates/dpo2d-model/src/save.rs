//! Saving models in Hugging Face layouts: full weights (`model.safetensors`
//! and `config.json`), PEFT LoRA adapters (`adapter_model.safetensors` and
//! `adapter_config.json`), and LoRA merged into full weights. This is the one
//! saving path: training checkpoints and final models go through it too.
//! Every file is written with [`dpo2d_fs::write_file`] (temporary name,
//! flushed, renamed), so a crash never leaves a half-written file under the
//! real name.

use crate::config::ModelConfig;
use crate::llama::{CausalLM, LoadOptions};
use crate::lora::{LoraConfig, LoraTarget};
use crate::source::TextSide;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// PEFT's key prefix for a causal LM adapter.
pub const PEFT_PREFIX: &str = "base_model.model.";

fn dtype_tag(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::U8 => "U8",
        d => bail!("cannot save tensors of dtype {d:?}"),
    })
}

fn torch_dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Writes a tensor's elements in safetensors' layout (little-endian): one
/// copy to the host, written as it is on a little-endian machine. (Built
/// element by element, the bytes of a 7B model took longer than the disk.)
fn write_tensor(out: &mut impl std::io::Write, t: &Tensor) -> Result<()> {
    fn write<T: candle_core::WithDType + bytemuck::Pod>(out: &mut impl std::io::Write, t: &Tensor) -> Result<()> {
        let v = t.flatten_all()?.to_vec1::<T>()?;
        let bytes: &[u8] = bytemuck::cast_slice(&v);
        if cfg!(target_endian = "little") {
            out.write_all(bytes)?;
        } else {
            for c in bytes.chunks_exact(std::mem::size_of::<T>()) {
                out.write_all(&c.iter().rev().copied().collect::<Vec<u8>>())?;
            }
        }
        Ok(())
    }
    crate::weights::with_stored_type!(t.dtype(), T => write::<T>(out, t), other => bail!("cannot save tensors of dtype {:?}", t.dtype()))
}

/// Serialise tensors as safetensors (with `{"format": "pt"}` metadata, which
/// transformers expects), sorted by name, and write atomically. Tensors are
/// written one at a time, so saving needs memory for the largest tensor's
/// bytes only, not a copy of the whole file.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    use std::io::Write;
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut end = 0usize;
    for (name, t) in &sorted {
        let start = end;
        end += t.elem_count() * t.dtype().size_in_bytes();
        header.insert(name.clone(), json!({"dtype": dtype_tag(t.dtype())?, "shape": t.dims(), "data_offsets": [start, end]}));
    }
    let mut h = serde_json::to_vec(&Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    dpo2d_fs::write_file_with(path, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(h.len() as u64).to_le_bytes())?;
        out.write_all(&h)?;
        for (name, t) in &sorted {
            write_tensor(&mut out, t).with_context(|| format!("writing tensor `{name}` to {}", tmp.display()))?;
        }
        out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(())
    })
}

fn convert(tensors: Vec<(String, Tensor)>, dtype: Option<DType>) -> Result<Vec<(String, Tensor)>> {
    tensors
        .into_iter()
        .map(|(n, t)| {
            let t = match dtype {
                Some(d) => t.to_dtype(d)?,
                None => t,
            };
            Ok((n, t))
        })
        .collect()
}

fn write_config(model: &CausalLM, dir: &Path, dtype: DType) -> Result<()> {
    let mut cfg: ModelConfig = model.config().clone();
    cfg.torch_dtype = Some(torch_dtype_name(dtype).to_string());
    dpo2d_fs::write_file(&dir.join("config.json"), cfg.to_hf_json_string())
}

/// Save the full model (`model.safetensors` + `config.json`). LoRA adapters,
/// if any, are NOT merged (see [`save_merged`]). Tied embeddings are stored once.
/// `dtype`: convert on the way out (e.g. bf16), or keep the model's dtype.
pub fn save_full(model: &CausalLM, dir: &Path, dtype: Option<DType>) -> Result<()> {
    let t = convert(model.hf_tensors()?, dtype)?;
    save_safetensors(&t, &dir.join("model.safetensors"))?;
    write_config(model, dir, dtype.unwrap_or(model.dtype()))
}

/// Save the model with every LoRA adapter merged into its base weight.
pub fn save_merged(model: &CausalLM, dir: &Path, dtype: Option<DType>) -> Result<()> {
    let t = convert(model.merged_hf_tensors()?, dtype)?;
    save_safetensors(&t, &dir.join("model.safetensors"))?;
    write_config(model, dir, dtype.unwrap_or(model.dtype()))
}

/// Save the LoRA adapter in PEFT's layout. `base_model` goes into
/// `base_model_name_or_path` (a hub id or a path).
pub fn save_lora_adapter(model: &CausalLM, dir: &Path, base_model: &str) -> Result<()> {
    let lcfg = model.lora_config().context("the model has no LoRA adapters to save")?;
    let tensors: Vec<(String, Tensor)> = model.lora_tensors().into_iter().map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t)).collect();
    save_safetensors(&tensors, &dir.join("adapter_model.safetensors"))?;
    let targets: Vec<&str> = lcfg.targets.iter().map(|t| t.hf_name()).collect();
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lcfg.r,
        "lora_alpha": lcfg.alpha,
        "lora_dropout": lcfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    dpo2d_fs::write_file(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?)
}

/// Read a PEFT `adapter_config.json` into a [`LoraConfig`] (plus the base model name).
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>)> {
    let p = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
    let f = p.display();
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            bail!("{f}: peft_type `{t}` is not supported (only LORA)");
        }
    }
    let r = v.get("r").and_then(|x| x.as_u64()).with_context(|| format!("{f}: missing required field `r`"))? as usize;
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0);
    let dropout = v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0);
    if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) || v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true) {
        bail!("{f}: DoRA / rsLoRA adapters are not supported");
    }
    let targets = match v.get("target_modules") {
        Some(Value::Array(a)) => {
            let names: Vec<String> = a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect();
            LoraTarget::parse_list(&names.join(",")).with_context(|| format!("{f}: bad target_modules"))?
        }
        Some(Value::String(s)) => LoraTarget::parse_list(s).with_context(|| format!("{f}: bad target_modules"))?,
        _ => bail!("{f}: missing required field `target_modules`"),
    };
    let base = v.get("base_model_name_or_path").and_then(|x| x.as_str()).map(str::to_string);
    Ok((LoraConfig { r, alpha, dropout, targets, seed: 0 }, base))
}

/// Load a base model directory plus a PEFT LoRA adapter directory.
/// `opts.lora` is replaced by the adapter's configuration.
pub fn load_with_adapter(base_dir: &Path, adapter_dir: &Path, opts: &LoadOptions) -> Result<CausalLM> {
    let (lcfg, _) = read_adapter_config(adapter_dir)?;
    let mut o = opts.clone();
    o.trainable = false;
    o.lora = Some(lcfg);
    let model = CausalLM::load(base_dir, &o)?;
    load_lora_adapter(&model, adapter_dir)?;
    Ok(model)
}

/// Set the LoRA weights of `model` (which already has adapters of the same
/// configuration) from a PEFT adapter directory, e.g. a LoRA checkpoint.
pub fn load_lora_adapter(model: &CausalLM, adapter_dir: &Path) -> Result<()> {
    let file = adapter_dir.join("adapter_model.safetensors");
    let w = crate::weights::WeightSet::load_file(&file, model.device())?;
    let map: HashMap<String, Tensor> =
        w.into_map().into_iter().map(|(k, t)| (k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_string(), t)).collect();
    model.set_lora_tensors(&map, &file.display().to_string())
}

/// Write the tokenizer and chat template next to saved weights, so the
/// directory loads on its own (in dpo2d and in transformers).
pub fn save_text_side(dir: &Path, text: &TextSide) -> Result<()> {
    text.tokenizer
        .save_dir(dir, Some(text.chat.source()), "PreTrainedTokenizerFast")
        .with_context(|| format!("writing the tokenizer into {}", dir.display()))
}

/// Copy tokenizer and generation files next to saved weights, so the output
/// directory loads on its own.
pub fn copy_tokenizer_files(src_dir: &Path, dst_dir: &Path) -> Result<()> {
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"] {
        let s = src_dir.join(name);
        if s.is_file() {
            let bytes = std::fs::read(&s).with_context(|| format!("cannot read {}", s.display()))?;
            dpo2d_fs::write_file(&dst_dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::{opts64, write_tiny};
    use crate::llama::AttentionLayout;
    use crate::test_support::{det, max_abs_diff as maxdiff};
    use candle_core::Device;

    #[test]
    fn full_save_load_roundtrip_and_tied_once() {
        let src = tempfile::tempdir().unwrap();
        write_tiny(src.path(), true, true, DType::F32);
        let m = CausalLM::load(src.path(), &LoadOptions { trainable: true, ..opts64() }).unwrap();
        // Change a weight so the roundtrip is not trivially the source file.
        let (_, v) = &m.trainable_vars()[3];
        v.set(&det(v.dims(), 77, DType::F64)).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_full(&m, out.path(), None).unwrap();
        let st = candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(!st.contains_key("lm_head.weight"));
        assert_eq!(st.len(), m.hf_tensors().unwrap().len());
        let back = CausalLM::load(out.path(), &opts64()).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 9, 11]], &Device::Cpu).unwrap();
        let lay = AttentionLayout::causal(1, 4);
        assert_eq!(maxdiff(&m.forward(&ids, &lay).unwrap(), &back.forward(&ids, &lay).unwrap()), 0.0);
        assert_eq!(back.config().architecture, m.config().architecture);
        // bf16 export loads too.
        let out2 = tempfile::tempdir().unwrap();
        save_full(&m, out2.path(), Some(DType::BF16)).unwrap();
        let cfg = ModelConfig::from_file(&out2.path().join("config.json")).unwrap();
        assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
        let b16 = CausalLM::load(out2.path(), &LoadOptions { dtype: DType::BF16, ..LoadOptions::default() }).unwrap();
        let d = maxdiff(&m.forward(&ids, &lay).unwrap(), &b16.forward(&ids, &lay).unwrap());
        assert!(d < 0.2, "bf16 forward differs by {d}");
        // No temp files left behind.
        let names: Vec<String> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }

    #[test]
    fn lora_adapter_peft_layout_roundtrip_and_merge() {
        let src = tempfile::tempdir().unwrap();
        write_tiny(src.path(), false, false, DType::F32);
        let lcfg = LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec![LoraTarget::Q, LoraTarget::Down], seed: 3 };
        let m = CausalLM::load(src.path(), &LoadOptions { lora: Some(lcfg), ..opts64() }).unwrap();
        for (i, (n, v)) in m.trainable_vars().iter().enumerate() {
            if n.contains("lora_B") {
                v.set(&(det(v.dims(), 900 + i as u64, DType::F64) * 0.5).unwrap()).unwrap();
            }
        }
        let ad = tempfile::tempdir().unwrap();
        save_lora_adapter(&m, ad.path(), "tiny-base").unwrap();
        let st = candle_core::safetensors::load(ad.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert!(st.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
        assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
        assert_eq!(st.len(), 2 * 2 * 2);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(ad.path().join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["target_modules"], json!(["q_proj", "down_proj"]));
        assert_eq!(cfg["r"], 2);
        let back = load_with_adapter(src.path(), ad.path(), &opts64()).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 9, 11, 5]], &Device::Cpu).unwrap();
        let lay = AttentionLayout::causal(1, 5);
        let h = m.forward(&ids, &lay).unwrap();
        assert!(maxdiff(&h, &back.forward(&ids, &lay).unwrap()) < 1e-12);
        let mg = tempfile::tempdir().unwrap();
        save_merged(&m, mg.path(), None).unwrap();
        let merged = CausalLM::load(mg.path(), &opts64()).unwrap();
        assert!(maxdiff(&h, &merged.forward(&ids, &lay).unwrap()) < 1e-10);
        let base = CausalLM::load(src.path(), &opts64()).unwrap();
        assert!(maxdiff(&h, &base.forward(&ids, &lay).unwrap()) > 1e-4);
        // Errors.
        let e = format!("{:#}", save_lora_adapter(&base, ad.path(), "x").unwrap_err());
        assert!(e.contains("no LoRA"), "{e}");
        std::fs::write(ad.path().join("adapter_config.json"), r#"{"peft_type":"LORA","r":2}"#).unwrap();
        let e = format!("{:#}", read_adapter_config(ad.path()).unwrap_err());
        assert!(e.contains("adapter_config.json") && e.contains("target_modules"), "{e}");
    }
}
