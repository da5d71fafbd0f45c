//! LoRA adapters (Hu et al. 2021) in the PEFT convention:
//! `y = W x + (alpha / r) * B (A dropout(x))`, with `A` [r, in] drawn like
//! PEFT's default (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))
//! and `B` [out, r] zero, so a fresh adapter leaves the model unchanged.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A linear layer of a decoder block that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] =
        [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O, LoraTarget::Gate, LoraTarget::Up, LoraTarget::Down];

    /// The Hugging Face module name (`q_proj`, ...), as PEFT writes it.
    pub fn hf_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// Parent module in HF naming (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            _ => "mlp",
        }
    }

    /// Accepts `q`, `q_proj`, `gate`, `gate_proj`, ... (also `all-linear`
    /// handled by [`LoraTarget::parse_list`]).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().trim_end_matches("_proj");
        Ok(match t {
            "q" => LoraTarget::Q,
            "k" => LoraTarget::K,
            "v" => LoraTarget::V,
            "o" => LoraTarget::O,
            "gate" => LoraTarget::Gate,
            "up" => LoraTarget::Up,
            "down" => LoraTarget::Down,
            _ => bail!(
                "unknown LoRA target module `{s}` (expected some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear)"
            ),
        })
    }

    /// Parse a comma-separated list; `all-linear` means every target.
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        if s.trim() == "all-linear" || s.trim() == "all" {
            return Ok(Self::ALL.to_vec());
        }
        let mut v: Vec<Self> = s.split(',').filter(|p| !p.trim().is_empty()).map(Self::parse).collect::<Result<_>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            bail!("no LoRA target modules given");
        }
        Ok(v)
    }
}

/// LoRA hyper-parameters (PEFT names in comments).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`
    pub r: usize,
    /// `lora_alpha`
    pub alpha: f64,
    /// `lora_dropout`
    pub dropout: f64,
    /// `target_modules`
    pub targets: Vec<LoraTarget>,
    /// Seed for A's initialisation and for dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, dropout: 0.05, targets: vec![LoraTarget::Q, LoraTarget::V], seed: 42 }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("LoRA needs at least one target module");
        }
        Ok(())
    }
}

/// State shared by every adapter of one model: train/eval switch and the
/// dropout RNG (seeded, so runs repeat).
pub struct LoraRuntime {
    training: AtomicBool,
    rng: Mutex<u64>,
}

impl LoraRuntime {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self { training: AtomicBool::new(false), rng: Mutex::new(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)) })
    }
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed)
    }
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
    /// State of the dropout-mask stream (saved in checkpoints so that a
    /// resumed run draws the same masks as an uninterrupted one).
    pub fn rng_state(&self) -> u64 {
        self.rng.lock().map(|s| *s).unwrap_or_else(|e| *e.into_inner())
    }
    pub fn set_rng_state(&self, state: u64) {
        match self.rng.lock() {
            Ok(mut s) => *s = state,
            Err(e) => *e.into_inner() = state,
        }
    }

    /// Where the dropout stream stands for a mask of `n` elements, moving
    /// it on past them ([`dpo2d_kernels::dropout`]).
    fn take_dropout_start(&self, n: usize) -> Result<u64> {
        let mut state = self.rng.lock().map_err(|_| anyhow::anyhow!("LoRA RNG lock poisoned"))?;
        let start = *state;
        *state = dpo2d_kernels::dropout::DropoutMask::next_start(start, n);
        Ok(start)
    }

    /// Inverted dropout of `x` (kept values scaled by 1/(1-p)), the mask
    /// drawn on `x`'s device and not stored.
    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let start = self.take_dropout_start(x.elem_count())?;
        Ok(dpo2d_kernels::dropout::dropout(x, start, p)?)
    }
}

/// One adapter: trainable `A` [r, in] and `B` [out, r].
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    runtime: Arc<LoraRuntime>,
}

impl LoraAdapter {
    /// PEFT initialisation; `rng` supplies A.
    pub fn new(
        in_f: usize,
        out_f: usize,
        cfg: &LoraConfig,
        rng: &mut rand::rngs::StdRng,
        dtype: DType,
        device: &Device,
        runtime: Arc<LoraRuntime>,
    ) -> Result<Self> {
        let bound = 1.0 / (in_f as f64).sqrt();
        let av: Vec<f32> = (0..cfg.r * in_f).map(|_| rng.gen_range(-bound..bound) as f32).collect();
        let a = Tensor::from_vec(av, (cfg.r, in_f), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_f, cfg.r), dtype, device)?;
        Ok(Self { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale: cfg.scaling(), dropout: cfg.dropout, runtime })
    }

    /// Adapter from existing A/B (e.g. a saved PEFT adapter).
    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64, dropout: f64, runtime: Arc<LoraRuntime>) -> Result<Self> {
        Ok(Self { a: Var::from_tensor(a)?, b: Var::from_tensor(b)?, scale, dropout, runtime })
    }

    /// The adapter's contribution `scale * B A dropout(x)` for `x` [..., in].
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.dropout > 0.0 && self.runtime.training() { self.runtime.dropout(x, self.dropout)? } else { x.clone() };
        let h = dpo2d_kernels::ops::linear(&x, self.a.as_tensor(), None)?;
        let y = dpo2d_kernels::ops::linear(&h, self.b.as_tensor(), None)?;
        Ok((y * self.scale)?)
    }

    /// `w x + bias + delta(x)` as one graph node ([`dpo2d_kernels::lora`]),
    /// drawing the same dropout mask as [`Self::delta`] would.
    pub fn linear_with_adapter(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dropout = if self.dropout > 0.0 && self.runtime.training() {
            Some((self.dropout, self.runtime.take_dropout_start(x.elem_count())?))
        } else {
            None
        };
        let adapter = dpo2d_kernels::lora::Adapter { a: self.a.as_tensor(), b: self.b.as_tensor(), scale: self.scale, dropout };
        Ok(dpo2d_kernels::lora::lora_linear(x, w, bias, adapter)?)
    }

    /// `scale * B A`, shaped like the base weight [out, in].
    pub fn merged_delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{det, grad_check};

    #[test]
    fn parse_targets() {
        assert_eq!(LoraTarget::parse_list("q_proj,v").unwrap(), vec![LoraTarget::Q, LoraTarget::V]);
        assert_eq!(LoraTarget::parse_list("all-linear").unwrap().len(), 7);
        let e = LoraTarget::parse_list("q,foo").unwrap_err().to_string();
        assert!(e.contains("foo"), "{e}");
    }

    #[test]
    fn lora_linear_grad_and_init() {
        let dev = Device::Cpu;
        let cfg = LoraConfig { r: 3, alpha: 6.0, dropout: 0.0, targets: vec![LoraTarget::Q], seed: 1 };
        let rt = LoraRuntime::new(1);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let ad = LoraAdapter::new(5, 4, &cfg, &mut rng, DType::F64, &dev, rt.clone()).unwrap();
        // B = 0: no change; A within the kaiming-uniform bound.
        let x = det(&[2, 3, 5], 1, DType::F64);
        let d = ad.delta(&x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(d, 0.0);
        let amax = ad.a.as_tensor().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(amax > 0.0 && amax <= 1.0 / 5f64.sqrt());
        // Gradient wrt x, A and B through base + LoRA (frozen base weight).
        let w = det(&[4, 5], 2, DType::F64);
        let f = move |t: &[Tensor]| {
            let ad = LoraAdapter::from_tensors(&t[1], &t[2], 2.0, 0.0, rt.clone()).unwrap();
            let y = dpo2d_kernels::ops::linear(&t[0], &w, None)?;
            y + ad.delta(&t[0]).map_err(|e| candle_core::Error::Msg(e.to_string()))?
        };
        grad_check(&[x, det(&[3, 5], 3, DType::F64), det(&[4, 3], 4, DType::F64)], &f, 1e-6);
    }

    #[test]
    fn dropout_only_in_training_and_seeded() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 50), DType::F32, &dev).unwrap();
        let run = |seed| {
            let rt = LoraRuntime::new(seed);
            rt.set_training(true);
            rt.dropout(&x, 0.5).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        let m = run(3);
        let zeros = m.iter().flatten().filter(|v| **v == 0.0).count();
        assert!(zeros > 50 && zeros < 150, "{zeros}");
        assert!(m.iter().flatten().all(|v| *v == 0.0 || *v == 2.0));
    }
}
