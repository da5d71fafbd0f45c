//! Per-token log-probabilities of a response given a chat prompt.
//!
//! The prompt is rendered with the chat template and a generation prompt;
//! the response is tokenized on its own and appended (optionally followed
//! by the template's end-of-turn text), which is how the trainer builds its
//! sequences too.

use crate::chat::Message;
use crate::llama::{AttentionLayout, CausalLM};
use crate::source::TextSide;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

/// One response token and its log-probability.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprob {
    /// Index among the response tokens.
    pub index: usize,
    pub id: u32,
    pub token: String,
    pub logprob: f32,
}

/// Token ids of prompt and response, and where the response starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub response_start: usize,
}

/// Tokenize `render(prompt, generation prompt) + response [+ end of turn]`.
pub fn tokenize_pair(text: &TextSide, prompt: &[Message], response: &str, with_end_of_turn: bool) -> Result<Tokenized> {
    let mut ids = text.prompt_ids(prompt)?;
    let response_start = ids.len();
    let mut r = response.to_string();
    if with_end_of_turn {
        r.push_str(&text.chat.assistant_suffix()?);
    }
    ids.extend(text.tokenizer.encode(&r, false)?);
    if ids.len() == response_start {
        bail!("the response is empty: nothing to score");
    }
    Ok(Tokenized { ids, response_start })
}

/// Log-probabilities of every token of `ids` after the first (entry t is
/// log p(ids[t] | ids[..t]); entry 0 is 0).
pub fn sequence_logprobs(model: &CausalLM, ids: &[u32]) -> Result<Vec<f32>> {
    let x = Tensor::new(vec![ids.to_vec()], model.device())?;
    let lp = model.token_logprobs(&x, &AttentionLayout::causal(1, ids.len()))?;
    Ok(lp.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Per-token log-probabilities of `response` after `prompt`. A NaN or
/// infinite one is an error: printed, it would read as a score.
pub fn response_logprobs(
    model: &CausalLM,
    text: &TextSide,
    prompt: &[Message],
    response: &str,
    with_end_of_turn: bool,
) -> Result<Vec<TokenLogprob>> {
    let t = tokenize_pair(text, prompt, response, with_end_of_turn)?;
    let lps = sequence_logprobs(model, &t.ids)?;
    if let Some(i) = lps[t.response_start..].iter().position(|lp| !lp.is_finite()) {
        let id = t.ids[t.response_start + i];
        bail!(
            "the model gives a non-finite log-probability ({}) for response token {i} ({:?}): its weights or activations overflow",
            lps[t.response_start + i],
            text.tokenizer.token_text(id)
        );
    }
    Ok(t.ids[t.response_start..]
        .iter()
        .zip(&lps[t.response_start..])
        .enumerate()
        .map(|(i, (&id, &lp))| TokenLogprob { index: i, id, token: text.tokenizer.token_text(id), logprob: lp })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LoadOptions;

    #[test]
    fn response_logprobs_match_a_softmax_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        let gg = dir.path().join("tiny.gguf");
        crate::source::tests::write_tiny_model_gguf(&gg);
        let lm = crate::source::load(&gg, &LoadOptions::default()).unwrap();
        let text = lm.text();
        let prompt = [Message::user("2+2?")];
        let lps = response_logprobs(&lm.model, &text, &prompt, "4.", true).unwrap();
        // Byte tokenizer: "4", ".", then "<|im_end|>" and "\n".
        let toks: Vec<&str> = lps.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(toks, vec!["4", ".", "<|im_end|>", "\n"]);
        let t = tokenize_pair(&text, &prompt, "4.", true).unwrap();
        // Check the first response token against log_softmax of the logits.
        let x = Tensor::new(vec![t.ids[..t.response_start].to_vec()], &candle_core::Device::Cpu).unwrap();
        let h = lm.model.forward(&x, &AttentionLayout::causal(1, t.response_start)).unwrap();
        let logits: Vec<f32> = lm.model.logits(&h).unwrap().squeeze(0).unwrap().get(t.response_start - 1).unwrap().to_vec1().unwrap();
        let mx = logits.iter().cloned().fold(f32::MIN, f32::max);
        let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f32>().ln();
        let want = logits[t.ids[t.response_start] as usize] - lse;
        assert!((lps[0].logprob - want).abs() < 1e-4, "{} vs {want}", lps[0].logprob);
        assert!(lps.iter().all(|t| t.logprob <= 0.0));
        assert!(tokenize_pair(&text, &prompt, "", false).is_err());
    }

    #[test]
    fn overflowing_model_is_an_error_not_a_nan_score() {
        use crate::gguf::tests::{tiny_tensors, write_tiny_gguf};
        let dir = tempfile::tempdir().unwrap();
        let gg = dir.path().join("huge.gguf");
        // Finite weights whose final norm overflows f32: the logits become inf - inf.
        let mut ts = tiny_tensors(16, 32, 259, 4, 2);
        ts.insert("model.norm.weight".into(), Tensor::full(f32::MAX, 16, &candle_core::Device::Cpu).unwrap());
        write_tiny_gguf(&gg, "llama", &ts, 4, 2, crate::source::tests::byte_tokenizer_md());
        let lm = crate::source::load(&gg, &LoadOptions::default()).unwrap();
        let e = format!("{:#}", response_logprobs(&lm.model, &lm.text(), &[Message::user("2+2?")], "4.", false).unwrap_err());
        assert!(e.contains("non-finite log-probability") && e.contains("response token 0"), "{e}");
    }
}
