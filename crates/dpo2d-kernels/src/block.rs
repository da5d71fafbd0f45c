//! A whole pre-norm decoder block as one graph node, when all its weights
//! train in full on the CPU: `h = x + o(attention(rope(q(n1)), rope(k(n1)),
//! v(n1)))` with `n1 = rms_norm(x)`, then `out = h + mlp(rms_norm(h))`.
//! Every weight's gradient goes to its [`crate::ops::GradSink`].
//!
//! Why: composed, a block is some twenty graph nodes (norms, projections,
//! rotations, reshapes, transposes, residual adds), and candle's backward
//! gives each node's input a zeroed gradient buffer and adds into it, on
//! the calling thread while the other threads wait. Here backward is the
//! chain rule written out: the products run in gemm's threads, everything
//! else in the fused kernels ([`super::rms_norm`], [`super::rope`],
//! [`super::attention`], [`super::mlp`]), and each gradient is formed once.

use super::gemm::{matmul, matmul_sum};
use super::mlp::MlpWeights;
use super::rms_norm::RmsNorm;
use super::rope::RopeHeads;
use super::{add, attention, mlp, Param};
use crate::ops::{precomputed1, tracked};
use candle_core::{CustomOp2, Result, Tensor};
use std::sync::Arc;

/// The block's weights (`[out, in]` projections, as in Hugging Face checkpoints).
pub struct BlockWeights<'a> {
    pub input_norm: Param<'a>,
    pub q: Param<'a>,
    pub k: Param<'a>,
    pub v: Param<'a>,
    pub o: Param<'a>,
    pub post_norm: Param<'a>,
    pub mlp: MlpWeights<'a>,
}

/// The block's attention geometry and norm epsilon.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
}

/// What one forward pass shares between blocks: rotary tables `[B, T, d/2]`
/// and the additive mask `[B or 1, 1, 1, T, T]`.
pub struct BlockInputs<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub mask: &'a Tensor,
}

/// `x`: `[B, T, hidden]`; returns `[B, T, hidden]`.
pub fn decoder_block(x: &Tensor, w: BlockWeights, shape: BlockShape, inputs: BlockInputs) -> Result<Tensor> {
    let (b, t, hidden) = x.dims3()?;
    let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let rows = b * t;
    let norm = RmsNorm { eps: shape.eps };
    let rope = RopeHeads { cos: inputs.cos.contiguous()?, sin: inputs.sin.contiguous()? };
    let detached = |p: Param| p.0.detach();
    let (wq, wk, wv, wo) = (detached(w.q), detached(w.k), detached(w.v), detached(w.o));

    // Attention half.
    let xd = x.detach().contiguous()?;
    let n1 = xd.apply_op2_no_bwd(&w.input_norm.0.detach(), &norm)?.reshape((rows, hidden))?;
    let q = matmul(&n1, &wq.t()?)?.reshape((b, t, nh, hd))?;
    let k = matmul(&n1, &wk.t()?)?.reshape((b, t, nkv, hd))?;
    let v = matmul(&n1, &wv.t()?)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let (qr, kr) = (q.apply_op1_no_bwd(&rope)?, k.apply_op1_no_bwd(&rope)?);
    let (att, att_saved) = attention::forward(&qr, &kr, &v, inputs.mask, 1.0 / (hd as f64).sqrt())?;
    let att = att.reshape((rows, nh * hd))?;
    let h = add(&xd, &matmul(&att, &wo.t()?)?.reshape((b, t, hidden))?)?;
    // MLP half.
    let n2 = h.apply_op2_no_bwd(&w.post_norm.0.detach(), &norm)?;
    let (y, mlp_saved) = mlp::forward(&n2, w.mlp)?;
    let out = add(&h, &y)?;
    if !tracked(x) {
        return Ok(out);
    }

    // The norms' backward forms the weight's gradient only for a tracked weight: keep the originals.
    let (w1, w2) = (w.input_norm.0.clone(), w.post_norm.0.clone());
    let sinks = [w.input_norm.1, w.q.1, w.k.1, w.v.1, w.o.1, w.post_norm.1].map(Arc::clone);
    let bwd = move |_args: &[&Tensor], g: &Tensor| -> Result<Vec<Option<Tensor>>> {
        let [s_in, s_q, s_k, s_v, s_o, s_post] = &sinks;
        // out = h + mlp(norm(h))
        let dn2 = mlp_saved.backward(g)?;
        let (dh_norm, dw2) = norm.bwd(&h, &w2, &n2, &dn2)?;
        s_post.add(dw2.expect("a tracked norm weight gets a gradient"))?;
        let dh = add(g, &dh_norm.expect("the norm gives its input's gradient"))?;
        // h = x + o(att)
        let dh2 = dh.reshape((rows, hidden))?;
        s_o.add(matmul(&dh2.t()?, &att)?)?;
        let (dqr, dkr, dv) = att_saved.backward(&matmul(&dh2, &wo)?)?;
        let dq = rope.backward_tensor(&dqr, &[b, t, nh, hd])?.reshape((rows, nh * hd))?;
        let dk = rope.backward_tensor(&dkr, &[b, t, nkv, hd])?.reshape((rows, nkv * hd))?;
        let dv = dv.transpose(1, 2)?.contiguous()?.reshape((rows, nkv * hd))?;
        s_q.add(matmul(&dq.t()?, &n1)?)?;
        s_k.add(matmul(&dk.t()?, &n1)?)?;
        s_v.add(matmul(&dv.t()?, &n1)?)?;
        let dn1 = matmul_sum(&[(&dq, &wq), (&dk, &wk), (&dv, &wv)])?.reshape((b, t, hidden))?;
        let (dx_norm, dw1) = norm.bwd(&xd, &w1, &n1, &dn1)?;
        s_in.add(dw1.expect("a tracked norm weight gets a gradient"))?;
        Ok(vec![Some(add(&dh, &dx_norm.expect("the norm gives its input's gradient"))?)])
    };
    precomputed1("dpo2d-decoder-block", x, out, Box::new(bwd))
}
