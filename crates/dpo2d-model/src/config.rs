//! Model configuration read from a Hugging Face `config.json`.
//!
//! Only decoder-only Llama-family architectures are supported
//! (`LlamaForCausalLM`, `Qwen2ForCausalLM`): they share one implementation in
//! [`crate::llama`], differing only in the q/k/v bias that Qwen2 carries.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Architectures accepted in `config.json`'s `architectures` list.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "Qwen2ForCausalLM"];

/// Which family a config describes; decides defaults and the `model_type` written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
    /// The family's name with a per-token head (a 2-D reward model).
    pub fn token_classification_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForTokenClassification",
            Architecture::Qwen2 => "Qwen2ForTokenClassification",
        }
    }
    /// The causal LM or its token-classification twin (whose backbone is the same model).
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "LlamaForTokenClassification" => Some(Architecture::Llama),
            "Qwen2ForCausalLM" | "Qwen2ForTokenClassification" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
}

/// Hyper-parameters of a Llama/Qwen2 causal LM.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (always true for Qwen2).
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    /// All end-of-sequence ids (`eos_token_id` may be an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` as written in the file ("bfloat16", "float32", ...), if any.
    pub torch_dtype: Option<String>,
    /// Everything else in the original file, kept so a re-written config
    /// loses nothing (rope_scaling, pad_token_id, ...).
    pub extra: Map<String, Value>,
}

fn req_usize(obj: &Map<String, Value>, key: &str, file: &str) -> Result<usize> {
    match obj.get(key) {
        None | Some(Value::Null) => bail!("{file}: missing required field `{key}`"),
        Some(v) => v.as_u64().map(|x| x as usize).with_context(|| format!("{file}: field `{key}` must be a non-negative integer, got {v}")),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str, file: &str, default: f64) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().with_context(|| format!("{file}: field `{key}` must be a number, got {v}")),
    }
}

/// The rotary base: `rope_theta`, or where transformers 5 writes it,
/// `rope_parameters.rope_theta`; 10000 when neither is there. A scaled rope
/// (`rope_type` other than `default`) is not supported and is ignored, as
/// `rope_scaling` is.
fn rope_theta(obj: &Map<String, Value>, file: &str) -> Result<f64> {
    let params = match obj.get("rope_parameters") {
        Some(Value::Object(p)) => Some(p),
        None | Some(Value::Null) => None,
        Some(v) => bail!("{file}: field `rope_parameters` must be an object, got {v}"),
    };
    if let Some(kind) = params.and_then(|p| p.get("rope_type")).and_then(Value::as_str).filter(|k| *k != "default") {
        tracing::warn!("{file}: rope_type `{kind}` is not supported and is ignored");
    }
    let nested =
        params.map(|p| opt_f64(p, "rope_theta", &format!("{file}: rope_parameters"), f64::NAN)).transpose()?.filter(|t| !t.is_nan());
    match (obj.get("rope_theta").filter(|v| !v.is_null()), nested) {
        (Some(_), Some(n)) => {
            let top = opt_f64(obj, "rope_theta", file, n)?;
            if top != n {
                bail!("{file}: rope_theta {top} and rope_parameters.rope_theta {n} differ");
            }
            Ok(top)
        }
        (None, Some(n)) => Ok(n),
        _ => opt_f64(obj, "rope_theta", file, 10000.0),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str, file: &str, default: bool) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_bool().with_context(|| format!("{file}: field `{key}` must be true or false, got {v}")),
    }
}

fn token_ids(v: Option<&Value>, key: &str, file: &str) -> Result<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32).with_context(|| format!("{file}: `{key}` entries must be integers, got {x}")))
            .collect(),
        Some(x) => Ok(vec![x.as_u64().with_context(|| format!("{file}: `{key}` must be an integer or a list, got {x}"))? as u32]),
    }
}

/// Fields we interpret (everything else goes to `extra`).
/// A reward model's head labels are written fresh by its saver, never carried over.
const KNOWN_FIELDS: &[&str] = &[
    "num_labels",
    "id2label",
    "label2id",
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
    "hidden_act",
    "mlp_bias",
];

/// The architecture a config names (`architectures`, else `model_type`).
fn architecture_of(obj: &Map<String, Value>, file: &str) -> Result<Architecture> {
    let arch_name = match obj.get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => {
            a[0].as_str().with_context(|| format!("{file}: `architectures` must hold strings"))?.to_string()
        }
        _ => match obj.get("model_type").and_then(|m| m.as_str()) {
            Some("llama") => "LlamaForCausalLM".to_string(),
            Some("qwen2") => "Qwen2ForCausalLM".to_string(),
            Some(other) => {
                bail!("{file}: unsupported model_type `{other}` (supported architectures: {})", SUPPORTED_ARCHITECTURES.join(", "))
            }
            None => bail!("{file}: missing required field `architectures`"),
        },
    };
    Architecture::from_hf_name(&arch_name)
        .with_context(|| format!("{file}: unsupported architecture `{arch_name}` (supported: {})", SUPPORTED_ARCHITECTURES.join(", ")))
}

impl ModelConfig {
    /// Read and validate `config.json` (or a directory holding it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let path = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse config text; `file` names the source in error messages.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).with_context(|| format!("{file}: not valid JSON"))?;
        let obj = v.as_object().with_context(|| format!("{file}: expected a JSON object"))?;
        let architecture = architecture_of(obj, file)?;
        let hidden_size = req_usize(obj, "hidden_size", file)?;
        let num_attention_heads = req_usize(obj, "num_attention_heads", file)?;
        if num_attention_heads == 0 {
            bail!("{file}: `num_attention_heads` must be positive");
        }
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            _ => req_usize(obj, "num_key_value_heads", file)?,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("{file}: num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})");
        }
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("{file}: hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given");
                }
                hidden_size / num_attention_heads
            }
            _ => req_usize(obj, "head_dim", file)?,
        };
        if head_dim % 2 != 0 {
            bail!("{file}: head_dim ({head_dim}) must be even for rotary embeddings");
        }
        if let Some(act) = obj.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                bail!("{file}: hidden_act `{act}` is not supported (only silu)");
            }
        }
        if opt_bool(obj, "mlp_bias", file, false)? {
            bail!("{file}: mlp_bias = true is not supported");
        }
        let default_bias = architecture == Architecture::Qwen2;
        let eos_token_ids = token_ids(obj.get("eos_token_id"), "eos_token_id", file)?;
        let bos = token_ids(obj.get("bos_token_id"), "bos_token_id", file)?;
        let extra: Map<String, Value> =
            obj.iter().filter(|(k, _)| !KNOWN_FIELDS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(rs) = obj.get("rope_scaling") {
            if !rs.is_null() {
                tracing::warn!("{file}: `rope_scaling` is not supported and is ignored");
            }
        }
        let rope_theta = rope_theta(obj, file)?;
        let cfg = ModelConfig {
            architecture,
            vocab_size: req_usize(obj, "vocab_size", file)?,
            hidden_size,
            intermediate_size: req_usize(obj, "intermediate_size", file)?,
            num_hidden_layers: req_usize(obj, "num_hidden_layers", file)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: opt_f64(obj, "rms_norm_eps", file, 1e-6)?,
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings", file, false)?,
            attention_bias: opt_bool(obj, "attention_bias", file, default_bias)? || default_bias,
            max_position_embeddings: match obj.get("max_position_embeddings") {
                None | Some(Value::Null) => 4096,
                _ => req_usize(obj, "max_position_embeddings", file)?,
            },
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            // transformers 5 names it `dtype`.
            torch_dtype: ["torch_dtype", "dtype"].iter().find_map(|k| obj.get(*k)?.as_str()).map(str::to_string),
            extra,
        };
        Ok(cfg)
    }

    /// Number of query heads sharing one key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// A `config.json` value that Hugging Face transformers loads.
    pub fn to_hf_json(&self) -> Value {
        let mut obj = self.extra.clone();
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let pairs: Vec<(&str, Value)> = vec![
            ("architectures", json!([self.architecture.hf_name()])),
            ("model_type", json!(self.architecture.model_type())),
            ("vocab_size", json!(self.vocab_size)),
            ("hidden_size", json!(self.hidden_size)),
            ("intermediate_size", json!(self.intermediate_size)),
            ("num_hidden_layers", json!(self.num_hidden_layers)),
            ("num_attention_heads", json!(self.num_attention_heads)),
            ("num_key_value_heads", json!(self.num_key_value_heads)),
            ("head_dim", json!(self.head_dim)),
            ("rope_theta", json!(self.rope_theta)),
            ("rms_norm_eps", json!(self.rms_norm_eps)),
            ("tie_word_embeddings", json!(self.tie_word_embeddings)),
            ("max_position_embeddings", json!(self.max_position_embeddings)),
            ("bos_token_id", self.bos_token_id.map(|b| json!(b)).unwrap_or(Value::Null)),
            ("eos_token_id", eos),
            ("torch_dtype", json!(self.torch_dtype.clone().unwrap_or_else(|| "float32".into()))),
            ("hidden_act", json!("silu")),
        ];
        for (k, v) in pairs {
            obj.insert(k.to_string(), v);
        }
        match self.architecture {
            Architecture::Llama => {
                obj.insert("attention_bias".into(), json!(self.attention_bias));
                obj.insert("mlp_bias".into(), json!(false));
            }
            Architecture::Qwen2 => {
                obj.entry("use_sliding_window").or_insert(json!(false));
            }
        }
        Value::Object(obj)
    }

    /// Write `config.json` text (pretty-printed) for [`Self::to_hf_json`].
    pub fn to_hf_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_hf_json()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
      "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
      "rope_theta":100000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":true,"max_position_embeddings":8192,
      "bos_token_id":1,"eos_token_id":2,"torch_dtype":"bfloat16","pad_token_id":2}"#;

    #[test]
    fn parses_smollm_like_config() {
        let c = ModelConfig::from_json_str(SMOL, "config.json").unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.n_rep(), 3);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.extra.get("pad_token_id"), Some(&json!(2)));
        // Round trip through the HF writer.
        let back = ModelConfig::from_json_str(&c.to_hf_json_string(), "x").unwrap();
        assert_eq!(back, c);
    }

    /// transformers 5 writes the rotary base into `rope_parameters`; read
    /// there it must give the same model as the old top-level key.
    #[test]
    fn rope_theta_from_transformers_5_rope_parameters() {
        let v5 = SMOL.replace(r#""rope_theta":100000.0,"#, r#""rope_parameters":{"rope_theta":100000.0,"rope_type":"default"},"#);
        assert!(!v5.contains(r#""rope_theta":100000.0,"rms"#));
        assert_eq!(ModelConfig::from_json_str(&v5, "c.json").unwrap().rope_theta, 100000.0);
        let both = SMOL.replace(r#""rope_theta":100000.0,"#, r#""rope_theta":100000.0,"rope_parameters":{"rope_theta":100000.0},"#);
        assert_eq!(ModelConfig::from_json_str(&both, "c.json").unwrap().rope_theta, 100000.0);
        let clash = SMOL.replace(r#""rope_theta":100000.0,"#, r#""rope_theta":100000.0,"rope_parameters":{"rope_theta":500000.0},"#);
        assert!(ModelConfig::from_json_str(&clash, "c.json").unwrap_err().to_string().contains("differ"));
        let renamed = v5.replace(r#""torch_dtype":"bfloat16""#, r#""dtype":"bfloat16""#);
        assert_eq!(ModelConfig::from_json_str(&renamed, "c.json").unwrap().torch_dtype.as_deref(), Some("bfloat16"));
        let neither = SMOL.replace(r#""rope_theta":100000.0,"#, "");
        assert_eq!(ModelConfig::from_json_str(&neither, "c.json").unwrap().rope_theta, 10000.0);
    }

    #[test]
    fn qwen2_has_bias_and_eos_list() {
        let t = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,
          "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"eos_token_id":[5,6]}"#;
        let c = ModelConfig::from_json_str(t, "q.json").unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
    }

    #[test]
    fn errors_name_file_and_problem() {
        let missing = SMOL.replace("\"hidden_size\":576,", "");
        let e = format!("{:#}", ModelConfig::from_json_str(&missing, "dir/config.json").unwrap_err());
        assert!(e.contains("dir/config.json") && e.contains("hidden_size"), "{e}");
        let unk = SMOL.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = format!("{:#}", ModelConfig::from_json_str(&unk, "c.json").unwrap_err());
        assert!(e.contains("GPT2LMHeadModel") && e.contains("Qwen2ForCausalLM"), "{e}");
        let e = format!("{:#}", ModelConfig::from_file(Path::new("no/such/config.json")).unwrap_err());
        assert!(e.contains("no/such/config.json"), "{e}");
    }
}
