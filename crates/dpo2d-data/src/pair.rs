//! The 2-D preference pair: a prompt, a chosen and a rejected response, each
//! response optionally split into segments scored on five aspects.
//! `docs/data-format.md` is the user-facing description of this format.

use serde::{Deserialize, Serialize};

/// The five aspects, in the fixed order used by score vectors and weights `W`.
pub const ASPECTS: [&str; 5] = ["helpfulness", "correctness", "safety", "completeness", "clarity"];

/// One segment's scores, 0..=4 each (safety is 0 = fail or 4 = pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scores {
    pub helpfulness: u8,
    pub correctness: u8,
    pub safety: u8,
    pub completeness: u8,
    pub clarity: u8,
}

impl Scores {
    /// Scores in `ASPECTS` order.
    pub fn to_array(self) -> [u8; 5] {
        [self.helpfulness, self.correctness, self.safety, self.completeness, self.clarity]
    }

    pub fn from_array(a: [u8; 5]) -> Self {
        Scores { helpfulness: a[0], correctness: a[1], safety: a[2], completeness: a[3], clarity: a[4] }
    }
}

/// A sentence-like piece of a response. `text` keeps its surrounding
/// whitespace so that the segments of a response concatenate to it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Scores>,
}

/// A response: plain text (TRL shape) or a list of segments (2-D shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Plain(String),
    Segmented { segments: Vec<Segment> },
}

impl Response {
    /// The full response text (segments concatenated).
    pub fn text(&self) -> String {
        match self {
            Response::Plain(t) => t.clone(),
            Response::Segmented { segments } => segments.iter().map(|s| s.text.as_str()).collect(),
        }
    }

    /// Segments, or `None` for a plain response.
    pub fn segments(&self) -> Option<&[Segment]> {
        match self {
            Response::Plain(_) => None,
            Response::Segmented { segments } => Some(segments),
        }
    }

    /// True when every segment carries scores (what the 2-D losses need).
    pub fn is_scored(&self) -> bool {
        matches!(self, Response::Segmented { segments } if !segments.is_empty() && segments.iter().all(|s| s.scores.is_some()))
    }
}

/// One chat message, as in Hugging Face chat templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The prompt: a single user turn as text, or a multi-turn history that ends
/// where the assistant's answer begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

impl Prompt {
    /// The prompt as chat messages (a text prompt becomes one user message).
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Prompt::Text(t) => vec![Message { role: "user".into(), content: t.clone() }],
            Prompt::Messages(m) => m.clone(),
        }
    }
}

/// One preference pair, one JSONL line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    pub prompt: Prompt,
    pub chosen: Response,
    pub rejected: Response,
}

impl Pair {
    /// True when both responses are segmented with every segment scored:
    /// usable by the 2-D losses (see `validate::scored_problem` for why not).
    pub fn is_scored(&self) -> bool {
        self.chosen.is_scored() && self.rejected.is_scored()
    }
}
