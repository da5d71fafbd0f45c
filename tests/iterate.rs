//! `dpo2d iterate` end to end on a tiny random model: a run stopped in each
//! phase (sampling, scoring, training) resumes without redoing finished
//! work and ends where an uninterrupted run ends.

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
