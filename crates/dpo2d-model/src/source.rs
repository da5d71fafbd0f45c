//! One entry point for "a model": a Hugging Face directory (config.json,
//! safetensors, tokenizer.json, tokenizer_config.json) or a single `.gguf`
//! file. Also converts a GGUF file into an HF directory that transformers
//! loads as-is.

use crate::chat::{ChatTemplate, Message, CHATML_TEMPLATE};
use crate::config::{Architecture, ModelConfig};
use crate::gguf::GgufFile;
use crate::llama::{CausalLM, LoadOptions};
use crate::tokenizer::ModelTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model with everything needed to talk to it.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub model: CausalLM,
    pub tokenizer: ModelTokenizer,
    pub chat: ChatTemplate,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// Tokenizer and chat template of a model (no weights).
pub struct TextSide {
    pub config: ModelConfig,
    pub tokenizer: ModelTokenizer,
    pub chat: ChatTemplate,
}

impl TextSide {
    /// Token ids that end generation: the config's EOS ids, the tokenizer's
    /// EOS and the chat template's end-of-turn token (if it is one token).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_token_ids.clone();
        if let Some(e) = self.tokenizer.eos_token_id() {
            ids.push(e);
        }
        if let Ok(suffix) = self.chat.assistant_suffix() {
            if let Ok(t) = self.tokenizer.encode(suffix.trim_end(), false) {
                if t.len() == 1 {
                    ids.push(t[0]);
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Prompt token ids for a conversation, ending where the answer begins.
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.chat.render(messages, true)?;
        self.tokenizer.encode(&text, false)
    }
}

impl LoadedModel {
    pub fn text(&self) -> TextSide {
        TextSide { config: self.config.clone(), tokenizer: self.tokenizer.clone(), chat: self.chat.clone() }
    }
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().map(|e| e.eq_ignore_ascii_case("gguf")).unwrap_or(false)
}

fn check_exists(path: &Path) -> Result<()> {
    if !path.exists() {
        bail!("model {} does not exist (expected a Hugging Face model directory or a .gguf file)", path.display());
    }
    if path.is_file() && !is_gguf(path) {
        bail!("model {} is a file but not a .gguf file (give a Hugging Face model directory or a .gguf file)", path.display());
    }
    Ok(())
}

fn template_or_default(t: Option<ChatTemplate>, tok: &ModelTokenizer, from: &Path) -> Result<ChatTemplate> {
    match t {
        Some(t) => Ok(t),
        None => {
            tracing::warn!("{} has no chat template: using ChatML", from.display());
            ChatTemplate::new(CHATML_TEMPLATE, tok.special.bos.as_deref(), tok.special.eos.as_deref())
        }
    }
}

/// Config, tokenizer and chat template of a model directory or GGUF file.
pub fn load_text_side(path: &Path) -> Result<TextSide> {
    check_exists(path)?;
    if is_gguf(path) {
        let g = GgufFile::open(path)?;
        let config = g.config()?;
        let tokenizer = ModelTokenizer::from_gguf(&g)?;
        let chat = match g.chat_template() {
            Some(src) => Some(
                ChatTemplate::new(&src, tokenizer.special.bos.as_deref(), tokenizer.special.eos.as_deref())
                    .with_context(|| format!("{}: `tokenizer.chat_template`", path.display()))?,
            ),
            None => None,
        };
        let chat = template_or_default(chat, &tokenizer, path)?;
        return Ok(TextSide { config, tokenizer, chat });
    }
    let config = ModelConfig::from_file(&path.join("config.json"))?;
    let tokenizer = ModelTokenizer::from_dir(path)?;
    let chat = ChatTemplate::from_dir(path, tokenizer.special.bos.as_deref(), tokenizer.special.eos.as_deref())?;
    let chat = template_or_default(chat, &tokenizer, path)?;
    Ok(TextSide { config, tokenizer, chat })
}

/// Load a model from a Hugging Face directory, a `.gguf` file, or a PEFT
/// LoRA adapter directory (a LoRA checkpoint of `dpo2d train`), which loads
/// its base model (`base_model_name_or_path`) with the adapter applied.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if let Some(base) = adapter_base(path)? {
        let text = load_text_side(&base).with_context(|| format!("the base model of the adapter {}", path.display()))?;
        let model = crate::save::load_with_adapter(&base, path, opts)?;
        return Ok(LoadedModel { config: text.config, model, tokenizer: text.tokenizer, chat: text.chat, source: path.to_path_buf() });
    }
    let text = load_text_side(path)?;
    let model = if is_gguf(path) {
        let g = GgufFile::open(path)?;
        let tensors = g.hf_tensors(&text.config, &Device::Cpu)?;
        CausalLM::from_tensors(text.config.clone(), tensors, opts)
            .with_context(|| format!("cannot build the model from {}", path.display()))?
    } else {
        CausalLM::load(path, opts)?
    };
    let vocab = text.tokenizer.vocab_size();
    if vocab > text.config.vocab_size {
        bail!("{}: the tokenizer has {vocab} tokens but the model's vocab_size is {}", path.display(), text.config.vocab_size);
    }
    Ok(LoadedModel { config: text.config, model, tokenizer: text.tokenizer, chat: text.chat, source: path.to_path_buf() })
}

/// The base model directory of a PEFT adapter directory (`None` for anything else).
fn adapter_base(path: &Path) -> Result<Option<PathBuf>> {
    if !path.is_dir() || !path.join("adapter_config.json").is_file() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let (_, base) = crate::save::read_adapter_config(path)?;
    let base = base.with_context(|| format!("{}: adapter_config.json names no `base_model_name_or_path`", path.display()))?;
    let base = PathBuf::from(base);
    if !base.join("config.json").is_file() {
        bail!(
            "{}: the adapter's base model {} is not a Hugging Face model directory here (load the merged model, e.g. final/merged, instead)",
            path.display(),
            base.display()
        );
    }
    Ok(Some(base))
}

/// Convert a GGUF file into a Hugging Face directory: config.json,
/// model.safetensors (f32), tokenizer.json, tokenizer_config.json (with the
/// chat template) and generation_config.json. Writes into a temporary
/// sibling and renames ([`dpo2d_fs::write_dir`]), so `out` is either
/// complete or absent.
pub fn convert_gguf(gguf: &Path, out: &Path) -> Result<()> {
    let g = GgufFile::open(gguf)?;
    let cfg = g.config()?;
    let tokenizer = ModelTokenizer::from_gguf(&g)?;
    let template = g.chat_template();
    if let Some(t) = &template {
        ChatTemplate::new(t, None, None).with_context(|| format!("{}: `tokenizer.chat_template`", gguf.display()))?;
    }
    let tensors: HashMap<String, Tensor> = g.hf_tensors(&cfg, &Device::Cpu)?;
    check_tensor_shapes(&cfg, &tensors).with_context(|| format!("{}", gguf.display()))?;
    if out.exists() {
        bail!("output {} already exists; remove it or choose another directory", out.display());
    }
    let write = |tmp: &Path| -> Result<()> {
        std::fs::write(tmp.join("config.json"), cfg.to_hf_json_string())?;
        let f32s: HashMap<String, Tensor> = tensors.iter().map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
        let st = tmp.join("model.safetensors");
        candle_core::safetensors::save(&f32s, &st)?;
        // The writer creates the file private (0600); make it as readable as the rest.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o644))?;
        }
        let class = match cfg.architecture {
            Architecture::Qwen2 => "Qwen2Tokenizer",
            Architecture::Llama => "GPT2Tokenizer",
        };
        tokenizer.save_dir(tmp, template.as_deref(), class)?;
        let mut gen = serde_json::Map::new();
        if let Some(b) = cfg.bos_token_id {
            gen.insert("bos_token_id".into(), json!(b));
        }
        match cfg.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                gen.insert("eos_token_id".into(), json!(one));
            }
            many => {
                gen.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = cfg.extra.get("pad_token_id") {
            gen.insert("pad_token_id".into(), p.clone());
        }
        std::fs::write(tmp.join("generation_config.json"), serde_json::to_string_pretty(&gen)?)?;
        Ok(())
    };
    dpo2d_fs::write_dir(out, write).with_context(|| format!("cannot write the converted model to {}", out.display()))
}

/// Every tensor a Llama/Qwen2 model of `cfg` needs, with its shape.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".to_string(), vec![h])];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out
}

fn check_tensor_shapes(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    for (name, shape) in expected_shapes(cfg) {
        match tensors.get(&name) {
            None => bail!("tensor `{name}` is missing"),
            Some(t) if t.dims() != shape.as_slice() => {
                bail!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), shape)
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::tests::{tiny_tensors, write_tiny_gguf};
    use candle_core::quantized::gguf_file::Value as GV;

    /// Metadata of a tiny byte-level tokenizer covering all 256 bytes plus
    /// ChatML tokens (vocab 259), with the SmolLM chat template.
    pub(crate) fn byte_tokenizer_md() -> Vec<(String, GV)> {
        // GPT-2's byte-to-unicode table.
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
        pairs.sort();
        let mut tokens: Vec<GV> =
            vec![GV::String("<|endoftext|>".into()), GV::String("<|im_start|>".into()), GV::String("<|im_end|>".into())];
        for (_, c) in pairs {
            tokens.push(GV::String(char::from_u32(c).unwrap().to_string()));
        }
        let types: Vec<GV> = (0..tokens.len()).map(|i| GV::I32(if i < 3 { 3 } else { 1 })).collect();
        vec![
            ("tokenizer.ggml.model".into(), GV::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), GV::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), GV::Array(tokens)),
            ("tokenizer.ggml.token_type".into(), GV::Array(types)),
            ("tokenizer.ggml.merges".into(), GV::Array(vec![])),
            ("tokenizer.ggml.bos_token_id".into(), GV::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), GV::U32(2)),
            ("tokenizer.ggml.padding_token_id".into(), GV::U32(2)),
            (
                "tokenizer.chat_template".into(),
                GV::String(
                    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}".into(),
                ),
            ),
        ]
    }

    /// A tiny but complete GGUF model (vocab 259, byte tokenizer).
    pub(crate) fn write_tiny_model_gguf(path: &Path) {
        write_tiny_gguf(path, "llama", &tiny_tensors(16, 32, 259, 4, 2), 4, 2, byte_tokenizer_md());
    }

    #[test]
    fn gguf_and_converted_dir_agree() {
        let dir = tempfile::tempdir().unwrap();
        let gg = dir.path().join("tiny.gguf");
        write_tiny_model_gguf(&gg);
        let a = load(&gg, &LoadOptions::default()).unwrap();
        let out = dir.path().join("conv");
        convert_gguf(&gg, &out).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let b = load(&out, &LoadOptions::default()).unwrap();
        assert_eq!(a.config.to_hf_json(), b.config.to_hf_json());
        let msgs = [Message::user("héllo 12")];
        let ids = a.text().prompt_ids(&msgs).unwrap();
        assert_eq!(ids, b.text().prompt_ids(&msgs).unwrap());
        assert_eq!(ids[0], 1);
        assert_eq!(a.text().stop_token_ids(), vec![2]);
        let x = Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap();
        let layout = crate::llama::AttentionLayout::causal(1, ids.len());
        let la = a.model.token_logprobs(&x, &layout).unwrap();
        let lb = b.model.token_logprobs(&x, &layout).unwrap();
        let d = (la - lb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
        // Converting onto an existing directory is refused.
        let e = format!("{:#}", convert_gguf(&gg, &out).unwrap_err());
        assert!(e.contains("already exists"), "{e}");
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", load(&dir.path().join("missing"), &LoadOptions::default()).err().unwrap());
        assert!(e.contains("missing") && e.contains("does not exist"), "{e}");
        let f = dir.path().join("weights.bin");
        std::fs::write(&f, b"x").unwrap();
        let e = format!("{:#}", load(&f, &LoadOptions::default()).err().unwrap());
        assert!(e.contains("weights.bin") && e.contains(".gguf"), "{e}");
    }
}
