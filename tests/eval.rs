//! `dpo2d eval` end to end against a scripted judge on 127.0.0.1: messy
//! grades read right, an unreadable answer asked again, both-order
//! aggregation of a judge with a position bias, the report files, resume
//! from the cache (a rerun asks nothing, a larger slice asks only for the
//! new questions), `eval compare`, a baseline model (`--baseline-path`)
//! judged against in both orders, and `dpo2d serve` as the judge.

mod common;

use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A judge that answers by rule: grades by question (as free text in
/// several messy formats, or as JSON when the request carries a schema; one
/// unreadable until asked again at a higher temperature), always the first
/// answer in comparisons (a pure position bias), fixed aspect ratings.
/// Counts the requests it gets.
struct ScriptedJudge {
    url: String,
    requests: Arc<AtomicUsize>,
    /// The user message of every request, in order.
    prompts: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

fn judge_answer(body: &Value) -> String {
    let system = body["messages"][0]["content"].as_str().unwrap_or("");
    let user = body["messages"][1]["content"].as_str().unwrap_or("");
    let retry = body["temperature"].as_f64().unwrap_or(0.0) > 0.0;
    if body.get("response_format").is_some() {
        return structured_answer(system, user, retry);
    }
    if system.contains("five aspects") {
        return "helpfulness: 6\n**Correctness**: 5/10\nsafety: 10\ncompleteness: 4\nclarity: 7".into();
    }
    if system.contains("two AI assistants") {
        return "Assistant A's answer reads better to me.\n\n[[A]]".into();
    }
    // Grades: the question is the first user turn in the prompt.
    if user.contains("q1") && !user.contains("turn 2") {
        "Clear and right.\nRating: [[7]]".into()
    } else if user.contains("q2") {
        "I'd give it 4/10.".into()
    } else if user.contains("q3") && user.contains("turn 2") {
        "**Rating:** 2".into()
    } else if user.contains("q3") {
        if retry {
            "Rating: [[5]]".into()
        } else {
            "The answer is fine I think".into()
        }
    } else {
        "Rating: [[9]]".into()
    }
}

/// The same judgements as JSON under the request's schema (q3's first grade
/// leaves the rating out).
fn structured_answer(system: &str, user: &str, retry: bool) -> String {
    if system.contains("five aspects") {
        return json!({"helpfulness": 6, "correctness": 5, "safety": 10, "completeness": 4, "clarity": 7}).to_string();
    }
    if system.contains("two AI assistants") {
        return json!({"assessment": "A reads better.", "verdict": "A"}).to_string();
    }
    let rating = match () {
        _ if user.contains("q1") && !user.contains("turn 2") => Some(7),
        _ if user.contains("q2") => Some(4),
        _ if user.contains("q3") && user.contains("turn 2") => Some(2),
        _ if user.contains("q3") => retry.then_some(5),
        _ => Some(9),
    };
    match rating {
        Some(r) => json!({"assessment": "Judged.", "rating": r}).to_string(),
        None => json!({"assessment": "The answer is fine I think"}).to_string(),
    }
}

impl ScriptedJudge {
    fn start() -> ScriptedJudge {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let prompts = Arc::new(Mutex::new(vec![]));
        let (counter, seen) = (requests.clone(), prompts.clone());
        let app = Router::new().route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| {
                let (counter, seen) = (counter.clone(), seen.clone());
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push(body["messages"][1]["content"].as_str().unwrap_or("").to_string());
                    Json(json!({
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": judge_answer(&body)}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5}
                    }))
                }
            }),
        );
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        rt.spawn(async move { axum::serve(listener, app).await });
        ScriptedJudge { url, requests, prompts, _rt: rt }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn write_questions(path: &Path, pairwise: bool) {
    let mut rows = vec![
        json!({"id": "a", "category": "one", "prompt": "what is q1 ."}),
        json!({"id": "b", "category": "one", "prompt": "what is q2 ."}),
        json!({"id": "c", "category": "two", "turns": ["what is q3 .", "what is it ."]}),
        json!({"id": "d", "category": "two", "prompt": "what is q4 ."}),
    ];
    if pairwise {
        for r in &mut rows {
            let n = if r.get("turns").is_some() { 2 } else { 1 };
            r["baseline"] = json!(vec!["the answer is good ."; n]);
        }
    }
    std::fs::write(path, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
}

fn eval(dir: &Path, judge_url: &str, bench: &Path, out: &str, extra: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["eval", "--bench", bench.to_str().unwrap(), "--model-path", dir.join("model").to_str().unwrap(), "--model-id", "tiny"])
        .args(["--base-url", judge_url, "--model", "scripted", "--max-new-tokens", "4", "--no-progress"])
        .args(["-o", dir.join(out).to_str().unwrap(), "--cache", dir.join("cache.sqlite").to_str().unwrap()])
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert!(o.status.success(), "eval failed:\n{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn results(dir: &Path, out: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(out).join("results.json")).unwrap()).unwrap()
}

#[test]
fn single_grades_are_read_from_messy_answers_and_resume_from_the_cache() {
    single_grades_resume_and_compare(&["--judge-response-format", "free-text"]);
}

/// The same run asking for JSON under a schema (the default with a server
/// that takes one): the same grades, the same requests.
#[test]
fn single_grades_are_read_from_structured_answers() {
    single_grades_resume_and_compare(&[]);
}

fn single_grades_resume_and_compare(format: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(&dir.path().join("model"));
    let qs = dir.path().join("qs.jsonl");
    write_questions(&qs, false);
    let judge = ScriptedJudge::start();

    // Three questions first (a, c, b: every category in turn), then all four.
    eval(dir.path(), &judge.url, &qs, "small", &[&["--limit", "3"], format].concat());
    // 4 answers (c has two turns) x (grade + aspects), plus one retry of c's unreadable grade.
    assert_eq!(judge.requests(), 4 * 2 + 1);
    let r = results(dir.path(), "small");
    let grades: Vec<(String, usize, Option<f64>)> = r["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["id"].as_str().unwrap().to_string(), x["turn"].as_u64().unwrap() as usize, x["grade"].as_f64()))
        .collect();
    assert_eq!(
        grades,
        vec![("a".into(), 1, Some(7.0)), ("c".into(), 1, Some(5.0)), ("c".into(), 2, Some(2.0)), ("b".into(), 1, Some(4.0))]
    );
    let s = &r["summary"];
    assert!((s["headline"]["mean"].as_f64().unwrap() - 4.5).abs() < 1e-9, "{s}");
    assert_eq!(s["headline"]["n"], 4);
    assert!((s["by_turn"]["2"]["mean"].as_f64().unwrap() - 2.0).abs() < 1e-9);
    assert!((s["aspects"]["correctness"]["mean"].as_f64().unwrap() - 5.0).abs() < 1e-9);
    assert_eq!(s["unparsed"], 0);
    for f in ["report.md", "categories.png", "aspects.png"] {
        assert!(dir.path().join("small").join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(dir.path().join("small/report.md")).unwrap();
    assert!(md.contains("| one |") && md.contains("| turn 2 |") && md.contains("| safety | 10.00"), "{md}");

    // The same run again asks nothing; the whole set asks only for d.
    eval(dir.path(), &judge.url, &qs, "small", &[&["--limit", "3"], format].concat());
    assert_eq!(judge.requests(), 9);
    eval(dir.path(), &judge.url, &qs, "all", format);
    assert_eq!(judge.requests(), 9 + 2);
    let all = results(dir.path(), "all");
    assert!((all["summary"]["headline"]["mean"].as_f64().unwrap() - (7.0 + 4.0 + 5.0 + 2.0 + 9.0) / 5.0).abs() < 1e-9);

    // Side by side.
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["eval", "compare", dir.path().join("small").to_str().unwrap(), dir.path().join("all").to_str().unwrap()])
        .args(["--plot", dir.path().join("cmp.png").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Paired over 4 answers scored in both runs: B - A = +0.00"), "{text}");
    assert!(text.contains("| score (1-10) | 4.50"), "{text}");
    assert!(dir.path().join("cmp.png").is_file());
}

#[test]
fn pairwise_judging_in_both_orders_cancels_a_position_bias() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(&dir.path().join("model"));
    let qs = dir.path().join("qs.jsonl");
    write_questions(&qs, true);
    let judge = ScriptedJudge::start();
    eval(dir.path(), &judge.url, &qs, "pair", &["--no-aspects"]);
    // 5 answers, each compared in both orders.
    assert_eq!(judge.requests(), 10);
    let r = results(dir.path(), "pair");
    assert_eq!(r["grading"], "pairwise-quick");
    assert_eq!(r["baseline"], "baseline");
    let s = &r["summary"];
    // The judge always picks the first answer: a win and a loss per question, a tie overall.
    assert!((s["headline"]["mean"].as_f64().unwrap() - 50.0).abs() < 1e-9, "{s}");
    assert_eq!((s["wins"].as_u64(), s["ties"].as_u64(), s["losses"].as_u64()), (Some(0), Some(5), Some(0)));
    assert_eq!(s["order_agreement"], 0.0);
    assert!((s["lc_win_rate"].as_f64().unwrap() - 50.0).abs() < 1.0, "{s}");
    let rec = &r["records"][0];
    assert_eq!(rec["verdict_model_first"], "A>B");
    assert_eq!(rec["verdict_model_second"], "B>A");
    assert!(s.get("aspects").unwrap().as_object().unwrap().is_empty());
}

/// The greedy answer of `model` to `prompt`, as `dpo2d generate` writes it.
fn greedy_answer(model: &Path, prompt: &str, max_new_tokens: usize) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", &max_new_tokens.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    line["completion"].as_str().unwrap().trim().to_string()
}

/// `--baseline-path`: a set without baseline answers is judged pairwise
/// against another model's answers, which the judge sees in both orders.
#[test]
fn a_baseline_model_is_judged_against_in_both_orders() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(&dir.path().join("model"));
    let other = dir.path().join("other");
    common::write_tiny_model_seeded(&other, 900);
    let qs = dir.path().join("qs.jsonl");
    write_questions(&qs, false);
    let judge = ScriptedJudge::start();
    let extra = ["--baseline-path", other.to_str().unwrap(), "--baseline-id", "other", "--no-aspects", "--limit", "2"];
    eval(dir.path(), &judge.url, &qs, "vs", &extra);
    let r = results(dir.path(), "vs");
    assert_eq!(r["grading"], "pairwise-quick");
    assert_eq!(r["baseline"], "other");
    // a (one turn) and c (two turns): 3 answers, each compared in both orders.
    assert_eq!(judge.requests(), 6);
    let (mine, theirs) = (greedy_answer(&dir.path().join("model"), "what is q1 .", 4), greedy_answer(&other, "what is q1 .", 4));
    assert_ne!(mine, theirs, "the two models must answer differently for this check");
    let shown = |a: &str, b: &str| {
        format!(
            "### Assistant A's answer\n{a}\n### End of assistant A's answer\n\n### Assistant B's answer\n{b}\n### End of assistant B's answer"
        )
    };
    let prompts = judge.prompts.lock().unwrap().clone();
    for (a, b) in [(&mine, &theirs), (&theirs, &mine)] {
        assert_eq!(prompts.iter().filter(|p| p.contains("what is q1 .") && p.contains(&shown(a, b))).count(), 1, "{prompts:#?}");
    }
    let rec = r["records"].as_array().unwrap().iter().find(|x| x["id"] == "a").unwrap().clone();
    assert_eq!(rec["baseline_chars"], theirs.chars().count());
    assert_eq!(rec["answer_chars"], mine.chars().count());
    // The judge always picks A: one win and one loss per answer, a tie overall.
    assert_eq!((rec["verdict_model_first"].as_str(), rec["verdict_model_second"].as_str()), (Some("A>B"), Some("B>A")));
}

#[test]
fn serve_can_be_the_judge() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(&dir.path().join("model"));
    // The judge's prompts are longer than the tiny model's 256 positions.
    let judge_dir = dir.path().join("judge");
    common::write_tiny_model(&judge_dir);
    let cfg_path = judge_dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = json!(4096);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let lm = dpo2d_model::load(&judge_dir, &Default::default()).unwrap();
    let srv = dpo2d_serve::spawn(lm, dpo2d_serve::ServeOptions { port: 0, ..Default::default() }).unwrap();
    let qs = dir.path().join("qs.jsonl");
    write_questions(&qs, true);
    let o = eval(dir.path(), &srv.base_url(), &qs, "served", &["--limit", "2", "--max-tokens", "8"]);
    let r = results(dir.path(), "served");
    // A random judge's answers are mostly unreadable; what matters is that
    // every request was answered and counted.
    let s = &r["summary"];
    assert_eq!(s["failed"], 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(r["records"].as_array().unwrap().len(), 3);
    srv.stop().unwrap();
}

#[test]
fn arithmetic_needs_no_judge_and_other_sets_do() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(&dir.path().join("model"));
    let run = |bench: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_dpo2d"))
            .args(["eval", "--bench", bench, "--model-path", dir.path().join("model").to_str().unwrap(), "--limit", "6"])
            .args(["--max-new-tokens", "4", "--no-progress", "-o", dir.path().join(out).to_str().unwrap()])
            .args(["--cache", dir.path().join("cache.sqlite").to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = run("arithmetic", "arith");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = results(dir.path(), "arith");
    assert_eq!(r["grading"], "checked");
    assert_eq!(r["records"].as_array().unwrap().len(), 6);
    // A random 32-word model writes no right answers.
    assert_eq!(r["summary"]["headline"]["mean"], 0.0);
    assert!(r["records"].as_array().unwrap().iter().all(|x| x["correct"] == false));
    assert!(String::from_utf8_lossy(&o.stdout).contains("final answers right"));
    assert!(r["records"].as_array().unwrap().iter().all(|x| x["calculations"].is_u64() && x["wrong_calculations"].is_u64()));
    // A level names its own set; a level that does not exist is refused.
    let o = run("arithmetic-1", "arith-1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = results(dir.path(), "arith-1");
    assert_eq!(r["set"], "arithmetic-1");
    assert!(r["source"].as_str().unwrap().contains("level 1: 1 step, tiny numbers"), "{}", r["source"]);
    let o = run("arithmetic-7", "arith-7");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("the arithmetic levels are 1-6"), "{}", String::from_utf8_lossy(&o.stderr));
    let qs = dir.path().join("qs.jsonl");
    write_questions(&qs, false);
    let o = run(qs.to_str().unwrap(), "judged");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs a judge: give --judge-base-url and --judge-model"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
