//! PNG charts. Text uses DejaVu Sans, shipped in the crate (licence beside
//! the font file) and registered with plotters once, so charts draw the same
//! on a machine without fonts.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
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

/// The series colours of every chart.
pub const COLORS: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14)];

/// The colour of the `i`-th series.
pub fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// One named line of `(x, y)` points.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// A line chart of `series` against `x_label`, written to `path` (800 x 500).
pub fn line_chart(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    draw_lines(path, title, x_label, series).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw_lines(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    register_font();
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
    chart.configure_mesh().x_desc(x_label).label_style(("sans-serif", 14)).draw()?;
    for (i, (name, p)) in series.iter().enumerate() {
        let c = color(i);
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
    fn draws_a_png_with_text() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.png");
        let line: Vec<(f64, f64)> = (1..=5).map(|s| (s as f64, 0.1 * s as f64)).collect();
        line_chart(&path, "title", "step", &[("a", line), ("b", vec![(1.0, 0.5)])])?;
        let bytes = std::fs::read(&path)?;
        assert_eq!(&bytes[1..4], b"PNG");
        Ok(())
    }
}
