//! The AdamW update of one parameter as two parallel in-place passes
//! (moments, then the parameter) instead of a dozen composed tensor ops,
//! plus the sum of squares that gradient clipping needs.
//!
//! The update is PyTorch's `torch.optim.AdamW`, with the gradient first
//! multiplied by `grad_scale` (the clipping factor):
//! `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//!  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

use super::{slice, with_slice, MIN_FLAT};
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
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

/// Whether [`adamw_step`] takes a parameter of this kind (f32 on the CPU).
pub fn supports(param: &Tensor) -> bool {
    param.device().is_cpu() && param.dtype() == DType::F32
}

/// Moments `[2, N]` (first row m, second v), f32, updated from the gradient.
struct Moments(AdamWStep);

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "dpo2d-adamw-moments"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<()> {
        let g = slice::<f32>(gs, gl, self.name())?;
        let Some((a, b)) = dl.contiguous_offsets() else { bail!("adamw: moments not contiguous") };
        let CpuStorage::F32(mv) = dst else { bail!("adamw: moments must be f32") };
        let (m, v) = mv[a..b].split_at_mut(g.len());
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
}

/// The parameter (f32), updated from the moments.
struct Update(AdamWStep);

impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "dpo2d-adamw-update"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, ms: &CpuStorage, ml: &Layout) -> Result<()> {
        let mv = slice::<f32>(ms, ml, self.name())?;
        let Some((a, b)) = dl.contiguous_offsets() else { bail!("adamw: parameter not contiguous") };
        let CpuStorage::F32(p) = dst else { bail!("adamw: the fused update takes f32 parameters") };
        let p = &mut p[a..b];
        let (m, v) = mv.split_at(p.len());
        let s = self.0;
        let t = s.step as i32;
        let decay = (1.0 - s.lr * s.weight_decay) as f32;
        let step_size = (s.lr / (1.0 - s.beta1.powi(t))) as f32;
        let inv_bc2_sqrt = (1.0 / (1.0 - s.beta2.powi(t)).sqrt()) as f32;
        let eps = s.eps as f32;
        p.par_iter_mut().zip(m.par_iter().zip(v)).with_min_len(MIN_FLAT).for_each(|(p, (&m, &v))| {
            *p = *p * decay - step_size * m / (v.sqrt() * inv_bc2_sqrt + eps);
        });
        Ok(())
    }
}

/// Zeroed moments for a parameter: `[2, N]` f32 on its device.
pub fn new_moments(param: &Tensor) -> Result<Tensor> {
    Tensor::zeros((2, param.elem_count()), DType::F32, param.device())
}

/// Updates `param` and its `moments` (from [`new_moments`]) in place.
pub fn adamw_step(param: &Tensor, moments: &Tensor, grad: &Tensor, s: AdamWStep) -> Result<()> {
    if !supports(param) || moments.dims() != [2, param.elem_count()] || grad.elem_count() != param.elem_count() {
        bail!(
            "adamw: parameter {:?} ({:?}), moments {:?}, gradient {:?} do not fit",
            param.dims(),
            param.dtype(),
            moments.dims(),
            grad.dims()
        );
    }
    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
    moments.inplace_op2(&grad, &Moments(s))?;
    param.inplace_op2(moments, &Update(s))
}

/// Sum of the squares of a tensor's elements, accumulated in f64.
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    if !t.device().is_cpu() || !matches!(t.dtype(), DType::F32 | DType::F64) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    super::with_float!(t.dtype(), "sum of squares", T => {
        with_slice::<T, _>(t, "sum of squares", |v| v.par_chunks(MIN_FLAT).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::det;

    /// The same update written with composed tensor ops, in f64.
    fn composed(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: AdamWStep) -> (Tensor, Tensor, Tensor) {
        let g = (g * s.grad_scale).unwrap();
        let m = ((m * s.beta1).unwrap() + (&g * (1.0 - s.beta1)).unwrap()).unwrap();
        let v = ((v * s.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - s.beta2)).unwrap()).unwrap();
        let t = s.step as i32;
        let denom = ((v.sqrt().unwrap() / (1.0 - s.beta2.powi(t)).sqrt()).unwrap() + s.eps).unwrap();
        let upd = ((&m / denom).unwrap() * (s.lr / (1.0 - s.beta1.powi(t)))).unwrap();
        let p = ((p * (1.0 - s.lr * s.weight_decay)).unwrap() - upd).unwrap();
        (p, m, v)
    }

    #[test]
    fn matches_composed_update_over_steps() {
        let n = 70_001; // more than one rayon task, not a multiple of one
        let p0 = det(&[n], 1, DType::F64);
        let param = p0.to_dtype(DType::F32).unwrap();
        let moments = new_moments(&param).unwrap();
        let (mut p, mut m, mut v) = (p0.clone(), p0.zeros_like().unwrap(), p0.zeros_like().unwrap());
        for step in 1..=3u64 {
            let g = det(&[n], 10 + step, DType::F64);
            let s = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
            adamw_step(&param, &moments, &g.to_dtype(DType::F32).unwrap(), s).unwrap();
            (p, m, v) = composed(&p, &m, &v, &g, s);
        }
        assert!(crate::test_support::max_abs_diff(&param, &p) < 1e-6);
        assert!(crate::test_support::max_abs_diff(&moments.get(0).unwrap(), &m) < 1e-6);
        assert!(crate::test_support::max_abs_diff(&moments.get(1).unwrap(), &v) < 1e-7);
    }

    #[test]
    fn sum_of_squares() {
        let t = det(&[3, 40_000], 4, DType::F32);
        let want = t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((sum_squares(&t).unwrap() - want).abs() < 1e-9 * want);
    }
}
