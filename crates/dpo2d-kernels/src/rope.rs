//! Rotary position embedding ("rotate half", as Hugging Face Llama) fused
//! with the head transpose: the projection's `[B, T, H, D]` output goes in,
//! the attention's `[B, H, T, D]` layout comes out, so the copy that
//! `transpose(1, 2).contiguous()` would make is the rotation itself. The
//! backward rotates the gradient by the opposite angle and transposes back.

use super::{min_rows, slice, tensor, with_float, with_slice, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The fused op; the input is `[B, T, H, D]`, contiguous.
pub struct RopeHeads {
    /// `[B, T, D/2]` each, same dtype as the input.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Rotates `src` (one row of D) into `dst`: `dst = src * cos + rotate_half(src) * sin * sign`.
fn rotate<T: Float>(src: &[T], cos: &[T], sin: &[T], sign: T, dst: &mut [T]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (src[i], src[i + half]);
        let (c, s) = (cos[i], sin[i] * sign);
        dst[i] = a * c - b * s;
        dst[i + half] = b * c + a * s;
    }
}

/// Dims `(b, t, h, d)`; `to_heads`: `[B,T,H,D] -> [B,H,T,D]` (forward), else
/// the reverse with the opposite angle (backward).
fn run<T: Float>(x: &[T], cos: &[T], sin: &[T], dims: (usize, usize, usize, usize), to_heads: bool) -> Vec<T> {
    let (_, t, h, d) = dims;
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    let sign = if to_heads { T::one() } else { -T::one() };
    out.par_chunks_mut(d).enumerate().with_min_len(min_rows(d)).for_each(|(row, dst)| {
        // Output row -> (batch, token) and the matching input row.
        let (b, ti, src_row) = if to_heads {
            let (b, rest) = (row / (h * t), row % (h * t));
            let (hi, ti) = (rest / t, rest % t);
            (b, ti, (b * t + ti) * h + hi)
        } else {
            let (b, rest) = (row / (t * h), row % (t * h));
            let (ti, hi) = (rest / h, rest % h);
            (b, ti, (b * h + hi) * t + ti)
        };
        let a = (b * t + ti) * half;
        rotate(&x[src_row * d..(src_row + 1) * d], &cos[a..a + half], &sin[a..a + half], sign, dst);
    });
    out
}

impl RopeHeads {
    fn check(&self, dims: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let [b, t, h, d] = dims else { bail!("rope: expected [B, T, H, D], got {dims:?}") };
        if d % 2 != 0 || self.cos.dims() != [*b, *t, d / 2] || self.sin.dims() != self.cos.dims() {
            bail!("rope: input {dims:?} does not fit cos/sin {:?}", self.cos.dims());
        }
        Ok((*b, *t, *h, *d))
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "dpo2d-rope-heads"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.check(xl.dims())?;
        let name = self.name();
        let out = with_float!(xs.dtype(), name, T => {
            let x = slice::<T>(xs, xl, name)?;
            let y = with_slice::<T, _>(&self.cos, name, |c| with_slice::<T, _>(&self.sin, name, |s| run(x, c, s, dims, true)))??;
            T::to_cpu_storage_owned(y)
        });
        let (b, t, h, d) = dims;
        Ok((out, Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.backward_tensor(g, x.dims()).map(Some)
    }
}

impl RopeHeads {
    /// The input's gradient (`input_dims`, `[B, T, H, D]`) from the output's
    /// `g` (`[B, H, T, D]`): only the shape of the input is needed, so a
    /// caller that writes its own backward ([`super::block`]) need not keep
    /// the input.
    pub(crate) fn backward_tensor(&self, g: &Tensor, input_dims: &[usize]) -> Result<Tensor> {
        let dims = self.check(input_dims)?;
        let name = "dpo2d-rope-heads";
        with_float!(g.dtype(), name, T => {
            let dx = with_slice::<T, _>(g, name, |g| {
                with_slice::<T, _>(&self.cos, name, |c| with_slice::<T, _>(&self.sin, name, |s| run(g, c, s, dims, false)))
            })???;
            tensor(dx, input_dims)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::{rope_heads, rope_plain};
    use crate::test_support::det;
    use crate::tests::same_values_and_grads;
    use candle_core::DType;

    #[test]
    fn matches_composed_values_and_gradients() {
        for ((b, t, h, d), dt, tol) in
            [((2, 3, 4, 8), DType::F64, 1e-12), ((1, 5, 3, 2), DType::F64, 1e-12), ((2, 17, 9, 64), DType::F32, 1e-5)]
        {
            let x = det(&[b, t, h, d], 4, dt);
            let ang = (det(&[b, t, d / 2], 5, DType::F64) * 3.0).unwrap();
            let (c, s) = (ang.cos().unwrap().to_dtype(dt).unwrap(), ang.sin().unwrap().to_dtype(dt).unwrap());
            let (c2, s2) = (c.clone(), s.clone());
            same_values_and_grads(
                &[x],
                &move |t| rope_heads(&t[0], &c, &s),
                &move |t| rope_plain(&t[0].transpose(1, 2)?.contiguous()?, &c2, &s2),
                tol,
            );
        }
    }

    #[test]
    fn gradient_by_finite_differences() {
        let x = det(&[2, 3, 4, 8], 4, DType::F64);
        let ang = (det(&[2, 3, 4], 5, DType::F64) * 3.0).unwrap();
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        crate::test_support::grad_check(&[x], &move |t| rope_heads(&t[0], &c, &s), 1e-6);
    }
}
