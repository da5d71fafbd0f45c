//! The SwiGLU MLP, `down(silu(gate(x)) * up(x))`, as one graph node when
//! each of its three weights either trains in full (its gradient goes to
//! its [`GradSink`]) or is frozen (LoRA's base weights: no gradient formed).
//!
//! Why: as three linear nodes and a SwiGLU node, candle's backward gives
//! the gate's, the up projection's and the SwiGLU's outputs (each
//! `[tokens x intermediate]`) a zeroed gradient buffer and adds into it, on
//! one thread, and adds the two gradients that reach `x`; here the
//! gradients are formed once, in gemm's threads (cuBLAS on a GPU) and the
//! fused SwiGLU kernel. With a frozen down projection the graph does not
//! keep the SwiGLU's output either (only its weight gradient reads it).
//!
//! Backward, with `a = silu(g) * u` the SwiGLU's output and `dy` the
//! output's gradient: `da = dy Wd`, `dWd = dy^T a`, `(dg, du)` from the
//! SwiGLU kernel, `dWg = dg^T x`, `dWu = du^T x`, `dx = dg Wg + du Wu`.

use super::gemm::{matmul, matmul_sum};
use super::swiglu::{self, SwiGlu};
use crate::ops::{precomputed1, tracked, GradSink};
use candle_core::{bail, Result, Tensor};
use std::sync::Arc;

/// A projection's weight (`[out, in]`, as in Hugging Face checkpoints) and,
/// when it trains in full, the sink that receives its gradient (`None`:
/// frozen).
pub type Projection<'a> = (&'a Tensor, Option<&'a Arc<GradSink>>);

/// The MLP's three projections.
pub struct MlpWeights<'a> {
    pub gate: Projection<'a>,
    pub up: Projection<'a>,
    pub down: Projection<'a>,
}

/// `x`: `[.., hidden]`; returns `[.., hidden]`.
pub fn swiglu_mlp(x: &Tensor, w: MlpWeights) -> Result<Tensor> {
    let (y, saved) = forward(x, w)?;
    if !tracked(x) {
        return Ok(y);
    }
    let bwd = move |_args: &[&Tensor], dy: &Tensor| -> Result<Vec<Option<Tensor>>> { Ok(vec![Some(saved.backward(dy)?)]) };
    precomputed1("dpo2d-swiglu-mlp", x, y, Box::new(bwd))
}

/// What backward needs from the forward pass (all detached).
pub(crate) struct Saved {
    /// The input as `[rows, hidden]` (the graph holds it anyway), and its shape.
    x: Tensor,
    dims: Vec<usize>,
    /// The gate's and the up projection's outputs.
    g: Tensor,
    u: Tensor,
    /// The SwiGLU's output, kept only for a down projection that trains.
    a: Option<Tensor>,
    weights: [Tensor; 3],
    sinks: [Option<Arc<GradSink>>; 3],
}

/// The forward pass outside autograd: the output and what
/// [`Saved::backward`] needs.
pub(crate) fn forward(x: &Tensor, w: MlpWeights) -> Result<(Tensor, Saved)> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / h.max(1);
    let (wg, wu, wd) = (w.gate.0.detach(), w.up.0.detach(), w.down.0.detach());
    let (im, wh) = wg.dims2()?;
    if wh != h || wu.dims() != wg.dims() || wd.dims() != [h, im] {
        bail!("swiglu mlp: x {dims:?}, gate {:?}, up {:?}, down {:?} do not fit", wg.dims(), wu.dims(), wd.dims());
    }
    let x = x.detach().reshape((rows, h))?;
    let g = matmul(&x, &wg.t()?)?;
    let u = matmul(&x, &wu.t()?)?;
    let a = g.apply_op2_no_bwd(&u, &SwiGlu)?;
    let y = matmul(&a, &wd.t()?)?.reshape(dims.as_slice())?;
    let sinks = [w.gate.1.cloned(), w.up.1.cloned(), w.down.1.cloned()];
    let a = sinks[2].is_some().then_some(a);
    Ok((y, Saved { x, dims, g, u, a, weights: [wg, wu, wd], sinks }))
}

impl Saved {
    /// The input's gradient from the output's `dy`; the trained weights'
    /// gradients go to their sinks.
    pub(crate) fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        let [wg, wu, wd] = &self.weights;
        let [s_gate, s_up, s_down] = &self.sinks;
        let dy = dy.reshape(self.x.dims())?;
        let da = matmul(&dy, wd)?;
        if let (Some(sink), Some(a)) = (s_down, &self.a) {
            sink.add(matmul(&dy.t()?, a)?)?;
        }
        let (dg, du) = swiglu::backward_tensors(&self.g, &self.u, &da)?;
        drop(da);
        for (sink, d) in [(s_gate, &dg), (s_up, &du)] {
            if let Some(sink) = sink {
                sink.add(matmul(&d.t()?, &self.x)?)?;
            }
        }
        let dx = matmul_sum(&[(&dg, wg), (&du, wu)])?;
        dx.reshape(self.dims.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::{swiglu_mlp, MlpWeights};
    use crate::ops::{linear, swiglu, GradSink};
    use crate::test_support::{assert_close, det};
    use candle_core::{DType, Tensor, Var};
    use std::sync::Arc;

    /// The fused MLP and the composed one (linear, SwiGLU, linear) agree on
    /// the output, the input's gradient and every trained weight's, with
    /// all weights trained, all frozen (LoRA's base), and a mix.
    #[test]
    fn matches_composed_values_and_gradients() {
        for trains in [[true; 3], [false; 3], [true, false, false], [false, true, true]] {
            for (rows, h, im, dt, tol) in [(vec![2, 5], 4, 7, DType::F64, 1e-12), (vec![37], 24, 64, DType::F32, 1e-5)] {
                let x = Var::from_tensor(&det(&[rows.clone(), vec![h]].concat(), 1, dt)).unwrap();
                let ws: Vec<Var> =
                    [(im, h, 2), (im, h, 3), (h, im, 4)].iter().map(|&(o, i, s)| Var::from_tensor(&det(&[o, i], s, dt)).unwrap()).collect();
                // A frozen weight is a plain tensor outside autograd.
                let weights: Vec<Tensor> =
                    ws.iter().zip(trains).map(|(w, t)| if t { w.as_tensor().clone() } else { w.as_tensor().detach() }).collect();
                let proj = det(x.dims(), 77, dt);

                let composed = linear(
                    &swiglu(&linear(&x, &weights[0], None).unwrap(), &linear(&x, &weights[1], None).unwrap()).unwrap(),
                    &weights[2],
                    None,
                )
                .unwrap();
                let store = (&composed * &proj).unwrap().sum_all().unwrap().backward().unwrap();

                let sinks: Vec<Arc<GradSink>> = (0..3).map(|_| Arc::new(GradSink::default())).collect();
                let p = |i: usize| (&weights[i], trains[i].then_some(&sinks[i]));
                let fused = swiglu_mlp(&x, MlpWeights { gate: p(0), up: p(1), down: p(2) }).unwrap();
                let fused_store = (&fused * &proj).unwrap().sum_all().unwrap().backward().unwrap();

                let close = |a: &Tensor, b: &Tensor, what: &str| assert_close(a, b, tol, &format!("{what} ({trains:?})"));
                close(&fused, &composed, "value");
                close(fused_store.get(&x).unwrap(), store.get(&x).unwrap(), "input gradient");
                for (i, (w, s)) in weights.iter().zip(&sinks).enumerate() {
                    match (trains[i], s.take()) {
                        (true, Some(g)) => close(&g, store.get(w).unwrap(), &format!("weight {i} gradient")),
                        (false, None) => assert!(store.get(w).is_none()),
                        (t, g) => panic!("weight {i}: trains {t} but its sink got {:?}", g.map(|g| g.dims().to_vec())),
                    }
                }
            }
        }
    }

    #[test]
    fn gradient_by_finite_differences() {
        let ws: Vec<Tensor> = [(6, 3, 2), (6, 3, 3), (3, 6, 4)].iter().map(|&(o, i, s)| det(&[o, i], s, DType::F64)).collect();
        let sinks: Vec<Arc<GradSink>> = (0..3).map(|_| Arc::new(GradSink::default())).collect();
        let x = det(&[2, 2, 3], 5, DType::F64);
        crate::test_support::grad_check(
            &[x],
            &move |t| {
                let p = |i: usize| (&ws[i], Some(&sinks[i]));
                swiglu_mlp(&t[0], MlpWeights { gate: p(0), up: p(1), down: p(2) })
            },
            1e-6,
        );
    }

    #[test]
    fn rejects_mismatched_weights() {
        let x = det(&[2, 3], 1, DType::F32);
        let (g, d) = (det(&[5, 3], 2, DType::F32), det(&[3, 4], 3, DType::F32));
        let s = Arc::new(GradSink::default());
        assert!(swiglu_mlp(&x, MlpWeights { gate: (&g, Some(&s)), up: (&g, None), down: (&d, None) }).is_err());
    }
}
