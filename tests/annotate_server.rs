//! End-to-end tests of `dpo2d annotate` against a real HTTP server on
//! 127.0.0.1 (the fake judge from `dpo2d_annotate::test_server`), run as the
//! built binary: faults (429 + Retry-After, 500, slow answers, cut-off
//! bodies, unusable answers), kill-and-resume, the concurrency bound,
//! structured outputs and their free-text fallback, and that no fragment of
//! the API key ever shows up in any output.

use dpo2d_annotate::cache::Cache;
use dpo2d_annotate::test_server::{body_hash, expected_scores, MockConfig, MockFormat, MockJudge};
use dpo2d_data::{check_pair, LoadOptions, Pair, Requirement};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-Zq8VxK3mP1wLr7TbN4cY";
const KEY_VAR: &str = "DPO2D_TEST_JUDGE_KEY";

fn pair_line(id: usize, marker: &str) -> String {
    serde_json::json!({
        "id": format!("p{id}"),
        "prompt": format!("Question {id}: list two colours and say why the sky is blue. {marker}"),
        "chosen": format!("Red and blue are colours. The sky is blue because of Rayleigh scattering.\n\n- Note {id}."),
        "rejected": {"segments": [{"text": "Green. "}, {"text": format!("The sky reflects the sea ({id}).")}]},
    })
    .to_string()
}

fn write_input(dir: &Path, markers: &[&str]) -> PathBuf {
    let p = dir.join("pairs.jsonl");
    let lines: Vec<String> = markers.iter().enumerate().map(|(i, m)| pair_line(i, m)).collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn annotate_cmd(server: &MockJudge, input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo2d"));
    c.args(["annotate", input.to_str().unwrap(), "-o", output.to_str().unwrap()])
        .args(["--base-url", server.base_url(), "--model", "judge-test", "--api-key-env", KEY_VAR])
        .args(["--timeout", "1.0", "--retry-backoff", "0.02", "--max-retries", "3", "-vv"])
        .args(extra)
        .env(KEY_VAR, KEY)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(out.status.success(), "annotate failed: {}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn read_pairs(p: &Path) -> Vec<Pair> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every byte the run left behind (stdout, stderr, every file in `dir`, the
/// SQLite cache included) must be free of the key and of every 8-byte piece of it.
fn assert_key_absent(out: &Output, dir: &Path) {
    let leaks = |bytes: &[u8]| KEY.as_bytes().windows(8).find(|f| bytes.windows(8).any(|w| w == *f)).map(String::from_utf8_lossy);
    assert_eq!(leaks(&out.stdout), None, "key fragment in stdout");
    assert_eq!(leaks(&out.stderr), None, "key fragment in stderr");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(leaks(&std::fs::read(&p).unwrap()), None, "key fragment in {}", p.display());
    }
}

fn assert_scored_as_judged(pairs: &[Pair]) {
    for p in pairs {
        let problems = check_pair(p, &LoadOptions::new(Requirement::Scored));
        assert!(problems.is_empty(), "{problems:?}");
        for r in [&p.chosen, &p.rejected] {
            let segs = r.segments().unwrap();
            let got: Vec<[u8; 5]> = segs.iter().map(|s| s.scores.unwrap().to_array()).collect();
            assert_eq!(got, expected_scores(segs));
        }
    }
}

#[test]
fn faults_end_annotated_or_reported_and_key_never_leaks() {
    let server = MockJudge::start(MockConfig { slow: Duration::from_millis(2500), retry_after_secs: 2, ..MockConfig::default() });
    let dir = tempfile::tempdir().unwrap();
    let markers = [
        "[[style:echokey]]",
        "[[fault:429@helpfulness]]",
        "[[fault:500@correctness]]",
        "[[fault:slow@safety]]",
        "[[fault:badjson@clarity]]",
        "[[fault:garbage@completeness]]",
        "[[fault:truncated@helpfulness]] [[style:markdown]]",
        "[[fault:missing@safety]] [[style:json]]",
        "[[fault:alwaysbad@correctness]]",
        "[[fault:500always@clarity]]",
        "[[fault:echokey@helpfulness]]",
    ];
    let input = write_input(dir.path(), &markers);
    let output = dir.path().join("scored.jsonl");
    let failed = dir.path().join("failed.jsonl");
    let out = run_ok(annotate_cmd(&server, &input, &output, &["--concurrency", "4", "--failed-out", failed.to_str().unwrap()]));
    let stderr = String::from_utf8_lossy(&out.stderr);

    // None lost: 8 written, 2 reported, and they are the right ones.
    let written = read_pairs(&output);
    let failed_rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&failed).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(written.len() + failed_rows.len(), markers.len());
    let failed_ids: Vec<&str> = failed_rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(failed_ids, vec!["p8", "p9", "p10"]);
    assert!(failed_rows[0]["errors"]["correctness"].as_str().unwrap().contains("repair"));
    assert!(failed_rows[1]["errors"]["clarity"].as_str().unwrap().contains("500"));
    // The error body echoed the key across the 300-character cut: redacted before the cut.
    let echoed = failed_rows[2]["errors"]["helpfulness"].as_str().unwrap();
    assert!(echoed.contains("Bearer ***"), "{echoed}");
    assert!(stderr.contains("Bearer ***"), "{stderr}");
    assert!(stderr.contains("failed: line 9 (id \"p8\")"), "{stderr}");
    assert_scored_as_judged(&written);

    // The faults were really hit and handled as designed.
    let stats = server.stats();
    let max_per_body = stats.per_body.values().copied().max().unwrap();
    assert_eq!(max_per_body, 4, "500always: 1 try + 3 retries");
    // Bodies tried twice: the 429 one (retry after Retry-After: 2 s), the
    // slow one (retry right after the 1 s timeout, long before the answer)
    // and the cut-off body one (retry after a short backoff).
    let spaced: Vec<u128> = stats.arrivals_ms.values().filter(|v| v.len() == 2).map(|v| v[1] - v[0]).collect();
    assert_eq!(spaced.len(), 3, "{spaced:?}");
    assert!(spaced.iter().any(|&d| d < 500), "no quick retry of the cut-off body: {spaced:?}");
    assert!(spaced.iter().any(|&d| d >= 1950), "no retry waited for Retry-After: {spaced:?}");
    assert!(spaced.iter().any(|&d| (950..1900).contains(&d)), "no retry right after the timeout: {spaced:?}");
    // Every request carried the key as a Bearer token.
    assert!(stats.authorization.iter().all(|a| a == &format!("Bearer {KEY}")));
    assert_eq!(stats.authorization.len() as u64, stats.requests);
    // The summary reports repairs and failures.
    assert!(stderr.contains("repairs"), "{stderr}");
    assert!(stderr.contains("pairs: 11 in, 8 written"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in redirected logs: {stderr}");
    assert_key_absent(&out, dir.path());

    // Dry run: bodies printed, nothing sent, no key.
    server.reset_stats();
    let out = run_ok(annotate_cmd(&server, &input, &dir.path().join("dry.jsonl"), &["--dry-run"]));
    assert_eq!(server.stats().requests, 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), markers.len() * 5);
    let body: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(body["model"], "judge-test");
    assert_eq!(body["temperature"], 0.0);
    assert_key_absent(&out, dir.path());
    // The printed bodies are exactly what a real run sends (same cache keys).
    assert!(stdout.lines().all(|l| stats.per_body.contains_key(&body_hash(l))));
}

#[test]
fn killed_run_resumes_sending_only_missing_requests() {
    let server = MockJudge::start(MockConfig { delay: Duration::from_millis(40), ..MockConfig::default() });
    let dir = tempfile::tempdir().unwrap();
    let markers = vec![""; 24];
    let input = write_input(dir.path(), &markers);
    let output = dir.path().join("scored.jsonl");
    let total = markers.len() * 5;

    let mut child =
        annotate_cmd(&server, &input, &output, &["--concurrency", "2"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while server.stats().completions < 30 {
        assert!(start.elapsed() < Duration::from_secs(20), "the annotator made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the annotator finished before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!output.exists(), "a killed run must not leave a partial output");
    let cache = Cache::open(&dir.path().join("scored.jsonl.cache.sqlite")).unwrap();
    let saved = cache.len().unwrap();
    drop(cache);
    assert!(saved >= 20 && saved < total, "saved {saved}");
    let first_run = server.stats();

    server.reset_stats();
    let out = run_ok(annotate_cmd(&server, &input, &output, &["--concurrency", "2"]));
    let second = server.stats();
    assert_eq!(second.requests as usize, total - saved, "only the missing judgements are requested");
    assert!(second.per_body.values().all(|&n| n == 1));
    // Nothing the first run committed is asked again.
    let committed_before: std::collections::HashSet<_> = first_run.completed_bodies.iter().collect();
    let overlap = second.per_body.keys().filter(|b| committed_before.contains(b)).count();
    assert!(overlap <= first_run.completions as usize - saved, "re-asked {overlap} committed judgements");
    let written = read_pairs(&output);
    assert_eq!(written.len(), markers.len());
    assert_scored_as_judged(&written);
    // The summary's cached column adds up to what the first run saved.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cached: usize = stderr
        .lines()
        .filter(|l| dpo2d_data::ASPECTS.iter().any(|a| l.starts_with(a)))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(cached, saved, "{stderr}");

    // A third run is served entirely from the cache.
    server.reset_stats();
    let before = std::fs::read(&output).unwrap();
    run_ok(annotate_cmd(&server, &input, &output, &[]));
    assert_eq!(server.stats().requests, 0);
    assert_eq!(std::fs::read(&output).unwrap(), before);
}

#[test]
fn concurrency_bound_holds() {
    let server = MockJudge::start(MockConfig { delay: Duration::from_millis(80), ..MockConfig::default() });
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[""; 6]);
    let output = dir.path().join("scored.jsonl");
    run_ok(annotate_cmd(&server, &input, &output, &["--concurrency", "3"]));
    let s = server.stats();
    assert_eq!(s.requests, 30);
    assert_eq!(s.max_in_flight, 3, "the bound is reached and never exceeded");
}

#[test]
fn compare_reports_agreement_table() {
    let server = MockJudge::start(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &["", "", ""]);
    let a = dir.path().join("a.jsonl");
    run_ok(annotate_cmd(&server, &input, &a, &[]));
    // B: the same annotation with one clarity rating moved by 2.
    let mut pairs = read_pairs(&a);
    if let dpo2d_data::Response::Segmented { segments } = &mut pairs[0].chosen {
        let s = segments[0].scores.as_mut().unwrap();
        s.clarity = if s.clarity >= 2 { s.clarity - 2 } else { s.clarity + 2 };
    }
    let b = dir.path().join("b.jsonl");
    std::fs::write(&b, pairs.iter().map(|p| serde_json::to_string(p).unwrap() + "\n").collect::<String>()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dpo2d")).args(["annotate", "compare"]).arg(&a).arg(&b).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("3 pair(s) matched by id"), "{table}");
    let n = pairs.iter().map(|p| p.chosen.segments().unwrap().len() + p.rejected.segments().unwrap().len()).sum::<usize>();
    let pct = 100.0 * (n - 1) as f64 / n as f64;
    let row = |aspect: &str| -> Vec<String> {
        let line = table.lines().find(|l| l.starts_with(aspect)).unwrap_or_else(|| panic!("no {aspect} row in {table}"));
        line.split_whitespace().skip(1).map(str::to_string).collect()
    };
    let (clarity, safety) = (row("clarity"), row("safety"));
    assert_eq!(clarity[..2], [format!("{pct:.1}"), format!("{pct:.1}")], "{table}");
    assert_eq!(clarity[3], n.to_string(), "{table}");
    let rho: f64 = clarity[2].parse().unwrap();
    assert!(rho > 0.0 && rho < 1.0, "one moved rating lowers the rank correlation below 1: {table}");
    // Every safety rating is the same, so there is no rank to correlate: "-".
    assert_eq!(safety, ["100.0", "100.0", "-", &n.to_string()].map(String::from).to_vec(), "{table}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_cleanly_and_keeps_finished_judgements() {
    let server = MockJudge::start(MockConfig { delay: Duration::from_millis(40), ..MockConfig::default() });
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[""; 12]);
    let output = dir.path().join("scored.jsonl");
    let child =
        annotate_cmd(&server, &input, &output, &["--concurrency", "2"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while server.stats().completions < 10 {
        assert!(start.elapsed() < Duration::from_secs(20), "the annotator made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("interrupted") && stderr.contains("rerun the same command"), "{stderr}");
    assert!(!output.exists());
    let saved = Cache::open(&dir.path().join("scored.jsonl.cache.sqlite")).unwrap().len().unwrap();
    assert!((8..60).contains(&saved), "saved {saved}");
    // The message's count was taken at the interrupt; a write already under
    // way may land just after it.
    let said: usize = stderr.split(" judgement(s) are saved").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(said <= saved && said + 2 >= saved, "said {said}, saved {saved}: {stderr}");
    assert_key_absent(&out, dir.path());
}

#[test]
fn structured_outputs_and_the_free_text_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &["", "[[fault:arith]]", ""]);
    // A server that answers the schema: parsed at once, no repair request.
    let honour = MockJudge::start(MockConfig { response_format: MockFormat::Honour, ..MockConfig::default() });
    let output = dir.path().join("schema.jsonl");
    run_ok(annotate_cmd(&honour, &input, &output, &["--response-format", "json-schema"]));
    let st = honour.stats();
    // The arithmetic fault answers free text: one repair, for each of its five aspects.
    assert_eq!((st.requests, st.with_response_format), (15 + 5, 20));
    assert_scored_as_judged(&read_pairs(&output));

    // A server that rejects response_format: free text from then on, the arithmetic never read as ratings.
    let reject = MockJudge::start(MockConfig { response_format: MockFormat::Reject, ..MockConfig::default() });
    let output = dir.path().join("fallback.jsonl");
    let out = run_ok(annotate_cmd(&reject, &input, &output, &["--concurrency", "1"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not take response_format"), "{stderr}");
    assert!(stderr.contains("answers were asked as free text"), "{stderr}");
    assert_eq!(reject.stats().with_response_format, 1, "one rejection is remembered for the run");
    assert_scored_as_judged(&read_pairs(&output));
    assert!(!stderr.contains('\x1b'), "colour codes in redirected logs");

    // --response-format free-text never sends the field.
    let free = MockJudge::start(MockConfig { response_format: MockFormat::Reject, ..MockConfig::default() });
    run_ok(annotate_cmd(&free, &input, &dir.path().join("free.jsonl"), &["--response-format", "free-text"]));
    assert_eq!((free.stats().with_response_format, free.stats().requests), (0, 20));
}
