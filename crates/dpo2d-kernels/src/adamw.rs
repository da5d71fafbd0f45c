//! The AdamW update of every parameter in one pass (one kernel launch on a
//! GPU, one parallel loop on the CPU) instead of a dozen composed tensor ops
//! per parameter (which remain for parameters the kernel does not take),
//! plus the sum of squares that gradient clipping needs.
//!
//! The update is PyTorch's `torch.optim.AdamW`, with the gradient first
//! multiplied by `grad_scale` (the clipping factor):
//! `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//!  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! A bf16 parameter is updated through its f32 master copy and set to it,
//! rounded to nearest even, in the same pass.

use super::lock_all::{with_all_mut, Dst};
use super::{slice, with_slice, MIN_FLAT};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, Var};
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

/// The f32 constants the kernels use, in the order the CUDA kernel takes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Consts {
    pub b1: f32,
    pub b2: f32,
    pub c1: f32,
    pub c2: f32,
    pub scale: f32,
    pub decay: f32,
    pub step_size: f32,
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWStep {
    fn consts(&self) -> Consts {
        let t = self.step as i32;
        Consts {
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            c1: (1.0 - self.beta1) as f32,
            c2: (1.0 - self.beta2) as f32,
            scale: self.grad_scale as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            step_size: (self.lr / (1.0 - self.beta1.powi(t))) as f32,
            inv_bc2_sqrt: (1.0 / (1.0 - self.beta2.powi(t)).sqrt()) as f32,
            eps: self.eps as f32,
        }
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

/// One parameter's part in an update: the parameter, its moments (from
/// [`new_moments`]), its f32 master copy if it is half precision (from
/// [`new_master`]), and its gradient.
pub struct Slot<'a> {
    pub param: &'a Var,
    pub moments: &'a mut Tensor,
    pub master: Option<&'a mut Tensor>,
    pub grad: &'a Tensor,
}

impl Slot<'_> {
    /// Whether the fused pass takes this parameter: f32 updated directly, or
    /// bf16 through an f32 master, on the CPU or (CUDA kernels on) a GPU.
    fn fused(&self) -> bool {
        let p = self.param.as_tensor();
        let kinds = match &self.master {
            None => p.dtype() == DType::F32,
            Some(m) => p.dtype() == DType::BF16 && m.dtype() == DType::F32,
        };
        kinds && self.moments.dtype() == DType::F32 && (p.device().is_cpu() || super::on_gpu(p))
    }
}

/// Updates `param` and its `moments` (and its `master`, which the parameter
/// is then set to, rounded): [`adamw_step_all`] for one parameter.
pub fn adamw_step(param: &Var, moments: &mut Tensor, master: Option<&mut Tensor>, grad: &Tensor, s: AdamWStep) -> Result<()> {
    adamw_step_all(vec![Slot { param, moments, master, grad }], s)
}

/// Updates every slot: those the fused kernel takes in one pass over all of
/// them (one launch on a GPU), in place; any others one by one with
/// [`composed_update`] in f32, their moments (and masters) replaced.
pub fn adamw_step_all(slots: Vec<Slot<'_>>, s: AdamWStep) -> Result<()> {
    for sl in &slots {
        let n = sl.param.elem_count();
        if sl.moments.dims() != [2, n] || sl.grad.elem_count() != n || sl.master.as_ref().is_some_and(|m| m.elem_count() != n) {
            bail!("adamw: parameter {:?}, moments {:?}, gradient {:?} do not fit", sl.param.dims(), sl.moments.dims(), sl.grad.dims());
        }
    }
    let (fused, rest): (Vec<_>, Vec<_>) = slots.into_iter().partition(|sl| sl.fused());
    // One pass per device (in practice one device holds every parameter).
    let mut fused = fused;
    while let Some(first) = fused.first() {
        let dev = first.param.device().clone();
        let (here, other): (Vec<_>, Vec<_>) = fused.into_iter().partition(|sl| sl.param.device().same_device(&dev));
        fused_pass(&here, s)?;
        fused = other;
    }
    for sl in rest {
        composed_slot(sl, s)?;
    }
    Ok(())
}

/// Elements per chunk of the fused pass: a rayon task on the CPU, a thread
/// block on a GPU.
const CHUNK: usize = 4 * MIN_FLAT;

/// One parameter as the fused pass sees it (addresses from [`Dst`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flat {
    /// The f32 weights updated: the master copy, or the f32 parameter.
    pub p: usize,
    /// The moments, `[2, n]` f32.
    pub mv: usize,
    /// The gradient (`grad_bf16` says whether bf16, else f32: the CPU pass
    /// takes f32 only).
    pub g: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub grad_bf16: bool,
    /// The bf16 parameter set from the master (0: none).
    pub out: usize,
    pub n: usize,
}

/// The chunks of the pass: `(slot index, first element)`.
fn chunks(flats: &[Flat]) -> Vec<(usize, usize)> {
    flats.iter().enumerate().flat_map(|(k, f)| (0..f.n).step_by(CHUNK).map(move |start| (k, start))).collect()
}

/// The fused update of slots on one device.
fn fused_pass(slots: &[Slot<'_>], s: AdamWStep) -> Result<()> {
    let gpu = slots.first().is_some_and(|sl| sl.param.device().is_cuda());
    // Gradients as the kernel reads them: contiguous, f32 (or bf16 on a GPU).
    let grads = slots
        .iter()
        .map(|sl| match sl.grad.dtype() {
            DType::F32 => sl.grad.contiguous(),
            DType::BF16 if gpu => sl.grad.contiguous(),
            _ => sl.grad.to_dtype(DType::F32)?.contiguous(),
        })
        .collect::<Result<Vec<_>>>()?;
    // What the pass writes, per slot: the moments, the f32 weights, and the
    // bf16 parameter when it has a master.
    let mut written: Vec<&Tensor> = vec![];
    for sl in slots {
        written.push(sl.moments);
        match &sl.master {
            Some(m) => written.extend([&**m, sl.param.as_tensor()]),
            None => written.push(sl.param.as_tensor()),
        }
    }
    let consts = s.consts();
    with_all_mut(&written, &|dsts: &[Dst]| {
        let mut flats = Vec::with_capacity(slots.len());
        let mut next = dsts.iter();
        for (sl, g) in slots.iter().zip(&grads) {
            let (mv, p) = (next.next(), next.next());
            let out = if sl.master.is_some() { next.next().copied().map(Some) } else { Some(None) };
            let (Some(mv), Some(p), Some(out)) = (mv, p, out) else { bail!("adamw: lost track of the locked tensors") };
            // The raw writes below rely on these kinds and sizes: check them.
            let fits = mv.dtype == DType::F32 && mv.len == 2 * p.len && p.dtype == DType::F32 && g.elem_count() == p.len;
            if !fits || out.is_some_and(|o| o.dtype != DType::BF16 || o.len != p.len) {
                bail!("adamw: the tensors of a parameter do not fit the fused pass");
            }
            let out = out.map_or(0, |o| o.addr);
            flats.push(Flat { p: p.addr, mv: mv.addr, g: grad_addr(g)?, grad_bf16: g.dtype() == DType::BF16, out, n: p.len });
        }
        let chunks = chunks(&flats);
        if gpu {
            #[cfg(feature = "cuda")]
            return super::cuda::adamw_all(slots[0].param.device().as_cuda_device()?, &flats, &chunks, CHUNK, consts);
        }
        cpu_pass(&flats, &chunks, consts);
        Ok(())
    })?;
    drop(grads);
    Ok(())
}

/// The address of a contiguous gradient's elements (read while `grads` is
/// alive: the pass only reads them).
fn grad_addr(g: &Tensor) -> Result<usize> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return super::cuda::device_addr(g);
    }
    super::with_float!(g.dtype(), "adamw gradient", T => with_slice::<T, _>(g, "adamw", |v| v.as_ptr().expose_provenance()))
}

/// The CPU twin of the CUDA kernel: every chunk a rayon task.
fn cpu_pass(flats: &[Flat], chunks: &[(usize, usize)], k: Consts) {
    chunks.par_iter().for_each(|&(slot, start)| {
        let f = flats[slot];
        let len = CHUNK.min(f.n - start);
        // SAFETY: the addresses come from `with_all_mut` (every written
        // tensor locked, distinct) and from contiguous f32 gradients that
        // outlive the pass; chunks are disjoint ranges of one slot each.
        unsafe {
            let at = |addr: usize, off: usize| std::ptr::with_exposed_provenance_mut::<f32>(addr).add(off);
            let p = std::slice::from_raw_parts_mut(at(f.p, start), len);
            let m = std::slice::from_raw_parts_mut(at(f.mv, start), len);
            let v = std::slice::from_raw_parts_mut(at(f.mv, f.n + start), len);
            let g = std::slice::from_raw_parts(at(f.g, start), len);
            for i in 0..len {
                let x = g[i] * k.scale;
                m[i] = k.b1 * m[i] + k.c1 * x;
                v[i] = k.b2 * v[i] + k.c2 * x * x;
                p[i] = p[i] * k.decay - k.step_size * m[i] / (v[i].sqrt() * k.inv_bc2_sqrt + k.eps);
            }
            if f.out != 0 {
                let out = std::slice::from_raw_parts_mut(std::ptr::with_exposed_provenance_mut::<half::bf16>(f.out).add(start), len);
                for (o, &x) in out.iter_mut().zip(p.iter()) {
                    *o = half::bf16::from_f32(x);
                }
            }
        }
    });
}

/// A parameter the fused pass does not take, updated with composed ops in f32.
fn composed_slot(sl: Slot<'_>, s: AdamWStep) -> Result<()> {
    let f32_flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all();
    let p = match &sl.master {
        Some(m) => (*m).clone(),
        None => f32_flat(sl.param.as_tensor())?,
    };
    let (p, m, v) = composed_update(&p, &sl.moments.get(0)?, &sl.moments.get(1)?, &f32_flat(sl.grad)?, s)?;
    *sl.moments = Tensor::stack(&[m, v], 0)?;
    sl.param.set(&p.reshape(sl.param.dims())?.to_dtype(sl.param.dtype())?)?;
    if let Some(master) = sl.master {
        *master = p;
    }
    Ok(())
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
    if !super::fused(t) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.reshape(1);
    }
    t.contiguous()?.apply_op1_no_bwd(&SumSquares)
}

/// [`sum_squares`] as an op.
struct SumSquares;

impl candle_core::CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "dpo2d-sum-squares"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        // `as f64` converts f32 and is a no-op for f64: one body serves both.
        #[allow(clippy::unnecessary_cast)]
        let sum: f64 = super::with_float!(xs.dtype(), name, T => {
            slice::<T>(xs, xl, name)?.par_chunks(MIN_FLAT).map(|c| {
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
            })
            // Chunk sums added in chunk order: the same bits on every run (a
            // parallel `sum` adds them in whatever grouping the threads took).
            .collect::<Vec<f64>>().into_iter().sum()
        });
        Ok((CpuStorage::F64(vec![sum]), Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::sum_squares(xs, xl)
    }
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

    /// One pass over parameters of several sizes and kinds: f32, bf16 with
    /// an f32 master (the parameter is the master rounded), and f64 (not
    /// fused: the composed update), each against the composed update in f64.
    #[test]
    fn one_pass_over_mixed_parameters() {
        let sizes = [CHUNK + 3, 5, 2 * CHUNK];
        let kinds = [DType::F32, DType::BF16, DType::F64];
        let p0: Vec<Tensor> = sizes.iter().enumerate().map(|(i, &n)| det(&[n], 1 + i as u64, DType::F64)).collect();
        let params: Vec<Var> = p0.iter().zip(kinds).map(|(p, dt)| Var::from_tensor(&p.to_dtype(dt).unwrap()).unwrap()).collect();
        let mut moments: Vec<Tensor> = params.iter().map(|p| new_moments(p.as_tensor()).unwrap()).collect();
        let mut masters: Vec<Option<Tensor>> = params.iter().map(|p| new_master(p.as_tensor()).unwrap()).collect();
        masters[2] = None; // an f64 parameter without a master takes the composed path
        let mut want: Vec<(Tensor, Tensor, Tensor)> = params
            .iter()
            .map(|p| {
                // A copy: an f64 parameter's tensor would share the storage updated in place.
                let p = p.as_tensor().to_dtype(DType::F64).unwrap().copy().unwrap();
                (p.clone(), p.zeros_like().unwrap(), p.zeros_like().unwrap())
            })
            .collect();
        for step in 1..=3u64 {
            let s = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.7 };
            let grads: Vec<Tensor> = sizes.iter().map(|&n| det(&[n], 10 + step, DType::F32)).collect();
            let slots = params
                .iter()
                .zip(moments.iter_mut().zip(masters.iter_mut()))
                .zip(&grads)
                .map(|((param, (moments, master)), grad)| Slot { param, moments, master: master.as_mut(), grad })
                .collect();
            adamw_step_all(slots, s).unwrap();
            for (w, g) in want.iter_mut().zip(&grads) {
                *w = composed_update(&w.0, &w.1, &w.2, &g.to_dtype(DType::F64).unwrap(), s).unwrap();
            }
        }
        let d = crate::test_support::max_abs_diff;
        for i in 0..3 {
            let p = masters[i].clone().unwrap_or_else(|| params[i].as_tensor().clone());
            assert!(d(&p, &want[i].0) < 1e-6, "parameter {i}: {}", d(&p, &want[i].0));
            assert!(d(&moments[i].get(0).unwrap(), &want[i].1) < 1e-6, "first moment {i}");
            assert!(d(&moments[i].get(1).unwrap(), &want[i].2) < 1e-7, "second moment {i}");
        }
        let rounded = masters[1].as_ref().unwrap().to_dtype(DType::BF16).unwrap();
        assert_eq!(d(params[1].as_tensor(), &rounded), 0.0, "the bf16 parameter is its master, rounded");
    }

    #[test]
    fn sum_of_squares() {
        let t = det(&[3, 40_000], 4, DType::F32);
        let want = t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let got = sum_squares(&t).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-9 * want);
    }

    #[test]
    fn sum_of_squares_has_the_same_bits_on_any_number_of_threads() {
        // Chunks of many magnitudes, so that the order of the adds shows in the last bits.
        let scale: Vec<f32> = (0..31).map(|c| 10f32.powi(c * 7 % 11 - 5)).collect();
        let scale = Tensor::new(scale.as_slice(), &candle_core::Device::Cpu).unwrap().reshape((31, 1)).unwrap();
        let t = det(&[31, MIN_FLAT], 5, DType::F32).broadcast_mul(&scale).unwrap().flatten_all().unwrap();
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| sum_squares(&t).unwrap().to_vec1::<f64>().unwrap()[0].to_bits())
        };
        let one = on(1);
        for threads in [2, 3, 4, 7] {
            assert_eq!(on(threads), one, "{threads} threads");
        }
    }
}
