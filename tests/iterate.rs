//! `dpo2d iterate` end to end on a tiny random model: a run stopped in each
//! phase (sampling, scoring, training), by its stop hook or by `kill -9` of
//! the process, resumes without redoing finished work and ends where an
//! uninterrupted run ends; the judge scorer, and generated arithmetic
//! prompts with the checker, through the binary; a run directory refuses
//! other prompts or another scorer.

mod common;

use dpo2d_data::{segment_response, Response, Scores, SegmentOptions};
use dpo2d_iterate::{iterate, IterateConfig, IterateRun, Phase, Sampled, SamplingSettings, Scorer, StopAt};
use std::cell::Cell;
use std::path::Path;

/// Scores a segment by its length (any text gets some score), counting the
/// answers it is asked to score.
#[derive(Default)]
struct LengthScorer {
    answers: Cell<usize>,
}

impl Scorer for LengthScorer {
    fn name(&self) -> String {
        "test:length".into()
    }

    fn score(&self, _work: &Path, items: &[Sampled]) -> anyhow::Result<Vec<Vec<Response>>> {
        Ok(items
            .iter()
            .map(|it| {
                it.responses
                    .iter()
                    .map(|r| {
                        self.answers.set(self.answers.get() + 1);
                        let Response::Segmented { mut segments } = segment_response(r, &SegmentOptions::default()) else { unreachable!() };
                        for s in &mut segments {
                            s.scores = Some(Scores::from_array([(s.text.len() % 5) as u8, 4, 4, (s.text.len() % 3) as u8, 4]));
                        }
                        Response::Segmented { segments }
                    })
                    .collect()
            })
            .collect())
    }
}

const PROMPTS: usize = 20;

fn config(d: &Path, out: &str) -> IterateConfig {
    let mut train = common::base_config(d, "2d-dpo");
    train.output_dir = d.join(out);
    train.train_file = None;
    train.eval_file = None;
    train.max_steps = 4;
    train.save_steps = 1;
    let sampling = SamplingSettings { samples_per_prompt: 2, max_new_tokens: 8, batch_size: 8, temperature: 1.0, top_p: 1.0, seed: 3 };
    IterateConfig { train, rounds: 1, sampling }
}

fn prompts() -> Vec<dpo2d_iterate::PromptRecord> {
    (0..PROMPTS)
        .map(|i| dpo2d_iterate::PromptRecord {
            id: Some(i.into()),
            prompt: dpo2d_data::Prompt::Text(format!("what is q{} .", i % 10)),
            problem: None,
        })
        .collect()
}

fn run(d: &Path, stop_at: Option<StopAt>) -> IterateRun {
    IterateRun { quiet: true, cache_dir: Some(d.join("cache")), stop_at, ..IterateRun::default() }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap().lines().map(String::from).collect()
}

#[test]
fn resumes_in_every_phase_without_redoing_work() {
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_model(&d.path().join("model"));
    let prompts = prompts();

    // The reference: one uninterrupted run.
    let whole = LengthScorer::default();
    let ref_cfg = config(d.path(), "whole");
    let out = iterate(&ref_cfg, &prompts, &whole, &run(d.path(), None)).unwrap();
    assert!(!out.interrupted);
    let r = &out.rounds[0];
    assert_eq!((r.sampled_now, r.scored_now, r.trained_now), (PROMPTS, PROMPTS, 4));
    assert_eq!(whole.answers.get(), 2 * PROMPTS);
    assert!(r.pairs > 0 && r.pairs + r.ties == PROMPTS);
    let round = ref_cfg.train.output_dir.join("round-1");
    assert!(r.policy.join("model.safetensors").exists(), "{}", r.policy.display());

    let cfg = config(d.path(), "stopped");
    let dir = cfg.train.output_dir.join("round-1");
    let scorer = LengthScorer::default();
    // Stopped after one chunk of sampling (8 answers = 4 prompts).
    let stop = |phase, after| Some(StopAt { round: 1, phase, after });
    assert!(iterate(&cfg, &prompts, &scorer, &run(d.path(), stop(Phase::Sampling, 1))).unwrap().interrupted);
    assert_eq!(lines(&dir.join("samples.jsonl")).len(), 4);
    assert_eq!(scorer.answers.get(), 0);

    // Then after one chunk of scoring (16 prompts): only the missing prompts are sampled.
    assert!(iterate(&cfg, &prompts, &scorer, &run(d.path(), stop(Phase::Scoring, 1))).unwrap().interrupted);
    assert_eq!(lines(&dir.join("samples.jsonl")), lines(&round.join("samples.jsonl")), "resumed sampling differs");
    assert_eq!(scorer.answers.get(), 2 * 16);

    // Then after two updates; the rest of the scoring is done first.
    assert!(iterate(&cfg, &prompts, &scorer, &run(d.path(), stop(Phase::Training, 2))).unwrap().interrupted);
    assert_eq!(scorer.answers.get(), 2 * PROMPTS);
    assert_eq!(lines(&dir.join("scored.jsonl")), lines(&round.join("scored.jsonl")));

    // And to the end: two more updates, nothing sampled or scored again.
    let out = iterate(&cfg, &prompts, &scorer, &run(d.path(), None)).unwrap();
    let r2 = &out.rounds[0];
    assert_eq!((r2.sampled_now, r2.scored_now, r2.trained_now), (0, 0, 2));
    assert_eq!(scorer.answers.get(), 2 * PROMPTS);
    assert_eq!(lines(&dir.join("pairs.jsonl")), lines(&round.join("pairs.jsonl")));
    let weights = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(weights(&r2.policy), weights(&r.policy), "the resumed run trained a different policy");

    // A finished round is not run again; a second round starts from its policy.
    let mut two = cfg.clone();
    two.rounds = 2;
    let out = iterate(&two, &prompts, &scorer, &run(d.path(), None)).unwrap();
    assert_eq!(out.rounds.len(), 2);
    assert_eq!((out.rounds[0].sampled_now, out.rounds[0].trained_now), (0, 0));
    assert_eq!(out.rounds[1].started_from, r2.policy.display().to_string());
    assert_eq!(out.rounds[1].sampled_now, PROMPTS);

    // Other sampling settings in the same directory are refused.
    let mut other = two.clone();
    other.sampling.temperature = 0.5;
    let e = format!("{:#}", iterate(&other, &prompts, &scorer, &run(d.path(), None)).unwrap_err());
    assert!(e.contains("sampling"), "{e}");
}

/// `dpo2d iterate --scorer judge:URL` against the fake judge: every
/// non-empty answer is scored as the judge rates it, and a round trains.
#[test]
fn judge_scorer_through_the_cli() {
    use dpo2d_annotate::test_server::{expected_scores, MockConfig, MockJudge};
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_model(&d.path().join("model"));
    let prompts: String = (0..6).map(|i| format!("{{\"prompt\": \"what is q{i} .\"}}\n")).collect();
    std::fs::write(d.path().join("prompts.jsonl"), prompts).unwrap();
    let server = MockJudge::start(MockConfig::default());
    let scorer = format!("judge:{}", server.base_url());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .current_dir(d.path())
        .env_remove("OPENAI_API_KEY")
        .args(["iterate", "--no-progress", "--model", "model", "--prompts", "prompts.jsonl", "--scorer", &scorer])
        .args(["--judge-model", "judge", "--samples-per-prompt", "3", "--max-new-tokens", "8", "--temperature", "1.0"])
        .args(["--loss", "2d-dpo", "--max-steps", "2", "--per-device-train-batch-size", "2", "--output-dir", "out", "--cache-dir", "cache"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| round | prompts | pairs |") && table.contains("| 1 | 6 |"), "{table}");
    let mut judged = 0;
    for line in std::fs::read_to_string(d.path().join("out/round-1/scored.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for r in v["responses"].as_array().unwrap() {
            let segments: Vec<dpo2d_data::Segment> = serde_json::from_value(r["segments"].clone()).unwrap();
            if segments.is_empty() {
                continue;
            }
            let got: Vec<[u8; 5]> = segments.iter().map(|s| s.scores.expect("every segment judged").to_array()).collect();
            assert_eq!(got, expected_scores(&segments), "{v}");
            judged += 1;
        }
    }
    assert!(judged >= 12, "only {judged} answers judged");
    assert!(server.stats().requests > 0);
    assert!(d.path().join("out/round-1/train/final/model.safetensors").exists());
}

/// `dpo2d iterate` as a process into `out` (under `d`), with the tiny model,
/// training 4 updates with a checkpoint after each.
fn iterate_command(d: &Path, out: &str, prompts: &str, scorer: &str) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dpo2d"));
    c.current_dir(d).env_remove("OPENAI_API_KEY").env_remove(dpo2d_fs::HANG_AT).env_remove("RUST_LOG");
    c.args(["iterate", "--no-progress", "--model", "model", "--prompts", prompts, "--scorer", scorer]);
    c.args(["--samples-per-prompt", "2", "--max-new-tokens", "8", "--temperature", "1.0", "--sampling-batch-size", "8"]);
    c.args(["--loss", "2d-dpo", "--max-steps", "4", "--save-steps", "1", "--logging-steps", "1", "--per-device-train-batch-size", "2"]);
    c.args(["--seed", "3"]);
    c.args(["--output-dir", out, "--cache-dir", "cache"]);
    c
}

/// Runs `cmd` to its end; its stderr (it must succeed).
fn run_to_end(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// Runs `cmd` until it reaches the hang point `point` (all its work up to
/// there on disk), then kills it with SIGKILL: no chance to clean up. Its
/// stderr up to there.
fn kill_at(cmd: &mut std::process::Command, point: &str) -> String {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let mut child =
        cmd.env(dpo2d_fs::HANG_AT, point).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("the run ended before {point}:\n{seen}");
        }
        seen.push_str(&line);
        if line.trim_end() == format!("hanging at {point}") {
            break;
        }
    }
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    seen
}

/// A real `kill -9` in each phase (after the first sampling chunk, after the
/// first scoring chunk, after the second update) and the same command run
/// again each time: the run ends with the files and weights of an
/// uninterrupted run, nothing sampled, judged or trained twice.
#[test]
fn killed_in_every_phase_resumes_with_nothing_lost_or_redone() {
    use dpo2d_annotate::test_server::{MockConfig, MockJudge};
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_model(&d.path().join("model"));
    let prompts: String = (0..PROMPTS).map(|i| format!("{{\"id\": {i}, \"prompt\": \"what is q{} .\"}}\n", i % 10)).collect();
    std::fs::write(d.path().join("prompts.jsonl"), prompts).unwrap();
    let judge = MockJudge::start(MockConfig::default());
    let scorer = format!("judge:{}", judge.base_url());
    let cmd = |out: &str| {
        let mut c = iterate_command(d.path(), out, "prompts.jsonl", &scorer);
        c.args(["--judge-model", "judge"]);
        c
    };

    // The reference: one uninterrupted run.
    run_to_end(&mut cmd("whole"));
    let judged = judge.stats().requests;
    assert!(judged > 0);
    let (whole, round) = (d.path().join("whole/round-1"), d.path().join("killed/round-1"));

    // Killed after the first sampling chunk (4 prompts x 2 answers); a kill
    // during the next append would leave a torn line, so one is added.
    kill_at(&mut cmd("killed"), "round-1/sampling:1");
    assert_eq!(lines(&round.join("samples.jsonl")).len(), 4);
    assert!(!round.join("scored.jsonl").exists());
    let mut f = std::fs::OpenOptions::new().append(true).open(round.join("samples.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"index\": 4, \"prompt\": \"what").unwrap();

    // Killed after the first scoring chunk (16 prompts): the other 16 prompts were sampled, no more.
    let err = kill_at(&mut cmd("killed"), "round-1/scoring:1");
    assert!(err.contains("sampling 2 answers for each of 16 prompts"), "{err}");
    assert_eq!(lines(&round.join("samples.jsonl")), lines(&whole.join("samples.jsonl")), "resumed sampling differs");
    assert_eq!(lines(&round.join("scored.jsonl")).len(), 16);

    // Killed after the second update: the last 4 prompts were scored, nothing sampled again.
    let err = kill_at(&mut cmd("killed"), "step:2");
    assert!(!err.contains("sampling"), "{err}");
    assert!(err.contains("scoring the answers of 4 prompts"), "{err}");
    assert_eq!(lines(&round.join("scored.jsonl")), lines(&whole.join("scored.jsonl")), "resumed scoring differs");
    assert_eq!(lines(&round.join("pairs.jsonl")), lines(&whole.join("pairs.jsonl")));
    assert!(round.join("train/checkpoint-2").is_dir() && !round.join("train/checkpoint-3").exists());

    // To the end: training continues from the checkpoint of the killed run.
    let err = run_to_end(&mut cmd("killed"));
    assert!(!err.contains("sampling") && !err.contains("scoring"), "{err}");
    assert!(err.contains("training resumes from") && err.contains("at step 2"), "{err}");
    assert_eq!(judge.stats().requests, 2 * judged, "answers judged twice");
    let metrics = |r: &Path| dpo2d_train::metrics::read_metrics(&r.join("train/metrics.jsonl")).unwrap();
    let steps: Vec<usize> = metrics(&round).iter().filter(|r| r.get("loss").is_some()).map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(common::strip_timing(&metrics(&round)), common::strip_timing(&metrics(&whole)));
    let weights = |r: &Path| std::fs::read(r.join("train/final/model.safetensors")).unwrap();
    assert!(weights(&round) == weights(&whole), "the killed and resumed run trained another policy");
    assert!(round.join("round.json").is_file());
}

/// `--prompts arithmetic:N` with `--scorer check:arithmetic` through the
/// binary: the prompts are the generated problems, every answer is scored
/// as the checker scores it, and the tiny model's answers (no arithmetic in
/// them: all tie) give no pair, which stops the round with the reason before
/// any training; the same directory then refuses other prompts and another
/// scorer.
#[test]
fn arithmetic_prompts_and_checker_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_model(&d.path().join("model"));
    let n = 12;
    let spec = format!("arithmetic:{n}");
    let o = iterate_command(d.path(), "out", &spec, "check:arithmetic").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains(&format!("round 1: 0 pairs from {n} prompts ({n} without a pair)")), "{err}");
    assert!(err.contains("no prompt had answers of different scores, so there is nothing to train on"), "{err}");
    assert!(!d.path().join("out/round-1/train").exists() && !d.path().join("out/round-1/pairs.jsonl").exists());
    let problems = dpo2d_iterate::prompts::arithmetic(n, 3, dpo2d_eval::arithmetic::Level::DEFAULT);
    let read = |f: &str| -> Vec<serde_json::Value> {
        lines(&d.path().join("out/round-1").join(f)).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (samples, scored) = (read("samples.jsonl"), read("scored.jsonl"));
    assert_eq!((samples.len(), scored.len()), (n, n));
    let mut answers = 0;
    for ((s, sample), want) in scored.iter().zip(&samples).zip(&problems) {
        let problem = want.problem.as_ref().unwrap();
        assert_eq!(s["id"], serde_json::json!(problem.id));
        assert_eq!(s["prompt"], serde_json::json!(problem.prompt()), "the prompt is the generated problem");
        let texts = sample["responses"].as_array().unwrap();
        assert_eq!(texts.len(), 2);
        for ((r, text), right) in s["responses"].as_array().unwrap().iter().zip(texts).zip(s["right"].as_array().unwrap()) {
            let got: dpo2d_data::Response = serde_json::from_value(r.clone()).unwrap();
            let checked = dpo2d_eval::arithmetic::check(problem, text.as_str().unwrap());
            assert_eq!(got, checked.response, "{text}");
            assert_eq!(right.as_bool(), Some(checked.correct), "{text}");
            answers += !text.as_str().unwrap().is_empty() as usize;
        }
    }
    assert!(answers > n, "{answers} non-empty answers");

    // Other prompts or another scorer in the same directory are refused, naming what changed.
    let refused = |prompts: &str, scorer: &str, what: &str| {
        let o = iterate_command(d.path(), "out", prompts, scorer).args(["--judge-model", "judge"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains(&format!("holds a run with other {what}")), "{err}");
    };
    refused(&format!("arithmetic:{}", n + 1), "check:arithmetic", "prompts");
    refused(&format!("arithmetic-1:{n}"), "check:arithmetic", "prompts");
    refused(&spec, "judge:http://127.0.0.1:9/v1", "scorer");
}

/// `--sampler URL --sampler-command "dpo2d serve --model {model} ..."`: the
/// run starts `dpo2d serve` on the round's policy, samples the answers
/// through it and stops it. Killed (-9) after the first sampling chunk, the
/// run leaves its server behind; the same command again stops that server,
/// starts a fresh one, samples only the missing prompts and ends the round,
/// with no server left running.
#[test]
fn sampling_through_a_server_that_iterate_starts_resumes_after_kill() {
    use dpo2d_annotate::test_server::{MockConfig, MockJudge};
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_model(&d.path().join("model"));
    let prompts: String = (0..PROMPTS).map(|i| format!("{{\"id\": {i}, \"prompt\": \"what is q{} .\"}}\n", i % 10)).collect();
    std::fs::write(d.path().join("prompts.jsonl"), prompts).unwrap();
    let judge = MockJudge::start(MockConfig::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let serve = format!("{} serve --model {{model}} --port {port} --max-batch-size 8", env!("CARGO_BIN_EXE_dpo2d"));
    let cmd = || {
        let mut c = iterate_command(d.path(), "served", "prompts.jsonl", &format!("judge:{}", judge.base_url()));
        c.args(["--judge-model", "judge", "--sampler", &url, "--sampler-command", &serve, "--sampler-concurrency", "4"]);
        c
    };
    let round = d.path().join("served/round-1");
    kill_at(&mut cmd(), "round-1/sampling:1");
    assert_eq!(lines(&round.join("samples.jsonl")).len(), 4);
    let pid: u32 = std::fs::read_to_string(round.join("sampler.pid")).unwrap().trim().parse().unwrap();
    let alive = |pid: u32| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty());
    assert!(alive(pid), "the killed run's server should still be up");

    let err = run_to_end(&mut cmd());
    assert!(err.contains(&format!("sampling 2 answers for each of 16 prompts through {url}")), "{err}");
    assert!(!alive(pid), "the leftover server was not stopped");
    let samples = lines(&round.join("samples.jsonl"));
    assert_eq!(samples.len(), PROMPTS);
    for (i, l) in samples.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["index"], i, "{l}");
        assert_eq!(v["responses"].as_array().unwrap().len(), 2, "{l}");
    }
    assert!(round.join("round.json").is_file());
    let second: u32 = std::fs::read_to_string(round.join("sampler.pid")).unwrap().trim().parse().unwrap();
    assert_ne!(second, pid);
    assert!(!alive(second), "the server iterate started is still running");
    let log = std::fs::read_to_string(round.join("sampler.log")).unwrap();
    assert!(log.contains("serving"), "{log}");
}
