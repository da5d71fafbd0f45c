//! End-to-end training tests on a tiny random model and synthetic 2-D data,
//! both written by the test: 2D-DPO learns (held-out reward accuracy goes
//! up), a resumed run ends exactly like an uninterrupted one, every loss
//! trains through the binary, and 2-D losses refuse plain pairs.

use dpo2d_train::config::TrainConfig;
use dpo2d_train::metrics::{read_metrics, Record};
use dpo2d_train::trainer::{train, RunOptions};
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

/// Minimal safetensors writer (f32 only).
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        let n = data.len() * 4;
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for (_, _, data) in tensors {
        for x in data {
            bytes.extend(x.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// A tiny Llama (2 layers, hidden 16) with random weights and a word-level
/// tokenizer with ChatML special tokens.
fn write_tiny_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let vocab = 32usize;
    let (hid, inter, layers) = (16usize, 32usize, 2usize);
    std::fs::write(
        dir.join("config.json"),
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hid, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "max_position_embeddings": 256,
            "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32"
        })
        .to_string(),
    )
    .unwrap();
    let mut state = 12345u64;
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    };
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    t.push(("model.embed_tokens.weight".into(), vec![vocab, hid], rnd(vocab * hid, 0.5)));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [("q_proj", 16, 16), ("k_proj", 8, 16), ("v_proj", 8, 16), ("o_proj", 16, 16)] {
            t.push((format!("{p}.self_attn.{n}.weight"), vec![o, inp], rnd(o * inp, 0.3)));
        }
        for (n, o, inp) in [("gate_proj", inter, hid), ("up_proj", inter, hid), ("down_proj", hid, inter)] {
            t.push((format!("{p}.mlp.{n}.weight"), vec![o, inp], rnd(o * inp, 0.3)));
        }
        t.push((format!("{p}.input_layernorm.weight"), vec![hid], vec![1.0; hid]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![hid], vec![1.0; hid]));
    }
    t.push(("model.norm.weight".into(), vec![hid], vec![1.0; hid]));
    write_safetensors(&dir.join("model.safetensors"), &t);

    let mut v = serde_json::Map::new();
    v.insert("<|im_start|>".into(), 0.into());
    v.insert("<|im_end|>".into(), 1.into());
    v.insert("[UNK]".into(), 2.into());
    for w in WORDS {
        let n = v.len();
        v.insert(w.to_string(), n.into());
    }
    assert!(v.len() <= vocab);
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

fn seg(text: &str, s: [u8; 5]) -> serde_json::Value {
    json!({"text": text, "scores": {"helpfulness": s[0], "correctness": s[1], "safety": s[2], "completeness": s[3], "clarity": s[4]}})
}

/// Pairs whose chosen answers use "good/fine/great" and rejected ones
/// "bad/awful/wrong"; `scored` = 2-D shape, else plain TRL strings.
fn write_pairs(path: &Path, prompts: std::ops::Range<usize>, scored: bool) {
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

fn base_config(dir: &Path, loss: &str) -> TrainConfig {
    TrainConfig {
        model: dir.join("model").display().to_string(),
        train_file: Some(dir.join("train.jsonl")),
        eval_file: Some(dir.join("eval.jsonl")),
        output_dir: dir.join("out"),
        loss_type: loss.into(),
        beta: 0.1,
        learning_rate: 1e-2,
        lr_scheduler_type: "constant".into(),
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

fn setup(scored: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_tiny_model(&d.path().join("model"));
    write_pairs(&d.path().join("train.jsonl"), 0..24, scored);
    write_pairs(&d.path().join("eval.jsonl"), 100..108, scored);
    d
}

fn quiet(d: &Path) -> RunOptions {
    RunOptions { quiet: true, cache_dir: Some(d.join("cache")), ..RunOptions::default() }
}

#[test]
fn two_d_dpo_raises_heldout_reward_accuracy() {
    let d = setup(true);
    let mut cfg = base_config(d.path(), "2d-dpo");
    cfg.eval_steps = 1;
    let out = train(&cfg, &quiet(d.path())).unwrap();
    let evals: Vec<&Record> = out.history.iter().filter(|r| r.get("eval_rewards/accuracies").is_some()).collect();
    let first = evals.first().unwrap().get("eval_rewards/accuracies").unwrap();
    let last = evals.last().unwrap().get("eval_rewards/accuracies").unwrap();
    let margin = evals.last().unwrap().get("eval_rewards/margins").unwrap();
    assert_eq!(evals[0].step, 0, "held-out metrics before training");
    assert_eq!(first, 0.0, "policy = reference before training: no margin");
    assert!(last >= 0.75, "held-out reward accuracy {first} -> {last}");
    assert!(margin > 0.0, "held-out margin {margin}");
    // Outputs: final HF model, metrics, charts, summary.
    assert!(out.final_model_dir.join("model.safetensors").is_file());
    assert!(out.output_dir.join("summary.txt").is_file());
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.output_dir.join("train_results.json")).unwrap()).unwrap();
    assert!(res["train_runtime"].as_f64().unwrap() > 0.0);
    assert_eq!(res["global_step"], 30);
    assert!(out.charts.iter().any(|c| c.ends_with("rewards.png")));
    let m: Vec<Record> =
        read_metrics(&out.output_dir.join("metrics.jsonl")).unwrap().into_iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(m.len(), 30);
    let keys = [
        "loss",
        "sft_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "kl/chosen",
        "kl/rejected",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens/s",
    ];
    for k in keys {
        assert!(m[0].get(k).is_some(), "metric {k} missing from {:?}", m[0]);
    }
    // The first step's loss is the loss before any update: policy = reference, so the 2D-DPO
    // part is N * log 2 per pair (here N = 2 segments a side).
    let pref = m[0].get("loss").unwrap() - 0.1 * m[0].get("sft_loss").unwrap();
    assert!((pref - 2.0 * std::f64::consts::LN_2).abs() < 1e-4, "{pref}");
}

fn strip_timing(r: &[Record]) -> Vec<(usize, String, BTreeMap<String, String>)> {
    r.iter()
        .map(|r| {
            let v = r.values.iter().filter(|(k, _)| k.as_str() != "tokens/s").map(|(k, v)| (k.clone(), format!("{v:e}"))).collect();
            (r.step, format!("{:e}", r.epoch), v)
        })
        .collect()
}

#[test]
fn resume_ends_exactly_like_an_uninterrupted_run() {
    let d = setup(true);
    let mut cfg = base_config(d.path(), "2d-dpo");
    cfg.max_steps = 6;
    cfg.save_steps = 3;
    cfg.logging_steps = 2; // the logging window spans the checkpoint
    cfg.eval_steps = 3;
    cfg.gradient_accumulation_steps = 2;
    cfg.per_device_train_batch_size = 5; // batches cross epoch ends
    cfg.lr_scheduler_type = "cosine".into();
    cfg.warmup_ratio = 0.2;
    cfg.weight_decay = 0.01;
    cfg.output_dir = d.path().join("straight");
    let a = train(&cfg, &quiet(d.path())).unwrap();

    cfg.output_dir = d.path().join("resumed");
    let stop = RunOptions { stop_after: Some(3), ..quiet(d.path()) };
    let part = train(&cfg, &stop).unwrap();
    assert!(part.interrupted);
    let cp = dpo2d_train::checkpoint::latest_checkpoint(&cfg.output_dir).unwrap().unwrap();
    assert!(cp.ends_with("checkpoint-3"));
    let b = train(&cfg, &RunOptions { resume: Some(cp), ..quiet(d.path()) }).unwrap();
    assert_eq!(b.start_step, 3, "the resumed run continues from the checkpoint");

    let wa = std::fs::read(a.final_model_dir.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.final_model_dir.join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    let ma = read_metrics(&a.output_dir.join("metrics.jsonl")).unwrap();
    let mb = read_metrics(&b.output_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(strip_timing(&ma), strip_timing(&mb));
    assert!(ma.len() >= 4);
    // And training did change the weights.
    let w0 = std::fs::read(d.path().join("model/model.safetensors")).unwrap();
    assert!(w0.len() != wa.len() || w0 != wa);
}

#[test]
fn lora_with_dropout_resumes_exactly() {
    let d = setup(true);
    let mut cfg = base_config(d.path(), "dpo");
    cfg.use_lora = true;
    cfg.lora_r = 4;
    cfg.lora_dropout = 0.3;
    cfg.max_steps = 4;
    cfg.save_steps = 2;
    cfg.output_dir = d.path().join("straight");
    let a = train(&cfg, &quiet(d.path())).unwrap();
    cfg.output_dir = d.path().join("resumed");
    let part = train(&cfg, &RunOptions { stop_after: Some(2), ..quiet(d.path()) }).unwrap();
    assert!(part.interrupted);
    let cp = dpo2d_train::checkpoint::latest_checkpoint(&cfg.output_dir).unwrap().unwrap();
    let b = train(&cfg, &RunOptions { resume: Some(cp), ..quiet(d.path()) }).unwrap();
    // LoRA runs end with the adapter in final/ and the merged model in final/merged/.
    let read = |o: &dpo2d_train::trainer::TrainOutcome, f: &str| std::fs::read(o.output_dir.join("final").join(f)).unwrap();
    assert!(read(&a, "adapter_model.safetensors") == read(&b, "adapter_model.safetensors"), "final adapters differ");
    assert!(read(&a, "merged/model.safetensors") == read(&b, "merged/model.safetensors"), "merged weights differ");
    let ma = read_metrics(&a.output_dir.join("metrics.jsonl")).unwrap();
    let mb = read_metrics(&b.output_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(strip_timing(&ma), strip_timing(&mb));
}

#[test]
fn sequential_sampling_keeps_file_order() {
    let d = setup(true);
    let order_of = |strategy: &str| {
        let mut cfg = base_config(d.path(), "dpo");
        cfg.train_sampling_strategy = strategy.into();
        cfg.max_steps = 2;
        cfg.save_steps = 1;
        cfg.output_dir = d.path().join(strategy);
        train(&cfg, &RunOptions { stop_after: Some(1), ..quiet(d.path()) }).unwrap();
        dpo2d_train::checkpoint::load_state(&cfg.output_dir.join("checkpoint-1")).unwrap().data_order
    };
    assert_eq!(order_of("sequential"), (0..24).collect::<Vec<_>>());
    let random = order_of("random");
    assert_ne!(random, (0..24).collect::<Vec<_>>());
    let mut sorted = random.clone();
    sorted.sort();
    assert_eq!(sorted, (0..24).collect::<Vec<_>>());
    let mut cfg = base_config(d.path(), "dpo");
    cfg.train_sampling_strategy = "shuffled".into();
    assert!(train(&cfg, &quiet(d.path())).unwrap_err().to_string().contains("train_sampling_strategy"));
}

#[test]
fn every_loss_trains_through_the_binary() {
    let d = setup(true);
    for loss in ["dpo", "ipo", "kto", "orpo", "simpo", "tdpo1", "tdpo2", "1d-dpo", "2d-dpo"] {
        let out = d.path().join(format!("out-{loss}"));
        let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
            .args(["train", "--no-progress", "--loss", loss, "--max-steps", "2", "--per-device-train-batch-size", "3"])
            .args(["--learning_rate", "1e-3", "--max-length", "64", "--logging-steps", "1"])
            .arg("--model")
            .arg(d.path().join("model"))
            .arg("--train-file")
            .arg(d.path().join("train.jsonl"))
            .arg("--eval-file")
            .arg(d.path().join("eval.jsonl"))
            .arg("--output-dir")
            .arg(&out)
            .arg("--cache-dir")
            .arg(d.path().join("cache"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{loss}: {}", String::from_utf8_lossy(&o.stderr));
        let m = read_metrics(&out.join("metrics.jsonl")).unwrap();
        assert_eq!(m.iter().filter(|r| r.get("loss").is_some()).count(), 2, "{loss}");
        assert!(m.iter().all(|r| r.values.values().all(|v| v.is_finite())), "{loss}: {m:?}");
        assert!(out.join("final/model.safetensors").is_file(), "{loss}");
    }
}

#[test]
fn two_d_losses_refuse_plain_pairs() {
    let d = setup(false);
    for loss in ["2d-dpo", "1d-dpo"] {
        let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
            .args(["train", "--no-progress", "--loss", loss, "--max-steps", "1"])
            .arg("--model")
            .arg(d.path().join("model"))
            .arg("--train-file")
            .arg(d.path().join("train.jsonl"))
            .arg("--output-dir")
            .arg(d.path().join("out"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("segment") && err.contains(loss), "{err}");
    }
    // The same plain data trains with DPO.
    let mut cfg = base_config(d.path(), "dpo");
    cfg.max_steps = 1;
    train(&cfg, &quiet(d.path())).unwrap();
}

#[test]
fn splitting_a_micro_batch_keeps_the_update() {
    // pairs_per_forward only trades memory for passes: the gradient is the same.
    let d = setup(true);
    let mut cfg = base_config(d.path(), "2d-dpo");
    cfg.max_steps = 3;
    cfg.learning_rate = 1e-3;
    let run = |ppf: usize, name: &str| {
        let mut c = cfg.clone();
        c.pairs_per_forward = ppf;
        c.output_dir = d.path().join(name);
        train(&c, &quiet(d.path())).unwrap().history
    };
    let (a, b) = (run(0, "whole"), run(1, "split"));
    let train_a: Vec<&Record> = a.iter().filter(|r| r.get("loss").is_some()).collect();
    let train_b: Vec<&Record> = b.iter().filter(|r| r.get("loss").is_some()).collect();
    for (x, y) in train_a.iter().zip(&train_b) {
        for k in ["loss", "rewards/margins", "grad_norm"] {
            let (u, v) = (x.get(k).unwrap(), y.get(k).unwrap());
            assert!((u - v).abs() <= 1e-4 * (1.0 + u.abs()), "step {} {k}: {u} vs {v}", x.step);
        }
    }
}

/// The whole data path through the binary: HelpSteer2-style rows ->
/// `build-pairs` -> `segment` -> `annotate` (against the fake judge on
/// 127.0.0.1) -> `train --loss 2d-dpo` on the annotated file.
#[test]
fn build_segment_annotate_then_train_2d_dpo() {
    use dpo2d_annotate::test_server::{MockConfig, MockJudge};
    let d = tempfile::tempdir().unwrap();
    write_tiny_model(&d.path().join("model"));
    let answers = ["the answer is good . it is fine .", "the answer is bad . it is wrong . awful ."];
    let mut rows = String::new();
    for q in 0..4 {
        for (k, a) in answers.iter().enumerate() {
            let h = if k == 0 { 4 } else { 1 };
            rows += &json!({"prompt": format!("what is q{q}"), "response": a, "helpfulness": h, "correctness": h,
                            "coherence": 4, "complexity": 1, "verbosity": 1})
            .to_string();
            rows.push('\n');
        }
    }
    std::fs::write(d.path().join("rows.jsonl"), rows).unwrap();
    let bin = env!("CARGO_BIN_EXE_dpo2d");
    let run = |args: &[&str]| {
        let o = Command::new(bin).current_dir(d.path()).args(args).env_remove("OPENAI_API_KEY").output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["build-pairs", "rows.jsonl", "-o", "pairs.jsonl"]);
    run(&["segment", "pairs.jsonl", "-o", "pairs.seg.jsonl"]);
    let server = MockJudge::start(MockConfig::default());
    run(&["annotate", "pairs.seg.jsonl", "-o", "pairs.2d.jsonl", "--base-url", server.base_url(), "--model", "judge"]);
    assert_eq!(server.stats().requests, 4 * 5, "one request per pair and aspect");
    run(&["validate", "pairs.2d.jsonl", "--require-scores"]);
    run(&[
        "train",
        "--no-progress",
        "--loss",
        "2d-dpo",
        "--model",
        "model",
        "--train-file",
        "pairs.2d.jsonl",
        "--output-dir",
        "out",
        "--cache-dir",
        "cache",
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--logging-steps",
        "1",
    ]);
    let m = read_metrics(&d.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(m.iter().filter(|r| r.get("loss").is_some()).count(), 2);
    assert!(m.iter().all(|r| r.values.values().all(|v| v.is_finite())), "{m:?}");
    assert!(d.path().join("out/final/model.safetensors").is_file());
}
