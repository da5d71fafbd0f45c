//! Fixtures shared by the training tests: a tiny random model with a
//! word-level tokenizer, synthetic pairs (plain or 2-D) whose chosen answers
//! use "good" words and rejected ones "bad" words, and a small configuration.

#![allow(dead_code)]

use dpo2d_model::test_support::TinyModel;
use dpo2d_train::config::TrainConfig;
use dpo2d_train::metrics::Record;
use dpo2d_train::trainer::RunOptions;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const WORDS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "q0",
    "q1",
    "q2",
    "q3",
    "q4",
    "q5",
    "q6",
    "q7",
    "q8",
    "q9",
    "what",
    "is",
    "it",
    "good",
    "fine",
    "great",
    "bad",
    "awful",
    "wrong",
    "the",
    "answer",
    ".",
];
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A tiny random Llama with a word-level tokenizer over [`WORDS`] and a
/// ChatML template.
pub fn write_tiny_model(dir: &Path) {
    write_tiny_model_from(dir, &TinyModel::e2e(), &[]);
}

/// [`write_tiny_model`] with other random weights (the same shape and
/// tokenizer): a second model that gives other log-probs.
pub fn write_tiny_model_seeded(dir: &Path, seed: u64) {
    write_tiny_model_from(dir, &TinyModel { seed, ..TinyModel::e2e() }, &[]);
}

/// `model`'s weights with the word-level tokenizer of [`write_tiny_model`],
/// plus `extra` words whose ids come after the model's vocabulary (text
/// the tokenizer reads but the model cannot embed).
pub fn write_tiny_model_from(dir: &Path, model: &TinyModel, extra: &[&str]) {
    let vocab = model.vocab;
    model.write(dir);
    let mut v = serde_json::Map::new();
    v.insert("<|im_start|>".into(), 0.into());
    v.insert("<|im_end|>".into(), 1.into());
    v.insert("[UNK]".into(), 2.into());
    for w in WORDS {
        let n = v.len();
        v.insert(w.to_string(), n.into());
    }
    assert!(v.len() <= vocab);
    for (i, w) in extra.iter().enumerate() {
        v.insert(w.to_string(), (vocab + i).into());
    }
    let special = |id: u32, c: &str| json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<|im_start|>"), special(1, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": v, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<|im_end|>", "bos_token": null, "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"})
            .to_string(),
    )
    .unwrap();
}

pub fn seg(text: &str, s: [u8; 5]) -> serde_json::Value {
    json!({"text": text, "scores": {"helpfulness": s[0], "correctness": s[1], "safety": s[2], "completeness": s[3], "clarity": s[4]}})
}

/// Pairs whose chosen answers use "good/fine/great" and rejected ones
/// "bad/awful/wrong"; `scored` = 2-D shape, else plain TRL strings.
pub fn write_pairs(path: &Path, prompts: std::ops::Range<usize>, scored: bool) {
    let good = ["good", "fine", "great"];
    let bad = ["bad", "awful", "wrong"];
    let mut lines = String::new();
    for i in prompts {
        let q = format!("what is q{} .", i % 10);
        let (g1, g2) = (good[i % 3], good[(i + 1) % 3]);
        let (b1, b2) = (bad[i % 3], bad[(i + 2) % 3]);
        let line = if scored {
            json!({
                "prompt": q,
                "chosen": {"segments": [seg(&format!("the answer is {g1} . "), [4, 4, 4, 2, 4]), seg(&format!("it is {g2} ."), [3, 4, 4, 4, 3])]},
                "rejected": {"segments": [seg(&format!("the answer is {b1} . "), [1, 0, 4, 2, 2]), seg(&format!("it is {b2} ."), [0, 1, 4, 2, 2])]},
            })
        } else {
            json!({"prompt": q, "chosen": format!("the answer is {g1} . it is {g2} ."), "rejected": format!("the answer is {b1} . it is {b2} .")})
        };
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

pub fn base_config(dir: &Path, loss: &str) -> TrainConfig {
    TrainConfig {
        model: dir.join("model").display().to_string(),
        train_file: Some(dir.join("train.jsonl")),
        eval_file: Some(dir.join("eval.jsonl")),
        output_dir: dir.join("out"),
        loss_type: loss.parse().unwrap(),
        beta: 0.1,
        learning_rate: 1e-2,
        lr_scheduler_type: "constant".parse().unwrap(),
        per_device_train_batch_size: 4,
        per_device_eval_batch_size: 8,
        max_steps: 30,
        max_length: 64,
        max_prompt_length: 32,
        logging_steps: 1,
        eval_steps: 0,
        save_steps: 0,
        seed: 7,
        ..TrainConfig::default()
    }
}

pub fn setup(scored: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_tiny_model(&d.path().join("model"));
    write_pairs(&d.path().join("train.jsonl"), 0..24, scored);
    write_pairs(&d.path().join("eval.jsonl"), 100..108, scored);
    d
}

pub fn quiet(d: &Path) -> RunOptions {
    RunOptions { quiet: true, cache_dir: Some(d.join("cache")), ..RunOptions::default() }
}

pub fn strip_timing(r: &[Record]) -> Vec<(usize, String, BTreeMap<String, String>)> {
    r.iter()
        .map(|r| {
            let v = r.values.iter().filter(|(k, _)| k.as_str() != "tokens/s").map(|(k, v)| (k.clone(), format!("{v:e}"))).collect();
            (r.step, format!("{:e}", r.epoch), v)
        })
        .collect()
}

/// Two runs' training records agree step by step on the loss, the margins
/// and the gradient norm (to float noise: other operation orders).
pub fn assert_same_training(a: &[Record], b: &[Record], what: &str) {
    let steps = |r: &[Record]| r.iter().filter(|r| r.get("loss").is_some()).cloned().collect::<Vec<_>>();
    let (a, b) = (steps(a), steps(b));
    assert_eq!(a.len(), b.len(), "{what}: training records");
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "rewards/margins", "grad_norm"] {
            let (u, v) = (x.get(k).unwrap(), y.get(k).unwrap());
            assert!((u - v).abs() <= 1e-4 * (1.0 + u.abs()), "{what}: step {} {k}: {u} vs {v}", x.step);
        }
    }
}

/// The tiny model of these tests, for tests that change its weights.
pub trait TinyModelExt {
    fn e2e() -> TinyModel;
}

impl TinyModelExt for TinyModel {
    fn e2e() -> TinyModel {
        TinyModel {
            vocab: 32,
            hidden: 16,
            intermediate: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            bos_token_id: 0,
            eos_token_id: 1,
            ..Default::default()
        }
    }
}

/// `dpo2d train --no-progress` on the fixture's model and training file,
/// writing into `out`; the caller adds the rest.
pub fn train_command(d: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo2d"));
    c.args(["train", "--no-progress"]).arg("--model").arg(d.join("model")).arg("--train-file").arg(d.join("train.jsonl"));
    c.arg("--output-dir").arg(out).arg("--cache-dir").arg(d.join("cache"));
    c
}
