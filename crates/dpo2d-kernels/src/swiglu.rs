//! SwiGLU's gate, `silu(gate) * up`, in one pass; backward forms both input
//! gradients in one pass too (`silu'(x) = s (1 + x (1 - s))`, `s = sigmoid(x)`).

use super::{slice, with_float, Float, MIN_FLAT};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The fused op over two contiguous tensors of one shape.
pub struct SwiGlu;

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

fn forward<T: Float>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); gate.len()];
    y.par_iter_mut().zip(gate.par_iter().zip(up)).with_min_len(MIN_FLAT).for_each(|(y, (&a, &u))| *y = a * sigmoid(a) * u);
    y
}

/// Both input gradients into `out` (`2 n`: dgate, then dup).
fn backward<T: Float>(gate: &[T], up: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); 2 * gate.len()];
    let (dgate, dup) = out.split_at_mut(gate.len());
    dgate.par_iter_mut().zip(dup.par_iter_mut()).zip(gate.par_iter().zip(up).zip(g)).with_min_len(MIN_FLAT).for_each(
        |((dg, du), ((&a, &u), &g))| {
            let s = sigmoid(a);
            *du = g * a * s;
            *dg = g * u * s * (T::one() + a * (T::one() - s));
        },
    );
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "dpo2d-swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ in shape", gl.dims(), ul.dims());
        }
        let name = self.name();
        let y = with_float!(gs.dtype(), name, T => T::to_cpu_storage_owned(forward(slice::<T>(gs, gl, name)?, slice::<T>(us, ul, name)?)));
        Ok((y, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ in shape", gl.dims(), ul.dims());
        }
        super::cuda::swiglu_fwd(gs, gl, us, ul)
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = backward_tensors(gate, up, g)?;
        Ok((Some(dg), Some(du)))
    }
}

/// The gradients of `silu(gate) * up` with respect to `gate` and `up`, from
/// the incoming gradient `g`, for a caller that writes its own backward
/// ([`super::mlp`]).
/// SwiGLU's input gradients `[2, ..]` (dgate, then dup) from gate, up and
/// the incoming gradient, all of one shape and contiguous.
struct Grads;

impl CustomOp3 for Grads {
    fn name(&self) -> &'static str {
        "dpo2d-swiglu-grads"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = with_float!(gs.dtype(), name, T => {
            T::to_cpu_storage_owned(backward(slice::<T>(gs, gl, name)?, slice::<T>(us, ul, name)?, slice::<T>(os, ol, name)?))
        });
        Ok((out, super::pair_shape(gl.dims())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
        os: &candle_core::CudaStorage,
        ol: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::swiglu_grads(gs, gl, us, ul, os, ol)
    }
}

/// SwiGLU's input gradients (dgate, dup) for the incoming gradient `g`.
pub(crate) fn backward_tensors(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    if gate.dims() != up.dims() || gate.dims() != g.dims() {
        bail!("swiglu backward: gate {:?}, up {:?} and gradient {:?} differ in shape", gate.dims(), up.dims(), g.dims());
    }
    let both = gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &g.contiguous()?, &Grads)?;
    Ok((both.get(0)?, both.get(1)?))
}

#[cfg(test)]
mod tests {
    use crate::ops::{swiglu, swiglu_plain};
    use crate::test_support::det;
    use crate::tests::same_values_and_grads;
    use candle_core::DType;

    #[test]
    fn matches_composed_values_and_gradients() {
        for (shape, dt, tol) in [(vec![2, 3, 5], DType::F64, 1e-12), (vec![1], DType::F64, 1e-12), (vec![37, 1536], DType::F32, 1e-5)] {
            let a = (det(&shape, 1, dt) * 6.0).unwrap();
            let u = det(&shape, 2, dt);
            same_values_and_grads(&[a, u], &|t| swiglu(&t[0], &t[1]), &|t| swiglu_plain(&t[0], &t[1]), tol);
        }
    }

    #[test]
    fn gradient_by_finite_differences() {
        let a = (det(&[3, 7], 1, DType::F64) * 4.0).unwrap();
        let u = det(&[3, 7], 2, DType::F64);
        crate::test_support::grad_check(&[a, u], &|t| swiglu(&t[0], &t[1]), 1e-6);
    }
}
