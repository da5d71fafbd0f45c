//! End-to-end training tests on a tiny random model and synthetic 2-D data,
//! both written by the test: 2D-DPO learns (held-out reward accuracy goes
//! up), a resumed run ends exactly like an uninterrupted one, every loss
//! trains through the binary with the loss it names, the fused graph nodes
//! train like the ops they stand for, runs repeat bit for bit on any number
//! of threads, and 2-D losses refuse plain pairs.

mod common;

use common::{assert_same_training, base_config, quiet, setup, strip_timing, train_command, write_tiny_model};
use dpo2d_train::config::TrainConfig;
use dpo2d_train::metrics::{read_metrics, Record};
use dpo2d_train::trainer::{train, RunOptions};
use serde_json::json;
use std::process::Command;

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
    cfg.lr_scheduler_type = "cosine".parse().unwrap();
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
        cfg.train_sampling_strategy = strategy.parse().unwrap();
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
    let mut o = toml::Table::new();
    o.insert("train_sampling_strategy".into(), "shuffled".into());
    assert!(TrainConfig::resolve(None, None, o).unwrap_err().to_string().contains("train_sampling_strategy"));
}

/// The response part of `prompt + response` under a model, from one plain
/// forward pass of that sequence alone: per response token its log-prob
/// (log-softmax of the logits, in f64) and the full next-token
/// distribution's log-probs that predicted it.
struct ResponseOut {
    logps: Vec<f64>,
    dists: Vec<Vec<f64>>,
}

fn response_out(m: &dpo2d_model::llama::CausalLM, prompt: &[u32], response: &[u32]) -> ResponseOut {
    let ids: Vec<u32> = prompt.iter().chain(response).copied().collect();
    let x = candle_core::Tensor::new(vec![ids.clone()], &candle_core::Device::Cpu).unwrap();
    let h = m.forward(&x, &dpo2d_model::llama::AttentionLayout::causal(1, ids.len())).unwrap();
    let logits = m.logits(&h).unwrap().squeeze(0).unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let (mut logps, mut dists) = (vec![], vec![]);
    for (j, &tok) in response.iter().enumerate() {
        // Position prompt_len + j - 1 predicts response token j.
        let row = &logits[prompt.len() + j - 1];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let dist: Vec<f64> = row.iter().map(|v| v - lse).collect();
        logps.push(dist[tok as usize]);
        dists.push(dist);
    }
    ResponseOut { logps, dists }
}

/// `[B, T]` f32 values padded with zeros, and the response mask.
fn padded(rows: &[Vec<f64>]) -> (candle_core::Tensor, candle_core::Tensor) {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let (mut v, mut m) = (vec![], vec![]);
    for r in rows {
        for j in 0..t {
            v.push(r.get(j).copied().unwrap_or(0.0) as f32);
            m.push(if j < r.len() { 1f32 } else { 0.0 });
        }
    }
    let dev = candle_core::Device::Cpu;
    (candle_core::Tensor::from_vec(v, (rows.len(), t), &dev).unwrap(), candle_core::Tensor::from_vec(m, (rows.len(), t), &dev).unwrap())
}

/// The loss of `loss_type` on the pairs `idx` of `pairs`, built here from the
/// loss module's inputs: log-probs of the policy and of the reference from
/// plain forward passes of each sequence, the exact per-token KL for TDPO,
/// the mismatched prompt/completion sums for KTO (prompt i with the chosen
/// answer of pair i+1), the segments for the 2-D losses.
fn library_loss(
    loss_type: dpo2d_train::loss::LossType,
    policy: &dpo2d_model::llama::CausalLM,
    reference: &dpo2d_model::llama::CausalLM,
    pairs: &[dpo2d_train::align::TokenizedPair],
    idx: &[usize],
) -> f64 {
    use dpo2d_train::align::{TokenizedResponse, NO_SEGMENT};
    use dpo2d_train::loss::{compute_loss, KtoKl, LossConfig, PreferenceBatch, SegmentBatch, SideBatch};
    let side = |pick: fn(&dpo2d_train::align::TokenizedPair) -> &TokenizedResponse| {
        let (mut pol, mut refs, mut kls) = (vec![], vec![], vec![]);
        for &i in idx {
            let (prompt, resp) = (&pairs[i].prompt, &pick(&pairs[i]).ids);
            let (p, r) = (response_out(policy, prompt, resp), response_out(reference, prompt, resp));
            // KL(ref || policy) of the next-token distributions.
            kls.push(r.dists.iter().zip(&p.dists).map(|(q, p)| q.iter().zip(p).map(|(q, p)| q.exp() * (q - p)).sum()).collect());
            pol.push(p.logps);
            refs.push(r.logps);
        }
        let (logps, mask) = padded(&pol);
        let mut b = SideBatch::new(logps, mask);
        if loss_type.needs_reference() {
            b.reference_logps = Some(padded(&refs).0);
        }
        if loss_type.needs_token_kl() {
            b.token_kl = Some(padded(&kls).0);
        }
        if loss_type.needs_segment_scores() {
            let t = idx.iter().map(|&i| pick(&pairs[i]).ids.len()).max().unwrap();
            let ids = idx
                .iter()
                .map(|&i| {
                    let mut v = pick(&pairs[i]).token_segments.clone();
                    v.resize(t, NO_SEGMENT);
                    v
                })
                .collect();
            b.segments = Some(SegmentBatch::new(ids, idx.iter().map(|&i| pick(&pairs[i]).scores.clone()).collect()).unwrap());
        }
        b
    };
    let kto_kl = loss_type.needs_kto_kl().then(|| {
        let sums = |m: &dpo2d_model::llama::CausalLM| {
            let v: Vec<f32> = (0..idx.len())
                .map(|k| {
                    let (prompt, other) = (&pairs[idx[k]].prompt, &pairs[idx[(k + 1) % idx.len()]].chosen.ids);
                    response_out(m, prompt, other).logps.iter().sum::<f64>() as f32
                })
                .collect();
            candle_core::Tensor::new(v, &candle_core::Device::Cpu).unwrap()
        };
        KtoKl { policy_logps: sums(policy), reference_logps: sums(reference) }
    });
    let batch = PreferenceBatch { chosen: side(|p| &p.chosen), rejected: side(|p| &p.rejected), kto_kl };
    let out = compute_loss(&LossConfig { loss_type, beta: 0.1, ..LossConfig::default() }, &batch).unwrap();
    out.metrics().iter().find(|(k, _)| *k == "loss").unwrap().1
}

/// Every `--loss NAME` trains through the binary, and trains with that loss:
/// its first update's loss (logged before any weight changes) equals the
/// loss of that type computed here on the same batch, with a reference
/// model other than the policy so that no two losses coincide.
#[test]
fn every_loss_trains_through_the_binary() {
    use dpo2d_train::loss::LossType;
    let d = setup(true);
    let reference = d.path().join("reference");
    common::write_tiny_model_seeded(&reference, 900);
    let losses = [
        ("dpo", LossType::Dpo),
        ("ipo", LossType::Ipo),
        ("kto", LossType::Kto),
        ("orpo", LossType::Orpo),
        ("simpo", LossType::Simpo),
        ("tdpo1", LossType::Tdpo1),
        ("tdpo2", LossType::Tdpo2),
        ("1d-dpo", LossType::OneDDpo),
        ("2d-dpo", LossType::TwoDDpo),
    ];
    assert_eq!(losses.len(), LossType::ALL.len());

    // The first batch, tokenized as the trainer does.
    let (seed, batch_size) = (7, 3);
    let load = |p: &std::path::Path| dpo2d_model::load(p, &Default::default()).unwrap();
    let (policy, refm) = (load(&d.path().join("model")), load(&reference));
    let text = policy.text();
    let data =
        dpo2d_data::load_pairs(&d.path().join("train.jsonl"), &dpo2d_data::LoadOptions::new(dpo2d_data::Requirement::Scored)).unwrap();
    let aligner = dpo2d_train::align::Aligner::new(&text.tokenizer.inner, &text.chat).unwrap();
    let opts = dpo2d_train::align::AlignOptions { max_length: 64, max_prompt_length: 512 };
    let (pairs, _) = aligner.pairs(&data.pairs, opts).unwrap();
    let idx =
        dpo2d_train::sampler::Sampler::new(dpo2d_train::sampler::SamplingStrategy::Random, seed, pairs.len(), batch_size, 0).next_batch();
    assert_eq!(idx.len(), batch_size);
    let want: Vec<f64> = losses.iter().map(|(_, t)| library_loss(*t, &policy.model, &refm.model, &pairs, &idx)).collect();
    // No two losses agree on this batch: a run of the wrong loss cannot pass.
    for i in 0..want.len() {
        for j in 0..i {
            assert!((want[i] - want[j]).abs() > 1e-3, "{} and {} give the same loss {}", losses[i].0, losses[j].0, want[i]);
        }
    }

    for ((loss, _), want) in losses.iter().zip(want) {
        let out = d.path().join(format!("out-{loss}"));
        let o = train_command(d.path(), &out)
            .args(["--loss", loss, "--max-steps", "2", "--per-device-train-batch-size", &batch_size.to_string()])
            .args(["--learning_rate", "1e-3", "--max-length", "64", "--logging-steps", "1", "--seed", &seed.to_string()])
            .arg("--ref-model")
            .arg(&reference)
            .arg("--eval-file")
            .arg(d.path().join("eval.jsonl"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{loss}: {}", String::from_utf8_lossy(&o.stderr));
        let m = read_metrics(&out.join("metrics.jsonl")).unwrap();
        let steps: Vec<&Record> = m.iter().filter(|r| r.get("loss").is_some()).collect();
        assert_eq!(steps.len(), 2, "{loss}");
        assert!(m.iter().all(|r| r.values.values().all(|v| v.is_finite())), "{loss}: {m:?}");
        let got = steps[0].get("loss").unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "--loss {loss}: first update's loss {got}, the {loss} loss of that batch is {want}"
        );
        assert!(out.join("final/model.safetensors").is_file(), "{loss}");
    }
}

/// Training through the single graph nodes (attention, MLP, whole blocks)
/// and through the composed ops they stand for (`DPO2D_FUSED_NODES=0`)
/// logs the same losses and gradient norms, for full fine-tuning and for
/// LoRA (frozen MLP weights, dropout on).
#[test]
fn fused_nodes_train_like_the_composed_ops() {
    let d = setup(true);
    let lora = ["--use-lora", "true", "--lora-target-modules", "q_proj,v_proj", "--lora-dropout", "0.1"];
    for (name, extra) in [("full", &[][..]), ("lora", &lora[..])] {
        let run = |nodes: &str| {
            let out = d.path().join(format!("{name}-nodes-{nodes}"));
            let o = train_command(d.path(), &out)
                .args(["--loss", "2d-dpo", "--max-steps", "3", "--logging-steps", "1", "--learning-rate", "1e-3"])
                .args(extra)
                .env("DPO2D_FUSED_NODES", nodes)
                .output()
                .unwrap();
            assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
            read_metrics(&out.join("metrics.jsonl")).unwrap()
        };
        let (fused, composed) = (run("1"), run("0"));
        assert_eq!(fused.iter().filter(|r| r.get("loss").is_some()).count(), 3, "{name}");
        assert_same_training(&fused, &composed, name);
    }
}

/// The same seed and data give the same bits on any number of threads: every
/// parallel sum in the training path adds its parts in an order fixed by the
/// shapes, not by which thread finished first.
#[test]
fn runs_repeat_bit_for_bit_on_any_number_of_threads() {
    let d = setup(true);
    let run = |threads: &str| {
        let out = d.path().join(format!("threads-{threads}"));
        let o = train_command(d.path(), &out)
            .args(["--loss", "2d-dpo", "--max-steps", "3", "--logging-steps", "1", "--learning-rate", "1e-3"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{threads} threads: {}", String::from_utf8_lossy(&o.stderr));
        let weights = std::fs::read(out.join("final").join("model.safetensors")).unwrap();
        (strip_timing(&read_metrics(&out.join("metrics.jsonl")).unwrap()), weights)
    };
    let one = run("1");
    for threads in ["2", "3"] {
        let other = run(threads);
        assert_eq!(other.0, one.0, "{threads} threads: metrics");
        assert!(other.1 == one.1, "{threads} threads: final weights differ");
    }
}

/// With `save_merged` off a LoRA run's `final/` is the adapter alone, and it
/// loads (on top of its base model) to the same log-probs as the merged
/// model of the same run.
#[test]
fn lora_adapter_without_the_merged_copy_loads_like_it() {
    let d = setup(true);
    let mut cfg = base_config(d.path(), "2d-dpo");
    cfg.max_steps = 2;
    cfg.use_lora = true;
    cfg.learning_rate = 1e-2;
    cfg.output_dir = d.path().join("merged");
    let merged = train(&cfg, &quiet(d.path())).unwrap();
    assert!(merged.final_model_dir.ends_with("final/merged"));
    cfg.save_merged = false;
    cfg.output_dir = d.path().join("adapter");
    let adapter = train(&cfg, &quiet(d.path())).unwrap();
    assert!(adapter.final_model_dir.ends_with("final"));
    assert!(adapter.final_model_dir.join("adapter_model.safetensors").is_file());
    assert!(!adapter.final_model_dir.join("merged").exists());
    let opts = dpo2d_model::llama::LoadOptions::default();
    let logps = |dir: &std::path::Path| {
        let m = dpo2d_model::source::load(dir, &opts).unwrap();
        let ids = candle_core::Tensor::new(&[[3u32, 7, 9, 11, 4]], &candle_core::Device::Cpu).unwrap();
        let lay = dpo2d_model::llama::AttentionLayout::causal(1, 5);
        m.model.token_logprobs(&ids, &lay).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logps(&merged.final_model_dir), logps(&adapter.final_model_dir));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4), "{a:?} vs {b:?}");
    // And the adapter is applied: the base model gives other numbers.
    let base = logps(&d.path().join("model"));
    assert!(a.iter().zip(&base).any(|(x, y)| (x - y).abs() > 1e-3), "{a:?} vs base {base:?}");
}

#[test]
fn two_d_losses_refuse_plain_pairs() {
    let d = setup(false);
    for loss in ["2d-dpo", "1d-dpo"] {
        let o = train_command(d.path(), &d.path().join("out")).args(["--loss", loss, "--max-steps", "1"]).output().unwrap();
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
    assert_same_training(&a, &b, "pairs_per_forward 0 vs 1");
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
