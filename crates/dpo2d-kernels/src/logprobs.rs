//! The element-wise halves of [`crate::ops::label_logprobs`], one chunk of
//! logits `[R, V]` at a time: the forward's per-row logsumexp and label
//! pick, and the backward's `g * (onehot(label) - softmax)`, each one
//! parallel pass over the chunk instead of five or six composed ones.

use super::{min_rows, slice, with_float, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Logsumexp of one row; the sum of ~50k exponentials accumulates in f64
/// (an f32 running sum would drift by ~1e-5 relative, summed over every
/// token of a response).
fn lse_row<T: Float>(row: &[T]) -> T {
    let max = row.iter().fold(T::neg_infinity(), |m, &x| num_traits::Float::max(m, x));
    let sum: f64 = row.iter().map(|&x| (x - max).exp().to_f64()).sum();
    max + T::from_f64(sum.ln())
}

fn dims(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let (r, v) = logits.dims2()?;
    if labels.dims1()? != r {
        bail!("label log-probs: {r} rows of logits but {} labels", labels.dims1()?);
    }
    Ok((r, v))
}

/// Per row of `logits` `[R, V]`: `(logit[label] - logsumexp, logsumexp)`, each `[R]`
/// (in the logits' dtype on the CPU, f32 on a GPU).
pub fn pick_and_lse(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    dims(logits, labels)?;
    let both = logits.contiguous()?.apply_op2_no_bwd(&labels.to_dtype(DType::U32)?.contiguous()?, &LabelPick)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The gradient of `logit[label] - logsumexp` with respect to the logits,
/// times `g` per row: `g (onehot(label) - exp(logits - lse))`, `[R, V]`.
pub fn logit_grads(logits: &Tensor, labels: &Tensor, lse: &Tensor, g: &Tensor) -> Result<Tensor> {
    dims(logits, labels)?;
    // The per-row scalars in one tensor: f32 for the GPU kernel, the
    // logits' dtype on the CPU (f64 gradient checks keep f64).
    let dt = if logits.device().is_cpu() { logits.dtype() } else { DType::F32 };
    let lse_g = Tensor::stack(&[lse.to_dtype(dt)?, g.to_dtype(dt)?], 0)?.contiguous()?;
    logits.contiguous()?.apply_op3_no_bwd(&labels.to_dtype(DType::U32)?.contiguous()?, &lse_g, &LogitGrads)
}

/// [`pick_and_lse`] as an op: `[2, R]`, the picks then the logsumexps.
struct LabelPick;

impl CustomOp2 for LabelPick {
    fn name(&self) -> &'static str {
        "dpo2d-label-pick"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (r, v) = ll.shape().dims2()?;
        let labels = slice::<u32>(bs, bl, name)?;
        let out = with_float!(ls.dtype(), name, T => {
            let l = slice::<T>(ls, ll, name)?;
            let mut out = vec![T::zero(); 2 * r];
            let (lp, lse) = out.split_at_mut(r);
            lp.par_iter_mut().zip(lse.par_iter_mut()).zip(l.par_chunks(v).zip(labels)).with_min_len(min_rows(v)).for_each(
                |((lp, lse), (row, &lab))| {
                    *lse = lse_row(row);
                    *lp = row[lab as usize] - *lse;
                },
            );
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((2, r))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::label_pick(ls, ll, bs, bl)
    }
}

/// [`logit_grads`] as an op over the logits, the labels and `[2, R]` (the
/// logsumexps, then the incoming gradients).
struct LogitGrads;

impl CustomOp3 for LogitGrads {
    fn name(&self) -> &'static str {
        "dpo2d-logit-grads"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (r, v) = ll.shape().dims2()?;
        let labels = slice::<u32>(bs, bl, name)?;
        let out = with_float!(ls.dtype(), name, T => {
            let (l, lse_g) = (slice::<T>(ls, ll, name)?, slice::<T>(gs, gl, name)?);
            let (lse, g) = lse_g.split_at(r);
            let mut out = vec![T::zero(); r * v];
            out.par_chunks_mut(v).zip(l.par_chunks(v)).enumerate().with_min_len(min_rows(v)).for_each(|(i, (o, row))| {
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = -g[i] * (x - lse[i]).exp();
                }
                o[labels[i] as usize] += g[i];
            });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, ll.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::logit_grads(ls, ll, bs, bl, gs, gl)
    }
}
