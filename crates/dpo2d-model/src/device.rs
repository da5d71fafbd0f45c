//! The device a run computes on, chosen once on the command line
//! (`--device cpu|cuda|cuda:N`) and carried in [`crate::llama::LoadOptions`];
//! nothing below the command line picks a device by itself.

use anyhow::{bail, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// The candle device. A build without the `cuda` feature says so rather
    /// than fall back to the CPU silently.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => {
                let dev = Device::new_cuda(n).map_err(|e| anyhow::anyhow!("--device {self}: cannot open the GPU: {e}"))?;
                if let Device::Cuda(d) = &dev {
                    // dpo2d runs every op on the device's one stream, so candle's
                    // cross-stream event per tensor use is pure overhead.
                    // SAFETY: no tensor of this device is used on another stream.
                    unsafe { d.disable_event_tracking() };
                }
                Ok(dev)
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => bail!("--device {self}: this dpo2d was built without CUDA support (`cargo build --release --features cuda`, docs/gpu.md); only `cpu` is available"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => bail!("unknown device `{s}` (expected cpu, cuda or cuda:N)"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_refuse_cuda_in_a_cpu_build() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().to_string().contains("cpu, cuda or cuda:N"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!(DeviceSpec::Cpu.device().unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_cuda() {
        let e = DeviceSpec::Cuda(1).device().unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("without CUDA"), "{e}");
    }
}
