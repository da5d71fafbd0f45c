//! Grouped-query attention over our packed layout as one graph node:
//! `out = softmax(scale * q k^T + mask) v`, with the backward written out.
//!
//! Why: composed of candle ops, attention is a dozen graph nodes per layer
//! (the scaling, reshapes, the transposed keys, two products, the softmax,
//! the transposes back), and candle's backward gives each node's input a
//! zeroed gradient buffer and adds into it, on one thread, several of them
//! the size of the score matrix. Here the products run in gemm's threads,
//! the softmax and its gradient in the fused kernel of [`super::softmax`]
//! (with the scale folded in), and the graph keeps only `q`, `k` and `v`.
//!
//! Backward computes the probabilities again (one product and the softmax
//! kernel, the same bits as in forward) rather than keeping them: a
//! `batch x heads x T x T` tensor per layer is the largest thing a layer
//! would hold for backward (about 2.4 GB for 28 layers of 28 heads over
//! four 618-token rows in bf16), and recomputing it costs about as many
//! operations as a hundredth of the layer's projections.
//!
//! Backward, per batch entry and kv head, with `P` the probabilities and
//! `dO` the output's gradient: `dV = P^T dO`, `dP = dO V^T`,
//! `dS = scale * P (dP - rowsum(dP P))`, `dQ = dS K`, `dK = dS^T Q` (the
//! query heads of a group share `K` and `V`, so their terms add up in the
//! products).

use super::gemm::matmul;
use super::softmax;
use crate::ops::{precomputed3, tracked};
use candle_core::{bail, Result, Tensor};

/// `q`: `[B, heads, T, d]`; `k`, `v`: `[B, kv_heads, Tk, d]` (heads a
/// multiple of kv_heads; query head `h` reads kv head `h / (heads /
/// kv_heads)`); `mask`: additive `[B or 1, 1, 1, T, Tk]`. Returns
/// `[B, T, heads * d]`, the layout the output projection takes.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (out, saved) = forward(q, k, v, mask, scale)?;
    if !(tracked(q) || tracked(k) || tracked(v)) {
        return Ok(out);
    }
    let bwd = move |args: &[&Tensor], g: &Tensor| -> Result<Vec<Option<Tensor>>> {
        let (dq, dk, dv) = saved.backward(g)?;
        Ok(vec![tracked(args[0]).then_some(dq), tracked(args[1]).then_some(dk), tracked(args[2]).then_some(dv)])
    };
    precomputed3("dpo2d-attention", q, k, v, out, Box::new(bwd))
}

/// What backward needs from the forward pass (inputs detached).
pub(crate) struct Saved {
    /// Queries grouped by kv head, `[B, kv_heads, n_rep * T, d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Additive, `[B or 1, 1, 1, T, Tk]` (shared by every layer).
    mask: Tensor,
    /// (B, heads, T, d).
    dims: (usize, usize, usize, usize),
    scale: f64,
}

/// The forward pass outside autograd: the output `[B, T, heads * d]` and
/// what [`Saved::backward`] needs.
pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<(Tensor, Saved)> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, _, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        bail!("attention: q {:?}, k {:?}, v {:?} do not fit", q.dims(), k.dims(), v.dims());
    }
    let q = q.detach().contiguous()?.reshape((b, nkv, (nh / nkv) * t, d))?;
    let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
    let saved = Saved { q, k, v, mask: mask.clone(), dims: (b, nh, t, d), scale };
    let probs = saved.probs()?;
    let out = merge_heads(&matmul(&probs, &saved.v)?, saved.dims)?;
    Ok((out, saved))
}

impl Saved {
    /// `softmax(scale * q k^T + mask)`, `[B, kv_heads, n_rep * T, Tk]`: the
    /// same computation in forward and backward, so the same bits.
    fn probs(&self) -> Result<Tensor> {
        let (b, nh, t, _) = self.dims;
        let (nkv, tk) = (self.k.dim(1)?, self.k.dim(2)?);
        let scores = matmul(&self.q, &self.k.t()?)?.reshape((b, nkv, nh / nkv, t, tk))?;
        softmax::forward_tensor(&scores, &self.mask, self.scale)?.reshape((b, nkv, (nh / nkv) * t, tk))
    }

    /// Gradients of `q` (`[B, heads, T, d]`), `k` and `v` from the output's `g`.
    pub(crate) fn backward(&self, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, nh, t, d) = self.dims;
        let dout = g.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?.reshape(self.q.dims())?;
        let probs = self.probs()?;
        let dv = matmul(&probs.t()?, &dout)?;
        let dprobs = matmul(&dout, &self.v.t()?)?;
        let dscores = softmax::backward_tensor(&probs, &dprobs, self.scale)?;
        drop((probs, dprobs));
        let dq = matmul(&dscores, &self.k)?.reshape((b, nh, t, d))?;
        let dk = matmul(&dscores.t()?, &self.q)?;
        Ok((dq, dk, dv))
    }
}

/// `[B, kv_heads, n_rep * T, d]` (query heads grouped by kv head) to `[B, T, heads * d]`.
fn merge_heads(x: &Tensor, (b, nh, t, d): (usize, usize, usize, usize)) -> Result<Tensor> {
    x.reshape((b, nh, t, d))?.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * d))
}

#[cfg(test)]
mod tests {
    use crate::ops::attention_plain;
    use crate::test_support::det;
    use crate::tests::same_values_and_grads;
    use candle_core::{DType, Device, Tensor};

    /// Two packed units per row (a prompt of 3 tokens shared by two
    /// responses, then a plain sequence) and one padding token, as an
    /// additive `[B, 1, 1, T, T]` mask: a token sees earlier tokens of its
    /// sequence and of the sequence it continues; padding sees itself.
    fn packed_mask(b: usize, t: usize, dt: DType) -> Tensor {
        let mut m = vec![f64::NEG_INFINITY; b * t * t];
        for bi in 0..b {
            // Sequence ids 1 (prompt), 2 and 3 (its responses), 4 (plain), 0 (padding).
            let lens = [(1, 3), (2, 2 + bi), (3, 3), (4, t - 9 - bi), (0, 1)];
            let seq: Vec<usize> = lens.iter().flat_map(|&(id, n)| std::iter::repeat_n(id, n)).collect();
            let parent = |s: usize| if s == 2 || s == 3 { 1 } else { 0 };
            for i in 0..t {
                for j in 0..=i {
                    let seen = if seq[i] == 0 { j == i } else { seq[j] == seq[i] || (parent(seq[i]) != 0 && seq[j] == parent(seq[i])) };
                    if seen {
                        m[(bi * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, 1, t, t), &Device::Cpu).unwrap().to_dtype(dt).unwrap()
    }

    #[test]
    fn matches_composed_values_and_gradients() {
        // (batch, heads, kv heads, tokens, head dim)
        for (b, nh, nkv, t, d, dt, tol) in
            [(2, 4, 2, 13, 5, DType::F64, 1e-12), (1, 3, 3, 11, 4, DType::F64, 1e-12), (2, 6, 2, 17, 8, DType::F32, 1e-5)]
        {
            let q = det(&[b, nh, t, d], 1, dt);
            let k = det(&[b, nkv, t, d], 2, dt);
            let v = det(&[b, nkv, t, d], 3, dt);
            let mask = packed_mask(b, t, dt);
            let m2 = mask.clone();
            let scale = 1.0 / (d as f64).sqrt();
            same_values_and_grads(
                &[q, k, v],
                &move |x| super::attention(&x[0], &x[1], &x[2], &mask, scale),
                &move |x| attention_plain(&x[0], &x[1], &x[2], &m2, scale),
                tol,
            );
        }
    }

    #[test]
    fn gradient_by_finite_differences() {
        let (q, k, v) = (det(&[1, 4, 9, 3], 4, DType::F64), det(&[1, 2, 9, 3], 5, DType::F64), det(&[1, 2, 9, 3], 6, DType::F64));
        let mask = packed_mask(1, 9 + 1, DType::F64).narrow(3, 0, 9).unwrap().narrow(4, 0, 9).unwrap().contiguous().unwrap();
        crate::test_support::grad_check(&[q, k, v], &move |x| super::attention(&x[0], &x[1], &x[2], &mask, 0.7), 1e-6);
    }

    /// Backward recomputes the probabilities: what the node keeps grows with
    /// the tokens, not with their square (the mask aside, shared by every layer).
    #[test]
    fn keeps_no_score_sized_tensor() {
        let (b, nh, nkv, t, d) = (2, 4, 2, 40, 3);
        let (q, k, v) = (det(&[b, nh, t, d], 1, DType::F32), det(&[b, nkv, t, d], 2, DType::F32), det(&[b, nkv, t, d], 3, DType::F32));
        let (_, saved) = super::forward(&q, &k, &v, &packed_mask(b, t, DType::F32), 0.5).unwrap();
        let kept: usize = [&saved.q, &saved.k, &saved.v].iter().map(|x| x.elem_count()).sum();
        assert_eq!(kept, b * (nh + 2 * nkv) * t * d);
        assert!(kept < b * nh * t * t);
    }

    #[test]
    fn rejects_mismatched_heads() {
        let q = det(&[1, 3, 4, 2], 1, DType::F32);
        let k = det(&[1, 2, 4, 2], 2, DType::F32);
        assert!(super::attention(&q, &k, &k, &packed_mask(1, 12, DType::F32), 1.0).is_err());
    }
}
