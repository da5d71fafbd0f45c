//! `dpo2d rm train` / `rm score` end to end on a tiny random model: the loss
//! falls, a resumed run ends where an uninterrupted one does, the saved
//! directory is a transformers token classifier, scored output is valid
//! 2-D data, `rm train` through the binary trains what the library trains,
//! and the reward model scores an iterate round (`--scorer rm:DIR`).

mod common;

use dpo2d_train::config::Task;
use dpo2d_train::trainer::{train, RunOptions};
use std::process::Command;

fn rm_config(d: &std::path::Path, out: &str) -> dpo2d_train::config::TrainConfig {
    let mut cfg = common::base_config(d, "dpo");
    cfg.task = Task::RewardModel;
    cfg.output_dir = d.join(out);
    cfg.learning_rate = 2e-2;
    cfg.max_steps = 60;
    cfg.eval_steps = 30;
    cfg
}

#[test]
fn trains_resumes_saves_and_scores() {
    let d = common::setup(true);
    let cfg = rm_config(d.path(), "rm");
    let out = train(&cfg, &common::quiet(d.path())).unwrap();
    let evals: Vec<f64> = out.history.iter().filter_map(|r| r.get("eval_loss")).collect();
    assert!(evals.len() >= 2 && evals.last().unwrap() < &(0.5 * evals[0]), "held-out MSE did not fall: {evals:?}");
    let last = out.history.iter().rev().find(|r| r.get("eval_accuracy").is_some()).unwrap();
    for k in ["eval_mse/helpfulness", "eval_accuracy/clarity", "eval_within_one/safety", "eval_within_one"] {
        assert!(last.get(k).is_some_and(|v| v.is_finite()), "{k} missing");
    }

    // The saved model: a token classifier transformers loads.
    let fin = &out.final_model_dir;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForTokenClassification");
    assert_eq!(config["num_labels"], 5);
    assert_eq!(config["id2label"]["1"], "correctness");
    assert_eq!(config["label2id"]["clarity"], 4);
    let w = dpo2d_model::weights::WeightSet::load_file(&fin.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(w.get("score.weight", &[5, 16]).is_ok() && w.get("score.bias", &[5]).is_ok());
    assert!(!w.contains("lm_head.weight") && w.contains("model.layers.1.mlp.down_proj.weight"));

    // Stopped after 10 updates (checkpoint every 5) and resumed: the same model.
    let mut stopped = rm_config(d.path(), "rm-stopped");
    stopped.save_steps = 5;
    let first = train(&stopped, &RunOptions { stop_after: Some(10), ..common::quiet(d.path()) }).unwrap();
    assert!(first.interrupted);
    let resume = Some(stopped.output_dir.join("checkpoint-10"));
    let second = train(&stopped, &RunOptions { resume, ..common::quiet(d.path()) }).unwrap();
    assert_eq!(second.start_step, 10);
    assert_eq!(common::strip_timing(&second.history), common::strip_timing(&out.history));
    let bytes = |p: &std::path::Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&second.final_model_dir), bytes(fin), "resumed reward model differs");

    // rm score: every segment scored; the output is valid 2-D data.
    let scored = d.path().join("scored.jsonl");
    let run = |args: &[&std::ffi::OsStr]| Command::new(env!("CARGO_BIN_EXE_dpo2d")).args(args).output().unwrap();
    let rm_score = |input: &std::path::Path| {
        run(&[
            "rm".as_ref(),
            "score".as_ref(),
            "--model".as_ref(),
            fin.as_os_str(),
            "-i".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            scored.as_os_str(),
        ])
    };
    let o = rm_score(&d.path().join("eval.jsonl"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["validate".as_ref(), scored.as_os_str(), "--require-scores".as_ref()]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&scored).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8);
    // After training, the chosen answers' first segments ("good") score above the rejected ones' ("bad").
    let first_help = |side: &str| lines.iter().map(|l| l[side]["segments"][0]["scores"]["helpfulness"].as_u64().unwrap()).sum::<u64>();
    assert!(first_help("chosen") > first_help("rejected"), "{:#?}", &lines[..2]);

    // A prompt/response line keeps its shape and gets scored segments.
    let single = d.path().join("single.jsonl");
    std::fs::write(&single, "{\"prompt\": \"what is q1 .\", \"response\": \"the answer is good . it is fine .\", \"note\": 3}\n").unwrap();
    let o = rm_score(&single);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&scored).unwrap().trim()).unwrap();
    assert_eq!(line["note"], 3);
    let segs = line["response"]["segments"].as_array().unwrap();
    assert!(segs.len() == 2 && segs.iter().all(|s| s["scores"]["clarity"].as_u64().unwrap() <= 4), "{line}");
}

/// `rm:DIR` as the scorer of an iterate round: every non-empty answer scored.
#[test]
fn scores_an_iterate_round() {
    let d = common::setup(true);
    let out = train(&rm_config(d.path(), "rm"), &common::quiet(d.path())).unwrap();
    let fin = &out.final_model_dir;
    let scorer = dpo2d_iterate::RewardModelScorer {
        path: fin.clone(),
        model: dpo2d_train::reward::RewardModel::load(fin, &candle_core::Device::Cpu).unwrap(),
        batch_size: 4,
    };
    let mut train_cfg = common::base_config(d.path(), "2d-dpo");
    train_cfg.output_dir = d.path().join("iterate");
    train_cfg.train_file = None;
    train_cfg.eval_file = None;
    train_cfg.max_steps = 2;
    let sampling = dpo2d_iterate::SamplingSettings { samples_per_prompt: 3, max_new_tokens: 6, batch_size: 6, ..Default::default() };
    let cfg = dpo2d_iterate::IterateConfig { train: train_cfg, rounds: 1, sampling };
    let prompts = dpo2d_iterate::prompts::load(&d.path().join("eval.jsonl")).unwrap();
    let run = dpo2d_iterate::IterateRun { quiet: true, cache_dir: Some(d.path().join("cache")), ..Default::default() };
    let out = dpo2d_iterate::iterate(&cfg, &prompts, &scorer, &run).unwrap();
    assert_eq!(out.rounds[0].prompts, 8);
    let scored = std::fs::read_to_string(d.path().join("iterate/round-1/scored.jsonl")).unwrap();
    let mut answers_scored = 0;
    for line in scored.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        answers_scored += v["scores"].as_array().unwrap().iter().filter(|s| !s.is_null()).count();
        for (r, score) in v["responses"].as_array().unwrap().iter().zip(v["scores"].as_array().unwrap()) {
            let segments = r["segments"].as_array().unwrap();
            assert_eq!(score.is_null(), segments.is_empty(), "{v}");
        }
    }
    assert!(answers_scored > 8, "{scored}");
}

/// `dpo2d rm train` through the binary trains the reward model the library
/// trains with the same settings (same metrics, same weights), and
/// `dpo2d iterate --scorer rm:DIR` scores every answer as `dpo2d rm score`
/// scores it with that model, then trains its round.
#[test]
fn rm_train_and_an_iterate_round_scored_by_it_through_the_binary() {
    let d = common::setup(true);
    let mut cfg = rm_config(d.path(), "library");
    (cfg.max_steps, cfg.eval_steps) = (10, 5);
    let library = train(&cfg, &common::quiet(d.path())).unwrap();

    let bin = env!("CARGO_BIN_EXE_dpo2d");
    let run = |args: &[&str]| {
        let o = Command::new(bin).current_dir(d.path()).args(args).env_remove("RUST_LOG").output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        o
    };
    run(&[
        "rm",
        "train",
        "--no-progress",
        "--model",
        "model",
        "--train-file",
        "train.jsonl",
        "--eval-file",
        "eval.jsonl",
        "--output-dir",
        "cli",
        "--cache-dir",
        "cache",
        "--loss",
        "dpo",
        "--beta",
        "0.1",
        "--learning-rate",
        "0.02",
        "--lr-scheduler-type",
        "constant",
        "--per-device-train-batch-size",
        "4",
        "--per-device-eval-batch-size",
        "8",
        "--max-steps",
        "10",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--logging-steps",
        "1",
        "--eval-steps",
        "5",
        "--save-steps",
        "0",
        "--seed",
        "7",
    ]);
    let cli = d.path().join("cli");
    let metrics = dpo2d_train::metrics::read_metrics(&cli.join("metrics.jsonl")).unwrap();
    assert!(metrics.iter().any(|r| r.get("eval_within_one").is_some()), "reward-model metrics: {metrics:?}");
    assert_eq!(common::strip_timing(&metrics), common::strip_timing(&library.history));
    let bytes = |p: &std::path::Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert!(bytes(&cli.join("final")) == bytes(&library.final_model_dir), "the binary trained another reward model");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cli.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForTokenClassification");

    // A round of iterate scored by it.
    let rm = format!("rm:{}", cli.join("final").display());
    let o = run(&[
        "iterate",
        "--no-progress",
        "--model",
        "model",
        "--prompts",
        "eval.jsonl",
        "--scorer",
        &rm,
        "--samples-per-prompt",
        "3",
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.0",
        "--loss",
        "2d-dpo",
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--output-dir",
        "iterate",
        "--cache-dir",
        "cache",
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("| 1 | 8 |"), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(d.path().join("iterate/round-1/train/final/model.safetensors").is_file());
    // Every non-empty answer, scored again on its own by `rm score`.
    let scored: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("iterate/round-1/scored.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("iterate/round-1/samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut singles = String::new();
    let mut want = vec![];
    for (s, sample) in scored.iter().zip(&samples) {
        for (r, text) in s["responses"].as_array().unwrap().iter().zip(sample["responses"].as_array().unwrap()) {
            if text.as_str().unwrap().trim().is_empty() {
                continue;
            }
            singles += &(serde_json::json!({"prompt": s["prompt"], "response": text}).to_string() + "\n");
            want.push(r["segments"].clone());
        }
    }
    assert!(want.len() > 8, "{} answers scored", want.len());
    std::fs::write(d.path().join("singles.jsonl"), singles).unwrap();
    run(&["rm", "score", "--model", cli.join("final").to_str().unwrap(), "-i", "singles.jsonl", "-o", "singles.scored.jsonl"]);
    let by_rm: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("singles.scored.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["response"]["segments"].clone())
        .collect();
    assert_eq!(by_rm.len(), want.len());
    for (got, want) in by_rm.iter().zip(&want) {
        assert!(want.as_array().unwrap().iter().all(|s| s["scores"].is_object()), "every segment scored: {want}");
        assert_eq!(got, want, "iterate's rm scorer and `rm score` disagree");
    }
}
