//! Tiny random models for tests (this crate's, the trainer's, end-to-end):
//! one writer, so every test model is built the same way. Enabled in this
//! crate's tests and, for other crates' tests, by the `test-support` feature.

use crate::config::ModelConfig;
use crate::llama::{CausalLM, LoadOptions};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The kernels' test tensors and assertions, for the model's tests too.
pub use dpo2d_kernels::test_support::{assert_close, det, grad_check, max_abs_diff};

/// The shape of a tiny Llama (or Qwen2, with q/k/v biases) model.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub qwen: bool,
    pub tied: bool,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Dtype of the stored weights.
    pub dtype: DType,
    /// First seed of the per-tensor [`det`] streams.
    pub seed: u64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// `max_position_embeddings`.
    pub context: usize,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            qwen: false,
            tied: true,
            vocab: 50,
            hidden: 16,
            intermediate: 24,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            dtype: DType::F32,
            seed: 100,
            bos_token_id: 1,
            eos_token_id: 2,
            context: 256,
        }
    }
}

impl TinyModel {
    /// `config.json` text.
    pub fn config_json(&self) -> String {
        let arch = if self.qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
        serde_json::json!({
            "architectures": [arch], "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": self.tied, "max_position_embeddings": self.context,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id
        })
        .to_string()
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig::from_json_str(&self.config_json(), "config.json").expect("valid tiny config")
    }

    /// Random weights in Hugging Face naming: embeddings in [-1, 1),
    /// attention weights x0.5, MLP x0.4, norms 1 +- 0.2.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let (h, im, hd) = (self.hidden, self.intermediate, self.hidden / self.heads);
        let mut m = HashMap::new();
        let mut seed = self.seed;
        let mut put = |name: String, shape: &[usize], scale: f64, offset: f64| {
            seed += 1;
            let t = ((det(shape, seed, DType::F64) * scale).and_then(|t| t + offset)).and_then(|t| t.to_dtype(self.dtype));
            m.insert(name, t.expect("tiny tensor"));
        };
        put("model.embed_tokens.weight".into(), &[self.vocab, h], 1.0, 0.0);
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            let kv = self.kv_heads * hd;
            for (n, o, inp) in [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h)] {
                put(format!("{p}.self_attn.{n}.weight"), &[o, inp], 0.5, 0.0);
                if self.qwen && n != "o_proj" {
                    put(format!("{p}.self_attn.{n}.bias"), &[o], 0.1, 0.0);
                }
            }
            for (n, o, inp) in [("gate_proj", im, h), ("up_proj", im, h), ("down_proj", h, im)] {
                put(format!("{p}.mlp.{n}.weight"), &[o, inp], 0.4, 0.0);
            }
            put(format!("{p}.input_layernorm.weight"), &[h], 0.2, 1.0);
            put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.2, 1.0);
        }
        put("model.norm.weight".into(), &[h], 0.2, 1.0);
        if !self.tied {
            put("lm_head.weight".into(), &[self.vocab, h], 1.0, 0.0);
        }
        m
    }

    /// Write `config.json` and `model.safetensors` into `dir` (created).
    pub fn write(&self, dir: &Path) -> ModelConfig {
        std::fs::create_dir_all(dir).expect("create the tiny model directory");
        std::fs::write(dir.join("config.json"), self.config_json()).expect("write config.json");
        let tensors: Vec<(String, Tensor)> = self.tensors().into_iter().collect();
        crate::save::save_safetensors(&tensors, &dir.join("model.safetensors")).expect("write model.safetensors");
        self.config()
    }

    /// The model in memory.
    pub fn build(&self, opts: &LoadOptions) -> CausalLM {
        CausalLM::from_tensors(self.config(), self.tensors(), opts).expect("tiny model loads")
    }

    /// A tiny random model whose tokenizer is byte-level BPE (GPT-2's byte
    /// alphabet, no merges) with ChatML specials: it can write any text, so
    /// a grammar can always be followed (structured-output tests).
    pub fn byte_level() -> TinyModel {
        TinyModel { vocab: BYTE_VOCAB, bos_token_id: 256, eos_token_id: 257, context: 2048, ..TinyModel::default() }
    }

    /// [`TinyModel::write`] plus the byte-level tokenizer files of [`TinyModel::byte_level`].
    pub fn write_byte_level(&self, dir: &Path) -> ModelConfig {
        let cfg = self.write(dir);
        let chars = byte_chars();
        let mut vocab = serde_json::Map::new();
        for (b, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), b.into());
        }
        vocab.insert("<|im_start|>".into(), 256.into());
        vocab.insert("<|im_end|>".into(), 257.into());
        let special = |id: u32, c: &str| serde_json::json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
        let tok = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write tokenizer.json");
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let config = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": chatml, "tokenizer_class": "GPT2TokenizerFast"});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write tokenizer_config.json");
        cfg
    }
}

/// Byte tokens, two specials, and spare ids.
const BYTE_VOCAB: usize = 264;

/// GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies spell bytes with).
fn byte_chars() -> Vec<char> {
    let mut chars = vec![' '; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        chars[b as usize] = if printable {
            char::from_u32(b).expect("a byte is a char")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("a char past the bytes")
        };
    }
    chars
}
