//! Training metrics: TRL-named scalars per logging step, appended to
//! `metrics.jsonl` (one JSON object per line), and a short text summary.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One logged record: `step`, `epoch` and named values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: usize,
    pub epoch: f64,
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

impl Record {
    pub fn get(&self, k: &str) -> Option<f64> {
        self.values.get(k).copied()
    }
}

/// Running sums of per-pair (or per-micro-batch) values, averaged on flush.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    sums: BTreeMap<String, (f64, usize)>,
}

impl Accumulator {
    pub fn add(&mut self, k: &str, v: f64) {
        let e = self.sums.entry(k.to_string()).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    }
    pub fn add_weighted(&mut self, k: &str, sum: f64, count: usize) {
        let e = self.sums.entry(k.to_string()).or_insert((0.0, 0));
        e.0 += sum;
        e.1 += count;
    }
    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }
    /// Means, with keys prefixed (e.g. `eval_`), and reset.
    pub fn take_means(&mut self, prefix: &str) -> BTreeMap<String, f64> {
        let out = self.sums.iter().filter(|(_, (_, n))| *n > 0).map(|(k, (s, n))| (format!("{prefix}{k}"), s / *n as f64)).collect();
        self.sums.clear();
        out
    }
}

/// Appends records to `metrics.jsonl`; `rewrite` restores a file to a
/// given history (used on resume, so the file matches the uninterrupted run).
pub struct MetricsWriter {
    path: PathBuf,
}

impl MetricsWriter {
    pub fn new(dir: &Path) -> Self {
        MetricsWriter { path: dir.join("metrics.jsonl") }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn rewrite(&self, history: &[Record]) -> Result<()> {
        let mut text = String::new();
        for r in history {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        dpo2d_fs::write_file(&self.path, text)
    }
    /// Append a record; a non-finite value (JSON would write `null`) is an
    /// error naming the step and the metric.
    pub fn append(&self, r: &Record) -> Result<()> {
        if let Some((k, v)) = r.values.iter().find(|(_, v)| !v.is_finite()) {
            anyhow::bail!("step {}: metric {k} is {v}; not logging a non-finite value", r.step);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(r)?).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Read a `metrics.jsonl` back.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: bad metrics line", path.display(), i + 1)))
        .collect()
}

/// First and last value of a metric over the history (records that have it).
fn first_last(history: &[Record], k: &str) -> Option<(f64, f64)> {
    let mut it = history.iter().filter_map(|r| r.get(k));
    let first = it.next()?;
    let last = it.next_back().unwrap_or(first);
    Some((first, last))
}

/// A few lines that say how training went.
pub fn summary(history: &[Record]) -> String {
    let mut s = String::new();
    let steps = history.iter().map(|r| r.step).max().unwrap_or(0);
    s.push_str(&format!("optimizer steps: {steps}\n"));
    for k in [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "kl/chosen",
        "kl/rejected",
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
    ] {
        if let Some((a, b)) = first_last(history, k) {
            s.push_str(&format!("{k:<24} first {a:>10.4}  last {b:>10.4}\n"));
        }
    }
    if let Some(t) = history.iter().filter_map(|r| r.get("tokens/s")).next_back() {
        s.push_str(&format!("{:<24} {t:.1}\n", "tokens/s (last)"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trip_and_means() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let w = MetricsWriter::new(dir.path());
        let mut acc = Accumulator::default();
        acc.add("loss", 1.0);
        acc.add("loss", 3.0);
        let r = Record { step: 1, epoch: 0.5, values: acc.take_means("") };
        assert_eq!(r.get("loss"), Some(2.0));
        w.append(&r)?;
        w.append(&Record { step: 2, epoch: 1.0, values: [("loss".to_string(), 1.0)].into() })?;
        let back = read_metrics(w.path())?;
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], r);
        assert!(summary(&back).contains("first     2.0000  last     1.0000"));
        w.rewrite(&back[..1])?;
        assert_eq!(read_metrics(w.path())?.len(), 1);
        Ok(())
    }
}
