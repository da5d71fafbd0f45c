//! Aspect weights `W`: how the five aspects of a segment's scores combine
//! into one number, in the loss (docs/method.md §4), when `iterate` ranks
//! answers (§8) and in evaluation. Kept with the data so that every stage
//! uses the one type and the one default.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Aspect weights `W` (helpfulness, correctness, safety, completeness,
/// clarity): five non-negative numbers summing to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "[f64; 5]", into = "[f64; 5]")]
pub struct AspectWeights([f64; 5]);

impl AspectWeights {
    /// The paper's weights `[0.3, 0.4, 0.1, 0.1, 0.1]`.
    pub const PAPER: AspectWeights = AspectWeights([0.3, 0.4, 0.1, 0.1, 0.1]);
    /// Helpfulness only: what 1D-DPO uses.
    pub const HELPFULNESS_ONLY: AspectWeights = AspectWeights([1.0, 0.0, 0.0, 0.0, 0.0]);

    /// Validated weights.
    pub fn new(w: [f64; 5]) -> Result<Self> {
        ensure!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "aspect weights must be non-negative numbers, got {w:?}");
        let sum: f64 = w.iter().sum();
        ensure!(
            (sum - 1.0).abs() <= 1e-6,
            "aspect weights must sum to 1 (helpfulness, correctness, safety, completeness, \
             clarity), got {w:?} summing to {sum}"
        );
        Ok(AspectWeights(w))
    }

    pub fn as_array(&self) -> [f64; 5] {
        self.0
    }
}

impl Default for AspectWeights {
    fn default() -> Self {
        AspectWeights::PAPER
    }
}

impl TryFrom<[f64; 5]> for AspectWeights {
    type Error = anyhow::Error;
    fn try_from(w: [f64; 5]) -> Result<Self> {
        AspectWeights::new(w)
    }
}

impl From<AspectWeights> for [f64; 5] {
    fn from(w: AspectWeights) -> Self {
        w.0
    }
}

/// Parses `"0.3,0.4,0.1,0.1,0.1"` (commas and/or spaces).
impl FromStr for AspectWeights {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()).collect();
        ensure!(
            parts.len() == 5,
            "aspect weights need 5 numbers (helpfulness, correctness, safety, completeness, \
             clarity), got {} in '{s}'",
            parts.len()
        );
        let mut w = [0.0; 5];
        for (x, p) in w.iter_mut().zip(&parts) {
            *x = p.parse().with_context(|| format!("aspect weight '{p}' in '{s}' is not a number"))?;
        }
        AspectWeights::new(w)
    }
}

impl fmt::Display for AspectWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.0;
        write!(f, "{},{},{},{},{}", w[0], w[1], w[2], w[3], w[4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_validate_and_round_trip() {
        assert_eq!("0.3,0.4,0.1,0.1,0.1".parse::<AspectWeights>().unwrap(), AspectWeights::PAPER);
        assert_eq!("1 0 0 0 0".parse::<AspectWeights>().unwrap(), AspectWeights::HELPFULNESS_ONLY);
        assert!("0.3,0.4,0.1,0.1".parse::<AspectWeights>().unwrap_err().to_string().contains("5 numbers"));
        assert!("0.5,0.5,0.1,0,0".parse::<AspectWeights>().unwrap_err().to_string().contains("sum to 1"));
        assert!("1.2,-0.2,0,0,0".parse::<AspectWeights>().unwrap_err().to_string().contains("non-negative"));
        assert!("a,0,0,0,1".parse::<AspectWeights>().unwrap_err().to_string().contains("not a number"));
        assert!(serde_json::from_str::<AspectWeights>("[0.5,0.5,0.5,0,0]").is_err());
        let w: AspectWeights = AspectWeights::PAPER.to_string().parse().unwrap();
        assert_eq!(w, AspectWeights::PAPER);
    }
}
