//! A differentiable Llama / Qwen2 causal LM, built only from ops that have a
//! backward pass (candle primitives or the custom ops in [`dpo2d_kernels::ops`]).
//!
//! # Using it
//!
//! ```ignore
//! use dpo2d_model::llama::{CausalLM, LoadOptions, AttentionLayout};
//! let opts = LoadOptions { trainable: true, ..LoadOptions::default() }; // f32, CPU
//! let model = CausalLM::load(Path::new("model_dir"), &opts)?;        // config.json + safetensors
//! // or CausalLM::from_tensors(cfg, hf_named_tensors, &opts) for GGUF-dequantized weights.
//!
//! // input_ids: [B, T] u32. The layout says which tokens attend to which:
//! //   AttentionLayout::causal(b, t)                  plain causal batch
//! //   AttentionLayout::from_attention_mask(&mask)    HF-style 1/0 padding mask (left or right)
//! //   AttentionLayout::packed(&[vec![5, 3], vec![8]], t)  several sequences per row
//! let hidden = model.forward(&input_ids, &layout)?;       // [B, T, H] after the final norm
//! let logits = model.logits(&hidden)?;                    // [B, T, V] f32 (only when needed)
//! let lp = model.token_logprobs(&input_ids, &layout)?;    // [B, T]: log p(token | earlier tokens
//! //   of the same sequence); 0 at each sequence's first token and at padding.
//! let lp = model.label_logprobs(&hidden, &labels)?;       // [B, T] for arbitrary labels
//! // Training: model.trainable_vars() -> Vec<(name, Var)>;
//! // let grads = model.gradients(&loss.backward()?)?; (same order); optimizer step.
//! model.set_training(true); // LoRA dropout on
//!
//! // Generation with a KV cache (left padding allowed):
//! let mut cache = model.new_cache();
//! let h = model.forward_cached(&prompt_ids, Some(&prompt_mask), &mut cache)?; // [B, T, H]
//! let h = model.forward_cached(&next_ids /*[B,1]*/, None, &mut cache)?;
//! ```
//!
//! Log-probabilities go through [`dpo2d_kernels::ops::label_logprobs`], which never
//! keeps a `[tokens x vocab]` tensor alive for backward.

mod checkpoint;

use crate::config::ModelConfig;
use crate::lora::{LoraAdapter, LoraConfig, LoraRuntime, LoraTarget};
use crate::weights::WeightSet;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use dpo2d_kernels as kernels;
use dpo2d_kernels::ops;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// How to materialise a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Full fine-tuning: every weight becomes a candle `Var`.
    /// False: weights are plain tensors (frozen, e.g. the reference model).
    pub trainable: bool,
    /// Add LoRA adapters (base weights frozen; only adapters train).
    pub lora: Option<LoraConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, trainable: false, lora: None }
    }
}

/// A linear layer `y = x W^T + b`, optionally with a LoRA adapter.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// Where the weight's gradient goes when the weight trains (full fine-tuning).
    sink: Option<Arc<ops::GradSink>>,
}

/// What a frozen copy of a model does with its LoRA adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adapters {
    /// Merged into their weights (a new weight per adapted layer).
    Merged,
    /// Left out: the base model, its weights shared.
    Dropped,
}

impl Linear {
    /// The same layer outside autograd: weights shared (not copied) but
    /// detached; a LoRA adapter merged into the weight or left out.
    fn frozen(&self, adapters: Adapters) -> Result<Self> {
        let weight = match (&self.lora, adapters) {
            (Some(l), Adapters::Merged) => (&self.weight + l.merged_delta()?.to_dtype(self.weight.dtype())?)?.detach(),
            _ => self.weight.detach(),
        };
        Ok(Linear { weight, bias: self.bias.as_ref().map(Tensor::detach), lora: None, sink: None })
    }

    /// The weight and its gradient sink, when the layer can join a fused
    /// graph node: it trains in full, with no bias and no LoRA adapter.
    fn fused_param(&self) -> Option<kernels::Param<'_>> {
        match self.fused_projection()? {
            (w, Some(s)) => Some((w, s)),
            (_, None) => None,
        }
    }

    /// The weight and, when it trains, its gradient sink, when the layer can
    /// join a fused MLP: no bias, no LoRA adapter, and the weight either
    /// trains in full or is frozen (a LoRA run's base weight).
    fn fused_projection(&self) -> Option<kernels::mlp::Projection<'_>> {
        match (&self.sink, &self.lora, &self.bias) {
            (Some(s), None, None) => Some((&self.weight, Some(s))),
            (None, None, None) if !self.weight.track_op() => Some((&self.weight, None)),
            _ => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(l) = self.lora.as_ref().filter(|_| fused_nodes_take(x, &self.weight)) {
            return l.linear_with_adapter(x, &self.weight, self.bias.as_ref());
        }
        self.forward_composed(x)
    }

    /// The layer from candle's ops: the product, then the adapter's delta.
    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::linear_with(x, &self.weight, self.bias.as_ref(), self.sink.as_ref())?;
        match &self.lora {
            Some(l) => Ok((y + l.delta(x)?)?),
            None => Ok(y),
        }
    }
}

/// What every block of one forward pass shares: the rotary tables for the
/// tokens' positions and the additive attention mask.
#[derive(Clone)]
struct LayerCtx {
    /// cos/sin `[B, T, head_dim/2]`.
    cos: Tensor,
    sin: Tensor,
    /// Additive `[B or 1, 1, 1, Tq, Tk]` (0 allowed, -inf masked).
    mask: Tensor,
}

/// Past keys and values of one layer (generation with a KV cache).
/// One layer's cache: its buffer once made, and how long to make it.
#[derive(Clone, Default)]
struct LayerCache {
    buf: Option<KvBuffer>,
    reserve: usize,
}

/// One layer's past keys and values, `[B, n_kv, capacity, d]`, of which the
/// first `len` positions are filled. New positions are written in place;
/// the buffer doubles when full. Appending by concatenation instead copies
/// the whole past at every decoding step, which made long answers slow.
#[derive(Clone)]
struct KvBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvBuffer {
    /// Appends `k`, `v` (`[B, n_kv, t, d]`) and returns views of everything so far.
    fn append(entry: &mut LayerCache, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let reserve = entry.reserve;
        let entry = &mut entry.buf;
        let (b, nkv, t, d) = k.dims4()?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let len = entry.as_ref().map(|e| e.len).unwrap_or(0);
        let cap = entry.as_ref().map(|e| e.k.dims()[2]).unwrap_or(0);
        if len + t > cap {
            let new_cap = if cap == 0 { (len + t).max(reserve).max(64) } else { (len + t).max(2 * cap) };
            let grown = KvBuffer {
                k: Tensor::zeros((b, nkv, new_cap, d), k.dtype(), k.device())?,
                v: Tensor::zeros((b, nkv, new_cap, d), v.dtype(), v.device())?,
                len,
            };
            if let Some(old) = entry.take() {
                grown.k.slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                grown.v.slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *entry = Some(grown);
        }
        let e = entry.as_mut().expect("the buffer was just made");
        e.k.slice_set(&k, 2, e.len)?;
        e.v.slice_set(&v, 2, e.len)?;
        e.len += t;
        Ok((e.k.narrow(2, 0, e.len)?, e.v.narrow(2, 0, e.len)?))
    }
}

impl KvBuffer {
    /// `a`'s rows then `b`'s in one buffer, each shifted right by its
    /// padding so that their last positions line up.
    fn stack(a: KvBuffer, pad_a: usize, b: KvBuffer, pad_b: usize) -> Result<KvBuffer> {
        let len = a.len + pad_a;
        debug_assert_eq!(len, b.len + pad_b);
        let (ra, nkv, cap_a, d) = a.k.dims4()?;
        let (rb, _, cap_b, _) = b.k.dims4()?;
        // Room for the rows' next tokens, as each side had.
        let cap = (cap_a + pad_a).max(cap_b + pad_b);
        let out = KvBuffer {
            k: Tensor::zeros((ra + rb, nkv, cap, d), a.k.dtype(), a.k.device())?,
            v: Tensor::zeros((ra + rb, nkv, cap, d), a.v.dtype(), a.v.device())?,
            len,
        };
        for (src, first, pad) in [(&a, 0, pad_a), (&b, ra, pad_b)] {
            let rows = src.k.dim(0)?;
            for (dst, s) in [(&out.k, &src.k), (&out.v, &src.v)] {
                let part = s.narrow(2, 0, src.len)?.contiguous()?;
                dst.narrow(0, first, rows)?.slice_set(&part, 2, pad)?;
            }
        }
        Ok(out)
    }
}

/// RMSNorm with a learned scale.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Where the weight's gradient goes when a fused block computes it.
    sink: Option<Arc<ops::GradSink>>,
}

impl RmsNorm {
    fn load(b: &mut Builder, name: &str, size: usize, eps: f64) -> Result<Self> {
        let name = format!("{name}.weight");
        Ok(RmsNorm { weight: b.param(&name, &[size])?, eps, sink: b.sink(&name) })
    }

    fn frozen(&self) -> Self {
        RmsNorm { weight: self.weight.detach(), eps: self.eps, sink: None }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// The residual add before the norm and the norm, in one op: `(a + b,
    /// norm(a + b))`.
    fn forward_add(&self, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(ops::add_rms_norm(a, b, &self.weight, self.eps)?)
    }
}

/// Grouped-query self-attention with rotary positions.
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(b: &mut Builder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, nh, nkv, hd, bias) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias);
        Ok(Attention {
            q: b.linear(prefix, LoraTarget::Q, nh * hd, h, bias)?,
            k: b.linear(prefix, LoraTarget::K, nkv * hd, h, bias)?,
            v: b.linear(prefix, LoraTarget::V, nkv * hd, h, bias)?,
            o: b.linear(prefix, LoraTarget::O, h, nh * hd, false)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    fn frozen(&self, adapters: Adapters) -> Result<Self> {
        let (q, k, v, o) = (self.q.frozen(adapters)?, self.k.frozen(adapters)?, self.v.frozen(adapters)?, self.o.frozen(adapters)?);
        Ok(Attention { q, k, v, o, ..*self })
    }

    /// With a cache entry, past keys/values are prepended and the entry updated.
    fn forward(&self, x: &Tensor, ctx: &LayerCtx, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [B, T, heads, d] -> rotated [B, heads, T, d].
        let q = ops::rope_heads(&self.q.forward(x)?.reshape((b, t, nh, hd))?, &ctx.cos, &ctx.sin)?;
        let k = ops::rope_heads(&self.k.forward(x)?.reshape((b, t, nkv, hd))?, &ctx.cos, &ctx.sin)?;
        let v = self.v.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let (k, v) = match cache {
            Some(entry) => KvBuffer::append(entry, &k, &v)?,
            None => (k, v.contiguous()?),
        };
        let out = ops::attention(&q, &k, &v, &ctx.mask, 1.0 / (hd as f64).sqrt())?;
        self.o.forward(&out)
    }
}

/// Whether the fused graph nodes take `x`: where the fused kernels run (the
/// CPU in f32/f64, a GPU in f32/bf16), in the dtype of the weights, the
/// nodes not switched off ([`kernels::nodes_enabled`]).
fn fused_nodes_take(x: &Tensor, weight: &Tensor) -> bool {
    kernels::nodes_enabled() && kernels::fused(x) && x.dtype() == weight.dtype()
}

/// Whether `x` goes through the fused graph nodes while it takes part in
/// autograd (nodes whose weights are all frozen need a tracked input).
fn trains_on_fused_kernels(x: &Tensor, weight: &Tensor) -> bool {
    x.track_op() && fused_nodes_take(x, weight)
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(b: &mut Builder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, im) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate: b.linear(prefix, LoraTarget::Gate, im, h, false)?,
            up: b.linear(prefix, LoraTarget::Up, im, h, false)?,
            down: b.linear(prefix, LoraTarget::Down, h, im, false)?,
        })
    }

    fn frozen(&self, adapters: Adapters) -> Result<Self> {
        Ok(Mlp { gate: self.gate.frozen(adapters)?, up: self.up.frozen(adapters)?, down: self.down.frozen(adapters)? })
    }

    /// The three weights (with their gradient sinks when they train), when
    /// all can join a fused node.
    fn fused_weights(&self) -> Option<kernels::mlp::MlpWeights<'_>> {
        let (gate, up, down) = (self.gate.fused_projection()?, self.up.fused_projection()?, self.down.fused_projection()?);
        Some(kernels::mlp::MlpWeights { gate, up, down })
    }

    /// SwiGLU: `down(silu(gate(x)) * up(x))`; one graph node when it trains
    /// where the fused kernels run and each weight trains in full or is
    /// frozen ([`kernels::mlp`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = self.fused_weights().filter(|_| trains_on_fused_kernels(x, &self.gate.weight)) {
            return Ok(kernels::mlp::swiglu_mlp(x, w)?);
        }
        self.forward_composed(x)
    }

    /// The MLP from linear layers and the SwiGLU op.
    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate.forward(x)?;
        let up = self.up.forward(x)?;
        self.down.forward(&ops::swiglu(&gate, &up)?)
    }
}

/// A pre-norm decoder block: attention and MLP, each with a residual.
struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Loads in Hugging Face order (q, k, v, o, gate, up, down, norms): the
    /// order of trainable variables and of LoRA initialisation draws.
    fn load(b: &mut Builder, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let attn = Attention::load(b, &p, cfg)?;
        let mlp = Mlp::load(b, &p, cfg)?;
        let input_norm = RmsNorm::load(b, &format!("{p}.input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let post_norm = RmsNorm::load(b, &format!("{p}.post_attention_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        Ok(Block { input_norm, attn, post_norm, mlp })
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut m.gate, &mut m.up, &mut m.down]
    }

    fn frozen(&self, adapters: Adapters) -> Result<Self> {
        let (input_norm, post_norm) = (self.input_norm.frozen(), self.post_norm.frozen());
        Ok(Block { input_norm, attn: self.attn.frozen(adapters)?, post_norm, mlp: self.mlp.frozen(adapters)? })
    }

    /// The block's weights with their gradient sinks, when every weight
    /// trains in full with no bias or LoRA adapter: then the whole block can
    /// be one graph node ([`kernels::block`]).
    fn fused_weights(&self) -> Option<(kernels::block::BlockWeights<'_>, kernels::block::BlockShape)> {
        fn norm(n: &RmsNorm) -> Option<kernels::Param<'_>> {
            n.sink.as_ref().map(|s| (&n.weight, s))
        }
        let a = &self.attn;
        let w = kernels::block::BlockWeights {
            input_norm: norm(&self.input_norm)?,
            q: a.q.fused_param()?,
            k: a.k.fused_param()?,
            v: a.v.fused_param()?,
            o: a.o.fused_param()?,
            post_norm: norm(&self.post_norm)?,
            mlp: self.mlp.fused_weights()?,
        };
        if self.input_norm.eps != self.post_norm.eps {
            return None;
        }
        let shape = kernels::block::BlockShape {
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            eps: self.input_norm.eps,
        };
        Some((w, shape))
    }

    fn forward(&self, x: &Tensor, ctx: &LayerCtx, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        // The block's node runs the CPU's rotary kernel: CPU only.
        if cache.is_none() && kernels::supports(x) && trains_on_fused_kernels(x, &self.input_norm.weight) {
            if let Some((w, shape)) = self.fused_weights() {
                return Ok(kernels::block::decoder_block(
                    x,
                    w,
                    shape,
                    kernels::block::BlockInputs { cos: &ctx.cos, sin: &ctx.sin, mask: &ctx.mask },
                )?);
            }
        }
        let attn = self.attn.forward(&self.input_norm.forward(x)?, ctx, cache)?;
        let (x, normed) = self.post_norm.forward_add(&attn, x)?;
        Ok((self.mlp.forward(&normed)? + x)?)
    }
}

/// Which tokens of a batch belong to which sequence.
///
/// `seq_ids[b][t]` is 0 for padding, otherwise an id shared by the tokens of
/// one sequence (ids need only differ between neighbouring sequences of a row).
/// A token attends to earlier tokens with the same id; its rotary position is
/// its index within its sequence.
///
/// A sequence may also *continue* another one of its row (its parent): it then
/// attends to all of the parent's tokens as well, and its positions carry on
/// from the parent's end. Chosen and rejected responses continuing one copy of
/// their shared prompt run the prompt through the model once instead of twice.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayout {
    pub seq_ids: Vec<Vec<u32>>,
    /// Per row, indexed by sequence id: the id that sequence continues (0:
    /// none; ids past the end of a row's table continue nothing).
    pub parents: Vec<Vec<u32>>,
}

impl AttentionLayout {
    /// Every row is one unpadded sequence.
    pub fn causal(b: usize, t: usize) -> Self {
        Self::from_seq_ids(vec![vec![1; t]; b])
    }

    /// From a Hugging Face attention mask (1 = token, 0 = padding), left or right padded.
    pub fn from_attention_mask(mask: &[Vec<u32>]) -> Self {
        Self::from_seq_ids(mask.iter().map(|r| r.iter().map(|&m| u32::from(m != 0)).collect()).collect())
    }

    /// Packed rows: `lengths[b]` lists the lengths of the sequences laid
    /// end to end in row `b`; the rest of the row (up to `t`) is padding.
    pub fn packed(lengths: &[Vec<usize>], t: usize) -> Result<Self> {
        let units: Vec<Vec<(usize, Vec<usize>)>> = lengths.iter().map(|ls| ls.iter().map(|&l| (l, vec![])).collect()).collect();
        Self::packed_shared(&units, t)
    }

    /// Packed rows of prompt-sharing units: `units[b]` lists, for row `b`,
    /// `(prompt length, response lengths)` laid out as `[prompt | response 1 |
    /// response 2 ...]`. Each response continues its prompt only (it does not
    /// see the other responses), so it gets the same hidden states as the
    /// sequence prompt + response on its own.
    pub fn packed_shared(units: &[Vec<(usize, Vec<usize>)>], t: usize) -> Result<Self> {
        let mut seq_ids = vec![];
        let mut parents = vec![];
        for (b, row_units) in units.iter().enumerate() {
            let total: usize = row_units.iter().map(|(p, rs)| p + rs.iter().sum::<usize>()).sum();
            if total > t {
                bail!("packed row {b} holds {total} tokens but the batch is only {t} wide");
            }
            let mut row = Vec::with_capacity(t);
            let mut parent = vec![];
            let mut next = 1u32;
            for (p, rs) in row_units {
                if *p == 0 && !rs.is_empty() {
                    bail!("packed row {b}: a shared prompt is empty");
                }
                let pid = next;
                row.extend(std::iter::repeat_n(pid, *p));
                next += 1;
                for &r in rs {
                    row.extend(std::iter::repeat_n(next, r));
                    parent.resize(next as usize + 1, 0);
                    parent[next as usize] = pid;
                    next += 1;
                }
            }
            row.resize(t, 0);
            seq_ids.push(row);
            parents.push(parent);
        }
        Ok(Self { seq_ids, parents })
    }

    pub fn from_seq_ids(seq_ids: Vec<Vec<u32>>) -> Self {
        let parents = vec![vec![]; seq_ids.len()];
        Self { seq_ids, parents }
    }

    /// The id that sequence `id` of row `b` continues (0: none).
    fn parent_of(parents: &[Vec<u32>], b: usize, id: u32) -> u32 {
        parents.get(b).and_then(|p| p.get(id as usize)).copied().unwrap_or(0)
    }

    /// Position of each token within its sequence (0 for padding).
    /// A sequence that continues a parent starts at the parent's length.
    pub fn position_ids(&self) -> Vec<Vec<u32>> {
        self.seq_ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let mut end = vec![0u32; row.iter().max().map_or(0, |&m| m as usize + 1)];
                let mut out = Vec::with_capacity(row.len());
                let mut prev = 0u32;
                let mut pos = 0u32;
                for &s in row {
                    if s == 0 {
                        out.push(0);
                        continue;
                    }
                    if s != prev {
                        let p = Self::parent_of(&self.parents, b, s);
                        pos = if p == 0 { 0 } else { end[p as usize] };
                    }
                    out.push(pos);
                    pos += 1;
                    end[s as usize] = pos;
                    prev = s;
                }
                out
            })
            .collect()
    }

    /// True where token t's log-probability is defined: it and the token
    /// before it belong to the same (non-padding) sequence. (The first token
    /// of a continuing sequence is predicted from its parent's last token,
    /// which need not sit just before it: false here.)
    pub fn predicted_mask(&self) -> Vec<Vec<bool>> {
        self.seq_ids.iter().map(|row| (0..row.len()).map(|t| t > 0 && row[t] != 0 && row[t] == row[t - 1]).collect()).collect()
    }

    fn is_plain_causal(&self) -> bool {
        self.seq_ids.iter().all(|r| r.iter().all(|&s| s == 1)) && self.parents.iter().all(|p| p.iter().all(|&x| x == 0))
    }

    fn dims(&self) -> (usize, usize) {
        (self.seq_ids.len(), self.seq_ids.first().map(|r| r.len()).unwrap_or(0))
    }
}

/// KV cache for incremental decoding. Stores, per layer, keys and values
/// [B, n_kv, T_past, d] plus which past positions are real tokens.
pub struct KvCache {
    kv: Vec<LayerCache>,
    valid: Vec<Vec<bool>>,
    next_pos: Vec<u32>,
}

impl KvCache {
    /// Tokens seen so far (including padding).
    pub fn len(&self) -> usize {
        self.valid.first().map(|r| r.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keep only rows `rows` (e.g. drop finished sequences during generation).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if self.valid.is_empty() {
            return Ok(());
        }
        let dev = match self.kv.iter().filter_map(|l| l.buf.as_ref()).next() {
            Some(e) => e.k.device().clone(),
            None => return Ok(()),
        };
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
        for e in self.kv.iter_mut().filter_map(|l| l.buf.as_mut()) {
            *e = KvBuffer { k: e.k.index_select(&idx, 0)?, v: e.v.index_select(&idx, 0)?, len: e.len };
        }
        self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }

    /// Rows in the cache.
    pub fn rows(&self) -> usize {
        self.valid.len()
    }

    /// Adds the rows of `other` (prefilled on their own) after this cache's
    /// rows, so that they decode together from the next step on. The shorter
    /// side is padded on the left with positions no row attends to; every
    /// row keeps its own positions.
    pub fn append_rows(&mut self, mut other: KvCache) -> Result<()> {
        if self.valid.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.valid.is_empty() {
            return Ok(());
        }
        let (mine, theirs) = (self.len(), other.len());
        let len = mine.max(theirs);
        for (a, b) in self.kv.iter_mut().zip(other.kv.iter_mut()) {
            let (Some(x), Some(y)) = (a.buf.take(), b.buf.take()) else { bail!("KV cache: a layer has no keys") };
            a.buf = Some(KvBuffer::stack(x, len - mine, y, len - theirs)?);
        }
        for (rows, pad) in [(&mut self.valid, len - mine), (&mut other.valid, len - theirs)] {
            for r in rows.iter_mut() {
                r.splice(0..0, std::iter::repeat_n(false, pad));
            }
        }
        self.valid.append(&mut other.valid);
        self.next_pos.append(&mut other.next_pos);
        Ok(())
    }

    /// Drops the leading positions that no row attends to (left by rows
    /// that have left a batch that others keep joining).
    pub fn trim_front(&mut self) -> Result<()> {
        let drop = (0..self.len()).take_while(|&t| self.valid.iter().all(|r| !r[t])).count();
        if drop == 0 || drop == self.len() {
            return Ok(());
        }
        for e in self.kv.iter_mut().filter_map(|l| l.buf.as_mut()) {
            let keep = e.len - drop;
            *e = KvBuffer { k: e.k.narrow(2, drop, keep)?.contiguous()?, v: e.v.narrow(2, drop, keep)?.contiguous()?, len: keep };
        }
        for r in self.valid.iter_mut() {
            r.drain(..drop);
        }
        Ok(())
    }
}

/// The causal LM.
pub struct CausalLM {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Arc<Block>>,
    norm: RmsNorm,
    /// None when tied to the embeddings.
    lm_head: Option<Tensor>,
    /// The output head `[V, H]` stored transposed, read by
    /// [`CausalLM::logits`] instead of the tied or loaded one
    /// ([`CausalLM::for_decoding`]).
    decoding_head: Option<Tensor>,
    vars: Vec<(String, Var)>,
    /// Gradient sinks of the linear layers' weights, by variable name.
    sinks: HashMap<String, Arc<ops::GradSink>>,
    /// Set by [`CausalLM::set_gradient_checkpointing`].
    checkpointing: Option<checkpoint::Checkpointing>,
    lora: Option<LoraConfig>,
    runtime: Arc<LoraRuntime>,
    inv_freq: Vec<f64>,
    dtype: DType,
    device: Device,
}

/// Turns named weights into model parameters (Vars when trainable) and
/// LoRA adapters, recording the trainable variables in load order.
struct Builder<'a> {
    w: &'a mut WeightSet,
    opts: &'a LoadOptions,
    vars: Vec<(String, Var)>,
    sinks: HashMap<String, Arc<ops::GradSink>>,
    /// Draws LoRA A initialisations (seeded by the LoRA config).
    rng: rand::rngs::StdRng,
    runtime: Arc<LoraRuntime>,
}

impl Builder<'_> {
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.w.take(name, shape)?;
        self.finish(name, t)
    }
    fn finish(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        let t = t.to_device(&self.opts.device)?.to_dtype(self.opts.dtype).with_context(|| format!("converting tensor `{name}`"))?;
        if self.opts.trainable {
            let v = Var::from_tensor(&t)?;
            let t = v.as_tensor().clone();
            self.vars.push((name.to_string(), v));
            Ok(t)
        } else {
            Ok(t.detach())
        }
    }
    /// The linear layer `target` of the layer at `prefix`, with a LoRA
    /// adapter when the LoRA config targets it.
    fn linear(&mut self, prefix: &str, target: LoraTarget, out_f: usize, in_f: usize, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.{}.{}", target.parent(), target.hf_name());
        let weight = self.param(&format!("{name}.weight"), &[out_f, in_f])?;
        let bias = if bias { Some(self.param(&format!("{name}.bias"), &[out_f])?) } else { None };
        let opts = self.opts;
        let lora = match &opts.lora {
            Some(l) if l.targets.contains(&target) => {
                let ad = LoraAdapter::new(in_f, out_f, l, &mut self.rng, opts.dtype, &opts.device, self.runtime.clone())?;
                self.vars.push((format!("{name}.lora_A.weight"), ad.a.clone()));
                self.vars.push((format!("{name}.lora_B.weight"), ad.b.clone()));
                Some(ad)
            }
            _ => None,
        };
        let sink = self.sink(&format!("{name}.weight"));
        Ok(Linear { weight, bias, lora, sink })
    }
    /// A gradient sink for the weight `name`, when weights train in full.
    fn sink(&mut self, name: &str) -> Option<Arc<ops::GradSink>> {
        self.opts.trainable.then(|| {
            let sink = Arc::new(ops::GradSink::default());
            self.sinks.insert(name.to_string(), sink.clone());
            sink
        })
    }
}

fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect()
}

impl CausalLM {
    /// Load `config.json` and safetensors weights from a Hugging Face model directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let w = WeightSet::load_dir(dir, &opts.device)?;
        Self::from_weight_set(cfg, w, opts)
    }

    /// Build from tensors in Hugging Face naming (`model.embed_tokens.weight`,
    /// `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`).
    pub fn from_tensors(cfg: ModelConfig, tensors: HashMap<String, Tensor>, opts: &LoadOptions) -> Result<Self> {
        let w = WeightSet::from_map(tensors, "the tensor map");
        Self::from_weight_set(cfg, w, opts)
    }

    pub fn from_weight_set(cfg: ModelConfig, mut w: WeightSet, opts: &LoadOptions) -> Result<Self> {
        if opts.trainable && opts.lora.is_some() {
            bail!("choose either full fine-tuning (trainable) or LoRA, not both");
        }
        if let Some(l) = &opts.lora {
            l.validate()?;
        }
        let seed = opts.lora.as_ref().map(|l| l.seed).unwrap_or(0);
        let runtime = LoraRuntime::new(seed);
        let mut b = Builder {
            w: &mut w,
            opts,
            vars: vec![],
            sinks: HashMap::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            runtime: runtime.clone(),
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = b.param("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..cfg.num_hidden_layers).map(|i| Ok(Arc::new(Block::load(&mut b, i, &cfg)?))).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&mut b, "model.norm", h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else if b.w.contains("lm_head.weight") {
            Some(b.param("lm_head.weight", &[v, h])?)
        } else {
            bail!("tensor `lm_head.weight` is missing from {} and tie_word_embeddings is false", b.w.source());
        };
        let inv_freq = rope_inv_freq(&cfg);
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            decoding_head: None,
            vars: b.vars,
            sinks: b.sinks,
            checkpointing: None,
            lora: opts.lora.clone(),
            runtime,
            inv_freq,
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes a KV cache keeps per row and position: keys and values of every layer.
    pub fn kv_bytes_per_position(&self) -> usize {
        let c = &self.cfg;
        c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * self.dtype.size_in_bytes()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Parameters to optimise, in a stable order, with HF-style names
    /// (LoRA: `model.layers.N.self_attn.q_proj.lora_A.weight`, ...).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    /// The model as it is now, outside autograd: the weights are shared, not
    /// copied, but detached, so a forward pass records no graph and keeps
    /// no activations for a backward pass that will not come (LoRA adapters
    /// are merged into their weights). For gradient-free passes of a
    /// trainable model, e.g. the reference log-probs before the first update.
    pub fn frozen_view(&self) -> Result<CausalLM> {
        self.frozen(Adapters::Merged)
    }

    /// The base model under a LoRA policy, outside autograd: the adapters
    /// left out and every weight shared, not copied. It is the reference of
    /// a LoRA run at any step (as PEFT's disabled adapters are), without a
    /// merged weight per adapted layer or a second copy loaded. Without
    /// adapters it is [`Self::frozen_view`].
    pub fn base_view(&self) -> Result<CausalLM> {
        self.frozen(Adapters::Dropped)
    }

    /// The model to decode with (a server's): outside autograd, LoRA
    /// adapters merged, every weight stored transposed and a transposed copy
    /// of the output head. gemm reads a weight laid out `[in, out]` where it
    /// is; laid out `[out, in]`, as trained and saved, it packs a copy of the
    /// whole weight at every product, which at 64 decoding rows on two cores
    /// took a quarter of the time. To every op the weights are the same
    /// tensors; only their order in memory changes. Each weight is replaced
    /// as it is copied, so the model never needs twice its memory.
    pub fn for_decoding(self) -> Result<CausalLM> {
        let mut m = self.frozen(Adapters::Merged)?;
        // The copy now holds the only references to the shared weights.
        drop(self);
        for layer in &mut m.layers {
            let block = Arc::get_mut(layer).context("a frozen copy has blocks of its own")?;
            for lin in block.linears_mut() {
                lin.weight = lin.weight.t()?.contiguous()?.t()?;
            }
        }
        m.decoding_head = Some(m.lm_head_weight().t()?.contiguous()?.t()?);
        Ok(m)
    }

    fn frozen(&self, adapters: Adapters) -> Result<CausalLM> {
        Ok(CausalLM {
            cfg: self.cfg.clone(),
            embed: self.embed.detach(),
            layers: self.layers.iter().map(|l| Ok(Arc::new(l.frozen(adapters)?))).collect::<Result<_>>()?,
            norm: self.norm.frozen(),
            lm_head: self.lm_head.as_ref().map(Tensor::detach),
            decoding_head: None,
            vars: vec![],
            sinks: HashMap::new(),
            checkpointing: None,
            lora: None,
            runtime: self.runtime.clone(),
            inv_freq: self.inv_freq.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// The gradient of every trainable variable, in [`Self::trainable_vars`]
    /// order, after a backward pass: what candle's gradient store holds plus
    /// what the linear layers collected themselves ([`ops::GradSink`]; taken,
    /// so the next backward pass starts from nothing). None: no gradient
    /// reached the variable.
    pub fn gradients(&self, store: &candle_core::backprop::GradStore) -> Result<Vec<Option<Tensor>>> {
        self.vars
            .iter()
            .map(|(name, var)| {
                let mut grad = self.sinks.get(name).and_then(|s| s.take());
                if let Some(g) = self.checkpointing.as_ref().and_then(|c| c.sinks.get(name)).and_then(|s| s.take()) {
                    dpo2d_kernels::accumulate(&mut grad, g)?;
                }
                if let Some(g) = store.get(var.as_tensor()) {
                    dpo2d_kernels::accumulate(&mut grad, g.clone())?;
                }
                Ok(grad)
            })
            .collect()
    }

    /// Gradient checkpointing on or off: with it, [`Self::forward`] keeps
    /// each decoder block's input only and backward recomputes the block.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on.then(|| checkpoint::Checkpointing::new(self.layers.len(), &self.vars));
    }

    /// Switch LoRA dropout on (training) or off (evaluation).
    pub fn set_training(&self, on: bool) {
        self.runtime.set_training(on)
    }
    /// State of the LoRA dropout-mask stream; see [`LoraRuntime::rng_state`].
    pub fn dropout_rng_state(&self) -> u64 {
        self.runtime.rng_state()
    }
    pub fn set_dropout_rng_state(&self, state: u64) {
        self.runtime.set_rng_state(state)
    }

    /// The lm_head weight [V, H] (the embeddings when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Token embeddings [V, H].
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed
    }

    /// cos/sin [B, T, d/2] for position ids, computed as HF does (f32 math
    /// unless the model runs in f64).
    fn rope_cos_sin(&self, pos: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let b = pos.len();
        let t = pos.first().map(|r| r.len()).unwrap_or(0);
        let half = self.inv_freq.len();
        let mut c = Vec::with_capacity(b * t * half);
        let mut s = Vec::with_capacity(b * t * half);
        let f64_math = self.dtype == DType::F64;
        let inv32: Vec<f32> = self.inv_freq.iter().map(|&x| x as f32).collect();
        for row in pos {
            for &p in row {
                for (&f, &f32_) in self.inv_freq.iter().zip(&inv32).take(half) {
                    if f64_math {
                        let a = p as f64 * f;
                        c.push(a.cos());
                        s.push(a.sin());
                    } else {
                        let a = p as f32 * f32_;
                        c.push(a.cos() as f64);
                        s.push(a.sin() as f64);
                    }
                }
            }
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            let t = if f64_math {
                Tensor::from_vec(v, (b, t, half), &self.device)?
            } else {
                Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), (b, t, half), &self.device)?.to_dtype(self.dtype)?
            };
            Ok(t)
        };
        Ok((mk(c)?, mk(s)?))
    }

    /// Additive attention mask [B or 1, 1, 1, Tq, Tk] (0 allowed, -inf masked).
    /// Queries sit at absolute positions `offset..offset+Tq` of the key axis.
    /// `parents` as [`AttentionLayout::parents`] (empty: no sequence continues another).
    fn build_mask(&self, q_seq: &[Vec<u32>], k_seq: &[Vec<u32>], parents: &[Vec<u32>], offset: usize) -> Result<Tensor> {
        let b = q_seq.len();
        let tq = q_seq.first().map(|r| r.len()).unwrap_or(0);
        let tk = k_seq.first().map(|r| r.len()).unwrap_or(0);
        let neg = f32::NEG_INFINITY;
        let mut m = vec![0f32; b * tq * tk];
        for bi in 0..b {
            for i in 0..tq {
                let qi = q_seq[bi][i];
                let pi = AttentionLayout::parent_of(parents, bi, qi);
                let abs = offset + i;
                let row = &mut m[(bi * tq + i) * tk..(bi * tq + i + 1) * tk];
                for (j, cell) in row.iter_mut().enumerate() {
                    let kj = k_seq[bi][j];
                    let ok = if qi == 0 { j == abs } else { j <= abs && (kj == qi || (pi != 0 && kj == pi)) };
                    if !ok {
                        *cell = neg;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, 1, tq, tk), &self.device)?.to_dtype(self.dtype)?)
    }

    fn causal_mask(&self, tq: usize, tk: usize, offset: usize) -> Result<Tensor> {
        let mut m = vec![0f32; tq * tk];
        for i in 0..tq {
            for j in (offset + i + 1)..tk {
                m[i * tk + j] = f32::NEG_INFINITY;
            }
        }
        Ok(Tensor::from_vec(m, (1, 1, 1, tq, tk), &self.device)?.to_dtype(self.dtype)?)
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = input_ids.dims2().context("input_ids must be [batch, time]")?;
        if input_ids.dtype() != DType::U32 {
            bail!("input_ids must be u32, got {:?}", input_ids.dtype());
        }
        if b * t > 0 {
            let mx = input_ids.max_all()?.to_scalar::<u32>()? as usize;
            if mx >= self.cfg.vocab_size {
                bail!("token id {mx} is outside the vocabulary (size {})", self.cfg.vocab_size);
            }
        }
        Ok((b, t))
    }

    /// Full forward pass: hidden states [B, T, H] after the final RMSNorm.
    pub fn forward(&self, input_ids: &Tensor, layout: &AttentionLayout) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        if layout.dims() != (b, t) {
            bail!("attention layout is {:?} but input_ids is [{b}, {t}]", layout.dims());
        }
        let (cos, sin) = self.rope_cos_sin(&layout.position_ids())?;
        let mask = if layout.is_plain_causal() {
            self.causal_mask(t, t, 0)?
        } else {
            self.build_mask(&layout.seq_ids, &layout.seq_ids, &layout.parents, 0)?
        };
        let ctx = LayerCtx { cos, sin, mask };
        let mut x = self.embed.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = match &self.checkpointing {
                Some(c) => c.forward(i, layer, &x, &ctx, &self.runtime)?,
                None => layer.forward(&x, &ctx, None)?,
            };
        }
        self.norm.forward(&x)
    }

    /// Logits [B, T, V] (f32, or f64 for an f64 model) from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.decoding_head.as_ref().unwrap_or(self.lm_head_weight());
        let l = ops::linear(hidden, head, None)?;
        Ok(if self.dtype == DType::F64 { l } else { l.to_dtype(DType::F32)? })
    }

    /// Log-probabilities [B, T] of `labels` ([B, T] u32) at each position of
    /// `hidden` ([B, T, H]), without materialising [B*T, V] for backward.
    pub fn label_logprobs(&self, hidden: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        if labels.dims() != [b, t] {
            bail!("labels are {:?} but hidden states are [{b}, {t}, ..]", labels.dims());
        }
        let lp = ops::label_logprobs(&hidden.reshape((b * t, h))?, self.lm_head_weight(), &labels.flatten_all()?)?;
        Ok(lp.reshape((b, t))?)
    }

    /// Per-token log-probabilities [B, T] of `input_ids` under the model:
    /// entry t is log p(ids[t] | earlier tokens of its sequence); 0 where
    /// undefined (a sequence's first token, padding). See
    /// [`AttentionLayout::predicted_mask`].
    pub fn token_logprobs(&self, input_ids: &Tensor, layout: &AttentionLayout) -> Result<Tensor> {
        let hidden = self.forward(input_ids, layout)?;
        self.token_logprobs_from_hidden(&hidden, input_ids, layout)
    }

    /// As [`Self::token_logprobs`], from hidden states already computed.
    pub fn token_logprobs_from_hidden(&self, hidden: &Tensor, input_ids: &Tensor, layout: &AttentionLayout) -> Result<Tensor> {
        let (b, t, _) = hidden.dims3()?;
        if t < 2 {
            let dt = if self.dtype == DType::F64 { DType::F64 } else { DType::F32 };
            return Ok(Tensor::zeros((b, t), dt, &self.device)?);
        }
        let lp = self.label_logprobs(&hidden.narrow(1, 0, t - 1)?, &input_ids.narrow(1, 1, t - 1)?.contiguous()?)?;
        let lp = Tensor::cat(&[&lp.zeros_like()?.narrow(1, 0, 1)?, &lp], 1)?;
        let mask: Vec<f32> = layout.predicted_mask().iter().flatten().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?.to_dtype(lp.dtype())?;
        Ok((lp * mask)?)
    }

    /// An empty KV cache.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_for(0)
    }

    /// A cache that will hold about `positions` tokens per row: its buffers
    /// are made that long at once instead of doubling their way there.
    pub fn new_cache_for(&self, positions: usize) -> KvCache {
        KvCache { kv: vec![LayerCache { buf: None, reserve: positions }; self.layers.len()], valid: vec![], next_pos: vec![] }
    }

    /// Incremental forward: run `input_ids` [B, T] after the tokens already in
    /// `cache`. `attention_mask` (1 token / 0 padding) is needed only when
    /// the new tokens include padding (e.g. a left-padded prompt). Returns
    /// hidden states [B, T, H] after the final norm.
    pub fn forward_cached(&self, input_ids: &Tensor, attention_mask: Option<&[Vec<u32>]>, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        if cache.valid.is_empty() {
            cache.valid = vec![vec![]; b];
            cache.next_pos = vec![0; b];
        }
        if cache.valid.len() != b {
            bail!("KV cache holds {} rows but input has {b}", cache.valid.len());
        }
        let new_valid: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.len() != b || m.iter().any(|r| r.len() != t) {
                    bail!("attention mask must be [{b}, {t}]");
                }
                m.iter().map(|r| r.iter().map(|&x| x != 0).collect()).collect()
            }
            None => vec![vec![true; t]; b],
        };
        let past = cache.len();
        let mut pos = vec![vec![0u32; t]; b];
        for bi in 0..b {
            for i in 0..t {
                if new_valid[bi][i] {
                    pos[bi][i] = cache.next_pos[bi];
                    cache.next_pos[bi] += 1;
                }
            }
            cache.valid[bi].extend_from_slice(&new_valid[bi]);
        }
        let (cos, sin) = self.rope_cos_sin(&pos)?;
        let q_seq: Vec<Vec<u32>> = new_valid.iter().map(|r| r.iter().map(|&v| v as u32).collect()).collect();
        let k_seq: Vec<Vec<u32>> = cache.valid.iter().map(|r| r.iter().map(|&v| v as u32).collect()).collect();
        let all_valid = k_seq.iter().all(|r| r.iter().all(|&v| v == 1));
        let mask = if all_valid { self.causal_mask(t, past + t, past)? } else { self.build_mask(&q_seq, &k_seq, &[], past)? };
        let ctx = LayerCtx { cos, sin, mask };
        let mut x = self.embed.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        for (layer, entry) in self.layers.iter().zip(cache.kv.iter_mut()) {
            x = layer.forward(&x, &ctx, Some(entry))?;
        }
        self.norm.forward(&x)
    }

    /// Current weights in HF naming (the base weights; LoRA adapters not
    /// merged). `lm_head.weight` is left out when tied.
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.collect_tensors(false)
    }

    /// Weights with every LoRA adapter merged in (`W + scale * B A`).
    pub fn merged_hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.collect_tensors(true)
    }

    fn collect_tensors(&self, merge: bool) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.detach())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let lins = [
                (LoraTarget::Q, &l.attn.q),
                (LoraTarget::K, &l.attn.k),
                (LoraTarget::V, &l.attn.v),
                (LoraTarget::O, &l.attn.o),
                (LoraTarget::Gate, &l.mlp.gate),
                (LoraTarget::Up, &l.mlp.up),
                (LoraTarget::Down, &l.mlp.down),
            ];
            for (tg, lin) in lins {
                let name = format!("{p}.{}.{}", tg.parent(), tg.hf_name());
                let w = match (&lin.lora, merge) {
                    (Some(ad), true) => (&lin.weight + ad.merged_delta()?.to_dtype(lin.weight.dtype())?)?,
                    _ => lin.weight.clone(),
                };
                out.push((format!("{name}.weight"), w.detach()));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{name}.bias"), bias.detach()));
                }
            }
            out.push((format!("{p}.input_layernorm.weight"), l.input_norm.weight.detach()));
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_norm.weight.detach()));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.detach()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.detach()));
        }
        Ok(out)
    }

    /// LoRA adapter tensors in HF naming (`...q_proj.lora_A.weight`), without the PEFT prefix.
    pub fn lora_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars.iter().filter(|(n, _)| n.contains(".lora_")).map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }

    /// Replace LoRA adapter weights by name (as returned by [`Self::lora_tensors`]),
    /// e.g. to resume from a saved adapter. Every adapter must be given.
    pub fn set_lora_tensors(&self, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        for (name, var) in &self.vars {
            if !name.contains(".lora_") {
                continue;
            }
            let t = tensors.get(name).with_context(|| format!("tensor `{name}` is missing from {source}"))?;
            if t.dims() != var.dims() {
                bail!("tensor `{name}` in {source} has shape {:?}, expected {:?}", t.dims(), var.dims());
            }
            var.set(&t.to_device(&self.device)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_decoding_copy_stores_every_weight_transposed() {
        let dir = tempfile::tempdir().unwrap();
        let gg = dir.path().join("tiny.gguf");
        crate::source::tests::write_tiny_model_gguf(&gg);
        let plain = crate::source::load(&gg, &LoadOptions::default()).unwrap().model;
        let mut fast = crate::source::load(&gg, &LoadOptions::default()).unwrap().model.for_decoding().unwrap();
        for block in &mut fast.layers {
            for lin in Arc::get_mut(block).unwrap().linears_mut() {
                assert!(!lin.weight.is_contiguous() && lin.weight.t().unwrap().is_contiguous());
            }
        }
        let head = fast.decoding_head.as_ref().unwrap();
        assert_eq!(head.dims(), [fast.cfg.vocab_size, fast.cfg.hidden_size]);
        assert!(!head.is_contiguous() && head.t().unwrap().is_contiguous());
        assert!(plain.decoding_head.is_none());
    }

    #[test]
    fn kv_buffer_views_multiply_without_a_copy() {
        let dev = Device::Cpu;
        let mut entry = LayerCache::default();
        let step = |n: usize, seed: f32| {
            Tensor::arange(0f32, (2 * 3 * n * 4) as f32, &dev).unwrap().affine(0.01, seed as f64).unwrap().reshape((2, 3, n, 4)).unwrap()
        };
        let (mut all_k, mut all_v) = (step(50, 0.0), step(50, 1.0));
        KvBuffer::append(&mut entry, &all_k, &all_v).unwrap();
        for i in 0..20 {
            let (k, v) = (step(1, i as f32), step(1, -(i as f32)));
            all_k = Tensor::cat(&[&all_k, &k], 2).unwrap();
            all_v = Tensor::cat(&[&all_v, &v], 2).unwrap();
            let (bk, bv) = KvBuffer::append(&mut entry, &k, &v).unwrap();
            assert_eq!(bk.dims(), all_k.dims());
            let q = step(2, 0.5);
            // The CPU backend takes the buffer's strides as they are.
            let got = q.matmul(&bk.t().unwrap()).unwrap();
            let want = q.matmul(&all_k.t().unwrap()).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0);
            let probs = Tensor::ones((2, 3, 2, bv.dim(2).unwrap()), DType::F32, &dev).unwrap();
            let diff = (probs.matmul(&bv).unwrap() - probs.matmul(&all_v).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0);
        }
        assert_eq!(entry.buf.as_ref().unwrap().k.dims()[2], 128, "64 first, then doubled once");
        let mut reserved = LayerCache { buf: None, reserve: 300 };
        KvBuffer::append(&mut reserved, &step(50, 0.0), &step(50, 1.0)).unwrap();
        assert_eq!(reserved.buf.as_ref().unwrap().k.dims()[2], 300, "made as long as asked at once");
    }
    use crate::test_support::{det, max_abs_diff as maxdiff};

    /// Write a tiny random model (2 layers, hidden 16, 4 heads, 2 kv heads,
    /// vocab 50) as config.json + model.safetensors.
    pub fn write_tiny(dir: &Path, qwen: bool, tied: bool, dtype: DType) -> ModelConfig {
        crate::test_support::TinyModel { qwen, tied, dtype, ..Default::default() }.write(dir)
    }

    pub fn opts64() -> LoadOptions {
        LoadOptions { dtype: DType::F64, ..LoadOptions::default() }
    }

    pub fn ids(rows: &[&[u32]]) -> Tensor {
        Tensor::new(rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), &Device::Cpu).unwrap()
    }

    #[test]
    fn packed_equals_separate_and_padded_equals_unpadded() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), true, false, DType::F32);
        let m = CausalLM::load(dir.path(), &opts64()).unwrap();
        let a: &[u32] = &[3, 7, 9, 11, 4];
        let b: &[u32] = &[5, 8, 2];
        let la = m.token_logprobs(&ids(&[a]), &AttentionLayout::causal(1, 5)).unwrap().to_vec2::<f64>().unwrap();
        let lb = m.token_logprobs(&ids(&[b]), &AttentionLayout::causal(1, 3)).unwrap().to_vec2::<f64>().unwrap();
        // Packed: a then b then one pad in a row of 9.
        let row: Vec<u32> = a.iter().chain(b.iter()).copied().chain([0]).collect();
        let lay = AttentionLayout::packed(&[vec![5, 3]], 9).unwrap();
        let lp = m.token_logprobs(&ids(&[&row]), &lay).unwrap().to_vec2::<f64>().unwrap();
        for t in 0..5 {
            assert!((lp[0][t] - la[0][t]).abs() < 1e-10, "a {t}");
        }
        for t in 0..3 {
            assert!((lp[0][5 + t] - lb[0][t]).abs() < 1e-10, "b {t}");
        }
        assert_eq!(lp[0][5], 0.0);
        assert_eq!(lp[0][8], 0.0);
        assert!(la[0][1] < 0.0);
        // Right- and left-padded batch equals unpadded rows.
        let batch = ids(&[a, &[5, 8, 2, 0, 0], &[0, 0, 5, 8, 2]]);
        let lay = AttentionLayout::from_attention_mask(&[vec![1; 5], vec![1, 1, 1, 0, 0], vec![0, 0, 1, 1, 1]]);
        let lp = m.token_logprobs(&batch, &lay).unwrap().to_vec2::<f64>().unwrap();
        for t in 0..5 {
            assert!((lp[0][t] - la[0][t]).abs() < 1e-10);
        }
        for t in 0..3 {
            assert!((lp[1][t] - lb[0][t]).abs() < 1e-10);
            assert!((lp[2][2 + t] - lb[0][t]).abs() < 1e-10);
        }
        // Hidden states agree too (the reward head reads them).
        let h1 = m.forward(&ids(&[b]), &AttentionLayout::causal(1, 3)).unwrap();
        let h2 = m.forward(&batch, &lay).unwrap().narrow(0, 2, 1).unwrap().narrow(1, 2, 3).unwrap();
        assert!(maxdiff(&h1, &h2) < 1e-10);
    }

    #[test]
    fn shared_prompt_equals_separate_sequences() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), true, false, DType::F32);
        let m = CausalLM::load(dir.path(), &opts64()).unwrap();
        let prompt: &[u32] = &[3, 7, 9];
        let (c, r): (&[u32], &[u32]) = (&[11, 4, 6, 2], &[5, 8]);
        let alone = |resp: &[u32]| {
            let seq: Vec<u32> = prompt.iter().chain(resp).copied().collect();
            m.forward(&ids(&[&seq]), &AttentionLayout::causal(1, seq.len())).unwrap()
        };
        let (hc, hr) = (alone(c), alone(r));
        // Row: [prompt | chosen | rejected | pad] next to a plain sequence [2, 2].
        let row: Vec<u32> = prompt.iter().chain(c).chain(r).copied().chain([0]).collect();
        let lay = AttentionLayout::packed_shared(&[vec![(3, vec![4, 2])], vec![(2, vec![])]], 10).unwrap();
        assert_eq!(lay.position_ids()[0], vec![0, 1, 2, 3, 4, 5, 6, 3, 4, 0]);
        let h = m.forward(&ids(&[&row, &[2, 2, 0, 0, 0, 0, 0, 0, 0, 0]]), &lay).unwrap().narrow(0, 0, 1).unwrap();
        assert!(maxdiff(&h.narrow(1, 0, 7).unwrap(), &hc) < 1e-10, "prompt + chosen");
        assert!(maxdiff(&h.narrow(1, 7, 2).unwrap(), &hr.narrow(1, 3, 2).unwrap()) < 1e-10, "rejected");
        assert!(AttentionLayout::packed_shared(&[vec![(0, vec![2])]], 4).is_err());
        assert!(AttentionLayout::packed_shared(&[vec![(3, vec![2])]], 4).is_err());
    }

    #[test]
    fn kv_cache_matches_full_forward() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), false, true, DType::F32);
        let m = CausalLM::load(dir.path(), &opts64()).unwrap();
        let full_a: &[u32] = &[3, 7, 9, 11, 4, 6];
        let full_b: &[u32] = &[5, 8, 2, 13, 1];
        let ha = m.forward(&ids(&[full_a]), &AttentionLayout::causal(1, 6)).unwrap();
        let hb = m.forward(&ids(&[full_b]), &AttentionLayout::causal(1, 5)).unwrap();
        // Prompts: a[..4], b[..3] left-padded to 4; then two decode steps.
        let mut cache = m.new_cache();
        let prompt = ids(&[&full_a[..4], &[0, 5, 8, 2]]);
        let h = m.forward_cached(&prompt, Some(&[vec![1, 1, 1, 1], vec![0, 1, 1, 1]]), &mut cache).unwrap();
        assert!(maxdiff(&h.narrow(0, 0, 1).unwrap(), &ha.narrow(1, 0, 4).unwrap()) < 1e-10);
        assert!(maxdiff(&h.narrow(0, 1, 1).unwrap().narrow(1, 1, 3).unwrap(), &hb.narrow(1, 0, 3).unwrap()) < 1e-10);
        for step in 0..2 {
            let next = ids(&[&[full_a[4 + step]], &[full_b[3 + step]]]);
            let h = m.forward_cached(&next, None, &mut cache).unwrap();
            assert!(maxdiff(&h.narrow(0, 0, 1).unwrap(), &ha.narrow(1, 4 + step, 1).unwrap()) < 1e-10);
            assert!(maxdiff(&h.narrow(0, 1, 1).unwrap(), &hb.narrow(1, 3 + step, 1).unwrap()) < 1e-10);
        }
        assert_eq!(cache.len(), 6);
        // Logits are consistent with label_logprobs.
        let logits = m.logits(&ha).unwrap();
        let lsm = ops::log_softmax_plain(&logits).unwrap();
        let lp = m.token_logprobs_from_hidden(&ha, &ids(&[full_a]), &AttentionLayout::causal(1, 6)).unwrap();
        let want = lsm.get(0).unwrap().get(2).unwrap().get(full_a[3] as usize).unwrap().to_scalar::<f64>().unwrap();
        assert!((lp.to_vec2::<f64>().unwrap()[0][3] - want).abs() < 1e-10);
    }

    /// Attention (causal, padded and packed masks) and the MLP, checked by
    /// finite differences with respect to their input.
    #[test]
    fn attention_and_mlp_gradients() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), true, true, DType::F64);
        let m = CausalLM::load(dir.path(), &opts64()).unwrap();
        let layouts = [
            AttentionLayout::causal(2, 5),
            AttentionLayout::from_attention_mask(&[vec![1, 1, 1, 0, 0], vec![0, 1, 1, 1, 1]]),
            AttentionLayout::packed(&[vec![2, 3], vec![1, 2, 1]], 5).unwrap(),
        ];
        let x = det(&[2, 5, 16], 42, DType::F64);
        for lay in layouts {
            let (cos, sin) = m.rope_cos_sin(&lay.position_ids()).unwrap();
            let mask = m.build_mask(&lay.seq_ids, &lay.seq_ids, &[], 0).unwrap();
            let ctx = LayerCtx { cos, sin, mask };
            let f = |t: &[Tensor]| -> candle_core::Result<Tensor> {
                m.layers[0].attn.forward(&t[0], &ctx, None).map_err(|e| candle_core::Error::Msg(e.to_string()))
            };
            crate::test_support::grad_check(std::slice::from_ref(&x), &f, 1e-6);
        }
        let mlp = |t: &[Tensor]| -> candle_core::Result<Tensor> {
            m.layers[1].mlp.forward(&t[0]).map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        crate::test_support::grad_check(&[x], &mlp, 1e-6);
    }

    /// With every weight training in full and no biases, each block is one
    /// graph node ([`kernels::block`]); it gives the same log-probs and every
    /// variable the same gradient as the composed ops.
    #[test]
    fn fused_blocks_match_composed_ops() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), false, false, DType::F64);
        let opts = LoadOptions { trainable: true, ..opts64() };
        let batch = ids(&[&[3, 7, 9, 11, 4, 6, 2], &[5, 8, 2, 13, 1, 0, 0]]);
        let lay = AttentionLayout::packed_shared(&[vec![(2, vec![3, 2])], vec![(3, vec![2])]], 7).unwrap();
        let run = |m: &CausalLM| {
            let lp = m.token_logprobs(&batch, &lay).unwrap();
            let proj = det(lp.dims(), 5, DType::F64);
            let store = (&lp * proj).unwrap().sum_all().unwrap().backward().unwrap();
            (lp, m.gradients(&store).unwrap())
        };
        let fused = CausalLM::load(dir.path(), &opts).unwrap();
        assert!(fused.layers.iter().all(|b| b.fused_weights().is_some()));
        let mut composed = CausalLM::load(dir.path(), &opts).unwrap();
        for block in composed.layers.iter_mut() {
            Arc::get_mut(block).expect("one owner").input_norm.sink = None;
        }
        assert!(composed.layers.iter().all(|b| b.fused_weights().is_none()));
        let ((lp_a, ga), (lp_b, gb)) = (run(&fused), run(&composed));
        assert!(maxdiff(&lp_a, &lp_b) < 1e-12);
        for ((name, _), (a, b)) in fused.trainable_vars().iter().zip(ga.iter().zip(&gb)) {
            let (a, b) = (a.as_ref().expect(name), b.as_ref().expect(name));
            assert!(maxdiff(a, b) < 1e-11, "{name}: {}", maxdiff(a, b));
        }
    }

    /// In a LoRA run on attention only, the MLP's weights are frozen and it
    /// is one graph node: same output and input gradient as the composed
    /// ops. With an adapter on one of its projections it stays composed.
    #[test]
    fn frozen_mlp_is_one_node_with_the_composed_gradient() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), true, false, DType::F64);
        let lora = |targets: Vec<LoraTarget>| LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets, seed: 3 };
        let m = CausalLM::load(dir.path(), &LoadOptions { lora: Some(lora(vec![LoraTarget::Q, LoraTarget::V])), ..opts64() }).unwrap();
        let mlp = &m.layers[0].mlp;
        assert!(mlp.fused_weights().is_some_and(|w| w.gate.1.is_none() && w.up.1.is_none() && w.down.1.is_none()));
        let h = mlp.gate.weight.dim(1).unwrap();
        let x = candle_core::Var::from_tensor(&det(&[2, 5, h], 4, DType::F64)).unwrap();
        let proj = det(&[2, 5, h], 6, DType::F64);
        let run = |y: Tensor| {
            let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let (y_fused, g_fused) = run(mlp.forward(&x).unwrap());
        let (y_plain, g_plain) = run(mlp.forward_composed(&x).unwrap());
        assert!(maxdiff(&y_fused, &y_plain) < 1e-12);
        assert!(maxdiff(&g_fused, &g_plain) < 1e-12);
        let up_adapted = CausalLM::load(dir.path(), &LoadOptions { lora: Some(lora(vec![LoraTarget::Up])), ..opts64() }).unwrap();
        assert!(up_adapted.layers[0].mlp.fused_weights().is_none());
    }

    /// Finite-difference check of d(sum of token log-probs)/d(weights) for the whole tiny model.
    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_tiny(dir.path(), true, true, DType::F64);
        let opts = LoadOptions { trainable: true, ..opts64() };
        let m = CausalLM::load(dir.path(), &opts).unwrap();
        let batch = ids(&[&[3, 7, 9, 11, 4, 6], &[5, 8, 2, 13, 0, 0]]);
        let lay = AttentionLayout::packed(&[vec![4, 2], vec![4]], 6).unwrap();
        let loss_of = |m: &CausalLM| m.token_logprobs(&batch, &lay).unwrap().sum_all().unwrap();
        let grads = loss_of(&m).backward().unwrap();
        let vars = m.trainable_vars();
        let all = m.gradients(&grads).unwrap();
        // The linear layers' weights collect their own gradients.
        assert!(grads.get(vars.iter().find(|(n, _)| n.ends_with("q_proj.weight")).unwrap().1.as_tensor()).is_none());
        assert_eq!(vars.len(), 1 + 2 * (7 + 3 + 2) + 1); // embed, per layer 7 W + 3 bias + 2 norms, final norm
        let eps = 1e-5;
        for (name, var) in vars.iter().filter(|(n, _)| {
            n.contains("embed")
                || n.contains("layers.0.self_attn.q_proj")
                || n.contains("layers.1.mlp.down")
                || n.contains("layers.1.input_layernorm")
                || n.contains("k_proj.bias")
                || n == "model.norm.weight"
        }) {
            let g = all[vars.iter().position(|(n, _)| n == name).unwrap()].clone().unwrap_or_else(|| panic!("no grad for {name}"));
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for j in (0..base.len()).step_by((base.len() / 6).max(1)) {
                let f = |d: f64| {
                    let mut b = base.clone();
                    b[j] += d;
                    var.set(&Tensor::from_vec(b, var.dims(), &Device::Cpu).unwrap()).unwrap();
                    let v = loss_of(&m).to_scalar::<f64>().unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
                    v
                };
                let fd = (f(eps) - f(-eps)) / (2.0 * eps);
                assert!((fd - g[j]).abs() < 1e-6 * (1.0 + fd.abs()), "{name}[{j}]: autograd {} vs fd {fd}", g[j]);
            }
        }
        let _ = cfg;
    }

    #[test]
    fn lora_zero_b_equals_base_and_merged_equals_unmerged() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_tiny(dir.path(), false, false, DType::F32);
        let base = CausalLM::load(dir.path(), &opts64()).unwrap();
        let lcfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, targets: LoraTarget::ALL.to_vec(), seed: 7 };
        let lm = CausalLM::load(dir.path(), &LoadOptions { lora: Some(lcfg), ..opts64() }).unwrap();
        let batch = ids(&[&[3, 7, 9, 11, 4, 6]]);
        let lay = AttentionLayout::causal(1, 6);
        let h0 = base.forward(&batch, &lay).unwrap();
        assert!(maxdiff(&h0, &lm.forward(&batch, &lay).unwrap()) < 1e-12);
        assert_eq!(lm.trainable_vars().len(), 2 * 7 * 2);
        // Give B random values, then compare merged weights with the adapter path.
        for (i, (n, v)) in lm.trainable_vars().iter().enumerate() {
            if n.contains("lora_B") {
                v.set(&(det(v.dims(), 500 + i as u64, DType::F64) * 0.3).unwrap()).unwrap();
            }
        }
        let h1 = lm.forward(&batch, &lay).unwrap();
        assert!(maxdiff(&h0, &h1) > 1e-3);
        // A frozen view computes the same without recording a graph.
        let view = lm.frozen_view().unwrap();
        let hv = view.forward(&batch, &lay).unwrap();
        assert!(maxdiff(&h1, &hv) < 1e-10);
        assert!(h1.track_op() && !hv.track_op() && view.trainable_vars().is_empty());
        // The base view leaves the (now nonzero) adapters out: the base model, exactly.
        let bv = lm.base_view().unwrap();
        let hb = bv.forward(&batch, &lay).unwrap();
        assert_eq!(maxdiff(&h0, &hb), 0.0);
        assert!(!hb.track_op() && bv.trainable_vars().is_empty());
        let merged: HashMap<String, Tensor> = lm.merged_hf_tensors().unwrap().into_iter().collect();
        let mm = CausalLM::from_tensors(cfg, merged, &opts64()).unwrap();
        assert!(maxdiff(&h1, &mm.forward(&batch, &lay).unwrap()) < 1e-10);
        // Dropout is active only in training mode.
        lm.set_training(true);
        let h2 = lm.forward(&batch, &lay).unwrap();
        assert!(maxdiff(&h1, &h2) > 1e-6);
        lm.set_training(false);
        assert!(maxdiff(&h1, &lm.forward(&batch, &lay).unwrap()) < 1e-12);
        // Gradients reach the adapters only.
        let loss = lm.token_logprobs(&batch, &lay).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        for (n, v) in lm.trainable_vars() {
            assert!(g.get(v.as_tensor()).is_some(), "no grad for {n}");
        }
    }

    #[test]
    fn load_errors_name_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), false, true, DType::F32);
        // Wrong shape.
        let mut m = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
        m.insert("model.layers.1.mlp.up_proj.weight".into(), Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&m, dir.path().join("model.safetensors")).unwrap();
        let e = format!("{:#}", CausalLM::load(dir.path(), &LoadOptions::default()).err().unwrap());
        assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("model.safetensors") && e.contains("[24, 16]"), "{e}");
        // Missing tensor.
        m.remove("model.layers.1.mlp.up_proj.weight");
        candle_core::safetensors::save(&m, dir.path().join("model.safetensors")).unwrap();
        let e = format!("{:#}", CausalLM::load(dir.path(), &LoadOptions::default()).err().unwrap());
        assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"), "{e}");
        // Missing config.
        std::fs::remove_file(dir.path().join("config.json")).unwrap();
        let e = format!("{:#}", CausalLM::load(dir.path(), &LoadOptions::default()).err().unwrap());
        assert!(e.contains("config.json"), "{e}");
        // Out-of-vocabulary token.
        let d2 = tempfile::tempdir().unwrap();
        write_tiny(d2.path(), false, true, DType::F32);
        let m = CausalLM::load(d2.path(), &LoadOptions::default()).unwrap();
        let e = m.forward(&ids(&[&[1, 50]]), &AttentionLayout::causal(1, 2)).unwrap_err().to_string();
        assert!(e.contains("50") && e.contains("vocabulary"), "{e}");
    }

    /// Parity with Hugging Face transformers: set DPO2D_HF_PARITY_DIR to a
    /// model directory that holds `expected.json` ({"ids": [...], "logits":
    /// [[...]]}) and `expected_pad.json` (the same with a "mask" of 0/1 per
    /// position) written by transformers for the same weights, then run
    /// `cargo test -p dpo2d-model hf_parity -- --ignored`. A missing file
    /// fails the test: it never passes without comparing.
    #[test]
    #[ignore]
    fn hf_parity() {
        let dir = std::path::PathBuf::from(std::env::var("DPO2D_HF_PARITY_DIR").expect("set DPO2D_HF_PARITY_DIR"));
        for (file, padded) in [("expected.json", false), ("expected_pad.json", true)] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| {
                panic!("{}: {e} (the parity fixtures are written by transformers; see the doc above)", dir.join(file).display())
            });
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let ids: Vec<u32> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let want: Vec<Vec<f64>> = serde_json::from_value(v["logits"].clone()).unwrap();
            assert!(!ids.is_empty() && want.len() == ids.len(), "{file}: {} ids, {} rows of logits", ids.len(), want.len());
            let m = CausalLM::load(&dir, &LoadOptions::default()).unwrap();
            let t = ids.len();
            let lay = if padded {
                let mask: Vec<u32> = v["mask"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                AttentionLayout::from_attention_mask(&[mask])
            } else {
                AttentionLayout::causal(1, t)
            };
            let h = m.forward(&Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap(), &lay).unwrap();
            let got = m.logits(&h).unwrap().get(0).unwrap().to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            let mut worst: f64 = 0.0;
            let mut compared = 0;
            for i in 0..t {
                if padded && lay.seq_ids[0][i] == 0 {
                    continue;
                }
                assert_eq!(want[i].len(), got[i].len(), "{file}: position {i}: logits over another vocabulary");
                for j in 0..want[i].len() {
                    let d = (got[i][j] - want[i][j]).abs();
                    // A NaN is the worst difference, not one that max() skips.
                    worst = if d.is_nan() { f64::INFINITY } else { worst.max(d) };
                }
                compared += 1;
            }
            assert!(compared > 0, "{file}: no position to compare");
            eprintln!("{file}: max |logit diff| = {worst} over {compared} positions");
            if let Ok(out) = std::env::var("DPO2D_HF_PARITY_SAVE") {
                crate::save::save_full(&m, Path::new(&out), Some(DType::BF16)).unwrap();
            }
            assert!(worst < 1e-3, "{file}: max |logit diff| {worst}");
        }
    }

    /// Timing on a SmolLM2-135M-shaped model with random weights:
    /// `cargo test --release -p dpo2d-model bench_smollm_shape -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_smollm_shape() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
          "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
          "rope_theta":100000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;
        let cfg = ModelConfig::from_json_str(text, "bench").unwrap();
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let mut add = |n: String, shape: &[usize], norm: bool| {
            let t = if norm {
                Tensor::ones(shape, DType::F32, &dev).unwrap()
            } else {
                (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * 0.02).unwrap()
            };
            m.insert(n, t);
        };
        add("model.embed_tokens.weight".into(), &[49152, 576], false);
        add("model.norm.weight".into(), &[576], true);
        for i in 0..30 {
            let p = format!("model.layers.{i}");
            for (n, o, inp) in [("q_proj", 576, 576), ("k_proj", 192, 576), ("v_proj", 192, 576), ("o_proj", 576, 576)] {
                add(format!("{p}.self_attn.{n}.weight"), &[o, inp], false);
            }
            for (n, o, inp) in [("gate_proj", 1536, 576), ("up_proj", 1536, 576), ("down_proj", 576, 1536)] {
                add(format!("{p}.mlp.{n}.weight"), &[o, inp], false);
            }
            add(format!("{p}.input_layernorm.weight"), &[576], true);
            add(format!("{p}.post_attention_layernorm.weight"), &[576], true);
        }
        let (b, t) = (4usize, 256usize);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 49152) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &dev).unwrap();
        let lay = AttentionLayout::packed(&vec![vec![100, 156]; b], t).unwrap();
        let time = |label: &str, f: &dyn Fn()| {
            f();
            let s = std::time::Instant::now();
            f();
            let dt = s.elapsed().as_secs_f64();
            eprintln!("{label}: {dt:.3}s, {:.0} tokens/s", (b * t) as f64 / dt);
        };
        let frozen = CausalLM::from_tensors(cfg.clone(), m.clone(), &LoadOptions::default()).unwrap();
        let hid = frozen.forward(&ids, &lay).unwrap();
        time("  lm_head label log-probs only (frozen)", &|| {
            frozen.token_logprobs_from_hidden(&hid, &ids, &lay).unwrap();
        });
        let x = Tensor::randn(0f32, 1.0, (b * t, 576), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (1536, 576), &dev).unwrap();
        time("  one [1024x576]x[576x1536] matmul", &|| {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        time("forward (frozen, logprobs)", &|| {
            frozen.token_logprobs(&ids, &lay).unwrap();
        });
        let full = CausalLM::from_tensors(cfg.clone(), m.clone(), &LoadOptions { trainable: true, ..LoadOptions::default() }).unwrap();
        time("forward+backward (full fine-tuning)", &|| {
            full.token_logprobs(&ids, &lay).unwrap().sum_all().unwrap().backward().unwrap();
        });
        let s = std::time::Instant::now();
        let loss = full.token_logprobs(&ids, &lay).unwrap().sum_all().unwrap();
        let f = s.elapsed().as_secs_f64();
        loss.backward().unwrap();
        eprintln!("  (full: forward {f:.3}s, backward {:.3}s)", s.elapsed().as_secs_f64() - f);
        let lcfg = LoraConfig { r: 16, alpha: 32.0, dropout: 0.05, targets: LoraTarget::ALL.to_vec(), seed: 1 };
        let lora = CausalLM::from_tensors(cfg, m, &LoadOptions { lora: Some(lcfg), ..LoadOptions::default() }).unwrap();
        lora.set_training(true);
        time("forward+backward (LoRA r=16, all linear)", &|| {
            lora.token_logprobs(&ids, &lay).unwrap().sum_all().unwrap().backward().unwrap();
        });
    }
}
