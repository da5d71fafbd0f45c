//! End-to-end tests of the data commands: `dpo2d validate`, `dpo2d segment`,
//! `dpo2d build-pairs`, run as a user would run them.

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn dpo2d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpo2d")).args(args).output().expect("run dpo2d")
}

fn dpo2d_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dpo2d");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_lines(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.iter().map(|v| format!("{v}\n")).collect::<String>()).unwrap();
    p
}

/// Makes `dst` (a `.gz` file) from the pair file `src`: `validate --output`
/// writes gzip when the name ends in `.gz`.
fn gzip_via_cli(src: &Path, dst: &Path) {
    let o = dpo2d(&["validate", src.to_str().unwrap(), "--output", dst.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(&std::fs::read(dst).unwrap()[..2], &[0x1f, 0x8b]);
}

fn scores(h: u8, c: u8, s: u8, m: u8, l: u8) -> Value {
    json!({"helpfulness": h, "correctness": c, "safety": s, "completeness": m, "clarity": l})
}

fn scored_pair(id: &str) -> Value {
    json!({
        "id": id,
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": {"segments": [{"text": "It is 4. ", "scores": scores(4, 4, 4, 3, 4)}, {"text": "Simple.", "scores": scores(2, 4, 4, 4, 3)}]},
        "rejected": {"segments": [{"text": "It is 5.", "scores": scores(0, 0, 4, 1, 3)}]}
    })
}

#[test]
fn validate_reports_summary_for_good_scored_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_lines(dir.path(), "good.jsonl", &[scored_pair("a"), scored_pair("b")]);
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("2 valid pair(s)"), "{out}");
    assert!(out.contains("segments: 6"), "{out}");
    assert!(out.contains("helpfulness"), "{out}");
}

#[test]
fn validate_lists_every_bad_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad_safety = scored_pair("b");
    bad_safety["chosen"]["segments"][1]["scores"]["safety"] = json!(2);
    let mut unknown = scored_pair("c");
    unknown["rejected"]["segments"][0]["scores"]["tone"] = json!(1);
    let mut history = scored_pair("d");
    history["prompt"] = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]);
    let p = dir.path().join("bad.jsonl");
    let lines = [
        scored_pair("a").to_string(),
        bad_safety.to_string(),
        "{oops".into(),
        unknown.to_string(),
        history.to_string(),
        scored_pair("a").to_string(),
    ];
    std::fs::write(&p, lines.join("\n")).unwrap();
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("5 of 6 line(s) invalid"), "{err}");
    assert!(err.contains("bad.jsonl:2: chosen.segments[1].scores.safety: 2 is not allowed"), "{err}");
    assert!(err.contains("bad.jsonl:3: not valid JSON"), "{err}");
    assert!(err.contains("bad.jsonl:4: rejected.segments[0].scores: unknown aspect \"tone\""), "{err}");
    assert!(err.contains("bad.jsonl:5: prompt: the history must end with a user turn"), "{err}");
    assert!(err.contains("bad.jsonl:6: id: \"a\" already used at line 1"), "{err}");

    // --skip-invalid: reported as skipped, exit 0.
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores", "--skip-invalid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("1 valid pair(s)"), "{out}");
    assert!(out.contains("5 of 6 line(s) invalid and would be skipped"), "{out}");
    assert!(out.contains("safety-not-binary: 1"), "{out}");
}

#[test]
fn validate_reports_bad_utf8_and_reads_past_it_and_a_bom() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mixed.jsonl");
    let mut bytes = format!("\u{feff}{}\n", scored_pair("a")).into_bytes();
    bytes.extend_from_slice(b"{\"id\": \"caf\xe9\"}\n");
    let mut bad_score = scored_pair("c");
    bad_score["chosen"]["segments"][0]["scores"]["clarity"] = json!(3);
    let bad_score = bad_score.to_string().replacen("\"clarity\":3", "\"clarity\":18446744073709551616", 1);
    bytes.extend_from_slice(format!("{}\n{bad_score}\n", scored_pair("b")).as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    // Strict: every problem listed, the lines after the bad bytes included.
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("mixed.jsonl:2: not valid UTF-8 [not-utf8]"), "{err}");
    assert!(err.contains("mixed.jsonl:4: chosen.segments[0].scores.clarity: 18446744073709551616 is outside 0..4"), "{err}");
    assert!(err.contains("2 of 4 line(s) invalid"), "{err}");
    // Skipping: the BOM line and line 3 are kept.
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores", "--skip-invalid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("2 valid pair(s)") && out.contains("2 of 4 line(s) invalid and would be skipped"), "{out}");
    assert!(out.contains("not-utf8: 1"), "{out}");
}

#[test]
fn validate_gz_and_plain_requirement() {
    let dir = tempfile::tempdir().unwrap();
    let plain = json!({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."});
    let p = write_lines(dir.path(), "plain.jsonl", &[plain]);
    // Plain TRL pairs are valid for scalar losses ...
    let o = dpo2d(&["validate", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // ... and refused, with a clear reason, where 2-D scores are required.
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("plain.jsonl:1: chosen: plain text, but the 2-D losses need segments with scores"), "{}", stderr(&o));

    let gz = dir.path().join("plain.jsonl.gz");
    gzip_via_cli(&p, &gz);
    let o = dpo2d(&["validate", gz.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("1 valid pair(s)"));
}

#[test]
fn validate_limits_are_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_lines(dir.path(), "d.jsonl", &[scored_pair("a")]);
    let o = dpo2d(&["validate", p.to_str().unwrap(), "--max-segments", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("d.jsonl:1: chosen.segments: 2 segments, more than the limit of 1"), "{}", stderr(&o));
}

#[test]
fn shipped_data_is_valid_2d_data() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["data/train.jsonl", "data/heldout.jsonl"] {
        let p = root.join(f);
        if !p.exists() {
            continue;
        }
        let o = dpo2d(&["validate", p.to_str().unwrap(), "--require-scores"]);
        assert!(o.status.success(), "{f}: {}", stderr(&o));
    }
}

#[test]
fn segment_text_outputs_exact_spans() {
    let text = "Hello there, Dr. Smith. Pi is 3.14!\n\n```\nlet x = 1.5;\n```\n\n- One. Two.\n";
    let o = dpo2d(&["segment", "--text", text]);
    assert!(o.status.success(), "{}", stderr(&o));
    let spans: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let texts: Vec<&str> = spans.iter().map(|s| s["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["Hello there, Dr. Smith. ", "Pi is 3.14!\n\n", "```\nlet x = 1.5;\n```\n\n", "- One. ", "Two.\n"]);
    assert_eq!(texts.concat(), text);
    assert_eq!(spans[2]["kind"], "code");
    assert_eq!(spans[3]["kind"], "list_item");
    for s in &spans {
        let (a, b) = (s["start"].as_u64().unwrap() as usize, s["end"].as_u64().unwrap() as usize);
        assert_eq!(&text[a..b], s["text"].as_str().unwrap());
    }
}

#[test]
fn segment_text_may_start_with_a_dash() {
    let o = dpo2d(&["segment", "--text", "- item one. Two."]);
    assert!(o.status.success(), "{}", stderr(&o));
    let texts: Vec<String> =
        stdout(&o).lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts.concat(), "- item one. Two.");
    let o = dpo2d(&["segment", "--text", "-5 degrees today."]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("-5 degrees today."));
}

#[test]
fn segment_stdin_plain_text_auto_detected() {
    let o = dpo2d_stdin(&["segment"], "Grüße. 你好。OK.");
    assert!(o.status.success(), "{}", stderr(&o));
    let texts: Vec<String> =
        stdout(&o).lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts, vec!["Grüße. ", "你好。", "OK."]);
    let spans: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // "Grüße. " is 9 bytes but 7 characters.
    assert_eq!((spans[1]["start"].as_u64(), spans[1]["char_start"].as_u64()), (Some(9), Some(7)));
}

#[test]
fn segment_responses_with_named_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_lines(dir.path(), "r.jsonl", &[json!({"id": 1, "answer": "One. Two."}), json!({"id": 2, "answer": "Three"})]);
    let out = dir.path().join("out.jsonl");
    let o = dpo2d(&["segment", p.to_str().unwrap(), "--field", "answer", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], 1);
    assert_eq!(rows[0]["segments"].as_array().unwrap().len(), 2);
    assert_eq!(rows[1]["segments"][0]["text"], "Three");
    // Without --field the default "response" is missing: a clear error.
    let o = dpo2d(&["segment", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--field"), "{}", stderr(&o));
}

#[test]
fn segment_pairs_then_validate_for_annotation() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_lines(
        dir.path(),
        "pairs.jsonl",
        &[json!({"id": "x", "prompt": "Explain.", "chosen": "First point. Second point.", "rejected": "Only one."}), scored_pair("s")],
    );
    let out = dir.path().join("seg.jsonl");
    let o = dpo2d(&["segment", p.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("segmented 2 response(s); 2 already segmented"), "{}", stderr(&o));
    let first: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["chosen"], json!({"segments": [{"text": "First point. "}, {"text": "Second point."}]}));
    // Ready for annotation, not yet for a 2-D loss.
    let o = dpo2d(&["validate", out.to_str().unwrap(), "--require-segments"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dpo2d(&["validate", out.to_str().unwrap(), "--require-scores"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("seg.jsonl:1: chosen: segments have no scores"), "{}", stderr(&o));
}

#[test]
fn segment_bench_prints_throughput() {
    let o = dpo2d(&["segment", "--bench"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("MB/s"), "{}", stdout(&o));
}

const MULTI: &str = "Name a prime.\n<extra_id_1>Assistant\n7 is prime.\n<extra_id_1>User\nAnother one?";

fn rated(prompt: &str, response: &str, h: u8, c: u8) -> Value {
    json!({"prompt": prompt, "response": response, "helpfulness": h, "correctness": c, "coherence": 4, "complexity": 1, "verbosity": 1})
}

fn rated_rows() -> Vec<Value> {
    vec![
        rated("What is 2+2?", "4.", 4, 4),
        rated("What is 2+2?", "5.", 1, 0),
        rated(MULTI, "11 is prime too.", 3, 4),
        rated(MULTI, "9 is prime.", 1, 0),
        rated("Tie?", "A.", 2, 3),
        rated("Tie?", "B.", 2, 2),
        rated("Small gap?", "Good.", 3, 3),
        rated("Small gap?", "Fine.", 2, 3),
    ]
}

#[test]
fn build_pairs_from_helpsteer_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_lines(dir.path(), "hs.jsonl", &rated_rows());
    let out = dir.path().join("pairs.jsonl");
    let o = dpo2d(&["build-pairs", p.to_str().unwrap(), "-o", out.to_str().unwrap(), "--min-margin", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("8 rated rows, 4 prompts, 2 pairs written (1 multi-turn)"), "{err}");
    assert!(err.contains("dropped: 1 ties, 1 below min margin, 0 unpaired rows"), "{err}");
    let pairs: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(pairs[0]["chosen"], "4.");
    assert_eq!(pairs[0]["rejected"], "5.");
    assert_eq!(
        pairs[1]["prompt"],
        json!([
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7 is prime."},
            {"role": "user", "content": "Another one?"}
        ])
    );
    // The output is valid pair data.
    let o = dpo2d(&["validate", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Ties broken by attributes, default margin; gz input; segmented output.
    let gz = dir.path().join("hs.jsonl.gz");
    gzip_via_cli_rows(&p, &gz);
    let out2 = dir.path().join("pairs2.jsonl");
    let o = dpo2d(&["build-pairs", gz.to_str().unwrap(), "-o", out2.to_str().unwrap(), "--tie-break", "attributes", "--segment"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("4 pairs written"), "{}", stderr(&o));
    assert!(stderr(&o).contains("ties broken by correctness/coherence: 1"), "{}", stderr(&o));
    let o = dpo2d(&["validate", out2.to_str().unwrap(), "--require-segments"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Gzips rated rows: `segment` in responses mode keeps every field of a row
/// (adding `segments`, which build-pairs ignores) and writes gzip for `.gz`.
fn gzip_via_cli_rows(src: &Path, dst: &Path) {
    let o = dpo2d(&["segment", src.to_str().unwrap(), "-o", dst.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(&std::fs::read(dst).unwrap()[..2], &[0x1f, 0x8b]);
}

#[test]
fn build_pairs_rejects_bad_rows_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = rated_rows();
    rows[3]["helpfulness"] = json!("n/a");
    let p = write_lines(dir.path(), "hs.jsonl", &rows);
    let out = dir.path().join("pairs.jsonl");
    let o = dpo2d(&["build-pairs", p.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("hs.jsonl:4: helpfulness: must be a number"), "{}", stderr(&o));
    let o = dpo2d(&["build-pairs", p.to_str().unwrap(), "-o", out.to_str().unwrap(), "--skip-invalid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipped 1 invalid row(s) (wrong-type: 1)"), "{}", stderr(&o));
}

#[test]
fn build_pairs_passes_trl_pairs_through() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_lines(
        dir.path(),
        "trl.jsonl",
        &[
            json!({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}),
            json!({"prompt": "Q", "chosen": "A", "rejected": "B"}),
        ],
    );
    let out = dir.path().join("pairs.jsonl");
    let o = dpo2d(&["build-pairs", p.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("2 pair rows (TRL style), 2 pairs written"), "{}", stderr(&o));
    let first: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["chosen"], "Hello!");
}

#[test]
fn build_pairs_from_parquet_then_segment_and_validate() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/dpo2d-data/tests/fixtures/helpsteer2-sample.parquet");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl.gz");
    let o = dpo2d(&["build-pairs", fixture.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("6 rated rows, 3 prompts, 2 pairs written (1 multi-turn)"), "{}", stderr(&o));
    let seg = dir.path().join("seg.jsonl");
    let o = dpo2d(&["segment", out.to_str().unwrap(), "-o", seg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first: Value = serde_json::from_str(std::fs::read_to_string(&seg).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(
        first["chosen"],
        json!({"segments": [{"text": "The capital of France is Paris. "}, {"text": "It is also its largest city."}]})
    );
    let o = dpo2d(&["validate", seg.to_str().unwrap(), "--require-segments"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("2 valid pair(s)"), "{}", stdout(&o));
}

/// The segmenter agrees with the hand segmentation of the shipped data (a
/// regression guard for the sentence rules: 387 of 388 responses matched
/// when this was written).
#[test]
fn segmenter_matches_shipped_hand_segmentation() {
    use dpo2d_data::{load_pairs, segment, LoadOptions, Response};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (mut total, mut same) = (0, 0);
    for f in ["data/train.jsonl", "data/heldout.jsonl"] {
        let p = root.join(f);
        if !p.exists() {
            return;
        }
        for pair in load_pairs(&p, &LoadOptions::default()).unwrap().pairs {
            for r in [&pair.chosen, &pair.rejected] {
                if let Response::Segmented { segments } = r {
                    let want: Vec<&str> = segments.iter().map(|s| s.text.as_str()).collect();
                    let text = r.text();
                    total += 1;
                    same += (segment(&text) == want) as usize;
                }
            }
        }
    }
    assert!(total > 0);
    assert!(same as f64 >= 0.97 * total as f64, "only {same} of {total} responses segmented as by hand");
}
