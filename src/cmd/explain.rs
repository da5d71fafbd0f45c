//! `dpo2d explain`: a trained policy's implicit reward on every token of a
//! pair (or of one response), as an HTML page and a PNG.

use anyhow::{bail, Context, Result};
use dpo2d_data::{Pair, Response};
use dpo2d_eval::explain::{explain, html, png, Explained};
use dpo2d_model::chat::Message;
use dpo2d_model::fetch;
use dpo2d_train::config::TrainConfig;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The trained policy (Hugging Face directory, .gguf, LoRA checkpoint).
    #[arg(long)]
    model_path: String,
    /// The reference it was trained against (e.g. smollm2 for the quickstart).
    #[arg(long)]
    ref_model_path: String,
    /// A pair file (.jsonl): explain one of its pairs, chosen and rejected.
    #[arg(value_name = "FILE", conflicts_with_all = ["prompt", "pairs_flag"])]
    pairs: Option<PathBuf>,
    /// The same as FILE (the older spelling).
    #[arg(long = "pairs", hide = true, conflicts_with = "prompt")]
    pairs_flag: Option<PathBuf>,
    /// Which pair (0-based position in the file).
    #[arg(long, default_value_t = 0, conflicts_with = "id")]
    index: usize,
    /// Which pair, by its `id` [default: by --index].
    #[arg(long)]
    id: Option<String>,
    /// A user prompt, with --response, instead of a pair file [default: none].
    #[arg(long, requires = "response", allow_hyphen_values = true)]
    prompt: Option<String>,
    /// The response to explain, with --prompt [default: none].
    #[arg(long, allow_hyphen_values = true)]
    response: Option<String>,
    /// The beta of the training run [default: the run's config.toml next to the model, else 0.1].
    #[arg(long)]
    beta: Option<f64>,
    /// The HTML page to write; a PNG of the same picture goes next to it.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    device: super::DeviceArg,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let (prompt, responses): (Vec<Message>, Vec<(&str, Response)>) =
        match (a.pairs.as_ref().or(a.pairs_flag.as_ref()), &a.prompt, &a.response) {
            (Some(file), _, _) => {
                let pair = pick_pair(file, a.index, a.id.as_deref())?;
                let prompt = dpo2d_train::align::chat_messages(&pair.prompt);
                (prompt, vec![("chosen", pair.chosen), ("rejected", pair.rejected)])
            }
            (None, Some(p), Some(r)) => (vec![Message::user(p.clone())], vec![("response", Response::Plain(r.clone()))]),
            _ => bail!("give a pair FILE (with --index or --id), or --prompt and --response"),
        };
    let policy_path = fetch::resolve_model(&a.model_path, a.cache_dir.as_deref())?;
    let beta = match a.beta {
        Some(b) => b,
        None => run_beta(&policy_path).unwrap_or_else(|| TrainConfig::default().beta),
    };
    let opts = a.device.load_options()?;
    let policy = dpo2d_model::load(&policy_path, &opts)?;
    let reference = dpo2d_model::load(&fetch::resolve_model(&a.ref_model_path, a.cache_dir.as_deref())?, &opts)?;
    let refs: Vec<(&str, &Response)> = responses.iter().map(|(l, r)| (*l, r)).collect();
    let sides = explain(&policy, &reference, &prompt, &refs, beta)?;
    let e = Explained {
        prompt: prompt.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n"),
        beta,
        policy: a.model_path.clone(),
        reference: a.ref_model_path.clone(),
        sides,
    };
    dpo2d_fs::write_file(&a.output, html(&e))?;
    let png_path = a.output.with_extension("png");
    png(&e, &png_path)?;
    for s in &e.sides {
        eprintln!("{}: {} tokens, sum of rewards {:+.4}", s.label, s.tokens.len(), s.reward());
    }
    eprintln!("wrote {} and {}", a.output.display(), png_path.display());
    Ok(())
}

fn pick_pair(file: &Path, index: usize, id: Option<&str>) -> Result<Pair> {
    let loaded = dpo2d_data::load_pairs(file, &Default::default())?;
    let n = loaded.pairs.len();
    match id {
        Some(id) => loaded
            .pairs
            .into_iter()
            .find(|p| p.id.as_ref().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).as_deref() == Some(id))
            .with_context(|| format!("{}: no pair with id {id:?}", file.display())),
        None => {
            loaded.pairs.into_iter().nth(index).with_context(|| format!("{}: --index {index} but the file has {n} pairs", file.display()))
        }
    }
}

/// `beta` of the training run a model directory came from: the run's
/// `config.toml` beside `final/` or `checkpoint-N/`, read as `train` reads it.
fn run_beta(model: &Path) -> Option<f64> {
    let cfg = model.parent()?.join("config.toml");
    cfg.is_file().then(|| TrainConfig::resolve(None, Some(&cfg), Default::default()).ok()).flatten().map(|c| c.beta)
}
