//! PNG charts of the training indicators the paper plots (Fig. 4-5):
//! implicit rewards of chosen and rejected, reward accuracy, sequence KL on
//! chosen and rejected, and the loss, drawn by [`dpo2d_ui::charts`].

use crate::metrics::Record;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// One chart: a title, and the metric keys to draw as lines.
const CHARTS: &[(&str, &str, &[&str])] = &[
    (
        "rewards.png",
        "Implicit reward (beta * sum log-ratio)",
        &["rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected"],
    ),
    ("accuracy.png", "Reward accuracy", &["rewards/accuracies", "eval_rewards/accuracies"]),
    ("kl.png", "Sequence KL to the reference", &["kl/chosen", "kl/rejected", "eval_kl/chosen", "eval_kl/rejected"]),
    ("loss.png", "Loss", &["loss", "eval_loss", "sft_loss"]),
];

/// Draw every chart that has data into `dir`; returns the files written.
pub fn draw_charts(history: &[Record], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (file, title, keys) in CHARTS {
        let series: Vec<(&str, Vec<(f64, f64)>)> = keys
            .iter()
            .map(|k| {
                (*k, history.iter().filter_map(|r| r.get(k).filter(|v| v.is_finite()).map(|v| (r.step as f64, v))).collect::<Vec<_>>())
            })
            .filter(|(_, pts)| !pts.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let path = dir.join(file);
        dpo2d_ui::charts::line_chart(&path, title, "step", &series)?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_pngs_with_text() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let hist: Vec<Record> = (1..=5)
            .map(|s| Record {
                step: s,
                epoch: s as f64 / 5.0,
                values: [
                    ("loss".to_string(), 0.7 - 0.05 * s as f64),
                    ("rewards/chosen".to_string(), 0.01 * s as f64),
                    ("rewards/rejected".to_string(), -0.02 * s as f64),
                    ("rewards/accuracies".to_string(), 0.5 + 0.05 * s as f64),
                ]
                .into(),
            })
            .collect();
        let files = draw_charts(&hist, dir.path())?;
        assert_eq!(files.len(), 3, "{files:?}");
        for f in files {
            let bytes = std::fs::read(&f)?;
            assert_eq!(&bytes[1..4], b"PNG");
        }
        Ok(())
    }
}
