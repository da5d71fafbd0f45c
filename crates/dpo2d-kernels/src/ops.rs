//! Differentiable building blocks with fast forward kernels and explicit backward.
//!
//! In f32 and f64 on the CPU, each op is one of the fused, multi-threaded
//! kernels of [`crate`]. For half types on the CPU, candle's fast
//! kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`,
//! `rotary_emb::rope`, which have no backward pass) run on detached inputs
//! and the result joins the autograd graph through a custom op whose `bwd`
//! is written with ordinary tensor ops. Every op has a `*_plain` twin built
//! only from differentiable primitives; tests check the two agree (values
//! and gradients) and check gradients by finite differences. On non-CPU
//! devices the plain versions are used.
//!
//! Also here: the fused label log-probability op, which never keeps a
//! `[tokens x vocab]` tensor alive for backward, and a linear layer with a
//! frozen weight that skips the (unused) weight gradient.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

pub type BwdFn = dyn Fn(&[&Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// A custom op whose forward result was computed beforehand (on detached
/// inputs, with fast kernels); the forward hands that result over (on the
/// CPU or the GPU, wherever it was computed), and `bwd` calls the closure
/// with the op's inputs and the incoming gradient. The result is taken out
/// of the op as it is handed over, so the graph does not hold it twice (on
/// the CPU, kept in the op, it was a fifth of a LoRA run's activations).
struct Precomputed {
    name: &'static str,
    out: std::sync::Mutex<Option<Tensor>>,
    bwd: Box<BwdFn>,
}

impl Precomputed {
    fn new(name: &'static str, out: Tensor, bwd: Box<BwdFn>) -> Self {
        Precomputed { name, out: std::sync::Mutex::new(Some(out)), bwd }
    }

    /// The precomputed result, taken out of the op.
    fn result(&self) -> Result<Tensor> {
        match self.out.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(t) => t.contiguous(),
            None => bail!("internal: {} ran its forward twice", self.name),
        }
    }

    fn cpu_out(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.result()?;
        let (st, layout) = t.storage_and_layout();
        let (o1, o2) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("internal: precomputed tensor not contiguous".into()))?;
        let cs = match &*st {
            Storage::Cpu(cs) => match cs {
                CpuStorage::F32(v) => CpuStorage::F32(v[o1..o2].to_vec()),
                CpuStorage::F64(v) => CpuStorage::F64(v[o1..o2].to_vec()),
                CpuStorage::BF16(v) => CpuStorage::BF16(v[o1..o2].to_vec()),
                CpuStorage::F16(v) => CpuStorage::F16(v[o1..o2].to_vec()),
                _ => bail!("internal: unsupported dtype in precomputed op"),
            },
            _ => bail!("internal: {} computed on another device than its inputs", self.name),
        };
        Ok((cs, t.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_out(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let mut t = self.result()?;
        if t.layout().start_offset() != 0 {
            // A view into a larger buffer: the storage handed over must start at the tensor.
            t = t.affine(1.0, 0.0)?;
        }
        let (st, layout) = t.storage_and_layout();
        match &*st {
            Storage::Cuda(cs) => Ok((cs.try_clone(layout)?, t.shape().clone())),
            _ => bail!("internal: {} computed on another device than its inputs", self.name),
        }
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }
    fn bwd(&self, a: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok((self.bwd)(&[a], g)?.into_iter().next().flatten())
    }
}

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut v = (self.bwd)(&[a, b], g)?.into_iter();
        Ok((v.next().flatten(), v.next().flatten()))
    }
}

impl CustomOp3 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut v = (self.bwd)(&[a, b, c], g)?.into_iter();
        Ok((v.next().flatten(), v.next().flatten(), v.next().flatten()))
    }
}

/// `out`, computed beforehand from `a`, as an op of its whose backward is
/// `bwd`.
pub(crate) fn precomputed1(name: &'static str, a: &Tensor, out: Tensor, bwd: Box<BwdFn>) -> Result<Tensor> {
    a.apply_op1(Precomputed::new(name, out, bwd))
}

/// `out`, computed beforehand from `a` and `b`, as an op of theirs whose
/// backward is `bwd` (gradients for `a` and `b`, in that order).
pub fn precomputed2(name: &'static str, a: &Tensor, b: &Tensor, out: Tensor, bwd: Box<BwdFn>) -> Result<Tensor> {
    a.apply_op2(b, Precomputed::new(name, out, bwd))
}

/// `out`, computed beforehand from `a`, `b` and `c`, as an op of theirs
/// whose backward is `bwd` (gradients for `a`, `b` and `c`, in that order).
pub(crate) fn precomputed3(name: &'static str, a: &Tensor, b: &Tensor, c: &Tensor, out: Tensor, bwd: Box<BwdFn>) -> Result<Tensor> {
    a.apply_op3(b, c, Precomputed::new(name, out, bwd))
}

/// Whether a tensor takes part in autograd (a Var or derived from one).
pub(crate) fn tracked(t: &Tensor) -> bool {
    t.track_op()
}

/// Whether candle's fast (gradient-free) kernels serve this tensor: on the
/// CPU and on CUDA, in float types.
fn fast_ok(t: &Tensor) -> bool {
    (t.device().is_cpu() || t.device().is_cuda()) && matches!(t.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
}

fn internal_dtype(dt: DType) -> DType {
    match dt {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

// ---------------------------------------------------------------- RMSNorm

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * w` (HF Llama;
/// statistics in f32 for half types).
pub fn rms_norm_plain(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(internal_dtype(dt))?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (ms + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&r)?.to_dtype(dt)?.broadcast_mul(w)
}

/// RMSNorm: the fused kernel in f32/f64 on the CPU; for half types candle's
/// fast forward and a hand-written backward.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fast_ok(x) || x.dtype() != w.dtype() {
        return rms_norm_plain(x, w, eps);
    }
    if crate::fused(x) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, crate::rms_norm::RmsNorm { eps });
    }
    let out = candle_nn::ops::rms_norm(&x.detach().contiguous()?, &w.detach(), eps as f32)?;
    if !tracked(x) && !tracked(w) {
        return Ok(out);
    }
    let op = Precomputed::new(
        "dpo2d-rms-norm",
        out,
        Box::new(move |args, g| {
            let (x, w) = (args[0].detach(), args[1].detach());
            let dt = x.dtype();
            let it = internal_dtype(dt);
            let xf = x.to_dtype(it)?;
            let gf = g.to_dtype(it)?;
            let wf = w.to_dtype(it)?;
            let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let gw = gf.broadcast_mul(&wf)?;
            let n = x.dim(D::Minus1)? as f64;
            // dx = r * gw - x * r^3 * mean(gw * x)
            let dot = ((&gw * &xf)?.sum_keepdim(D::Minus1)? / n)?;
            let r3 = r.powf(3.0)?;
            let dx = (gw.broadcast_mul(&r)? - xf.broadcast_mul(&(dot * r3)?)?)?.to_dtype(dt)?;
            let dw = if tracked(args[1]) {
                let xn = xf.broadcast_mul(&r)?;
                let rows = xn.elem_count() / xn.dim(D::Minus1)?;
                let h = xn.dim(D::Minus1)?;
                let p = (gf * xn)?.reshape((rows, h))?.sum(0)?;
                Some(p.to_dtype(w.dtype())?)
            } else {
                None
            };
            Ok(vec![if tracked(args[0]) { Some(dx) } else { None }, dw])
        }),
    );
    x.apply_op2(w, op)
}

/// A pre-norm block's residual add and the next norm: `(a + b, rms_norm(a +
/// b, w))`, in one pass where the fused kernels run.
pub fn add_rms_norm(a: &Tensor, b: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if crate::fused(a) && a.dtype() == b.dtype() && a.dtype() == w.dtype() && a.dims() == b.dims() {
        let both = a.contiguous()?.apply_op3(&b.contiguous()?, &w.contiguous()?, crate::rms_norm::AddRmsNorm { eps })?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    let h = (a + b)?;
    let y = rms_norm(&h, w, eps)?;
    Ok((h, y))
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dim from differentiable primitives.
pub fn softmax_plain(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Softmax over the last dim: fast kernel forward, `y * (g - sum(g*y))` backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fast_ok(x) {
        return softmax_plain(x);
    }
    let out = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    if !tracked(x) {
        return Ok(out);
    }
    let y = out.clone();
    let op = Precomputed::new(
        "dpo2d-softmax",
        out,
        Box::new(move |_args, g| {
            let s = (g * &y)?.sum_keepdim(D::Minus1)?;
            Ok(vec![Some((g.broadcast_sub(&s)? * &y)?)])
        }),
    );
    x.apply_op1(op)
}

/// Attention's `softmax(scores + mask)` over the last dim; `mask` is additive
/// (0 or -inf), `[B or 1, 1, .., Tq, Tk]` against scores `[B, .., Tq, Tk]`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if crate::fused(scores) && mask.dtype() == scores.dtype() {
        return scores.contiguous()?.apply_op1(crate::softmax::MaskedSoftmax { mask: mask.contiguous()?, scale: 1.0 });
    }
    softmax_last_dim(&scores.broadcast_add(mask)?)
}

// ---------------------------------------------------------------- attention

/// Grouped-query attention from the ops above: `softmax(scale * q k^T +
/// mask) v`. `q`: `[B, heads, T, d]`; `k`, `v`: `[B, kv_heads, Tk, d]`
/// (views into a longer KV buffer allowed); `mask`: additive
/// `[B or 1, 1, 1, T, Tk]`. Returns `[B, T, heads * d]`. The query heads
/// that share a kv head are grouped (`[B, kv_heads, n_rep * T, d]`), so keys
/// and values are never repeated.
pub fn attention_plain(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (_, nkv, tk, _) = k.dims4()?;
    let n_rep = nh / nkv;
    let q = (q * scale)?.reshape((b, nkv, n_rep * t, d))?;
    let scores = strided_matmul(&q, &k.t()?)?.reshape((b, nkv, n_rep, t, tk))?;
    let probs = masked_softmax(&scores, mask)?.reshape((b, nkv, n_rep * t, tk))?;
    let out = strided_matmul(&probs, v)?;
    out.reshape((b, nh, t, d))?.transpose(1, 2)?.reshape((b, t, nh * d))
}

/// `a.matmul(b)` where `b` may be a view into a KV buffer (rows of a
/// longer buffer); a backend that cannot take those strides gets a copy.
fn strided_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match a.matmul(b) {
        Ok(c) => Ok(c),
        Err(_) => a.matmul(&b.contiguous()?),
    }
}

/// [`attention_plain`], as one graph node with a written-out backward
/// ([`crate::attention`]) when it trains where the fused kernels run (the
/// CPU in f32/f64, a GPU in f32/bf16): the graph then keeps `q`, `k` and
/// `v` only (backward computes the probabilities again), and backward forms
/// each gradient once.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if crate::nodes_enabled() && crate::fused(q) && (tracked(q) || tracked(k) || tracked(v)) && mask.dtype() == q.dtype() {
        return crate::attention::attention(q, k, v, mask, scale);
    }
    attention_plain(q, k, v, mask, scale)
}

// ---------------------------------------------------------------- swiglu

/// SwiGLU's gate from primitives: `silu(gate) * up`.
pub fn swiglu_plain(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// `silu(gate) * up`, fused in f32/f64 on the CPU and in f32/bf16 on a GPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::fused(gate) && up.dtype() == gate.dtype() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, crate::swiglu::SwiGlu);
    }
    swiglu_plain(gate, up)
}

// ---------------------------------------------------------------- rope

/// Rotary embedding, HF "rotate_half" convention, from primitives.
/// `x`: [B, H, T, D]; `cos`, `sin`: [B, T, D/2] (per-token angles).
pub fn rope_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Rotary embedding with candle's fast kernel; backward rotates the gradient
/// by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !fast_ok(x) || cos.dtype() != x.dtype() {
        return rope_plain(x, cos, sin);
    }
    rope_node(x, cos, sin, false)
}

/// candle's rotary kernel as one graph node of `x` (`[B, H, T, D]`, or with
/// `heads` the projection's `[B, T, H, D]`, transposed into a copy that the
/// node does not keep); backward rotates the gradient by the opposite angle
/// (and transposes it back) and needs no input.
fn rope_node(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: bool) -> Result<Tensor> {
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let input = if heads { x.detach().transpose(1, 2)? } else { x.detach() };
    let out = candle_nn::rotary_emb::rope(&input.contiguous()?, &cos, &sin)?;
    if !tracked(x) {
        return Ok(out);
    }
    let neg_sin = sin.neg()?;
    let bwd = move |_args: &[&Tensor], g: &Tensor| {
        let dx = candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)?;
        Ok(vec![Some(if heads { dx.transpose(1, 2)? } else { dx })])
    };
    x.apply_op1(Precomputed::new(if heads { "dpo2d-rope-heads" } else { "dpo2d-rope" }, out, Box::new(bwd)))
}

/// Rotary embedding of a projection's output `[B, T, H, D]`, returned in
/// attention's layout `[B, H, T, D]` (transpose and rotation in one pass in
/// f32/f64 on the CPU). `cos`, `sin`: `[B, T, D/2]`.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::supports(x) && cos.dtype() == x.dtype() && sin.dtype() == x.dtype() {
        return x.contiguous()?.apply_op1(crate::rope::RopeHeads { cos: cos.contiguous()?, sin: sin.contiguous()? });
    }
    if !fast_ok(x) || cos.dtype() != x.dtype() {
        return rope_plain(&x.transpose(1, 2)?.contiguous()?, cos, sin);
    }
    // One graph node over the projection's output (as on a GPU).
    rope_node(x, cos, sin, true)
}

// ---------------------------------------------------------------- linear

/// Up to this many rows, a gradient-free product with a small weight runs row by row.
const SMALL_BATCH_ROWS: usize = 8;
/// Weights up to this many elements (16 MiB in f32) count as small.
const SMALL_BATCH_WEIGHT: usize = 1 << 22;

/// `x @ w^T (+ b)` over the last dim of `x` (any rank), with `w`: [out, in].
/// When `w` is frozen (not tracked) and `x` is, the weight gradient that
/// candle's matmul backward would compute and throw away is skipped.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, w, b, None)
}

/// Collects the gradient of one weight that its op computes in its own
/// backward, outside candle's gradient store. candle gives every gradient
/// it stores a zeroed buffer and adds into it; a sink keeps the first
/// gradient as it comes (and adds later ones in parallel), which for the
/// weights of every linear layer saves two passes over all of them per
/// backward pass. Read with [`GradSink::take`] (or `CausalLM::gradients`).
#[derive(Default)]
pub struct GradSink(std::sync::Mutex<Option<Tensor>>);

impl GradSink {
    pub fn add(&self, g: Tensor) -> Result<()> {
        crate::accumulate(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()), g)
    }

    /// The gradient collected since the last call (None: no backward pass reached it).
    pub fn take(&self) -> Option<Tensor> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// [`linear`], with the weight's gradient going to `sink` (when given and the
/// weight is tracked) instead of candle's gradient store.
pub fn linear_with(x: &Tensor, w: &Tensor, b: Option<&Tensor>, sink: Option<&std::sync::Arc<GradSink>>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / inp.max(1);
    let (out_f, _) = w.dims2()?;
    let mut od = dims.clone();
    *od.last_mut().unwrap() = out_f;
    let y = if (tracked(x) || tracked(w)) && fast_ok(x) {
        tracked_linear(x, w, (rows, inp), &od, sink.cloned())?
    } else {
        let x2 = x.reshape((rows, inp))?;
        let y = if (2..=SMALL_BATCH_ROWS).contains(&rows) && w.elem_count() <= SMALL_BATCH_WEIGHT && x.device().is_cpu() {
            // Batched decoding on the CPU: gemm's kernels for a few rows are far slower than
            // one matrix-vector product per row while the weight sits in cache
            // (measured on a 2-core EPYC: 4 rows through a 1536 -> 576 weight took
            // 2 ms, 4 single rows 0.16 ms). Large weights (the lm_head) stay whole.
            let wt = w.t()?;
            let rows_out = (0..rows).map(|r| x2.narrow(0, r, 1)?.matmul(&wt)).collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows_out, 0)?
        } else {
            x2.matmul(&w.t()?)?
        };
        y.reshape(od)?
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x @ w^T` as one graph node whatever the rank of `x`, with its own
/// backward: `dx = g w` (when `x` is tracked) and `dW = g^T x` (when `w`
/// is). With candle's ops the flattening reshape of `x`, the transposed view
/// of `w` and the reshape back are graph nodes too, and backward gives each
/// a zeroed gradient buffer and an add: three more passes over activations
/// and one over every weight, in every step.
fn tracked_linear(
    x: &Tensor,
    w: &Tensor,
    (rows, inp): (usize, usize),
    od: &[usize],
    sink: Option<std::sync::Arc<GradSink>>,
) -> Result<Tensor> {
    let out_f = w.dim(0)?;
    let out = x.detach().reshape((rows, inp))?.matmul(&w.detach().t()?)?.reshape(od)?;
    let bwd = move |args: &[&Tensor], g: &Tensor| -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (args[0], args[1]);
        let g2 = g.reshape((rows, out_f))?;
        let dx = if tracked(x) { Some(g2.matmul(&w.detach())?.reshape(x.dims())?) } else { None };
        let dw = if tracked(w) { Some(g2.t()?.matmul(&x.detach().reshape((rows, inp))?)?) } else { None };
        match (dw, &sink) {
            (Some(dw), Some(sink)) => {
                sink.add(dw)?;
                Ok(vec![dx, None])
            }
            (dw, _) => Ok(vec![dx, dw]),
        }
    };
    let name = if tracked(w) { "dpo2d-linear" } else { "dpo2d-frozen-linear" };
    x.apply_op2(w, Precomputed::new(name, out, Box::new(bwd)))
}

// ---------------------------------------------------------------- log-probs

/// Log-softmax over the last dim from primitives (keeps the input alive).
pub fn log_softmax_plain(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let xs = x.broadcast_sub(&m)?;
    let lse = xs.exp()?.sum_keepdim(D::Minus1)?.log()?;
    xs.broadcast_sub(&lse)
}

/// Reference version of [`label_logprobs`]: full logits, log-softmax, gather.
pub fn label_logprobs_plain(hidden: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = hidden.matmul(&weight.t()?)?.to_dtype(internal_dtype(hidden.dtype()))?;
    let lp = log_softmax_plain(&logits)?;
    lp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)
}

/// Rows per chunk so that one chunk's logits hold about 8M values.
pub fn chunk_rows(vocab: usize) -> usize {
    (8_000_000 / vocab.max(1)).clamp(1, 4096)
}

/// Rows per chunk on `dev`: on a GPU about 64M logits (256 MB in f32), so
/// the vocabulary-wide products are large enough to fill it.
fn chunk_rows_on(vocab: usize, dev: &candle_core::Device) -> usize {
    if dev.is_cuda() {
        (64_000_000 / vocab.max(1)).clamp(1, 16384)
    } else {
        chunk_rows(vocab)
    }
}

/// One chunk's logits `h @ w^T`, in the dtype the label kernels take: as
/// computed on a GPU (its kernels read bf16), else in `it`.
fn chunk_logits(h: &Tensor, w: &Tensor, it: DType) -> Result<Tensor> {
    let logits = h.matmul(&w.t()?)?;
    if crate::on_gpu(&logits) {
        Ok(logits)
    } else {
        logits.to_dtype(it)
    }
}

/// Log-probability of `labels` under `softmax(hidden @ weight^T)`.
///
/// `hidden`: [N, H], `weight`: [V, H] (the lm_head), `labels`: [N] u32 < V.
/// Returns [N] in f32 (f64 for f64 inputs). Works in row chunks and never
/// keeps `[N x V]` alive: backward recomputes each chunk's logits and forms
/// `g * (onehot - softmax)` on the fly.
pub fn label_logprobs(hidden: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let (v, h2) = weight.dims2()?;
    if h != h2 {
        bail!("label_logprobs: hidden size {h} but lm_head has {h2}");
    }
    if labels.dims1()? != n {
        bail!("label_logprobs: {n} hidden rows but {} labels", labels.dims1()?);
    }
    let labels = labels.to_dtype(DType::U32)?;
    let max_label = if n > 0 { labels.max(0)?.to_scalar::<u32>()? as usize } else { 0 };
    if n > 0 && max_label >= v {
        bail!("label_logprobs: label id {max_label} is outside the vocabulary (size {v})");
    }
    if !fast_ok(hidden) || !fast_ok(weight) {
        return label_logprobs_plain(hidden, weight, &labels);
    }
    let it = internal_dtype(hidden.dtype());
    let rows = chunk_rows_on(v, hidden.device());
    let (out, lse) = label_logprobs_chunks(&hidden.detach(), &weight.detach(), &labels, rows, it)?;
    if !tracked(hidden) && !tracked(weight) {
        return Ok(out);
    }
    let labels_c = labels.clone();
    let op = Precomputed::new(
        "dpo2d-label-logprobs",
        out,
        Box::new(move |args, g| label_logprobs_backward(args[0], args[1], &labels_c, &lse, g, rows, it)),
    );
    hidden.apply_op3(weight, &labels, op)
}

/// Forward of [`label_logprobs`], `rows` rows at a time: each label's logit
/// minus the row's logsumexp. Returns the log-probs `[N]` and the
/// logsumexps `[N]` (kept for backward; the logits are not).
fn label_logprobs_chunks(hd: &Tensor, wd: &Tensor, labels: &Tensor, rows: usize, it: DType) -> Result<(Tensor, Tensor)> {
    let n = hd.dim(0)?;
    let (mut outs, mut lses) = (vec![], vec![]);
    let mut s = 0;
    while s < n {
        let r = rows.min(n - s);
        let logits = chunk_logits(&hd.narrow(0, s, r)?, wd, it)?;
        let lab = labels.narrow(0, s, r)?;
        if crate::fused(&logits) {
            let (picked, lse) = crate::logprobs::pick_and_lse(&logits, &lab)?;
            outs.push(picked);
            lses.push(lse);
        } else {
            let m = logits.max_keepdim(1)?;
            let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
            let picked = logits.gather(&lab.unsqueeze(1)?, 1)?;
            outs.push((picked - &lse)?.squeeze(1)?);
            lses.push(lse.squeeze(1)?);
        }
        s += r;
    }
    let out = if outs.is_empty() { Tensor::zeros(0, it, hd.device())? } else { Tensor::cat(&outs, 0)? };
    let lse = if lses.is_empty() { out.clone() } else { Tensor::cat(&lses, 0)? };
    Ok((out, lse))
}

/// Backward of [`label_logprobs`]: recompute each chunk's logits and form
/// `g * (onehot - softmax)` on the fly, for the hidden states and/or the
/// lm_head, whichever is tracked.
fn label_logprobs_backward(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    rows: usize,
    it: DType,
) -> Result<Vec<Option<Tensor>>> {
    let (hd, wd) = (hidden.detach(), weight.detach());
    let (need_h, need_w) = (tracked(hidden), tracked(weight));
    let (n, v) = (hd.dim(0)?, wd.dim(0)?);
    let vocab = Tensor::arange(0u32, v as u32, hd.device())?;
    let mut dh = vec![];
    let mut dw: Option<Tensor> = None;
    let mut s = 0;
    while s < n {
        let r = rows.min(n - s);
        let hc = hd.narrow(0, s, r)?;
        let logits = chunk_logits(&hc, &wd, it)?;
        let (lse_c, lab, g_c) = (lse.narrow(0, s, r)?, labels.narrow(0, s, r)?, g.narrow(0, s, r)?);
        let gl = if crate::fused(&logits) {
            crate::logprobs::logit_grads(&logits, &lab, &lse_c, &g_c)?
        } else {
            let p = logits.broadcast_sub(&lse_c.unsqueeze(1)?)?.exp()?;
            let onehot = vocab.unsqueeze(0)?.broadcast_eq(&lab.unsqueeze(1)?)?.to_dtype(it)?;
            (onehot - p)?.broadcast_mul(&g_c.unsqueeze(1)?)?
        }
        .to_dtype(hd.dtype())?;
        if need_h {
            dh.push(gl.matmul(&wd)?);
        }
        if need_w {
            crate::accumulate(&mut dw, gl.t()?.matmul(&hc)?)?;
        }
        s += r;
    }
    let dh = if need_h { Some(Tensor::cat(&dh, 0)?) } else { None };
    let dw = match (need_w, dw) {
        (true, Some(d)) => Some(d.to_dtype(wd.dtype())?),
        (true, None) => Some(wd.zeros_like()?),
        _ => None,
    };
    Ok(vec![dh, dw, None])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_support::{det, grad_check};
    use candle_core::Device;

    #[test]
    fn linear_row_by_row_for_small_frozen_batches_equals_one_product() {
        let w = det(&[48, 24], 3, DType::F32);
        let b = det(&[48], 4, DType::F32);
        for rows in [1usize, 2, 5, 8, 9] {
            let x = det(&[rows, 1, 24], 5 + rows as u64, DType::F32);
            let got = linear(&x, &w, Some(&b)).unwrap();
            assert_eq!(got.dims(), &[rows, 1, 48]);
            let want = x.reshape((rows, 24)).unwrap().matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let d = (got.reshape((rows, 48)).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "rows {rows}: {d}");
        }
    }

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d = crate::test_support::max_abs_diff(a, b);
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    #[test]
    fn rms_norm_fast_matches_plain_and_grads() {
        let x = det(&[2, 3, 8], 1, DType::F64);
        let w = det(&[8], 2, DType::F64);
        close(&rms_norm(&x, &w, 1e-5).unwrap(), &rms_norm_plain(&x, &w, 1e-5).unwrap(), 1e-12);
        grad_check(&[x.clone(), w.clone()], &|t| rms_norm(&t[0], &t[1], 1e-5), 1e-6);
        grad_check(&[x, w], &|t| rms_norm_plain(&t[0], &t[1], 1e-5), 1e-6);
        // f32 goes through candle's kernel.
        let x = det(&[2, 3, 8], 1, DType::F32);
        let w = det(&[8], 2, DType::F32);
        close(&rms_norm(&x, &w, 1e-5).unwrap(), &rms_norm_plain(&x, &w, 1e-5).unwrap(), 1e-5);
    }

    #[test]
    fn softmax_fast_matches_plain_and_grads() {
        let x = det(&[2, 3, 7], 3, DType::F64);
        close(&softmax_last_dim(&x).unwrap(), &softmax_plain(&x).unwrap(), 1e-12);
        grad_check(std::slice::from_ref(&x), &|t| softmax_last_dim(&t[0]), 1e-6);
        grad_check(&[x], &|t| softmax_plain(&t[0]), 1e-6);
    }

    #[test]
    fn rope_fast_matches_plain_and_grads() {
        let x = det(&[2, 3, 4, 8], 4, DType::F64);
        let ang = (det(&[2, 4, 4], 5, DType::F64) * 3.0).unwrap();
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        close(&rope(&x, &c, &s).unwrap(), &rope_plain(&x, &c, &s).unwrap(), 1e-12);
        let (c2, s2) = (c.clone(), s.clone());
        grad_check(std::slice::from_ref(&x), &move |t| rope(&t[0], &c2, &s2), 1e-6);
        grad_check(&[x], &move |t| rope_plain(&t[0], &c, &s), 1e-6);
    }

    /// Outside the CPU kernels' dtypes (bf16 here, as on a GPU) the rotation
    /// with the head transpose is one node with its own backward: the same
    /// values and input gradient as the composed ops.
    #[test]
    fn rope_heads_node_matches_composed_in_bf16() {
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = candle_core::Var::from_tensor(&bf(det(&[2, 5, 3, 8], 4, DType::F32))).unwrap();
        let ang = (det(&[2, 5, 4], 5, DType::F32) * 3.0).unwrap();
        let (c, s) = (bf(ang.cos().unwrap()), bf(ang.sin().unwrap()));
        let proj = bf(det(&[2, 3, 5, 8], 6, DType::F32));
        let run = |y: Tensor| {
            let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let (y, g) = run(rope_heads(&x, &c, &s).unwrap());
        let (y_plain, g_plain) = run(rope_plain(&x.transpose(1, 2).unwrap().contiguous().unwrap(), &c, &s).unwrap());
        assert_eq!(y.dims(), &[2, 3, 5, 8]);
        close(&y, &y_plain, 2e-2);
        close(&g, &g_plain, 2e-2);
    }

    #[test]
    fn frozen_linear_grad() {
        let x = det(&[2, 3, 5], 6, DType::F64);
        let w = det(&[4, 5], 7, DType::F64);
        let b = det(&[4], 8, DType::F64);
        let plain = x.matmul(&w.t().unwrap().unsqueeze(0).unwrap().broadcast_as((2, 5, 4)).unwrap()).unwrap();
        close(&linear(&x, &w, None).unwrap(), &plain, 1e-12);
        // frozen weight path (w is a plain tensor captured by the closure)
        let (w2, b2) = (w.clone(), b.clone());
        grad_check(std::slice::from_ref(&x), &move |t| linear(&t[0], &w2, Some(&b2)), 1e-6);
        // trainable weight and bias
        grad_check(&[x, w, b], &|t| linear(&t[0], &t[1], Some(&t[2])), 1e-6);
    }

    #[test]
    fn label_logprobs_matches_plain_and_grads() {
        let h = det(&[5, 6], 9, DType::F64);
        let w = det(&[11, 6], 10, DType::F64);
        let labels = Tensor::new(&[0u32, 10, 3, 3, 7], &Device::Cpu).unwrap();
        close(&label_logprobs(&h, &w, &labels).unwrap(), &label_logprobs_plain(&h, &w, &labels).unwrap(), 1e-12);
        let l2 = labels.clone();
        grad_check(&[h.clone(), w.clone()], &move |t| label_logprobs(&t[0], &t[1], &l2), 1e-6);
        // frozen lm_head
        let (w3, l3) = (w.clone(), labels.clone());
        grad_check(std::slice::from_ref(&h), &move |t| label_logprobs(&t[0], &w3, &l3), 1e-6);
        grad_check(&[h, w], &move |t| label_logprobs_plain(&t[0], &t[1], &labels), 1e-6);
        let bad = Tensor::new(&[11u32; 5], &Device::Cpu).unwrap();
        let e = label_logprobs(&det(&[5, 6], 1, DType::F64), &det(&[11, 6], 2, DType::F64), &bad).unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"));
    }

    #[test]
    fn label_logprobs_chunks_cover_all_rows() {
        // More rows than one chunk holds for this vocabulary.
        let v = 8_000_000 / 3 + 1;
        assert_eq!(chunk_rows(v), 2);
        let h = det(&[5, 2], 11, DType::F32);
        let w = det(&[v, 2], 12, DType::F32);
        let labels = Tensor::new(&[0u32, 1, 2, 3, (v - 1) as u32], &Device::Cpu).unwrap();
        close(&label_logprobs(&h, &w, &labels).unwrap(), &label_logprobs_plain(&h, &w, &labels).unwrap(), 1e-4);
    }
}
