//! Scorers: what gives every segment of a sampled answer its five 0..4
//! scores. `check:arithmetic` is a program, `judge:URL` an LLM behind any
//! OpenAI-compatible server (through `dpo2d annotate`'s machinery, cache
//! included), and `rm:DIR` a trained reward model (`dpo2d rm train`).

use crate::prompts::PromptRecord;
use anyhow::{bail, Context, Result};
use dpo2d_annotate::{annotate_file, AnnotateJob};
use dpo2d_data::{segment_response, Pair, Response, SegmentOptions};
use std::path::Path;

/// One prompt and the answers sampled for it.
#[derive(Debug, Clone)]
pub struct Sampled<'a> {
    pub index: usize,
    pub prompt: &'a PromptRecord,
    pub responses: &'a [String],
}

/// Gives every segment of every answer its scores.
pub trait Scorer {
    /// What the scorer is, for logs and for telling runs apart (`check:arithmetic`, `rm:DIR`, ...).
    fn name(&self) -> String;
    /// For each item, its answers segmented with every segment scored (an
    /// answer that cannot be scored may be left unscored: it is then left
    /// out of the ranking). `work` is a directory the scorer may keep files in.
    fn score(&self, work: &Path, items: &[Sampled]) -> Result<Vec<Vec<Response>>>;
}

/// The arithmetic checker of `dpo2d_eval::arithmetic`: needs prompts that
/// carry their problem (`--prompts arithmetic:N`).
pub struct ArithmeticScorer;

impl Scorer for ArithmeticScorer {
    fn name(&self) -> String {
        "check:arithmetic".into()
    }

    fn score(&self, _work: &Path, items: &[Sampled]) -> Result<Vec<Vec<Response>>> {
        items
            .iter()
            .map(|it| {
                let Some(problem) = &it.prompt.problem else {
                    bail!("prompt {}: check:arithmetic needs prompts with their answer key (--prompts arithmetic:N)", it.index + 1)
                };
                Ok(it.responses.iter().map(|r| dpo2d_eval::arithmetic::check(problem, r).response).collect())
            })
            .collect()
    }
}

/// An LLM judge: the distinct answers of a prompt are put into pairs (1st
/// with 2nd, 3rd with 4th, ...; an odd one out with the first) and annotated
/// as `dpo2d annotate` does, each segment scored in the context of its pair;
/// a repeated answer gets the scores of its first copy. A prompt whose
/// answers are all the same is left unscored (it would give no pair).
pub struct JudgeScorer {
    pub options: dpo2d_annotate::Options,
}

impl Scorer for JudgeScorer {
    fn name(&self) -> String {
        // The first server names the scorer: a fleet may grow between runs.
        format!("judge:{} ({})", self.options.judge.base_urls[0], self.options.judge.model)
    }

    fn score(&self, work: &Path, items: &[Sampled]) -> Result<Vec<Vec<Response>>> {
        let mut out = segmented(items);
        let mut pairs = vec![];
        for (i, it) in items.iter().enumerate() {
            for (a, b) in judge_pairs(&out[i], it.responses) {
                let id = serde_json::json!(format!("{i}:{a}:{b}"));
                pairs.push(Pair { id: Some(id), prompt: it.prompt.prompt.clone(), chosen: out[i][a].clone(), rejected: out[i][b].clone() });
            }
        }
        if pairs.is_empty() {
            return Ok(out);
        }
        std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
        let first = items[0].index;
        let input = work.join(format!("judge-in-{first}.jsonl"));
        let output = work.join(format!("judge-out-{first}.jsonl"));
        dpo2d_data::io::write_jsonl(&input, &pairs)?;
        let job = AnnotateJob {
            input,
            output: output.clone(),
            cache: Some(work.join("judge-cache.sqlite")),
            failed_out: None,
            route: Default::default(),
        };
        let summary = annotate_file(&job, &self.options)?;
        if !summary.failed.is_empty() {
            tracing::warn!("{} answer pair(s) could not be judged; their answers are left out of the ranking", summary.failed.len());
        }
        for line in dpo2d_data::io::jsonl_lines(&output)? {
            let pair: Pair = serde_json::from_str(&line?.text)?;
            let id = pair.id.as_ref().and_then(|v| v.as_str()).unwrap_or_default();
            let Some(&[i, a, b]) = id.split(':').map(|x| x.parse::<usize>().ok()).collect::<Option<Vec<_>>>().as_deref() else {
                bail!("{}: a judged pair lost its id", output.display());
            };
            // An answer judged twice (the odd one out) keeps its first scores.
            if !out[i][a].is_scored() {
                out[i][a] = pair.chosen;
            }
            if !out[i][b].is_scored() {
                out[i][b] = pair.rejected;
            }
        }
        for (i, it) in items.iter().enumerate() {
            for k in 0..it.responses.len() {
                if let Some(first) = it.responses[..k].iter().position(|r| *r == it.responses[k]) {
                    out[i][k] = out[i][first].clone();
                }
            }
        }
        Ok(out)
    }
}

/// A trained 2-D reward model (`dpo2d rm train`): predicts every segment's scores.
pub struct RewardModelScorer {
    pub path: std::path::PathBuf,
    pub model: dpo2d_train::reward::RewardModel,
    /// Answers per forward pass (two per pair).
    pub batch_size: usize,
}

impl Scorer for RewardModelScorer {
    fn name(&self) -> String {
        format!("rm:{}", self.path.display())
    }

    fn score(&self, _work: &Path, items: &[Sampled]) -> Result<Vec<Vec<Response>>> {
        let mut out = segmented(items);
        // Answers go through the model two at a time, as the sides of a pair that shares the prompt.
        let mut pairs = vec![];
        let mut slots = vec![];
        for (i, it) in items.iter().enumerate() {
            let live: Vec<usize> = (0..out[i].len()).filter(|&k| out[i][k].segments().is_some_and(|s| !s.is_empty())).collect();
            for two in live.chunks(2) {
                let (a, b) = (two[0], *two.last().unwrap_or(&two[0]));
                pairs.push(Pair { id: None, prompt: it.prompt.prompt.clone(), chosen: out[i][a].clone(), rejected: out[i][b].clone() });
                slots.push((i, a, b));
            }
        }
        for (scored, (i, a, b)) in self.model.score_pairs(&pairs, (self.batch_size / 2).max(1))?.into_iter().zip(slots) {
            out[i][a] = scored.chosen;
            out[i][b] = scored.rejected;
        }
        Ok(out)
    }
}

/// Every answer of every item split into segments, unscored.
fn segmented(items: &[Sampled]) -> Vec<Vec<Response>> {
    let seg = SegmentOptions::default();
    items.iter().map(|it| it.responses.iter().map(|r| segment_response(r, &seg)).collect()).collect()
}

/// The pairs in which a judge sees the distinct non-empty answers of one prompt.
fn judge_pairs(responses: &[Response], texts: &[String]) -> Vec<(usize, usize)> {
    let live: Vec<usize> = (0..responses.len())
        .filter(|&i| responses[i].segments().is_some_and(|s| !s.is_empty()) && !texts[..i].contains(&texts[i]))
        .collect();
    let mut pairs: Vec<(usize, usize)> = live.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0], c[1])).collect();
    if live.len() % 2 == 1 && live.len() > 1 {
        pairs.push((live[live.len() - 1], live[0]));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpo2d_eval::arithmetic::{generate, Level, Op, Split};

    #[test]
    fn every_answer_is_in_a_judged_pair() {
        let pairs = |texts: &[&str]| {
            let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
            let r: Vec<Response> = texts.iter().map(|t| segment_response(t, &SegmentOptions::default())).collect();
            judge_pairs(&r, &texts)
        };
        assert_eq!(pairs(&["a.", "b.", "c.", "d."]), vec![(0, 1), (2, 3)]);
        assert_eq!(pairs(&["a.", "", "c.", "d."]), vec![(0, 2), (3, 0)]);
        assert_eq!(pairs(&["a.", "b.", "a.", "d."]), vec![(0, 1), (3, 0)]);
        assert_eq!(pairs(&["a.", ""]), vec![]);
        assert_eq!(pairs(&["a.", "a."]), vec![]);
    }

    #[test]
    fn the_checker_scores_right_answers_above_wrong_ones() {
        let p = generate(1, 5, Split::Train, Level::DEFAULT).remove(0);
        let sym = |op| match op {
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "*",
        };
        let ((a, op, b, c), (_, op2, b2, _)) = (p.steps[0], p.steps[1]);
        let (sym, sym2) = (sym(op), sym(op2));
        let right = format!("First, {a} {sym} {b} = {c}. Then {c} {sym2} {b2} = {}. The answer is {}.", p.answer, p.answer);
        let wrong = format!("First, {a} {sym} {b} = {}. The answer is {}.", c + 1, c + 1);
        let record = crate::prompts::arithmetic(1, 5, Level::DEFAULT).remove(0);
        let responses = vec![right, wrong];
        let scored = ArithmeticScorer.score(Path::new("."), &[Sampled { index: 0, prompt: &record, responses: &responses }]).unwrap();
        let w = dpo2d_data::AspectWeights::PAPER;
        let s: Vec<f64> = scored[0].iter().map(|r| dpo2d_data::rank::sample_score(r, &w).unwrap()).collect();
        assert!(s[0] > s[1], "{s:?}");
        let plain = PromptRecord { problem: None, ..record };
        assert!(ArithmeticScorer.score(Path::new("."), &[Sampled { index: 0, prompt: &plain, responses: &responses }]).is_err());
    }
}
