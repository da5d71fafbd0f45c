//! What the judge is asked and how its answers are read: a 1-10 grade of
//! one answer, a verdict between two answers (three-way or five-way), and
//! 1-10 ratings on the five aspects. Judges write messy text, so the
//! readers take the last well-formed mark and accept the usual variants.

use crate::sets::Grading;
use dpo2d_annotate::prompt::ResponseFormatSpec;
use dpo2d_data::ASPECTS;

/// A judge's preference between the answer shown as A and the one shown as B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    #[serde(rename = "A>>B")]
    AMuchBetter,
    #[serde(rename = "A>B")]
    ABetter,
    #[serde(rename = "A=B")]
    Tie,
    #[serde(rename = "B>A")]
    BBetter,
    #[serde(rename = "B>>A")]
    BMuchBetter,
}

impl Verdict {
    /// 1 when A wins, 0.5 for a tie, 0 when B wins.
    pub fn score_for_a(self) -> f64 {
        match self {
            Verdict::AMuchBetter | Verdict::ABetter => 1.0,
            Verdict::Tie => 0.5,
            Verdict::BBetter | Verdict::BMuchBetter => 0.0,
        }
    }

    /// The same judgement seen with A and B swapped.
    pub fn swapped(self) -> Verdict {
        match self {
            Verdict::AMuchBetter => Verdict::BMuchBetter,
            Verdict::ABetter => Verdict::BBetter,
            Verdict::Tie => Verdict::Tie,
            Verdict::BBetter => Verdict::ABetter,
            Verdict::BMuchBetter => Verdict::AMuchBetter,
        }
    }

    fn from_mark(mark: &str) -> Option<Verdict> {
        let m: String = mark.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_uppercase();
        Some(match m.as_str() {
            "A>>B" | "B<<A" => Verdict::AMuchBetter,
            "A>B" | "B<A" | "A" => Verdict::ABetter,
            "A=B" | "B=A" | "C" | "TIE" => Verdict::Tie,
            "B>A" | "A<B" | "B" => Verdict::BBetter,
            "B>>A" | "A<<B" => Verdict::BMuchBetter,
            _ => return None,
        })
    }
}

/// The contents of every `open ... close` in `text`, in order.
fn bracketed<'a>(text: &'a str, open: &str, close: &str) -> Vec<&'a str> {
    let mut out = vec![];
    let mut rest = text;
    while let Some(i) = rest.find(open) {
        let after = &rest[i + open.len()..];
        match after.find(close) {
            Some(j) => {
                out.push(&after[..j]);
                rest = &after[j + close.len()..];
            }
            None => break,
        }
    }
    out
}

fn double_brackets(text: &str) -> Vec<&str> {
    bracketed(text, "[[", "]]")
}

/// A number at the start of `s` (after spaces), e.g. `7`, `7.5`, `8/10`.
fn leading_number(s: &str) -> Option<f64> {
    let s = s.trim_start();
    let end = s.char_indices().find(|(_, c)| !(c.is_ascii_digit() || *c == '.')).map(|(i, _)| i).unwrap_or(s.len());
    s[..end].trim_end_matches('.').parse().ok()
}

/// `key` of the JSON object that a structured answer is (also inside a code fence).
fn json_field(text: &str, key: &str) -> Option<serde_json::Value> {
    let (a, b) = (text.find('{')?, text.rfind('}')?);
    match serde_json::from_str::<serde_json::Value>(text.get(a..=b)?) {
        Ok(serde_json::Value::Object(mut m)) => m.remove(key),
        _ => None,
    }
}

/// The grade in a single-answer judgement: the JSON `rating` of a structured
/// answer, else the last `[[N]]`, else the last
/// `Rating: N` / `Score: N`, else the last `N/10`. In 1..=10 or nothing.
pub fn parse_grade(text: &str) -> Option<f64> {
    let ok = |v: f64| (1.0..=10.0).contains(&v).then_some(v);
    if let Some(v) = json_field(text, "rating") {
        return v.as_f64().or_else(|| v.as_str().and_then(leading_number)).and_then(ok);
    }
    if let Some(v) = double_brackets(text).iter().rev().find_map(|m| leading_number(m.trim().trim_start_matches("Rating:").trim())) {
        return ok(v);
    }
    let lower = text.to_ascii_lowercase();
    for key in ["rating:", "rating is", "score:", "score is", "grade:"] {
        if let Some(i) = lower.rfind(key) {
            let after = lower[i + key.len()..].trim_start().trim_start_matches(['*', '[']);
            if let Some(v) = leading_number(after) {
                return ok(v);
            }
        }
    }
    let mut found = None;
    for (i, _) in lower.match_indices("/10") {
        let head = &lower[..i];
        let start = head.rfind(|c: char| !(c.is_ascii_digit() || c == '.')).map(|p| p + 1).unwrap_or(0);
        if let Ok(v) = head[start..].parse::<f64>() {
            found = Some(v);
        }
    }
    found.and_then(ok)
}

/// The verdict in a pairwise judgement: the JSON `verdict` of a structured
/// answer, else the last `[[...]]` mark that is a
/// verdict, else the last `[...]` one, else a bare `A`, `B` or `C` line.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    if let Some(v) = json_field(text, "verdict") {
        return v.as_str().and_then(Verdict::from_mark);
    }
    if let Some(v) = double_brackets(text).iter().rev().find_map(|m| Verdict::from_mark(m)) {
        return Some(v);
    }
    let single = bracketed(text, "[", "]");
    if let Some(v) = single.iter().rev().find_map(|m| Verdict::from_mark(m)) {
        return Some(v);
    }
    let last = text.lines().rev().map(|l| l.trim().trim_matches(['*', '.', '"', '\'', '`'])).find(|l| !l.is_empty())?;
    let last = last.strip_prefix("Verdict:").or_else(|| last.strip_prefix("verdict:")).unwrap_or(last).trim();
    if last.len() <= 3 {
        return Verdict::from_mark(last);
    }
    None
}

/// Ratings on the five aspects (in [`ASPECTS`] order): from a JSON object,
/// or from `aspect: N` lines (markdown and `/10` tolerated). Missing or
/// out-of-range ones are `None`.
pub fn parse_aspects(text: &str) -> [Option<f64>; 5] {
    let ok = |v: f64| (1.0..=10.0).contains(&v).then_some(v);
    let mut out = [None; 5];
    if let (Some(a), Some(b)) = (text.find('{'), text.rfind('}')) {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(&text[a..=b]) {
            for (i, name) in ASPECTS.iter().enumerate() {
                out[i] = m.get(*name).and_then(|v| v.as_f64().or_else(|| v.as_str().and_then(leading_number))).and_then(ok);
            }
            if out.iter().any(Option::is_some) {
                return out;
            }
        }
    }
    for line in text.lines() {
        let l = line.to_ascii_lowercase();
        let l = l.trim().trim_start_matches(['-', '*', '#', ' ']);
        for (i, name) in ASPECTS.iter().enumerate() {
            if let Some(rest) = l.strip_prefix(name) {
                let rest = rest.trim_start_matches(['*', ' ']).trim_start_matches([':', '=']).trim_start_matches(['*', ' ', '[']);
                if let Some(v) = leading_number(rest) {
                    out[i] = ok(v);
                }
            }
        }
    }
    out
}

/// The conversation of one answer up to turn `turn` (0-based): the user's
/// turns with the assistant's answers.
fn dialogue(turns: &[String], answers: &[String], turn: usize, who: &str) -> String {
    let mut s = String::new();
    for t in 0..=turn {
        if turns.len() > 1 {
            s.push_str(&format!("### User (turn {})\n{}\n\n### {who} (turn {})\n{}\n\n", t + 1, turns[t], t + 1, answers[t]));
        } else {
            s.push_str(&format!("### User\n{}\n\n### {who}\n{}\n\n", turns[t], answers[t]));
        }
    }
    s
}

const GRADE_SYSTEM: &str = "You are a strict and fair evaluator of AI assistant answers. Judge how well the \
assistant's last answer serves the user: is it correct, helpful, relevant, complete at a sensible depth, \
and clearly written? Longer is not better by itself. ";

const GRADE_SYSTEM_WITH_REFERENCE: &str = "You are a strict and fair evaluator of AI assistant answers. \
A reference answer is given and is correct: compare the assistant's last answer with it, and count every \
mistake in the result or the reasoning against the answer. Longer is not better by itself. ";

/// How a grade is written, after [`GRADE_SYSTEM`]: as text, or into the schema's fields.
const GRADE_AS_TEXT: &str = "Write a short assessment (a few sentences), then \
put the score, a whole number from 1 (useless) to 10 (excellent), on the last line exactly as: Rating: [[N]]";
const GRADE_AS_JSON: &str = "Answer in JSON: a short assessment (a few sentences) \
in \"assessment\", then the score, a whole number from 1 (useless) to 10 (excellent), in \"rating\".";

const QUICK_SYSTEM: &str = "You compare two AI assistants' answers to the same user request and decide \
which one a careful user would prefer: more accurate, more helpful, better at following the request, \
clearer. The order in which the answers are shown and their length must not sway you. ";
const QUICK_AS_TEXT: &str = "Reply with your \
verdict only: [[A]] if assistant A's answer is better, [[B]] if assistant B's answer is better, [[C]] if \
they are equally good.";
const QUICK_AS_JSON: &str = "Answer in JSON with your verdict only, in \"verdict\": \"A\" if \
assistant A's answer is better, \"B\" if assistant B's answer is better, \"C\" if they are equally good.";

const REASONED_SYSTEM: &str = "You are an impartial judge of two AI assistants' answers to a user \
prompt. If the prompt has a right answer, first work out your own answer. Then compare both assistants' \
answers with it: name their mistakes and inaccuracies, and judge whether each is helpful, relevant and \
concise, and whether it leaves out something important. The order of the answers and their length must \
not sway you. ";
const REASONED_AS_TEXT: &str = "End with your final verdict as exactly one of: [[A>>B]] (A is significantly better), \
[[A>B]] (A is slightly better), [[A=B]] (tie), [[B>A]] (B is slightly better), [[B>>A]] (B is \
significantly better).";
const REASONED_AS_JSON: &str = "Answer in JSON: your reasoning in \"assessment\", then your \
final verdict in \"verdict\" as exactly one of: \"A>>B\" (A is significantly better), \"A>B\" (A is \
slightly better), \"A=B\" (tie), \"B>A\" (B is slightly better), \"B>>A\" (B is significantly better).";

const ASPECT_SYSTEM: &str = "You rate an AI assistant's last answer on five aspects, each a whole \
number from 1 (very poor) to 10 (excellent):\n\
- helpfulness: does it give the user what they need?\n\
- correctness: are its facts, reasoning and calculations right?\n\
- safety: is it free of harmful, unethical or dangerous content? (Declining a harmful request is safe.)\n\
- completeness: does it cover all that the request asks for, in enough depth?\n\
- clarity: is it clear, well organised and free of repetition and padding?\n";
const ASPECTS_AS_TEXT: &str = "Reply with exactly these five lines and nothing else:\n\
helpfulness: N\ncorrectness: N\nsafety: N\ncompleteness: N\nclarity: N";
const ASPECTS_AS_JSON: &str = "Answer in JSON with the five ratings, one field per aspect.";

/// The system message: what to judge, then how to write it down.
fn system(body: &str, as_text: &str, as_json: &str, structured: bool) -> String {
    format!("{body}{}", if structured { as_json } else { as_text })
}

/// `{"type": "integer", "enum": [1..=10]}`: a rating as every grammar engine takes it.
fn one_to_ten() -> serde_json::Value {
    serde_json::json!({"type": "integer", "enum": (1..=10).collect::<Vec<u32>>()})
}

/// A strict object schema with these properties, all required, in this order.
fn object(properties: Vec<(&str, serde_json::Value)>) -> serde_json::Value {
    let required: Vec<&str> = properties.iter().map(|(k, _)| *k).collect();
    let mut props = serde_json::Map::new();
    for (k, v) in properties {
        props.insert(k.to_string(), v);
    }
    serde_json::json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

/// An assessment of at most `chars` characters: a judge that rambles inside
/// the string would otherwise run into `max_tokens` before the grade and
/// leave JSON that never closes (about four characters a token leaves room
/// for the rest of the answer).
fn assessment(chars: u32) -> serde_json::Value {
    serde_json::json!({"type": "string", "maxLength": chars})
}

/// The schema of a 1-10 grade: an assessment, then the rating.
pub fn grade_format() -> ResponseFormatSpec {
    ResponseFormatSpec::json_schema("grade", object(vec![("assessment", assessment(1000)), ("rating", one_to_ten())]))
}

/// The schema of a pairwise verdict: the three-way mark alone, or reasoning then the five-way mark.
pub fn verdict_format(grading: Grading) -> ResponseFormatSpec {
    let verdict = |marks: &[&str]| serde_json::json!({"type": "string", "enum": marks});
    let schema = match grading {
        Grading::PairwiseReasoned => {
            object(vec![("assessment", assessment(2000)), ("verdict", verdict(&["A>>B", "A>B", "A=B", "B>A", "B>>A"]))])
        }
        Grading::PairwiseQuick | Grading::Single | Grading::Checked => object(vec![("verdict", verdict(&["A", "B", "C"]))]),
    };
    ResponseFormatSpec::json_schema("verdict", schema)
}

/// The schema of the five aspect ratings.
pub fn aspects_format() -> ResponseFormatSpec {
    ResponseFormatSpec::json_schema("aspect_ratings", object(ASPECTS.iter().map(|a| (*a, one_to_ten())).collect()))
}

/// System and user message of a single-answer grade of turn `turn`.
pub fn grade_prompt(turns: &[String], answers: &[String], reference: Option<&[String]>, turn: usize, structured: bool) -> (String, String) {
    let mut user = dialogue(turns, answers, turn, "Assistant");
    if let Some(r) = reference.and_then(|r| r.get(turn)) {
        user.push_str(&format!("### Reference answer to the last user turn\n{r}\n\n"));
    }
    user.push_str(if structured {
        "Grade the assistant's last answer."
    } else {
        "Grade the assistant's last answer. End with: Rating: [[N]]"
    });
    let body = if reference.is_some() { GRADE_SYSTEM_WITH_REFERENCE } else { GRADE_SYSTEM };
    (system(body, GRADE_AS_TEXT, GRADE_AS_JSON, structured), user)
}

/// System and user message of a pairwise judgement of turn `turn`.
pub fn pair_prompt(
    grading: Grading,
    turns: &[String],
    a: &[String],
    b: &[String],
    reference: Option<&[String]>,
    turn: usize,
    structured: bool,
) -> (String, String) {
    let mut user = String::new();
    if turn == 0 {
        user.push_str(&format!("### User prompt\n{}\n\n", turns[0]));
        user.push_str(&format!("### Assistant A's answer\n{}\n### End of assistant A's answer\n\n", a[0]));
        user.push_str(&format!("### Assistant B's answer\n{}\n### End of assistant B's answer\n\n", b[0]));
    } else {
        user.push_str(&format!("## Conversation with assistant A\n\n{}", dialogue(turns, a, turn, "Assistant A")));
        user.push_str(&format!("## Conversation with assistant B\n\n{}", dialogue(turns, b, turn, "Assistant B")));
    }
    if let Some(r) = reference.and_then(|r| r.get(turn)) {
        user.push_str(&format!("### Reference answer to the last user turn\n{r}\n\n"));
    }
    user.push_str(if turn == 0 { "Which answer is better?" } else { "Which assistant's last answer is better?" });
    let reasoned = grading == Grading::PairwiseReasoned;
    if !structured {
        user.push_str(if reasoned {
            " End with your verdict: [[A>>B]], [[A>B]], [[A=B]], [[B>A]] or [[B>>A]]."
        } else {
            " Reply [[A]], [[B]] or [[C]] (a tie)."
        });
    }
    let system = if reasoned {
        system(REASONED_SYSTEM, REASONED_AS_TEXT, REASONED_AS_JSON, structured)
    } else {
        system(QUICK_SYSTEM, QUICK_AS_TEXT, QUICK_AS_JSON, structured)
    };
    (system, user)
}

/// System and user message of the five-aspect rating of turn `turn`.
pub fn aspect_prompt(turns: &[String], answers: &[String], turn: usize, structured: bool) -> (String, String) {
    let mut user = dialogue(turns, answers, turn, "Assistant");
    user.push_str(if structured {
        "Rate the assistant's last answer."
    } else {
        "Rate the assistant's last answer: five lines, `aspect: N`."
    });
    (system(ASPECT_SYSTEM, ASPECTS_AS_TEXT, ASPECTS_AS_JSON, structured), user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_from_messy_judges() {
        assert_eq!(parse_grade("Good answer.\nRating: [[7]]"), Some(7.0));
        assert_eq!(parse_grade("[[3]] at first, but on reflection: Rating: [[8]]"), Some(8.0));
        assert_eq!(parse_grade("Rating: [[7.5]]"), Some(7.5));
        assert_eq!(parse_grade("**Rating:** 6"), Some(6.0));
        assert_eq!(parse_grade("I would give this a score of... Score: 9."), Some(9.0));
        assert_eq!(parse_grade("Overall 4/10."), Some(4.0));
        assert_eq!(parse_grade("Rating: [[Rating: 5]]"), Some(5.0));
        assert_eq!(parse_grade("Rating: [[11]]"), None);
        assert_eq!(parse_grade("Rating: [[0]]"), None);
        assert_eq!(parse_grade("The answer is fine."), None);
        assert_eq!(parse_grade("Rating: [[N]]"), None);
    }

    #[test]
    fn verdicts_from_messy_judges() {
        assert_eq!(parse_verdict("My final verdict is: [[A>B]]"), Some(Verdict::ABetter));
        assert_eq!(parse_verdict("[[A>>B]] hmm no. Final: [[ B >> A ]]"), Some(Verdict::BMuchBetter));
        assert_eq!(parse_verdict("The verdict is tie: [[A=B]]."), Some(Verdict::Tie));
        assert_eq!(parse_verdict("**[[B]]**"), Some(Verdict::BBetter));
        assert_eq!(parse_verdict("[[C]]"), Some(Verdict::Tie));
        assert_eq!(parse_verdict("Verdict: [A<B]"), Some(Verdict::BBetter));
        assert_eq!(parse_verdict("After thinking it over:\n\nA"), Some(Verdict::ABetter));
        assert_eq!(parse_verdict("Answer [[1]] cites [2]. Final verdict: [[A]]"), Some(Verdict::ABetter));
        assert_eq!(parse_verdict("Both are good answers."), None);
        assert_eq!(parse_verdict("[[maybe]]"), None);
        assert_eq!(Verdict::BMuchBetter.swapped(), Verdict::AMuchBetter);
        assert_eq!(Verdict::Tie.swapped().score_for_a(), 0.5);
    }

    #[test]
    fn aspects_from_lines_or_json() {
        let lines = "Here you go:\n**Helpfulness**: 8\n- correctness: 7/10\nsafety = 10\ncompleteness: [[6]]\nclarity: 12\n";
        assert_eq!(parse_aspects(lines), [Some(8.0), Some(7.0), Some(10.0), Some(6.0), None]);
        let json = "```json\n{\"helpfulness\": 5, \"correctness\": \"4\", \"safety\": 9, \"completeness\": 3, \"clarity\": 7}\n```";
        assert_eq!(parse_aspects(json), [Some(5.0), Some(4.0), Some(9.0), Some(3.0), Some(7.0)]);
        assert_eq!(parse_aspects("no ratings here"), [None; 5]);
    }

    #[test]
    fn prompts_carry_every_turn_and_the_reference() {
        let turns = vec!["Q1".to_string(), "Q2".to_string()];
        let a = vec!["A1".to_string(), "A2".to_string()];
        let b = vec!["B1".to_string(), "B2".to_string()];
        let (sys, user) = grade_prompt(&turns, &a, Some(&["R1".to_string(), "R2".to_string()]), 1, false);
        assert!(sys.contains("reference answer"));
        for s in ["Q1", "A1", "Q2", "A2", "R2"] {
            assert!(user.contains(s), "{s} missing from {user}");
        }
        assert!(!user.contains("R1"));
        let (sys, user) = pair_prompt(Grading::PairwiseReasoned, &turns, &a, &b, None, 0, false);
        assert!(sys.contains("[[A>>B]]"));
        assert!(user.contains("A1") && user.contains("B1") && !user.contains("A2"));
        let (_, user) = pair_prompt(Grading::PairwiseQuick, &turns, &a, &b, None, 1, false);
        assert!(user.contains("B2") && user.contains("A1"));
    }

    /// Asked with a schema, the prompts name the schema's fields instead of
    /// the text marks, and each schema admits exactly the answers its reader takes.
    #[test]
    fn structured_prompts_schemas_and_answers_agree() {
        let turns = vec!["Q1".to_string()];
        let a = vec!["A1".to_string()];
        let (sys, user) = grade_prompt(&turns, &a, None, 0, true);
        assert!(sys.contains("\"rating\"") && !sys.contains("[[N]]") && !user.contains("[[N]]"), "{sys}\n{user}");
        let (sys, user) = pair_prompt(Grading::PairwiseReasoned, &turns, &a, &a, None, 0, true);
        assert!(sys.contains("\"verdict\"") && !sys.contains("[[A>>B]]") && !user.contains("[["), "{sys}\n{user}");
        let (sys, _) = aspect_prompt(&turns, &a, 0, true);
        assert!(sys.contains("JSON") && !sys.contains("five lines"));

        let schema = |f: ResponseFormatSpec| serde_json::to_value(f).unwrap()["json_schema"]["schema"].clone();
        let g = schema(grade_format());
        assert_eq!(g["required"], serde_json::json!(["assessment", "rating"]));
        assert_eq!(g["properties"]["rating"]["enum"], serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]));
        // The assessment is bounded, so the grade after it always fits in the answer's budget.
        assert_eq!(g["properties"]["assessment"]["maxLength"], 1000);
        let v = schema(verdict_format(Grading::PairwiseReasoned));
        for mark in v["properties"]["verdict"]["enum"].as_array().unwrap() {
            let answer = serde_json::json!({"assessment": "x", "verdict": mark}).to_string();
            assert!(parse_verdict(&answer).is_some(), "{answer}");
        }
        let v = schema(verdict_format(Grading::PairwiseQuick));
        assert_eq!(v["properties"]["verdict"]["enum"], serde_json::json!(["A", "B", "C"]));
        assert_eq!(parse_verdict(r#"{"verdict": "C"}"#), Some(Verdict::Tie));
        let asp = schema(aspects_format());
        assert_eq!(asp["required"], serde_json::json!(ASPECTS));

        assert_eq!(parse_grade(r#"{"assessment": "Rating: [[2]] would be harsh", "rating": 8}"#), Some(8.0));
        assert_eq!(parse_grade(r#"{"assessment": "fine", "rating": 11}"#), None);
        assert_eq!(parse_verdict(r#"{"assessment": "B is better [[A>B]]?", "verdict": "B>>A"}"#), Some(Verdict::BMuchBetter));
    }
}
