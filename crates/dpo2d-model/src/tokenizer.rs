//! Tokenizers: from a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`)
//! or rebuilt from GGUF metadata as the equivalent `tokenizer.json`, so that
//! token ids match Hugging Face transformers exactly.

use crate::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::str::FromStr;
use tokenizers::Tokenizer;

/// Names of the special tokens (as in `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    /// Whether the tokenizer's post-processor prepends BOS.
    pub add_bos: bool,
}

/// A tokenizer plus its special tokens.
#[derive(Clone)]
pub struct ModelTokenizer {
    pub inner: Tokenizer,
    pub special: SpecialTokens,
    /// `model_max_length` from tokenizer_config.json, if any.
    pub model_max_length: Option<usize>,
}

/// Pre-tokenizer regex of Qwen2 (`tokenizer.ggml.pre = qwen2`).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Pre-tokenizer regex of Llama 3 (`llama-bpe`).
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `pre_tokenizer` section of tokenizer.json for llama.cpp's `tokenizer.ggml.pre`.
pub fn pre_tokenizer_for(pre: &str) -> Value {
    let byte_level =
        |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]})
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]})
        }
        "gpt2" | "default" | "" => byte_level(true),
        other => {
            tracing::warn!("unknown GGUF pre-tokenizer `{other}`: using GPT-2's");
            byte_level(true)
        }
    }
}

/// The post-processor of a GGUF tokenizer: prepend BOS when the metadata
/// asks for it, else byte-level offsets only.
fn post_processor(special: &SpecialTokens, tokens: &[String]) -> Value {
    match (&special.add_bos, &special.bos) {
        (true, Some(bos)) => {
            let bos_id = tokens.iter().position(|t| t == bos).unwrap_or(0);
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}})
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    }
}

impl ModelTokenizer {
    /// Rebuild the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    /// Only byte-level BPE (`gpt2`) tokenizers are supported.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let file = g.path().display().to_string();
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            bail!("{file}: unsupported tokenizer `tokenizer.ggml.model = {model}` (only byte-level BPE, `gpt2`, is supported)");
        }
        let tokens =
            g.get_str_array("tokenizer.ggml.tokens")?.with_context(|| format!("{file}: missing metadata `tokenizer.ggml.tokens`"))?;
        let merges =
            g.get_str_array("tokenizer.ggml.merges")?.with_context(|| format!("{file}: missing metadata `tokenizer.ggml.merges`"))?;
        let types = g.get_int_array("tokenizer.ggml.token_type")?.unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            bail!("{file}: {} token types for {} tokens", types.len(), tokens.len());
        }
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let id_name = |key: &str| -> Result<Option<String>> {
            match g.get_u64(key) {
                None => Ok(None),
                Some(i) => tokens
                    .get(i as usize)
                    .cloned()
                    .map(Some)
                    .with_context(|| format!("{file}: `{key}` = {i} is outside the vocabulary ({} tokens)", tokens.len())),
            }
        };
        let special = SpecialTokens {
            bos: id_name("tokenizer.ggml.bos_token_id")?,
            eos: id_name("tokenizer.ggml.eos_token_id")?,
            pad: id_name("tokenizer.ggml.padding_token_id")?,
            unk: id_name("tokenizer.ggml.unknown_token_id")?,
            add_bos: g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        };
        let mut vocab = Map::new();
        let mut added = vec![];
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
            // 3 = control, 4 = user-defined: matched whole in the text, never split.
            let ty = types.get(i).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true}));
            }
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .with_context(|| format!("{file}: malformed merge `{m}` (expected two tokens separated by a space)"))
            })
            .collect::<Result<_>>()?;
        let post = post_processor(&special, &tokens);
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            // Qwen2's tokenizer.json normalises to NFC before splitting.
            "normalizer": if pre == "qwen2" { json!({"type": "NFC"}) } else { Value::Null },
            "pre_tokenizer": pre_tokenizer_for(pre),
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        let inner = Tokenizer::from_str(&tj.to_string())
            .map_err(|e| anyhow::anyhow!("{file}: cannot build the tokenizer from GGUF metadata: {e}"))?;
        let max = g.get_str("general.architecture").and_then(|a| g.get_u64(&format!("{a}.context_length"))).map(|v| v as usize);
        Ok(Self { inner, special, model_max_length: max })
    }

    /// Load `tokenizer.json` and (if present) `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            bail!("no tokenizer in {}: expected tokenizer.json", dir.display());
        }
        let inner = Tokenizer::from_file(&tj).map_err(|e| anyhow::anyhow!("{}: not a valid tokenizer.json: {e}", tj.display()))?;
        let mut special = SpecialTokens::default();
        let mut model_max_length = None;
        let tc = dir.join("tokenizer_config.json");
        if tc.is_file() {
            let v = read_json(&tc)?;
            let name = |k: &str| -> Option<String> {
                match v.get(k)? {
                    Value::String(s) => Some(s.clone()),
                    // Older files store {"content": "...", ...} objects.
                    Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                    _ => None,
                }
            };
            special.bos = name("bos_token");
            special.eos = name("eos_token");
            special.pad = name("pad_token");
            special.unk = name("unk_token");
            special.add_bos = v.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
            model_max_length = v.get("model_max_length").and_then(|m| m.as_f64()).filter(|m| *m > 0.0 && *m < 1e12).map(|m| m as usize);
        }
        Ok(Self { inner, special, model_max_length })
    }

    /// Token ids of `text`. `add_special_tokens` applies the post-processor
    /// (e.g. a BOS); chat-template output is encoded without it, as
    /// transformers' `apply_chat_template` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("cannot tokenize text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }

    /// The text of one token (as decoded on its own).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.special.bos.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.special.eos.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Padding id: the pad token, else EOS, else 0.
    pub fn pad_token_id(&self) -> u32 {
        self.special.pad.as_deref().and_then(|t| self.token_to_id(t)).or_else(|| self.eos_token_id()).unwrap_or(0)
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (with the chat
    /// template, if any) into `dir`.
    pub fn save_dir(&self, dir: &Path, chat_template: Option<&str>, tokenizer_class: &str) -> Result<()> {
        let tj = dir.join("tokenizer.json");
        self.inner.save(&tj, true).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tj.display()))?;
        let mut cfg = Map::new();
        cfg.insert("tokenizer_class".into(), json!(tokenizer_class));
        let opt = |v: &Option<String>| v.as_ref().map(|s| json!(s)).unwrap_or(Value::Null);
        cfg.insert("bos_token".into(), opt(&self.special.bos));
        cfg.insert("eos_token".into(), opt(&self.special.eos));
        cfg.insert("pad_token".into(), opt(&self.special.pad));
        cfg.insert("unk_token".into(), opt(&self.special.unk));
        cfg.insert("add_bos_token".into(), json!(self.special.add_bos));
        cfg.insert("add_eos_token".into(), json!(false));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(m) = self.model_max_length {
            cfg.insert("model_max_length".into(), json!(m));
        }
        if let Some(t) = chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        let p = dir.join("tokenizer_config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&Value::Object(cfg))?).with_context(|| format!("cannot write {}", p.display()))?;
        Ok(())
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::{tiny_tensors, write_tiny_gguf};
    use candle_core::quantized::gguf_file::Value as GV;

    fn strs(v: &[&str]) -> GV {
        GV::Array(v.iter().map(|s| GV::String(s.to_string())).collect())
    }

    /// A tiny byte-level BPE vocabulary in GGUF metadata.
    fn tiny_tokenizer_md(pre: &str) -> Vec<(String, GV)> {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        for c in ["a", "b", "c", "1", "2", "Ġ", "h", "i", "Ċ"] {
            tokens.push(c.into());
        }
        tokens.extend(["ab".to_string(), "Ġa".to_string(), "hi".to_string(), "12".to_string()]);
        let types: Vec<GV> = (0..tokens.len()).map(|i| GV::I32(if i < 3 { 3 } else { 1 })).collect();
        let tref: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
        vec![
            ("tokenizer.ggml.model".into(), GV::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), GV::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), strs(&tref)),
            ("tokenizer.ggml.token_type".into(), GV::Array(types)),
            ("tokenizer.ggml.merges".into(), strs(&["a b", "Ġ a", "h i", "1 2"])),
            ("tokenizer.ggml.bos_token_id".into(), GV::U32(0)),
            ("tokenizer.ggml.eos_token_id".into(), GV::U32(2)),
            ("tokenizer.ggml.padding_token_id".into(), GV::U32(0)),
        ]
    }

    #[test]
    fn builds_bpe_from_gguf_and_roundtrips_through_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        write_tiny_gguf(&path, "llama", &tiny_tensors(8, 8, 16, 2, 2), 2, 2, tiny_tokenizer_md("smollm"));
        let g = GgufFile::open(&path).unwrap();
        let tok = ModelTokenizer::from_gguf(&g).unwrap();
        // "ab a" -> ab, Ġa ; special tokens matched whole.
        assert_eq!(tok.encode("ab a", false).unwrap(), vec![12, 13]);
        assert_eq!(tok.encode("<|im_start|>hi<|im_end|>", false).unwrap(), vec![1, 14, 2]);
        // smollm splits digits one by one, so the "1 2" merge never applies.
        assert_eq!(tok.encode("12", false).unwrap(), vec![6, 7]);
        assert_eq!(tok.decode(&[12, 13], false).unwrap(), "ab a");
        assert_eq!(tok.decode(&[1, 14, 2], true).unwrap(), "hi");
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.special.eos.as_deref(), Some("<|im_end|>"));
        // Plain GPT-2 pre-tokenizer keeps digit runs together.
        write_tiny_gguf(&path, "llama", &tiny_tensors(8, 8, 16, 2, 2), 2, 2, tiny_tokenizer_md("gpt2"));
        let tok2 = ModelTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!(tok2.encode("12", false).unwrap(), vec![15]);
        // Qwen2: NFC normaliser and its own split regex (digits one by one).
        write_tiny_gguf(&path, "llama", &tiny_tensors(8, 8, 16, 2, 2), 2, 2, tiny_tokenizer_md("qwen2"));
        let tq = ModelTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!(tq.encode("12 ab", false).unwrap(), vec![6, 7, 8, 12]);
        assert!(tq.inner.get_normalizer().is_some());
        // Save and reload as an HF directory.
        let out = dir.path().join("hf");
        std::fs::create_dir_all(&out).unwrap();
        tok.save_dir(&out, Some("{{ x }}"), "GPT2Tokenizer").unwrap();
        let back = ModelTokenizer::from_dir(&out).unwrap();
        assert_eq!(back.encode("ab a<|im_end|>12", false).unwrap(), tok.encode("ab a<|im_end|>12", false).unwrap());
        assert_eq!(back.special, tok.special);
        let cfg = read_json(&out.join("tokenizer_config.json")).unwrap();
        assert_eq!(cfg["chat_template"], "{{ x }}");
    }

    #[test]
    fn rejects_non_bpe_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spm.gguf");
        let md = vec![("tokenizer.ggml.model".to_string(), GV::String("llama".into()))];
        write_tiny_gguf(&path, "llama", &tiny_tensors(8, 8, 16, 2, 2), 2, 2, md);
        let e = format!("{:#}", ModelTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).err().unwrap());
        assert!(e.contains("spm.gguf") && e.contains("unsupported tokenizer"), "{e}");
        let e = format!("{:#}", ModelTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
