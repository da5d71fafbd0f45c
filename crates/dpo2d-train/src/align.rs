//! Tokenization of preference pairs and alignment of segments to tokens.
//!
//! * The prompt is rendered with the model's chat template and a generation
//!   prompt (`render(messages, add_generation_prompt = true)`), then encoded
//!   without extra special tokens (the template already has them), as
//!   `transformers.apply_chat_template` does.
//! * A response is encoded separately as `response text + end-of-turn
//!   suffix` (e.g. `"<|im_end|>\n"`); every one of its tokens is a label,
//!   the end-of-turn tokens included (the model must learn where to stop).
//!   Prompt and response are tokenized separately, as TRL's DPOTrainer does,
//!   so the response tokens never depend on the prompt.
//! * Segment -> tokens: each response token belongs to the segment in which
//!   it STARTS (its first byte, from the tokenizer's byte offsets). A token
//!   that straddles a boundary (e.g. `".\n"` + `"The"` merged into one token)
//!   therefore counts for the earlier segment. A segment in which no token
//!   starts gets no tokens and is dropped (its scores do not enter the loss).
//! * The end-of-turn tokens belong to the LAST segment: stopping after the
//!   final sentence is part of how that sentence ends the answer.
//! * Truncation follows TRL: the prompt is cut to `max_prompt_length` keeping
//!   its END (the question nearest the answer), then each response is cut to
//!   `max_length - prompt length` keeping its START. Segments that lose all
//!   their tokens are dropped; partly kept ones keep their scores. If the
//!   prompt alone would leave no room, it is cut further (keeping its end)
//!   to half of `max_length`.

use anyhow::{bail, Context, Result};
use dpo2d_data::{Pair, Response};
use dpo2d_model::chat::{ChatTemplate, Message};
use tokenizers::Tokenizer;

/// Segment id of a token that belongs to no scored segment (plain responses).
pub use crate::loss::NO_SEGMENT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignOptions {
    pub max_length: usize,
    pub max_prompt_length: usize,
}

/// One tokenized response.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedResponse {
    /// Response token ids (the labels), end-of-turn tokens included.
    pub ids: Vec<u32>,
    /// Segment index of each token into `scores` (`NO_SEGMENT` for plain responses).
    pub token_segments: Vec<u32>,
    /// Raw 0..4 scores of each kept segment, in order; empty for plain or
    /// unscored responses.
    pub scores: Vec<[u8; 5]>,
}

/// One tokenized pair.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    /// Index of the pair in its data file (0-based).
    pub index: usize,
    pub prompt: Vec<u32>,
    pub chosen: TokenizedResponse,
    pub rejected: TokenizedResponse,
    pub prompt_truncated: bool,
    pub response_truncated: bool,
}

impl TokenizedPair {
    /// Prompt + response tokens of both sides.
    pub fn num_tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.ids.len() + self.rejected.ids.len()
    }
    pub fn has_scores(&self) -> bool {
        !self.chosen.scores.is_empty() && !self.rejected.scores.is_empty()
    }
}

/// Counts of what truncation did, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlignReport {
    pub pairs: usize,
    pub truncated_pairs: usize,
    pub truncated_prompts: usize,
    pub truncated_responses: usize,
    pub dropped_segments: usize,
}

impl std::fmt::Display for AlignReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs tokenized; {} cut to fit (prompts cut: {}, responses cut: {}); {} segments dropped",
            self.pairs, self.truncated_pairs, self.truncated_prompts, self.truncated_responses, self.dropped_segments
        )
    }
}

/// A data file's prompt as the chat messages a template renders.
pub fn chat_messages(prompt: &dpo2d_data::Prompt) -> Vec<Message> {
    prompt.messages().into_iter().map(|m| Message::new(m.role, m.content)).collect()
}

/// Tokenizes pairs with one tokenizer and chat template.
pub struct Aligner<'a> {
    tok: &'a Tokenizer,
    chat: &'a ChatTemplate,
    suffix: String,
}

impl<'a> Aligner<'a> {
    pub fn new(tok: &'a Tokenizer, chat: &'a ChatTemplate) -> Result<Self> {
        let suffix = chat.assistant_suffix().context("finding the chat template's end-of-turn text")?;
        Ok(Aligner { tok, chat, suffix })
    }

    /// The end-of-turn text appended to every response.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    pub fn prompt_ids(&self, pair: &Pair) -> Result<Vec<u32>> {
        let text = self.chat.render(&chat_messages(&pair.prompt), true)?;
        let enc = self.tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("cannot tokenize prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokens of a response and the segment each belongs to (before truncation).
    pub fn response(&self, r: &Response) -> Result<(TokenizedResponse, usize)> {
        // Segment byte ranges over the response text.
        let (texts, scores): (Vec<&str>, Vec<Option<[u8; 5]>>) = match r {
            Response::Plain(t) => (vec![t.as_str()], vec![None]),
            Response::Segmented { segments } => segments.iter().map(|s| (s.text.as_str(), s.scores.map(|x| x.to_array()))).unzip(),
        };
        let scored = !texts.is_empty() && scores.iter().all(|s| s.is_some());
        let mut bounds = Vec::with_capacity(texts.len());
        let mut at = 0usize;
        for t in &texts {
            bounds.push((at, at + t.len()));
            at += t.len();
        }
        let body_len = at;
        let full: String = texts.concat() + &self.suffix;
        let enc = self.tok.encode(full.as_str(), false).map_err(|e| anyhow::anyhow!("cannot tokenize response: {e}"))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            bail!("response and end-of-turn text tokenize to nothing");
        }
        let last = texts.len().saturating_sub(1);
        // Segment of each token: where its first byte lies.
        let raw_seg: Vec<usize> = enc
            .get_offsets()
            .iter()
            .map(
                |&(start, _)| {
                    if start >= body_len {
                        last
                    } else {
                        bounds.iter().position(|&(a, b)| start >= a && start < b).unwrap_or(last)
                    }
                },
            )
            .collect();
        if !scored {
            let n = ids.len();
            return Ok((TokenizedResponse { ids, token_segments: vec![NO_SEGMENT; n], scores: vec![] }, 0));
        }
        let scores: Vec<[u8; 5]> = scores.into_iter().map(|s| s.unwrap_or_default()).collect();
        let (token_segments, kept, dropped) = compact(&raw_seg, &scores);
        Ok((TokenizedResponse { ids, token_segments, scores: kept }, dropped))
    }

    /// Tokenize and align one pair, truncating as described in the module docs.
    pub fn pair(&self, index: usize, pair: &Pair, opts: AlignOptions) -> Result<(TokenizedPair, usize)> {
        let mut prompt = self.prompt_ids(pair).with_context(|| format!("pair {}", index + 1))?;
        let (mut chosen, d1) = self.response(&pair.chosen).with_context(|| format!("pair {}: chosen", index + 1))?;
        let (mut rejected, d2) = self.response(&pair.rejected).with_context(|| format!("pair {}: rejected", index + 1))?;
        let mut dropped = d1 + d2;
        let mut prompt_truncated = false;
        if opts.max_prompt_length > 0 && prompt.len() > opts.max_prompt_length {
            prompt.drain(..prompt.len() - opts.max_prompt_length);
            prompt_truncated = true;
        }
        if prompt.len() + 1 > opts.max_length {
            let keep = (opts.max_length / 2).max(1);
            prompt.drain(..prompt.len() - keep);
            prompt_truncated = true;
        }
        let room = opts.max_length - prompt.len();
        let mut response_truncated = false;
        for side in [&mut chosen, &mut rejected] {
            if side.ids.len() > room {
                dropped += truncate_response(side, room);
                response_truncated = true;
            }
        }
        Ok((TokenizedPair { index, prompt, chosen, rejected, prompt_truncated, response_truncated }, dropped))
    }

    /// Tokenize every pair; the report says how many were cut.
    pub fn pairs(&self, pairs: &[Pair], opts: AlignOptions) -> Result<(Vec<TokenizedPair>, AlignReport)> {
        let mut rep = AlignReport::default();
        let mut out = Vec::with_capacity(pairs.len());
        for (i, p) in pairs.iter().enumerate() {
            let (t, dropped) = self.pair(i, p, opts)?;
            rep.pairs += 1;
            rep.truncated_prompts += t.prompt_truncated as usize;
            rep.truncated_responses += t.response_truncated as usize;
            rep.truncated_pairs += (t.prompt_truncated || t.response_truncated) as usize;
            rep.dropped_segments += dropped;
            out.push(t);
        }
        Ok((out, rep))
    }
}

/// Renumber segments so that only those owning tokens remain; returns
/// (per-token compact ids, kept scores, number dropped).
fn compact(raw_seg: &[usize], scores: &[[u8; 5]]) -> (Vec<u32>, Vec<[u8; 5]>, usize) {
    let mut map = vec![None; scores.len()];
    let mut kept = Vec::new();
    let mut ids = Vec::with_capacity(raw_seg.len());
    for &s in raw_seg {
        let id = *map[s].get_or_insert_with(|| {
            kept.push(scores[s]);
            kept.len() as u32 - 1
        });
        ids.push(id);
    }
    let dropped = scores.len() - kept.len();
    (ids, kept, dropped)
}

/// Keep the first `n` tokens; drop segments left without tokens.
fn truncate_response(r: &mut TokenizedResponse, n: usize) -> usize {
    r.ids.truncate(n);
    r.token_segments.truncate(n);
    if r.scores.is_empty() {
        return 0;
    }
    // Segment ids are increasing along the response, so the kept ones are a prefix.
    let used = r.token_segments.iter().filter(|&&s| s != NO_SEGMENT).map(|&s| s as usize + 1).max().unwrap_or(0);
    let dropped = r.scores.len() - used;
    r.scores.truncate(used);
    dropped
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dpo2d_data::{Prompt, Scores, Segment};

    /// A character-level BPE tokenizer (no pre-tokenizer, so tokens may span
    /// spaces) with a few merges, ChatML-style special tokens, and the
    /// multi-byte characters `é` and `日本`.
    pub fn test_tokenizer() -> Tokenizer {
        let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?\n:é日本";
        let mut vocab = serde_json::Map::new();
        for (i, s) in ["<|im_start|>", "<|im_end|>"].iter().enumerate() {
            vocab.insert(s.to_string(), i.into());
        }
        for c in chars.chars() {
            let n = vocab.len();
            vocab.insert(c.to_string(), n.into());
        }
        // Merges: ". " + "T" -> ". T" crosses a sentence boundary; "é" + "t"; "日本".
        let merges = [(".", " "), (". ", "T"), ("é", "t"), ("日", "本"), ("h", "i")];
        let mut merge_list = vec![];
        for (a, b) in merges {
            let n = vocab.len();
            vocab.insert(format!("{a}{b}"), n.into());
            merge_list.push(serde_json::json!([a, b]));
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merge_list}
        });
        Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap()
    }

    pub fn test_template() -> ChatTemplate {
        ChatTemplate::new(dpo2d_model::chat::CHATML_TEMPLATE, None, Some("<|im_end|>")).unwrap()
    }

    fn seg(t: &str, h: u8) -> Segment {
        Segment { text: t.into(), scores: Some(Scores::from_array([h, 4, 4, h, 3])) }
    }

    fn pair(chosen: Vec<Segment>, rejected: Vec<Segment>) -> Pair {
        Pair {
            id: None,
            prompt: Prompt::Text("hi".into()),
            chosen: Response::Segmented { segments: chosen },
            rejected: Response::Segmented { segments: rejected },
        }
    }

    const WIDE: AlignOptions = AlignOptions { max_length: 1000, max_prompt_length: 1000 };

    #[test]
    fn prompt_and_suffix_tokens() -> Result<()> {
        let (tok, chat) = (test_tokenizer(), test_template());
        let a = Aligner::new(&tok, &chat)?;
        assert_eq!(a.suffix(), "<|im_end|>\n");
        let p = pair(vec![seg("ab", 4)], vec![seg("cd", 0)]);
        let (t, _) = a.pair(0, &p, WIDE)?;
        let prompt_text = tok.decode(&t.prompt, false).unwrap();
        assert!(prompt_text.starts_with("<|im_start|>"), "{prompt_text}");
        // "a", "b", "<|im_end|>", "\n": all labels, all in the only segment.
        assert_eq!(t.chosen.ids.len(), 4);
        assert_eq!(t.chosen.ids[2], 1);
        assert_eq!(t.chosen.token_segments, vec![0, 0, 0, 0]);
        Ok(())
    }

    #[test]
    fn boundary_inside_token_goes_to_segment_where_it_starts() -> Result<()> {
        let (tok, chat) = (test_tokenizer(), test_template());
        let a = Aligner::new(&tok, &chat)?;
        // ". T" is one token starting in segment 0 ("Ab.") and ending in segment 1 (" Tx").
        let p = pair(vec![seg("Ab.", 4), seg(" Tx.", 1)], vec![seg("c", 0)]);
        let (t, _) = a.pair(0, &p, WIDE)?;
        let pieces: Vec<String> = t.chosen.ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["A", "b", ". T", "x", ".", "<|im_end|>", "\n"]);
        assert_eq!(t.chosen.token_segments, vec![0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(t.chosen.scores.len(), 2);
        // A segment that only holds the tail of a straddling token is dropped.
        let p = pair(vec![seg("Ab.", 4), seg(" T", 1), seg("x", 2)], vec![seg("c", 0)]);
        let (t, dropped) = a.pair(0, &p, WIDE)?;
        assert_eq!(dropped, 1);
        assert_eq!(t.chosen.token_segments, vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(t.chosen.scores[1][0], 2, "the kept segment keeps its own scores");
        Ok(())
    }

    #[test]
    fn multibyte_utf8_offsets() -> Result<()> {
        let (tok, chat) = (test_tokenizer(), test_template());
        let a = Aligner::new(&tok, &chat)?;
        // "日本" is one 6-byte token, "ét" one 3-byte token.
        let p = pair(vec![seg("日本.", 4), seg("été", 1), seg("!", 3)], vec![seg("é", 0)]);
        let (t, _) = a.pair(0, &p, WIDE)?;
        let pieces: Vec<String> = t.chosen.ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["日本", ".", "ét", "é", "!", "<|im_end|>", "\n"]);
        assert_eq!(t.chosen.token_segments, vec![0, 0, 1, 1, 2, 2, 2]);
        assert_eq!(t.chosen.scores.iter().map(|s| s[0]).collect::<Vec<_>>(), vec![4, 1, 3]);
        Ok(())
    }

    #[test]
    fn truncation_keeps_prompt_end_and_response_start() -> Result<()> {
        let (tok, chat) = (test_tokenizer(), test_template());
        let a = Aligner::new(&tok, &chat)?;
        let p = pair(vec![seg("abc", 4), seg("def", 1), seg("ghi", 2)], vec![seg("x", 0)]);
        let full = a.prompt_ids(&p)?;
        let opts = AlignOptions { max_length: 8, max_prompt_length: 4 };
        let (t, dropped) = a.pair(0, &p, opts)?;
        assert!(t.prompt_truncated && t.response_truncated);
        assert_eq!(t.prompt, full[full.len() - 4..].to_vec(), "prompt keeps its end");
        assert_eq!(t.chosen.ids.len(), 4);
        assert_eq!(t.chosen.ids, tok.encode("abcd", false).unwrap().get_ids().to_vec());
        // Segment 1 is partly kept (keeps its scores), segment 2 is dropped.
        assert_eq!(t.chosen.token_segments, vec![0, 0, 0, 1]);
        assert_eq!(t.chosen.scores.iter().map(|s| s[0]).collect::<Vec<_>>(), vec![4, 1]);
        assert_eq!(dropped, 1);
        // Rejected "x<|im_end|>\n" fits.
        assert_eq!(t.rejected.ids.len(), 3);
        let (_, rep) = a.pairs(&[p.clone(), pair(vec![seg("a", 1)], vec![seg("b", 1)])], opts)?;
        // Both prompts are longer than 4 tokens; only the first pair's response is cut.
        assert_eq!((rep.pairs, rep.truncated_pairs, rep.truncated_responses, rep.dropped_segments), (2, 2, 1, 1));
        Ok(())
    }

    #[test]
    fn plain_responses_have_no_segments() -> Result<()> {
        let (tok, chat) = (test_tokenizer(), test_template());
        let a = Aligner::new(&tok, &chat)?;
        let p = Pair {
            id: None,
            prompt: Prompt::Text("hi".into()),
            chosen: Response::Plain("ab".into()),
            rejected: Response::Plain("c".into()),
        };
        let (t, _) = a.pair(0, &p, WIDE)?;
        assert!(!t.has_scores());
        assert!(t.chosen.token_segments.iter().all(|&s| s == NO_SEGMENT));
        Ok(())
    }
}
