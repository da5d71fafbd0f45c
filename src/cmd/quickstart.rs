//! `dpo2d quickstart`: the first thing to run. Fetches SmolLM2-135M-Instruct,
//! trains 2D-DPO on the shipped data (a few minutes on two CPU cores), and
//! shows held-out reward accuracy and a greedy answer before and after.

use anyhow::{bail, Context, Result};
use dpo2d_data::segment::{segment_spans, SegmentKind, SegmentOptions, Span};
use dpo2d_data::{load_pairs, LoadOptions, Requirement};
use dpo2d_model::chat::Message;
use dpo2d_model::generate::{generate_chat, FinishReason, GenerationConfig};
use dpo2d_train::config::Preset;
use dpo2d_train::trainer::{train, RunOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(mut_args(super::train::show_quickstart_default))]
pub struct Args {
    /// Where checkpoint, metrics and charts go.
    #[arg(long, alias = "output_dir", value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Training pairs (.jsonl).
    #[arg(long, alias = "train_file", value_name = "FILE")]
    train_file: Option<PathBuf>,
    /// Held-out pairs (.jsonl).
    #[arg(long, alias = "eval_file", value_name = "FILE")]
    eval_file: Option<PathBuf>,
    /// Optimizer updates.
    #[arg(long, alias = "max_steps", value_name = "N")]
    max_steps: Option<usize>,
    /// TOML file of training options over the quickstart preset [default: none].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, env = "DPO2D_CACHE", value_name = "DIR", help = super::CACHE_DIR_HELP)]
    cache_dir: Option<PathBuf>,
    /// Prompt of the before/after answer [default: the first held-out pair's].
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate for the before/after answer.
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// No progress bar (log lines instead).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    device: super::DeviceArg,
}

#[derive(Serialize)]
struct Overrides {
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    train_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<usize>,
}

/// The model's greedy answer to `prompt`, as shown: whole, or, when it ran
/// into the token limit, up to its last complete sentence with a note.
fn answer(model_dir: &Path, prompt: &str, max_new_tokens: usize, device: super::DeviceArg) -> Result<String> {
    let lm = dpo2d_model::load(model_dir, &device.load_options()?)?;
    let out = generate_chat(&lm, &[vec![Message::user(prompt)]], &GenerationConfig::greedy(max_new_tokens))?;
    let Some(c) = out.into_iter().next() else { return Ok(String::new()) };
    Ok(match c.finish_reason {
        FinishReason::Length => cut_at_sentence(&c.completion, max_new_tokens),
        FinishReason::Eos | FinishReason::Stop => c.completion.trim().to_string(),
    })
}

/// A text cut off at `limit` tokens, ended at its last complete sentence
/// (the segmenter's, so lists and code count as it counts them) and marked.
fn cut_at_sentence(text: &str, limit: usize) -> String {
    let spans = segment_spans(text, &SegmentOptions::default());
    let complete = |s: &Span| {
        let t = s.text(text).trim_end();
        t.ends_with(['.', '!', '?', '。', '！', '？']) || (s.kind == SegmentKind::Code && t.ends_with("```"))
    };
    // The last segment was cut unless it happens to end a sentence.
    let keep = match spans.last() {
        Some(last) if complete(last) => spans.len(),
        _ => spans.len().saturating_sub(1),
    };
    let end = if keep == 0 { 0 } else { spans[keep - 1].end };
    let shown = text[..end].trim_end();
    let note = format!("[cut at the {limit}-token limit]");
    if shown.is_empty() {
        note
    } else {
        format!("{shown} {note}")
    }
}

pub fn run(args: Args) -> Result<()> {
    let started = std::time::Instant::now();
    let model_dir = dpo2d_model::fetch::fetch_smollm2(args.cache_dir.as_deref()).context("fetching SmolLM2-135M-Instruct")?;
    let o = Overrides {
        model: model_dir.display().to_string(),
        output_dir: args.output_dir.clone(),
        train_file: args.train_file.clone(),
        eval_file: args.eval_file.clone(),
        max_steps: args.max_steps,
    };
    let cfg = super::train::resolve(Some(Preset::Quickstart), args.config.as_deref(), &o)?;
    for f in [&cfg.train_file, &cfg.eval_file].into_iter().flatten() {
        if !f.is_file() {
            bail!("{} not found: run quickstart from the repository root, or pass --train-file/--eval-file", f.display());
        }
    }
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            let f = cfg.eval_file.as_ref().or(cfg.train_file.as_ref()).context("no data file")?;
            let pairs = load_pairs(f, &LoadOptions::new(Requirement::Plain))?;
            let p = pairs.pairs.first().context("held-out file is empty")?;
            p.prompt.messages().last().map(|m| m.content.clone()).unwrap_or_default()
        }
    };
    eprintln!("model: {}", model_dir.display());
    eprintln!("before training: generating an answer to a held-out prompt ...");
    let before = answer(&model_dir, &prompt, args.max_new_tokens, args.device)?;

    let progress = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Each quickstart replaces the previous one's outputs.
    let run = RunOptions {
        progress,
        cache_dir: args.cache_dir.clone(),
        device: args.device.device,
        overwrite_output_dir: true,
        ..RunOptions::default()
    };
    let outcome = train(&cfg, &run)?;
    let after = answer(&outcome.final_model_dir, &prompt, args.max_new_tokens, args.device)?;

    let evals: Vec<_> = outcome.history.iter().filter(|r| r.get("eval_rewards/accuracies").is_some()).collect();
    println!("\n=== quickstart: 2D-DPO on SmolLM2-135M-Instruct ===");
    println!("{}", outcome.summary.trim_end());
    if let (Some(a), Some(b)) = (evals.first(), evals.last()) {
        println!(
            "held-out reward accuracy: {:.3} (step {}) -> {:.3} (step {}); margin {:.4} -> {:.4}",
            a.get("eval_rewards/accuracies").unwrap_or(f64::NAN),
            a.step,
            b.get("eval_rewards/accuracies").unwrap_or(f64::NAN),
            b.step,
            a.get("eval_rewards/margins").unwrap_or(f64::NAN),
            b.get("eval_rewards/margins").unwrap_or(f64::NAN),
        );
    }
    println!("\nprompt: {prompt}");
    println!("\n--- before ---\n{}", before.trim());
    println!("\n--- after ---\n{}", after.trim());
    println!("\noutputs in {}:", outcome.output_dir.display());
    println!("  model:   {}", outcome.final_model_dir.display());
    println!("  metrics: {}", outcome.output_dir.join("metrics.jsonl").display());
    for c in &outcome.charts {
        println!("  chart:   {}", c.display());
    }
    println!("  summary: {}", outcome.output_dir.join("summary.txt").display());
    println!("total time: {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cut_at_sentence;

    #[test]
    fn a_cut_answer_ends_at_its_last_sentence_and_says_so() {
        let cut = cut_at_sentence("The capital is Paris. It lies on the Seine. Its old", 96);
        assert_eq!(cut, "The capital is Paris. It lies on the Seine. [cut at the 96-token limit]");
        // A cut that happens to fall after a full stop keeps the last sentence.
        let whole = cut_at_sentence("One. Two.", 8);
        assert_eq!(whole, "One. Two. [cut at the 8-token limit]");
        // No complete sentence at all: only the note.
        assert_eq!(cut_at_sentence("In mathematics, the concept of \"", 4), "[cut at the 4-token limit]");
    }
}
