//! One evaluation: the model answers the set (and a baseline model, when
//! one is given), the judge grades every answer or compares it with the
//! baseline's in both orders and rates it on the five aspects, and the
//! results are summed up. Every answer and every judgement goes through the
//! cache, so an interrupted or repeated run only asks for what is missing.

use crate::answer::{answer_all, model_identity, AnswerSettings};
use crate::judge::{self, Verdict};
use crate::report::{Record, Results};
use crate::sets::{self, Grading, Question, SetSpec};
use anyhow::{bail, Context, Result};
use dpo2d_annotate::cache::{cache_key, Cache};
use dpo2d_annotate::client::{ChatClient, ChatError};
use dpo2d_annotate::expectation::{expected_rating, RatingFrom, TokenChoice};
use dpo2d_annotate::judge::{FormatChoice, JudgeSettings};
use dpo2d_annotate::prompt::ChatRequest;
use dpo2d_data::AspectWeights;
use dpo2d_data::Message;
use dpo2d_model::llama::LoadOptions;
use futures_util::StreamExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A model to answer with: its resolved path and the name the report uses.
#[derive(Clone)]
pub struct Answerer {
    pub path: PathBuf,
    pub name: String,
}

pub struct EvalOptions {
    /// A named set or a JSONL file.
    pub set: SetSpec,
    pub model: Answerer,
    /// Answers the set for pairwise judging instead of the set's own baseline.
    pub baseline: Option<Answerer>,
    pub load: LoadOptions,
    /// Needed by every set but the program-checked ones. Its `max_tokens`
    /// overrides the per-kind answer budgets (grades 512, quick verdicts 64,
    /// reasoned verdicts 1024, aspect ratings 96 tokens).
    pub judge: Option<JudgeSettings>,
    pub limit: Option<usize>,
    pub answer: AnswerSettings,
    /// Also rate each answer on the five aspects.
    pub aspects: bool,
    /// Where the data sets and the downloads live (`dpo2d` cache root).
    pub data_cache: PathBuf,
    /// The SQLite file of answers and judgements.
    pub cache: PathBuf,
    pub seed: u64,
    pub progress: bool,
}

/// One request to the judge.
#[derive(Debug, Clone)]
enum Ask {
    Grade { q: usize, turn: usize },
    Pair { q: usize, turn: usize, model_first: bool },
    Aspects { q: usize, turn: usize },
}

/// What came back for one [`Ask`].
#[derive(Debug, Clone)]
enum Got {
    Grade(Option<f64>),
    Verdict(Option<Verdict>),
    Aspects([Option<f64>; 5]),
    /// The request failed after its retries.
    Failed(String),
}

pub fn evaluate(o: &EvalOptions) -> Result<Results> {
    let set = sets::load(&o.set, &o.data_cache)?;
    let questions = match o.limit {
        Some(n) => sets::limit(&set.questions, n),
        None => set.questions.clone(),
    };
    let cache = Cache::open(&o.cache)?;
    let answers = answers_of(&o.model, &questions, o, &cache)?;
    let (grading, baseline_answers, baseline_name) = match &o.baseline {
        Some(b) => {
            let grading = if set.grading == Grading::PairwiseReasoned { Grading::PairwiseReasoned } else { Grading::PairwiseQuick };
            (grading, Some(answers_of(b, &questions, o, &cache)?), Some(b.name.clone()))
        }
        None => {
            let base = questions.iter().map(|q| q.baseline.clone()).collect::<Option<Vec<_>>>();
            (set.grading, base, set.baseline_name.clone())
        }
    };
    if grading == Grading::Checked {
        let records = check_all(&questions, &answers);
        return Ok(Results::new(&set, grading, &o.model.name, None, "none", &o.answer, o.limit, records, o.seed));
    }
    if grading != Grading::Single && baseline_answers.is_none() {
        bail!("{} is judged pairwise but has no baseline answers (give --baseline-path)", set.name);
    }
    let judge = o.judge.clone().with_context(|| format!("{} needs a judge: give --judge-base-url and --judge-model", set.name))?;
    let asks = plan(&questions, grading, o.aspects);
    let formats = FormatChoice::new(judge.response_format);
    let ctx = Arc::new(Ctx { questions, answers, baseline: baseline_answers, grading, judge, formats, cache });
    let got = judge_all(&ctx, &asks, o.progress)?;
    let records = assemble(&ctx, &asks, &got);
    Ok(Results::new(&set, grading, &o.model.name, baseline_name, &ctx.judge.model, &o.answer, o.limit, records, o.seed))
}

/// Program-checked answers: right or wrong final answer per question, and
/// the answer's score from its checked segments.
fn check_all(questions: &[Question], answers: &[Vec<String>]) -> Vec<Record> {
    questions
        .iter()
        .zip(answers)
        .map(|(q, a)| {
            let answer = a.first().map(String::as_str).unwrap_or("");
            let checked = q.problem.as_ref().map(|p| crate::arithmetic::check(p, answer));
            Record {
                id: q.id.clone(),
                category: q.category.clone(),
                turn: 1,
                answer_chars: answer.chars().count(),
                correct: checked.as_ref().map(|c| c.correct),
                // The paper's weights, as `iterate` ranks answers by default; an empty answer (no segments) scores 0.
                calculations: checked.as_ref().map(|c| c.calculations),
                wrong_calculations: checked.as_ref().map(|c| c.wrong_calculations),
                checked_score: checked.map(|c| dpo2d_data::rank::sample_score(&c.response, &AspectWeights::PAPER).unwrap_or(0.0)),
                ..Record::default()
            }
        })
        .collect()
}

fn answers_of(m: &Answerer, questions: &[Question], o: &EvalOptions, cache: &Cache) -> Result<Vec<Vec<String>>> {
    let identity = model_identity(&m.path)?;
    let lm = dpo2d_model::load(&m.path, &o.load).with_context(|| format!("loading {}", m.name))?;
    answer_all(&lm, &identity, questions, &o.answer, cache, &m.name, o.progress)
}

/// Every request the judge gets: per question and turn a grade (or both
/// orders of a comparison), plus the aspect ratings.
fn plan(questions: &[Question], grading: Grading, aspects: bool) -> Vec<Ask> {
    let mut asks = vec![];
    for (q, question) in questions.iter().enumerate() {
        for turn in 0..question.turns.len() {
            match grading {
                Grading::Single | Grading::Checked => asks.push(Ask::Grade { q, turn }),
                _ => {
                    asks.push(Ask::Pair { q, turn, model_first: true });
                    asks.push(Ask::Pair { q, turn, model_first: false });
                }
            }
            if aspects {
                asks.push(Ask::Aspects { q, turn });
            }
        }
    }
    asks
}

struct Ctx {
    questions: Vec<Question>,
    answers: Vec<Vec<String>>,
    baseline: Option<Vec<Vec<String>>>,
    grading: Grading,
    judge: JudgeSettings,
    formats: FormatChoice,
    cache: Cache,
}

impl Ctx {
    /// The request of one judgement, asking for a JSON schema or for free text.
    fn request(&self, ask: &Ask, structured: bool, temperature: f32) -> ChatRequest {
        let budget = |default: u32| self.judge.max_tokens_or(default);
        let ((system, user), max_tokens, format) = match *ask {
            Ask::Grade { q, turn } => {
                let qu = &self.questions[q];
                (
                    judge::grade_prompt(&qu.turns, &self.answers[q], qu.reference.as_deref(), turn, structured),
                    budget(512),
                    judge::grade_format(),
                )
            }
            Ask::Pair { q, turn, model_first } => {
                let qu = &self.questions[q];
                let base = &self.baseline.as_ref().expect("pairwise asks have a baseline")[q];
                let (a, b) = if model_first { (&self.answers[q], base) } else { (base, &self.answers[q]) };
                let reasoned = self.grading == Grading::PairwiseReasoned;
                let prompt = judge::pair_prompt(self.grading, &qu.turns, a, b, qu.reference.as_deref(), turn, structured);
                (prompt, budget(if reasoned { 1024 } else { 64 }), judge::verdict_format(self.grading))
            }
            Ask::Aspects { q, turn } => {
                (judge::aspect_prompt(&self.questions[q].turns, &self.answers[q], turn, structured), budget(96), judge::aspects_format())
            }
        };
        ChatRequest {
            model: self.judge.model.clone(),
            messages: vec![Message { role: "system".into(), content: system }, Message { role: "user".into(), content: user }],
            temperature,
            max_tokens,
            response_format: structured.then_some(format),
            logprobs: None,
            top_logprobs: None,
        }
        .with_logprobs(self.judge.rating_from)
    }
}

/// What an answer says; grades and aspect ratings as expectations over
/// the rating tokens' probabilities where they are asked for and shown.
fn read(ask: &Ask, answer: &Answer) -> Got {
    let scale: Vec<i64> = (1..=10).collect();
    let lps = &answer.logprobs;
    match ask {
        Ask::Grade { .. } => {
            let text = judge::parse_grade(&answer.text);
            Got::Grade(text.and(expected_rating(lps, &["\"rating\"", "rating"], &scale)).or(text))
        }
        Ask::Pair { .. } => Got::Verdict(judge::parse_verdict(&answer.text)),
        Ask::Aspects { .. } => {
            let mut got = judge::parse_aspects(&answer.text);
            for (g, name) in got.iter_mut().zip(dpo2d_data::ASPECTS) {
                let key = format!("\"{name}\"");
                *g = g.and(expected_rating(lps, &[&key, name], &scale)).or(*g);
            }
            Got::Aspects(got)
        }
    }
}

/// A judge's answer: its text, and its tokens' log-probabilities when they
/// were asked for (cached together, as JSON, in that case).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Answer {
    text: String,
    #[serde(default)]
    logprobs: Vec<TokenChoice>,
}

impl Answer {
    fn to_cache(&self, with_logprobs: bool) -> Result<String> {
        Ok(if with_logprobs { serde_json::to_string(self)? } else { self.text.clone() })
    }

    fn from_cache(s: String, with_logprobs: bool) -> Answer {
        match with_logprobs {
            true => serde_json::from_str(&s).unwrap_or(Answer { text: s, logprobs: vec![] }),
            false => Answer { text: s, logprobs: vec![] },
        }
    }
}

fn parsed(g: &Got) -> bool {
    match g {
        Got::Grade(v) => v.is_some(),
        Got::Verdict(v) => v.is_some(),
        Got::Aspects(v) => v.iter().any(Option::is_some),
        Got::Failed(_) => true,
    }
}

/// Asks the judge everything, `concurrency` requests at a time.
fn judge_all(ctx: &Arc<Ctx>, asks: &[Ask], progress: bool) -> Result<Vec<Got>> {
    let client = Arc::new(ctx.judge.client()?);
    let bar = dpo2d_ui::progress::bar_if(
        progress,
        asks.len() as u64,
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} judgements, eta {eta}",
    );
    let fatal = Arc::new(AtomicBool::new(false));
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")?;
    let results: Vec<(usize, Result<Got>)> = rt.block_on(async {
        futures_util::stream::iter(asks.iter().cloned().enumerate())
            .map(|(i, ask)| {
                let (ctx, client, bar, fatal) = (ctx.clone(), client.clone(), bar.clone(), fatal.clone());
                async move {
                    let r =
                        if fatal.load(Ordering::SeqCst) { Ok(Got::Failed("stopped".into())) } else { ask_judge(&ctx, &client, &ask).await };
                    if r.is_err() {
                        fatal.store(true, Ordering::SeqCst);
                    }
                    bar.inc(1);
                    (i, r)
                }
            })
            .buffer_unordered(ctx.judge.concurrency.max(1) * 2)
            .collect()
            .await
    });
    bar.finish_and_clear();
    let mut out = vec![Got::Failed("not asked".into()); asks.len()];
    for (i, r) in results {
        out[i] = r?;
    }
    let failed: Vec<&String> = out.iter().filter_map(|g| if let Got::Failed(m) = g { Some(m) } else { None }).collect();
    if let Some(first) = failed.first() {
        tracing::warn!("{} judge request(s) failed (rerun to retry them); the first: {first}", failed.len());
    }
    Ok(out)
}

/// One judgement: from the cache, else from the judge; an unreadable
/// answer is asked once more at a higher temperature. `Err` only for what
/// stops the run (the server refuses everything).
async fn ask_judge(ctx: &Ctx, client: &ChatClient, ask: &Ask) -> Result<Got> {
    let mut last = Got::Failed("no answer".into());
    let with_logprobs = ctx.judge.rating_from.asks_logprobs();
    for temperature in [0.0f32, 0.7] {
        let answer = match cached(ctx, ask, temperature).await? {
            Some(t) => Answer::from_cache(t, with_logprobs),
            None => match ctx.formats.complete(client, |s| ctx.request(ask, s, temperature)).await {
                Ok((_, c)) if ctx.judge.rating_from == RatingFrom::Logprobs && c.logprobs.is_empty() => {
                    bail!("the judge's server returned no log-probabilities (use --judge-rating-from auto or text)")
                }
                Ok((req, c)) => {
                    let answer = Answer { text: c.content, logprobs: c.logprobs };
                    let key = cache_key(&ctx.judge.model, &serde_json::to_string(&req)?);
                    ctx.cache.put_text_async(key, "judgement", answer.to_cache(with_logprobs)?).await?;
                    answer
                }
                Err(ChatError::Fatal(m)) => bail!("the judge refuses requests: {m}"),
                Err(e) => return Ok(Got::Failed(e.to_string())),
            },
        };
        last = read(ask, &answer);
        if parsed(&last) {
            break;
        }
    }
    Ok(last)
}

/// A judgement already in the cache, in any form the run may use.
async fn cached(ctx: &Ctx, ask: &Ask, temperature: f32) -> Result<Option<String>> {
    for &structured in ctx.formats.forms() {
        let body = serde_json::to_string(&ctx.request(ask, structured, temperature))?;
        if let Some(t) = ctx.cache.get_text_async(cache_key(&ctx.judge.model, &body)).await? {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// Per question and turn: the grade, or the model's outcome over both orders, and the aspects.
fn assemble(ctx: &Ctx, asks: &[Ask], got: &[Got]) -> Vec<Record> {
    let mut records: Vec<Record> = vec![];
    let mut index = std::collections::HashMap::new();
    for (q, question) in ctx.questions.iter().enumerate() {
        for turn in 0..question.turns.len() {
            index.insert((q, turn), records.len());
            records.push(Record {
                id: question.id.clone(),
                category: question.category.clone(),
                turn: turn + 1,
                answer_chars: ctx.answers[q][turn].chars().count(),
                baseline_chars: ctx.baseline.as_ref().map(|b| b[q][turn].chars().count()),
                ..Record::default()
            });
        }
    }
    for (ask, g) in asks.iter().zip(got) {
        let (q, turn) = match *ask {
            Ask::Grade { q, turn } | Ask::Pair { q, turn, .. } | Ask::Aspects { q, turn } => (q, turn),
        };
        let r = &mut records[index[&(q, turn)]];
        match (ask, g) {
            (_, Got::Failed(_)) => r.failed += 1,
            (Ask::Grade { .. }, Got::Grade(v)) => {
                r.grade = *v;
                r.unparsed += v.is_none() as usize;
            }
            (Ask::Pair { model_first, .. }, Got::Verdict(v)) => {
                // Stored from the model's side: "A" is always the model.
                let v = v.map(|v| if *model_first { v } else { v.swapped() });
                if *model_first {
                    r.verdict_model_first = v;
                } else {
                    r.verdict_model_second = v;
                }
                r.unparsed += v.is_none() as usize;
            }
            (Ask::Aspects { .. }, Got::Aspects(v)) => {
                r.aspects = *v;
                r.unparsed += v.iter().all(Option::is_none) as usize;
            }
            _ => {}
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arithmetic::{generate, Split};

    #[test]
    fn checked_answers_get_a_verdict_and_a_segment_score() {
        let p = generate(1, 9, Split::HeldOut, crate::arithmetic::Level::DEFAULT).remove(0);
        let q = Question {
            id: p.id.clone(),
            category: "c".into(),
            turns: vec![p.prompt()],
            reference: None,
            baseline: None,
            problem: Some(p.clone()),
        };
        let right = format!("The answer is {}.", p.answer);
        let wrong = format!("The answer is {}.", p.answer + 1);
        let r = check_all(&[q.clone(), q.clone(), q], &[vec![right], vec![wrong], vec![String::new()]]);
        assert_eq!(r.iter().map(|r| r.correct).collect::<Vec<_>>(), [Some(true), Some(false), Some(false)]);
        let s: Vec<f64> = r.iter().map(|r| r.checked_score.unwrap()).collect();
        assert!(s[0] > s[1] && s[1] > 0.0 && s[2] == 0.0, "{s:?}");
    }

    /// Grades and aspect ratings read as expectations where the answer's
    /// log-probabilities show the rating tokens; verdicts and answers
    /// without log-probs as written; an answer cached with its log-probs
    /// reads the same back.
    #[test]
    fn ratings_from_logprobs_are_expectations() {
        let tok = |t: &str, top: &[(&str, f64)]| TokenChoice {
            token: t.into(),
            logprob: top.iter().find(|(s, _)| *s == t).map(|(_, p)| p.ln()).unwrap_or(0.0),
            top: top.iter().map(|(s, p)| (s.to_string(), p.ln())).collect(),
        };
        let grade = Answer {
            text: r#"{"assessment": "fine", "rating": 8}"#.into(),
            logprobs: vec![tok(r#"{"assessment": "fine", "rating": "#, &[]), tok("8", &[("8", 0.5), ("6", 0.5)]), tok("}", &[])],
        };
        let g = Ask::Grade { q: 0, turn: 0 };
        assert!(matches!(read(&g, &grade), Got::Grade(Some(v)) if (v - 7.0).abs() < 1e-9));
        let plain = Answer { text: grade.text.clone(), logprobs: vec![] };
        assert!(matches!(read(&g, &plain), Got::Grade(Some(v)) if v == 8.0));
        let back = Answer::from_cache(grade.to_cache(true).unwrap(), true);
        assert!(matches!(read(&g, &back), Got::Grade(Some(v)) if (v - 7.0).abs() < 1e-9));
        assert_eq!(Answer::from_cache(grade.to_cache(false).unwrap(), false).logprobs, vec![]);

        let text = "helpfulness: 6\ncorrectness: 5\nsafety: 10\ncompleteness: 4\nclarity: 7";
        let mut logprobs = vec![];
        for line in text.split('\n') {
            let (key, v) = line.split_once(' ').unwrap();
            logprobs.push(tok(&format!("{key} "), &[]));
            // Correctness leans to 9 from the 5 written.
            let top: Vec<(&str, f64)> = if key == "correctness:" { vec![(v, 0.5), ("9", 0.5)] } else { vec![(v, 1.0)] };
            logprobs.push(tok(v, &top));
            logprobs.push(tok("\n", &[]));
        }
        let Got::Aspects(a) = read(&Ask::Aspects { q: 0, turn: 0 }, &Answer { text: text.into(), logprobs }) else { panic!() };
        assert_eq!(a, [Some(6.0), Some(7.0), Some(10.0), Some(4.0), Some(7.0)]);
    }
}
