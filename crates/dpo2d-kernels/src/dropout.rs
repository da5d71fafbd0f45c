//! Inverted dropout (LoRA's `lora_dropout`) where the activations live:
//! masks of 0 or `1 / (1 - p)` from a counter-based stream, so every
//! element is computed on its own (in parallel on the CPU, one thread per
//! element on a GPU) and both devices give the same bits. [`dropout`]
//! applies the mask without ever storing it: backward draws it again from
//! the same counter.
//!
//! Why: drawn one after another on one CPU thread and uploaded, the masks
//! of a LoRA step on a 7B model (about a billion elements) took longer than
//! the step itself on a GPU; and a stored mask per adapted layer is an
//! activation-sized tensor kept for backward.
//!
//! The stream is splitmix64 over the counter `start + (j + 1) * GOLDEN`:
//! draw `j` gives two 32-bit uniforms, its low half for element `2j` and its
//! high half for element `2j + 1`. An element is dropped when its uniform
//! is below `p * 2^32`.

use super::{slice, MIN_FLAT};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// The increment of the stream's counter (splitmix64's).
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Dropout probabilities are in [0, 1).
fn check_p(p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability must be in [0, 1), got {p}");
    }
    Ok(())
}

/// The op: a mask shaped like its input (whose values it does not read),
/// in the input's dtype, on the input's device.
pub struct DropoutMask {
    /// The stream's counter before this mask.
    pub start: u64,
    /// The probability of dropping an element, in [0, 1).
    pub p: f64,
}

impl DropoutMask {
    /// Elements whose uniform falls below this are dropped.
    fn threshold(&self) -> u64 {
        (self.p * 4294967296.0) as u64
    }

    /// What a kept element is scaled by (rounded to f32 first on every
    /// device, so that bf16 masks agree bit for bit).
    fn keep(&self) -> f64 {
        (1.0 / (1.0 - self.p)) as f32 as f64
    }

    /// The counter after a mask of `n` elements: the next mask's `start`.
    pub fn next_start(start: u64, n: usize) -> u64 {
        start.wrapping_add(GOLDEN.wrapping_mul(n.div_ceil(2) as u64))
    }

    fn fill<T: WithDType>(&self, n: usize) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); n];
        self.each(&mut out, |_, m| m);
        out
    }

    /// Sets every `out[i] = f(i, mask[i])`, in parallel. Chunks have an even
    /// length, so each starts at the low half of a draw.
    fn each<T: WithDType>(&self, out: &mut [T], f: impl Fn(usize, T) -> T + Sync) {
        let (thresh, keep, zero) = (self.threshold(), T::from_f64(self.keep()), T::from_f64(0.0));
        out.par_chunks_mut(MIN_FLAT).enumerate().for_each(|(c, chunk)| {
            let first_draw = (c * MIN_FLAT / 2) as u64;
            for (j, pair) in chunk.chunks_mut(2).enumerate() {
                let z = mix(self.start.wrapping_add(GOLDEN.wrapping_mul(first_draw + j as u64 + 1)));
                for (k, (v, half)) in pair.iter_mut().zip([z & 0xffff_ffff, z >> 32]).enumerate() {
                    *v = f(c * MIN_FLAT + 2 * j + k, if half < thresh { zero } else { keep });
                }
            }
        });
    }
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dpo2d-dropout-mask"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        check_p(self.p)?;
        let n = l.shape().elem_count();
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.fill(n)),
            DType::F64 => CpuStorage::F64(self.fill(n)),
            DType::BF16 => CpuStorage::BF16(self.fill(n)),
            DType::F16 => CpuStorage::F16(self.fill(n)),
            d => bail!("{}: no mask for {d:?}", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        check_p(self.p)?;
        let storage = super::cuda::dropout_mask(s.device(), s.dtype(), l.shape().elem_count(), self.start, self.threshold(), self.keep())?;
        Ok((storage, l.shape().clone()))
    }
}

/// `x * mask`, the mask drawn from the stream at `start` as [`DropoutMask`]
/// draws it, in one pass and never stored: backward (`g * mask`) is the
/// same op on the gradient.
pub struct Dropout {
    pub start: u64,
    pub p: f64,
}

impl Dropout {
    fn mask(&self) -> DropoutMask {
        DropoutMask { start: self.start, p: self.p }
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dpo2d-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn apply<T: WithDType>(op: &Dropout, x: &[T]) -> Vec<T> {
            let mut out = vec![T::from_f64(0.0); x.len()];
            // x * m, as the product with a stored mask computes it.
            op.mask().each(&mut out, |i, m| x[i] * m);
            out
        }
        check_p(self.p)?;
        let name = self.name();
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(apply(self, slice::<f32>(s, l, name)?)),
            DType::F64 => CpuStorage::F64(apply(self, slice::<f64>(s, l, name)?)),
            d => bail!("{name}: no CPU kernel for {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        check_p(self.p)?;
        let m = self.mask();
        Ok((super::cuda::dropout_apply(s, l, self.start, m.threshold(), m.keep())?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dropout(&g.detach(), self.start, self.p)?))
    }
}

/// Inverted dropout of `x` with the mask of the stream at `start`: one
/// fused op where the kernels run (the CPU in f32/f64, a GPU in f32/bf16),
/// else `x` times the mask from [`mask_like`]; the same values either way.
/// A detached `x` records no graph (backward and callers that write their
/// own backward pass one).
pub fn dropout(x: &Tensor, start: u64, p: f64) -> Result<Tensor> {
    if super::fused(x) {
        return x.contiguous()?.apply_op1(Dropout { start, p });
    }
    x * mask_like(x, start, p)?
}

/// A dropout mask shaped like `x`, in its dtype, on its device, drawn from
/// the stream at `start`: on the CPU, or by the CUDA kernel; elsewhere (the
/// CUDA kernels switched off, a dtype they do not take) drawn on the CPU and
/// copied over, the same bits.
pub fn mask_like(x: &Tensor, start: u64, p: f64) -> Result<Tensor> {
    if x.device().is_cpu() || super::on_gpu(x) {
        return x.apply_op1_no_bwd(&DropoutMask { start, p });
    }
    let on_cpu = Tensor::zeros(x.shape(), x.dtype(), &candle_core::Device::Cpu)?;
    on_cpu.apply_op1_no_bwd(&DropoutMask { start, p })?.to_device(x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The stream drawn one element after another, as a plain loop.
    fn sequential(start: u64, n: usize, p: f64) -> Vec<f32> {
        let thresh = (p * 4294967296.0) as u64;
        let keep = (1.0 / (1.0 - p)) as f32;
        let (mut state, mut v) = (start, vec![]);
        while v.len() < n {
            state = state.wrapping_add(GOLDEN);
            let z = mix(state);
            v.push(if (z & 0xffff_ffff) < thresh { 0.0 } else { keep });
            v.push(if (z >> 32) < thresh { 0.0 } else { keep });
        }
        v.truncate(n);
        v
    }

    #[test]
    fn parallel_mask_equals_the_sequential_stream() {
        for (n, p) in [(1, 0.5), (7, 0.3), (3 * MIN_FLAT + 5, 0.05), (2 * MIN_FLAT, 0.9)] {
            let x = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
            let got = mask_like(&x, 12345, p).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, sequential(12345, n, p), "n = {n}");
        }
    }

    #[test]
    fn consecutive_masks_continue_the_stream() {
        let (a, b) = (6, 10);
        let start = 99;
        let first = mask_like(&Tensor::zeros(a, DType::F32, &Device::Cpu).unwrap(), start, 0.5).unwrap();
        let second = mask_like(&Tensor::zeros(b, DType::F32, &Device::Cpu).unwrap(), DropoutMask::next_start(start, a), 0.5).unwrap();
        let both = [first.to_vec1::<f32>().unwrap(), second.to_vec1::<f32>().unwrap()].concat();
        assert_eq!(both, sequential(start, a + b, 0.5));
    }

    /// The fused dropout equals the product with the stored mask, bit for
    /// bit, and so does its gradient (`g * mask`, the mask drawn again).
    #[test]
    fn fused_dropout_equals_the_product_with_the_mask() {
        for (n, dt) in [(7, DType::F64), (2 * MIN_FLAT + 3, DType::F32)] {
            let x = candle_core::Var::from_tensor(&crate::test_support::det(&[n], 1, dt)).unwrap();
            let g = crate::test_support::det(&[n], 2, dt);
            let fused = dropout(&x, 77, 0.3).unwrap();
            let mask = mask_like(&x, 77, 0.3).unwrap();
            let plain = (x.as_tensor() * &mask).unwrap();
            assert_eq!(crate::test_support::max_abs_diff(&fused, &plain), 0.0, "{n}");
            let grad = (&fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let want = (&g * &mask).unwrap();
            assert_eq!(crate::test_support::max_abs_diff(grad.get(&x).unwrap(), &want), 0.0, "{n}");
        }
        // Other dtypes take the stored mask: the same values.
        let x = crate::test_support::det(&[9], 3, DType::F32).to_dtype(DType::BF16).unwrap();
        let (a, b) = (dropout(&x, 5, 0.5).unwrap(), (&x * mask_like(&x, 5, 0.5).unwrap()).unwrap());
        assert_eq!(crate::test_support::max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn dtypes_and_rates() {
        let x = Tensor::zeros((40, 1000), DType::BF16, &Device::Cpu).unwrap();
        let m = mask_like(&x, 7, 0.25).unwrap();
        assert_eq!((m.dtype(), m.dims()), (DType::BF16, x.dims()));
        let v: Vec<f32> = m.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 4.0 / 3.0).abs() < 1e-2));
        assert!(mask_like(&x, 7, 1.0).is_err());
    }
}
