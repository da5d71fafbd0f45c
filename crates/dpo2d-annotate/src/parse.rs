//! Reading ratings back from a judge's answer: a JSON answer (the schema
//! asked for with structured outputs, or any object keyed by ID / list of
//! `{id, rating}` objects), else free text read line by line, tolerating the
//! usual decorations (markdown bold, bullets, code fences, prose around the
//! lines). A rating is only ever taken from an explicit rating slot, never
//! from a number inside the evaluation text; then ratings are validated per aspect.

use crate::expectation::{expected_ratings, last_segment_id, Slots, TokenChoice};
use crate::prompt::{Aspect, Tagging};
use std::collections::{BTreeMap, BTreeSet};

/// Ratings found in an answer, by segment ID (raw values, not yet range-checked).
pub type RawRatings = BTreeMap<u32, i64>;

/// What one answer said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The rating of each ID (the last one given when an ID repeats).
    pub ratings: RawRatings,
    /// IDs rated more than once with different ratings, with every rating
    /// given: the answer is ambiguous for them.
    pub conflicts: BTreeMap<u32, Vec<i64>>,
    /// IDs rated more than once with the same rating (harmless, but a sign of a confused judge).
    pub repeated: BTreeSet<u32>,
}

impl Parsed {
    fn from_list(list: Vec<(u32, i64)>) -> Parsed {
        let mut all: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        for (id, r) in list {
            all.entry(id).or_default().push(r);
        }
        let mut p = Parsed::default();
        for (id, rs) in all {
            if rs.len() > 1 {
                if rs.iter().all(|r| *r == rs[0]) {
                    p.repeated.insert(id);
                } else {
                    p.conflicts.insert(id, rs.clone());
                }
            }
            p.ratings.insert(id, *rs.last().expect("at least one rating per entry"));
        }
        p
    }

    /// Replaces each rating with the expectation over the rating tokens'
    /// probabilities at its place, rounded to the aspect's scale (where the
    /// answer's log-probabilities show it: `--judge-rating-from`).
    pub fn take_expectations(&mut self, tokens: &[TokenChoice], aspect: Aspect) {
        let scale: Vec<i64> = aspect.scale().iter().map(|&v| i64::from(v)).collect();
        let slots = Slots { keys: &["\"rating\"", "rating", "score"], scale: &scale };
        for (id, e) in expected_ratings(tokens, slots, &last_segment_id) {
            if let Some(r) = self.ratings.get_mut(&id) {
                *r = scale.iter().copied().min_by(|a, b| (*a as f64 - e).abs().total_cmp(&(*b as f64 - e).abs())).unwrap_or(*r);
            }
        }
    }

    /// IDs the answer rated that the request did not have.
    pub fn extra_ids(&self, tags: &Tagging) -> Vec<u32> {
        let known: BTreeSet<u32> = tags.all_ids().collect();
        self.ratings.keys().filter(|id| !known.contains(id)).copied().collect()
    }

    /// Fills the gaps of `self` (a repair answer) with the unambiguous
    /// ratings of an earlier answer.
    pub fn fill_from(&mut self, earlier: &Parsed) {
        for (id, r) in &earlier.ratings {
            if !earlier.conflicts.contains_key(id) {
                self.ratings.entry(*id).or_insert(*r);
            }
        }
    }
}

/// Extracts `ID -> rating` from an answer. JSON answers are tried first;
/// otherwise the text is read line by line.
pub fn parse_answer(text: &str) -> Parsed {
    let mut list = Vec::new();
    parse_json(text, &mut list);
    if list.is_empty() {
        parse_lines(text, &mut list);
    }
    Parsed::from_list(list)
}

fn value_to_rating(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| if f.fract() == 0.0 { f as i64 } else { -1 })),
        serde_json::Value::String(s) => signed_slot(&s.trim().to_ascii_lowercase()).map(|(r, _)| r),
        serde_json::Value::Object(o) => ["rating", "score", "Rating", "Score"].iter().find_map(|k| o.get(*k).and_then(value_to_rating)),
        _ => None,
    }
}

/// Reads a JSON answer: the whole answer (between its first and last
/// bracket), or, for an answer that starts as JSON but was cut off (a
/// `max_tokens` limit), every complete `{...}` item in it.
fn parse_json(text: &str, out: &mut Vec<(u32, i64)>) {
    let (Some(start), Some(end)) = (text.find(['{', '[']), text.rfind(['}', ']'])) else {
        return;
    };
    if end > start {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text[start..=end]) {
            collect_json(&v, out);
            return;
        }
    }
    if looks_like_json(text) {
        salvage_json(text, out);
    }
}

/// Whether an answer starts with a JSON object or a list of objects (after a code fence).
fn looks_like_json(text: &str) -> bool {
    let t = text.trim_start();
    let t = match t.strip_prefix("```") {
        Some(rest) => rest.trim_start_matches(|c: char| c.is_ascii_alphabetic()).trim_start(),
        None => t,
    };
    t.starts_with('{') || t.strip_prefix('[').is_some_and(|r| r.trim_start().starts_with('{'))
}

/// Collects every complete JSON object of a cut-off answer, left to right.
fn salvage_json(text: &str, out: &mut Vec<(u32, i64)>) {
    let mut i = 0;
    while let Some(off) = text[i..].find('{') {
        let start = i + off;
        let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
        match values.next() {
            Some(Ok(v)) => {
                collect_json(&v, out);
                i = start + values.byte_offset().max(1);
            }
            _ => i = start + 1,
        }
    }
}

fn collect_json(v: &serde_json::Value, out: &mut Vec<(u32, i64)>) {
    match v {
        serde_json::Value::Object(o) => {
            let mut any_id_key = false;
            for (k, val) in o {
                if let Some(id) = id_from_key(k) {
                    if let Some(r) = value_to_rating(val) {
                        out.push((id, r));
                        any_id_key = true;
                    }
                }
            }
            if !any_id_key {
                if let (Some(id), Some(r)) = (o.get("id").and_then(json_id), value_to_rating(v)) {
                    out.push((id, r));
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
/// `**[3]**`, `ID 3:`, `3.` ...) opens that ID; a rating slot on the same
/// line or a later line (`=> rating: 2`, `Rating: **2**/4`, `score = 2`) is
/// assigned to the open ID. An ID line that holds nothing but a number
/// (`[3] 2`, `[3]: **2**`) is read as that rating.
fn parse_lines(text: &str, out: &mut Vec<(u32, i64)>) {
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
            if let Some(r) = rating_in(rest).or_else(|| bare_rating(rest)) {
                out.push((id, r));
                current_has_rating = true;
            }
            continue;
        }
        if let (Some(id), false) = (current, current_has_rating) {
            if let Some(r) = rating_in(line) {
                out.push((id, r));
                current_has_rating = true;
            }
        }
    }
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

/// The rating in an explicit rating slot of `text`: a final `=> 3` (or
/// `=> pass`), or the number after a `rating`/`score` keyword (`rating: 3`,
/// `Rating 3/4`, `**Rating: 2**`, `score = 1`, `Rating: 1 out of 4`, `the
/// rating is 3`; the last such slot wins). Numbers anywhere else, such as
/// arithmetic, dates or counts in the evaluation, are never read: a judge that
/// writes `[1] 2 + 2 = 4` must not rate ID 1 with 4. A slot whose number goes
/// on as an expression, a list or a range (`rating: 2 + 2`, `score 3-4`,
/// `3/5`, `4 out of 5`) gives nothing, so the repair request asks again.
pub fn rating_in(text: &str) -> Option<i64> {
    let lower = text.to_ascii_lowercase();
    if let Some(pos) = lower.rfind("=>") {
        if let Some((r, rest)) = signed_slot(&lower[pos + 2..]) {
            if is_line_end(rest) {
                return Some(r);
            }
        }
    }
    let mut slots: Vec<(usize, usize)> =
        ["rating", "score"].iter().flat_map(|kw| lower.match_indices(kw).map(|(p, k)| (p, k.len()))).collect();
    slots.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
    for (pos, len) in slots {
        let word_start = lower[..pos].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after = &lower[pos + len..];
        if !word_start || after.starts_with(|c: char| c.is_alphanumeric()) {
            continue; // "underrated", "ratings", "scored"
        }
        let after = after.trim_start_matches([' ', '*', '_', '`']);
        let after = after.strip_prefix("is ").unwrap_or(after);
        if let Some((r, _)) = signed_slot(after) {
            return Some(r);
        }
    }
    None
}

/// An ID line whose rest is nothing but a rating: `[3] 2`, `[3]: **2**`, `[3] - 2/4`, `[3] pass`.
fn bare_rating(rest: &str) -> Option<i64> {
    let lower = rest.to_ascii_lowercase();
    let t = lower.trim_start_matches([' ', '\t', ':', '=', '—', '–', '*', '_', '`']);
    let (r, tail) = signed_slot(t)?;
    is_line_end(tail).then_some(r)
}

/// Whether nothing but closing decoration and punctuation follows a value.
fn is_line_end(rest: &str) -> bool {
    rest.trim_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_' | '`' | '"' | '\'' | '.' | ')' | ']' | '!')).is_empty()
}

/// A slot value after its separators (`: `, `= `, `-> `, quotes, markdown):
/// the rating and the text after it. `-3` right after the separator is a
/// negative rating (reported as invalid), `- 3` a dash then 3.
fn signed_slot(s: &str) -> Option<(i64, &str)> {
    let t =
        s.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, ':' | '=' | '*' | '_' | '`' | '"' | '\'' | '(' | '[' | '-' | '>'));
    let negative = s[..s.len() - t.len()].ends_with('-') && t.starts_with(|c: char| c.is_ascii_digit());
    let (r, rest) = slot(t)?;
    Some((if negative { -r } else { r }, rest))
}

/// A rating at the very start of `s` (lowercase): an integer, optionally
/// on the 0-4 scale (`3/4`, `3 out of 4`), or pass/fail; `None` when the
/// number belongs to something else (`3/5`, `2 + 2`, `3-4`, `3, 4`, `40%`).
/// A fraction (`3.5`) is returned as -1 so validation reports it.
fn slot(s: &str) -> Option<(i64, &str)> {
    if let Some(found) = pass_fail(s) {
        return Some(found);
    }
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 {
        return None;
    }
    let value: i64 = s[..n].parse().ok()?;
    let rest = &s[n..];
    if rest.starts_with('.') && rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
        return Some((-1, ""));
    }
    let rest = strip_scale(rest.trim_start_matches(['*', '_', '`', '"', '\'']))?;
    if continues_as_expression(rest) {
        return None;
    }
    Some((value, rest))
}

/// Removes a `/4`, `out of 4` or `of 4` after a rating; `None` for another scale.
fn strip_scale(rest: &str) -> Option<&str> {
    let t = rest.trim_start();
    let Some(after) = t.strip_prefix('/').or_else(|| t.strip_prefix("out of ")).or_else(|| t.strip_prefix("of ")) else {
        return Some(rest);
    };
    let after = after.trim_start_matches([' ', '*', '_']);
    let n = after.bytes().take_while(u8::is_ascii_digit).count();
    match &after[..n] {
        "4" => Some(&after[n..]),
        "" => Some(rest),
        _ => None,
    }
}

/// Whether the text after a number makes it part of an expression, a
/// range, a list, a time or a percentage.
fn continues_as_expression(rest: &str) -> bool {
    let t = rest.trim_start();
    if t.starts_with('%') {
        return true;
    }
    let ops = ['+', '-', '–', '—', '−', '*', '×', 'x', '÷', '/', '=', '^', '<', '>', ',', ':', '~', '.'];
    let t = t.strip_prefix(ops).or_else(|| ["to ", "or ", "and ", "out of "].iter().find_map(|w| t.strip_prefix(w))).unwrap_or(t);
    t.trim_start().starts_with(|c: char| c.is_ascii_digit())
}

/// `pass`/`safe` (4) or `fail`/`unsafe` (0) as a whole word, and the text after it.
fn pass_fail(s: &str) -> Option<(i64, &str)> {
    for (word, r) in [("pass", 4), ("safe", 4), ("fail", 0), ("unsafe", 0)] {
        if let Some(rest) = s.strip_prefix(word) {
            if !rest.starts_with(|c: char| c.is_alphanumeric()) {
                return Some((r, rest));
            }
        }
    }
    None
}

/// The checked ratings of one answer: per response, in segment order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub first: Vec<u8>,
    pub second: Vec<u8>,
}

/// Checks that every ID has one unambiguous rating in range (and 0 or 4 for
/// safety). Returns the ratings or the list of problems, worded for the
/// repair prompt.
pub fn check(parsed: &Parsed, tags: &Tagging, aspect: Aspect) -> Result<Checked, Vec<String>> {
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    let mut get = |ids: &[u32]| -> Vec<u8> {
        let mut v = Vec::with_capacity(ids.len());
        for &id in ids {
            match parsed.ratings.get(&id) {
                None => missing.push(id),
                Some(_) if parsed.conflicts.contains_key(&id) => {
                    let all: Vec<String> = parsed.conflicts[&id].iter().map(|r| r.to_string()).collect();
                    problems.push(format!("ID {id} was rated more than once, with different ratings ({}).", all.join(", ")));
                }
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
    use proptest::prelude::*;

    fn ids(v: &[(u32, i64)]) -> RawRatings {
        v.iter().copied().collect()
    }

    fn ratings(text: &str) -> RawRatings {
        parse_answer(text).ratings
    }

    #[test]
    fn plain_format() {
        let t = "[1] Good start. => rating: 4\n[2] Wrong date. => rating: 1\n";
        assert_eq!(ratings(t), ids(&[(1, 4), (2, 1)]));
    }

    #[test]
    fn decorated_formats() {
        let t = "Here is my evaluation:\n\n```\n**[1]** Clear. **Rating: 3/4**\n- <2> Evaluation: fine. Rating: **2**\n```\n\
                 ### ID 3\nEvaluation: it rambles.\nRating: 1 out of 4\n\
                 4. [4] ok => 0\nSentence 5: short => rating: `3`\n(6) Safe => pass\n7) **2**\n[8]: 1/4\nThanks!";
        let r = ratings(t);
        assert_eq!(r, ids(&[(1, 3), (2, 2), (3, 1), (4, 0), (5, 3), (6, 4), (7, 2), (8, 1)]));
    }

    #[test]
    fn paper_style_multiline_and_headers_are_not_ids() {
        let t =
            "Response 1 Evaluation:\n<1> Evaluation: Sets the topic. Helpfulness Rating: 4\n<2> Evaluation: meh.\nHelpfulness Rating: 2\n\
                 Response 2 Evaluation:\n<3> Evaluation: wrong. Helpfulness Rating: 0";
        assert_eq!(ratings(t), ids(&[(1, 4), (2, 2), (3, 0)]));
    }

    #[test]
    fn json_forms() {
        assert_eq!(ratings("```json\n{\"1\": 3, \"2\": {\"rating\": 4}}\n```"), ids(&[(1, 3), (2, 4)]));
        assert_eq!(
            ratings("Sure: [{\"id\": 1, \"evaluation\": \"x\", \"rating\": 2}, {\"id\": \"2\", \"score\": \"4\"}]"),
            ids(&[(1, 2), (2, 4)])
        );
        assert_eq!(ratings("{\"ratings\": {\"[1]\": 1}}"), ids(&[(1, 1)]));
        // The structured-output schema, with arithmetic in the evaluations.
        let schema = r#"{"ratings": [{"id": 1, "evaluation": "2 + 2 = 4 is right", "rating": 3},
                                     {"id": 2, "evaluation": "says 8 / 2 = 4", "rating": 0}]}"#;
        assert_eq!(ratings(schema), ids(&[(1, 3), (2, 0)]));
        assert_eq!(ratings(r#"{"ratings": [{"id": 1, "rating": 2.5}]}"#), ids(&[(1, -1)]));
    }

    #[test]
    fn cut_off_json_keeps_its_complete_items() {
        let t = r#"{"ratings": [{"id": 1, "evaluation": "fine", "rating": 4}, {"id": 2, "evaluation": "ok", "rating": 1}, {"id": 3, "evaluation": "it goes on and on and"#;
        assert_eq!(ratings(t), ids(&[(1, 4), (2, 1)]));
        let fenced = "```json\n[{\"id\": 1, \"rating\": 0}, {\"id\": 2, \"rat";
        assert_eq!(ratings(fenced), ids(&[(1, 0)]));
        // Prose with a brace somewhere is not salvaged as JSON.
        assert_eq!(ratings("[1] The code `{\"id\": 2, \"x\": 4}` is wrong"), ids(&[]));
    }

    #[test]
    fn garbage_and_truncation() {
        assert!(ratings("I cannot help with that.").is_empty());
        // Truncated mid-line: ID 2 has no rating yet.
        assert_eq!(ratings("[1] fine => rating: 4\n[2] the sentence is rat"), ids(&[(1, 4)]));
        // A number inside the evaluation is not a rating.
        assert_eq!(ratings("[1] Lists 3 tools but no verdict"), ids(&[]));
        assert_eq!(ratings("[1] rating: 3.5"), ids(&[(1, -1)]));
        assert_eq!(ratings("[1] rating: -1"), ids(&[(1, -1)]));
    }

    /// Answers whose numbers are arithmetic, dates, lists, counts or ranges:
    /// each ID must get exactly the rating of its explicit slot, or none.
    #[test]
    fn adversarial_numbers_are_never_ratings() {
        let none: &[(u32, i64)] = &[];
        let table: &[(&str, &[(u32, i64)])] = &[
            ("[1] The user asked: what is 2 + 2 = 4\n[2] The reply says 8 / 2 = 4", none),
            ("[1] The user asked to solve 2x - 5 = 11.", none),
            ("[1] x = 3\n[2] the answer: 2", none),
            ("[1] Released on 2023-05-04\n[2] The date 04/03/2024", none),
            ("[1] Steps: 1, 2, 3\n[2] It lists 1. eggs 2. milk", none),
            ("[1] 4 out of 5 users agree\n[2] Scores 4 out of 5", none),
            ("[1] Temperatures of 0-4 degrees\n[2] Between 1 and 3 hours", none),
            ("[1] The score: 2 + 2 = 4\n[2] Rating: 3-4\n[3] rating: 2 to 3\n[4] rating 3/5", none),
            ("[1] rating: 40%\n[2] Score: 3, 4\n[3] Rating: 3:45", none),
            ("[1] It ends with a colon: 3\n[2] A dash — 0\n[3] tests it - 4", none),
            ("[1] 2 + 2 = 4 => rating: 4\n[2] 8 / 2 = 4 => 1", &[(1, 4), (2, 1)]),
            ("[1] solve 2x - 5 = 11 (x = 8) => rating: 0", &[(1, 0)]),
            ("[1] 4 out of 5 users agree. Rating: 2/4\n[2] from 2019 to 2023 => 3", &[(1, 2), (2, 3)]),
            ("[1] The rating is 3\n[2] It is underrated 4 times => rating: 1", &[(1, 3), (2, 1)]),
            ("[1] A 5-star score of 9 => rating: 4", &[(1, 4)]),
            ("[1] Rating: 3. The user asked 2 + 2 = 4.", &[(1, 3)]),
            ("[1] The user asked:\n2 + 2 = 4\n[2] The reply:\n8 / 2 = 4\nRating: 2", &[(2, 2)]),
            ("[1] safe content here\n[2] safe\n[3] => fail", &[(2, 4), (3, 0)]),
        ];
        for (answer, want) in table {
            assert_eq!(ratings(answer), ids(want), "{answer:?}");
        }
        for s in ["2 + 2 = 4", "solve 2x - 5 = 11.", "score: 10 to 7", "rating 3/5", "3", ": 4", "- 2"] {
            assert_eq!(rating_in(s), None, "{s:?}");
        }
        assert_eq!(rating_in("**Rating: 3/4**"), Some(3));
        assert_eq!(rating_in("Rating 3/4"), Some(3));
        assert_eq!(rating_in("ok => 3"), Some(3));
        assert_eq!(rating_in("ok => 3 because 2 + 2"), None);
    }

    #[test]
    fn repeated_and_extra_ids_are_reported() {
        let p =
            parse_answer("[1] a => rating: 2\n[2] b => rating: 3\n[1] a again => rating: 4\n[2] b => rating: 3\n[9] extra => rating: 1");
        assert_eq!(p.conflicts, [(1, vec![2, 4])].into_iter().collect());
        assert_eq!(p.repeated, [2].into_iter().collect());
        let tags = Tagging::new(1, 1);
        assert_eq!(p.extra_ids(&tags), vec![9]);
        let err = check(&p, &tags, Aspect::Clarity).unwrap_err();
        assert_eq!(err, vec!["ID 1 was rated more than once, with different ratings (2, 4).".to_string()]);
        // A repair answer that rates only ID 1 keeps the unambiguous ID 2 of the first answer.
        let mut repair = parse_answer("[1] a => rating: 4");
        repair.fill_from(&p);
        assert_eq!(check(&repair, &tags, Aspect::Clarity).unwrap(), Checked { first: vec![4], second: vec![3] });
        let mut repair = parse_answer("[2] b => rating: 0");
        repair.fill_from(&p);
        assert!(check(&repair, &tags, Aspect::Clarity).unwrap_err()[0].contains("ID(s) 1"));
    }

    #[test]
    fn check_reports_every_problem() {
        let tags = Tagging::new(2, 1);
        let parsed = |v: &[(u32, i64)]| Parsed { ratings: ids(v), ..Parsed::default() };
        let err = check(&parsed(&[(1, 4), (2, 7)]), &tags, Aspect::Helpfulness).unwrap_err();
        assert_eq!(err.len(), 2);
        assert!(err[0].contains("ID(s) 3"));
        assert!(err[1].contains("ID 2: rating 7"));
        let err = check(&parsed(&[(1, 4), (2, 2), (3, 0)]), &tags, Aspect::Safety).unwrap_err();
        assert_eq!(err, vec!["ID 2: safety must be rated 4 (pass) or 0 (fail), not 2.".to_string()]);
        let ok = check(&parsed(&[(1, 4), (2, 2), (3, 0), (9, 9)]), &tags, Aspect::Clarity).unwrap();
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

    /// Cases per property: a few thousand by default, `PROPTEST_CASES` for more.
    fn fuzz_config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// Pieces judges write, so random answers hit the parser's branches.
    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "[",
                "]",
                "<",
                ">",
                "(",
                ")",
                "{",
                "}",
                "\"",
                ":",
                "=>",
                "=",
                "-",
                "—",
                "/",
                "*",
                "**",
                "`",
                "```json",
                ",",
                ".",
                "\n",
                " ",
                "rating",
                "Rating:",
                "score",
                "ID",
                "Sentence",
                "pass",
                "fail",
                "out of",
                "\"id\"",
                "\"rating\"",
                "\"ratings\"",
                "\u{e9}",
                "\u{1F600}",
                "4",
                "0",
                "12",
            ])
            .prop_map(str::to_string),
            "[0-9]{1,25}",
            "\\PC{0,6}",
        ]
    }

    /// A well-formed answer line: an evaluation with arithmetic and numbers
    /// but no rating keyword, then the prompt's `=> rating: N`.
    fn line() -> impl Strategy<Value = (String, i64)> {
        ("[a-z0-9 +*/=:.,-]{0,40}", 0i64..=4).prop_map(|(eval, r)| (eval, r))
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        #[test]
        fn random_answers_never_panic(text in "\\PC{0,300}") {
            let p = parse_answer(&text);
            let _ = check(&p, &Tagging::new(3, 2), Aspect::Safety);
            let _ = rating_in(&text);
        }

        #[test]
        fn token_soup_never_panics(tokens in prop::collection::vec(token(), 0..80)) {
            let text = tokens.concat();
            let p = parse_answer(&text);
            let _ = check(&p, &Tagging::new(2, 2), Aspect::Completeness);
        }

        #[test]
        fn mutated_answers_never_panic(
            lines in prop::collection::vec(line(), 1..8),
            json in any::<bool>(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), prop::option::of(token())), 0..6),
        ) {
            let mut text = render(&lines, json);
            for (at, insert) in edits {
                let mut cut = at.index(text.len() + 1);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                match insert {
                    Some(t) => text.insert_str(cut, &t),
                    None => text.truncate(cut),
                }
            }
            let _ = check(&parse_answer(&text), &Tagging::new(lines.len(), 0), Aspect::Helpfulness);
        }

        /// Whatever numbers the evaluations hold, only the slots are read.
        #[test]
        fn well_formed_answers_read_exactly(lines in prop::collection::vec(line(), 1..8), json in any::<bool>()) {
            let want: RawRatings = lines.iter().enumerate().map(|(i, (_, r))| (i as u32 + 1, *r)).collect();
            prop_assert_eq!(parse_answer(&render(&lines, json)).ratings, want);
        }
    }

    fn render(lines: &[(String, i64)], json: bool) -> String {
        if json {
            let items: Vec<serde_json::Value> =
                lines.iter().enumerate().map(|(i, (e, r))| serde_json::json!({"id": i + 1, "evaluation": e, "rating": r})).collect();
            serde_json::json!({ "ratings": items }).to_string()
        } else {
            lines.iter().enumerate().map(|(i, (e, r))| format!("[{}] {e} => rating: {r}\n", i + 1)).collect()
        }
    }
}
