//! Attention's masked softmax, `softmax(scale * scores + mask)` over the
//! last dim, without materialising `scores + mask`. The mask is additive (0
//! or -inf) and broadcast over heads: `[B or 1, 1, 1, Tq, Tk]` against
//! scores `[B, .., Tq, Tk]`. Backward: `dscores = scale * y * (g - sum(g * y))`.
//! Both directions are ops with a CPU kernel and a CUDA one.

use super::{min_rows, slice, with_float, with_slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The fused op over contiguous scores; the mask is held by the op (it takes
/// no gradient). `scale` multiplies the scores (attention's `1 / sqrt(d)`,
/// folded in rather than a pass of its own).
pub struct MaskedSoftmax {
    pub mask: Tensor,
    pub scale: f64,
}

/// Geometry: rows of `tk`; `per_batch` score rows per batch entry; the mask
/// has `tq` rows per batch entry and `mask_batches` (1 or B) entries.
#[derive(Clone, Copy)]
struct Geometry {
    tq: usize,
    tk: usize,
    per_batch: usize,
    mask_batches: usize,
}

impl Geometry {
    fn of(scores: &[usize], mask: &[usize]) -> Result<Self> {
        let n = scores.len();
        if n < 3 || mask.len() != n || mask[1..n - 2].iter().any(|&d| d != 1) || mask[n - 2..] != scores[n - 2..] {
            bail!("masked softmax: mask {mask:?} does not broadcast over scores {scores:?}");
        }
        if mask[0] != 1 && mask[0] != scores[0] {
            bail!("masked softmax: mask batch {} for scores batch {}", mask[0], scores[0]);
        }
        let (tq, tk) = (scores[n - 2], scores[n - 1]);
        Ok(Geometry { tq, tk, per_batch: scores[1..].iter().product::<usize>() / tk.max(1), mask_batches: mask[0] })
    }

    /// Offset of the mask row for score row `row`.
    fn mask_row(&self, row: usize) -> usize {
        let b = if self.mask_batches == 1 { 0 } else { row / self.per_batch };
        (b * self.tq + row % self.tq) * self.tk
    }
}

/// `softmax(scale * x + mask)` per row.
fn forward<T: Float>(x: &[T], mask: &[T], g: Geometry, scale: T) -> Vec<T> {
    let tk = g.tk;
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(tk).zip(x.par_chunks(tk)).enumerate().with_min_len(min_rows(tk)).for_each(|(row, (y, x))| {
        let m = &mask[g.mask_row(row)..][..tk];
        let mut max = T::neg_infinity();
        for (y, (&x, &m)) in y.iter_mut().zip(x.iter().zip(m)) {
            *y = scale * x + m;
            max = num_traits::Float::max(max, *y);
        }
        if max == T::neg_infinity() {
            // Every key masked: no attention (zeros), not NaN.
            y.iter_mut().for_each(|v| *v = T::zero());
            return;
        }
        let mut sum = T::zero();
        for v in y.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = T::one() / sum;
        y.iter_mut().for_each(|v| *v *= inv);
    });
    y
}

/// The gradient of `softmax(scale * x + mask)` with respect to `x`.
fn backward<T: Float>(y: &[T], g: &[T], tk: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(tk).zip(y.par_chunks(tk).zip(g.par_chunks(tk))).with_min_len(min_rows(tk)).for_each(|(dx, (y, g))| {
        let dot = y.iter().zip(g).map(|(&y, &g)| y * g).sum::<T>();
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *dx = scale * y * (g - dot);
        }
    });
    dx
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "dpo2d-masked-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let geo = Geometry::of(xl.dims(), self.mask.dims())?;
        let name = self.name();
        let y = with_float!(xs.dtype(), name, T => {
            let x = slice::<T>(xs, xl, name)?;
            let scale = T::from_f64(self.scale);
            T::to_cpu_storage_owned(with_slice::<T, _>(&self.mask, name, |m| forward(x, m, geo, scale))?)
        });
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::of(xl.dims(), self.mask.dims())?;
        super::cuda::softmax_fwd(xs, xl, &self.mask, (g.tq, g.tk, g.per_batch, g.mask_batches), self.scale)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward_tensor(y, g, self.scale)?.reshape(x.dims())?))
    }
}

/// The masked softmax's input gradient from its result `y` and the incoming
/// gradient `g` (inputs in that order, one shape).
struct SoftmaxGrad {
    scale: f64,
}

impl SoftmaxGrad {
    fn check(&self, yl: &Layout, gl: &Layout) -> Result<()> {
        if yl.dims() != gl.dims() {
            bail!("{}: result {:?} and gradient {:?} differ in shape", self.name(), yl.dims(), gl.dims());
        }
        Ok(())
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "dpo2d-masked-softmax-grad"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(yl, gl)?;
        let tk = *yl.dims().last().unwrap_or(&1);
        let name = self.name();
        let dx = with_float!(ys.dtype(), name, T => {
            T::to_cpu_storage_owned(backward(slice::<T>(ys, yl, name)?, slice::<T>(gs, gl, name)?, tk, T::from_f64(self.scale)))
        });
        Ok((dx, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check(yl, gl)?;
        super::cuda::softmax_bwd(ys, yl, gs, gl, self.scale)
    }
}

/// `softmax(scale * scores + mask)` outside autograd, for a caller that
/// writes its own backward ([`super::attention`]). `scores`:
/// `[B, n_kv, n_rep, Tq, Tk]` (any shape whose last two dims are `Tq, Tk`).
pub(crate) fn forward_tensor(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&MaskedSoftmax { mask: mask.contiguous()?, scale })
}

/// The gradient of [`forward_tensor`] with respect to its scores, from its
/// result `y` and the incoming gradient `g`.
pub(crate) fn backward_tensor(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale })
}

#[cfg(test)]
mod tests {
    use crate::ops::{masked_softmax, softmax_plain};
    use crate::test_support::det;
    use crate::tests::same_values_and_grads;
    use candle_core::{DType, Tensor};

    /// A causal mask with one extra masked key per row, `[mb, 1, 1, tq, tk]`.
    fn mask(mb: usize, tq: usize, tk: usize, dt: DType) -> Tensor {
        let mut m = vec![0f64; mb * tq * tk];
        for b in 0..mb {
            for i in 0..tq {
                for j in 0..tk {
                    let off = tk - tq;
                    if j > i + off || (j + b + 1) % 5 == 0 && j != i + off {
                        m[(b * tq + i) * tk + j] = f64::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (mb, 1, 1, tq, tk), &candle_core::Device::Cpu).unwrap().to_dtype(dt).unwrap()
    }

    #[test]
    fn matches_composed_values_and_gradients() {
        for (b, mb, heads, tq, tk, dt, tol) in
            [(2, 2, (3, 2), 7, 7, DType::F64, 1e-12), (2, 1, (1, 3), 1, 6, DType::F64, 1e-12), (1, 1, (3, 3), 33, 41, DType::F32, 1e-5)]
        {
            let x = (det(&[b, heads.0, heads.1, tq, tk], 3, dt) * 4.0).unwrap();
            let m = mask(mb, tq, tk, dt);
            let m2 = m.clone();
            same_values_and_grads(&[x], &move |t| masked_softmax(&t[0], &m), &move |t| softmax_plain(&t[0].broadcast_add(&m2)?), tol);
        }
    }

    #[test]
    fn fully_masked_row_gives_zeros() {
        let x = det(&[1, 1, 1, 2, 3], 1, DType::F32);
        let m = Tensor::new(&[0f32, 0., 0., f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY], &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 2, 3))
            .unwrap();
        let y = masked_softmax(&x, &m).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((y[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(&y[3..], &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn gradient_by_finite_differences() {
        let x = det(&[2, 3, 1, 4, 5], 3, DType::F64);
        let m = mask(2, 4, 5, DType::F64);
        crate::test_support::grad_check(&[x], &move |t| masked_softmax(&t[0], &m), 1e-6);
    }
}
