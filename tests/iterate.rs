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
