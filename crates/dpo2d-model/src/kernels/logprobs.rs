//! The element-wise halves of [`crate::ops::label_logprobs`], one chunk of
//! logits `[R, V]` at a time: the forward's per-row logsumexp and label
//! pick, and the backward's `g * (onehot(label) - softmax)`, each one
//! parallel pass over the chunk instead of five or six composed ones.

use super::{min_rows, tensor, with_float, with_slice, Float};
use candle_core::{bail, Result, Tensor};
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

/// Per row of `logits` `[R, V]`: `(logit[label] - logsumexp, logsumexp)`, each `[R]`.
/// On a GPU the CUDA twin (f32 or bf16 logits, f32 results).
pub fn pick_and_lse(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (r, v) = dims(logits, labels)?;
    #[cfg(feature = "cuda")]
    if super::on_gpu(logits) {
        return super::cuda::pick_and_lse(logits, labels);
    }
    let labels: Vec<u32> = labels.to_vec1()?;
    with_float!(logits.dtype(), "label log-probs", T => {
        let (lp, lse): (Vec<T>, Vec<T>) = with_slice::<T, _>(logits, "label log-probs", |l| {
            l.par_chunks(v).zip(&labels).with_min_len(min_rows(v)).map(|(row, &lab)| {
                let lse = lse_row(row);
                (row[lab as usize] - lse, lse)
            }).unzip()
        })?;
        Ok((tensor(lp, &[r])?, tensor(lse, &[r])?))
    })
}

/// `g[r] * (onehot(label[r]) - exp(logits[r] - lse[r]))`, `[R, V]`: the
/// gradient of the picked log-probs with respect to the logits.
pub fn logit_grads(logits: &Tensor, labels: &Tensor, lse: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (r, v) = dims(logits, labels)?;
    #[cfg(feature = "cuda")]
    if super::on_gpu(logits) {
        return super::cuda::logit_grads(logits, labels, lse, g);
    }
    let labels: Vec<u32> = labels.to_vec1()?;
    with_float!(logits.dtype(), "label log-probs", T => {
        let lse: Vec<T> = lse.to_dtype(logits.dtype())?.to_vec1()?;
        let g: Vec<T> = g.to_dtype(logits.dtype())?.to_vec1()?;
        let mut out = vec![T::zero(); r * v];
        with_slice::<T, _>(logits, "label log-probs", |l| {
            out.par_chunks_mut(v).zip(l.par_chunks(v)).enumerate().with_min_len(min_rows(v)).for_each(|(i, (o, row))| {
                let (lse, g) = (lse[i], g[i]);
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = -g * (x - lse).exp();
                }
                o[labels[i] as usize] += g;
            })
        })?;
        tensor(out, &[r, v])
    })
}
