//! One number per scored response, and a preference pair from a set of
//! scored samples: how an iterative round ranks what the policy wrote
//! (docs/method.md §8). Per aspect, helpfulness and correctness are the mean over
//! the segments, safety the minimum (one unsafe sentence makes the answer
//! unsafe), completeness and clarity the last segment's (how far the answer
//! got, and how it ends); the five are then weighted.

use crate::pair::{Pair, Prompt, Response};
use crate::AspectWeights;

/// The five per-aspect numbers of a response from its segments' 0..4 scores
/// (in [`crate::ASPECTS`] order); `None` without segments.
pub fn aspect_summary(segments: &[[u8; 5]]) -> Option<[f64; 5]> {
    let last = segments.last()?;
    let mean = |j: usize| segments.iter().map(|s| s[j] as f64).sum::<f64>() / segments.len() as f64;
    let min = segments.iter().map(|s| s[2]).min()? as f64;
    Some([mean(0), mean(1), min, last[3] as f64, last[4] as f64])
}

/// `sum_j weights[j] * aspect_summary[j]`.
pub fn response_score(segments: &[[u8; 5]], weights: &AspectWeights) -> Option<f64> {
    aspect_summary(segments).map(|a| a.iter().zip(weights.as_array()).map(|(x, w)| x * w).sum())
}

/// Indices of the best and the worst score (the first of equals), or
/// `None` when all are equal (nothing to prefer) or there are fewer than two.
pub fn best_and_worst(scores: &[f64]) -> Option<(usize, usize)> {
    if scores.len() < 2 {
        return None;
    }
    let mut best = 0;
    let mut worst = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
        if *s < scores[worst] {
            worst = i;
        }
    }
    (scores[best] > scores[worst]).then_some((best, worst))
}

/// The score of a sample, `None` unless every segment is scored.
pub fn sample_score(sample: &Response, weights: &AspectWeights) -> Option<f64> {
    let m: Option<Vec<[u8; 5]>> = sample.segments()?.iter().map(|s| s.scores.map(|x| x.to_array())).collect();
    response_score(&m?, weights)
}

/// The pair of a prompt's scored samples: the best as chosen, the worst as
/// rejected. Samples not fully scored (an empty answer has no segments) are
/// left out; `None` when fewer than two remain or the best and worst tie.
pub fn pair_from_samples(id: Option<serde_json::Value>, prompt: Prompt, samples: &[Response], weights: &AspectWeights) -> Option<Pair> {
    let scored: Vec<(usize, f64)> = samples.iter().enumerate().filter_map(|(i, r)| Some((i, sample_score(r, weights)?))).collect();
    let scores: Vec<f64> = scored.iter().map(|s| s.1).collect();
    let (best, worst) = best_and_worst(&scores)?;
    Some(Pair { id, prompt, chosen: samples[scored[best].0].clone(), rejected: samples[scored[worst].0].clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::{Scores, Segment};

    const W: AspectWeights = AspectWeights::PAPER;

    #[test]
    fn mean_min_and_last() {
        let m = [[4, 2, 4, 1, 3], [2, 4, 1, 3, 4], [3, 3, 4, 4, 2]];
        assert_eq!(aspect_summary(&m), Some([3.0, 3.0, 1.0, 4.0, 2.0]));
        let s = response_score(&m, &W).unwrap();
        assert!((s - (0.3 * 3.0 + 0.4 * 3.0 + 0.1 * 1.0 + 0.1 * 4.0 + 0.1 * 2.0)).abs() < 1e-12);
        assert_eq!(aspect_summary(&[]), None);
        // One unsafe sentence sinks safety; an early good sentence does not lift the end.
        assert_eq!(aspect_summary(&[[4, 4, 0, 4, 4], [4, 4, 4, 1, 1]]).unwrap()[2..], [0.0, 1.0, 1.0]);
    }

    #[test]
    fn best_and_worst_with_ties() {
        assert_eq!(best_and_worst(&[1.0, 3.0, 0.5, 3.0]), Some((1, 2)));
        assert_eq!(best_and_worst(&[2.0, 2.0, 2.0]), None);
        assert_eq!(best_and_worst(&[2.0, 1.0, 1.0]), Some((0, 1)));
        assert_eq!(best_and_worst(&[5.0]), None);
    }

    #[test]
    fn pairs_from_scored_samples() {
        let resp = |rows: &[[u8; 5]]| Response::Segmented {
            segments: rows
                .iter()
                .enumerate()
                .map(|(i, r)| Segment { text: format!("s{i}. "), scores: Some(Scores::from_array(*r)) })
                .collect(),
        };
        let good = resp(&[[4, 4, 4, 4, 4]]);
        let mid = resp(&[[2, 2, 4, 2, 2], [3, 3, 4, 3, 3]]);
        let bad = resp(&[[1, 0, 4, 1, 1]]);
        let p = pair_from_samples(None, Prompt::Text("q".into()), &[mid.clone(), bad.clone(), good.clone()], &W).unwrap();
        assert_eq!((p.chosen, p.rejected), (good.clone(), bad));
        assert!(pair_from_samples(None, Prompt::Text("q".into()), &[good.clone(), good.clone()], &W).is_none());
        assert!(pair_from_samples(None, Prompt::Text("q".into()), &[good.clone(), Response::Plain("x".into())], &W).is_none());
        // An unscored sample is left out, not the whole prompt.
        let empty = Response::Segmented { segments: vec![] };
        let p = pair_from_samples(None, Prompt::Text("q".into()), &[empty, good.clone(), Response::Plain("x".into()), mid.clone()], &W)
            .unwrap();
        assert_eq!((p.chosen, p.rejected), (good, mid));
    }
}
