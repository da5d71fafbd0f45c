//! The AdamW update of one parameter as two parallel in-place passes
//! (moments, then the parameter) instead of a dozen composed tensor ops
//! (which remain for parameters the kernel does not take), plus the sum of
//! squares that gradient clipping needs.
//!
//! The update is PyTorch's `torch.optim.AdamW`, with the gradient first
//! multiplied by `grad_scale` (the clipping factor):
//! `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//!  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

use super::{slice, with_slice, MIN_FLAT};
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;

/// One update's scalars.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The update's number, from 1 (bias correction).
    pub step: u64,
    /// Multiplies the gradient (gradient clipping).
    pub grad_scale: f64,
}

/// Whether the fused kernel takes a parameter of this kind (f32, on the CPU
/// or, with the CUDA kernels, on the GPU).
fn supports(param: &Tensor) -> bool {
    param.dtype() == DType::F32 && super::fused(param)
}

/// The contiguous f32 elements an in-place op writes.
fn dst_f32<'a>(dst: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (dst, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("adamw: the {what} must be contiguous f32"),
    }
}

/// Moments `[2, N]` (first row m, second v), f32, updated from the gradient.
struct Moments(AdamWStep);

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "dpo2d-adamw-moments"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<()> {
        let g = slice::<f32>(gs, gl, self.name())?;
        let (m, v) = dst_f32(dst, dl, "moments")?.split_at_mut(g.len());
        let s = self.0;
        let (b1, b2, scale) = (s.beta1 as f32, s.beta2 as f32, s.grad_scale as f32);
        let (c1, c2) = ((1.0 - s.beta1) as f32, (1.0 - s.beta2) as f32);
        m.par_iter_mut().zip(v.par_iter_mut()).zip(g.par_iter()).with_min_len(MIN_FLAT).for_each(|((m, v), &g)| {
            let g = g * scale;
            *m = b1 * *m + c1 * g;
            *v = b2 * *v + c2 * g * g;
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, dl: &Layout, gs: &candle_core::CudaStorage, gl: &Layout) -> Result<()> {
        let s = self.0;
        let k = [s.beta1 as f32, s.beta2 as f32, (1.0 - s.beta1) as f32, (1.0 - s.beta2) as f32, s.grad_scale as f32];
        super::cuda::adamw_moments(dst, dl, gs, gl, k)
    }
}

/// The parameter (f32), updated from the moments.
struct Update(AdamWStep);

impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "dpo2d-adamw-update"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, ms: &CpuStorage, ml: &Layout) -> Result<()> {
        let mv = slice::<f32>(ms, ml, self.name())?;
        let p = dst_f32(dst, dl, "parameter")?;
        let (m, v) = mv.split_at(p.len());
        let [decay, step_size, inv_bc2_sqrt, eps] = self.scalars();
        p.par_iter_mut().zip(m.par_iter().zip(v)).with_min_len(MIN_FLAT).for_each(|(p, (&m, &v))| {
            *p = *p * decay - step_size * m / (v.sqrt() * inv_bc2_sqrt + eps);
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, dl: &Layout, ms: &candle_core::CudaStorage, ml: &Layout) -> Result<()> {
        super::cuda::adamw_update(dst, dl, ms, ml, self.scalars())
    }
}

impl Update {
    /// The update's f32 scalars: decay, step size, `1/sqrt(1 - b2^t)`, eps.
    fn scalars(&self) -> [f32; 4] {
        let s = self.0;
        let t = s.step as i32;
        [
            (1.0 - s.lr * s.weight_decay) as f32,
            (s.lr / (1.0 - s.beta1.powi(t))) as f32,
            (1.0 / (1.0 - s.beta2.powi(t)).sqrt()) as f32,
            s.eps as f32,
        ]
    }
}

/// Zeroed moments for a parameter: `[2, N]` f32 on its device.
pub fn new_moments(param: &Tensor) -> Result<Tensor> {
    Tensor::zeros((2, param.elem_count()), DType::F32, param.device())
}

/// The f32 copy that an update of a half-precision parameter works on
/// (mixed precision: the update of a bf16 weight by lr 1e-6 would round
/// away), flat; `None` for f32 parameters, which are updated directly.
pub fn new_master(param: &Tensor) -> Result<Option<Tensor>> {
    (param.dtype() != DType::F32).then(|| param.to_dtype(DType::F32)?.flatten_all()?.contiguous()).transpose()
}

/// Updates `param` and its `moments` (from [`new_moments`]). An f32
/// parameter is updated itself; a half-precision one through its f32
/// `master` copy (from [`new_master`]), which it is then set to, rounded.
/// The update runs in place with the fused kernel (CPU, or CUDA), else with
/// [`composed_update`] in f32, the moments replaced.
pub fn adamw_step(param: &Var, moments: &mut Tensor, master: Option<&mut Tensor>, grad: &Tensor, s: AdamWStep) -> Result<()> {
    let n = param.elem_count();
    if moments.dims() != [2, n] || grad.elem_count() != n || master.as_ref().is_some_and(|m| m.elem_count() != n) {
        bail!("adamw: parameter {:?}, moments {:?}, gradient {:?} do not fit", param.dims(), moments.dims(), grad.dims());
    }
    match master {
        Some(master) => {
            if let Some(updated) = update_f32(master, moments, grad, s)? {
                *master = updated;
            }
            param.set(&master.reshape(param.dims())?.to_dtype(param.dtype())?)?;
        }
        None => {
            if let Some(updated) = update_f32(param.as_tensor(), moments, grad, s)? {
                param.set(&updated.reshape(param.dims())?.to_dtype(param.dtype())?)?;
            }
        }
    }
    Ok(())
}

/// One update of the f32 weights `p`: in place (returns None) where the fused
/// kernel takes them, else the updated weights, flat.
fn update_f32(p: &Tensor, moments: &mut Tensor, grad: &Tensor, s: AdamWStep) -> Result<Option<Tensor>> {
    if supports(p) {
        // The CUDA kernel reads bf16 gradients as they are; the CPU one takes f32.
        let grad = if p.device().is_cuda() { grad.contiguous()? } else { grad.to_dtype(DType::F32)?.contiguous()? };
        moments.inplace_op2(&grad, &Moments(s))?;
        p.inplace_op2(moments, &Update(s))?;
        return Ok(None);
    }
    let f32_flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all();
    let (p, m, v) = composed_update(&f32_flat(p)?, &moments.get(0)?, &moments.get(1)?, &f32_flat(grad)?, s)?;
    *moments = Tensor::stack(&[m, v], 0)?;
    Ok(Some(p))
}

/// The same update with composed tensor ops, in the inputs' dtype:
/// `(param, m, v)` after one step.
pub fn composed_update(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    let g = (g * s.grad_scale)?;
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let t = s.step as i32;
    let denom = ((v.sqrt()? / (1.0 - s.beta2.powi(t)).sqrt())? + s.eps)?;
    let p = ((p * (1.0 - s.lr * s.weight_decay))? - ((&m / denom)? * (s.lr / (1.0 - s.beta1.powi(t))))?)?;
    Ok((p, m, v))
}

/// Sum of the squares of a tensor's elements, accumulated in f64, as a `[1]`
/// tensor on its device: sum many of these and read the total once (on a
/// GPU one kernel over many blocks, and no copy to the host per tensor).
pub fn sum_squares(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::on_gpu(t) {
        return super::cuda::sum_squares(t);
    }
    if !super::supports(t) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.reshape(1);
    }
    // `as f64` converts f32 and is a no-op for f64: one body serves both.
    #[allow(clippy::unnecessary_cast)]
    let sum: f64 = super::with_float!(t.dtype(), "sum of squares", T => {
        with_slice::<T, _>(t, "sum of squares", |v| v.par_chunks(MIN_FLAT).map(|c| {
            // Eight running sums: one would chain every add on the last (the
            // compiler may not reorder float adds), a quarter of the speed.
            let mut acc = [0f64; 8];
            let mut lanes = c.chunks_exact(8);
            for l in &mut lanes {
                for (a, &x) in acc.iter_mut().zip(l) {
                    *a += (x as f64) * (x as f64);
                }
            }
            acc.iter().sum::<f64>() + lanes.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
        }).sum())
    })?;
    Tensor::new(&[sum], t.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::det;

    #[test]
    fn matches_composed_update_over_steps() {
        let n = 70_001; // more than one rayon task, not a multiple of one
        let p0 = det(&[n], 1, DType::F64);
        let param = Var::from_tensor(&p0.to_dtype(DType::F32).unwrap()).unwrap();
        let mut moments = new_moments(&param).unwrap();
        let (mut p, mut m, mut v) = (p0.clone(), p0.zeros_like().unwrap(), p0.zeros_like().unwrap());
        for step in 1..=3u64 {
            let g = det(&[n], 10 + step, DType::F64);
            let s = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
            adamw_step(&param, &mut moments, None, &g.to_dtype(DType::F32).unwrap(), s).unwrap();
            (p, m, v) = composed_update(&p, &m, &v, &g, s).unwrap();
        }
        assert!(crate::test_support::max_abs_diff(param.as_tensor(), &p) < 1e-6);
        assert!(crate::test_support::max_abs_diff(&moments.get(0).unwrap(), &m) < 1e-6);
        assert!(crate::test_support::max_abs_diff(&moments.get(1).unwrap(), &v) < 1e-7);
    }

    #[test]
    fn sum_of_squares() {
        let t = det(&[3, 40_000], 4, DType::F32);
        let want = t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let got = sum_squares(&t).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-9 * want);
    }
}
