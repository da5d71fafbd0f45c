//! Reliability of training runs, tried as a careless or hostile user would:
//! a resume continues only the run that wrote the checkpoint, a non-finite
//! loss never trains on silently, two runs cannot share an output directory,
//! Ctrl-C leaves a checkpoint to resume from, a damaged newest checkpoint
//! falls back to the previous complete one, and bad lines of a 2-D file are
//! reported as `file:line`.

mod common;

use common::{base_config, quiet, setup, train_command, write_pairs, TinyModelExt};
use dpo2d_model::test_support::TinyModel;
use dpo2d_train::checkpoint;
use dpo2d_train::metrics::read_metrics;
use dpo2d_train::trainer::{train, RunOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn resume_continues_only_the_run_that_wrote_the_checkpoint() {
    let d = setup(true);
    let mut a = base_config(d.path(), "dpo");
    (a.max_steps, a.save_steps, a.eval_file) = (6, 2, None);
    a.output_dir = d.path().join("run");
    train(&a, &quiet(d.path())).unwrap();

    // A fresh run with other settings into the same directory is refused ...
    let mut b = a.clone();
    (b.max_steps, b.save_steps) = (3, 1);
    let e = err_of(train(&b, &quiet(d.path())));
    assert!(e.contains("already holds a training run") && e.contains("--overwrite-output-dir"), "{e}");
    // ... unless asked to replace it: then only its own checkpoints are there.
    let replace = RunOptions { overwrite_output_dir: true, stop_after: Some(2), ..quiet(d.path()) };
    assert!(train(&b, &replace).unwrap().interrupted);
    let cp = checkpoint::latest_checkpoint(&b.output_dir).unwrap().unwrap();
    assert!(cp.ends_with("checkpoint-2"), "{}", cp.display());
    assert!(!b.output_dir.join("checkpoint-4").exists());

    // Other settings on resume are refused, naming what changed.
    let resume = RunOptions { resume: Some(cp.clone()), ..quiet(d.path()) };
    let mut c = b.clone();
    c.learning_rate = 5e-3;
    let e = err_of(train(&c, &resume));
    assert!(e.contains("learning_rate: 0.01 -> 0.005"), "{e}");
    // So is training data edited between the crash and the resume.
    write_pairs(&d.path().join("train.jsonl"), 1..25, true);
    let e = err_of(train(&b, &resume));
    assert!(e.contains("training data") && e.contains("train.jsonl"), "{e}");
    write_pairs(&d.path().join("train.jsonl"), 0..24, true);
    let out = train(&b, &resume).unwrap();
    let steps: Vec<usize> = read_metrics(&b.output_dir.join("metrics.jsonl")).unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert_eq!(out.start_step, 2);
}

/// A model whose final norm overflows every logit: each loss is NaN.
fn overflowing_model(dir: &Path) {
    let mut t = TinyModel::e2e().tensors();
    let norm = t.get("model.norm.weight").unwrap().ones_like().unwrap();
    t.insert("model.norm.weight".into(), (norm * 3e38).unwrap());
    let t: Vec<_> = t.into_iter().collect();
    dpo2d_model::save::save_safetensors(&t, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn a_non_finite_loss_stops_the_run_or_is_skipped_and_counted() {
    let d = setup(true);
    overflowing_model(&d.path().join("model"));
    let mut cfg = base_config(d.path(), "dpo");
    (cfg.max_steps, cfg.eval_file, cfg.save_steps) = (3, None, 1);
    let e = err_of(train(&cfg, &quiet(d.path())));
    assert!(e.contains("step 1:") && e.contains("not finite") && e.contains("--skip-nonfinite-updates"), "{e}");
    assert!(!cfg.output_dir.join("checkpoint-1").exists(), "nothing is saved after a non-finite update");

    cfg.skip_nonfinite_updates = true;
    let run = RunOptions { overwrite_output_dir: true, ..quiet(d.path()) };
    let out = train(&cfg, &run).unwrap();
    let text = std::fs::read_to_string(out.output_dir.join("metrics.jsonl")).unwrap();
    assert!(!text.contains("null"), "{text}");
    let counts: Vec<f64> =
        read_metrics(&out.output_dir.join("metrics.jsonl")).unwrap().iter().filter_map(|r| r.get("nonfinite_updates")).collect();
    assert_eq!(counts, vec![1.0, 2.0, 3.0]);
    // The skipped updates left the weights as they were, bit for bit: in the
    // checkpoints and in the final model.
    let start = tensor_bits(&d.path().join("model/model.safetensors"));
    for dir in ["checkpoint-1", "checkpoint-2", "final"] {
        let saved = tensor_bits(&cfg.output_dir.join(dir).join("model.safetensors"));
        assert_eq!(saved.keys().collect::<Vec<_>>(), start.keys().collect::<Vec<_>>(), "{dir}");
        for (name, bits) in &start {
            assert!(saved[name] == *bits, "{dir}: {name} changed by a skipped update");
        }
    }
    // And resumable.
    let state = checkpoint::check_complete(&cfg.output_dir.join("checkpoint-2")).unwrap();
    assert_eq!(state.nonfinite_updates, 2);
}

/// Every tensor of a safetensors file as the bits of its f32 values.
fn tensor_bits(path: &Path) -> std::collections::BTreeMap<String, Vec<u32>> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t.into_iter()
        .map(|(k, v)| {
            let v = v.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

#[test]
fn a_second_run_into_a_locked_output_dir_is_refused() {
    let d = setup(true);
    let cfg = base_config(d.path(), "dpo");
    let _held = dpo2d_fs::DirLock::acquire(&cfg.output_dir).unwrap();
    let e = err_of(train(&cfg, &quiet(d.path())));
    assert!(e.contains(&format!("another dpo2d run (pid {})", std::process::id())), "{e}");
    assert!(!cfg.output_dir.join("metrics.jsonl").exists());
}

/// A run whose newest checkpoint is damaged resumes from the previous
/// complete one, at its step, and ends exactly where an uninterrupted run
/// ends (weights and metrics).
#[test]
fn resume_skips_a_damaged_newest_checkpoint() {
    let d = setup(true);
    let mut cfg = base_config(d.path(), "dpo");
    (cfg.max_steps, cfg.save_steps, cfg.eval_file) = (6, 2, None);
    let mut straight = cfg.clone();
    straight.output_dir = d.path().join("straight");
    let whole = train(&straight, &quiet(d.path())).unwrap();
    train(&cfg, &RunOptions { stop_after: Some(4), ..quiet(d.path()) }).unwrap();
    let newest = cfg.output_dir.join("checkpoint-4/optimizer.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let said = std::cell::RefCell::new(vec![]);
    let cp = checkpoint::latest_checkpoint_with(&cfg.output_dir, &|s| said.borrow_mut().push(s.to_string())).unwrap();
    assert!(cp.ends_with("checkpoint-2"), "{}", cp.display());
    let said = said.into_inner();
    assert!(said.len() == 1 && said[0].contains("checkpoint-4") && said[0].contains("optimizer.safetensors"), "{said:?}");
    let resumed = train(&cfg, &RunOptions { resume: Some(cp), ..quiet(d.path()) }).unwrap();
    assert_eq!((resumed.start_step, resumed.global_step), (2, 6), "the run continues from checkpoint-2 to the end");
    let weights = |o: &dpo2d_train::trainer::TrainOutcome| std::fs::read(o.final_model_dir.join("model.safetensors")).unwrap();
    assert!(weights(&resumed) == weights(&whole), "the resumed run ends with other weights than an uninterrupted one");
    assert_eq!(common::strip_timing(&resumed.history), common::strip_timing(&whole.history));
    let steps: Vec<usize> = read_metrics(&cfg.output_dir.join("metrics.jsonl")).unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "each step logged once");
}

#[test]
fn a_plain_pair_in_a_two_d_run_is_reported_by_line_or_skipped() {
    let d = setup(true);
    let f = d.path().join("train.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&f).unwrap().lines().map(str::to_string).collect();
    lines[2] = serde_json::json!({"prompt": "what is q1", "chosen": "good .", "rejected": "bad ."}).to_string();
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    let mut cfg = base_config(d.path(), "2d-dpo");
    cfg.max_steps = 1;
    let e = err_of(train(&cfg, &quiet(d.path())));
    assert!(e.contains("train.jsonl:3"), "{e}");
    cfg.skip_invalid = true;
    train(&cfg, &RunOptions { overwrite_output_dir: true, ..quiet(d.path()) }).unwrap();
}

#[test]
fn ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130() {
    let d = setup(true);
    let out = d.path().join("out");
    let mut child = train_command(d.path(), &out)
        .args(["--loss", "dpo", "--max-steps", "100000", "--logging-steps", "1", "--save-steps", "0"])
        .args(["--learning_rate", "1e-3", "--max-length", "64", "--per-device-train-batch-size", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("\"step\":3,") {
            break;
        }
        line.clear();
    }
    assert!(seen.contains("\"step\":3,"), "{seen}");
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("--resume") && rest.contains("checkpoint-"), "{rest}");
    let cp = checkpoint::latest_checkpoint(&out).unwrap().expect("a checkpoint");
    let state = checkpoint::check_complete(&cp).unwrap();
    assert!(state.global_step >= 3);
}
