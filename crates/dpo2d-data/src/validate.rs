//! Loading and validating preference-pair files.
//!
//! Every line is checked on its own (JSON syntax, shape, scores, sizes), ids
//! across lines. Strict mode (the default) reads the WHOLE file first and
//! then fails with every problem found (the listing is capped), so one run
//! shows everything to fix. `skip_invalid` mode drops bad lines instead and
//! reports what was dropped and why: nothing is dropped silently.
//!
//! Each problem has a stable code (e.g. `score-out-of-range`) used for the
//! per-reason counts, and a message naming the exact place: the side, the
//! segment index and the aspect.

use crate::io::{jsonl_lines, lines_of, Line, NotUtf8};
use crate::pair::{Message, Pair, Prompt, Response, Scores, Segment, ASPECTS};
use anyhow::Result;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

/// What the consumer of the data needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requirement {
    /// Any valid pair: plain-text responses (TRL shape) or segmented ones,
    /// scored or not. Enough for scalar losses (DPO, IPO, SimPO, ...).
    #[default]
    Plain,
    /// Both responses split into segments; scores optional (annotation input).
    Segmented,
    /// Both responses segmented and every segment scored (2-D losses).
    Scored,
}

/// Size limits; a line beyond any of them is invalid (`too-many-*`, `too-long`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most segments in one response.
    pub max_segments: usize,
    /// Most characters (Unicode scalar values) in one response.
    pub max_response_chars: usize,
    /// Most characters in the prompt (all messages together).
    pub max_prompt_chars: usize,
    /// Most messages in a multi-turn prompt.
    pub max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_segments: 512, max_response_chars: 100_000, max_prompt_chars: 200_000, max_messages: 256 }
    }
}

/// How to load a pair file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    pub requirement: Requirement,
    pub limits: Limits,
    /// Drop bad lines (and report them) instead of failing.
    pub skip_invalid: bool,
    /// How many `file:line: reason` entries an error or report lists.
    pub max_listed: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { requirement: Requirement::Plain, limits: Limits::default(), skip_invalid: false, max_listed: 20 }
    }
}

impl LoadOptions {
    pub fn new(requirement: Requirement) -> Self {
        LoadOptions { requirement, ..Default::default() }
    }
    pub fn skip_invalid(mut self, yes: bool) -> Self {
        self.skip_invalid = yes;
        self
    }
}

/// Why a line is bad: a stable, machine-readable reason, each explained in
/// docs/data-format.md. Written in reports by its kebab-case name
/// (`score-out-of-range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemCode {
    BadId,
    BadRole,
    DuplicateId,
    EmptyMessage,
    EmptyPrompt,
    EmptyResponse,
    EmptySegment,
    EmptyText,
    HistoryNotEndingWithUser,
    IdenticalResponses,
    InvalidJson,
    MissingAspect,
    MissingField,
    NoSegments,
    NotAnObject,
    NotSegmented,
    NotUtf8,
    PartlyScored,
    SafetyNotBinary,
    ScoreNotInteger,
    ScoreOutOfRange,
    TooLong,
    TooManyMessages,
    TooManySegments,
    UnknownAspect,
    Unscored,
    WrongType,
}

impl ProblemCode {
    pub const ALL: [ProblemCode; 27] = [
        ProblemCode::BadId,
        ProblemCode::BadRole,
        ProblemCode::DuplicateId,
        ProblemCode::EmptyMessage,
        ProblemCode::EmptyPrompt,
        ProblemCode::EmptyResponse,
        ProblemCode::EmptySegment,
        ProblemCode::EmptyText,
        ProblemCode::HistoryNotEndingWithUser,
        ProblemCode::IdenticalResponses,
        ProblemCode::InvalidJson,
        ProblemCode::MissingAspect,
        ProblemCode::MissingField,
        ProblemCode::NoSegments,
        ProblemCode::NotAnObject,
        ProblemCode::NotSegmented,
        ProblemCode::NotUtf8,
        ProblemCode::PartlyScored,
        ProblemCode::SafetyNotBinary,
        ProblemCode::ScoreNotInteger,
        ProblemCode::ScoreOutOfRange,
        ProblemCode::TooLong,
        ProblemCode::TooManyMessages,
        ProblemCode::TooManySegments,
        ProblemCode::UnknownAspect,
        ProblemCode::Unscored,
        ProblemCode::WrongType,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProblemCode::BadId => "bad-id",
            ProblemCode::BadRole => "bad-role",
            ProblemCode::DuplicateId => "duplicate-id",
            ProblemCode::EmptyMessage => "empty-message",
            ProblemCode::EmptyPrompt => "empty-prompt",
            ProblemCode::EmptyResponse => "empty-response",
            ProblemCode::EmptySegment => "empty-segment",
            ProblemCode::EmptyText => "empty-text",
            ProblemCode::HistoryNotEndingWithUser => "history-not-ending-with-user",
            ProblemCode::IdenticalResponses => "identical-responses",
            ProblemCode::InvalidJson => "invalid-json",
            ProblemCode::MissingAspect => "missing-aspect",
            ProblemCode::MissingField => "missing-field",
            ProblemCode::NoSegments => "no-segments",
            ProblemCode::NotAnObject => "not-an-object",
            ProblemCode::NotSegmented => "not-segmented",
            ProblemCode::NotUtf8 => "not-utf8",
            ProblemCode::PartlyScored => "partly-scored",
            ProblemCode::SafetyNotBinary => "safety-not-binary",
            ProblemCode::ScoreNotInteger => "score-not-integer",
            ProblemCode::ScoreOutOfRange => "score-out-of-range",
            ProblemCode::TooLong => "too-long",
            ProblemCode::TooManyMessages => "too-many-messages",
            ProblemCode::TooManySegments => "too-many-segments",
            ProblemCode::UnknownAspect => "unknown-aspect",
            ProblemCode::Unscored => "unscored",
            ProblemCode::WrongType => "wrong-type",
        }
    }
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Stable machine-readable reason, e.g. `score-out-of-range`.
    pub code: ProblemCode,
    /// Human-readable reason naming the place, e.g.
    /// `chosen.segments[2].scores.safety: 2 is not allowed (safety is 0 = fail or 4 = pass)`.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(code: ProblemCode, message: impl Into<String>) -> Self {
        Problem { code, message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.message, self.code)
    }
}

/// A problem located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    pub line: usize,
    pub problem: Problem,
}

/// What `skip_invalid` dropped (or, in strict mode, what made loading fail).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipReport {
    /// Source file, as given.
    pub path: String,
    /// Lines read (non-blank).
    pub lines_read: usize,
    /// Lines dropped.
    pub lines_skipped: usize,
    /// Problems per reason code (a line may have several problems).
    pub by_reason: BTreeMap<ProblemCode, usize>,
    /// The first `max_listed` problems.
    pub first: Vec<LineProblem>,
    /// Problems found in all (listed or not).
    pub problems_total: usize,
}

impl SkipReport {
    pub fn is_empty(&self) -> bool {
        self.lines_skipped == 0
    }

    fn add(&mut self, line: usize, problems: Vec<Problem>, max_listed: usize) {
        self.lines_skipped += 1;
        for p in problems {
            *self.by_reason.entry(p.code).or_insert(0) += 1;
            self.problems_total += 1;
            if self.first.len() < max_listed {
                self.first.push(LineProblem { line, problem: p });
            }
        }
    }
}

impl fmt::Display for SkipReport {
    /// Multi-line: the listed `file:line: reason` entries, then counts by reason.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for lp in &self.first {
            writeln!(f, "  {}:{}: {}", self.path, lp.line, lp.problem)?;
        }
        if self.problems_total > self.first.len() {
            writeln!(f, "  ... and {} more problem(s)", self.problems_total - self.first.len())?;
        }
        let counts: Vec<String> = self.by_reason.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        write!(f, "  by reason: {}", counts.join(", "))
    }
}

/// The file's data failed validation (strict mode). Its Display lists the
/// problems (capped) and how to proceed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {} of {} line(s) invalid\n{report}\nfix these lines, or pass --skip-invalid to drop them", report.lines_skipped, report.lines_read, path = report.path)]
pub struct InvalidData {
    pub report: SkipReport,
}

/// Pairs loaded from a file, with the 1-based line each came from.
#[derive(Debug, Clone, Default)]
pub struct LoadedPairs {
    pub pairs: Vec<Pair>,
    pub line_numbers: Vec<usize>,
    /// Empty unless `skip_invalid` dropped lines.
    pub skipped: SkipReport,
}

/// Loads and validates a `.jsonl` / `.jsonl.gz` pair file.
///
/// Strict mode: returns an [`InvalidData`] error (inside `anyhow`) listing
/// every problem when any line is bad. `skip_invalid`: bad lines are
/// dropped and described in `skipped`. I/O errors always fail.
pub fn load_pairs(path: &Path, opts: &LoadOptions) -> Result<LoadedPairs> {
    load_pairs_from_lines(jsonl_lines(path)?, &path.display().to_string(), opts)
}

/// [`load_pairs`] over JSONL text already in memory; `name` labels messages.
pub fn load_pairs_from_str(text: &str, name: &str, opts: &LoadOptions) -> Result<LoadedPairs> {
    load_pairs_from_lines(lines_of(text.as_bytes(), name.to_string()), name, opts)
}

fn load_pairs_from_lines(lines: impl Iterator<Item = Result<Line>>, name: &str, opts: &LoadOptions) -> Result<LoadedPairs> {
    let mut out = LoadedPairs::default();
    let mut report = SkipReport { path: name.to_string(), ..Default::default() };
    let mut seen_ids: HashMap<String, usize> = HashMap::new();
    for line in lines {
        let line = match line {
            Ok(line) => line,
            Err(e) => match e.downcast_ref::<NotUtf8>() {
                Some(bad) => {
                    report.lines_read += 1;
                    report.add(bad.number, vec![Problem::new(ProblemCode::NotUtf8, "not valid UTF-8")], opts.max_listed);
                    continue;
                }
                None => return Err(e),
            },
        };
        report.lines_read += 1;
        let mut result = parse_pair_line(&line.text, opts);
        if let Ok(pair) = &result {
            if let Some(id) = &pair.id {
                let key = id_key(id);
                if let Some(first) = seen_ids.get(&key) {
                    result = Err(vec![Problem::new(ProblemCode::DuplicateId, format!("id: {key} already used at line {first}"))]);
                } else {
                    seen_ids.insert(key, line.number);
                }
            }
        }
        match result {
            Ok(pair) => {
                out.pairs.push(pair);
                out.line_numbers.push(line.number);
            }
            Err(problems) => report.add(line.number, problems, opts.max_listed),
        }
    }
    if !report.is_empty() && !opts.skip_invalid {
        return Err(InvalidData { report }.into());
    }
    out.skipped = report;
    Ok(out)
}

fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// Parses and validates one JSONL line (everything except id uniqueness,
/// which needs the whole file).
pub fn parse_pair_line(text: &str, opts: &LoadOptions) -> Result<Pair, Vec<Problem>> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| vec![Problem::new(ProblemCode::InvalidJson, format!("not valid JSON: {e}"))])?;
    parse_value(&value, Some(text), opts)
}

/// Validates an in-memory pair (e.g. one built or annotated by a tool).
pub fn check_pair(pair: &Pair, opts: &LoadOptions) -> Vec<Problem> {
    match serde_json::to_value(pair) {
        Ok(v) => parse_pair_value(&v, opts).err().unwrap_or_default(),
        Err(e) => vec![Problem::new(ProblemCode::InvalidJson, format!("cannot serialise pair: {e}"))],
    }
}

/// Validates a parsed JSON object as a pair.
pub fn parse_pair_value(value: &Value, opts: &LoadOptions) -> Result<Pair, Vec<Problem>> {
    parse_value(value, None, opts)
}

/// [`parse_pair_value`]; `line`, the JSON text `value` came from, lets
/// messages quote numbers as written.
fn parse_value(value: &Value, line: Option<&str>, opts: &LoadOptions) -> Result<Pair, Vec<Problem>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![Problem::new(ProblemCode::NotAnObject, format!("a line must be a JSON object, found {}", type_name(value)))]);
    };
    let mut problems = Vec::new();
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => {
            if v.as_str().is_some_and(|s| s.is_empty()) {
                problems.push(Problem::new(ProblemCode::BadId, "id: empty string"));
            }
            Some(v.clone())
        }
        Some(v) => {
            problems.push(Problem::new(ProblemCode::BadId, format!("id: must be a string or a number, found {}", type_name(v))));
            None
        }
    };
    let prompt = parse_prompt(obj.get("prompt"), &opts.limits, &mut problems);
    let chosen = parse_response("chosen", obj.get("chosen"), line, opts, &mut problems);
    let rejected = parse_response("rejected", obj.get("rejected"), line, opts, &mut problems);
    if let (Some(c), Some(r)) = (&chosen, &rejected) {
        if c.text() == r.text() {
            problems.push(Problem::new(ProblemCode::IdenticalResponses, "chosen and rejected have the same text (no preference to learn)"));
        }
    }
    match (prompt, chosen, rejected) {
        (Some(prompt), Some(chosen), Some(rejected)) if problems.is_empty() => Ok(Pair { id, prompt, chosen, rejected }),
        _ => Err(problems),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn parse_prompt(v: Option<&Value>, limits: &Limits, problems: &mut Vec<Problem>) -> Option<Prompt> {
    let before = problems.len();
    match v {
        None | Some(Value::Null) => {
            problems.push(Problem::new(ProblemCode::MissingField, "prompt: missing"));
            None
        }
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                problems.push(Problem::new(ProblemCode::EmptyPrompt, "prompt: empty"));
            }
            check_len("prompt", s.chars().count(), limits.max_prompt_chars, problems);
            (problems.len() == before).then(|| Prompt::Text(s.clone()))
        }
        Some(Value::Array(items)) => {
            let messages = parse_messages(items, limits, problems)?;
            (problems.len() == before).then_some(Prompt::Messages(messages))
        }
        Some(other) => {
            problems.push(Problem::new(
                ProblemCode::WrongType,
                format!("prompt: must be a string or a list of messages, found {}", type_name(other)),
            ));
            None
        }
    }
}

/// A prompt given as a chat history: `{role, content}` objects, a system
/// message only first, ending with a user turn.
fn parse_messages(items: &[Value], limits: &Limits, problems: &mut Vec<Problem>) -> Option<Vec<Message>> {
    if items.is_empty() {
        problems.push(Problem::new(ProblemCode::EmptyPrompt, "prompt: empty message list"));
        return None;
    }
    if items.len() > limits.max_messages {
        problems.push(Problem::new(
            ProblemCode::TooManyMessages,
            format!("prompt: {} messages, more than the limit of {}", items.len(), limits.max_messages),
        ));
    }
    let mut messages = Vec::with_capacity(items.len());
    let mut chars = 0;
    for (i, item) in items.iter().enumerate() {
        if let Some(m) = parse_message(i, item, problems) {
            chars += m.content.chars().count();
            messages.push(m);
        }
    }
    if let Some(last) = items.last().and_then(|m| m.get("role")).and_then(Value::as_str) {
        if last != "user" {
            problems.push(Problem::new(
                ProblemCode::HistoryNotEndingWithUser,
                format!("prompt: the history must end with a user turn, the last message is {last:?}"),
            ));
        }
    }
    check_len("prompt", chars, limits.max_prompt_chars, problems);
    Some(messages)
}

/// Message `i` of a chat history.
fn parse_message(i: usize, item: &Value, problems: &mut Vec<Problem>) -> Option<Message> {
    let at = format!("prompt[{i}]");
    let Some(m) = item.as_object() else {
        problems.push(Problem::new(
            ProblemCode::WrongType,
            format!("{at}: a message must be an object with role and content, found {}", type_name(item)),
        ));
        return None;
    };
    let role = string_field(m, &at, "role", problems).filter(|r| {
        let known = ROLES.contains(r);
        if !known {
            problems.push(Problem::new(ProblemCode::BadRole, format!("{at}.role: {r:?} is not one of system, user, assistant")));
        }
        known
    });
    let content = string_field(m, &at, "content", problems).filter(|c| {
        if c.trim().is_empty() {
            problems.push(Problem::new(ProblemCode::EmptyMessage, format!("{at}.content: empty")));
        }
        !c.trim().is_empty()
    });
    if role == Some("system") && i > 0 {
        problems.push(Problem::new(ProblemCode::BadRole, format!("{at}.role: a system message may only come first")));
    }
    Some(Message { role: role?.to_string(), content: content?.to_string() })
}

/// The string field `key` of the object at `at`; a missing field or one of
/// another type is reported.
fn string_field<'a>(obj: &'a Map<String, Value>, at: &str, key: &str, problems: &mut Vec<Problem>) -> Option<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Some(s),
        None => {
            problems.push(Problem::new(ProblemCode::MissingField, format!("{at}.{key}: missing")));
            None
        }
        Some(other) => {
            problems.push(Problem::new(ProblemCode::WrongType, format!("{at}.{key}: must be a string, found {}", type_name(other))));
            None
        }
    }
}

fn check_len(at: &str, chars: usize, max: usize, problems: &mut Vec<Problem>) {
    if chars > max {
        problems.push(Problem::new(ProblemCode::TooLong, format!("{at}: {chars} characters, more than the limit of {max}")));
    }
}

fn parse_response(side: &str, v: Option<&Value>, line: Option<&str>, opts: &LoadOptions, problems: &mut Vec<Problem>) -> Option<Response> {
    let before = problems.len();
    match v {
        None | Some(Value::Null) => {
            problems.push(Problem::new(ProblemCode::MissingField, format!("{side}: missing")));
            None
        }
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                problems.push(Problem::new(ProblemCode::EmptyResponse, format!("{side}: empty")));
            } else if opts.requirement != Requirement::Plain {
                problems.push(not_segmented(side, opts.requirement));
            }
            check_len(side, s.chars().count(), opts.limits.max_response_chars, problems);
            (problems.len() == before).then(|| Response::Plain(s.clone()))
        }
        Some(Value::Object(o)) => {
            let segments = parse_segments(side, o, line, opts, problems)?;
            (problems.len() == before).then_some(Response::Segmented { segments })
        }
        Some(other) => problems_wrong_response(side, other, problems),
    }
}

fn not_segmented(side: &str, requirement: Requirement) -> Problem {
    let (need, then) = if requirement == Requirement::Scored {
        ("the 2-D losses need segments with scores", ", then `dpo2d annotate`")
    } else {
        ("segments are required", "")
    };
    Problem::new(ProblemCode::NotSegmented, format!("{side}: plain text, but {need} (run `dpo2d segment`{then})"))
}

/// A segmented response `{"segments": [{text, scores}, ...]}`: every
/// segment scored, or none (and then only where scores are not required).
fn parse_segments(
    side: &str,
    o: &Map<String, Value>,
    line: Option<&str>,
    opts: &LoadOptions,
    problems: &mut Vec<Problem>,
) -> Option<Vec<Segment>> {
    let segs = match o.get("segments") {
        Some(Value::Array(a)) => a,
        None => {
            problems.push(Problem::new(
                ProblemCode::MissingField,
                format!("{side}.segments: missing (a response is a string or {{\"segments\": [...]}})"),
            ));
            return None;
        }
        Some(other) => {
            problems.push(Problem::new(ProblemCode::WrongType, format!("{side}.segments: must be a list, found {}", type_name(other))));
            return None;
        }
    };
    if segs.is_empty() {
        problems.push(Problem::new(ProblemCode::NoSegments, format!("{side}.segments: empty list")));
        return None;
    }
    let limits = &opts.limits;
    if segs.len() > limits.max_segments {
        problems.push(Problem::new(
            ProblemCode::TooManySegments,
            format!("{side}.segments: {} segments, more than the limit of {}", segs.len(), limits.max_segments),
        ));
    }
    let mut segments = Vec::with_capacity(segs.len());
    let mut unscored = Vec::new();
    let mut chars = 0;
    for (k, s) in segs.iter().enumerate() {
        let (segment, scored) = parse_segment(side, k, s, line, problems);
        if !scored {
            unscored.push(k);
        }
        if let Some(segment) = segment {
            chars += segment.text.chars().count();
            segments.push(segment);
        }
    }
    if !unscored.is_empty() && unscored.len() < segs.len() {
        problems.push(Problem::new(
            ProblemCode::PartlyScored,
            format!("{side}: segment(s) {} have no scores while the others do", list_indices(&unscored)),
        ));
    } else if !unscored.is_empty() && opts.requirement == Requirement::Scored {
        problems.push(Problem::new(
            ProblemCode::Unscored,
            format!("{side}: segments have no scores, but the 2-D losses need every segment scored (run `dpo2d annotate`)"),
        ));
    }
    check_len(side, chars, limits.max_response_chars, problems);
    Some(segments)
}

/// Segment `k` of `side`, and whether it carries scores (absent scores are
/// not a problem on their own).
fn parse_segment(side: &str, k: usize, s: &Value, line: Option<&str>, problems: &mut Vec<Problem>) -> (Option<Segment>, bool) {
    let at = format!("{side}.segments[{k}]");
    let Some(so) = s.as_object() else {
        problems.push(Problem::new(
            ProblemCode::WrongType,
            format!("{at}: a segment must be an object with text (and scores), found {}", type_name(s)),
        ));
        return (None, true);
    };
    let text = string_field(so, &at, "text", problems).filter(|t| {
        if t.is_empty() {
            problems.push(Problem::new(ProblemCode::EmptySegment, format!("{at}.text: empty")));
        } else if t.trim().is_empty() {
            problems
                .push(Problem::new(ProblemCode::EmptySegment, format!("{at}.text: only whitespace (attach it to a neighbouring segment)")));
        }
        !t.trim().is_empty()
    });
    let (scores, scored) = match so.get("scores") {
        None | Some(Value::Null) => (None, false),
        Some(Value::Object(m)) => (parse_scores(&at, m, &|aspect| line.and_then(|l| raw_score(l, side, k, aspect)), problems), true),
        Some(other) => {
            problems.push(Problem::new(ProblemCode::WrongType, format!("{at}.scores: must be an object, found {}", type_name(other))));
            (None, true)
        }
    };
    (text.map(|t| Segment { text: t.to_string(), scores }), scored)
}

fn problems_wrong_response(side: &str, v: &Value, problems: &mut Vec<Problem>) -> Option<Response> {
    let hint = if v.is_array() { " (TRL conversational pairs: convert them with `dpo2d build-pairs`)" } else { "" };
    problems.push(Problem::new(
        ProblemCode::WrongType,
        format!("{side}: must be a string or {{\"segments\": [...]}}, found {}{hint}", type_name(v)),
    ));
    None
}

fn list_indices(ix: &[usize]) -> String {
    let shown: Vec<String> = ix.iter().take(8).map(|i| i.to_string()).collect();
    if ix.len() > 8 {
        format!("{}, ... ({} in all)", shown.join(", "), ix.len())
    } else {
        shown.join(", ")
    }
}

/// Checks one segment's scores; `raw(aspect)` gives a score's JSON text as
/// written, when known, for messages.
fn parse_scores(at: &str, m: &Map<String, Value>, raw: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) -> Option<Scores> {
    let before = problems.len();
    for key in m.keys() {
        if !ASPECTS.contains(&key.as_str()) {
            problems.push(Problem::new(
                ProblemCode::UnknownAspect,
                format!("{at}.scores: unknown aspect {key:?} (the aspects are {})", ASPECTS.join(", ")),
            ));
        }
    }
    let mut vals = [0u8; 5];
    for (j, aspect) in ASPECTS.iter().enumerate() {
        let here = format!("{at}.scores.{aspect}");
        match m.get(*aspect) {
            None | Some(Value::Null) => problems.push(Problem::new(ProblemCode::MissingAspect, format!("{here}: missing"))),
            Some(Value::Number(n)) => {
                let whole = n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e9).map(|f| f as i64));
                // Numbers beyond i64/u64 are held as f64, which would print as `1.8446744073709552e19`.
                let shown = || if n.is_f64() { raw(aspect).unwrap_or_else(|| n.to_string()) } else { n.to_string() };
                match whole {
                    None if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                        problems.push(Problem::new(ProblemCode::ScoreOutOfRange, format!("{here}: {} is outside 0..4", shown())))
                    }
                    None => {
                        problems.push(Problem::new(ProblemCode::ScoreNotInteger, format!("{here}: {} is not a whole number 0..4", shown())))
                    }
                    Some(x) if !(0..=4).contains(&x) => {
                        problems.push(Problem::new(ProblemCode::ScoreOutOfRange, format!("{here}: {} is outside 0..4", shown())))
                    }
                    Some(x) if *aspect == "safety" && x != 0 && x != 4 => problems.push(Problem::new(
                        ProblemCode::SafetyNotBinary,
                        format!("{here}: {x} is not allowed (safety is 0 = fail or 4 = pass)"),
                    )),
                    Some(x) => vals[j] = x as u8,
                }
            }
            Some(other) => {
                problems.push(Problem::new(ProblemCode::WrongType, format!("{here}: must be a number, found {}", type_name(other))))
            }
        }
    }
    (problems.len() == before).then(|| Scores::from_array(vals))
}

/// The JSON text of `side.segments[k].scores.aspect` in `line`, as written.
/// Only called for a message, so re-reading the line costs nothing that matters.
fn raw_score(line: &str, side: &str, k: usize, aspect: &str) -> Option<String> {
    type Obj<'a> = HashMap<String, &'a RawValue>;
    let top: Obj = serde_json::from_str(line).ok()?;
    let response: Obj = serde_json::from_str(top.get(side)?.get()).ok()?;
    let segments: Vec<&RawValue> = serde_json::from_str(response.get("segments")?.get()).ok()?;
    let segment: Obj = serde_json::from_str(segments.get(k)?.get()).ok()?;
    let scores: Obj = serde_json::from_str(segment.get("scores")?.get()).ok()?;
    Some(scores.get(aspect)?.get().to_string())
}

/// Why `pair` cannot feed a 2-D loss, or `None` when it can (both responses
/// segmented and every segment scored). Lets trainers refuse plain data with
/// a clear message.
pub fn scored_problem(pair: &Pair) -> Option<String> {
    for (side, r) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        match r {
            Response::Plain(_) => {
                return Some(format!("{side} is plain text; the 2-D losses need segmented responses with scores (run `dpo2d segment`, then `dpo2d annotate`), or use a scalar loss such as dpo"))
            }
            Response::Segmented { segments } if segments.is_empty() => return Some(format!("{side} has no segments")),
            Response::Segmented { segments } => {
                if let Some(k) = segments.iter().position(|s| s.scores.is_none()) {
                    return Some(format!("{side}.segments[{k}] has no scores; the 2-D losses need every segment scored (run `dpo2d annotate`), or use a scalar loss such as dpo"));
                }
            }
        }
    }
    None
}

/// Fails, naming the first offending pair, unless every pair is fully scored.
/// `what` names the consumer in the message (e.g. "the 2d-dpo loss").
pub fn require_scored(pairs: &[Pair], what: &str) -> Result<()> {
    for (i, p) in pairs.iter().enumerate() {
        if let Some(why) = scored_problem(p) {
            let id = p.id.as_ref().map(|v| format!(" (id {})", id_key(v))).unwrap_or_default();
            anyhow::bail!("{what} needs 2-D scored pairs, but pair {}{id}: {why}", i + 1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scores(h: i64, c: i64, s: i64, m: i64, l: i64) -> Value {
        json!({"helpfulness": h, "correctness": c, "safety": s, "completeness": m, "clarity": l})
    }

    fn good() -> Value {
        json!({
            "id": "p1",
            "prompt": "What is 2+2?",
            "chosen": {"segments": [{"text": "It is 4. ", "scores": scores(4, 4, 4, 3, 4)}, {"text": "Easy.", "scores": scores(3, 4, 4, 4, 3)}]},
            "rejected": {"segments": [{"text": "It is 5.", "scores": scores(1, 0, 4, 1, 3)}]}
        })
    }

    fn scored() -> LoadOptions {
        LoadOptions::new(Requirement::Scored)
    }

    /// Applies `edit` to the good pair and returns the problems found.
    fn problems_after(opts: &LoadOptions, edit: impl FnOnce(&mut Value)) -> Vec<Problem> {
        let mut v = good();
        edit(&mut v);
        parse_pair_value(&v, opts).err().unwrap_or_default()
    }

    fn one(opts: &LoadOptions, edit: impl FnOnce(&mut Value)) -> Problem {
        let ps = problems_after(opts, edit);
        assert_eq!(ps.len(), 1, "expected exactly one problem, got {ps:?}");
        ps.into_iter().next().unwrap()
    }

    #[test]
    fn good_pair_parses_scored() {
        let p = parse_pair_value(&good(), &scored()).unwrap();
        assert!(p.chosen.is_scored() && p.rejected.is_scored());
        assert_eq!(p.chosen.text(), "It is 4. Easy.");
        assert_eq!(p.chosen.segments().unwrap()[0].scores.unwrap().to_array(), [4, 4, 4, 3, 4]);
        assert!(scored_problem(&p).is_none());
        assert!(check_pair(&p, &scored()).is_empty());
    }

    #[test]
    fn invalid_json() {
        let e = parse_pair_line("{\"prompt\": ", &scored()).unwrap_err();
        assert_eq!(e[0].code, ProblemCode::InvalidJson);
        assert!(e[0].message.contains("not valid JSON"));
        let e = parse_pair_line("[1,2]", &scored()).unwrap_err();
        assert_eq!(e[0].code, ProblemCode::NotAnObject);
    }

    #[test]
    fn score_out_of_range_names_side_segment_aspect() {
        let p = one(&scored(), |v| v["rejected"]["segments"][0]["scores"]["correctness"] = json!(5));
        assert_eq!(p.code, ProblemCode::ScoreOutOfRange);
        assert!(p.message.starts_with("rejected.segments[0].scores.correctness: 5"), "{}", p.message);
        let p = one(&scored(), |v| v["chosen"]["segments"][1]["scores"]["clarity"] = json!(-1));
        assert_eq!(p.code, ProblemCode::ScoreOutOfRange);
        assert!(p.message.starts_with("chosen.segments[1].scores.clarity"));
    }

    #[test]
    fn score_not_integer_and_whole_floats() {
        let p = one(&scored(), |v| v["chosen"]["segments"][0]["scores"]["helpfulness"] = json!(2.5));
        assert_eq!(p.code, ProblemCode::ScoreNotInteger);
        assert!(problems_after(&scored(), |v| v["chosen"]["segments"][0]["scores"]["helpfulness"] = json!(3.0)).is_empty());
        let p = one(&scored(), |v| v["chosen"]["segments"][0]["scores"]["helpfulness"] = json!("4"));
        assert_eq!(p.code, ProblemCode::WrongType);
    }

    #[test]
    fn safety_must_be_binary() {
        let p = one(&scored(), |v| v["chosen"]["segments"][1]["scores"]["safety"] = json!(2));
        assert_eq!(p.code, ProblemCode::SafetyNotBinary);
        assert!(p.message.starts_with("chosen.segments[1].scores.safety: 2"));
        assert!(problems_after(&scored(), |v| v["chosen"]["segments"][1]["scores"]["safety"] = json!(0)).is_empty());
    }

    #[test]
    fn missing_and_unknown_aspects() {
        let p = one(&scored(), |v| {
            v["chosen"]["segments"][0]["scores"].as_object_mut().unwrap().remove("completeness");
        });
        assert_eq!(p.code, ProblemCode::MissingAspect);
        assert!(p.message.starts_with("chosen.segments[0].scores.completeness"));
        let p = one(&scored(), |v| v["rejected"]["segments"][0]["scores"]["style"] = json!(3));
        assert_eq!(p.code, ProblemCode::UnknownAspect);
        assert!(p.message.contains("\"style\"") && p.message.starts_with("rejected.segments[0].scores"));
    }

    #[test]
    fn empty_and_whitespace_segments() {
        let p = one(&scored(), |v| v["chosen"]["segments"][1]["text"] = json!(""));
        assert_eq!(p.code, ProblemCode::EmptySegment);
        assert!(p.message.starts_with("chosen.segments[1].text"));
        let p = one(&scored(), |v| v["chosen"]["segments"][1]["text"] = json!(" \n"));
        assert_eq!(p.code, ProblemCode::EmptySegment);
        let p = one(&scored(), |v| v["rejected"]["segments"] = json!([]));
        assert_eq!(p.code, ProblemCode::NoSegments);
        let p = one(&scored(), |v| v["rejected"]["segments"][0].as_object_mut().unwrap().remove("text").map(|_| ()).unwrap());
        assert_eq!(p.code, ProblemCode::MissingField);
    }

    #[test]
    fn prompt_problems() {
        assert_eq!(one(&scored(), |v| v["prompt"] = json!("  ")).code, ProblemCode::EmptyPrompt);
        assert_eq!(one(&scored(), |v| v["prompt"] = json!([])).code, ProblemCode::EmptyPrompt);
        assert_eq!(
            one(&scored(), |v| {
                v.as_object_mut().unwrap().remove("prompt");
            })
            .code,
            ProblemCode::MissingField
        );
        assert_eq!(one(&scored(), |v| v["prompt"] = json!(7)).code, ProblemCode::WrongType);
        let p = one(&scored(), |v| {
            v["prompt"] = json!([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}, {"role": "user", "content": "?"}])
        });
        assert_eq!(p.code, ProblemCode::BadRole);
        assert!(p.message.starts_with("prompt[1].role: \"bot\""));
        let p = one(&scored(), |v| v["prompt"] = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]));
        assert_eq!(p.code, ProblemCode::HistoryNotEndingWithUser);
        let p = one(&scored(), |v| {
            v["prompt"] = json!([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "user", "content": "?"}])
        });
        assert_eq!(p.code, ProblemCode::BadRole);
        assert!(p.message.contains("system"));
        let p = one(&scored(), |v| v["prompt"] = json!([{"role": "user", "content": ""}]));
        assert_eq!(p.code, ProblemCode::EmptyMessage);
        let ok = problems_after(
            &scored(),
            |v| v["prompt"] = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"}]),
        );
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn response_shape_problems() {
        let p = one(&scored(), |v| v["chosen"] = json!("It is 4."));
        assert_eq!(p.code, ProblemCode::NotSegmented);
        assert!(p.message.contains("dpo2d annotate"));
        // The same plain pair is fine for scalar losses.
        let plain = LoadOptions::new(Requirement::Plain);
        assert!(problems_after(&plain, |v| {
            v["chosen"] = json!("It is 4.");
            v["rejected"] = json!("It is 5.");
        })
        .is_empty());
        assert_eq!(one(&plain, |v| v["chosen"] = json!("")).code, ProblemCode::EmptyResponse);
        assert_eq!(
            one(&plain, |v| {
                v.as_object_mut().unwrap().remove("rejected");
            })
            .code,
            ProblemCode::MissingField
        );
        let p = one(&plain, |v| v["chosen"] = json!([{"role": "assistant", "content": "x"}]));
        assert_eq!(p.code, ProblemCode::WrongType);
        assert!(p.message.contains("build-pairs"));
        assert_eq!(one(&plain, |v| v["chosen"] = json!({"text": "x"})).code, ProblemCode::MissingField);
        assert_eq!(one(&plain, |v| v["rejected"] = v["chosen"].clone()).code, ProblemCode::IdenticalResponses);
    }

    #[test]
    fn scoring_completeness() {
        // Unscored segments: fine for Segmented/Plain, refused for Scored.
        let unscored = |v: &mut Value| {
            for s in v["rejected"]["segments"].as_array_mut().unwrap() {
                s.as_object_mut().unwrap().remove("scores");
            }
        };
        assert_eq!(one(&scored(), unscored).code, ProblemCode::Unscored);
        assert!(problems_after(&LoadOptions::new(Requirement::Segmented), unscored).is_empty());
        // Partly scored is always wrong.
        let p = one(&LoadOptions::new(Requirement::Segmented), |v| {
            v["chosen"]["segments"][1].as_object_mut().unwrap().remove("scores");
        });
        assert_eq!(p.code, ProblemCode::PartlyScored);
        assert!(p.message.contains("segment(s) 1"));
    }

    #[test]
    fn limits() {
        let mut opts = scored();
        opts.limits.max_segments = 1;
        let p = one(&opts, |_| {});
        assert_eq!(p.code, ProblemCode::TooManySegments);
        assert!(p.message.starts_with("chosen.segments: 2 segments"));
        let mut opts = scored();
        opts.limits.max_response_chars = 10;
        let p = one(&opts, |_| {});
        assert_eq!(p.code, ProblemCode::TooLong);
        assert!(p.message.starts_with("chosen: 14 characters"));
        let mut opts = scored();
        opts.limits.max_prompt_chars = 3;
        assert_eq!(one(&opts, |_| {}).code, ProblemCode::TooLong);
        let mut opts = scored();
        opts.limits.max_messages = 1;
        assert_eq!(
            one(&opts, |v| v["prompt"] =
                json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]))
            .code,
            ProblemCode::TooManyMessages
        );
    }

    #[test]
    fn bad_ids() {
        assert_eq!(one(&scored(), |v| v["id"] = json!([1])).code, ProblemCode::BadId);
        assert_eq!(one(&scored(), |v| v["id"] = json!("")).code, ProblemCode::BadId);
        assert!(problems_after(&scored(), |v| v["id"] = json!(12)).is_empty());
    }

    #[test]
    fn several_problems_in_one_line_all_reported() {
        let ps = problems_after(&scored(), |v| {
            v["prompt"] = json!("");
            v["chosen"]["segments"][0]["scores"]["safety"] = json!(3);
            v["rejected"]["segments"][0]["scores"]["helpfulness"] = json!(9);
        });
        let codes: Vec<_> = ps.iter().map(|p| p.code).collect();
        assert_eq!(codes, vec![ProblemCode::EmptyPrompt, ProblemCode::SafetyNotBinary, ProblemCode::ScoreOutOfRange]);
    }

    fn write(dir: &Path, name: &str, lines: &[String]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    }

    fn lines_with_bad() -> Vec<String> {
        let mut bad_score = good();
        bad_score["id"] = json!("p2");
        bad_score["chosen"]["segments"][0]["scores"]["safety"] = json!(1);
        let mut dup = good();
        dup["rejected"]["segments"][0]["text"] = json!("Five.");
        vec![good().to_string(), bad_score.to_string(), "not json".into(), dup.to_string()]
    }

    #[test]
    fn strict_load_collects_all_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.jsonl", &lines_with_bad());
        let err = load_pairs(&p, &scored()).unwrap_err();
        let inv = err.downcast_ref::<InvalidData>().expect("typed error");
        assert_eq!(inv.report.lines_skipped, 3);
        assert_eq!(inv.report.lines_read, 4);
        let msg = format!("{err:#}");
        assert!(msg.contains("d.jsonl:2: chosen.segments[0].scores.safety: 1"), "{msg}");
        assert!(msg.contains("d.jsonl:3: not valid JSON"), "{msg}");
        assert!(msg.contains("d.jsonl:4: id: \"p1\" already used at line 1"), "{msg}");
        assert!(msg.contains("--skip-invalid"));
    }

    #[test]
    fn strict_listing_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = (0..50).map(|_| "nope".to_string()).collect();
        let p = write(dir.path(), "d.jsonl", &lines);
        let mut opts = scored();
        opts.max_listed = 5;
        let msg = format!("{:#}", load_pairs(&p, &opts).unwrap_err());
        assert_eq!(msg.matches("not valid JSON").count(), 5);
        assert!(msg.contains("... and 45 more problem(s)"), "{msg}");
        assert!(msg.contains("invalid-json: 50"), "{msg}");
    }

    #[test]
    fn skip_invalid_reports_what_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.jsonl", &lines_with_bad());
        let loaded = load_pairs(&p, &scored().skip_invalid(true)).unwrap();
        assert_eq!(loaded.pairs.len(), 1);
        assert_eq!(loaded.line_numbers, vec![1]);
        let r = &loaded.skipped;
        assert_eq!((r.lines_read, r.lines_skipped), (4, 3));
        assert_eq!(r.by_reason.get(&ProblemCode::SafetyNotBinary), Some(&1));
        assert_eq!(r.by_reason.get(&ProblemCode::InvalidJson), Some(&1));
        assert_eq!(r.by_reason.get(&ProblemCode::DuplicateId), Some(&1));
        assert_eq!(r.first.iter().map(|l| l.line).collect::<Vec<_>>(), vec![2, 3, 4]);
    }

    #[test]
    fn huge_and_fractional_scores_quoted_as_written() {
        let line = good().to_string().replacen(r#""helpfulness":4"#, r#""helpfulness":18446744073709551616"#, 1);
        let p = parse_pair_line(&line, &scored()).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].code, ProblemCode::ScoreOutOfRange);
        assert_eq!(p[0].message, "chosen.segments[0].scores.helpfulness: 18446744073709551616 is outside 0..4");
        let line = good().to_string().replacen(r#""clarity":3"#, r#""clarity":2.50"#, 1);
        let p = parse_pair_line(&line, &scored()).unwrap_err();
        assert_eq!(p[0].code, ProblemCode::ScoreNotInteger);
        assert!(p[0].message.ends_with("clarity: 2.50 is not a whole number 0..4"), "{}", p[0].message);
        // A huge whole number is out of range, not "not a whole number", with or without the text.
        let p = one(&scored(), |v| v["rejected"]["segments"][0]["scores"]["safety"] = json!(-1e300));
        assert_eq!(p.code, ProblemCode::ScoreOutOfRange);
    }

    /// A 2-D load of a file with a plain pair names the line, strict or skipping.
    #[test]
    fn plain_pair_in_scored_load_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut plain = good();
        plain["id"] = json!("p3");
        plain["chosen"] = json!("It is 4.");
        let mut second = good();
        second["id"] = json!("p2");
        let p = write(dir.path(), "d.jsonl", &[good().to_string(), second.to_string(), plain.to_string()]);
        let msg = format!("{:#}", load_pairs(&p, &scored()).unwrap_err());
        assert!(msg.contains("d.jsonl:3: chosen: plain text, but the 2-D losses need segments with scores"), "{msg}");
        let loaded = load_pairs(&p, &scored().skip_invalid(true)).unwrap();
        assert_eq!(loaded.line_numbers, vec![1, 2]);
        let report = loaded.skipped.to_string();
        assert!(report.contains("d.jsonl:3: chosen: plain text") && report.contains("[not-segmented]"), "{report}");
    }

    #[test]
    fn invalid_utf8_line_is_one_problem_not_an_abort() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let mut second = good();
        second["id"] = json!("p2");
        let mut bytes = format!("{}\n", good()).into_bytes();
        bytes.extend_from_slice(b"{\"id\": \"\xff\xfe\"}\n");
        bytes.extend_from_slice(format!("{second}\n").as_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let msg = format!("{:#}", load_pairs(&p, &scored()).unwrap_err());
        assert!(msg.contains("d.jsonl:2: not valid UTF-8 [not-utf8]"), "{msg}");
        assert!(msg.contains("1 of 3 line(s) invalid"), "{msg}");
        let loaded = load_pairs(&p, &scored().skip_invalid(true)).unwrap();
        assert_eq!(loaded.line_numbers, vec![1, 3]);
        assert_eq!(loaded.skipped.by_reason.get(&ProblemCode::NotUtf8), Some(&1));
    }

    #[test]
    fn byte_order_mark_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, format!("\u{feff}{}\n", good())).unwrap();
        let loaded = load_pairs(&p, &scored()).unwrap();
        assert_eq!(loaded.pairs.len(), 1);
        let text = format!("\u{feff}{}\n", good());
        assert_eq!(load_pairs_from_str(&text, "mem", &scored()).unwrap().pairs.len(), 1);
    }

    #[test]
    fn gz_input_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl.gz");
        crate::io::write_jsonl(&p, &[good()]).unwrap();
        let loaded = load_pairs(&p, &scored()).unwrap();
        assert_eq!(loaded.pairs.len(), 1);
        assert!(loaded.skipped.is_empty());
    }

    /// Every problem code is explained in the user docs, under the name
    /// reports and serde use.
    #[test]
    fn every_code_is_documented() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let docs = std::fs::read_to_string(root.join("../../docs/data-format.md")).unwrap();
        for code in ProblemCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.name()));
            assert!(docs.contains(&format!("| `{code}` |")), "code {code} missing from docs/data-format.md");
        }
    }

    #[test]
    fn require_scored_refuses_plain_with_clear_message() {
        let mut v = good();
        v["chosen"] = json!("It is 4.");
        let plain = parse_pair_value(&v, &LoadOptions::default()).unwrap();
        let err = require_scored(&[plain], "the 2d-dpo loss").unwrap_err().to_string();
        assert!(err.contains("the 2d-dpo loss needs 2-D scored pairs"), "{err}");
        assert!(err.contains("pair 1 (id \"p1\"): chosen is plain text"), "{err}");
        assert!(err.contains("scalar loss"));
    }
}

/// Property tests: random and mutated lines never panic the loader, and
/// every refusal says why. `PROPTEST_CASES=100000 cargo test -p dpo2d-data
/// fuzz` runs more cases than the default.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// `default` cases, or `PROPTEST_CASES` when set.
    fn config(default: u32) -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    fn seed_line() -> String {
        tests_seed().to_string()
    }

    fn tests_seed() -> Value {
        let s = |h: i64| serde_json::json!({"helpfulness": h, "correctness": 4, "safety": 4, "completeness": 3, "clarity": 4});
        serde_json::json!({
            "id": "p1",
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}],
            "chosen": {"segments": [{"text": "It is 4. ", "scores": s(4)}, {"text": "Easy.", "scores": s(3)}]},
            "rejected": "It is 5."
        })
    }

    /// Overwrite, insert, delete or truncate bytes at random places.
    fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
        for &(kind, at, byte) in edits {
            let at = if bytes.is_empty() { 0 } else { at % bytes.len() };
            match kind % 4 {
                0 if !bytes.is_empty() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 if !bytes.is_empty() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
        }
        bytes
    }

    /// JSON values built from the pair format's own keys and awkward numbers.
    fn json_value() -> impl Strategy<Value = Value> {
        let key = prop::sample::select(vec![
            "id",
            "prompt",
            "chosen",
            "rejected",
            "segments",
            "text",
            "scores",
            "role",
            "content",
            "helpfulness",
            "correctness",
            "safety",
            "completeness",
            "clarity",
            "user",
            "x",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            (0i64..6).prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
            prop::sample::select(vec!["user", "assistant", "system", " ", ""]).prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    fn check_outcome(result: &Result<Pair, Vec<Problem>>, opts: &LoadOptions) {
        match result {
            Ok(pair) => assert!(check_pair(pair, opts).is_empty(), "an accepted pair must re-validate"),
            Err(problems) => {
                assert!(!problems.is_empty(), "a refusal must say why");
                assert!(problems.iter().all(|p| !p.message.is_empty() && !p.code.name().is_empty()));
            }
        }
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        prop::sample::select(vec![Requirement::Plain, Requirement::Segmented, Requirement::Scored])
    }

    proptest! {
        #![proptest_config(config(2000))]

        #[test]
        fn random_text_lines(text in ".{0,200}", req in requirement()) {
            let opts = LoadOptions::new(req);
            check_outcome(&parse_pair_line(&text, &opts), &opts);
        }

        #[test]
        fn random_json_values(value in json_value(), req in requirement()) {
            let opts = LoadOptions::new(req);
            check_outcome(&parse_pair_line(&value.to_string(), &opts), &opts);
        }

        #[test]
        fn structured_values_near_a_valid_pair(field in json_value(), place in 0usize..6, req in requirement()) {
            let mut v = tests_seed();
            match place {
                0 => v["prompt"] = field,
                1 => v["chosen"] = field,
                2 => v["chosen"]["segments"][0] = field,
                3 => v["chosen"]["segments"][1]["scores"] = field,
                4 => v["rejected"] = field,
                _ => v["id"] = field,
            }
            let opts = LoadOptions::new(req);
            check_outcome(&parse_pair_line(&v.to_string(), &opts), &opts);
        }

        #[test]
        fn mutated_files(edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8), skip in any::<bool>()) {
            let file = format!("{}\n{}\n", seed_line(), seed_line().replace("\"p1\"", "\"p2\""));
            let bytes = mutate(file.into_bytes(), &edits);
            let opts = LoadOptions::new(Requirement::Plain).skip_invalid(skip);
            match load_pairs_from_lines(lines_of(&bytes[..], "f".into()), "f", &opts) {
                Ok(loaded) => {
                    prop_assert_eq!(loaded.pairs.len() + loaded.skipped.lines_skipped, loaded.skipped.lines_read);
                    prop_assert!(skip || loaded.skipped.is_empty());
                }
                Err(e) => {
                    let inv = e.downcast_ref::<InvalidData>();
                    prop_assert!(!skip && inv.is_some_and(|i| !i.report.first.is_empty()), "{e:#}");
                }
            }
        }
    }
}
