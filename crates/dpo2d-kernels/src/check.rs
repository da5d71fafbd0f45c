//! Every op of the training path on a device, against its composed reference
//! on the CPU in f64: forward values and every input gradient, for f32 and
//! bf16, on odd shapes with a padding mask. `dpo2d check-kernels --device
//! cuda` runs it on a GPU (the CUDA kernels and candle's kernels behind our
//! backward passes); on the CPU it checks the CPU kernels the same way.

use crate::adamw::{self, AdamWStep};
use crate::mlp;
use crate::ops;
use candle_core::{DType, Device, Result, Tensor, Var};

/// One op in one dtype: the largest difference from the reference, relative
/// to the reference's largest magnitude, over the value and the gradients.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub op: &'static str,
    pub dtype: DType,
    pub rel_err: f64,
    pub tolerance: f64,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.rel_err.is_finite() && self.rel_err <= self.tolerance
    }
}

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Deterministic values in [-1, 1), f64 on the CPU (no RNG dependency: the
/// same inputs on every machine and device).
pub fn det(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Value and gradients of `sum(f(xs) * proj)` with `xs` on `dev` in `dt`
/// (the inputs listed in `grads_of` take gradients), back on the CPU in f64.
fn value_and_grads(f: &OpFn, xs: &[Tensor], grads_of: &[usize], dev: &Device, dt: DType) -> Result<Vec<Tensor>> {
    let mut ts = vec![];
    let mut vars = vec![];
    for (i, x) in xs.iter().enumerate() {
        let on = if x.dtype().is_float() { x.to_dtype(dt)?.to_device(dev)? } else { x.to_device(dev)? };
        if grads_of.contains(&i) {
            let v = Var::from_tensor(&on)?;
            ts.push(v.as_tensor().clone());
            vars.push(v);
        } else {
            ts.push(on);
        }
    }
    let y = f(&ts)?;
    let proj = det(y.dims(), 77)?.to_dtype(y.dtype())?.to_device(dev)?;
    let store = (&y * &proj)?.sum_all()?.backward()?;
    let mut out = vec![y.to_device(&Device::Cpu)?.to_dtype(DType::F64)?];
    for v in &vars {
        let g = store.get(v.as_tensor()).ok_or_else(|| candle_core::Error::Msg("check: an input got no gradient".into()))?;
        out.push(g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?);
    }
    Ok(out)
}

fn rel_err(got: &[Tensor], want: &[Tensor]) -> Result<f64> {
    let mut worst = 0f64;
    for (a, b) in got.iter().zip(want) {
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        worst = worst.max(if d.is_nan() { f64::INFINITY } else { d / scale });
    }
    Ok(worst)
}

/// An additive attention mask `[2, 1, 1, tq, tk]`: causal, with the second
/// entry's last query rows fully masked (padding).
fn mask(tq: usize, tk: usize) -> Result<Tensor> {
    let mut m = vec![0f64; 2 * tq * tk];
    for b in 0..2 {
        for q in 0..tq {
            for k in 0..tk {
                let padded = b == 1 && q + 2 >= tq;
                if k > q + (tk - tq) || padded {
                    m[(b * tq + q) * tk + k] = f64::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (2, 1, 1, tq, tk), &Device::Cpu)
}

/// The masked softmax from primitives, with the kernels' conventions: -inf
/// as a large finite number, and rows with every key masked set to zero
/// (no attention).
fn masked_softmax_reference(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let finite = mask.clamp(-1e30, 0.0)?;
    let alive = mask.max_keepdim(candle_core::D::Minus1)?.ge(-1e29)?.to_dtype(scores.dtype())?;
    ops::softmax_plain(&scores.broadcast_add(&finite)?)?.broadcast_mul(&alive)
}

/// Grouped-query attention from primitives: `x` = q, k, v, mask.
fn attention_reference(x: &[Tensor], scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = x[0].dims4()?;
    let nkv = x[1].dim(1)?;
    let q = (&x[0] * scale)?.reshape((b, nkv, nh / nkv * t, d))?;
    let scores = q.matmul(&x[1].t()?)?.reshape((b, nkv, nh / nkv, t, t))?;
    let probs = masked_softmax_reference(&scores, &x[3])?;
    let out = probs.reshape((b, nkv, nh / nkv * t, t))?.matmul(&x[2])?;
    out.reshape((b, nh, t, d))?.transpose(1, 2)?.reshape((b, t, nh * d))
}

/// The SwiGLU MLP from products: `x` = input, gate, up, down.
fn mlp_reference(x: &[Tensor]) -> Result<Tensor> {
    let proj = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t()?);
    proj(&ops::swiglu_plain(&proj(&x[0], &x[1])?, &proj(&x[0], &x[2])?)?, &x[3])
}

/// A LoRA layer from linear layers, scale 2 and dropout 0.2 at stream
/// position 7: `x` = input, W, bias, A, B.
fn lora_reference(x: &[Tensor]) -> Result<Tensor> {
    let dropped = crate::dropout::dropout(&x[0], 7, 0.2)?;
    let delta = (ops::linear(&ops::linear(&dropped, &x[3], None)?, &x[4], None)? * 2.0)?;
    ops::linear(&x[0], &x[1], Some(&x[2]))? + delta
}

/// One op and its reference: (name, fused, composed, inputs, inputs with gradients).
type Case = (&'static str, Box<OpFn>, Box<OpFn>, Vec<Tensor>, Vec<usize>);

/// The shapes every case is checked at: odd sizes, so that no kernel gets
/// by on even splits.
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    heads: usize,
    hd: usize,
    v: usize,
}

const DIMS: Dims = Dims { b: 2, t: 37, h: 200, heads: 3, hd: 18, v: 1003 };

/// Every op and its reference.
fn cases() -> Result<Vec<Case>> {
    Ok(row_cases()?.into_iter().chain(node_cases()?).collect())
}

/// The row-wise ops: norms, softmax, activations, rotation, label log-probs.
fn row_cases() -> Result<Vec<Case>> {
    let Dims { b, t, h, heads, hd, v } = DIMS;
    let msk = mask(t, t)?;
    let angles = (det(&[b, t, hd / 2], 9)? * 3.0)?;
    Ok(vec![
        (
            "rms_norm",
            Box::new(|x: &[Tensor]| ops::rms_norm(&x[0], &x[1], 1e-5)),
            Box::new(|x: &[Tensor]| ops::rms_norm_plain(&x[0], &x[1], 1e-5)),
            vec![(det(&[b, t, h], 1)? * 3.0)?, det(&[h], 2)?],
            vec![0, 1],
        ),
        (
            "add_rms_norm",
            Box::new(|x: &[Tensor]| {
                let (sum, normed) = ops::add_rms_norm(&x[0], &x[1], &x[2], 1e-5)?;
                Tensor::cat(&[sum, normed], 0)
            }),
            Box::new(|x: &[Tensor]| {
                let sum = (&x[0] + &x[1])?;
                let normed = ops::rms_norm_plain(&sum, &x[2], 1e-5)?;
                Tensor::cat(&[sum, normed], 0)
            }),
            vec![(det(&[b, t, h], 14)? * 3.0)?, det(&[b, t, h], 15)?, det(&[h], 2)?],
            vec![0, 1, 2],
        ),
        (
            "masked_softmax",
            Box::new(|x: &[Tensor]| ops::masked_softmax(&x[0], &x[1])),
            Box::new(|x: &[Tensor]| masked_softmax_reference(&x[0], &x[1])),
            vec![(det(&[b, 2, heads, t, t], 3)? * 4.0)?, msk.clone()],
            vec![0],
        ),
        (
            "swiglu",
            Box::new(|x: &[Tensor]| ops::swiglu(&x[0], &x[1])),
            Box::new(|x: &[Tensor]| ops::swiglu_plain(&x[0], &x[1])),
            vec![(det(&[b, t, 3 * h + 1], 4)? * 4.0)?, det(&[b, t, 3 * h + 1], 5)?],
            vec![0, 1],
        ),
        (
            "rope_heads",
            Box::new(|x: &[Tensor]| ops::rope_heads(&x[0], &x[1].cos()?, &x[1].sin()?)),
            Box::new(|x: &[Tensor]| ops::rope_plain(&x[0].transpose(1, 2)?, &x[1].cos()?, &x[1].sin()?)),
            vec![det(&[b, t, heads, hd], 6)?, angles],
            vec![0],
        ),
        (
            "label_logprobs",
            Box::new(|x: &[Tensor]| ops::label_logprobs(&x[0], &x[1], &x[2])),
            Box::new(|x: &[Tensor]| ops::label_logprobs_plain(&x[0].to_dtype(DType::F64)?, &x[1].to_dtype(DType::F64)?, &x[2])),
            vec![
                det(&[b * t, h], 7)?,
                det(&[v, h], 8)?,
                Tensor::from_vec((0..b * t).map(|i| (i * 37 % v) as u32).collect::<Vec<_>>(), b * t, &Device::Cpu)?,
            ],
            vec![0, 1],
        ),
    ])
}

/// The larger graph nodes: attention, the frozen MLP, a LoRA linear layer.
fn node_cases() -> Result<Vec<Case>> {
    let Dims { b, t, h, heads, hd, .. } = DIMS;
    let msk = mask(t, t)?;
    let scale = 1.0 / (hd as f64).sqrt();
    Ok(vec![
        (
            "attention",
            Box::new(move |x: &[Tensor]| ops::attention(&x[0], &x[1], &x[2], &x[3], scale)),
            Box::new(move |x: &[Tensor]| attention_reference(x, scale)),
            vec![det(&[b, 2 * heads, t, hd], 13)?, det(&[b, 2, t, hd], 14)?, det(&[b, 2, t, hd], 15)?, msk],
            vec![0, 1, 2],
        ),
        (
            // Frozen weights, as the base of a LoRA run: only the input's gradient.
            "swiglu_mlp",
            Box::new(|x: &[Tensor]| {
                mlp::swiglu_mlp(&x[0], mlp::MlpWeights { gate: (&x[1], None), up: (&x[2], None), down: (&x[3], None) })
            }),
            Box::new(mlp_reference),
            vec![det(&[b, t, h], 16)?, (det(&[257, h], 17)? * 0.2)?, (det(&[257, h], 18)? * 0.2)?, (det(&[h, 257], 19)? * 0.2)?],
            vec![0],
        ),
        (
            // A LoRA adapter on a frozen weight with a bias, dropout on.
            "lora_linear",
            Box::new(|x: &[Tensor]| {
                let ad = crate::lora::Adapter { a: &x[3], b: &x[4], scale: 2.0, dropout: Some((0.2, 7)) };
                crate::lora::lora_linear(&x[0], &x[1], Some(&x[2]), ad)
            }),
            Box::new(lora_reference),
            vec![
                det(&[b, t, h], 20)?,
                (det(&[h + 7, h], 21)? * 0.1)?,
                det(&[h + 7], 22)?,
                (det(&[8, h], 23)? * 0.1)?,
                (det(&[h + 7, 8], 24)? * 0.1)?,
            ],
            vec![0, 3, 4],
        ),
    ])
}

/// AdamW's fused pass over several parameters at once (with f32 masters for
/// bf16; sizes that split into chunks unevenly) against the composed update
/// in f64 over three steps.
fn check_adamw(dev: &Device, dt: DType) -> Result<f64> {
    let sizes = [100_003, 7, 70_001];
    let p0: Vec<Tensor> = sizes.iter().enumerate().map(|(i, &n)| det(&[n], 11 + i as u64)).collect::<Result<_>>()?;
    let params: Vec<Var> = p0.iter().map(|p| Var::from_tensor(&p.to_dtype(dt)?.to_device(dev)?)).collect::<Result<_>>()?;
    let mut moments: Vec<Tensor> = params.iter().map(|p| adamw::new_moments(p.as_tensor())).collect::<Result<_>>()?;
    let mut masters: Vec<Option<Tensor>> = params.iter().map(|p| adamw::new_master(p.as_tensor())).collect::<Result<_>>()?;
    let start: Vec<Tensor> = p0.iter().map(|p| p.to_dtype(dt)?.to_dtype(DType::F64)).collect::<Result<_>>()?;
    let mut want: Vec<(Tensor, Tensor, Tensor)> =
        start.iter().map(|p| Ok((p.clone(), p.zeros_like()?, p.zeros_like()?))).collect::<Result<_>>()?;
    for step in 1..=3u64 {
        let s = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
        let grads: Vec<Tensor> =
            sizes.iter().enumerate().map(|(i, &n)| det(&[n], 20 + 3 * step + i as u64)?.to_dtype(dt)).collect::<Result<_>>()?;
        let on_dev: Vec<Tensor> = grads.iter().map(|g| g.to_device(dev)).collect::<Result<_>>()?;
        let slots = params
            .iter()
            .zip(moments.iter_mut().zip(masters.iter_mut()))
            .zip(&on_dev)
            .map(|((param, (moments, master)), grad)| adamw::Slot { param, moments, master: master.as_mut(), grad })
            .collect();
        adamw::adamw_step_all(slots, s)?;
        for (w, g) in want.iter_mut().zip(&grads) {
            *w = adamw::composed_update(&w.0, &w.1, &w.2, &g.to_dtype(DType::F64)?, s)?;
        }
    }
    let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let (mut got, mut wanted) = (vec![], vec![]);
    for i in 0..sizes.len() {
        let p = match &masters[i] {
            Some(ms) => back(ms)?,
            None => back(params[i].as_tensor())?,
        };
        // The parameter's change against the reference's change (the update is
        // small next to the weights), and the moments.
        got.extend([(&p - &start[i])?, back(&moments[i].get(0)?)?, back(&moments[i].get(1)?)?]);
        wanted.extend([(&want[i].0 - &start[i])?, want[i].1.clone(), want[i].2.clone()]);
        if masters[i].is_some() {
            // The bf16 parameter is its master, rounded.
            got.push(back(params[i].as_tensor())?);
            wanted.push(back(&masters[i].as_ref().unwrap().to_dtype(dt)?)?);
        }
    }
    rel_err(&got, &wanted)
}

/// The sum of squares that gradient clipping adds up, against f64 on the CPU.
fn check_sum_squares(dev: &Device, dt: DType) -> Result<f64> {
    let x = (det(&[3, 333_337], 12)? * 2.0)?.to_dtype(dt)?;
    let want = x.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let got = adamw::sum_squares(&x.to_device(dev)?)?.to_device(&Device::Cpu)?.to_vec1::<f64>()?[0];
    Ok((got - want).abs() / want)
}

/// The dropout stream as its documentation defines it, drawn one element
/// after another by a plain loop (no kernel): splitmix64 over the counter
/// `start + (j + 1) * GOLDEN`, draw `j` giving its low 32 bits to element
/// `2j` and its high 32 bits to element `2j + 1`; an element is dropped
/// (0) when its uniform is below `p * 2^32`, else kept as `1 / (1 - p)`
/// rounded to f32.
fn dropout_mask_reference(shape: &[usize], start: u64, p: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let thresh = (p * 4294967296.0) as u64;
    let keep = (1.0 / (1.0 - p)) as f32 as f64;
    let mut state = start;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        for half in [z & 0xffff_ffff, z >> 32] {
            v.push(if half < thresh { 0.0 } else { keep });
        }
    }
    v.truncate(n);
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A dropout mask drawn on the device, and the fused dropout on the device,
/// against the stream drawn by a plain loop on the CPU (the stream is
/// counter-based, so they agree bit for bit) and the input times that mask.
fn check_dropout(dev: &Device, dt: DType) -> Result<f64> {
    use crate::dropout::{dropout, mask_like};
    let x = (det(&[3, 100_003], 13)? * 3.0)?.to_dtype(dt)?;
    let on = x.to_device(dev)?;
    let want = dropout_mask_reference(x.dims(), 0xdead_beef, 0.1)?.to_dtype(dt)?;
    let got = mask_like(&on, 0xdead_beef, 0.1)?;
    let applied = dropout(&on, 0xdead_beef, 0.1)?;
    let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    rel_err(&[back(&got)?, back(&applied)?], &[back(&want)?, back(&(&x * &want)?)?])
}

/// Runs every check on `dev` in f32 and bf16 (f32 only on the CPU, whose
/// kernels take f32/f64).
pub fn run(dev: &Device) -> Result<Vec<CheckRow>> {
    let dtypes: &[DType] = if dev.is_cpu() { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    let mut rows = vec![];
    for &dt in dtypes {
        let tolerance = if dt == DType::BF16 { 3e-2 } else { 1e-4 };
        for (op, fused, plain, xs, grads_of) in cases()? {
            let want = value_and_grads(plain.as_ref(), &xs, &grads_of, &Device::Cpu, DType::F64)?;
            let got = value_and_grads(fused.as_ref(), &xs, &grads_of, dev, dt)?;
            rows.push(CheckRow { op, dtype: dt, rel_err: rel_err(&got, &want)?, tolerance });
        }
        // The update against its f64 twin, relative to the change of the weights
        // (f32 rounding of weights near 1 shows there at ~1e-4).
        rows.push(CheckRow { op: "adamw", dtype: dt, rel_err: check_adamw(dev, dt)?, tolerance: tolerance.max(5e-4) });
        rows.push(CheckRow { op: "sum_squares", dtype: dt, rel_err: check_sum_squares(dev, dt)?, tolerance: 1e-9 });
        rows.push(CheckRow { op: "dropout", dtype: dt, rel_err: check_dropout(dev, dt)?, tolerance: 0.0 });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_kernels_pass_the_device_check() {
        let rows = super::run(&candle_core::Device::Cpu).unwrap();
        assert_eq!(rows.len(), 12);
        for r in rows {
            assert!(r.passed(), "{r:?}");
        }
    }
}
