//! `dpo2d annotate` at scale, end to end through the built binary: a fleet
//! of fake judge servers (one dying mid-run, one answering 429 often), a
//! fleet that is down, kill -9 and rerun; the fake Batch API (files,
//! batches, status changes, a partly failed batch and an expired one), a
//! killed batch run that resumes polling; and the request and result files
//! that vLLM's `run_batch` reads and writes.

use dpo2d_annotate::cache::Cache;
use dpo2d_annotate::test_server::batch::{run_batch_file, BatchConfig};
use dpo2d_annotate::test_server::{expected_scores, MockConfig, MockJudge};
use dpo2d_data::Pair;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn pair_line(id: usize) -> String {
    serde_json::json!({
        "id": format!("p{id}"),
        "prompt": format!("Question {id}: name a colour and say why the sky is blue."),
        "chosen": format!("Blue is a colour. The sky is blue because of Rayleigh scattering ({id})."),
        "rejected": {"segments": [{"text": "Green. "}, {"text": format!("The sky reflects the sea ({id}).")}]},
    })
    .to_string()
}

fn write_input(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, (0..n).map(|i| pair_line(i) + "\n").collect::<String>()).unwrap();
    p
}

fn annotate(urls: &[&str], input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo2d"));
    c.args(["annotate", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--model", "judge-test", "--no-progress"]);
    for u in urls {
        c.args(["--base-url", u]);
    }
    c.args(["--timeout", "2.0", "--retry-backoff", "0.02", "--max-retries", "4"]).args(extra);
    c.env_remove("RUST_LOG").env_remove("OPENAI_API_KEY").stdin(Stdio::null());
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

/// Every pair is in the output with the scores the fake judge gives.
fn assert_all_scored(output: &Path, n: usize) {
    let pairs = read_pairs(output);
    assert_eq!(pairs.len(), n);
    for p in &pairs {
        for r in [&p.chosen, &p.rejected] {
            let segs = r.segments().unwrap();
            let got: Vec<[u8; 5]> = segs.iter().map(|s| s.scores.unwrap().to_array()).collect();
            assert_eq!(got, expected_scores(segs));
        }
    }
}

fn cached(output: &Path) -> usize {
    let mut s = output.as_os_str().to_owned();
    s.push(".cache.sqlite");
    Cache::open(Path::new(&s)).unwrap().len().unwrap()
}

/// A port nobody listens on.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}/v1")
}

/// Three servers, one of which dies after a few answers and one of which
/// answers every third request with 429: every judgement ends up in the
/// output, each request answered on exactly one server (the dead one's
/// answers that got through stay counted), and the summary lists each
/// server; a rerun asks nothing.
#[test]
fn a_fleet_with_a_dying_and_a_throttling_server_scores_every_pair() {
    let delay = Duration::from_millis(30);
    let steady = MockJudge::start(MockConfig { delay, ..MockConfig::default() });
    let throttled = MockJudge::start(MockConfig { delay, throttle_every: 3, retry_after_secs: 0, ..MockConfig::default() });
    let mut dying = Some(MockJudge::start(MockConfig { delay, ..MockConfig::default() }));
    let dying_url = dying.as_ref().unwrap().base_url().to_string();
    let dir = tempfile::tempdir().unwrap();
    let n = 16;
    let input = write_input(dir.path(), n);
    let output = dir.path().join("scored.jsonl");
    let child = annotate(&[steady.base_url(), throttled.base_url(), dying_url.as_str()], &input, &output, &["--concurrency", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while dying.as_ref().unwrap().stats().completions < 5 {
        assert!(start.elapsed() < Duration::from_secs(30), "the third server got no work");
        std::thread::sleep(Duration::from_millis(5));
    }
    let died_after = dying.take().unwrap().stats().completions; // dropped: the server stops
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_all_scored(&output, n);
    assert_eq!(cached(&output), n * 5, "one cached judgement per (pair, aspect)");
    let (a, b) = (steady.stats(), throttled.stats());
    assert!(a.completions > 0 && b.completions > 0, "both live servers took work");
    assert!(b.requests > b.completions, "the throttled server turned requests away");
    assert!(died_after >= 5);
    for body in a.completed_bodies.iter() {
        assert!(!b.completed_bodies.contains(body), "a request was answered by two live servers");
    }
    for url in [steady.base_url(), throttled.base_url(), dying_url.as_str()] {
        assert!(stderr.contains(&format!("server {url}:")), "no line for {url} in the summary:\n{stderr}");
    }
    assert!(stderr.contains("set aside"), "the dead server was never set aside:\n{stderr}");

    let again = run_ok(annotate(&[steady.base_url(), throttled.base_url()], &input, &output, &[]));
    assert!(String::from_utf8_lossy(&again.stderr).contains("requests: 0 sent"));
}

/// With room for every request on either server, requests still go to
/// the server with the fewer in flight: the two share them evenly.
#[test]
fn requests_go_to_the_least_busy_server() {
    let servers: Vec<MockJudge> =
        (0..2).map(|_| MockJudge::start(MockConfig { delay: Duration::from_millis(50), ..MockConfig::default() })).collect();
    let urls: Vec<&str> = servers.iter().map(|s| s.base_url()).collect();
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), 4);
    let output = dir.path().join("scored.jsonl");
    run_ok(annotate(&urls, &input, &output, &["--concurrency", "32"]));
    let (a, b) = (servers[0].stats().requests, servers[1].stats().requests);
    assert_eq!(a + b, 20);
    assert!((8..=12).contains(&a), "{a} and {b} requests: not shared by load");
    assert_all_scored(&output, 4);
}

/// kill -9 in the middle of a fleet run, and the same command again (with
/// one server fewer): nothing committed is asked again, nothing is lost.
#[test]
fn a_killed_fleet_run_resumes_with_nothing_lost_or_repeated() {
    let delay = Duration::from_millis(40);
    let servers: Vec<MockJudge> = (0..2).map(|_| MockJudge::start(MockConfig { delay, ..MockConfig::default() })).collect();
    let urls: Vec<&str> = servers.iter().map(|s| s.base_url()).collect();
    let dir = tempfile::tempdir().unwrap();
    let n = 20;
    let input = write_input(dir.path(), n);
    let output = dir.path().join("scored.jsonl");
    let mut child = annotate(&urls, &input, &output, &["--concurrency", "2"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while servers.iter().map(|s| s.stats().completions).sum::<u64>() < 30 {
        assert!(start.elapsed() < Duration::from_secs(30), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "finished before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!output.exists(), "a killed run must not leave a partial output");
    let saved = cached(&output);
    let first: Vec<_> = servers.iter().map(|s| s.stats()).collect();
    for s in &servers {
        s.reset_stats();
    }
    run_ok(annotate(&urls[..1], &input, &output, &[]));
    let second = servers[0].stats();
    assert_eq!(servers[1].stats().requests, 0);
    assert_eq!(second.requests as usize, n * 5 - saved, "only what is missing is asked");
    let committed: usize = first.iter().map(|s| s.completions as usize).sum();
    let repeated = second.per_body.keys().filter(|b| first.iter().any(|s| s.completed_bodies.contains(b))).count();
    assert!(repeated <= committed - saved, "asked again {repeated} judgements that were committed");
    assert_all_scored(&output, n);
}

/// Every server down: a clear error, no output, a cache a rerun can use.
#[test]
fn a_fleet_that_is_down_ends_with_a_clear_error_and_a_resumable_cache() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), 3);
    let output = dir.path().join("scored.jsonl");
    let (a, b) = (dead_url(), dead_url());
    let t = Instant::now();
    let out = annotate(&[&a, &b], &input, &output, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("are the servers running"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(!output.exists());
    assert_eq!(cached(&output), 0);
    // The same command against a live server finishes the job.
    let live = MockJudge::start(MockConfig::default());
    run_ok(annotate(&[live.base_url()], &input, &output, &[]));
    assert_all_scored(&output, 3);
}

fn batch_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["--batch", "--batch-poll-interval", "0.05", "--batch-max-requests", "20"];
    v.extend_from_slice(extra);
    v
}

/// The Batch API: the requests split into files of at most 20, a first
/// batch whose every 7th line fails, a second that expires half done, both
/// made up by follow-up batches: every pair scored, every request answered
/// once, none submitted again after its answer.
#[test]
fn batches_with_failed_and_expired_lines_score_every_pair_once() {
    let config =
        MockConfig { batch: BatchConfig { polls_to_finish: 2, fail_every_first: 7, expire_batch: Some(2) }, ..MockConfig::default() };
    let server = MockJudge::start(config);
    let dir = tempfile::tempdir().unwrap();
    let n = 9; // 45 requests: files of 20, 20 and 5
    let input = write_input(dir.path(), n);
    let output = dir.path().join("scored.jsonl");
    let out = run_ok(annotate(&[server.base_url()], &input, &output, &batch_args(&[])));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_all_scored(&output, n);
    let s = server.stats();
    assert_eq!(s.batch_answers.len(), n * 5, "{stderr}");
    assert!(s.batch_answers.values().all(|&k| k == 1), "a request was answered twice");
    // The failed (3 of the first 20) and expired (10 of the second) lines were submitted twice, no other.
    let twice = s.batch_submissions.values().filter(|&&k| k == 2).count();
    assert_eq!(twice, 3 + 10, "{stderr}");
    assert!(s.batch_submissions.values().all(|&k| k <= 2));
    assert!(s.batches_created >= 4, "three files and a follow-up: {}", s.batches_created);
    assert!(stderr.contains("follow-up"), "{stderr}");
    assert_eq!(s.requests, s.completions, "no direct request was needed");
}

/// A batch run killed while its batches are running: the rerun polls the
/// same batches (their ids are in the cache), submits nothing again, and
/// finishes.
#[test]
fn a_killed_batch_run_resumes_polling_and_submits_nothing_twice() {
    let config = MockConfig { batch: BatchConfig { polls_to_finish: 3, ..BatchConfig::default() }, ..MockConfig::default() };
    let server = MockJudge::start(config);
    let dir = tempfile::tempdir().unwrap();
    let n = 6;
    let input = write_input(dir.path(), n);
    let output = dir.path().join("scored.jsonl");
    let mut child =
        annotate(&[server.base_url()], &input, &output, &["--batch", "--batch-poll-interval", "5", "--batch-max-requests", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let start = Instant::now();
    while server.stats().batches_created < 2 {
        assert!(start.elapsed() < Duration::from_secs(20), "no batch was created");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run_ok(annotate(&[server.base_url()], &input, &output, &batch_args(&[])));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_all_scored(&output, n);
    let s = server.stats();
    assert_eq!(s.batches_created, 2, "the rerun submitted again:\n{stderr}");
    assert!(s.batch_submissions.values().all(|&k| k == 1));
    assert!(stderr.contains("2 resumed"), "{stderr}");
}

/// `--batch-write` then `--batch-read`: the request file a vLLM `run_batch`
/// would run, its output read back into scored pairs; a pair missing from
/// the results is reported, and asked for by the next file.
#[test]
fn request_and_result_files_round_trip_as_run_batch_uses_them() {
    let judge = MockJudge::start(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let n = 4;
    let input = write_input(dir.path(), n);
    let output = dir.path().join("scored.jsonl");
    let requests = dir.path().join("requests.jsonl");
    let out = run_ok(annotate(&[], &input, &output, &["--batch-write", requests.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("20 request(s) written"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!output.exists());
    let text = std::fs::read_to_string(&requests).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!((v["method"].as_str(), v["url"].as_str()), (Some("POST"), Some("/v1/chat/completions")));
        assert_eq!(v["body"]["model"], "judge-test");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = rt.block_on(run_batch_file(judge.base_url(), &text));
    // Leave out the last result line: its pair is reported, the others are written.
    let partial: String = results.lines().take(19).map(|l| format!("{l}\n")).collect();
    let results_path = dir.path().join("results.jsonl");
    std::fs::write(&results_path, partial).unwrap();
    let out = annotate(&[], &input, &output, &["--batch-read", results_path.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("not in the results file"), "{stderr}");
    assert_eq!(read_pairs(&output).len(), n - 1);
    // The next request file holds only the missing request.
    let again = dir.path().join("again.jsonl");
    run_ok(annotate(&[], &input, &output, &["--batch-write", again.to_str().unwrap()]));
    assert_eq!(std::fs::read_to_string(&again).unwrap().lines().count(), 1);
    std::fs::write(&results_path, results).unwrap();
    run_ok(annotate(&[], &input, &output, &["--batch-read", results_path.to_str().unwrap()]));
    assert_all_scored(&output, n);
}
