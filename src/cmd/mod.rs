//! One module per subcommand: option parsing and a call into the library.
pub mod annotate;
pub mod bench;
pub mod build_pairs;
pub mod eval;
pub mod explain;
pub mod generate;
pub mod iterate;
pub mod judge;
pub mod logprobs;
pub mod model;
pub mod quickstart;
pub mod rm;
pub mod segment;
pub mod serve;
pub mod train;
pub mod validate;

use dpo2d_model::llama::LoadOptions;
use dpo2d_model::source::LoadedModel;
use dpo2d_model::DeviceSpec;
use std::path::PathBuf;

/// The help of every `--cache-dir`.
pub const CACHE_DIR_HELP: &str = "Where models, downloads and caches go [default: the user cache directory + /dpo2d]";

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

/// `--model`, `--device` and the cache, shared by the commands that load
/// one model for inference.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory, .gguf file, LoRA checkpoint, or a known model name (smollm2).
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub device: DeviceArg,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = CACHE_DIR_HELP)]
    pub cache_dir: Option<PathBuf>,
}

impl ModelArgs {
    /// Fetches the model if it is a known name, and loads it on the device.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let path = dpo2d_model::fetch::resolve_model(&self.model, self.cache_dir.as_deref())?;
        dpo2d_model::load(&path, &self.device.load_options()?)
    }
}
