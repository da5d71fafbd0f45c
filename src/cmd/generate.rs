//! `dpo2d generate`: answers from a model for one prompt or a JSONL file of
//! prompts, written as JSONL.

use anyhow::{bail, Context, Result};
use dpo2d_model::chat::Message;
use dpo2d_model::generate::{generate_from_ids, GenerationConfig};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Prompts (.jsonl), a row each: `prompt` (a string or {role, content} messages) or `messages`; other fields are copied.
    #[arg(value_name = "FILE", conflicts_with_all = ["prompt", "input_flag"])]
    pub input: Option<PathBuf>,
    /// The same as FILE (the older spelling).
    #[arg(long = "input", hide = true, conflicts_with = "prompt")]
    pub input_flag: Option<PathBuf>,
    /// A user prompt, instead of FILE (repeatable; may start with `-`) [default: none].
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: Vec<String>,
    /// System message put before each prompt given as a string [default: none].
    #[arg(long, allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Feed prompts to the model as raw text, without the chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Most tokens to generate per completion.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy decoding).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample from the k most likely tokens only (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop string (repeatable); cut from the completion [default: none].
    #[arg(long)]
    pub stop: Vec<String>,
    /// Completions per prompt.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Write JSONL here [default: standard output].
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

/// A prompt to answer: chat messages (or raw text) plus fields to copy.
pub(crate) struct PromptRow {
    pub messages: Vec<Message>,
    pub extra: serde_json::Map<String, Value>,
}

/// Parse `prompt` / `messages` from one JSONL row.
pub(crate) fn messages_of(v: &Value, key: &str, system: Option<&str>) -> Result<Vec<Message>> {
    match v {
        Value::String(s) => {
            let mut m = vec![];
            if let Some(sys) = system {
                m.push(Message::system(sys));
            }
            m.push(Message::user(s.clone()));
            Ok(m)
        }
        Value::Array(_) => serde_json::from_value::<Vec<Message>>(v.clone())
            .with_context(|| format!("`{key}` must be a list of {{\"role\", \"content\"}} messages")),
        _ => bail!("`{key}` must be a string or a list of messages"),
    }
}

pub(crate) fn read_prompt_rows(path: &Path, system: Option<&str>) -> Result<Vec<PromptRow>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut rows = vec![];
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: cannot read line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let obj = v.as_object().with_context(|| format!("{}:{}: expected a JSON object", path.display(), i + 1))?;
        let (key, pv) = match (obj.get("messages"), obj.get("prompt")) {
            (Some(m), _) => ("messages", m),
            (None, Some(p)) => ("prompt", p),
            (None, None) => bail!("{}:{}: row has neither `prompt` nor `messages`", path.display(), i + 1),
        };
        let messages = messages_of(pv, key, system).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        rows.push(PromptRow { messages, extra: obj.clone() });
    }
    if rows.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(rows)
}

pub fn run(a: Args) -> Result<()> {
    let rows: Vec<PromptRow> = match (a.input.as_ref().or(a.input_flag.as_ref()), a.prompt.is_empty()) {
        (Some(p), _) => read_prompt_rows(p, a.system.as_deref())?,
        (None, false) => a
            .prompt
            .iter()
            .map(|p| Ok(PromptRow { messages: messages_of(&json!(p), "prompt", a.system.as_deref())?, extra: Default::default() }))
            .collect::<Result<_>>()?,
        (None, true) => bail!("give --prompt TEXT or --input prompts.jsonl"),
    };
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        do_sample: a.temperature > 0.0,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop: a.stop.clone(),
        num_return_sequences: a.num_return_sequences,
        batch_size: a.batch_size,
    };
    cfg.validate()?;
    let lm = a.model.load()?;
    let text = lm.text();
    let mut prompts = vec![];
    for r in &rows {
        let s = if a.no_chat_template {
            r.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
        } else {
            text.chat.render(&r.messages, true)?
        };
        prompts.push(text.tokenizer.encode(&s, a.no_chat_template)?);
    }
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let start = std::time::Instant::now();
    let mut total_tokens = 0;
    // Generate in groups so that output appears as it is produced.
    let group = a.batch_size.max(1).div_ceil(a.num_return_sequences).max(1);
    for (gi, chunk) in prompts.chunks(group).enumerate() {
        let comps = generate_from_ids(&lm.model, &text, chunk, &cfg)?;
        for c in comps {
            let idx = gi * group + c.prompt_index;
            let row = &rows[idx];
            let mut o = row.extra.clone();
            if !o.contains_key("prompt") && !o.contains_key("messages") {
                let p = row.messages.last().map(|m| m.content.clone()).unwrap_or_default();
                o.insert("prompt".into(), json!(p));
            }
            o.insert("prompt_index".into(), json!(idx));
            o.insert("sample_index".into(), json!(c.sample_index));
            o.insert("completion".into(), json!(c.completion));
            o.insert("num_tokens".into(), json!(c.num_tokens));
            o.insert("finish_reason".into(), json!(c.finish_reason));
            total_tokens += c.num_tokens;
            writeln!(out, "{}", serde_json::to_string(&Value::Object(o))?)?;
        }
        out.flush()?;
        eprintln!("generated {}/{} prompts", (gi * group + chunk.len()).min(prompts.len()), prompts.len());
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("{total_tokens} tokens in {secs:.1}s ({:.1} tokens/s)", total_tokens as f64 / secs.max(1e-9));
    Ok(())
}
