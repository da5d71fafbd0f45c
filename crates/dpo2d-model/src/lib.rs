//! Causal language models for dpo2d: loading (Hugging Face directories and
//! GGUF files), a differentiable Llama/Qwen2 implementation for training,
//! LoRA, tokenizer and chat template, generation and log-probabilities.

pub mod chat;
pub mod config;
pub mod device;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod ops;
pub mod save;
pub mod source;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod tokenizer;
pub mod weights;

pub use device::DeviceSpec;
pub use source::{convert_gguf, load, load_text_side, LoadedModel, TextSide};
