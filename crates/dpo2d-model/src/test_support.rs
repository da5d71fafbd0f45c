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
            "rms_norm_eps": 1e-5, "tie_word_embeddings": self.tied, "max_position_embeddings": 256,
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
}
