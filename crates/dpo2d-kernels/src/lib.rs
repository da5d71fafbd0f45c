//! The differentiable ops of the training path ([`ops`]) and the fused
//! kernels behind them: each kernel a candle custom op with a forward and a
//! backward, multi-threaded over rows with rayon (the pool the matrix
//! products already use, so no second pool spins beside it). A crate of its
//! own: it knows tensors, not models, and the model code above it is built
//! from [`ops`] alone.
//!
//! Why: composed candle ops make one pass over memory per primitive and run
//! element-wise work on one thread; a fused op reads its inputs once and
//! keeps both cores busy. Every kernel has a composed twin in
//! [`ops`] (`*_plain`) that the tests hold it to, values and
//! gradients. Kernels exist for f32 and f64 (f64 for the gradient checks);
//! other dtypes and devices take the composed path. With the `cuda` feature,
//! RMSNorm, the masked softmax, SwiGLU, the label log-probs, dropout, the
//! sum of squares and AdamW (every parameter in one launch) also have CUDA
//! kernels ([`cuda`]) behind the same ops, forward and backward, checked
//! against the same references; each op's CPU implementation is the twin
//! that CI tests. The attention and MLP graph nodes run on a GPU too (their
//! products through cuBLAS, the rest in those kernels). The whole-block
//! node is CPU only.

pub mod adamw;
pub mod attention;
pub mod block;
pub mod check;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dropout;
mod gemm;
mod lock_all;
pub mod logprobs;
pub mod lora;
pub mod mlp;
pub mod ops;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};

/// A weight of a fused graph node and the sink its gradient goes to.
pub type Param<'a> = (&'a Tensor, &'a std::sync::Arc<crate::ops::GradSink>);
use rayon::prelude::*;

/// The element types the kernels are written for.
pub trait Float: num_traits::Float + WithDType + Send + Sync + std::iter::Sum + std::ops::AddAssign {}
impl Float for f32 {}
impl Float for f64 {}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! with_float {
    ($dtype:expr, $name:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                #[allow(unused_imports)]
                use $crate::prelude::*;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                #[allow(unused_imports)]
                use $crate::prelude::*;
                $body
            }
            dt => candle_core::bail!("{}: no CPU kernel for {dt:?}", $name),
        }
    };
}
pub(crate) use with_float;

/// Traits the kernels' dtype-specific code calls through.
pub(crate) mod prelude {
    pub use candle_core::WithDType as _;
    pub use num_traits::One as _;
    pub use num_traits::Zero as _;
}

/// Whether the CPU kernels can take tensors of this kind.
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Whether the ops with both a CPU and a CUDA kernel (RMSNorm, masked
/// softmax, SwiGLU, AdamW, and the attention and MLP nodes built on them)
/// take tensors of this kind.
pub fn fused(t: &Tensor) -> bool {
    supports(t) || on_gpu(t)
}

/// Whether the larger graph nodes (attention, the MLP, the whole decoder
/// block) are used where they can run. `DPO2D_FUSED_NODES=0` takes the
/// composed ops instead, on any device: for comparisons, and a way around
/// the nodes should one misbehave on a device they have not run on.
pub fn nodes_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DPO2D_FUSED_NODES").map(|v| v != "0").unwrap_or(true))
}

/// Whether the CUDA kernels take this tensor (never, in a build without CUDA).
pub fn on_gpu(_t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return cuda::supports(_t);
    #[cfg(not(feature = "cuda"))]
    false
}

/// The contiguous elements of a CPU storage as a slice.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input is not contiguous"),
    }
}

/// Calls `f` with the elements of a (made contiguous) CPU tensor.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, op: &str, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cs) => Ok(f(slice::<T>(cs, l, op)?)),
        _ => bail!("{op}: the CPU kernel got a tensor on another device"),
    }
}

/// `[2, ..dims]`: the shape of an op's two results of one shape, stacked.
pub(crate) fn pair_shape(dims: &[usize]) -> candle_core::Shape {
    let mut d = vec![2];
    d.extend_from_slice(dims);
    candle_core::Shape::from(d)
}

/// A CPU tensor from a vector.
pub(crate) fn tensor<T: WithDType>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Rows per rayon task: at least ~16k elements, so splitting pays for itself.
pub(crate) fn min_rows(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Elements per rayon task for flat element-wise kernels.
pub(crate) const MIN_FLAT: usize = 16 * 1024;

/// `a + b` for tensors of one shape, in parallel (gradient accumulation);
/// other cases go to candle's `+`.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !supports(a) || a.dtype() != b.dtype() || a.dims() != b.dims() {
        return a + b;
    }
    with_float!(a.dtype(), "add", T => {
        let sum = with_slice::<T, _>(a, "add", |a| {
            with_slice::<T, _>(b, "add", |b| {
                let mut out = vec![T::zero(); a.len()];
                out.par_iter_mut().zip(a.par_iter().zip(b)).with_min_len(MIN_FLAT).for_each(|(o, (&x, &y))| *o = x + y);
                out
            })
        })??;
        tensor(sum, a.dims())
    })
}

/// Adds `g` into an optional running sum (gradient accumulation): the first
/// gradient is kept as it comes, later ones go through [`add`].
pub fn accumulate(acc: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        None => g,
        Some(a) => add(&a, &g)?,
    });
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::test_support::det;
    use candle_core::{DType, Tensor, Var};

    /// Forward values and input gradients (for `sum(f(x) * proj)`) of a
    /// function at `xs`.
    pub fn value_and_grads(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let proj = det(y.dims(), 77, y.dtype());
        let grads = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = vars.iter().map(|v| grads.get(v.as_tensor()).expect("no gradient").clone()).collect();
        (y.detach(), gs)
    }

    /// A fused op and its composed twin agree in value and in every input
    /// gradient, to `tol` (absolute, relative to the largest magnitude).
    pub fn same_values_and_grads(
        xs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        plain: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        tol: f64,
    ) {
        let (ya, ga) = value_and_grads(xs, fused);
        let (yb, gb) = value_and_grads(xs, plain);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            assert_eq!(a.dims(), b.dims(), "{what}: shapes");
            let scale = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap().max(1.0);
            let d = crate::test_support::max_abs_diff(a, b);
            assert!(d <= tol * scale, "{what}: max abs diff {d} > {tol} x {scale}");
        };
        close(&ya, &yb, "value");
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            close(a, b, &format!("gradient of input {i}"));
        }
    }

    #[test]
    fn parallel_add_matches_candle() {
        for (shape, dt) in [(vec![3, 50_001], DType::F32), (vec![7], DType::F64)] {
            let (a, b) = (det(&shape, 1, dt), det(&shape, 2, dt));
            assert_eq!(crate::test_support::max_abs_diff(&super::add(&a, &b).unwrap(), &(&a + &b).unwrap()), 0.0);
        }
    }
}
