//! `dpo2d explain` end to end on a tiny model: the page shows every token
//! of both responses exactly once, in order, inside its segment, with the
//! segment's scores, and a PNG is written beside it.

mod common;

use std::process::Command;

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&")
}

/// The texts of the token spans of the page, per response section.
fn token_texts(html: &str) -> Vec<Vec<String>> {
    html.split("<h2>")
        .skip(2) // the prompt's section
        .map(|section| {
            section
                .split("<span class=\"tok\"")
                .skip(1)
                .map(|s| {
                    let body = &s[s.find('>').unwrap() + 1..];
                    unescape(&body[..body.find("</span>").unwrap()])
                })
                .collect()
        })
        .collect()
}

#[test]
fn explain_writes_every_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::write_tiny_model(&model);
    let pairs = dir.path().join("pairs.jsonl");
    common::write_pairs(&pairs, 0..3, true);
    let out = dir.path().join("x.html");
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["explain", "--model-path", model.to_str().unwrap(), "--ref-model-path", model.to_str().unwrap()])
        .args(["--pairs", pairs.to_str().unwrap(), "--index", "1", "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&out).unwrap();
    let sides = token_texts(&html);
    assert_eq!(sides.len(), 2, "chosen and rejected");
    // Pair 1 of write_pairs: "the answer is fine . " + "it is great ." and the bad twin.
    assert_eq!(sides[0].concat(), "the answer is fine . it is great .");
    assert_eq!(sides[1].concat(), "the answer is awful . it is bad .");
    assert_eq!(sides[0].len(), 9, "{:?}", sides[0]);
    assert!(sides[0].iter().all(|t| !t.trim().is_empty()), "one token per span: {:?}", sides[0]);
    // Two segments per response, each with its five scores.
    assert_eq!(html.matches("class=\"seg\"").count(), 4);
    assert_eq!(html.matches("class=\"sc\"").count(), 20);
    // Policy = reference: every reward is zero.
    assert!(html.contains("sum of rewards +0.000"));
    assert!(dir.path().join("x.png").is_file());
    // A wrong index is a clear error.
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["explain", "--model-path", model.to_str().unwrap(), "--ref-model-path", model.to_str().unwrap()])
        .args(["--pairs", pairs.to_str().unwrap(), "--index", "7", "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--index 7 but the file has 3 pairs"));
}
