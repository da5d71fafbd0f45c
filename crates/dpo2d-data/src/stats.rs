//! Summary numbers of a pair set: what `dpo2d validate` prints, so a user
//! can see at a glance whether the data is what they expect.

use crate::pair::{Pair, Prompt, Response, ASPECTS};
use std::fmt;

/// Counts over a set of pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    pub pairs: usize,
    /// Pairs whose prompt is a multi-turn message list (more than one message).
    pub multi_turn: usize,
    /// Responses (2 per pair) by shape.
    pub plain_responses: usize,
    pub segmented_responses: usize,
    pub scored_responses: usize,
    /// Segments over all segmented responses.
    pub segments: usize,
    pub min_segments: usize,
    pub max_segments: usize,
    /// Score histogram: `histogram[aspect][score]`, aspects in `ASPECTS` order.
    pub histogram: [[usize; 5]; 5],
    /// Same, split by side: chosen then rejected.
    pub histogram_by_side: [[[usize; 5]; 5]; 2],
    /// Responses whose completeness decreases somewhere along the response
    /// (allowed, but the annotation rubric says it should not).
    pub completeness_decreases: usize,
}

impl DataStats {
    pub fn from_pairs(pairs: &[Pair]) -> Self {
        let mut s = DataStats { min_segments: usize::MAX, ..Default::default() };
        for p in pairs {
            s.pairs += 1;
            if matches!(&p.prompt, Prompt::Messages(m) if m.len() > 1) {
                s.multi_turn += 1;
            }
            for (side, r) in [&p.chosen, &p.rejected].into_iter().enumerate() {
                match r {
                    Response::Plain(_) => s.plain_responses += 1,
                    Response::Segmented { segments } => {
                        s.segmented_responses += 1;
                        s.segments += segments.len();
                        s.min_segments = s.min_segments.min(segments.len());
                        s.max_segments = s.max_segments.max(segments.len());
                        if r.is_scored() {
                            s.scored_responses += 1;
                        }
                        let mut last_completeness = 0;
                        let mut decreased = false;
                        for sc in segments.iter().filter_map(|g| g.scores) {
                            let a = sc.to_array();
                            for (j, &v) in a.iter().enumerate() {
                                let v = (v as usize).min(4);
                                s.histogram[j][v] += 1;
                                s.histogram_by_side[side][j][v] += 1;
                            }
                            decreased |= sc.completeness < last_completeness;
                            last_completeness = sc.completeness;
                        }
                        s.completeness_decreases += decreased as usize;
                    }
                }
            }
        }
        if s.min_segments == usize::MAX {
            s.min_segments = 0;
        }
        s
    }

    /// Mean segments per segmented response.
    pub fn mean_segments(&self) -> f64 {
        if self.segmented_responses == 0 {
            0.0
        } else {
            self.segments as f64 / self.segmented_responses as f64
        }
    }
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pairs: {} ({} multi-turn)", self.pairs, self.multi_turn)?;
        writeln!(
            f,
            "responses: {} plain, {} segmented ({} scored)",
            self.plain_responses, self.segmented_responses, self.scored_responses
        )?;
        if self.segmented_responses > 0 {
            writeln!(
                f,
                "segments: {} (per response: min {}, mean {:.1}, max {})",
                self.segments,
                self.min_segments,
                self.mean_segments(),
                self.max_segments
            )?;
        }
        if self.scored_responses > 0 {
            writeln!(f, "segments per score:       chosen                      rejected")?;
            writeln!(f, "  {:<13} {}   {}", "score", score_header(), score_header())?;
            for (j, name) in ASPECTS.iter().enumerate() {
                let row = |side: usize| -> String {
                    (0..5).map(|v| format!("{:>5}", self.histogram_by_side[side][j][v])).collect::<Vec<_>>().join("")
                };
                writeln!(f, "  {name:<13} {}   {}", row(0), row(1))?;
            }
            if self.completeness_decreases > 0 {
                writeln!(f, "note: completeness decreases inside {} response(s)", self.completeness_decreases)?;
            }
        }
        Ok(())
    }
}

fn score_header() -> String {
    (0..5).map(|v| format!("{v:>5}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::{Message, Scores, Segment};

    #[test]
    fn counts() {
        let seg = |t: &str, a: [u8; 5]| Segment { text: t.into(), scores: Some(Scores::from_array(a)) };
        let pairs = vec![
            Pair {
                id: None,
                prompt: Prompt::Messages(vec![
                    Message { role: "user".into(), content: "a".into() },
                    Message { role: "assistant".into(), content: "b".into() },
                    Message { role: "user".into(), content: "c".into() },
                ]),
                chosen: Response::Segmented { segments: vec![seg("x. ", [4, 4, 4, 3, 4]), seg("y.", [3, 4, 4, 2, 4])] },
                rejected: Response::Segmented { segments: vec![seg("z.", [0, 1, 0, 1, 2])] },
            },
            Pair { id: None, prompt: Prompt::Text("q".into()), chosen: Response::Plain("a".into()), rejected: Response::Plain("b".into()) },
        ];
        let s = DataStats::from_pairs(&pairs);
        assert_eq!((s.pairs, s.multi_turn, s.plain_responses, s.segmented_responses, s.scored_responses), (2, 1, 2, 2, 2));
        assert_eq!((s.segments, s.min_segments, s.max_segments), (3, 1, 2));
        assert_eq!(s.histogram[0], [1, 0, 0, 1, 1]); // helpfulness 4, 3, 0
        assert_eq!(s.histogram[2], [1, 0, 0, 0, 2]); // safety 4, 4, 0
        assert_eq!(s.histogram_by_side[1][1], [0, 1, 0, 0, 0]);
        assert_eq!(s.completeness_decreases, 1);
        let text = s.to_string();
        assert!(text.contains("pairs: 2 (1 multi-turn)"), "{text}");
        assert!(text.contains("helpfulness"), "{text}");
    }
}
