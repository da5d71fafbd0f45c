//! The matrix products of one training step of a model, as shapes, and a
//! timer for them: what `dpo2d bench --gemm` measures (and
//! `scripts/bench_gemm.py` runs through `torch.mm` for comparison).

use crate::config::ModelConfig;
use candle_core::{Device, Result, Tensor};
use serde::Serialize;
use std::time::Instant;

/// One product `[batch] x [m, k] @ [k, n]`; `rhs_t`: the right operand is
/// stored `[n, k]` and used transposed (a weight in `x @ W^T`).
#[derive(Debug, Clone, Serialize)]
pub struct MatmulShape {
    pub name: String,
    /// How many times one training step (forward + backward) runs it.
    pub count: usize,
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub rhs_t: bool,
}

impl MatmulShape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.k * self.n) as f64
    }
}

/// The products of a forward and backward pass over `tokens` tokens in one
/// sequence (attention over all of them): per linear layer `x @ W^T`, the
/// input gradient `g @ W` and the weight gradient `g^T @ x`; attention's
/// scores and weighted values; the lm_head in the row chunks the label
/// log-probs use (`rows_per_chunk`).
pub fn training_shapes(cfg: &ModelConfig, tokens: usize, rows_per_chunk: usize) -> Vec<MatmulShape> {
    let (h, im, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (nh, nkv, layers) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers);
    let mut out = vec![];
    let mut linear = |name: &str, count: usize, inp: usize, outp: usize, m: usize| {
        out.push(MatmulShape { name: format!("{name} forward x W^T"), count, batch: 1, m, k: inp, n: outp, rhs_t: true });
        out.push(MatmulShape { name: format!("{name} input grad g W"), count, batch: 1, m, k: outp, n: inp, rhs_t: false });
        out.push(MatmulShape { name: format!("{name} weight grad g^T x"), count, batch: 1, m: outp, k: m, n: inp, rhs_t: false });
    };
    linear("q, o proj", 2 * layers, h, nh * hd, tokens);
    linear("k, v proj", 2 * layers, h, nkv * hd, tokens);
    linear("gate, up proj", 2 * layers, h, im, tokens);
    linear("down proj", layers, im, h, tokens);
    let chunks = tokens.div_ceil(rows_per_chunk.max(1));
    linear("lm_head chunk", chunks, h, cfg.vocab_size, rows_per_chunk.min(tokens));
    let rep = nh / nkv.max(1);
    out.push(MatmulShape {
        name: "attention scores q k^T".into(),
        count: 3 * layers,
        batch: nkv,
        m: rep * tokens,
        k: hd,
        n: tokens,
        rhs_t: true,
    });
    out.push(MatmulShape {
        name: "attention probs v".into(),
        count: 3 * layers,
        batch: nkv,
        m: rep * tokens,
        k: tokens,
        n: hd,
        rhs_t: false,
    });
    out
}

/// Seconds per call of one product on the CPU in f32 (median of timed
/// batches after a warm-up, each batch at least `min_secs / 5` long).
pub fn time_matmul(s: &MatmulShape, min_secs: f64) -> Result<f64> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (s.batch, s.m, s.k), &dev)?;
    let b = if s.rhs_t {
        Tensor::randn(0f32, 1.0, (s.batch, s.n, s.k), &dev)?.transpose(1, 2)?
    } else {
        Tensor::randn(0f32, 1.0, (s.batch, s.k, s.n), &dev)?
    };
    let run = || a.matmul(&b).map(drop);
    run()?;
    let t0 = Instant::now();
    run()?;
    let once = t0.elapsed().as_secs_f64().max(1e-7);
    let reps = ((min_secs / 5.0) / once).ceil().max(1.0) as usize;
    let mut per_call = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            run()?;
        }
        per_call.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    per_call.sort_by(f64::total_cmp);
    Ok(per_call[2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TinyModel;

    #[test]
    fn shapes_cover_a_step_and_time() {
        let cfg = TinyModel::default().config();
        let shapes = training_shapes(&cfg, 10, 4);
        // 5 kinds of linear layer x (forward, input grad, weight grad) + 2 attention products.
        assert_eq!(shapes.len(), 17);
        let lm = shapes.iter().find(|s| s.name == "lm_head chunk forward x W^T").unwrap();
        assert_eq!((lm.count, lm.m, lm.k, lm.n), (3, 4, cfg.hidden_size, cfg.vocab_size));
        let scores = shapes.iter().find(|s| s.name.starts_with("attention scores")).unwrap();
        let rep = cfg.num_attention_heads / cfg.num_key_value_heads;
        assert_eq!((scores.batch, scores.m, scores.k, scores.n), (cfg.num_key_value_heads, rep * 10, cfg.head_dim, 10));
        // A forward's linear FLOPs are 2 x tokens x (weights of the layers).
        let fwd: f64 = shapes
            .iter()
            .filter(|s| s.name.contains("forward") && !s.name.starts_with("lm_head"))
            .map(|s| s.flops() * s.count as f64)
            .sum();
        let per_layer = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
            + 3 * cfg.hidden_size * cfg.intermediate_size;
        assert_eq!(fwd, 2.0 * 10.0 * (per_layer * cfg.num_hidden_layers) as f64);
        assert!(time_matmul(&shapes[0], 0.001).unwrap() > 0.0);
    }
}
