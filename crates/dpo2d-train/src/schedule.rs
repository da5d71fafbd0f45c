//! Learning-rate schedules with Hugging Face `transformers` semantics
//! (`get_{cosine,linear,constant}_schedule_with_warmup`): the rate used for
//! optimizer update number `step` (0-based) of `total` updates.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    Cosine,
    Linear,
    Constant,
    ConstantWithWarmup,
}

impl std::str::FromStr for SchedulerType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "cosine" => Self::Cosine,
            "linear" => Self::Linear,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            _ => bail!("unknown lr_scheduler_type {s:?} (expected cosine, linear, constant, constant_with_warmup)"),
        })
    }
}

/// Number of warmup updates: `warmup_steps` if > 0, else `ceil(warmup_ratio * total)`
/// (what `TrainingArguments.get_warmup_steps` does).
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total as f64).ceil() as usize
    }
}

/// Learning rate for update `step` (0-based).
pub fn lr_at(kind: SchedulerType, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    let w = warmup as f64;
    if kind != SchedulerType::Constant && step < warmup {
        return base * s / w.max(1.0);
    }
    let progress = (s - w) / ((total as f64 - w).max(1.0));
    match kind {
        SchedulerType::Constant | SchedulerType::ConstantWithWarmup => base,
        SchedulerType::Linear => base * ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0),
        SchedulerType::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warmup_shape() {
        let k = SchedulerType::Cosine;
        assert_eq!(lr_at(k, 1.0, 0, 10, 100), 0.0);
        assert!((lr_at(k, 1.0, 5, 10, 100) - 0.5).abs() < 1e-12);
        assert!((lr_at(k, 1.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(k, 1.0, 55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(lr_at(k, 1.0, 99, 10, 100) < 0.001);
    }

    #[test]
    fn linear_and_constant() {
        assert!((lr_at(SchedulerType::Linear, 2.0, 50, 0, 100) - 1.0).abs() < 1e-12);
        assert_eq!(lr_at(SchedulerType::Constant, 2.0, 0, 10, 100), 2.0);
        assert_eq!(lr_at(SchedulerType::ConstantWithWarmup, 2.0, 5, 10, 100), 1.0);
        assert_eq!(warmup_steps(0, 0.1, 95), 10);
        assert_eq!(warmup_steps(3, 0.1, 95), 3);
        assert!("cosine_restarts".parse::<SchedulerType>().is_err());
    }
}
