//! Where a training step's time goes, for performance work: with
//! `DPO2D_PHASE_TIMES=1` the trainer synchronises the device at each phase
//! boundary (a GPU runs ahead of the host otherwise) and prints the seconds
//! spent per phase at the end of the run. Off, it costs nothing.

use candle_core::Device;
use std::time::Instant;

/// The phases of an optimizer step, in order.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Reference,
    Forward,
    Backward,
    Accumulate,
    GradNorm,
    Optimizer,
}

const NAMES: [&str; 6] = ["reference log-probs", "forward + loss", "backward", "gradient accumulation", "gradient norm", "optimizer"];

/// Seconds per phase since the last mark, when switched on.
pub struct PhaseTimes {
    device: Option<Device>,
    secs: [f64; 6],
    last: Instant,
}

impl PhaseTimes {
    pub fn from_env(device: &Device) -> Self {
        let on = std::env::var("DPO2D_PHASE_TIMES").is_ok_and(|v| v != "0" && !v.is_empty());
        PhaseTimes { device: on.then(|| device.clone()), secs: [0.0; 6], last: Instant::now() }
    }

    /// Starts timing from now (the work before it is not counted).
    pub fn start(&mut self) {
        if let Some(d) = &self.device {
            let _ = d.synchronize();
            self.last = Instant::now();
        }
    }

    /// Charges the time since the last mark to `phase`.
    pub fn mark(&mut self, phase: Phase) {
        if let Some(d) = &self.device {
            let _ = d.synchronize();
            let now = Instant::now();
            self.secs[phase as usize] += (now - self.last).as_secs_f64();
            self.last = now;
        }
    }

    /// The table of phases, when switched on.
    pub fn report(&self) -> Option<String> {
        self.device.as_ref()?;
        let total: f64 = self.secs.iter().sum();
        let mut s = format!("phase times ({total:.2} s measured):\n");
        for (name, secs) in NAMES.iter().zip(self.secs) {
            s += &format!("  {name:<22} {secs:8.2} s  {:5.1}%\n", 100.0 * secs / total.max(1e-12));
        }
        Some(s)
    }
}
