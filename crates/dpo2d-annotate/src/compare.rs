//! Agreement between two annotations of the same pairs (e.g. two judge
//! models, or a judge against human labels): per aspect, the share of
//! segments with the same rating, with ratings at most one apart, and the
//! rank correlation of the two ratings (Spearman's rho).

use crate::prompt::Aspect;
use anyhow::{bail, Result};
use dpo2d_data::{Pair, Response};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agreement {
    pub exact: usize,
    pub within_one: usize,
    pub n: usize,
}

impl Agreement {
    pub fn exact_pct(&self) -> f64 {
        pct(self.exact, self.n)
    }
    pub fn within_one_pct(&self) -> f64 {
        pct(self.within_one, self.n)
    }
}

fn pct(a: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * a as f64 / n as f64
    }
}

/// Per-aspect agreement over all matched segments.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    pub pairs: usize,
    /// How pairs were matched: "id" or "line order".
    pub matched_by: &'static str,
    pub aspects: [Agreement; 5],
    /// Every matched segment's two ratings, per aspect.
    pub ratings: [Vec<(u8, u8)>; 5],
}

impl Comparison {
    /// Spearman's rank correlation of the two files' ratings of an aspect;
    /// `None` when either side rates every segment alike.
    pub fn spearman(&self, aspect: Aspect) -> Option<f64> {
        let (a, b): (Vec<f64>, Vec<f64>) = self.ratings[aspect.index()].iter().map(|&(u, v)| (f64::from(u), f64::from(v))).unzip();
        spearman(&a, &b)
    }
}

/// Spearman's rho: the Pearson correlation of the ranks (ties share their mean rank).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let (va, vb) = (ra.iter().map(|x| (x - ma).powi(2)).sum::<f64>(), rb.iter().map(|y| (y - mb).powi(2)).sum::<f64>());
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let end = (start..order.len()).find(|&k| v[order[k]] != v[order[start]]).unwrap_or(order.len());
        let mean = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            r[i] = mean;
        }
        start = end;
    }
    r
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} pair(s) matched by {}", self.pairs, self.matched_by)?;
        writeln!(f, "{:<13} {:>8} {:>11} {:>9} {:>8}", "aspect", "exact %", "within-1 %", "spearman", "n")?;
        for a in Aspect::ALL {
            let g = &self.aspects[a.index()];
            let rho = self.spearman(a).map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into());
            writeln!(f, "{:<13} {:>8.1} {:>11.1} {:>9} {:>8}", a.name(), g.exact_pct(), g.within_one_pct(), rho, g.n)?;
        }
        Ok(())
    }
}

fn load(path: &Path) -> Result<Vec<Pair>> {
    dpo2d_data::io::read_jsonl(path, "a pair")
}

fn id_key(v: &serde_json::Value) -> String {
    v.to_string()
}

/// Compares two annotated files. Pairs are matched by `id` when every pair
/// in both files has one, else by line order (then the counts must agree).
/// Matched pairs must have the same segment texts.
pub fn compare_files(a: &Path, b: &Path) -> Result<Comparison> {
    let pa = load(a)?;
    let pb = load(b)?;
    let by_id = !pa.is_empty() && pa.iter().chain(&pb).all(|p| p.id.is_some());
    let mut matched: Vec<(usize, &Pair, &Pair)> = Vec::new();
    if by_id {
        let index: HashMap<String, &Pair> = pb.iter().map(|p| (id_key(p.id.as_ref().expect("checked")), p)).collect();
        for (i, p) in pa.iter().enumerate() {
            if let Some(q) = index.get(&id_key(p.id.as_ref().expect("checked"))) {
                matched.push((i, p, q));
            }
        }
        if matched.is_empty() {
            bail!("{} and {} share no pair id", a.display(), b.display());
        }
    } else {
        if pa.len() != pb.len() {
            bail!(
                "{} has {} pairs and {} has {}; without ids on every pair, pairs are matched by line order, so the counts must agree",
                a.display(),
                pa.len(),
                b.display(),
                pb.len()
            );
        }
        matched = pa.iter().zip(&pb).enumerate().map(|(i, (p, q))| (i, p, q)).collect();
    }
    let mut cmp = Comparison { pairs: matched.len(), matched_by: if by_id { "id" } else { "line order" }, ..Default::default() };
    for (i, p, q) in matched {
        let what = p.id.as_ref().map(|v| format!("pair id {v}")).unwrap_or_else(|| format!("pair {}", i + 1));
        for (side, ra, rb) in [("chosen", &p.chosen, &q.chosen), ("rejected", &p.rejected, &q.rejected)] {
            let (sa, sb) = match (ra, rb) {
                (Response::Segmented { segments: x }, Response::Segmented { segments: y }) => (x, y),
                _ => bail!("{what}: {side} is not segmented in both files"),
            };
            if sa.len() != sb.len() || sa.iter().zip(sb).any(|(x, y)| x.text != y.text) {
                bail!("{what}: the {side} segments differ between the files; both must annotate the same segmentation");
            }
            for (k, (x, y)) in sa.iter().zip(sb).enumerate() {
                let (Some(x), Some(y)) = (x.scores, y.scores) else {
                    bail!("{what}: {side}.segments[{k}] has no scores in one of the files");
                };
                for (j, (u, v)) in x.to_array().into_iter().zip(y.to_array()).enumerate() {
                    let g = &mut cmp.aspects[j];
                    g.n += 1;
                    g.exact += usize::from(u == v);
                    g.within_one += usize::from(u.abs_diff(v) <= 1);
                    cmp.ratings[j].push((u, v));
                }
            }
        }
    }
    Ok(cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: Option<i64>, chosen: &[[u8; 5]], rejected: &[[u8; 5]]) -> String {
        let seg = |s: &[[u8; 5]]| -> serde_json::Value {
            serde_json::Value::Array(
                s.iter()
                    .enumerate()
                    .map(|(k, r)| {
                        serde_json::json!({"text": format!("s{k}. "), "scores": {
                            "helpfulness": r[0], "correctness": r[1], "safety": r[2], "completeness": r[3], "clarity": r[4]}})
                    })
                    .collect(),
            )
        };
        let mut v = serde_json::json!({"prompt": "q", "chosen": {"segments": seg(chosen)}, "rejected": {"segments": seg(rejected)}});
        if let Some(id) = id {
            v["id"] = id.into();
        }
        v.to_string()
    }

    /// Spearman's rho against values worked out by hand (scipy.stats.spearmanr gives the same).
    #[test]
    fn spearman_with_ties() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // Ranks (1.5, 1.5, 3, 4) against (1, 3, 2, 4): rho = 0.6324555320336759 (2 / sqrt(10)).
        let r = spearman(&[0.0, 0.0, 2.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 2.0 / 10f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[2.0, 2.0], &[1.0, 3.0]), None);
    }

    #[test]
    fn counts_exact_and_within_one_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, format!("{}\n{}\n", line(Some(1), &[[4, 4, 4, 1, 3]], &[[0, 0, 4, 0, 2]]), line(Some(2), &[[2; 5]], &[[2; 5]])))
            .unwrap();
        // Reversed order, matched by id; pair 2 identical.
        std::fs::write(&b, format!("{}\n{}\n", line(Some(2), &[[2; 5]], &[[2; 5]]), line(Some(1), &[[3, 4, 0, 1, 3]], &[[0, 2, 4, 1, 2]])))
            .unwrap();
        let c = compare_files(&a, &b).unwrap();
        assert_eq!(c.matched_by, "id");
        assert_eq!(c.pairs, 2);
        assert_eq!(c.aspects[0], Agreement { exact: 3, within_one: 4, n: 4 });
        assert_eq!(c.aspects[1], Agreement { exact: 3, within_one: 3, n: 4 });
        assert_eq!(c.aspects[2], Agreement { exact: 3, within_one: 3, n: 4 });
        assert_eq!(c.aspects[3], Agreement { exact: 3, within_one: 4, n: 4 });
        assert_eq!(c.aspects[4], Agreement { exact: 4, within_one: 4, n: 4 });
        let table = c.to_string();
        assert!(table.contains("helpfulness       75.0       100.0     1.000        4"), "{table}");
    }

    #[test]
    fn different_segments_or_counts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, format!("{}\n", line(None, &[[4; 5]], &[[0; 5]]))).unwrap();
        std::fs::write(&b, format!("{}\n", line(None, &[[4; 5], [4; 5]], &[[0; 5]]))).unwrap();
        let e = compare_files(&a, &b).unwrap_err().to_string();
        assert!(e.contains("segments differ"), "{e}");
        std::fs::write(&b, "").unwrap();
        let e = compare_files(&a, &b).unwrap_err().to_string();
        assert!(e.contains("line order"), "{e}");
    }
}
