//! One module per subcommand: option parsing and a call into the library.
pub mod annotate;
pub mod bench;
pub mod build_pairs;
pub mod eval;
pub mod explain;
pub mod generate;
pub mod judge;
pub mod logprobs;
pub mod model;
pub mod quickstart;
pub mod segment;
pub mod serve;
pub mod train;
pub mod validate;

use dpo2d_model::llama::LoadOptions;
use dpo2d_model::DeviceSpec;

/// `--device`, shared by the commands that run a model.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct DeviceArg {
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a build with CUDA support).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceSpec,
}

impl DeviceArg {
    /// Options to load a frozen model (inference) on this device.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions { device: self.device.device()?, ..LoadOptions::default() })
    }
}
