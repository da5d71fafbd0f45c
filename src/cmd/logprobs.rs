//! `dpo2d logprobs`: per-token log-probabilities of responses under a model,
//! one JSON line per response token.

use anyhow::{bail, Context, Result};
use dpo2d_model::logprobs::response_logprobs;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Rows (.jsonl) of `prompt` (a string or messages) and `response`.
    #[arg(value_name = "FILE", conflicts_with_all = ["prompt", "input_flag"])]
    pub input: Option<PathBuf>,
    /// The same as FILE (the older spelling).
    #[arg(long = "input", hide = true, conflicts_with = "prompt")]
    pub input_flag: Option<PathBuf>,
    /// A user prompt, instead of FILE (rendered with the chat template; may start with `-`) [default: none].
    #[arg(long, requires = "response", allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// The response to score, with --prompt (may start with `-`) [default: none].
    #[arg(long, allow_hyphen_values = true)]
    pub response: Option<String>,
    /// System message for prompts given as strings [default: none].
    #[arg(long, allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Also score the chat template's end-of-turn tokens after the response.
    #[arg(long)]
    pub with_end_of_turn: bool,
    /// Write JSONL here [default: standard output].
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    use super::generate::messages_of;
    let rows: Vec<(Vec<dpo2d_model::chat::Message>, String)> = match (a.input.as_ref().or(a.input_flag.as_ref()), &a.prompt, &a.response) {
        (Some(p), _, _) => {
            let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            let mut rows = vec![];
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("{}: cannot read line {}", p.display(), i + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                let at = || format!("{}:{}", p.display(), i + 1);
                let v: Value = serde_json::from_str(&line).with_context(|| format!("{}: not valid JSON", at()))?;
                let prompt = v.get("prompt").or_else(|| v.get("messages")).with_context(|| format!("{}: missing `prompt`", at()))?;
                let msgs = messages_of(prompt, "prompt", a.system.as_deref()).with_context(at)?;
                let resp =
                    v.get("response").and_then(|r| r.as_str()).with_context(|| format!("{}: missing string field `response`", at()))?;
                rows.push((msgs, resp.to_string()));
            }
            rows
        }
        (None, Some(p), Some(r)) => vec![(messages_of(&json!(p), "prompt", a.system.as_deref())?, r.clone())],
        _ => bail!("give --prompt TEXT --response TEXT, or --input rows.jsonl"),
    };
    let lm = a.model.load()?;
    let text = lm.text();
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::stdout().lock()),
    };
    for (i, (msgs, resp)) in rows.iter().enumerate() {
        let lps = response_logprobs(&lm.model, &text, msgs, resp, a.with_end_of_turn).with_context(|| format!("row {}", i + 1))?;
        for t in lps {
            let line = json!({"row": i, "index": t.index, "id": t.id, "token": t.token, "logprob": t.logprob});
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(())
}
