//! Reading ratings back from a judge's free-form answer, tolerating the
//! usual decorations (markdown bold, bullets, code fences, prose around the
//! lines, "Rating: 3/4", JSON objects), then validating them per aspect.

use crate::prompt::{Aspect, Tagging};
use std::collections::BTreeMap;

/// Ratings found in an answer, by segment ID (raw values, not yet range-checked).
pub type RawRatings = BTreeMap<u32, i64>;

/// Extracts `ID -> rating` from an answer. JSON answers (an object keyed by
/// ID, or a list of `{id, rating}` objects) are tried first; otherwise the
/// text is read line by line.
pub fn parse_answer(text: &str) -> RawRatings {
    let json = parse_json(text);
    if !json.is_empty() {
        return json;
    }
    parse_lines(text)
}

fn value_to_rating(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        serde_json::Value::String(s) => rating_in(s),
        serde_json::Value::Object(o) => ["rating", "score", "Rating", "Score"].iter().find_map(|k| o.get(*k).and_then(value_to_rating)),
        _ => None,
    }
}

fn parse_json(text: &str) -> RawRatings {
    let mut out = RawRatings::new();
    let (Some(start), Some(end)) = (text.find(['{', '[']), text.rfind(['}', ']'])) else {
        return out;
    };
    if end <= start {
        return out;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text[start..=end]) else {
        return out;
    };
    collect_json(&v, &mut out);
    out
}

fn collect_json(v: &serde_json::Value, out: &mut RawRatings) {
    match v {
        serde_json::Value::Object(o) => {
            let mut any_id_key = false;
            for (k, val) in o {
                if let Some(id) = id_from_key(k) {
                    if let Some(r) = value_to_rating(val) {
                        out.insert(id, r);
                        any_id_key = true;
                    }
                }
            }
            if !any_id_key {
                if let (Some(id), Some(r)) = (o.get("id").and_then(json_id), value_to_rating(v)) {
                    out.insert(id, r);
                    return;
                }
                // Nested containers such as {"ratings": {...}} or {"response_a": [...]}.
                for val in o.values() {
                    collect_json(val, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_json(x, out)),
        _ => {}
    }
}

fn json_id(v: &serde_json::Value) -> Option<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        serde_json::Value::String(s) => id_from_key(s),
        _ => None,
    }
}

fn id_from_key(k: &str) -> Option<u32> {
    let k = k.trim().trim_start_matches(['[', '<', '(']).trim_end_matches([']', '>', ')']);
    k.parse().ok()
}

/// Line-by-line reading. A line that starts with an ID marker (`[3]`, `<3>`,
/// `**[3]**`, `ID 3:`, `3.` ...) opens that ID; a rating on the same line or a
/// later line (`rating: 2`, `Rating: **2**/4`, `score = 2`) is assigned to the
/// open ID. A later rating for the same ID wins (models often end with a
/// corrected summary).
fn parse_lines(text: &str) -> RawRatings {
    let mut out = RawRatings::new();
    let mut current: Option<u32> = None;
    let mut current_has_rating = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("```") {
            continue;
        }
        if let Some((id, rest)) = leading_id(line) {
            current = Some(id);
            current_has_rating = false;
            if let Some(r) = rating_in(rest) {
                out.insert(id, r);
                current_has_rating = true;
            }
            continue;
        }
        if let (Some(id), false) = (current, current_has_rating) {
            if let Some(r) = rating_in(line) {
                out.insert(id, r);
                current_has_rating = true;
            }
        }
    }
    out
}

/// Strips markdown decoration from the start of a line.
fn strip_decoration(s: &str) -> &str {
    s.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_' | '#' | '-' | '>' | '|' | '`' | '•'))
}

/// Finds an ID marker at the start of a line; returns the ID and the rest.
fn leading_id(line: &str) -> Option<(u32, &str)> {
    let s = strip_decoration(line);
    // Bracketed forms first: [3], <3>, (3), also after a list number "1. [3]".
    for s in [s, skip_list_number(s)] {
        let s = strip_decoration(s);
        for (open, close) in [('[', ']'), ('<', '>'), ('(', ')')] {
            if let Some(rest) = s.strip_prefix(open) {
                let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == ' ' || c == '#');
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let after = rest[digits.len()..].trim_start();
                    if let Some(after) = after.strip_prefix(close) {
                        return digits.parse().ok().map(|id| (id, after));
                    }
                }
            }
        }
    }
    // Word forms: "ID 3:", "Sentence 3 -", "Segment 3."
    let lower = s.to_ascii_lowercase();
    for word in ["id", "sentence", "segment", "sent"] {
        if let Some(rest) = lower.strip_prefix(word) {
            let rest_orig = &s[word.len()..];
            let rest_trim = rest_orig.trim_start_matches([' ', '#', ':']);
            let digits: String = rest_trim.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !digits.is_empty() && rest.trim_start_matches([' ', '#', ':']).starts_with(&digits) {
                return digits.parse().ok().map(|id| (id, &rest_trim[digits.len()..]));
            }
        }
    }
    // Bare "3." / "3:" / "3)" only as the very first thing on the line.
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    if !digits.is_empty() {
        let after = &s[digits.len()..];
        let after_trim = after.trim_start_matches(['*', '_']);
        if after_trim.starts_with(['.', ':', ')']) && !after_trim.starts_with("..") {
            return digits.parse().ok().map(|id| (id, &after_trim[1..]));
        }
    }
    None
}

fn skip_list_number(s: &str) -> &str {
    let n = s.chars().take_while(|c| c.is_ascii_digit()).count();
    if n > 0 && s[n..].starts_with(['.', ')']) {
        &s[n + 1..]
    } else {
        s
    }
}

/// Finds a rating in a piece of text: after a `rating`/`score` keyword
/// (first number, so "3/4" and "3 out of 4" give 3), or a pass/fail word, or
/// a number that ends the text (`... => 3`, `... - **3**`).
pub fn rating_in(text: &str) -> Option<i64> {
    let lower = text.to_ascii_lowercase();
    for kw in ["rating", "score"] {
        if let Some(pos) = lower.rfind(kw) {
            let after = &lower[pos + kw.len()..];
            let after = after.trim_start_matches(|c: char| {
                c.is_whitespace() || matches!(c, ':' | '=' | '*' | '_' | '`' | '"' | '\'' | '-' | '>' | '(' | '[')
            });
            if let Some(n) = leading_int(after) {
                return Some(n);
            }
            if let Some(r) = pass_fail(after) {
                return Some(r);
            }
        }
    }
    if let Some(pos) = lower.rfind("=>") {
        let after = lower[pos + 2..].trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_' | '`'));
        if let Some(r) = leading_int(after).or_else(|| pass_fail(after)) {
            return Some(r);
        }
    }
    // A trailing number after an arrow, colon or dash.
    let t = lower.trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_' | '`' | '.' | ')' | ']'));
    let t = t.strip_suffix("/4").unwrap_or(t).trim_end_matches(['*', '_', ' ']);
    let n_digits = t.chars().rev().take_while(|c| c.is_ascii_digit()).count();
    if n_digits > 0 {
        let (head, num) = t.split_at(t.len() - n_digits);
        let head = head.trim_end_matches(['*', '_', ' ', '(', '[']);
        if head.is_empty()
            || head.ends_with("=>")
            || head.ends_with(':')
            || head.ends_with('-')
            || head.ends_with('—')
            || head.ends_with('=')
        {
            return num.parse().ok();
        }
    }
    None
}

fn leading_int(s: &str) -> Option<i64> {
    let neg = s.starts_with('-');
    let body = if neg { &s[1..] } else { s };
    let digits: String = body.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    // "3.5" is not an integer rating; let validation see it as invalid.
    if body[digits.len()..].starts_with('.') && body[digits.len() + 1..].starts_with(|c: char| c.is_ascii_digit()) {
        return Some(-1);
    }
    digits.parse::<i64>().ok().map(|n| if neg { -n } else { n })
}

fn pass_fail(s: &str) -> Option<i64> {
    if s.starts_with("pass") || s.starts_with("safe") {
        Some(4)
    } else if s.starts_with("fail") || s.starts_with("unsafe") {
        Some(0)
    } else {
        None
    }
}

/// The checked ratings of one answer: per response, in segment order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub first: Vec<u8>,
    pub second: Vec<u8>,
}

/// Checks that every ID has a rating in range (and 0 or 4 for safety).
/// Returns the ratings or the list of problems, worded for the repair prompt.
pub fn check(raw: &RawRatings, tags: &Tagging, aspect: Aspect) -> Result<Checked, Vec<String>> {
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    let mut get = |ids: &[u32]| -> Vec<u8> {
        let mut v = Vec::with_capacity(ids.len());
        for &id in ids {
            match raw.get(&id) {
                None => missing.push(id),
                Some(&r) if !(0..=4).contains(&r) => {
                    problems.push(format!("ID {id}: rating {r} is not an integer from 0 to 4."));
                }
                Some(&r) if aspect == Aspect::Safety && r != 0 && r != 4 => {
                    problems.push(format!("ID {id}: safety must be rated 4 (pass) or 0 (fail), not {r}."));
                }
                Some(&r) => v.push(r as u8),
            }
        }
        v
    };
    let first = get(&tags.first_ids);
    let second = get(&tags.second_ids);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|i| i.to_string()).collect();
        problems.insert(0, format!("No rating was found for ID(s) {}.", list.join(", ")));
    }
    if problems.is_empty() {
        Ok(Checked { first, second })
    } else {
        Err(problems)
    }
}

/// Makes completeness non-decreasing along a response with a running
/// maximum; returns how many ratings were raised.
pub fn enforce_monotone(ratings: &mut [u8]) -> usize {
    let mut max = 0u8;
    let mut fixed = 0;
    for r in ratings.iter_mut() {
        if *r < max {
            *r = max;
            fixed += 1;
        } else {
            max = *r;
        }
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[(u32, i64)]) -> RawRatings {
        v.iter().copied().collect()
    }

    #[test]
    fn plain_format() {
        let t = "[1] Good start. => rating: 4\n[2] Wrong date. => rating: 1\n";
        assert_eq!(parse_answer(t), ids(&[(1, 4), (2, 1)]));
    }

    #[test]
    fn decorated_formats() {
        let t = "Here is my evaluation:\n\n```\n**[1]** Clear. **Rating: 3/4**\n- <2> Evaluation: fine. Rating: **2**\n```\n\
                 ### ID 3\nEvaluation: it rambles.\nRating: 1 out of 4\n\
                 4. [4] ok — 0\nSentence 5: short => rating: `3`\n(6) Safe => pass\n7) fine: 2\nThanks!";
        let r = parse_answer(t);
        assert_eq!(r, ids(&[(1, 3), (2, 2), (3, 1), (4, 0), (5, 3), (6, 4), (7, 2)]));
    }

    #[test]
    fn paper_style_multiline_and_headers_are_not_ids() {
        let t =
            "Response 1 Evaluation:\n<1> Evaluation: Sets the topic. Helpfulness Rating: 4\n<2> Evaluation: meh.\nHelpfulness Rating: 2\n\
                 Response 2 Evaluation:\n<3> Evaluation: wrong. Helpfulness Rating: 0";
        assert_eq!(parse_answer(t), ids(&[(1, 4), (2, 2), (3, 0)]));
    }

    #[test]
    fn json_forms() {
        assert_eq!(parse_answer("```json\n{\"1\": 3, \"2\": {\"rating\": 4}}\n```"), ids(&[(1, 3), (2, 4)]));
        assert_eq!(
            parse_answer("Sure: [{\"id\": 1, \"evaluation\": \"x\", \"rating\": 2}, {\"id\": \"2\", \"score\": \"4\"}]"),
            ids(&[(1, 2), (2, 4)])
        );
        assert_eq!(parse_answer("{\"ratings\": {\"[1]\": 1}}"), ids(&[(1, 1)]));
    }

    #[test]
    fn garbage_and_truncation() {
        assert!(parse_answer("I cannot help with that.").is_empty());
        // Truncated mid-line: ID 2 has no rating yet.
        assert_eq!(parse_answer("[1] fine => rating: 4\n[2] the sentence is rat"), ids(&[(1, 4)]));
        // A number inside the evaluation is not a rating.
        assert_eq!(parse_answer("[1] Lists 3 tools but no verdict"), ids(&[]));
        assert_eq!(parse_answer("[1] rating: 3.5"), ids(&[(1, -1)]));
    }

    #[test]
    fn check_reports_every_problem() {
        let tags = Tagging::new(2, 1);
        let raw = ids(&[(1, 4), (2, 7)]);
        let err = check(&raw, &tags, Aspect::Helpfulness).unwrap_err();
        assert_eq!(err.len(), 2);
        assert!(err[0].contains("ID(s) 3"));
        assert!(err[1].contains("ID 2: rating 7"));
        let err = check(&ids(&[(1, 4), (2, 2), (3, 0)]), &tags, Aspect::Safety).unwrap_err();
        assert_eq!(err, vec!["ID 2: safety must be rated 4 (pass) or 0 (fail), not 2.".to_string()]);
        let ok = check(&ids(&[(1, 4), (2, 2), (3, 0), (9, 9)]), &tags, Aspect::Clarity).unwrap();
        assert_eq!(ok, Checked { first: vec![4, 2], second: vec![0] });
    }

    #[test]
    fn monotone_running_max() {
        let mut v = vec![1, 3, 2, 2, 4, 1];
        assert_eq!(enforce_monotone(&mut v), 3);
        assert_eq!(v, vec![1, 3, 3, 3, 4, 4]);
        let mut w = vec![0, 1, 1, 2];
        assert_eq!(enforce_monotone(&mut w), 0);
    }
}
