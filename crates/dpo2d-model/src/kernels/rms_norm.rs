//! RMSNorm over the last dim, `y = x / sqrt(mean(x^2) + eps) * w`, with a
//! backward that forms `dx` and `dw` in one pass over the rows.

use super::{min_rows, slice, tensor, with_float, with_slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The fused op; `x`: [.., H], `w`: [H], both contiguous.
pub struct RmsNorm {
    pub eps: f64,
}

fn inv_rms<T: Float>(x: &[T], eps: T) -> T {
    let n = T::from(x.len()).unwrap_or_else(T::one);
    let ms = x.iter().map(|&v| v * v).sum::<T>() / n;
    T::one() / (ms + eps).sqrt()
}

fn forward<T: Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(h).zip(x.par_chunks(h)).with_min_len(min_rows(h)).for_each(|(y, x)| {
        let r = inv_rms(x, eps);
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
    });
    y
}

/// `dx = r (g w) - x r^3 mean(g w x)`, `dw = sum over rows of g x r`.
fn backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: T) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let n = T::from(h).unwrap_or_else(T::one);
    let mut dx = vec![T::zero(); x.len()];
    let dw = dx
        .par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(g.par_chunks(h))
        .with_min_len(min_rows(h))
        .fold(
            || vec![T::zero(); h],
            |mut dw, ((dx, x), g)| {
                let r = inv_rms(x, eps);
                let dot = x.iter().zip(g).zip(w).map(|((&x, &g), &w)| g * w * x).sum::<T>() / n;
                let c = r * r * r * dot;
                for i in 0..h {
                    dx[i] = r * g[i] * w[i] - x[i] * c;
                    dw[i] += g[i] * x[i] * r;
                }
                dw
            },
        )
        .reduce(|| vec![T::zero(); h], |a, b| a.into_iter().zip(b).map(|(a, b)| a + b).collect());
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "dpo2d-rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let y = with_float!(xs.dtype(), name, T => {
            let (x, w) = (slice::<T>(xs, xl, name)?, slice::<T>(ws, wl, name)?);
            T::to_cpu_storage_owned(forward(x, w, self.eps as T))
        });
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::rms_norm_fwd(xs, xl, ws, wl, self.eps)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let g = g.contiguous()?;
            let dx = x.apply_op3_no_bwd(w, &g, &super::cuda::RmsNormDx { eps: self.eps })?;
            let dw =
                w.track_op().then(|| x.apply_op2_no_bwd(&g, &super::cuda::RmsNormDw { eps: self.eps })?.to_dtype(w.dtype())).transpose()?;
            return Ok((Some(dx), dw));
        }
        let name = self.name();
        with_float!(x.dtype(), name, T => {
            let (dx, dw) = with_slice::<T, _>(x, name, |x| {
                with_slice::<T, _>(w, name, |w| with_slice::<T, _>(g, name, |g| backward(x, w, g, self.eps as T)))
            })???;
            Ok((Some(tensor(dx, x.dims())?), w.track_op().then(|| tensor(dw, w.dims())).transpose()?))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::tests::same_values_and_grads;
    use crate::ops::{rms_norm, rms_norm_plain};
    use crate::test_support::det;
    use candle_core::DType;

    #[test]
    fn matches_composed_values_and_gradients() {
        for (shape, dt, tol) in [(vec![2, 3, 8], DType::F64, 1e-12), (vec![5, 7], DType::F64, 1e-12), (vec![3, 37, 576], DType::F32, 1e-5)]
        {
            let h = *shape.last().unwrap();
            let x = (det(&shape, 1, dt) * 3.0).unwrap();
            let w = det(&[h], 2, dt);
            same_values_and_grads(&[x, w], &|t| rms_norm(&t[0], &t[1], 1e-5), &|t| rms_norm_plain(&t[0], &t[1], 1e-5), tol);
        }
    }
}
