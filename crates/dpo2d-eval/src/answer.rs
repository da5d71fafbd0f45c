//! The evaluated model's answers: greedy, batched, turn by turn (a second
//! turn sees the model's own first answer), each cached under the model's
//! identity, the settings and the conversation, so a rerun answers only
//! what is missing.

use crate::sets::Question;
use anyhow::{Context, Result};
use dpo2d_annotate::cache::Cache;
use dpo2d_model::chat::Message;
use dpo2d_model::generate::{generate_from_ids, GenerationConfig};
use dpo2d_model::source::LoadedModel;
use sha2::{Digest, Sha256};
use std::path::Path;

/// How answers are generated (part of every answer's cache key).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnswerSettings {
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

/// What a model (the files that make it up) is: its path and every file's
/// name, size and modification time, hashed. Retraining into the same
/// directory changes it; copying the model elsewhere does too.
pub fn model_identity(path: &Path) -> Result<String> {
    let path = path.canonicalize().with_context(|| format!("cannot resolve {}", path.display()))?;
    let mut h = Sha256::new();
    h.update(path.to_string_lossy().as_bytes());
    let mut files = vec![];
    if path.is_dir() {
        for e in std::fs::read_dir(&path).with_context(|| format!("cannot list {}", path.display()))? {
            let e = e?;
            if e.file_type()?.is_file() {
                files.push(e.path());
            }
        }
    } else {
        files.push(path.clone());
    }
    files.sort();
    for f in files {
        let m = std::fs::metadata(&f)?;
        let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        h.update(format!("\0{}\0{}\0{}", f.file_name().unwrap_or_default().to_string_lossy(), m.len(), mtime).as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

fn answer_key(identity: &str, settings: &AnswerSettings, conversation: &[Message]) -> String {
    let mut h = Sha256::new();
    h.update(b"dpo2d-eval-answer-v1\0");
    h.update(identity.as_bytes());
    h.update(serde_json::to_string(&(settings.max_new_tokens, conversation)).unwrap_or_default().as_bytes());
    hex::encode(h.finalize())
}

/// The conversation that asks turn `turn` of `q`, given the earlier answers.
fn conversation(q: &Question, answers: &[String], turn: usize) -> Vec<Message> {
    let mut m = vec![];
    for (question, answer) in q.turns.iter().zip(answers).take(turn) {
        m.push(Message::user(question.clone()));
        m.push(Message::assistant(answer.clone()));
    }
    m.push(Message::user(q.turns[turn].clone()));
    m
}

/// Answers of `lm` to every turn of every question (`[question][turn]`).
/// `label` names the model on the progress bar.
pub fn answer_all(
    lm: &LoadedModel,
    identity: &str,
    questions: &[Question],
    settings: &AnswerSettings,
    cache: &Cache,
    label: &str,
    progress: bool,
) -> Result<Vec<Vec<String>>> {
    let mut answers: Vec<Vec<String>> = vec![vec![]; questions.len()];
    let text = lm.text();
    let context = lm.config.max_position_embeddings;
    let total: usize = questions.iter().map(|q| q.turns.len()).sum();
    let bar = dpo2d_ui::progress::bar_if(
        progress,
        total as u64,
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} answers ({msg}), eta {eta}",
    );
    bar.set_message(label.to_string());
    let max_turns = questions.iter().map(|q| q.turns.len()).max().unwrap_or(0);
    let mut too_long = 0;
    for turn in 0..max_turns {
        // (question, prompt ids, cache key) of this turn's missing answers.
        let mut todo: Vec<(usize, Vec<u32>, String)> = vec![];
        for (i, q) in questions.iter().enumerate().filter(|(_, q)| q.turns.len() > turn) {
            let conv = conversation(q, &answers[i], turn);
            let key = answer_key(identity, settings, &conv);
            if let Some(a) = cache.get_text(&key)? {
                answers[i].push(a);
                bar.inc(1);
                continue;
            }
            let ids = text.prompt_ids(&conv)?;
            if ids.len() + 16 > context {
                // Nothing sensible fits; an empty answer is judged as what it is.
                too_long += 1;
                cache.put_text(&key, "answer", "")?;
                answers[i].push(String::new());
                bar.inc(1);
                continue;
            }
            todo.push((i, ids, key));
        }
        // Similar lengths together: less padding in each batch.
        todo.sort_by_key(|(_, ids, _)| ids.len());
        for chunk in todo.chunks(settings.batch_size.max(1)) {
            let longest = chunk.iter().map(|(_, ids, _)| ids.len()).max().unwrap_or(0);
            let cfg = GenerationConfig {
                max_new_tokens: settings.max_new_tokens.min(context - longest),
                batch_size: chunk.len(),
                ..GenerationConfig::greedy(settings.max_new_tokens)
            };
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, ids, _)| ids.clone()).collect();
            let out = generate_from_ids(&lm.model, &text, &prompts, &cfg)?;
            for ((i, _, key), c) in chunk.iter().zip(out) {
                let a = c.completion.trim().to_string();
                cache.put_text(key, "answer", &a)?;
                answers[*i].push(a);
            }
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    if too_long > 0 {
        tracing::warn!("{too_long} prompt(s) do not fit the context of {label} ({context} tokens): answered with nothing");
    }
    Ok(answers)
}
