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
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates applied so far (the `t` of the bias correction).
    pub t: u64,
    pub params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (_, var) in &vars {
            // Moments in f32 even for bf16 weights: they underflow otherwise.
            let z = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
            m.push(z.clone());
            v.push(z);
        }
        Ok(AdamW { vars, m, v, t: 0, params })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Apply one update with the given gradients (same order as `vars`;
    /// `None` = no gradient reached this parameter, it is left unchanged,
    /// including its weight decay, as PyTorch does).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!("optimizer got {} gradients for {} parameters", grads.len(), self.vars.len());
        }
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.vars[i].1;
            let dtype = var.dtype();
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let w = var.as_tensor().to_dtype(DType::F32)?;
            let w = if p.weight_decay != 0.0 { (&w * (1.0 - lr * p.weight_decay))? } else { w };
            let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
            let upd = ((&m / bc1)? / denom)?;
            let w = (w - (upd * lr)?)?;
            var.set(&w.to_dtype(dtype)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Save moments and step count to one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("{name}.exp_avg"), self.m[i].clone());
            map.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        map.insert("__step__".into(), Tensor::new(&[self.t as i64], &candle_core::Device::Cpu)?);
        candle_core::safetensors::save(&map, path).with_context(|| format!("writing optimizer state {}", path.display()))
    }

    /// Restore moments and step count written by `save`; every parameter
    /// must be present with the same shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev).with_context(|| format!("reading optimizer state {}", path.display()))?;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (key, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let t = map.get(&format!("{name}.{key}")).with_context(|| format!("{}: no {key} for parameter {name}", path.display()))?;
                if t.dims() != var.dims() {
                    bail!("{}: {name}.{key} has shape {:?}, parameter has {:?}", path.display(), t.dims(), var.dims());
                }
                *slot = t.to_dtype(DType::F32)?;
            }
        }
        let step = map.get("__step__").with_context(|| format!("{}: no step count", path.display()))?;
        self.t = step.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

/// Global L2 norm of all gradients (f64), as `torch.nn.utils.clip_grad_norm_` computes it.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

/// Scale the gradients so their global norm is at most `max_norm`; returns
/// the norm before clipping (what TRL logs as `grad_norm`).
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
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
            opt.step(&[Some(Tensor::new(&[g as f32], &Device::Cpu)?)], 0.01)?;
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
        oa.step(&[Some(g(0.5))], 0.1)?;
        oa.save(&dir.path().join("opt.safetensors"))?;
        let b = Var::new(&a.as_tensor().to_vec1::<f32>()?[..], &Device::Cpu)?;
        let mut ob = AdamW::new(vec![("a".into(), b.clone())], p)?;
        ob.load(&dir.path().join("opt.safetensors"))?;
        assert_eq!(ob.t, 1);
        oa.step(&[Some(g(0.7))], 0.1)?;
        ob.step(&[Some(g(0.7))], 0.1)?;
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, b.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let mut gs = vec![Some(Tensor::new(&[3f32, 4.0], &Device::Cpu)?), None];
        let n = clip_grad_norm(&mut gs, 1.0)?;
        assert!((n - 5.0).abs() < 1e-6);
        let after = global_grad_norm(&gs)?;
        assert!((after - 1.0).abs() < 1e-4, "{after}");
        Ok(())
    }
}
