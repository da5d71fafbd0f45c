//! Causal language models for dpo2d: loading (Hugging Face directories and
//! GGUF files), a differentiable Llama/Qwen2 implementation for training,
//! LoRA, tokenizer and chat template, generation and log-probabilities.

pub mod chat;
pub mod config;
pub mod device;
pub mod fetch;
pub mod gemm_bench;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod save;
pub mod source;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod tokenizer;
pub mod weights;

pub use device::DeviceSpec;
pub use source::{convert_gguf, load, load_text_side, LoadedModel, TextSide};

/// Shared by the property tests of this crate.
#[cfg(test)]
pub(crate) mod fuzz {
    use proptest::prelude::*;

    /// `default` cases, or `PROPTEST_CASES` when set (to fuzz longer).
    pub(crate) fn config(default: u32) -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// One edit of a byte string: what to do, where, with which byte or word.
    pub(crate) type Edit = (u8, usize, u64);

    pub(crate) fn edits(n: usize) -> impl Strategy<Value = Vec<Edit>> {
        let word = prop_oneof![any::<u64>(), Just(0u64), Just(1), Just(u64::MAX), Just(1 << 32), Just(1 << 40), 0u64..1024];
        prop::collection::vec((any::<u8>(), any::<usize>(), word), 1..n)
    }

    /// Applies `edits` to `bytes`; most land in the first `hot` bytes (the
    /// header, where lengths and counts live).
    pub(crate) fn mutate(mut bytes: Vec<u8>, hot: usize, edits: &[Edit]) -> Vec<u8> {
        for &(kind, at, word) in edits {
            let span = if kind & 0x80 == 0 { hot.min(bytes.len()) } else { bytes.len() };
            let at = if span == 0 { 0 } else { at % span };
            match kind % 5 {
                0 if at < bytes.len() => bytes[at] = word as u8,
                1 => {
                    let end = (at + 8).min(bytes.len());
                    bytes[at..end].copy_from_slice(&word.to_le_bytes()[..end - at]);
                }
                2 => bytes.insert(at, word as u8),
                3 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at.max(1)),
            }
        }
        bytes
    }
}
