//! Results of a run (`results.json`), their summary with confidence
//! intervals, the Markdown report, PNG charts per category and per aspect,
//! and the side-by-side comparison of two runs.

use crate::answer::AnswerSettings;
use crate::judge::Verdict;
use crate::sets::{Grading, QuestionSet};
use crate::stats::{bootstrap_mean, length_controlled_win_rate, Estimate, Judged};
use anyhow::{anyhow, Context, Result};
use dpo2d_data::ASPECTS;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One (question, turn).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub category: String,
    /// 1-based.
    pub turn: usize,
    pub answer_chars: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_chars: Option<usize>,
    /// Single grading: 1-10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<f64>,
    /// Checked by a program: whether the final answer is right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
    /// Checked by a program: the answer's score from its segments' checked
    /// scores, reduced and weighted as `dpo2d iterate` ranks answers (0-4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_score: Option<f64>,
    /// Checked by a program: the calculations the answer states, and how many are wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calculations: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrong_calculations: Option<usize>,
    /// Pairwise, as seen from the model ("A" = the model) in each order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_model_first: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_model_second: Option<Verdict>,
    /// 1-10 per aspect, in the order of `aspects` in the summary.
    pub aspects: [Option<f64>; 5],
    /// Judge answers that could not be read, and requests that failed.
    pub unparsed: usize,
    pub failed: usize,
}

impl Record {
    /// The model's outcome over both orders (1 win, 0.5 tie, 0 loss); one
    /// order alone when the other is missing.
    pub fn outcome(&self) -> Option<f64> {
        let s: Vec<f64> = [self.verdict_model_first, self.verdict_model_second].iter().flatten().map(|v| v.score_for_a()).collect();
        (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
    }

    /// The value this record adds to the headline number.
    pub fn value(&self, grading: Grading) -> Option<f64> {
        match grading {
            Grading::Single => self.grade,
            Grading::Checked => self.correct.map(|c| if c { 100.0 } else { 0.0 }),
            Grading::PairwiseQuick | Grading::PairwiseReasoned => self.outcome().map(|o| o * 100.0),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Mean grade (single) or win rate in % (pairwise).
    pub headline: Option<Estimate>,
    /// Length-controlled win rate in % (pairwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lc_win_rate: Option<f64>,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// Share of comparisons whose two orders agree on the winner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_agreement: Option<f64>,
    pub by_category: BTreeMap<String, Estimate>,
    /// Checked sets: the mean of the answers' `checked_score`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_score: Option<Estimate>,
    /// Checked sets: the share of all stated calculations that are wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrong_calculation_share: Option<f64>,
    pub by_turn: BTreeMap<usize, Estimate>,
    pub aspects: BTreeMap<String, Estimate>,
    pub mean_answer_chars: f64,
    pub unparsed: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub set: String,
    pub source: String,
    pub grading: Grading,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    pub judge: String,
    pub questions: usize,
    pub max_new_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    pub summary: Summary,
    pub records: Vec<Record>,
}

impl Results {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        set: &QuestionSet,
        grading: Grading,
        model: &str,
        baseline: Option<String>,
        judge: &str,
        answer: &AnswerSettings,
        limit: Option<usize>,
        records: Vec<Record>,
        seed: u64,
    ) -> Results {
        let questions = records.iter().map(|r| r.id.as_str()).collect::<std::collections::BTreeSet<_>>().len();
        Results {
            set: set.name.clone(),
            source: set.source.clone(),
            grading,
            model: model.to_string(),
            baseline,
            judge: judge.to_string(),
            questions,
            max_new_tokens: answer.max_new_tokens,
            limit,
            summary: summarize(grading, &records, seed),
            records,
        }
    }

    pub fn is_pairwise(&self) -> bool {
        matches!(self.grading, Grading::PairwiseQuick | Grading::PairwiseReasoned)
    }

    fn unit(&self) -> &'static str {
        match self.grading {
            Grading::Single => "score (1-10)",
            Grading::Checked => "accuracy %",
            Grading::PairwiseQuick | Grading::PairwiseReasoned => "win rate %",
        }
    }

    fn graded_by(&self) -> String {
        match self.grading {
            Grading::Checked => "checked by a program".into(),
            _ => format!("judge {}", self.judge),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = dir.join("results.json");
        dpo2d_fs::write_file(&json, serde_json::to_string_pretty(self)?)?;
        let md = dir.join("report.md");
        dpo2d_fs::write_file(&md, self.markdown())?;
        let mut written = vec![json, md];
        let cats: Vec<(String, Estimate)> = self.summary.by_category.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let (lo, hi) = if self.grading == Grading::Single { (0.0, 10.0) } else { (0.0, 100.0) };
        if !cats.is_empty() {
            let p = dir.join("categories.png");
            bar_chart(&p, &format!("{} by category: {}", self.unit(), self.model), &[(self.model.clone(), cats)], lo, hi)?;
            written.push(p);
        }
        let aspects: Vec<(String, Estimate)> = self.summary.aspects.iter().map(|(k, v)| (k.clone(), *v)).collect();
        if !aspects.is_empty() {
            let p = dir.join("aspects.png");
            bar_chart(&p, &format!("aspect ratings (1-10): {}", self.model), &[(self.model.clone(), aspects)], 0.0, 10.0)?;
            written.push(p);
        }
        Ok(written)
    }

    pub fn load(dir_or_file: &Path) -> Result<Results> {
        let p = if dir_or_file.is_dir() { dir_or_file.join("results.json") } else { dir_or_file.to_path_buf() };
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {} (is it a `dpo2d eval` output directory?)", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a dpo2d eval results file", p.display()))
    }

    pub fn markdown(&self) -> String {
        let s = &self.summary;
        let mut m = String::new();
        let _ = writeln!(m, "# {} — {}\n", self.set, self.model);
        let _ = writeln!(
            m,
            "- questions: {} ({} answers scored){}",
            self.questions,
            self.records.len(),
            self.limit.map(|l| format!(", --limit {l}")).unwrap_or_default()
        );
        let _ = writeln!(m, "- graded by: {}", self.graded_by());
        if let Some(b) = &self.baseline {
            let _ = writeln!(m, "- baseline: {b} (judged in both orders)");
        }
        let _ =
            writeln!(m, "- answers: greedy, at most {} new tokens; mean length {:.0} characters", self.max_new_tokens, s.mean_answer_chars);
        let _ = writeln!(m, "- set: {}\n", self.source);
        if self.is_pairwise() {
            let _ = writeln!(m, "| win rate % (95% CI) | length-controlled % | wins | ties | losses | orders agree |");
            let _ = writeln!(m, "|---|---|---|---|---|---|");
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                fmt_est(s.headline),
                s.lc_win_rate.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
                s.wins,
                s.ties,
                s.losses,
                s.order_agreement.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or("-".into())
            );
        } else if self.grading == Grading::Checked {
            let _ = writeln!(
                m,
                "| final answers right, % (95% CI) | answer score 0-4, checked per segment (95% CI) | stated calculations wrong, % | problems |"
            );
            let _ = writeln!(m, "|---|---|---|---|");
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                fmt_est(s.headline),
                fmt_est(s.checked_score),
                s.wrong_calculation_share.map(|v| format!("{:.1}", v * 100.0)).unwrap_or("-".into()),
                s.headline.map(|e| e.n).unwrap_or(0)
            );
        } else {
            let _ = writeln!(m, "| score 1-10 (95% CI) | answers graded |");
            let _ = writeln!(m, "|---|---|");
            let _ = writeln!(m, "| {} | {} |", fmt_est(s.headline), s.headline.map(|e| e.n).unwrap_or(0));
        }
        table(&mut m, &format!("By category ({})", self.unit()), "category", &s.by_category);
        if s.by_turn.len() > 1 {
            let turns: BTreeMap<String, Estimate> = s.by_turn.iter().map(|(k, v)| (format!("turn {k}"), *v)).collect();
            table(&mut m, &format!("By turn ({})", self.unit()), "turn", &turns);
        }
        table(&mut m, "By aspect (judge's rating, 1-10)", "aspect", &s.aspects);
        if s.unparsed + s.failed > 0 {
            let _ = writeln!(
                m,
                "\n{} judge answer(s) could not be read and {} request(s) failed; they are left out of the numbers above.",
                s.unparsed, s.failed
            );
        }
        m
    }
}

fn fmt_est(e: Option<Estimate>) -> String {
    match e {
        Some(e) => format!("{:.2} ({:.2}-{:.2})", e.mean, e.low, e.high),
        None => "-".into(),
    }
}

fn table(m: &mut String, title: &str, key: &str, rows: &BTreeMap<String, Estimate>) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(m, "\n## {title}\n\n| {key} | mean (95% CI) | n |\n|---|---|---|");
    for (k, e) in rows {
        let _ = writeln!(m, "| {k} | {} | {} |", fmt_est(Some(*e)), e.n);
    }
}

pub fn summarize(grading: Grading, records: &[Record], seed: u64) -> Summary {
    let est = |rs: &mut dyn Iterator<Item = f64>| bootstrap_mean(&rs.collect::<Vec<_>>(), seed);
    let headline = est(&mut records.iter().filter_map(|r| r.value(grading)));
    let mut by_category = BTreeMap::new();
    let mut by_turn = BTreeMap::new();
    let cats: std::collections::BTreeSet<&str> = records.iter().map(|r| r.category.as_str()).collect();
    for c in cats {
        if let Some(e) = est(&mut records.iter().filter(|r| r.category == c).filter_map(|r| r.value(grading))) {
            by_category.insert(c.to_string(), e);
        }
    }
    let turns: std::collections::BTreeSet<usize> = records.iter().map(|r| r.turn).collect();
    for t in turns {
        if let Some(e) = est(&mut records.iter().filter(|r| r.turn == t).filter_map(|r| r.value(grading))) {
            by_turn.insert(t, e);
        }
    }
    let mut aspects = BTreeMap::new();
    for (i, a) in ASPECTS.iter().enumerate() {
        if let Some(e) = est(&mut records.iter().filter_map(|r| r.aspects[i])) {
            aspects.insert(a.to_string(), e);
        }
    }
    let outcomes: Vec<f64> = records.iter().filter_map(Record::outcome).collect();
    let judged: Vec<Judged> = records
        .iter()
        .flat_map(|r| {
            let d = r.answer_chars as f64 - r.baseline_chars.unwrap_or(0) as f64;
            [(r.verdict_model_first, true), (r.verdict_model_second, false)]
                .into_iter()
                .filter_map(move |(v, first)| v.map(|v| Judged { outcome: v.score_for_a(), length_diff: d, model_first: first }))
        })
        .collect();
    let both: Vec<&Record> = records.iter().filter(|r| r.verdict_model_first.is_some() && r.verdict_model_second.is_some()).collect();
    let agree =
        both.iter().filter(|r| r.verdict_model_first.map(Verdict::score_for_a) == r.verdict_model_second.map(Verdict::score_for_a)).count();
    let pairwise = matches!(grading, Grading::PairwiseQuick | Grading::PairwiseReasoned);
    Summary {
        headline,
        lc_win_rate: if pairwise { length_controlled_win_rate(&judged).map(|v| v * 100.0) } else { None },
        wins: outcomes.iter().filter(|&&o| o > 0.5).count(),
        ties: outcomes.iter().filter(|&&o| o == 0.5).count(),
        losses: outcomes.iter().filter(|&&o| o < 0.5).count(),
        order_agreement: (pairwise && !both.is_empty()).then(|| agree as f64 / both.len() as f64),
        by_category,
        checked_score: est(&mut records.iter().filter_map(|r| r.checked_score)),
        wrong_calculation_share: {
            let stated: usize = records.iter().filter_map(|r| r.calculations).sum();
            let wrong: usize = records.iter().filter_map(|r| r.wrong_calculations).sum();
            (stated > 0).then(|| wrong as f64 / stated as f64)
        },
        by_turn,
        aspects,
        mean_answer_chars: records.iter().map(|r| r.answer_chars as f64).sum::<f64>() / records.len().max(1) as f64,
        unparsed: records.iter().map(|r| r.unparsed).sum(),
        failed: records.iter().map(|r| r.failed).sum(),
    }
}

/// Two runs side by side: headline, categories, aspects, and (same set,
/// same questions) the paired difference with a bootstrap interval.
pub fn compare(a: &Results, b: &Results, seed: u64) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# {} vs {}\n", a.model, b.model);
    let _ = writeln!(m, "- A: {} on {} ({}, {})", a.model, a.set, a.unit(), a.graded_by());
    let _ = writeln!(m, "- B: {} on {} ({}, {})", b.model, b.set, b.unit(), b.graded_by());
    if a.set != b.set || a.grading != b.grading || a.judge != b.judge || a.baseline != b.baseline {
        let _ = writeln!(m, "\nNote: the runs differ in set, grading, judge or baseline; their numbers are not strictly comparable.");
    }
    let rows = |f: &dyn Fn(&Results) -> BTreeMap<String, Estimate>| {
        let (ma, mb) = (f(a), f(b));
        let keys: std::collections::BTreeSet<String> = ma.keys().chain(mb.keys()).cloned().collect();
        keys.into_iter().map(|k| (k.clone(), ma.get(&k).copied(), mb.get(&k).copied())).collect::<Vec<_>>()
    };
    let section = |m: &mut String, title: &str, rs: Vec<(String, Option<Estimate>, Option<Estimate>)>| {
        if rs.is_empty() {
            return;
        }
        let _ = writeln!(m, "\n## {title}\n\n| | A | B | B - A |\n|---|---|---|---|");
        for (k, x, y) in rs {
            let d = match (x, y) {
                (Some(x), Some(y)) => format!("{:+.2}", y.mean - x.mean),
                _ => "-".into(),
            };
            let _ = writeln!(m, "| {k} | {} | {} | {d} |", fmt_est(x), fmt_est(y));
        }
    };
    let head = |r: &Results| r.summary.headline.map(|e| BTreeMap::from([(r.unit().to_string(), e)])).unwrap_or_default();
    section(&mut m, "Overall", rows(&head));
    if let (Some(x), Some(y)) = (a.summary.lc_win_rate, b.summary.lc_win_rate) {
        let _ = writeln!(m, "| length-controlled win rate % | {x:.1} | {y:.1} | {:+.1} |", y - x);
    }
    section(&mut m, "By category", rows(&|r| r.summary.by_category.clone()));
    section(&mut m, "By aspect (1-10)", rows(&|r| r.summary.aspects.clone()));
    // Paired: the same (question, turn) in both runs.
    if a.set == b.set && a.grading == b.grading {
        let bmap: BTreeMap<(&str, usize), &Record> = b.records.iter().map(|r| ((r.id.as_str(), r.turn), r)).collect();
        let diffs: Vec<f64> = a
            .records
            .iter()
            .filter_map(|ra| {
                let rb = bmap.get(&(ra.id.as_str(), ra.turn))?;
                Some(rb.value(b.grading)? - ra.value(a.grading)?)
            })
            .collect();
        if let Some(e) = bootstrap_mean(&diffs, seed) {
            let _ = writeln!(
                m,
                "\nPaired over {} answers scored in both runs: B - A = {:+.2} (95% CI {:+.2} to {:+.2}).",
                e.n, e.mean, e.low, e.high
            );
        }
    }
    m
}

/// Horizontal bars with 95% whiskers; one colour per series.
pub fn bar_chart(path: &Path, title: &str, series: &[(String, Vec<(String, Estimate)>)], lo: f64, hi: f64) -> Result<()> {
    draw_bars(path, title, series, lo, hi).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw_bars(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(String, Estimate)>)],
    lo: f64,
    hi: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    dpo2d_ui::charts::register_font();
    let mut labels: Vec<String> = vec![];
    for (_, rows) in series {
        for (k, _) in rows {
            if !labels.contains(k) {
                labels.push(k.clone());
            }
        }
    }
    let per = series.len().max(1);
    let height = (120 + labels.len() * (18 * per + 14)).max(260) as u32;
    let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = labels.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(200)
        .build_cartesian_2d(lo..hi, 0.0..n)?;
    let names = labels.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(labels.len().max(1))
        .y_label_formatter(&|y: &f64| {
            let i = (n - y - 0.5).round();
            if (y - (n - i - 0.5)).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()?;
    let band = 0.8 / per as f64;
    for (s, (name, rows)) in series.iter().enumerate() {
        let color = dpo2d_ui::charts::color(s);
        let bars: Vec<(f64, f64, Estimate)> = rows
            .iter()
            .filter_map(|(k, e)| {
                let i = labels.iter().position(|l| l == k)? as f64;
                let top = n - i - 0.1 - band * s as f64;
                Some((top - band, top, *e))
            })
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(y0, y1, e)| Rectangle::new([(lo, y0 + 0.02), (e.mean.clamp(lo, hi), y1 - 0.02)], color.mix(0.75).filled())),
            )?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|&(y0, y1, e)| {
            let y = (y0 + y1) / 2.0;
            PathElement::new(vec![(e.low.clamp(lo, hi), y), (e.high.clamp(lo, hi), y)], BLACK.stroke_width(2))
        }))?;
    }
    if series.len() > 1 {
        chart.configure_series_labels().label_font(("sans-serif", 14)).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, cat: &str, first: Option<Verdict>, second: Option<Verdict>, len: usize) -> Record {
        Record {
            id: id.into(),
            category: cat.into(),
            turn: 1,
            answer_chars: len,
            baseline_chars: Some(100),
            verdict_model_first: first,
            verdict_model_second: second,
            ..Record::default()
        }
    }

    #[test]
    fn both_orders_are_averaged_and_counted() {
        use Verdict::*;
        let rs = vec![
            rec("1", "x", Some(ABetter), Some(AMuchBetter), 120), // win in both orders
            rec("2", "x", Some(ABetter), Some(BBetter), 90),      // position bias: a tie overall
            rec("3", "y", Some(BBetter), Some(BMuchBetter), 80),  // loss
            rec("4", "y", None, Some(Tie), 100),                  // one order readable: a tie
            rec("5", "y", None, None, 100),                       // nothing readable: left out
        ];
        let s = summarize(Grading::PairwiseQuick, &rs, 0);
        let h = s.headline.unwrap();
        assert_eq!(h.n, 4);
        assert!((h.mean - 50.0).abs() < 1e-9, "{h:?}");
        assert_eq!((s.wins, s.ties, s.losses), (1, 2, 1));
        assert_eq!(s.order_agreement, Some(2.0 / 3.0));
        assert!((s.by_category["x"].mean - 75.0).abs() < 1e-9);
        assert!((s.by_category["y"].mean - 25.0).abs() < 1e-9);
        assert!(s.lc_win_rate.is_some());
    }

    #[test]
    fn checked_answers_give_an_accuracy() {
        let rs: Vec<Record> = [true, false, true, true, false]
            .iter()
            .enumerate()
            .map(|(i, c)| Record {
                id: i.to_string(),
                category: if i < 2 { "a" } else { "b" }.into(),
                turn: 1,
                correct: Some(*c),
                ..Record::default()
            })
            .collect();
        let s = summarize(Grading::Checked, &rs, 0);
        assert!((s.headline.unwrap().mean - 60.0).abs() < 1e-9);
        assert!((s.by_category["a"].mean - 50.0).abs() < 1e-9);
        assert_eq!(s.lc_win_rate, None);
        assert_eq!(s.order_agreement, None);
    }

    #[test]
    fn reports_round_trip_and_compare() {
        let mk =
            |g: f64| Record { id: "1".into(), category: "c".into(), turn: 1, grade: Some(g), aspects: [Some(g); 5], ..Record::default() };
        let set = QuestionSet { name: "s".into(), grading: Grading::Single, questions: vec![], baseline_name: None, source: "here".into() };
        let settings = AnswerSettings { max_new_tokens: 8, batch_size: 1 };
        let a = Results::new(&set, Grading::Single, "before", None, "judge", &settings, None, vec![mk(4.0)], 0);
        let b = Results::new(&set, Grading::Single, "after", None, "judge", &settings, None, vec![mk(6.0)], 0);
        let dir = tempfile::tempdir().unwrap();
        let files = b.save(dir.path()).unwrap();
        assert!(files.iter().any(|f| f.ends_with("categories.png")) && files.iter().any(|f| f.ends_with("aspects.png")));
        let back = Results::load(dir.path()).unwrap();
        assert_eq!(back.summary.headline, b.summary.headline);
        assert!(back.markdown().contains("| c | 6.00 (6.00-6.00) | 1 |"), "{}", back.markdown());
        let c = compare(&a, &back, 0);
        assert!(c.contains("B - A = +2.00"), "{c}");
        assert!(c.contains("| helpfulness | 4.00 (4.00-4.00) | 6.00 (6.00-6.00) | +2.00 |"), "{c}");
    }
}
