//! Numbers with honest error bars: the mean with a bootstrap confidence
//! interval, and AlpacaEval 2's length-controlled win rate (the win rate a
//! logistic model predicts when both answers have the same length).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A mean and its 95% percentile-bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    pub n: usize,
}

impl Estimate {
    pub fn scaled(self, k: f64) -> Estimate {
        Estimate { mean: self.mean * k, low: self.low * k, high: self.high * k, n: self.n }
    }
}

pub const BOOTSTRAP_SAMPLES: usize = 2000;

/// Mean of `xs` with a 95% interval from resampling `xs` with replacement
/// (seeded, so a report repeats exactly). `None` when `xs` is empty.
pub fn bootstrap_mean(xs: &[f64], seed: u64) -> Option<Estimate> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..BOOTSTRAP_SAMPLES).map(|_| (0..n).map(|_| xs[rng.gen_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| means[((q * (BOOTSTRAP_SAMPLES - 1) as f64).round() as usize).min(BOOTSTRAP_SAMPLES - 1)];
    Some(Estimate { mean, low: at(0.025), high: at(0.975), n })
}

/// One pairwise judgement for the length-controlled fit.
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    /// 1 when the model's answer won, 0.5 tie, 0 lost.
    pub outcome: f64,
    /// Length of the model's answer minus the baseline's, in characters.
    pub length_diff: f64,
    /// Whether the model's answer was shown first.
    pub model_first: bool,
}

/// The length-controlled win rate in [0, 1]: fit
/// `P(win) = sigmoid(b0 + b1 * tanh(length_diff / sd) + b2 * position)`
/// (position = +1 when the model's answer was shown first, -1 otherwise)
/// by Newton's method on the fractional outcomes, and report
/// `sigmoid(b0)`: the win rate at equal length, averaged over positions.
/// `None` with fewer than 4 judgements.
pub fn length_controlled_win_rate(rows: &[Judged]) -> Option<f64> {
    if rows.len() < 4 {
        return None;
    }
    let n = rows.len() as f64;
    let mean = rows.iter().map(|r| r.length_diff).sum::<f64>() / n;
    let sd = (rows.iter().map(|r| (r.length_diff - mean).powi(2)).sum::<f64>() / n).sqrt().max(1.0);
    let x: Vec<[f64; 3]> = rows.iter().map(|r| [1.0, (r.length_diff / sd).tanh(), if r.model_first { 1.0 } else { -1.0 }]).collect();
    // A small ridge keeps the fit finite when the outcomes separate perfectly.
    let ridge = 1e-2;
    let mut b = [0.0f64; 3];
    for _ in 0..100 {
        let mut g = [0.0; 3];
        let mut h = [[0.0; 3]; 3];
        for (xi, r) in x.iter().zip(rows) {
            let p = sigmoid(dot(xi, &b));
            let w = p * (1.0 - p);
            for j in 0..3 {
                g[j] += (r.outcome - p) * xi[j];
                for k in 0..3 {
                    h[j][k] += w * xi[j] * xi[k];
                }
            }
        }
        for j in 0..3 {
            g[j] -= ridge * b[j];
            h[j][j] += ridge;
        }
        let step = solve3(h, g)?;
        for j in 0..3 {
            b[j] += step[j];
        }
        if step.iter().map(|s| s.abs()).fold(0.0, f64::max) < 1e-10 {
            break;
        }
    }
    Some(sigmoid(b[0]))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `h * s = g` (Gaussian elimination with partial pivoting; indexed
/// loops read like the textbook's).
#[allow(clippy::needless_range_loop)]
fn solve3(mut h: [[f64; 3]; 3], mut g: [f64; 3]) -> Option<[f64; 3]> {
    for c in 0..3 {
        let p = (c..3).max_by(|&i, &j| h[i][c].abs().total_cmp(&h[j][c].abs()))?;
        if h[p][c].abs() < 1e-12 {
            return None;
        }
        h.swap(c, p);
        g.swap(c, p);
        for r in c + 1..3 {
            let f = h[r][c] / h[c][c];
            for k in c..3 {
                h[r][k] -= f * h[c][k];
            }
            g[r] -= f * g[c];
        }
    }
    let mut s = [0.0; 3];
    for c in (0..3).rev() {
        s[c] = (g[c] - (c + 1..3).map(|k| h[c][k] * s[k]).sum::<f64>()) / h[c][c];
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_of_hand_made_verdicts() {
        // 7 wins, 2 ties, 1 loss: a win rate of 0.8.
        let xs = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0];
        let e = bootstrap_mean(&xs, 1).unwrap();
        assert!((e.mean - 0.8).abs() < 1e-12);
        assert!(e.low < 0.8 && e.high > 0.8, "{e:?}");
        assert!(e.low >= 0.5 && e.high <= 1.0, "{e:?}");
        assert_eq!(bootstrap_mean(&xs, 1), bootstrap_mean(&xs, 1));
        // No spread, no interval.
        let e = bootstrap_mean(&[0.5; 6], 3).unwrap();
        assert_eq!((e.low, e.high), (0.5, 0.5));
        assert!(bootstrap_mean(&[], 0).is_none());
        // More data, a narrower interval.
        let many: Vec<f64> = xs.iter().cycle().take(200).copied().collect();
        let wide = bootstrap_mean(&xs, 1).unwrap();
        let narrow = bootstrap_mean(&many, 1).unwrap();
        assert!(narrow.high - narrow.low < wide.high - wide.low);
    }

    #[test]
    fn length_control_removes_a_length_bias() {
        // The judge prefers whichever answer is longer; the model's answers
        // are longer half the time and as long the other half (where it ties).
        let mut rows = vec![];
        for i in 0..200 {
            let longer = i % 2 == 0;
            let d = if longer { 300.0 + i as f64 } else { 0.0 };
            let outcome = if longer { 1.0 } else { 0.5 };
            rows.push(Judged { outcome, length_diff: d, model_first: i % 4 < 2 });
        }
        let raw = rows.iter().map(|r| r.outcome).sum::<f64>() / rows.len() as f64;
        let lc = length_controlled_win_rate(&rows).unwrap();
        assert!((raw - 0.75).abs() < 1e-12);
        assert!((lc - 0.5).abs() < 0.05, "length-controlled win rate {lc}");
        // Without a length effect it is the plain win rate.
        let flat: Vec<Judged> = (0..100)
            .map(|i| Judged { outcome: if i % 5 < 3 { 1.0 } else { 0.0 }, length_diff: (i % 7) as f64, model_first: i % 2 == 0 })
            .collect();
        let lc = length_controlled_win_rate(&flat).unwrap();
        assert!((lc - 0.6).abs() < 0.05, "{lc}");
        assert!(length_controlled_win_rate(&flat[..3]).is_none());
    }
}
