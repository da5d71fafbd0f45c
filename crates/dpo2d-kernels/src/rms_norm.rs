//! RMSNorm over the last dim, `y = x / sqrt(mean(x^2) + eps) * w`, with a
//! backward that forms `dx` and `dw` in one pass over the rows.

use super::{min_rows, slice, tensor, with_float, with_slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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
///
/// `dw` is summed in blocks of rows fixed by the shape alone, then the
/// blocks' sums in order: the same bits on every run, whatever thread ran
/// which block (rayon's `fold`/`reduce` would group rows as the threads
/// happened to steal them).
fn backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: T) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let n = T::from(h).unwrap_or_else(T::one);
    let mut dx = vec![T::zero(); x.len()];
    if h == 0 {
        return (dx, vec![]);
    }
    let block = min_rows(h).max((x.len() / h).div_ceil(256)) * h;
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::zero(); h];
            for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                let r = inv_rms(x, eps);
                let dot = x.iter().zip(g).zip(w).map(|((&x, &g), &w)| g * w * x).sum::<T>() / n;
                let c = r * r * r * dot;
                for i in 0..h {
                    dx[i] = r * g[i] * w[i] - x[i] * c;
                    dw[i] += g[i] * x[i] * r;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![T::zero(); h];
    for p in partial {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
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
        let (dx, dw) = grads(x, w, g, self.eps)?;
        Ok((Some(dx), dw))
    }
}

/// The norm's gradients `(dx, dw)` for the incoming gradient `g` (`dw` only
/// when the weight is tracked).
fn grads(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Option<Tensor>)> {
    if !x.device().is_cpu() {
        // On a GPU, dx per row and dw summed over rows are two kernels.
        let (x, g) = (x.contiguous()?, g.contiguous()?);
        let dx = x.apply_op3_no_bwd(w, &g, &Dx { eps })?;
        let dw = w.track_op().then(|| x.apply_op2_no_bwd(&g, &Dw { eps })?.to_dtype(w.dtype())).transpose()?;
        return Ok((dx, dw));
    }
    // On the CPU one pass forms both.
    let name = "dpo2d-rms-norm";
    with_float!(x.dtype(), name, T => {
        let (dx, dw) = with_slice::<T, _>(x, name, |x| {
            with_slice::<T, _>(w, name, |w| with_slice::<T, _>(g, name, |g| backward(x, w, g, eps as T)))
        })???;
        Ok((tensor(dx, x.dims())?, w.track_op().then(|| tensor(dw, w.dims())).transpose()?))
    })
}

/// A pre-norm block's residual add and the following norm in one pass:
/// `h = a + b` and `rms_norm(h) * w`, as `[2, ..]` (h, then the normed h).
/// The sum is rounded to the inputs' dtype before it is normed, as the
/// composed ops do.
pub struct AddRmsNorm {
    pub eps: f64,
}

fn add_forward<T: Float>(a: &[T], b: &[T], w: &[T], eps: T) -> Vec<T> {
    let (h, n) = (w.len(), a.len());
    let mut out = vec![T::zero(); 2 * n];
    let (sum, y) = out.split_at_mut(n);
    sum.par_chunks_mut(h).zip(y.par_chunks_mut(h)).zip(a.par_chunks(h).zip(b.par_chunks(h))).with_min_len(min_rows(h)).for_each(
        |((s, y), (a, b))| {
            for ((s, &a), &b) in s.iter_mut().zip(a).zip(b) {
                *s = a + b;
            }
            let r = inv_rms(s, eps);
            for ((y, &x), &w) in y.iter_mut().zip(s.iter()).zip(w) {
                *y = x * r * w;
            }
        },
    );
    out
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "dpo2d-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        if bl.dims() != al.dims() || al.dims().last() != Some(&wl.shape().elem_count()) {
            candle_core::bail!("{name}: shapes {:?}, {:?} and weight {:?} do not fit", al.dims(), bl.dims(), wl.dims());
        }
        let out = with_float!(as_.dtype(), name, T => {
            let (a, b, w) = (slice::<T>(as_, al, name)?, slice::<T>(bs, bl, name)?, slice::<T>(ws, wl, name)?);
            T::to_cpu_storage_owned(add_forward(a, b, w, self.eps as T))
        });
        Ok((out, super::pair_shape(al.dims())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::add_rms_norm_fwd(as_, al, bs, bl, ws, wl, self.eps)
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        w: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Both inputs get the sum's gradient: its own plus the norm's.
        let (dx, dw) = grads(&res.get(0)?, w, &g.get(1)?, self.eps)?;
        let d = super::add(&g.get(0)?, &dx)?;
        Ok((Some(d.clone()), Some(d), dw))
    }
}

/// RMSNorm's `dx` from x, w and the incoming gradient (contiguous).
pub(crate) struct Dx {
    pub eps: f64,
}

impl CustomOp3 for Dx {
    fn name(&self) -> &'static str {
        "dpo2d-rms-norm-dx"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let dx = with_float!(xs.dtype(), name, T => {
            let (x, w, g) = (slice::<T>(xs, xl, name)?, slice::<T>(ws, wl, name)?, slice::<T>(gs, gl, name)?);
            T::to_cpu_storage_owned(backward(x, w, g, self.eps as T).0)
        });
        Ok((dx, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::rms_norm_dx(xs, xl, ws, wl, gs, gl, self.eps)
    }
}

/// RMSNorm's `dw` from x and the incoming gradient (contiguous; the hidden
/// size is x's last dimension), in f32 on a GPU (summed with atomics), in
/// x's dtype on the CPU.
pub(crate) struct Dw {
    pub eps: f64,
}

impl CustomOp2 for Dw {
    fn name(&self) -> &'static str {
        "dpo2d-rms-norm-dw"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let h = *xl.dims().last().unwrap_or(&1);
        let dw = with_float!(xs.dtype(), name, T => {
            let (x, g) = (slice::<T>(xs, xl, name)?, slice::<T>(gs, gl, name)?);
            // dw does not depend on w: the pass with unit weights.
            T::to_cpu_storage_owned(backward(x, &vec![T::one(); h], g, self.eps as T).1)
        });
        Ok((dw, Shape::from(h)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::rms_norm_dw(xs, xl, gs, gl, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::{Dw, Dx};
    use crate::ops::{rms_norm, rms_norm_plain};
    use crate::test_support::det;
    use crate::tests::{same_values_and_grads, value_and_grads};
    use candle_core::DType;

    #[test]
    fn weight_gradient_has_the_same_bits_on_any_number_of_threads() {
        let (rows, h) = (3001, 48);
        let x = det(&[rows, h], 1, DType::F32).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = (det(&[rows, h], 2, DType::F32) * 4.0).unwrap().exp().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = det(&[h], 3, DType::F32).to_vec1::<f32>().unwrap();
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (dx, dw) = pool.install(|| super::backward(&x, &w, &g, 1e-5));
            (dx.iter().chain(&dw).map(|v| v.to_bits()).collect::<Vec<u32>>(), dw)
        };
        let one = on(1);
        for threads in [2, 3, 4, 7] {
            let (bits, dw) = on(threads);
            assert!(bits == one.0, "{threads} threads: dw {:?} vs {:?}", &dw[..4], &one.1[..4]);
        }
    }

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

    /// The GPU's two backward ops, run on the CPU, against the gradients of
    /// the composed norm.
    #[test]
    fn split_backward_ops_match_composed_gradients() {
        for (shape, dt, tol) in [(vec![2, 3, 8], DType::F64, 1e-12), (vec![37, 576], DType::F32, 1e-5)] {
            let h = *shape.last().unwrap();
            let x = (det(&shape, 1, dt) * 3.0).unwrap();
            let w = det(&[h], 2, dt);
            let (y, grads) = value_and_grads(&[x.clone(), w.clone()], &|t| rms_norm_plain(&t[0], &t[1], 1e-5));
            // value_and_grads projects with det(.., 77): the incoming gradient.
            let g = det(y.dims(), 77, dt);
            let dx = x.apply_op3_no_bwd(&w, &g, &Dx { eps: 1e-5 }).unwrap();
            let dw = x.apply_op2_no_bwd(&g, &Dw { eps: 1e-5 }).unwrap();
            crate::test_support::assert_close(&dx, &grads[0], tol, "dx");
            crate::test_support::assert_close(&dw, &grads[1], tol, "dw");
        }
    }

    /// The residual add and norm in one op against the composed sum and norm:
    /// both results, and the gradients of both inputs and the weight.
    #[test]
    fn add_and_norm_match_composed_values_and_gradients() {
        let both = |h: candle_core::Tensor, y: candle_core::Tensor| candle_core::Tensor::cat(&[h, y], 0);
        for (shape, dt, tol) in [(vec![2, 3, 8], DType::F64, 1e-12), (vec![37, 576], DType::F32, 1e-5)] {
            let h = *shape.last().unwrap();
            let (a, b, w) = ((det(&shape, 1, dt) * 3.0).unwrap(), det(&shape, 3, dt), det(&[h], 2, dt));
            same_values_and_grads(
                &[a, b, w],
                &|t| {
                    let (h, y) = crate::ops::add_rms_norm(&t[0], &t[1], &t[2], 1e-5)?;
                    both(h, y)
                },
                &|t| {
                    let h = (&t[0] + &t[1])?;
                    let y = rms_norm_plain(&h, &t[2], 1e-5)?;
                    both(h, y)
                },
                tol,
            );
        }
    }

    #[test]
    fn add_and_norm_gradient_by_finite_differences() {
        let (a, b, w) = (det(&[3, 7], 1, DType::F64), det(&[3, 7], 2, DType::F64), det(&[7], 3, DType::F64));
        crate::test_support::grad_check(
            &[a, b, w],
            &|t| {
                let (h, y) = crate::ops::add_rms_norm(&t[0], &t[1], &t[2], 1e-5)?;
                (h.sqr()? + y)?.sum_all()
            },
            1e-6,
        );
    }
}
