//! Which pairs train and in what order: the held-out split and the
//! per-epoch order of the training pairs. Everything is derived from the
//! seed (and the epoch), so a resumed run sees the same order.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Deterministic 64-bit generator (SplitMix64): tiny, seedable, and its
/// whole state is one number, so data order is reproducible anywhere.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Order of the training pairs (TRL's `train_sampling_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingStrategy {
    /// A seeded permutation per epoch.
    #[default]
    Random,
    /// File order.
    Sequential,
}

impl fmt::Display for SamplingStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SamplingStrategy::Random => "random",
            SamplingStrategy::Sequential => "sequential",
        })
    }
}

impl FromStr for SamplingStrategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(SamplingStrategy::Random),
            "sequential" => Ok(SamplingStrategy::Sequential),
            _ => bail!("unknown train_sampling_strategy `{s}` (expected random or sequential)"),
        }
    }
}

/// Order of the training pairs in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    SplitMix(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut v);
    v
}

/// Hold out `round(share * n)` (at least one) items, chosen by the seed;
/// both parts keep file order. Returns `(train, held_out)`.
pub fn split_held_out<T>(items: Vec<T>, share: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    let n_eval = ((items.len() as f64) * share).round().max(1.0) as usize;
    if n_eval >= items.len() {
        bail!("eval_split {share} leaves no training pairs");
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    SplitMix(seed ^ 0x5EED_E7A1).shuffle(&mut order);
    let held: std::collections::BTreeSet<usize> = order[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, p) in items.into_iter().enumerate() {
        if held.contains(&i) {
            eval.push(p);
        } else {
            train.push(p);
        }
    }
    Ok((train, eval))
}

/// Hands out micro-batches of training-pair indices, epoch after epoch.
#[derive(Debug, Clone)]
pub struct Sampler {
    strategy: SamplingStrategy,
    seed: u64,
    n: usize,
    batch_size: usize,
    /// Micro-batches handed out so far (the position in the data stream).
    micro_step: usize,
    /// The current epoch's order, computed once per epoch.
    order: Option<(usize, Vec<usize>)>,
}

impl Sampler {
    /// `n` pairs in micro-batches of `batch_size`, starting after
    /// `micro_step` micro-batches (0 for a fresh run).
    pub fn new(strategy: SamplingStrategy, seed: u64, n: usize, batch_size: usize, micro_step: usize) -> Self {
        Sampler { strategy, seed, n, batch_size: batch_size.max(1), micro_step, order: None }
    }

    pub fn micro_batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch_size)
    }

    pub fn micro_step(&self) -> usize {
        self.micro_step
    }

    /// Epochs done, fractional (as HF's `epoch`).
    pub fn epoch(&self) -> f64 {
        self.micro_step as f64 / self.micro_batches_per_epoch() as f64
    }

    /// The next micro-batch (the last of an epoch may be smaller).
    pub fn next_batch(&mut self) -> Vec<usize> {
        let per_epoch = self.micro_batches_per_epoch();
        let (epoch, within) = (self.micro_step / per_epoch, self.micro_step % per_epoch);
        if self.order.as_ref().map(|(e, _)| *e != epoch).unwrap_or(true) {
            let order = match self.strategy {
                SamplingStrategy::Sequential => (0..self.n).collect(),
                SamplingStrategy::Random => epoch_order(self.n, self.seed, epoch),
            };
            self.order = Some((epoch, order));
        }
        self.micro_step += 1;
        let order = &self.order.as_ref().expect("set above").1;
        order[within * self.batch_size..((within + 1) * self.batch_size).min(self.n)].to_vec()
    }

    /// The order of the epoch in progress (saved in checkpoints for inspection).
    pub fn current_order(&self) -> Vec<usize> {
        self.order.as_ref().map(|(_, o)| o.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(10, 42, 0);
        let b = epoch_order(10, 42, 0);
        let c = epoch_order(10, 42, 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn sampler_walks_epochs_and_resumes_mid_stream() {
        let mut s = Sampler::new(SamplingStrategy::Random, 7, 5, 2, 0);
        let all: Vec<Vec<usize>> = (0..6).map(|_| s.next_batch()).collect();
        assert_eq!(all[0..3].concat(), epoch_order(5, 7, 0));
        assert_eq!(all[3..6].concat(), epoch_order(5, 7, 1));
        assert_eq!(all[2].len(), 1, "the last micro-batch of an epoch is smaller");
        assert_eq!(s.epoch(), 2.0);
        let mut resumed = Sampler::new(SamplingStrategy::Random, 7, 5, 2, 4);
        assert_eq!(resumed.next_batch(), all[4]);
        let mut seq = Sampler::new(SamplingStrategy::Sequential, 7, 5, 2, 0);
        assert_eq!(seq.next_batch(), vec![0, 1]);
    }

    #[test]
    fn held_out_split_is_seeded_and_keeps_file_order() {
        let (train, eval) = split_held_out((0..10).collect::<Vec<_>>(), 0.2, 3).unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
        assert!(train.windows(2).all(|w| w[0] < w[1]) && eval.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(split_held_out((0..10).collect::<Vec<_>>(), 0.2, 3).unwrap().1, eval);
        assert!(split_held_out(vec![1], 0.5, 3).is_err());
    }
}
