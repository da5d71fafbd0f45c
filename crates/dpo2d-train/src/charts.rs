//! PNG charts of the training indicators the paper plots (Fig. 4-5):
//! implicit rewards of chosen and rejected, reward accuracy, sequence KL on
//! chosen and rejected, and the loss. Text uses DejaVu Sans, shipped in the
//! crate (licence beside the font file), registered with plotters once.

use crate::metrics::Record;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Makes the shipped font the "sans-serif" of every chart (once per process).
pub fn register_font() {
    REGISTER.call_once(|| {
        // A failure leaves text undrawn; the charts themselves still render.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

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

/// The series colours of every chart.
pub const COLORS: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14)];

/// Draw every chart that has data into `dir`; returns the files written.
pub fn draw_charts(history: &[Record], dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
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
        draw_one(&path, title, &series).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}

fn draw_one(path: &Path, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<(), Box<dyn std::error::Error>> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .caption(title, ("sans-serif", 22))
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart.configure_mesh().x_desc("step").label_style(("sans-serif", 14)).draw()?;
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let s = chart.draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))?;
        s.label(*name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if p.len() == 1 {
            chart.draw_series(std::iter::once(Circle::new(p[0], 4, c.filled())))?;
        }
    }
    chart.configure_series_labels().label_font(("sans-serif", 14)).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
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
