//! The OpenAI chat completions wire format: what a request may hold, what
//! an answer and a streamed chunk look like, and the error object.

use crate::constraint::Format;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dpo2d_model::chat::Message;
use dpo2d_model::generate::FinishReason;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `POST /v1/chat/completions`. Fields dpo2d cannot honour (tools, function
/// calls, logit biases, penalties) are refused by
/// [`ChatRequest::check_supported`] rather than silently ignored; unknown
/// fields are ignored, as OpenAI does.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<Value>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub logit_bias: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
}

/// Most alternatives a token's `top_logprobs` may list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Content,
}

/// A message's content: a string, or a list of parts of which only text is read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
    Null(()),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl ChatRequest {
    pub fn check_supported(&self) -> Result<(), ApiError> {
        let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null() && v != &json!({}) && v != &json!([]));
        for (name, v) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if given(v) {
                return Err(ApiError::invalid(&format!("{name}: tool and function calls are not supported by this server"), Some(name)));
            }
        }
        if given(&self.logit_bias) {
            return Err(ApiError::invalid("logit_bias is not supported by this server", Some("logit_bias")));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if v.is_some_and(|x| x != 0.0) {
                return Err(ApiError::invalid(&format!("{name} is not supported by this server (only 0)"), Some(name)));
            }
        }
        match self.top_logprobs {
            Some(n) if n > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid(
                    &format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
                    Some("top_logprobs"),
                ))
            }
            Some(_) if self.logprobs != Some(true) => {
                return Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs")))
            }
            _ => {}
        }
        Ok(())
    }

    /// What `response_format` asks for; a malformed one is a 400 that names the problem.
    pub fn format(&self) -> Result<Format, ApiError> {
        Format::parse(self.response_format.as_ref()).map_err(|m| ApiError::invalid(&m, Some("response_format")))
    }

    /// `Some(alternatives)` when the answer must carry log-probabilities.
    pub fn logprobs(&self) -> Option<usize> {
        (self.logprobs == Some(true)).then(|| self.top_logprobs.unwrap_or(0) as usize)
    }

    /// The conversation as chat-template messages (`developer` is read as `system`).
    pub fn chat_messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty", Some("messages")));
        }
        self.messages
            .iter()
            .map(|m| {
                let role = match m.role.as_str() {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    other => return Err(ApiError::invalid(&format!("unsupported message role {other:?}"), Some("messages"))),
                };
                let content = match &m.content {
                    Content::Text(s) => s.clone(),
                    Content::Null(()) => String::new(),
                    Content::Parts(parts) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                (k, _) => {
                                    return Err(ApiError::invalid(
                                        &format!("content part of type {k:?} is not supported (text only)"),
                                        Some("messages"),
                                    ))
                                }
                            }
                        }
                        s
                    }
                };
                Ok(Message::new(role, content))
            })
            .collect()
    }

    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }
}

/// OpenAI's name for why a choice ended.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// One finished choice of a non-streamed answer.
#[derive(Debug, Clone)]
pub struct Choice {
    pub text: String,
    pub finish: FinishReason,
    /// OpenAI's `logprobs` object of the choice, when asked for.
    pub logprobs: Option<Value>,
}

/// A token as OpenAI's log-probability entries show it: its text and bytes.
pub fn token_entry(text: &str, logprob: f32) -> Value {
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

/// OpenAI's `logprobs` object: `{"content": [entry + top_logprobs], "refusal": null}`.
pub fn logprobs_object(entries: Vec<Value>) -> Value {
    json!({"content": entries, "refusal": null})
}

/// A whole `chat.completion` object.
pub fn completion_body(id: &str, created: u64, model: &str, choices: &[Choice], usage: Usage) -> Value {
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": c.logprobs,
                "finish_reason": finish_reason(c.finish),
            })
        })
        .collect();
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
        "usage": usage,
    })
}

/// One `chat.completion.chunk` with a single choice (`delta` and its `logprobs` as given).
pub fn chunk_body(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<FinishReason>,
) -> Value {
    let choice = json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish.map(finish_reason)});
    chunk(id, created, model, vec![choice], None)
}

/// The final usage chunk asked for with `stream_options.include_usage`.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: Usage) -> Value {
    chunk(id, created, model, vec![], Some(usage))
}

fn chunk(id: &str, created: u64, model: &str, choices: Vec<Value>, usage: Option<Usage>) -> Value {
    let mut v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint(),
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = json!(u);
    }
    v
}

fn fingerprint() -> String {
    format!("dpo2d-{}", env!("CARGO_PKG_VERSION"))
}

/// An error answered in OpenAI's shape: `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: &str, param: Option<&'static str>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.to_string(), kind: "invalid_request_error", param, code: None }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(status: StatusCode, kind: &'static str, message: &str) -> Self {
        ApiError { status, message: message.to_string(), kind, param: None, code: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn reads_string_and_part_contents_and_maps_developer() {
        let r = req(json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ]}));
        let m = r.chat_messages().unwrap();
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("system", "be brief"));
        assert_eq!(m[1].content, "hi there");
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let r = req(json!({"messages": [{"role": "tool", "content": "x"}]}));
        assert!(r.chat_messages().is_err());
        let r = req(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}));
        assert!(r.chat_messages().is_err());
        let r = req(json!({"messages": [], "response_format": {"type": "json_schema"}}));
        let e = r.format().unwrap_err();
        assert!(e.message.contains("response_format.json_schema must be an object"), "{}", e.message);
        assert_eq!(e.param, Some("response_format"));
        let e = req(json!({"messages": [], "response_format": {"type": "xml"}})).format().unwrap_err();
        assert!(e.message.contains("\"xml\" is not supported"), "{}", e.message);
        assert_eq!(req(json!({"messages": [], "response_format": {"type": "text"}})).format().unwrap(), Format::Text);
        assert_eq!(
            req(json!({"messages": [], "response_format": {"type": "json_object"}})).format().unwrap(),
            Format::Json(json!({"type": "object"}))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let f = req(
            json!({"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
        );
        assert_eq!(f.format().unwrap(), Format::Json(schema));
        for (field, v) in [
            ("tools", json!([{"type": "function"}])),
            ("tool_choice", json!("required")),
            ("functions", json!([{"name": "f"}])),
            ("logit_bias", json!({"5": 10})),
            ("presence_penalty", json!(0.5)),
        ] {
            let mut body = json!({"messages": []});
            body[field] = v;
            let e = req(body).check_supported().unwrap_err();
            assert_eq!(e.param, Some(field), "{}", e.message);
        }
        assert!(req(json!({"messages": [], "frequency_penalty": 0, "logit_bias": {}})).check_supported().is_ok());
        assert!(req(json!({"messages": [], "top_logprobs": 3})).check_supported().is_err());
        assert!(req(json!({"messages": [], "logprobs": true, "top_logprobs": 21})).check_supported().is_err());
        let lp = req(json!({"messages": [], "logprobs": true, "top_logprobs": 5}));
        assert!(lp.check_supported().is_ok());
        assert_eq!(lp.logprobs(), Some(5));
        assert!(req(json!({"messages": []})).chat_messages().is_err());
    }

    #[test]
    fn stop_takes_a_string_or_a_list() {
        assert_eq!(req(json!({"messages": [], "stop": "x"})).stop_strings(), vec!["x"]);
        assert_eq!(req(json!({"messages": [], "stop": ["a", "b"]})).stop_strings(), vec!["a", "b"]);
        assert!(req(json!({"messages": []})).stop_strings().is_empty());
    }
}
