//! Reading GGUF checkpoints (llama.cpp's format) of the `llama` and `qwen2`
//! architectures into Hugging Face naming, f32 weights and a [`ModelConfig`].
//!
//! Every tensor is dequantized to f32 (training needs full precision anyway).
//! llama.cpp's converter permutes the rows of `q_proj` / `k_proj` of Llama
//! models so that its interleaved rotary embedding matches HF's half-split
//! one; [`unpermute_qk`] undoes that so the weights are exactly HF's again.

use crate::config::{Architecture, ModelConfig};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// An opened GGUF file: header, metadata and tensor directory (tensor data is
/// read on demand).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

/// GGUF architectures this crate loads.
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

impl GgufFile {
    /// Open and parse the header; a truncated or corrupt header is reported
    /// against the file.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("GGUF file {} does not exist", path.display());
        }
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // candle's parser divides by the alignment: refuse a zero one first.
        if stored_alignment(&mut std::io::BufReader::new(&f)) == Some(0) {
            bail!("{} is not a valid GGUF file: general.alignment is 0", path.display());
        }
        f.seek(SeekFrom::Start(0)).with_context(|| format!("cannot read GGUF file {}", path.display()))?;
        let content = Content::read(&mut f).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("dtype") {
                anyhow::anyhow!(
                    "{}: unsupported tensor type, or a corrupt file ({msg}); supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q8_K (not the IQ* quantizations)",
                    path.display()
                )
            } else {
                anyhow::anyhow!("{} is not a valid GGUF file (truncated or corrupt?): {msg}", path.display())
            }
        })?;
        let len = f.metadata().with_context(|| format!("cannot read GGUF file {}", path.display()))?.len();
        check_tensor_extents(&content, len)
            .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file (truncated or corrupt?): {e}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// GGUF tensor names in the file (sorted).
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {msg}", self.path.display())
    }

    /// A metadata string, if present.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// A metadata integer of any width, if present.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        match self.content.metadata.get(key)? {
            Value::U8(v) => Some(*v as u64),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::U16(v) => Some(*v as u64),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::U32(v) => Some(*v as u64),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::U64(v) => Some(*v),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// A metadata float, if present.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        match self.content.metadata.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            _ => self.get_u64(key).map(|v| v as f64),
        }
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.content.metadata.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A metadata array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.err(format!("`{key}` must hold strings, found {:?}", other.value_type()))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.err(format!("`{key}` must be an array, found {:?}", other.value_type()))),
        }
    }

    /// A metadata array of integers.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    Ok(match v {
                        Value::U8(x) => *x as i64,
                        Value::I8(x) => *x as i64,
                        Value::U16(x) => *x as i64,
                        Value::I16(x) => *x as i64,
                        Value::U32(x) => *x as i64,
                        Value::I32(x) => *x as i64,
                        Value::U64(x) => *x as i64,
                        Value::I64(x) => *x,
                        other => return Err(self.err(format!("`{key}` must hold integers, found {:?}", other.value_type()))),
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.err(format!("`{key}` must be an array, found {:?}", other.value_type()))),
        }
    }

    /// `general.architecture`, checked to be one we support.
    pub fn architecture(&self) -> Result<Architecture> {
        let arch = self.get_str("general.architecture").ok_or_else(|| self.err("missing metadata `general.architecture`"))?;
        match arch {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => {
                Err(self.err(format!("unsupported GGUF architecture `{other}` (supported: {})", SUPPORTED_GGUF_ARCHITECTURES.join(", "))))
            }
        }
    }

    /// The chat template stored by llama.cpp's converter, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.get_str("tokenizer.chat_template").map(str::to_string)
    }

    /// Build the HF [`ModelConfig`] from `<arch>.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let a = arch.model_type();
        let req = |k: &str| -> Result<u64> {
            let key = format!("{a}.{k}");
            self.get_u64(&key).ok_or_else(|| self.err(format!("missing metadata `{key}`")))
        };
        let hidden = req("embedding_length")?;
        let heads = req("attention.head_count")?;
        let kv_heads = self.get_u64(&format!("{a}.attention.head_count_kv")).unwrap_or(heads);
        if heads == 0 {
            return Err(self.err("`attention.head_count` must be positive"));
        }
        let head_dim = self
            .get_u64(&format!("{a}.attention.key_length"))
            .or_else(|| self.get_u64(&format!("{a}.rope.dimension_count")))
            .unwrap_or(hidden / heads);
        let embd = self.content.tensor_infos.get("token_embd.weight").ok_or_else(|| self.err("tensor `token_embd.weight` is missing"))?;
        let vocab = match self.get_u64(&format!("{a}.vocab_size")) {
            Some(v) => v,
            None => *embd.shape.dims().first().ok_or_else(|| self.err("tensor `token_embd.weight` has no dimensions"))? as u64,
        };
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let eps = self
            .get_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))
            .ok_or_else(|| self.err(format!("missing metadata `{a}.attention.layer_norm_rms_epsilon`")))?;
        // f32 round-trip noise (9.999999747e-06): keep the decimal value HF configs carry.
        let eps = round_sig(eps, 6);
        let theta = self.get_f64(&format!("{a}.rope.freq_base")).unwrap_or(10000.0);
        let theta = round_sig(theta, 7);
        let mut cfg = json!({
            "architectures": [arch.hf_name()],
            "model_type": a,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": req("feed_forward_length")?,
            "num_hidden_layers": req("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rope_theta": theta,
            "rms_norm_eps": eps,
            "tie_word_embeddings": tied,
            "max_position_embeddings": self.get_u64(&format!("{a}.context_length")).unwrap_or(4096),
            "torch_dtype": "float32",
        });
        let obj = cfg.as_object_mut().expect("object literal");
        if arch == Architecture::Llama {
            obj.insert("attention_bias".into(), json!(self.content.tensor_infos.contains_key("blk.0.attn_q.bias")));
        }
        if let Some(b) = self.get_u64("tokenizer.ggml.bos_token_id") {
            obj.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = self.get_u64("tokenizer.ggml.eos_token_id") {
            obj.insert("eos_token_id".into(), json!(e));
        }
        if let Some(p) = self.get_u64("tokenizer.ggml.padding_token_id") {
            obj.insert("pad_token_id".into(), json!(p));
        }
        ModelConfig::from_json_str(&cfg.to_string(), &self.path.display().to_string())
    }

    /// Dequantize every tensor to f32, renamed to HF names, with llama's q/k
    /// permutation undone. Unknown tensor names are an error (a silent drop
    /// would load a wrong model).
    pub fn hf_tensors(&self, cfg: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut f = std::fs::File::open(&self.path).with_context(|| format!("cannot open GGUF file {}", self.path.display()))?;
        let mut out = HashMap::new();
        for name in self.tensor_names() {
            // rope_freqs / rope_factors are derived data, not weights.
            if name.starts_with("rope_") {
                continue;
            }
            let hf = hf_name(&name).ok_or_else(|| self.err(format!("unexpected tensor `{name}` (not part of a llama/qwen2 model)")))?;
            let q = self
                .content
                .tensor(&mut f, &name, &Device::Cpu)
                .map_err(|e| self.err(format!("cannot read tensor `{name}` (truncated or corrupt?): {e}")))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| self.err(format!("cannot dequantize tensor `{name}`: {e}")))?;
            let bad = crate::weights::count_non_finite_f32(&t)?;
            if bad > 0 {
                return Err(self.err(crate::weights::non_finite_message(&format!("tensor `{name}` ({hf})"), bad)));
            }
            if cfg.architecture == Architecture::Llama {
                if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
                    t = unpermute_qk(&t, cfg.num_attention_heads).map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
                } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
                    t = unpermute_qk(&t, cfg.num_key_value_heads).map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
                }
            }
            let t = t.to_device(device)?;
            out.insert(hf, t);
        }
        Ok(out)
    }
}

/// Checks that every tensor has elements and a size that computes without
/// overflow and lies inside the file, so that reading one can neither
/// over-allocate nor crash (candle reads an empty tensor through a
/// misaligned pointer, which aborts the process).
fn check_tensor_extents(content: &Content, file_len: u64) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let dt = info.ggml_dtype;
        if info.shape.dims().contains(&0) {
            return Err(format!("tensor `{name}` has a zero dimension (shape {:?})", info.shape.dims()));
        }
        let elems = info.shape.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elems.and_then(|n| (n / dt.block_size()).checked_mul(dt.type_size()));
        let end = bytes.and_then(|b| content.tensor_data_offset.checked_add(info.offset)?.checked_add(b as u64));
        if end.is_none_or(|end| end > file_len) {
            return Err(format!("tensor `{name}` ({dt:?}, shape {:?}) does not fit in the file's {file_len} bytes", info.shape.dims()));
        }
    }
    Ok(())
}

/// `general.alignment` as stored (when an unsigned or non-negative integer),
/// found by skipping through the metadata. `None` when absent or when the
/// header cannot be read (the full parser then says what is wrong).
fn stored_alignment(r: &mut impl Read) -> Option<u64> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).ok()?;
    if &head[..4] != b"GGUF" {
        return None;
    }
    let wide = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) >= 2;
    let _tensors = read_len(r, wide)?;
    for _ in 0..read_len(r, wide)? {
        let key_len = read_len(r, wide)?;
        let key = skip_or_read(r, key_len, key_len <= 64)?;
        let ty = read_u32(r)?;
        if key == b"general.alignment" {
            let size = [1, 2, 4].get(ty as usize / 2).copied().filter(|_| ty <= 5)?;
            let value = skip_or_read(r, size, true)?.iter().rev().fold(0u64, |a, &x| a << 8 | x as u64);
            // Types 1, 3, 5 are signed; the parser ignores a negative alignment.
            return (ty % 2 == 0 || value >> (8 * size - 1) == 0).then_some(value);
        }
        skip_value(r, ty, wide, 0)?;
    }
    None
}

/// Size on disk of a fixed-size GGUF value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn skip_value(r: &mut impl Read, ty: u32, wide: bool, depth: usize) -> Option<()> {
    if let Some(n) = fixed_size(ty) {
        return skip_or_read(r, n, false).map(|_| ());
    }
    match ty {
        8 => {
            let n = read_len(r, wide)?;
            skip_or_read(r, n, false).map(|_| ())
        }
        9 if depth < 8 => {
            let elem = read_u32(r)?;
            let n = read_len(r, wide)?;
            match fixed_size(elem) {
                Some(size) => skip_or_read(r, n.checked_mul(size)?, false).map(|_| ()),
                // Each element takes at least 8 bytes, so a huge count ends at the end of the file.
                None => (0..n).try_for_each(|_| skip_value(r, elem, wide, depth + 1)),
            }
        }
        _ => None,
    }
}

/// Consumes exactly `n` bytes (returned when `keep`), or `None` at end of file.
fn skip_or_read(r: &mut impl Read, n: u64, keep: bool) -> Option<Vec<u8>> {
    let mut kept = Vec::new();
    let got =
        if keep { r.take(n).read_to_end(&mut kept).ok()? as u64 } else { std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()? };
    (got == n).then_some(kept)
}

fn read_u32(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

/// A length: u64 from GGUF v2 on, u32 in v1.
fn read_len(r: &mut impl Read, wide: bool) -> Option<u64> {
    if !wide {
        return read_u32(r).map(u64::from);
    }
    let mut b = [0u8; 8];
    r.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let mag = x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits - 1 - mag);
    (x * scale).round() / scale
}

/// Whole-model tensors: (GGUF name, Hugging Face name).
const MODEL_TENSORS: [(&str, &str); 3] =
    [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// Per-layer tensors (`blk.N.` against `model.layers.N.`): (GGUF part, Hugging Face part).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Map a GGUF tensor name to its Hugging Face name (`None` if unknown).
pub fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, false)
}

/// The inverse of [`hf_name`], for writing GGUF test files.
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, true)
}

/// A name through the tables above: GGUF to Hugging Face, or back when `to_gguf`.
fn rename(name: &str, to_gguf: bool) -> Option<String> {
    let side = |(g, h): (&'static str, &'static str)| if to_gguf { (h, g) } else { (g, h) };
    let (from_layer, to_layer) = side(("blk.", "model.layers."));
    if let Some((_, to)) = MODEL_TENSORS.into_iter().map(side).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (layer, rest) = name.strip_prefix(from_layer)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, to) = LAYER_TENSORS.into_iter().map(side).find(|(from, _)| *from == part)?;
    Some(format!("{to_layer}{layer}.{to}.{kind}"))
}

/// llama.cpp's converter permutation: rows of each head go from HF's
/// half-split order to interleaved pairs
/// (`w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`).
pub fn permute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_rows(t, n_head, true)
}

/// Inverse of [`permute_qk`]: back to HF's row order.
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_rows(t, n_head, false)
}

fn reorder_rows(t: &Tensor, n_head: usize, forward: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("cannot (un)permute {rows} rows for {n_head} heads: rows must be a multiple of 2 * heads");
    }
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    let x = t.reshape((n_head, if forward { 2 } else { half }, if forward { half } else { 2 }, rest))?;
    let y = x.transpose(1, 2)?.contiguous()?.reshape(dims)?;
    Ok(y)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    #[test]
    fn names_roundtrip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.k_proj.bias",
            "model.layers.12.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(hf_name("blk.0.attn_q.weight").unwrap(), "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.7.ffn_norm.weight").unwrap(), "model.layers.7.post_attention_layernorm.weight");
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.0.mystery.weight").is_none());
    }

    #[test]
    fn permutation_matches_llama_cpp_and_roundtrips() {
        // 2 heads of dim 4 (rows), 1 column: HF order per head [a0 a1 b0 b1]
        // becomes interleaved [a0 b0 a1 b1].
        let t = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let p = permute_qk(&t, 2).unwrap();
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute_qk(&p, 2).unwrap();
        let w: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(w, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        // Wider matrix, 3 heads of dim 6.
        let t = Tensor::randn(0f32, 1., (18, 5), &Device::Cpu).unwrap();
        let back = unpermute_qk(&permute_qk(&t, 3).unwrap(), 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        assert!(unpermute_qk(&t, 4).is_err());
    }

    /// Write a tiny llama GGUF from HF-named f32 tensors (permuting q/k the
    /// way llama.cpp does) plus metadata; used by tests here and elsewhere.
    pub(crate) fn write_tiny_gguf(
        path: &Path,
        arch: &str,
        tensors: &HashMap<String, Tensor>,
        n_head: usize,
        n_kv: usize,
        extra_md: Vec<(String, Value)>,
    ) {
        write_tiny_gguf_as(path, arch, tensors, n_head, n_kv, extra_md, GgmlDType::F32)
    }

    /// As [`write_tiny_gguf`], storing 2-D weights in `dtype`.
    pub(crate) fn write_tiny_gguf_as(
        path: &Path,
        arch: &str,
        tensors: &HashMap<String, Tensor>,
        n_head: usize,
        n_kv: usize,
        extra_md: Vec<(String, Value)>,
        dtype: GgmlDType,
    ) {
        let hidden = tensors["model.embed_tokens.weight"].dims()[1];
        let ffn = tensors["model.layers.0.mlp.up_proj.weight"].dims()[0];
        let layers = tensors.keys().filter(|k| k.ends_with("input_layernorm.weight")).count();
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (format!("{arch}.block_count"), Value::U32(layers as u32)),
            (format!("{arch}.context_length"), Value::U32(256)),
            (format!("{arch}.embedding_length"), Value::U32(hidden as u32)),
            (format!("{arch}.feed_forward_length"), Value::U32(ffn as u32)),
            (format!("{arch}.attention.head_count"), Value::U32(n_head as u32)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(n_kv as u32)),
            (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ];
        md.extend(extra_md);
        let mut qs = vec![];
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for hf in names {
            let mut t = tensors[hf].clone();
            if arch == "llama" && hf.contains("q_proj") {
                t = permute_qk(&t, n_head).unwrap();
            } else if arch == "llama" && hf.contains("k_proj") {
                t = permute_qk(&t, n_kv).unwrap();
            }
            let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
            let q = QTensor::quantize(&t, dt).unwrap();
            qs.push((gguf_name(hf).unwrap(), q));
        }
        let md_ref: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_ref: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md_ref, &t_ref).unwrap();
    }

    pub(crate) fn tiny_tensors(hidden: usize, ffn: usize, vocab: usize, heads: usize, kv: usize) -> HashMap<String, Tensor> {
        let d = Device::Cpu;
        let hd = hidden / heads;
        let mut m = HashMap::new();
        let r = |s: (usize, usize)| Tensor::randn(0f32, 0.1, s, &d).unwrap();
        m.insert("model.embed_tokens.weight".into(), r((vocab, hidden)));
        m.insert("model.norm.weight".into(), Tensor::ones(hidden, DType::F32, &d).unwrap());
        let p = "model.layers.0";
        m.insert(format!("{p}.self_attn.q_proj.weight"), r((heads * hd, hidden)));
        m.insert(format!("{p}.self_attn.k_proj.weight"), r((kv * hd, hidden)));
        m.insert(format!("{p}.self_attn.v_proj.weight"), r((kv * hd, hidden)));
        m.insert(format!("{p}.self_attn.o_proj.weight"), r((hidden, heads * hd)));
        m.insert(format!("{p}.mlp.gate_proj.weight"), r((ffn, hidden)));
        m.insert(format!("{p}.mlp.up_proj.weight"), r((ffn, hidden)));
        m.insert(format!("{p}.mlp.down_proj.weight"), r((hidden, ffn)));
        m.insert(format!("{p}.input_layernorm.weight"), Tensor::ones(hidden, DType::F32, &d).unwrap());
        m.insert(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(hidden, DType::F32, &d).unwrap());
        m
    }

    #[test]
    fn tiny_gguf_roundtrip_config_and_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let ts = tiny_tensors(16, 32, 20, 4, 2);
        write_tiny_gguf(&path, "llama", &ts, 4, 2, vec![("tokenizer.ggml.eos_token_id".into(), Value::U32(2))]);
        let g = GgufFile::open(&path).unwrap();
        let cfg = g.config().unwrap();
        assert_eq!(cfg.hidden_size, 16);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.vocab_size, 20);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.eos_token_ids, vec![2]);
        assert_eq!(cfg.rms_norm_eps, 1e-5);
        let back = g.hf_tensors(&cfg, &Device::Cpu).unwrap();
        assert_eq!(back.len(), ts.len());
        for (k, v) in &ts {
            let diff = (v - &back[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{k}");
        }
    }

    #[test]
    fn quantized_tensors_dequantize_close_to_the_originals() {
        let dir = tempfile::tempdir().unwrap();
        // 256-wide rows so that every block size (32 and the K-quants' 256) fits.
        let ts = tiny_tensors(256, 256, 8, 4, 2);
        for (dt, tol) in [
            (GgmlDType::F16, 1e-3),
            (GgmlDType::Q8_0, 0.01),
            (GgmlDType::Q4_0, 0.15),
            (GgmlDType::Q4_1, 0.15),
            (GgmlDType::Q4K, 0.15),
            (GgmlDType::Q5K, 0.08),
            (GgmlDType::Q6K, 0.04),
        ] {
            let path = dir.path().join(format!("{dt:?}.gguf"));
            write_tiny_gguf_as(&path, "llama", &ts, 4, 2, vec![], dt);
            let g = GgufFile::open(&path).unwrap();
            let back = g.hf_tensors(&g.config().unwrap(), &Device::Cpu).unwrap();
            for (k, v) in &ts {
                let scale = v.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let d = (v - &back[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= tol * scale, "{dt:?} {k}: max diff {d} vs scale {scale}");
            }
        }
    }

    #[test]
    fn qwen2_keeps_row_order_and_biases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.gguf");
        let mut ts = tiny_tensors(16, 32, 20, 4, 2);
        for (n, rows) in [("q_proj", 16), ("k_proj", 8), ("v_proj", 8)] {
            ts.insert(format!("model.layers.0.self_attn.{n}.bias"), Tensor::randn(0f32, 1., rows, &Device::Cpu).unwrap());
        }
        ts.insert("lm_head.weight".into(), Tensor::randn(0f32, 1., (20, 16), &Device::Cpu).unwrap());
        write_tiny_gguf(&path, "qwen2", &ts, 4, 2, vec![]);
        let g = GgufFile::open(&path).unwrap();
        let cfg = g.config().unwrap();
        assert_eq!(cfg.architecture, Architecture::Qwen2);
        assert!(cfg.attention_bias && !cfg.tie_word_embeddings);
        let back = g.hf_tensors(&cfg, &Device::Cpu).unwrap();
        for (k, v) in &ts {
            let d = (v - &back[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{k}");
        }
    }

    #[test]
    fn non_finite_weights_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut ts = tiny_tensors(16, 32, 20, 4, 2);
        let up = "model.layers.0.mlp.up_proj.weight";
        let mut v = ts[up].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (v[3], v[7], v[300]) = (f32::NAN, f32::INFINITY, f32::NAN);
        ts.insert(up.into(), Tensor::from_vec(v, (32, 16), &Device::Cpu).unwrap());
        write_tiny_gguf(&path, "llama", &ts, 4, 2, vec![]);
        let g = GgufFile::open(&path).unwrap();
        let e = format!("{:#}", g.hf_tensors(&g.config().unwrap(), &Device::Cpu).unwrap_err());
        assert!(
            e.contains("m.gguf") && e.contains(&format!("tensor `blk.0.ffn_up.weight` ({up}): 3 non-finite value(s) (NaN/inf)")),
            "{e}"
        );
    }

    /// A GGUF v3 file with no metadata and one tensor `token_embd.weight`.
    fn one_tensor_gguf(dims: [u64; 2], ty: u32, offset: u64, data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(17u64.to_le_bytes());
        b.extend(b"token_embd.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(dims[0].to_le_bytes());
        b.extend(dims[1].to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b.resize(b.len().next_multiple_of(32) + data, 0);
        b
    }

    #[test]
    fn corrupt_sizes_and_alignment_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let open_err = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            format!("{:#}", GgufFile::open(&path).err().expect("must be refused"))
        };
        std::fs::write(&path, one_tensor_gguf([32, 4], 0, 0, 512)).unwrap();
        assert_eq!(GgufFile::open(&path).unwrap().tensor_names(), vec!["token_embd.weight"]);
        let e = open_err(&one_tensor_gguf([1 << 40, 1 << 40], 0, 0, 512));
        assert!(e.contains("m.gguf") && e.contains("`token_embd.weight`") && e.contains("does not fit"), "{e}");
        let e = open_err(&one_tensor_gguf([32, 4], 0, u64::MAX - 8, 512));
        assert!(e.contains("does not fit"), "{e}");
        let e = open_err(&one_tensor_gguf([32, 4], 0, 0, 500));
        assert!(e.contains("does not fit"), "{e}");
        // An empty tensor would be read through a misaligned pointer (a process abort).
        let e = open_err(&one_tensor_gguf([0, 4], 0, 0, 512));
        assert!(e.contains("`token_embd.weight` has a zero dimension"), "{e}");
        for alignment in [Value::U32(0), Value::U8(0), Value::I16(0)] {
            write_tiny_gguf(&path, "llama", &tiny_tensors(16, 32, 20, 4, 2), 4, 2, vec![("general.alignment".into(), alignment)]);
            let e = format!("{:#}", GgufFile::open(&path).err().expect("zero alignment"));
            assert!(e.contains("m.gguf") && e.contains("general.alignment is 0"), "{e}");
        }
        write_tiny_gguf(&path, "llama", &tiny_tensors(16, 32, 20, 4, 2), 4, 2, vec![("general.alignment".into(), Value::I32(-1))]);
        assert!(GgufFile::open(&path).is_ok(), "a negative alignment is ignored, as the parser does");
    }

    #[test]
    fn errors_name_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let ts = tiny_tensors(16, 32, 20, 4, 2);
        write_tiny_gguf(&path, "gpt2", &ts, 4, 2, vec![]);
        let e = format!("{:#}", GgufFile::open(&path).unwrap().config().unwrap_err());
        assert!(e.contains("m.gguf") && e.contains("unsupported GGUF architecture `gpt2`"), "{e}");
        // Truncated in the tensor data: the header parses, and the tensor directory names what is cut.
        write_tiny_gguf(&path, "llama", &ts, 4, 2, vec![]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let e = format!("{:#}", GgufFile::open(&path).err().unwrap());
        assert!(e.contains("m.gguf") && e.contains("truncated") && e.contains("does not fit"), "{e}");
        // Truncated in the header.
        std::fs::write(&path, &bytes[..40]).unwrap();
        let e = format!("{:#}", GgufFile::open(&path).err().unwrap());
        assert!(e.contains("m.gguf") && e.contains("not a valid GGUF"), "{e}");
        // A tensor of a type we cannot dequantize (20 = IQ4_NL).
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(0u64.to_le_bytes()); // metadata
        b.extend(17u64.to_le_bytes());
        b.extend(b"token_embd.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(20u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(vec![0u8; 256]);
        std::fs::write(&path, &b).unwrap();
        let e = format!("{:#}", GgufFile::open(&path).err().unwrap());
        assert!(e.contains("m.gguf") && e.contains("unsupported tensor type"), "{e}");
        // Not GGUF at all.
        std::fs::write(&path, b"hello world, definitely not gguf").unwrap();
        let e = format!("{:#}", GgufFile::open(&path).err().unwrap());
        assert!(e.contains("not a valid GGUF"), "{e}");
        let e = format!("{:#}", GgufFile::open(&dir.path().join("nope.gguf")).err().unwrap());
        assert!(e.contains("nope.gguf") && e.contains("does not exist"), "{e}");
    }
}

/// Mutated GGUF files: the reader (header, metadata, tokenizer, tensors)
/// fails with a message and never panics. Set `PROPTEST_CASES` for more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{config, edits, mutate};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// A tiny complete model as GGUF bytes, and where its tensor data starts.
    fn seed() -> &'static (Vec<u8>, usize) {
        static SEED: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
        SEED.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("seed.gguf");
            // 32-wide rows: Q8_0 blocks, with their f16 scales, in the data.
            let ts = tests::tiny_tensors(32, 32, 259, 4, 2);
            let md = crate::source::tests::byte_tokenizer_md();
            tests::write_tiny_gguf_as(&p, "llama", &ts, 4, 2, md, candle_core::quantized::GgmlDType::Q8_0);
            let data_start = GgufFile::open(&p).unwrap().content.tensor_data_offset as usize;
            (std::fs::read(&p).unwrap(), data_start)
        })
    }

    proptest! {
        #![proptest_config(config(2000))]

        #[test]
        fn mutated_gguf_loads_or_fails_cleanly(e in edits(6)) {
            let (bytes, data_start) = seed();
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.gguf");
            std::fs::write(&p, mutate(bytes.clone(), *data_start, &e)).unwrap();
            if let Err(err) = crate::source::load(&p, &crate::llama::LoadOptions::default()) {
                let msg = format!("{err:#}");
                prop_assert!(!msg.trim().is_empty());
            }
        }
    }
}
