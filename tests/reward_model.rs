//! `dpo2d rm train` / `rm score` end to end on a tiny random model: the loss
//! falls, a resumed run ends where an uninterrupted one does, the saved
//! directory is a transformers token classifier, and scored output is valid
//! 2-D data.

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
