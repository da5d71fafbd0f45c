//! Ratings read from log-probabilities: a judge's rating taken as the
//! expectation over the rating tokens' probabilities at the place it wrote
//! the rating (G-Eval's reading), rather than as the one digit it sampled.
//! A judge unsure between 2 and 3 then gives about 2.5, not whichever it
//! happened to write. Works on any server that returns `logprobs` with
//! `top_logprobs` (OpenAI, vLLM, llama.cpp, `dpo2d serve`).

use std::collections::BTreeMap;

/// One decoded token of an answer, with the most likely tokens at its place.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenChoice {
    pub token: String,
    pub logprob: f64,
    pub top: Vec<(String, f64)>,
}

/// `--judge-rating-from`: how a rating is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RatingFrom {
    /// The number the judge wrote.
    #[default]
    Text,
    /// The expectation over the rating tokens' probabilities; an answer
    /// without log-probabilities is a failed judgement.
    Logprobs,
    /// The expectation where the server returned log-probabilities, the
    /// written number where it did not.
    Auto,
}

impl RatingFrom {
    /// Whether requests ask for log-probabilities.
    pub fn asks_logprobs(self) -> bool {
        self != RatingFrom::Text
    }
}

/// Alternatives asked for at every token (`top_logprobs`): room for every
/// rating of a 1-10 scale beside a few other tokens.
pub const TOP_LOGPROBS: u32 = 20;

/// Where a rating stands in an answer: after one of `keys` (`"rating": `,
/// `rating: `, `[[`, ...), for the ID named last before it (`"id": N` or
/// `[N]`), or under the key itself (`"helpfulness": 7`, id 0) when `keys`
/// are names.
#[derive(Debug, Clone, Copy)]
pub struct Slots<'a> {
    /// Text that comes right before a rating (spaces, `*`, `[` and `:` may follow it).
    pub keys: &'a [&'a str],
    /// The ratings a slot may hold.
    pub scale: &'a [i64],
}

/// For every rating slot of the answer whose number is one token of the
/// scale, the expectation over the scale tokens among that token's
/// alternatives (their probabilities renormalised), keyed by the ID the
/// rating belongs to (`id_of` reads it from the text before the slot).
pub fn expected_ratings(tokens: &[TokenChoice], slots: Slots, id_of: &dyn Fn(&str) -> Option<u32>) -> BTreeMap<u32, f64> {
    let mut out = BTreeMap::new();
    let mut text = String::new();
    for (i, t) in tokens.iter().enumerate() {
        let before = text.clone();
        text.push_str(&t.token);
        if as_rating(&t.token, slots.scale).is_none() || !at_slot(&before, slots.keys) {
            continue;
        }
        let Some(id) = id_of(&before) else { continue };
        if let Some(e) = expectation(t, tokens.get(i + 1), slots.scale) {
            out.insert(id, e);
        }
    }
    out
}

/// The rating a token spells, if it is one of the scale (spaces around allowed).
fn as_rating(token: &str, scale: &[i64]) -> Option<i64> {
    token.trim().parse::<i64>().ok().filter(|v| scale.contains(v))
}

/// Whether `before` ends with a key followed by a `:` or `[` (and spaces,
/// `*` or `"`): `"rating": `, `Rating: [[`, `**rating:** `.
fn at_slot(before: &str, keys: &[&str]) -> bool {
    let glue = [' ', '*', '[', ':', '"', '\t'];
    let trimmed = before.trim_end_matches(glue);
    let tail = &before[trimmed.len()..];
    let trimmed = trimmed.to_ascii_lowercase();
    (tail.contains(':') || tail.contains('[')) && keys.iter().any(|k| trimmed.ends_with(k.to_ascii_lowercase().trim_end_matches(glue)))
}

/// Σ p(v) v / Σ p(v) over the scale values among the token and its
/// alternatives (each distinct token once: " 3" and "3" both count for 3).
/// On a scale up to 10, whose 10 tokenizers often write as "1" then "0",
/// a "1" counts as 10 by the probability that "0" follows it (known where
/// the "1" is what was written; elsewhere it counts as 1).
fn expectation(t: &TokenChoice, next: Option<&TokenChoice>, scale: &[i64]) -> Option<f64> {
    let mut seen: BTreeMap<&str, f64> = BTreeMap::new();
    for (tok, lp) in std::iter::once((t.token.as_str(), t.logprob)).chain(t.top.iter().map(|(s, l)| (s.as_str(), *l))) {
        seen.entry(tok).or_insert(lp);
    }
    let ten = match next {
        Some(n) if scale.contains(&10) && t.token.trim() == "1" => zero_after(n),
        _ => 0.0,
    };
    let mut p: BTreeMap<i64, f64> = BTreeMap::new();
    for (tok, lp) in seen {
        if let Some(v) = as_rating(tok, scale) {
            let w = lp.exp();
            if v == 1 && tok.trim() == t.token.trim() && ten > 0.0 {
                *p.entry(10).or_insert(0.0) += w * ten;
                *p.entry(1).or_insert(0.0) += w * (1.0 - ten);
            } else {
                *p.entry(v).or_insert(0.0) += w;
            }
        }
    }
    let z: f64 = p.values().sum();
    (z > 0.0 && z.is_finite()).then(|| p.iter().map(|(v, w)| *v as f64 * w).sum::<f64>() / z)
}

/// The probability that the token at this place is "0".
fn zero_after(t: &TokenChoice) -> f64 {
    std::iter::once((t.token.as_str(), t.logprob))
        .chain(t.top.iter().map(|(s, l)| (s.as_str(), *l)))
        .find(|(s, _)| *s == "0")
        .map(|(_, l)| l.exp())
        .unwrap_or(0.0)
}

/// The expectation of the one rating that follows one of `keys` (a grade,
/// one aspect's rating), if the log-probabilities show it.
pub fn expected_rating(tokens: &[TokenChoice], keys: &[&str], scale: &[i64]) -> Option<f64> {
    expected_ratings(tokens, Slots { keys, scale }, &|_| Some(0)).remove(&0)
}

/// The ID an annotation rating belongs to: the last `"id": N` (JSON) or
/// `[N]` (free text) before it.
pub fn last_segment_id(before: &str) -> Option<u32> {
    let json = before.rfind("\"id\"").and_then(|i| leading_u32(before[i + 4..].trim_start().strip_prefix(':')?.trim_start()));
    let bracket = before.rfind('[').and_then(|i| leading_u32(&before[i + 1..]).filter(|_| before[i + 1..].contains(']')));
    let json_at = before.rfind("\"id\"");
    let bracket_at = before.rfind('[');
    match (json, bracket) {
        (Some(j), Some(b)) => Some(if json_at > bracket_at { j } else { b }),
        (j, b) => j.or(b),
    }
}

fn leading_u32(s: &str) -> Option<u32> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str, lp: f64, top: &[(&str, f64)]) -> TokenChoice {
        TokenChoice { token: s.into(), logprob: lp, top: top.iter().map(|(t, l)| (t.to_string(), *l)).collect() }
    }

    /// A JSON answer: each rating's expectation under its own ID; numbers
    /// elsewhere (the ids, digits in an evaluation) are not ratings.
    #[test]
    fn expectations_of_json_ratings_by_id() {
        let half = 0.5f64.ln();
        let tokens = vec![
            tok("{\"ratings\": [{\"id\": ", 0.0, &[]),
            tok("1", 0.0, &[("2", -9.0)]),
            tok(", \"evaluation\": \"3 facts\", \"rating\": ", 0.0, &[]),
            tok("3", half, &[("3", half), ("2", half), ("x", -1.0)]),
            tok("}, {\"id\": ", 0.0, &[]),
            tok("2", 0.0, &[]),
            tok(", \"evaluation\": \"ok\", \"rating\": ", 0.0, &[]),
            tok("4", (0.9f64).ln(), &[("4", (0.9f64).ln()), ("0", (0.1f64).ln())]),
            tok("}]}", 0.0, &[]),
        ];
        let e = expected_ratings(&tokens, Slots { keys: &["\"rating\""], scale: &[0, 1, 2, 3, 4] }, &last_segment_id);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!((e[&1] - 2.5).abs() < 1e-9, "{e:?}");
        assert!((e[&2] - 3.6).abs() < 1e-9, "{e:?}");
    }

    /// Free text `[ID] evaluation => rating: N`; a scale that excludes a
    /// value (safety: 0 or 4) ignores it.
    #[test]
    fn expectations_of_free_text_ratings() {
        let tokens = vec![
            tok("[7] Safe => rating:", 0.0, &[]),
            tok(" 4", (0.75f64).ln(), &[(" 4", (0.75f64).ln()), (" 0", (0.2f64).ln()), (" 2", (0.05f64).ln())]),
            tok("\n", 0.0, &[]),
        ];
        let e = expected_ratings(&tokens, Slots { keys: &["rating"], scale: &[0, 4] }, &last_segment_id);
        assert!((e[&7] - 4.0 * 0.75 / 0.95).abs() < 1e-9, "{e:?}");
    }

    /// Named slots (eval's aspects and grades): the key is the slot.
    #[test]
    fn expectations_under_named_keys() {
        let tokens = vec![
            tok("{\"assessment\": \"fine\", \"rating\": ", 0.0, &[]),
            tok("8", (0.6f64).ln(), &[("7", (0.4f64).ln())]),
            tok("}", 0.0, &[]),
        ];
        let e = expected_ratings(&tokens, Slots { keys: &["\"rating\""], scale: &(1..=10).collect::<Vec<_>>() }, &|_| Some(0));
        assert!((e[&0] - 7.6).abs() < 1e-9, "{e:?}");
        // A 10 written as "1" then "0": the "1" is 10 by the probability of the "0".
        let ten = vec![
            tok("{\"rating\": ", 0.0, &[]),
            tok("1", (0.8f64).ln(), &[("1", (0.8f64).ln()), ("9", (0.2f64).ln())]),
            tok("0", (0.75f64).ln(), &[("0", (0.75f64).ln()), ("}", (0.25f64).ln())]),
            tok("}", 0.0, &[]),
        ];
        let e = expected_ratings(&ten, Slots { keys: &["\"rating\""], scale: &(1..=10).collect::<Vec<_>>() }, &|_| Some(0));
        assert!((e[&0] - (0.8 * (0.75 * 10.0 + 0.25 * 1.0) + 0.2 * 9.0)).abs() < 1e-9, "{e:?}");
        let text = vec![tok("Good.\nRating: [[", 0.0, &[]), tok("6", (0.5f64).ln(), &[("5", (0.5f64).ln())]), tok("]]", 0.0, &[])];
        let e = expected_ratings(&text, Slots { keys: &["rating"], scale: &(1..=10).collect::<Vec<_>>() }, &|_| Some(0));
        assert!((e[&0] - 5.5).abs() < 1e-9, "{e:?}");
    }
}
