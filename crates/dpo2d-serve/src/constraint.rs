//! Structured outputs: a `response_format` of type `json_schema` or
//! `json_object` is compiled by llguidance (the engine behind llama.cpp's
//! and vLLM's grammars) into a matcher per row that masks the logits at
//! every step, so every answer parses and fits the schema.

use anyhow::{Context, Result};
use dpo2d_model::source::TextSide;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// What a request's `response_format` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Text,
    /// Any JSON object (`json_object`), or one that fits this schema.
    Json(Value),
}

impl Format {
    /// Reads OpenAI's `response_format`; `Err` names what is wrong with it.
    pub fn parse(v: Option<&Value>) -> Result<Format, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Format::Text) };
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(Format::Text),
            Some("json_object") => Ok(Format::Json(serde_json::json!({"type": "object"}))),
            Some("json_schema") => {
                let spec = v.get("json_schema").filter(|s| s.is_object()).ok_or("response_format.json_schema must be an object")?;
                let schema = spec.get("schema").filter(|s| s.is_object() || s.is_boolean());
                Ok(Format::Json(schema.ok_or("response_format.json_schema.schema must be a JSON schema (an object)")?.clone()))
            }
            Some(other) => Err(format!("response_format type {other:?} is not supported; use text, json_object or json_schema")),
            None => Err("response_format needs a type (text, json_object or json_schema)".into()),
        }
    }
}

/// The grammar compiler of one server, over its tokenizer's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `vocab`: the model's output width (it may exceed the tokenizer's).
    pub fn new(text: &TextSide, eos: &[u32], vocab: usize) -> Result<Self> {
        let env: TokEnv = Arc::new(Vocabulary::new(text, eos, vocab)?);
        let mut factory = ParserFactory::new_simple(&env).context("building the constrained-decoding engine")?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A fresh matcher for `schema`; `Err` says why the schema cannot be used.
    /// The JSON is laid out as Python's `json.dumps` writes it (`", "` and
    /// `": "`, no other whitespace between tokens) unless the schema says
    /// otherwise (llguidance's `x-guidance`): free whitespace lets a small
    /// model pad an answer with blank lines until it runs out of tokens.
    pub fn matcher(&self, schema: &Value) -> Result<Constraint, String> {
        let mut schema = schema.clone();
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        let grammar = TopLevelGrammar::from_json_schema(schema);
        let parser = self.factory.create_parser(grammar).map_err(|e| format!("response_format: the JSON schema cannot be used: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(format!("response_format: the JSON schema cannot be used: {e}")),
            None => Ok(Constraint { matcher }),
        }
    }
}

/// One row's matcher: which tokens may come next.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// A copy for another row of the same request.
    pub fn fork(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone() }
    }

    /// Sets the logits of every token the grammar does not allow now to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed: SimpleVob = self.matcher.compute_mask_or_eos().map_err(|e| anyhow::anyhow!("constrained decoding: {e}"))?;
        allowed.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        Ok(())
    }

    /// Moves past the chosen token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| anyhow::anyhow!("constrained decoding: {e}"))
    }

    /// The grammar is complete: nothing but the end may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The model's vocabulary as llguidance sees it: every token's bytes (read
/// from tokenizer.json by llguidance, special tokens marked), and our
/// tokenizer for the text a grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: dpo2d_model::tokenizer::ModelTokenizer,
}

impl Vocabulary {
    fn new(text: &TextSide, eos: &[u32], vocab: usize) -> Result<Self> {
        let json: Value = serde_json::from_str(&text.tokenizer.inner.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).context("reading the vocabulary for constrained decoding")?;
        // Ids the tokenizer does not name (the model's output may be wider) are specials no grammar allows.
        let n = vocab.max(words.len());
        for id in words.len()..n {
            let mut name = format!(".<[{id}]>").into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        for (id, w) in words.iter_mut().enumerate() {
            if w.is_empty() {
                *w = format!(".<[{id}]>").into_bytes();
                w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            }
        }
        let first_eos = *eos.first().context("the model has no end-of-sequence token")?;
        let info = TokRxInfo {
            vocab_size: n as u32,
            tok_eos: first_eos,
            tok_bos: text.tokenizer.bos_token_id(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        Ok(Vocabulary { trie, tokenizer: text.tokenizer.clone() })
    }
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode(s, false).unwrap_or_default())
    }
}
