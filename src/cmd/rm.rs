//! `dpo2d rm`: the 2-D reward model. `rm train` trains it (every `train`
//! option applies: schedules, LoRA, eval, checkpoints, resume); `rm score`
//! predicts the five aspect scores of every segment of responses.

use anyhow::{bail, Context, Result};
use dpo2d_data::{Pair, Prompt, Response};
use dpo2d_train::config::Task;
use dpo2d_train::reward::RewardModel;
use serde_json::Value;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum RmCommand {
    /// Train a reward model on 2-D pairs (both responses' segment scores are the labels).
    Train(Box<super::train::Args>),
    /// Predict the 5 aspect scores of every segment: pairs (or prompt/response lines) in, 2-D pairs out.
    Score(ScoreArgs),
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The reward model: `dpo2d rm train`'s final/ (final/merged/ of a LoRA run).
    #[arg(long)]
    model: PathBuf,
    /// Pairs (.jsonl; TRL strings or segmented), or {"prompt", "response"} lines.
    #[arg(value_name = "FILE", required_unless_present = "input_flag")]
    input: Option<PathBuf>,
    /// The same as FILE (the older spelling).
    #[arg(short = 'i', long = "input", hide = true, conflicts_with = "input")]
    input_flag: Option<PathBuf>,
    /// Where to write the same lines with every segment scored.
    #[arg(long, short)]
    output: PathBuf,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    device: super::DeviceArg,
}

pub fn run(c: RmCommand) -> Result<()> {
    match c {
        RmCommand::Train(a) => super::train::run_task(*a, Task::RewardModel),
        RmCommand::Score(a) => score(a),
    }
}

/// One input line: a pair, or a single response (scored as both sides of a pair).
enum Item {
    Pair(Pair),
    Single(Value, Pair),
}

fn score(a: ScoreArgs) -> Result<()> {
    let input = a.input.or(a.input_flag).context("give the file to score")?;
    let rm = RewardModel::load(&a.model, &a.device.device.device()?)?;
    let mut items = vec![];
    for line in dpo2d_data::io::jsonl_lines(&input)? {
        let line = line?;
        let at = || format!("{}:{}", input.display(), line.number);
        let v: Value = serde_json::from_str(&line.text).with_context(at)?;
        items.push(if v.get("response").is_some() && v.get("chosen").is_none() {
            let prompt: Prompt = serde_json::from_value(v["prompt"].clone()).with_context(|| format!("{}: \"prompt\"", at()))?;
            let response: Response = serde_json::from_value(v["response"].clone()).with_context(|| format!("{}: \"response\"", at()))?;
            Item::Single(v, Pair { id: None, prompt, chosen: response.clone(), rejected: response })
        } else {
            Item::Pair(serde_json::from_value(v).with_context(|| format!("{}: expected a pair (prompt, chosen, rejected)", at()))?)
        });
    }
    if items.is_empty() {
        bail!("{}: nothing to score", input.display());
    }
    let pairs: Vec<Pair> = items
        .iter()
        .map(|i| match i {
            Item::Pair(p) | Item::Single(_, p) => p.clone(),
        })
        .collect();
    let bar = dpo2d_ui::progress::bar_if(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        pairs.len() as u64,
        "{bar:30} {pos}/{len} scored [{elapsed_precise}<{eta_precise}]",
    );
    let mut scored = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(a.batch_size.max(1) * 4) {
        scored.extend(rm.score_pairs(chunk, a.batch_size)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let lines: Vec<Value> = items
        .into_iter()
        .zip(scored)
        .map(|(item, s)| match item {
            Item::Pair(_) => serde_json::to_value(s),
            Item::Single(mut v, _) => serde_json::to_value(&s.chosen).map(|r| {
                v["response"] = r;
                v
            }),
        })
        .collect::<Result<_, _>>()?;
    dpo2d_fs::write_file_with(&a.output, |tmp| dpo2d_data::io::write_jsonl(tmp, &lines).map(|_| ()))?;
    eprintln!("scored {} line(s) into {}", lines.len(), a.output.display());
    Ok(())
}
