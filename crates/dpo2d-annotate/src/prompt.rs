//! The judge prompts: one request per (pair, aspect), showing the history and
//! both responses with every segment tagged `<ID>...</ID>`, the aspect's
//! rubric, and a strict line format that `parse` reads back.

use crate::expectation::{RatingFrom, TOP_LOGPROBS};
use dpo2d_data::{Message, Pair, Segment};
use serde::Serialize;

/// The five aspects, in the order of `dpo2d_data::ASPECTS` and of score vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Aspect {
    Helpfulness,
    Correctness,
    Safety,
    Completeness,
    Clarity,
}

impl Aspect {
    pub const ALL: [Aspect; 5] = [Aspect::Helpfulness, Aspect::Correctness, Aspect::Safety, Aspect::Completeness, Aspect::Clarity];

    /// Position in score vectors (`Scores::to_array`).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in the data format and on the command line.
    pub fn name(self) -> &'static str {
        dpo2d_data::ASPECTS[self.index()]
    }

    /// The ratings the aspect takes: 0 (fail) or 4 (pass) for safety, else 0..=4.
    pub fn scale(self) -> &'static [u8] {
        if self == Aspect::Safety {
            &[0, 4]
        } else {
            &[0, 1, 2, 3, 4]
        }
    }

    pub fn parse(s: &str) -> Option<Aspect> {
        let s = s.trim().to_ascii_lowercase();
        Aspect::ALL.into_iter().find(|a| a.name() == s)
    }

    /// What the judge is asked to look at, and what each score level means.
    fn rubric(self) -> &'static str {
        match self {
            Aspect::Helpfulness => {
                "\
HELPFULNESS: how much this sentence helps the user get what they actually asked for, \
read in the context of the conversation and of the sentences before it.
4 = directly serves the user's request; exactly what was wanted.
3 = useful and on target, though it could be sharper or more specific.
2 = somewhat useful, but partly off the point or only loosely tied to the request.
1 = of little use; mostly misses what the user wanted, with a small useful part.
0 = no use at all, or works against what the user asked for."
            }
            Aspect::Correctness => {
                "\
CORRECTNESS: whether what the sentence states is true, both about the world and with respect \
to the earlier conversation (no invented facts, wrong numbers, broken code or contradictions).
4 = fully accurate; nothing false, misleading or made up.
3 = accurate in substance; at most a tiny imprecision that misleads no one.
2 = a mix of right and wrong, or a noticeable imprecision or small invention.
1 = mostly wrong or misleading, with some correct elements.
0 = entirely wrong, false or fabricated.
A sentence that states no facts (a greeting, a transition) is judged on whether it misleads; if it does not, rate it 4."
            }
            Aspect::Safety => {
                "\
SAFETY: a pass/fail check. Only two ratings are allowed: 4 or 0.
4 = pass: the sentence contains nothing harmful.
0 = fail: the sentence contains hateful, harassing, sexually explicit or violent content, \
helps with illegal or dangerous acts, encourages harm to anyone's physical or mental health, \
uses profanity, or promotes bias or stereotypes about groups of people.
Never answer 1, 2 or 3 for this aspect."
            }
            Aspect::Completeness => {
                "\
COMPLETENESS, judged CUMULATIVELY: rate how completely the response has fulfilled the user's request \
UP TO AND INCLUDING this sentence (everything from the response's start to here), not the sentence alone.
4 = so far, the request is fully answered; nothing needed is missing.
3 = so far, nearly complete; only minor parts remain.
2 = so far, about half of what was asked is covered.
1 = so far, only a small part of the request is addressed.
0 = so far, nothing relevant to the request has been provided.
Because the text only grows, a response's completeness rating must never go down from one sentence \
to the next within the same response: each rating is at least the previous one."
            }
            Aspect::Clarity => {
                "\
CLARITY and CONCISENESS: how clear, unambiguous and succinct the sentence is, given what came before it. \
Repeating earlier content, padding, rambling or contradicting earlier sentences lowers the rating, \
so redundancy late in a long response should be rated lower.
4 = perfectly clear and concise; nothing redundant.
3 = clear, with at most slight wordiness or a minor ambiguity.
2 = understandable with effort, or noticeably wordy or repetitive.
1 = unclear, ambiguous, or largely redundant.
0 = confusing, contradictory, or almost entirely repetition or filler."
            }
        }
    }
}

/// An OpenAI-compatible chat-completions request body. Field order is fixed,
/// so the serialised body (and its cache key) is deterministic.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Structured outputs: the answer must match this JSON schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormatSpec>,
    /// Ask for each token's log-probability (`--judge-rating-from`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
}

impl ChatRequest {
    /// Asks for log-probabilities when ratings are read from them.
    pub fn with_logprobs(mut self, from: RatingFrom) -> Self {
        if from.asks_logprobs() {
            self.logprobs = Some(true);
            self.top_logprobs = Some(TOP_LOGPROBS);
        }
        self
    }
}

/// How the judge is asked to write its answer (`--response-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseFormat {
    /// A JSON schema while the server takes one; free text from the first
    /// time it rejects `response_format` to the end of the run.
    #[default]
    Auto,
    /// Always a JSON schema; a server that rejects it stops the run.
    JsonSchema,
    /// Always free text (`[ID] evaluation => rating: N` lines).
    FreeText,
}

/// `max_tokens` when none is given: room for one short evaluation per
/// segment, so a judge that loops is cut off (and repaired) long before the
/// request times out.
pub fn default_max_tokens(n_segments: usize) -> u32 {
    (64 + 48 * n_segments).clamp(256, 4096) as u32
}

/// The `response_format` of a structured-output request: a list of
/// `{id, evaluation, rating}` items, one per ID, the rating limited to the
/// aspect's scale. Typed rather than a `serde_json::Value` so the item's
/// properties keep their order: constrained decoders generate them in schema
/// order, and the judge should evaluate before it rates.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseFormatSpec {
    #[serde(rename = "type")]
    kind: &'static str,
    json_schema: NamedSchema,
}

#[derive(Debug, Clone, Serialize)]
struct NamedSchema {
    name: &'static str,
    strict: bool,
    schema: Schema,
}

/// The segment ratings' schema, typed (its key order is part of every
/// cached request), or any other.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum Schema {
    Ratings(ObjectSchema<RatingsProperties>),
    Any(serde_json::Value),
}

#[derive(Debug, Clone, Serialize)]
struct ObjectSchema<P> {
    #[serde(rename = "type")]
    kind: &'static str,
    properties: P,
    required: Vec<&'static str>,
    #[serde(rename = "additionalProperties")]
    additional_properties: bool,
}

#[derive(Debug, Clone, Serialize)]
struct RatingsProperties {
    ratings: ArraySchema,
}

#[derive(Debug, Clone, Serialize)]
struct ArraySchema {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "minItems")]
    min_items: usize,
    #[serde(rename = "maxItems")]
    max_items: usize,
    items: ObjectSchema<ItemProperties>,
}

#[derive(Debug, Clone, Serialize)]
struct ItemProperties {
    id: IntegerEnum,
    evaluation: StringSchema,
    rating: IntegerEnum,
}

/// `{"enum": [...], "type": "integer"}`. Typed, in this key order, so that
/// a request's bytes (and so its cache key) never depend on how a JSON
/// library orders keys.
#[derive(Debug, Clone, Serialize)]
struct IntegerEnum {
    #[serde(rename = "enum")]
    values: Vec<u32>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct StringSchema {
    #[serde(rename = "type")]
    kind: &'static str,
}

impl ResponseFormatSpec {
    pub fn for_answer(tags: &Tagging, aspect: Aspect) -> Self {
        let scale = aspect.scale();
        let ids: Vec<u32> = tags.all_ids().collect();
        let item = ObjectSchema {
            kind: "object",
            properties: ItemProperties {
                id: IntegerEnum { values: ids.clone(), kind: "integer" },
                evaluation: StringSchema { kind: "string" },
                rating: IntegerEnum { values: scale.iter().map(|&v| u32::from(v)).collect(), kind: "integer" },
            },
            required: vec!["id", "evaluation", "rating"],
            additional_properties: false,
        };
        let ratings = ArraySchema { kind: "array", min_items: ids.len(), max_items: ids.len(), items: item };
        let schema = ObjectSchema {
            kind: "object",
            properties: RatingsProperties { ratings },
            required: vec!["ratings"],
            additional_properties: false,
        };
        ResponseFormatSpec {
            kind: "json_schema",
            json_schema: NamedSchema { name: "segment_ratings", strict: true, schema: Schema::Ratings(schema) },
        }
    }

    /// A strict JSON schema of another kind of answer (evaluation's grades and verdicts).
    pub fn json_schema(name: &'static str, schema: serde_json::Value) -> Self {
        ResponseFormatSpec { kind: "json_schema", json_schema: NamedSchema { name, strict: true, schema: Schema::Any(schema) } }
    }
}

/// The tagged segments of one pair: IDs 1..=n for the chosen response, then
/// n+1..=n+m for the rejected one, so every ID is unique within a request.
#[derive(Debug, Clone)]
pub struct Tagging {
    pub first_ids: Vec<u32>,
    pub second_ids: Vec<u32>,
}

impl Tagging {
    pub fn new(n_chosen: usize, n_rejected: usize) -> Self {
        let first_ids = (1..=n_chosen as u32).collect();
        let second_ids = (n_chosen as u32 + 1..=(n_chosen + n_rejected) as u32).collect();
        Tagging { first_ids, second_ids }
    }

    pub fn all_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.first_ids.iter().chain(&self.second_ids).copied()
    }

    pub fn len(&self) -> usize {
        self.first_ids.len() + self.second_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes a response with each segment wrapped in `<ID>...</ID>`; the
/// segment's surrounding whitespace stays outside the tags so the layout
/// (paragraphs, list items) reads as in the original.
fn tag_response(out: &mut String, segments: &[Segment], ids: &[u32]) {
    for (seg, id) in segments.iter().zip(ids) {
        let text = seg.text.as_str();
        let trimmed_start = text.trim_start();
        let lead = &text[..text.len() - trimmed_start.len()];
        let core = trimmed_start.trim_end();
        let trail = &trimmed_start[core.len()..];
        out.push_str(lead);
        out.push_str(&format!("<{id}>{core}</{id}>"));
        out.push_str(trail);
    }
}

fn render_history(out: &mut String, messages: &[Message]) {
    for m in messages {
        out.push_str(&format!("[{}]\n{}\n\n", m.role, m.content.trim_end()));
    }
}

/// The main prompt for one aspect of one pair. `chosen`/`rejected` are the
/// segment lists (plain responses must be segmented before); `structured`
/// asks for the JSON answer of [`ResponseFormatSpec`] instead of lines.
pub fn build_prompt(pair: &Pair, chosen: &[Segment], rejected: &[Segment], aspect: Aspect, structured: bool) -> String {
    let tags = Tagging::new(chosen.len(), rejected.len());
    let mut p = String::with_capacity(4096);
    p.push_str(&format!("Aspect to rate: {}\n\n", aspect.name()));
    p.push_str(
        "You are a careful annotator. Below are a conversation and two candidate replies from an AI assistant \
(Response A and Response B). Every sentence of both replies has been wrapped in numbered tags of the form \
<N>sentence text</N>, where N is the sentence ID; the IDs are unique across the two replies. Rate EVERY tagged sentence on the \
single aspect described below, using only the integer scale 0 to 4. Judge each sentence in the context of \
the conversation and of the sentences that precede it in its own reply; rate the two replies independently \
of each other, and ignore every aspect other than this one.\n\n",
    );
    p.push_str("=== Rubric ===\n");
    p.push_str(aspect.rubric());
    p.push_str("\n\n=== Conversation so far ===\n");
    render_history(&mut p, &pair.prompt.messages());
    p.push_str("=== Response A ===\n");
    tag_response(&mut p, chosen, &tags.first_ids);
    p.push_str("\n\n=== Response B ===\n");
    tag_response(&mut p, rejected, &tags.second_ids);
    p.push_str("\n\n=== Answer format ===\n");
    p.push_str(&answer_format(&tags, aspect, structured));
    p
}

/// The format instructions, shared by the main prompt and the repair prompt.
fn answer_format(tags: &Tagging, aspect: Aspect, structured: bool) -> String {
    let n = tags.len();
    let allowed = if aspect == Aspect::Safety { "4 or 0" } else { "an integer from 0 to 4" };
    let (a, b) = (tags.first_ids.len(), tags.first_ids.len() + 1);
    let cover = format!("covering every ID from 1 to {n} (IDs 1-{a} are in Response A, IDs {b}-{n} in Response B)");
    if structured {
        return format!(
            "Answer with one JSON object whose \"ratings\" list holds one item per sentence ID, in increasing ID order, \
{cover}. Each item has this form:\n\
{{\"id\": ID, \"evaluation\": \"<a short evaluation, one sentence>\", \"rating\": N}}\n\
where N is {allowed}. For example:\n\
{{\"ratings\": [{{\"id\": 1, \"evaluation\": \"Answers the question directly.\", \"rating\": 4}}, \
{{\"id\": 2, \"evaluation\": \"Repeats the previous sentence.\", \"rating\": 2}}]}}\n\
Do not skip any ID and do not merge IDs."
        );
    }
    format!(
        "Write exactly one line per sentence ID, in increasing ID order, {cover}. Each line has this form:\n\
[ID] <a short evaluation, one sentence> => rating: N\n\
where N is {allowed}. For example:\n\
[1] Answers the question directly. => rating: 4\n\
[2] Repeats the previous sentence. => rating: 2\n\
Do not skip any ID, do not merge IDs, and write nothing after the last line."
    )
}

/// The follow-up message sent once when an answer lacked IDs or had invalid
/// ratings: it names every problem and restates the format.
pub fn build_repair(tags: &Tagging, aspect: Aspect, problems: &[String], structured: bool) -> String {
    let mut p = String::from("Your answer could not be used as it is:\n");
    for pr in problems {
        p.push_str("- ");
        p.push_str(pr);
        p.push('\n');
    }
    p.push_str("\nPlease answer again for ALL sentence IDs, following the format strictly.\n");
    p.push_str(&answer_format(tags, aspect, structured));
    p
}

pub fn user(content: String) -> Message {
    Message { role: "user".into(), content }
}

pub fn assistant(content: String) -> Message {
    Message { role: "assistant".into(), content }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpo2d_data::{Prompt, Response};

    fn seg(t: &str) -> Segment {
        Segment { text: t.into(), scores: None }
    }

    #[test]
    fn ids_are_unique_across_responses_and_layout_is_kept() {
        let chosen = vec![seg("Paris is the capital."), seg(" It is in France.\n\n")];
        let rejected = vec![seg("Lyon."), seg("\n- a list item")];
        let pair = Pair {
            id: None,
            prompt: Prompt::Text("Capital of France?".into()),
            chosen: Response::Segmented { segments: chosen.clone() },
            rejected: Response::Segmented { segments: rejected.clone() },
        };
        let p = build_prompt(&pair, &chosen, &rejected, Aspect::Completeness, false);
        assert!(p.starts_with("Aspect to rate: completeness\n"));
        assert!(p.contains("<1>Paris is the capital.</1> <2>It is in France.</2>\n\n"));
        assert!(p.contains("<3>Lyon.</3>\n- <4>a list item</4>") || p.contains("<3>Lyon.</3>\n<4>- a list item</4>"));
        assert!(p.contains("[user]\nCapital of France?"));
        assert!(p.contains("every ID from 1 to 4"));
        assert!(p.contains("CUMULATIVELY"));
        let s = build_prompt(&pair, &chosen, &rejected, Aspect::Safety, false);
        assert!(s.contains("4 or 0"));
        let j = build_prompt(&pair, &chosen, &rejected, Aspect::Safety, true);
        assert!(j.contains("\"ratings\" list") && j.contains("every ID from 1 to 4") && !j.contains("=> rating"));
    }

    #[test]
    fn aspect_names_round_trip() {
        for a in Aspect::ALL {
            assert_eq!(Aspect::parse(a.name()), Some(a));
        }
        assert_eq!(Aspect::parse("Safety "), Some(Aspect::Safety));
        assert_eq!(Aspect::parse("style"), None);
    }

    /// The schema's bytes are part of every cached request's key: they must
    /// not change with a JSON library's key order (or anything else).
    #[test]
    fn the_ratings_schema_keeps_its_bytes() {
        let spec = serde_json::to_string(&ResponseFormatSpec::for_answer(&Tagging::new(2, 2), Aspect::Helpfulness)).unwrap();
        assert_eq!(
            spec,
            r#"{"type":"json_schema","json_schema":{"name":"segment_ratings","strict":true,"schema":{"type":"object","properties":{"ratings":{"type":"array","minItems":4,"maxItems":4,"items":{"type":"object","properties":{"id":{"enum":[1,2,3,4],"type":"integer"},"evaluation":{"type":"string"},"rating":{"enum":[0,1,2,3,4],"type":"integer"}},"required":["id","evaluation","rating"],"additionalProperties":false}}},"required":["ratings"],"additionalProperties":false}}}"#
        );
    }

    #[test]
    fn schema_constrains_ids_and_the_aspect_scale_in_order() {
        let tags = Tagging::new(2, 1);
        let v = serde_json::to_value(ResponseFormatSpec::for_answer(&tags, Aspect::Safety)).unwrap();
        assert_eq!(v["type"], "json_schema");
        let list = &v["json_schema"]["schema"]["properties"]["ratings"];
        assert_eq!((list["minItems"].as_u64(), list["maxItems"].as_u64()), (Some(3), Some(3)));
        assert_eq!(list["items"]["properties"]["id"]["enum"], serde_json::json!([1, 2, 3]));
        assert_eq!(list["items"]["properties"]["rating"]["enum"], serde_json::json!([0, 4]));
        let v = serde_json::to_value(ResponseFormatSpec::for_answer(&tags, Aspect::Clarity)).unwrap();
        assert_eq!(
            v["json_schema"]["schema"]["properties"]["ratings"]["items"]["properties"]["rating"]["enum"],
            serde_json::json!([0, 1, 2, 3, 4])
        );
        // The serialised properties come in the order the judge should write them.
        let text = serde_json::to_string(&ResponseFormatSpec::for_answer(&tags, Aspect::Clarity)).unwrap();
        let (i, e, r) = (text.find("\"id\":{").unwrap(), text.find("\"evaluation\":{").unwrap(), text.find("\"rating\":{").unwrap());
        assert!(i < e && e < r, "{text}");
        assert_eq!(default_max_tokens(2), 256);
        assert_eq!(default_max_tokens(20), 64 + 48 * 20);
        assert_eq!(default_max_tokens(1000), 4096);
    }
}
