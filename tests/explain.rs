//! `dpo2d explain` end to end on two tiny models (a policy and a reference
//! with other weights): the page shows every token of both responses
//! exactly once, in order, inside its segment, with the segment's scores;
//! every token's reward is `beta * (log pi - log pi_ref)` of that token as
//! `dpo2d logprobs` computes it under each model; a PNG is written beside it.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&")
}

/// One token span of the page: its text and the numbers of its tooltip.
#[derive(Debug)]
struct Span {
    text: String,
    policy_logp: f64,
    ref_logp: f64,
    reward: f64,
}

/// The number after `key` in a tooltip ("log π = -3.141, ...").
fn number_after(title: &str, key: &str) -> f64 {
    let rest = &title[title.find(key).unwrap_or_else(|| panic!("{key:?} in {title:?}")) + key.len()..];
    rest.split(',').next().unwrap().trim().parse().unwrap_or_else(|e| panic!("{rest:?}: {e}"))
}

/// The token spans of the page, per response section.
fn token_spans(html: &str) -> Vec<Vec<Span>> {
    html.split("<h2>")
        .skip(2) // the prompt's section
        .map(|section| {
            section
                .split("<span class=\"tok\"")
                .skip(1)
                .map(|s| {
                    let title = unescape(s.split("title=\"").nth(1).unwrap().split('"').next().unwrap());
                    let body = &s[s.find('>').unwrap() + 1..];
                    Span {
                        text: unescape(&body[..body.find("</span>").unwrap()]),
                        policy_logp: number_after(&title, "log π ="),
                        ref_logp: number_after(&title, "log π_ref ="),
                        reward: number_after(&title, "reward ="),
                    }
                })
                .collect()
        })
        .collect()
}

/// The numbers that follow `key` in the page, in order ("sum of rewards +0.123").
fn numbers_after(html: &str, key: &str) -> Vec<f64> {
    html.split(key).skip(1).map(|s| s.split([',', '<', ' ']).next().unwrap().parse().unwrap()).collect()
}

/// `dpo2d logprobs` of `response` after the user prompt `prompt` under `model`: (token, log-prob) per token.
fn logprobs(model: &Path, prompt: &str, response: &str) -> Vec<(String, f64)> {
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["logprobs", "--model", model.to_str().unwrap(), "--prompt", prompt, "--response", response])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["token"].as_str().unwrap().to_string(), v["logprob"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn explain_writes_every_token_once_with_its_reward() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, reference) = (dir.path().join("policy"), dir.path().join("reference"));
    common::write_tiny_model(&policy);
    common::write_tiny_model_seeded(&reference, 900);
    let pairs = dir.path().join("pairs.jsonl");
    common::write_pairs(&pairs, 0..3, true);
    let out = dir.path().join("x.html");
    let beta = 0.5;
    let explain = |index: &str| {
        Command::new(env!("CARGO_BIN_EXE_dpo2d"))
            .args(["explain", "--model-path", policy.to_str().unwrap(), "--ref-model-path", reference.to_str().unwrap()])
            .args(["--pairs", pairs.to_str().unwrap(), "--index", index, "--beta", &beta.to_string(), "-o", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = explain("1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&out).unwrap();
    let sides = token_spans(&html);
    assert_eq!(sides.len(), 2, "chosen and rejected");
    // Pair 1 of write_pairs: "the answer is fine . " + "it is great ." and the bad twin.
    let texts = ["the answer is fine . it is great .", "the answer is awful . it is bad ."];
    for (side, text) in sides.iter().zip(texts) {
        assert_eq!(side.iter().map(|s| s.text.as_str()).collect::<String>(), text);
        assert_eq!(side.len(), 9, "{side:?}");
        assert!(side.iter().all(|t| !t.text.trim().is_empty()), "one token per span: {side:?}");
    }
    // Two segments per response, each with its five scores.
    assert_eq!(html.matches("class=\"seg\"").count(), 4);
    assert_eq!(html.matches("class=\"sc\"").count(), 20);

    // Every token's numbers against the log-probs of the same response
    // tokens computed on their own, once under each model.
    let mut sums = vec![];
    let mut largest: f64 = 0.0;
    for (side, text) in sides.iter().zip(texts) {
        let (lp, lr) = (logprobs(&policy, "what is q1 .", text), logprobs(&reference, "what is q1 .", text));
        assert_eq!(lp.len(), side.len(), "{lp:?}");
        let mut sum = 0.0;
        for (i, (span, ((tok, p), (_, q)))) in side.iter().zip(lp.iter().zip(&lr)).enumerate() {
            assert_eq!(span.text.trim(), tok, "token {i}");
            assert!((span.policy_logp - p).abs() <= 1e-3 && (span.ref_logp - q).abs() <= 1e-3, "token {i} {tok:?}: {span:?} vs {p}, {q}");
            let want = beta * (p - q);
            assert!(
                (span.reward - want).abs() <= 1e-4,
                "token {i} {tok:?}: reward {} but beta x (log pi - log pi_ref) = {want}",
                span.reward
            );
            sum += want;
            largest = largest.max(want.abs());
        }
        sums.push(sum);
    }
    assert!(largest > 0.05, "the two models barely differ ({largest}): the check would not see a wrong reward");
    // The per-side and per-segment sums of the page.
    let shown = numbers_after(&html, "sum of rewards ");
    assert_eq!(shown.len(), 2, "{shown:?}");
    for (s, want) in shown.iter().zip(&sums) {
        assert!((s - want).abs() <= 2e-3, "sum of rewards {s} vs {want}");
    }
    let segments = numbers_after(&html, "segment reward ");
    assert_eq!(segments.len(), 4);
    for (k, side) in sides.iter().enumerate() {
        // The first segment is "the answer is X ." (5 tokens), the second "it is Y ." (4).
        let first: f64 = side[..5].iter().map(|t| t.reward).sum();
        let second: f64 = side[5..].iter().map(|t| t.reward).sum();
        assert!((segments[2 * k] - first).abs() <= 2e-3 && (segments[2 * k + 1] - second).abs() <= 2e-3, "{segments:?}");
    }
    assert!(dir.path().join("x.png").is_file());

    // A wrong index is a clear error.
    let o = explain("7");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--index 7 but the file has 3 pairs"));
}
