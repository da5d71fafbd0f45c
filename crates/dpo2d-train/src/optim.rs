//! AdamW over candle `Var`s, with a state that can be saved and restored
//! bit-exactly (candle_nn's optimiser does not expose its moments, so a
//! resumed run could not continue where it stopped).
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, `eps` added after the square root):
//! `p -= lr * wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//!  p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use dpo2d_kernels::adamw::{self, AdamWStep};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        // Hugging Face TrainingArguments defaults.
        AdamWParams { weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// AdamW with named parameters; the names key the saved state.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// Per parameter `[2, N]` f32: the first moment, then the second (f32
    /// even for bf16 weights: they underflow otherwise).
    moments: Vec<Tensor>,
    /// Per parameter, the f32 master copy of a half-precision weight (mixed
    /// precision, as `torch.amp`'s f32 weights); None for f32 weights.
    masters: Vec<Option<Tensor>>,
    /// Number of updates applied so far (the `t` of the bias correction).
    pub t: u64,
    pub params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let moments = vars.iter().map(|(_, var)| adamw::new_moments(var.as_tensor())).collect::<candle_core::Result<_>>()?;
        let masters = vars.iter().map(|(_, var)| adamw::new_master(var.as_tensor())).collect::<candle_core::Result<_>>()?;
        Ok(AdamW { vars, moments, masters, t: 0, params })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Apply one update with the given gradients (same order as `vars`;
    /// `None` = no gradient reached this parameter, it is left unchanged,
    /// including its weight decay, as PyTorch does), each multiplied by
    /// `grad_scale` first (the clipping factor, see [`clip_scale`]).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!("optimizer got {} gradients for {} parameters", grads.len(), self.vars.len());
        }
        self.t += 1;
        let p = self.params;
        let s = AdamWStep { lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay, step: self.t, grad_scale };
        // Every parameter in one pass (one launch on a GPU).
        let slots = self
            .vars
            .iter()
            .zip(self.moments.iter_mut().zip(self.masters.iter_mut()))
            .zip(grads)
            .filter_map(|(((_, param), (moments, master)), grad)| {
                grad.as_ref().map(|grad| adamw::Slot { param, moments, master: master.as_mut(), grad })
            })
            .collect();
        adamw::adamw_step_all(slots, s)?;
        Ok(())
    }

    /// Save moments, f32 master weights (of half-precision parameters) and
    /// step count to one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            map.insert(format!("{name}.exp_avg"), self.moments[i].get(0)?.reshape(var.dims())?);
            map.insert(format!("{name}.exp_avg_sq"), self.moments[i].get(1)?.reshape(var.dims())?);
            if let Some(master) = &self.masters[i] {
                map.insert(format!("{name}.master"), master.reshape(var.dims())?);
            }
        }
        map.insert("__step__".into(), Tensor::new(&[self.t as i64], &candle_core::Device::Cpu)?);
        candle_core::safetensors::save(&map, path).with_context(|| format!("writing optimizer state {}", path.display()))
    }

    /// Restore moments and step count written by `save`; every parameter
    /// must be present with the same shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map =
            dpo2d_model::weights::load_safetensors(path, &dev).with_context(|| format!("reading optimizer state {}", path.display()))?;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let mut rows = vec![];
            for key in ["exp_avg", "exp_avg_sq"] {
                let t = map.get(&format!("{name}.{key}")).with_context(|| format!("{}: no {key} for parameter {name}", path.display()))?;
                if t.dims() != var.dims() {
                    bail!("{}: {name}.{key} has shape {:?}, parameter has {:?}", path.display(), t.dims(), var.dims());
                }
                rows.push(t.to_dtype(DType::F32)?.flatten_all()?);
            }
            self.moments[i] = Tensor::stack(&rows, 0)?.contiguous()?;
            if self.masters[i].is_some() {
                // A state saved without masters (older, or from f32 weights) starts them from the weights.
                if let Some(m) = map.get(&format!("{name}.master")) {
                    self.masters[i] = Some(m.to_dtype(DType::F32)?.flatten_all()?.contiguous()?);
                }
            }
        }
        let step = map.get("__step__").with_context(|| format!("{}: no step count", path.display()))?;
        self.t = step.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

/// Global L2 norm of all gradients (f64), as `torch.nn.utils.clip_grad_norm_` computes it.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    // One sum per gradient where it lives and one copy of the total to the
    // host (on a GPU a round trip per parameter would stall it).
    let parts = grads.iter().flatten().map(adamw::sum_squares).collect::<candle_core::Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::cat(&parts, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// The factor that brings gradients of global norm `norm` down to
/// `max_norm` (1 when they are within it, or `max_norm` is 0), as
/// `torch.nn.utils.clip_grad_norm_`.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference values from a hand-unrolled AdamW (same formulas as PyTorch).
    fn reference(w0: f64, grads: &[f64], lr: f64, p: AdamWParams) -> f64 {
        let (mut w, mut m, mut v) = (w0, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            w *= 1.0 - lr * p.weight_decay;
            m = p.beta1 * m + (1.0 - p.beta1) * g;
            v = p.beta2 * v + (1.0 - p.beta2) * g * g;
            let mh = m / (1.0 - p.beta1.powi(t));
            let vh = v / (1.0 - p.beta2.powi(t));
            w -= lr * mh / (vh.sqrt() + p.eps);
        }
        w
    }

    #[test]
    fn matches_reference_update() -> Result<()> {
        let p = AdamWParams { weight_decay: 0.1, ..Default::default() };
        let var = Var::new(&[1.5f32], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], p)?;
        let gs = [0.3, -0.2, 0.5, 0.05];
        for g in gs {
            opt.step(&[Some(Tensor::new(&[g as f32], &Device::Cpu)?)], 0.01, 1.0)?;
        }
        let got = var.as_tensor().to_vec1::<f32>()?[0] as f64;
        let want = reference(1.5, &gs, 0.01, p);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn save_restore_continues_identically() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = AdamWParams::default();
        let a = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
        let mut oa = AdamW::new(vec![("a".into(), a.clone())], p)?;
        let g = |x: f32| Tensor::new(&[x, -x], &Device::Cpu).unwrap();
        oa.step(&[Some(g(0.5))], 0.1, 1.0)?;
        oa.save(&dir.path().join("opt.safetensors"))?;
        let b = Var::new(&a.as_tensor().to_vec1::<f32>()?[..], &Device::Cpu)?;
        let mut ob = AdamW::new(vec![("a".into(), b.clone())], p)?;
        ob.load(&dir.path().join("opt.safetensors"))?;
        assert_eq!(ob.t, 1);
        oa.step(&[Some(g(0.7))], 0.1, 1.0)?;
        ob.step(&[Some(g(0.7))], 0.1, 1.0)?;
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, b.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let gs = vec![Some(Tensor::new(&[3f32, 4.0], &Device::Cpu)?), None];
        let n = global_grad_norm(&gs)?;
        assert!((n - 5.0).abs() < 1e-6);
        assert!((clip_scale(n, 1.0) * n - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(n, 10.0), 1.0);
        assert_eq!(clip_scale(n, 0.0), 1.0);
        assert_eq!(clip_scale(f64::NAN, 1.0), 1.0);
        Ok(())
    }

    /// A bf16 weight moves by many updates too small for bf16 on their own
    /// (its f32 master copy accumulates them), and the master survives a
    /// save and load.
    #[test]
    fn bf16_weights_keep_an_f32_master() -> Result<()> {
        let w = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWParams::default())?;
        let g = Tensor::new(&[1f32, -1.0], &Device::Cpu)?.to_dtype(DType::BF16)?;
        for _ in 0..100 {
            opt.step(&[Some(g.clone())], 1e-4, 1.0)?;
        }
        let v = w.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        assert!(v[0] < 0.995 && v[1] > -1.995, "bf16 weights did not move: {v:?}");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("optimizer.safetensors");
        opt.save(&path)?;
        let mut back = AdamW::new(vec![("w".into(), w.clone())], AdamWParams::default())?;
        back.load(&path)?;
        let (m0, m1) = (opt.masters[0].as_ref().unwrap(), back.masters[0].as_ref().unwrap());
        assert_eq!(m0.to_vec1::<f32>()?, m1.to_vec1::<f32>()?);
        assert!((m0.to_vec1::<f32>()?[0] - 0.99).abs() < 1e-3);
        Ok(())
    }

    /// bf16 parameters take the composed update; it agrees with the fused
    /// one on f32 parameters up to bf16 rounding.
    #[test]
    fn composed_update_matches_fused() -> Result<()> {
        let p = AdamWParams { weight_decay: 0.1, ..Default::default() };
        let w0: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Var::new(&w0[..], &Device::Cpu)?;
        let b = Var::from_tensor(&Tensor::new(&w0[..], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
        let mut oa = AdamW::new(vec![("w".into(), a.clone())], p)?;
        let mut ob = AdamW::new(vec![("w".into(), b.clone())], p)?;
        for step in 0..3 {
            let g = Tensor::new(&w0.iter().map(|x| x * (step as f32 + 0.5)).collect::<Vec<_>>()[..], &Device::Cpu)?;
            oa.step(&[Some(g.clone())], 0.05, 0.7)?;
            ob.step(&[Some(g.to_dtype(DType::BF16)?)], 0.05, 0.7)?;
        }
        let d = (a.as_tensor() - b.as_tensor().to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-2, "{d}");
        Ok(())
    }
}
