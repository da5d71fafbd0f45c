//! Building preference pairs from rated responses (HelpSteer2 style) or
//! normalising TRL-style pair files.
//!
//! HelpSteer2 rows: `prompt, response, helpfulness, correctness, coherence,
//! complexity, verbosity`, two rows per prompt, consecutive rows sharing the
//! prompt (rows 1 and 2, 3 and 4, ...). A multi-turn prompt holds its history
//! inline, as the dataset card describes:
//!
//! ```text
//! {user turn 1}
//! <extra_id_1>Assistant
//! {assistant turn 1}
//! <extra_id_1>User
//! {user turn 2}
//! ```
//!
//! The response with the higher helpfulness is chosen (the dataset card's
//! suggestion: preference pairs "based on the helpfulness score"); equal
//! helpfulness is a tie, dropped unless `TieBreak::Attributes` orders the two
//! by correctness, then coherence. Pairs whose helpfulness margin is below
//! `min_margin` are dropped. Everything dropped is counted in the report.
//!
//! Input files: `.jsonl`, `.jsonl.gz` or Parquet (detected by its `PAR1`
//! magic bytes or a `.parquet` name).

use crate::io::jsonl_lines;
use crate::pair::{Message, Pair, Prompt, Response};
use crate::validate::{parse_pair_value, LoadOptions, Problem, ProblemCode};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// One input row as a JSON object, with its 1-based line (JSONL) or row (Parquet) number.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub number: usize,
    pub fields: Map<String, Value>,
}

impl Row {
    /// A non-empty string field.
    fn text(&self, k: &str) -> Result<&str, Problem> {
        match self.fields.get(k) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
            Some(Value::String(_)) => Err(Problem::new(ProblemCode::EmptyText, format!("{k}: empty"))),
            None | Some(Value::Null) => Err(Problem::new(ProblemCode::MissingField, format!("{k}: missing"))),
            Some(_) => Err(Problem::new(ProblemCode::WrongType, format!("{k}: must be a string"))),
        }
    }

    /// A whole-number field (`3.0` counts as 3); a missing one is `None`.
    fn int(&self, k: &str) -> Result<Option<i64>, Problem> {
        match self.fields.get(k) {
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| Problem::new(ProblemCode::ScoreNotInteger, format!("{k}: {n} is not a whole number"))),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(Problem::new(ProblemCode::WrongType, format!("{k}: must be a number"))),
        }
    }

    /// [`Row::int`], which must be there.
    fn required_int(&self, k: &str) -> Result<i64, Problem> {
        self.int(k)?.ok_or_else(|| Problem::new(ProblemCode::MissingField, format!("{k}: missing")))
    }
}

/// How to order two responses whose helpfulness is equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TieBreak {
    /// Drop the pair (default): no human preference to learn.
    #[default]
    Drop,
    /// Order by correctness, then coherence; drop if those tie too.
    Attributes,
}

/// Options of `build_pairs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Smallest helpfulness difference kept (>= 1).
    pub min_margin: i64,
    pub tie_break: TieBreak,
    /// Skip malformed rows (counted) instead of failing.
    pub skip_invalid: bool,
    /// How many `file:line: reason` entries an error or report lists.
    pub max_listed: usize,
    /// Keep only rows whose `split` column equals this (HelpSteer2's
    /// preference file holds train and validation rows together).
    pub split: Option<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions { min_margin: 1, tie_break: TieBreak::Drop, skip_invalid: false, max_listed: 20, split: None }
    }
}

/// Which shape the input had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputKind {
    /// Rated responses, paired here.
    #[default]
    Rated,
    /// Already pairs (TRL prompt/chosen/rejected), normalised.
    Pairs,
    /// HelpSteer2-Preference rows: prompt, response_1, response_2, preference_strength.
    Preference,
}

/// What `build_pairs` did; printed by `dpo2d build-pairs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildReport {
    pub path: String,
    pub kind: InputKind,
    pub rows: usize,
    /// Rows left out by the split filter.
    pub other_split: usize,
    /// Distinct `split` values seen among the rows kept (empty: no such column).
    pub splits: Vec<String>,
    /// Prompt groups (runs of consecutive rows with the same prompt).
    pub groups: usize,
    pub pairs: usize,
    pub multi_turn: usize,
    /// Groups with equal helpfulness (dropped, or kept when broken by attributes).
    pub ties_dropped: usize,
    pub ties_broken: usize,
    pub below_margin: usize,
    /// Groups of one row (nothing to compare).
    pub unpaired: usize,
    /// Groups of more than two rows (best and worst paired).
    pub larger_groups: usize,
    /// Two responses with the same text.
    pub identical: usize,
    /// Malformed rows skipped (with `skip_invalid`).
    pub invalid_rows: usize,
    pub invalid_by_reason: BTreeMap<ProblemCode, usize>,
    pub invalid_first: Vec<String>,
    /// Helpfulness margin of kept pairs: `margins[d]` = pairs with difference d (0..=4).
    pub margins: [usize; 5],
}

impl fmt::Display for BuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            InputKind::Pairs => {
                writeln!(
                    f,
                    "{}: {} pair rows (TRL style), {} pairs written ({} multi-turn)",
                    self.path, self.rows, self.pairs, self.multi_turn
                )?;
            }
            InputKind::Preference => {
                writeln!(f, "{}: {} preference rows, {} pairs written ({} multi-turn)", self.path, self.rows, self.pairs, self.multi_turn)?;
                writeln!(
                    f,
                    "dropped: {} ties (strength 0), {} below min margin, {} identical responses",
                    self.ties_dropped, self.below_margin, self.identical
                )?;
                let m: Vec<String> = (1..4).map(|d| format!("{d}: {}", self.margins[d])).collect();
                writeln!(f, "preference strength of kept pairs: {}", m.join(", "))?;
            }
            InputKind::Rated => {
                writeln!(
                    f,
                    "{}: {} rated rows, {} prompts, {} pairs written ({} multi-turn)",
                    self.path, self.rows, self.groups, self.pairs, self.multi_turn
                )?;
                writeln!(
                    f,
                    "dropped: {} ties, {} below min margin, {} unpaired rows, {} identical responses",
                    self.ties_dropped, self.below_margin, self.unpaired, self.identical
                )?;
                if self.ties_broken > 0 {
                    writeln!(f, "ties broken by correctness/coherence: {}", self.ties_broken)?;
                }
                if self.larger_groups > 0 {
                    writeln!(f, "prompts with more than two responses (best vs worst paired): {}", self.larger_groups)?;
                }
                let m: Vec<String> = (0..5).map(|d| format!("{d}: {}", self.margins[d])).collect();
                writeln!(f, "helpfulness margin of kept pairs: {}", m.join(", "))?;
            }
        }
        if self.other_split > 0 {
            writeln!(f, "left out {} row(s) of other splits", self.other_split)?;
        }
        if self.splits.len() > 1 {
            writeln!(f, "note: the rows mix splits ({}); pass --split to keep one", self.splits.join(", "))?;
        }
        if self.invalid_rows > 0 {
            let counts: Vec<String> = self.invalid_by_reason.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            writeln!(f, "skipped {} invalid row(s) ({})", self.invalid_rows, counts.join(", "))?;
            for l in &self.invalid_first {
                writeln!(f, "  {l}")?;
            }
        }
        Ok(())
    }
}

/// Reads rows from JSONL, JSONL.gz or Parquet.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    if is_parquet(path)? {
        return read_parquet_rows(path);
    }
    let mut rows = Vec::new();
    let name = path.display();
    for line in jsonl_lines(path)? {
        let line = line?;
        let value: Value = serde_json::from_str(&line.text).with_context(|| format!("{name}:{}: not valid JSON", line.number))?;
        match value {
            Value::Object(fields) => rows.push(Row { number: line.number, fields }),
            _ => bail!("{name}:{}: a row must be a JSON object", line.number),
        }
    }
    Ok(rows)
}

fn is_parquet(path: &Path) -> Result<bool> {
    if path.as_os_str() == "-" {
        return Ok(false);
    }
    if path.extension().is_some_and(|e| e == "parquet") {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    use std::io::Read;
    Ok(f.read(&mut magic).unwrap_or(0) == 4 && &magic == b"PAR1")
}

fn read_parquet_rows(path: &Path) -> Result<Vec<Row>> {
    use parquet::file::reader::SerializedFileReader;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let mut rows = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.with_context(|| format!("{}: cannot read Parquet row {}", path.display(), i + 1))?;
        let fields = row.get_column_iter().map(|(k, v)| (k.clone(), field_to_json(v))).collect();
        rows.push(Row { number: i + 1, fields });
    }
    Ok(rows)
}

fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => (*n).into(),
        F::Short(n) => (*n).into(),
        F::Int(n) => (*n).into(),
        F::Long(n) => (*n).into(),
        F::UByte(n) => (*n).into(),
        F::UShort(n) => (*n).into(),
        F::UInt(n) => (*n).into(),
        F::ULong(n) => (*n).into(),
        F::Float(x) => serde_json::Number::from_f64(*x as f64).map_or(Value::Null, Value::Number),
        F::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Null,
        },
        F::Group(row) => Value::Object(row.get_column_iter().map(|(k, v)| (k.clone(), field_to_json(v))).collect()),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(field_to_json).collect()),
        other => Value::String(other.to_string()),
    }
}

/// Splits a HelpSteer2 prompt into chat messages. A prompt without
/// `<extra_id_1>` markers is a single user turn (returned as text).
pub fn parse_helpsteer_prompt(prompt: &str) -> Prompt {
    const MARK: &str = "<extra_id_1>";
    if !prompt.contains(MARK) {
        return Prompt::Text(prompt.to_string());
    }
    let mut messages: Vec<Message> = Vec::new();
    let mut pieces = prompt.split(MARK);
    let first = pieces.next().unwrap_or_default();
    let (system, first_user) = match first.strip_prefix("<extra_id_0>System\n") {
        // Some exports keep the system header; its content runs to the first blank line.
        Some(rest) => match rest.split_once("\n\n") {
            Some((sys, user)) => (Some(sys), user),
            None => (Some(rest), ""),
        },
        None => (None, first),
    };
    if let Some(sys) = system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message { role: "system".into(), content: sys.trim_end_matches('\n').to_string() });
    }
    if !first_user.trim().is_empty() {
        messages.push(Message { role: "user".into(), content: first_user.trim_end_matches('\n').to_string() });
    }
    for piece in pieces {
        let (role, content) = if let Some(c) = piece.strip_prefix("Assistant") {
            ("assistant", c)
        } else if let Some(c) = piece.strip_prefix("User") {
            ("user", c)
        } else {
            // Not a turn header: keep the text where it was.
            match messages.last_mut() {
                Some(last) => {
                    last.content.push_str(MARK);
                    last.content.push_str(piece.trim_end_matches('\n'));
                }
                None => messages.push(Message { role: "user".into(), content: format!("{MARK}{}", piece.trim_end_matches('\n')) }),
            }
            continue;
        };
        let content = content.strip_prefix("\r\n").or_else(|| content.strip_prefix('\n')).unwrap_or(content);
        messages.push(Message { role: role.into(), content: content.trim_end_matches('\n').to_string() });
    }
    Prompt::Messages(messages)
}

/// Reads `path` and builds pairs: rated rows are paired by helpfulness,
/// TRL-style pair rows are normalised. Fails on malformed rows unless
/// `opts.skip_invalid`.
pub fn build_pairs_from_file(path: &Path, opts: &BuildOptions) -> Result<(Vec<Pair>, BuildReport)> {
    let rows = read_rows(path)?;
    let stem = file_stem(path);
    build_pairs(&rows, &path.display().to_string(), &stem, opts)
}

fn file_stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "stdin".into());
    let name = if name == "-" { "stdin".to_string() } else { name };
    name.split('.').next().unwrap_or("rows").to_string()
}

/// Builds pairs from rows already read. `path` names the source in messages;
/// `id_prefix` starts the ids of built pairs (`{id_prefix}-{row}`).
pub fn build_pairs(rows: &[Row], path: &str, id_prefix: &str, opts: &BuildOptions) -> Result<(Vec<Pair>, BuildReport)> {
    if opts.min_margin < 1 {
        bail!("min margin must be at least 1 (equal helpfulness is a tie; see the tie-break option)");
    }
    let mut report = BuildReport { path: path.to_string(), rows: rows.len(), ..Default::default() };
    let split_of = |r: &Row| r.fields.get("split").and_then(Value::as_str).map(str::to_string);
    let kept: Vec<Row>;
    let rows: &[Row] = match &opts.split {
        Some(want) => {
            kept = rows.iter().filter(|r| split_of(r).as_deref() == Some(want.as_str())).cloned().collect();
            report.other_split = rows.len() - kept.len();
            &kept
        }
        None => rows,
    };
    let splits: std::collections::BTreeSet<String> = rows.iter().filter_map(split_of).collect();
    report.splits = splits.into_iter().collect();
    let Some(first) = rows.first() else {
        return Ok((Vec::new(), report));
    };
    let mut invalid: Vec<(usize, Problem)> = Vec::new();
    let mut pairs = Vec::new();
    if first.fields.contains_key("chosen") && first.fields.contains_key("rejected") {
        report.kind = InputKind::Pairs;
        for row in rows {
            match normalise_pair_row(&row.fields) {
                Ok(p) => pairs.push(p),
                Err(ps) => invalid.extend(ps.into_iter().map(|p| (row.number, p))),
            }
        }
    } else if first.fields.contains_key("response_1") && first.fields.contains_key("response_2") {
        report.kind = InputKind::Preference;
        pairs = pair_preference_rows(rows, id_prefix, opts, &mut report, &mut invalid);
    } else if first.fields.contains_key("prompt") && first.fields.contains_key("response") {
        report.kind = InputKind::Rated;
        pairs = pair_rated_rows(rows, id_prefix, opts, &mut report, &mut invalid);
    } else {
        // Sorted: the same message whatever order the row's map keeps.
        let mut cols: Vec<&str> = first.fields.keys().map(String::as_str).collect();
        cols.sort_unstable();
        bail!(
            "{path}: unrecognised columns [{}]; expected HelpSteer2-style rows (prompt, response, helpfulness, ...), \
             HelpSteer2-Preference rows (prompt, response_1, response_2, preference_strength) or pairs (prompt, chosen, rejected)",
            cols.join(", ")
        );
    }
    if !invalid.is_empty() {
        let mut lines_seen = std::collections::BTreeSet::new();
        for (line, p) in &invalid {
            lines_seen.insert(*line);
            *report.invalid_by_reason.entry(p.code).or_insert(0) += 1;
            if report.invalid_first.len() < opts.max_listed {
                report.invalid_first.push(format!("{path}:{line}: {p}"));
            }
        }
        report.invalid_rows = lines_seen.len();
        if !opts.skip_invalid {
            let more = invalid.len().saturating_sub(report.invalid_first.len());
            let tail = if more > 0 { format!("\n  ... and {more} more problem(s)") } else { String::new() };
            bail!(
                "{path}: {} invalid row(s)\n  {}{tail}\nfix these rows, or pass --skip-invalid to drop them",
                report.invalid_rows,
                report.invalid_first.join("\n  ")
            );
        }
    }
    report.pairs = pairs.len();
    report.multi_turn = pairs.iter().filter(|p| matches!(&p.prompt, Prompt::Messages(m) if m.len() > 1)).count();
    Ok((pairs, report))
}

/// A rated row's fields, read strictly.
struct Rated<'a> {
    number: usize,
    prompt: &'a str,
    response: &'a str,
    helpfulness: i64,
    correctness: i64,
    coherence: i64,
}

fn rated(row: &Row) -> Result<Rated<'_>, Problem> {
    Ok(Rated {
        number: row.number,
        prompt: row.text("prompt")?,
        response: row.text("response")?,
        helpfulness: row.required_int("helpfulness")?,
        correctness: row.int("correctness")?.unwrap_or(0),
        coherence: row.int("coherence")?.unwrap_or(0),
    })
}

fn pair_rated_rows(
    rows: &[Row],
    id_prefix: &str,
    opts: &BuildOptions,
    report: &mut BuildReport,
    invalid: &mut Vec<(usize, Problem)>,
) -> Vec<Pair> {
    let mut good: Vec<Rated> = Vec::with_capacity(rows.len());
    for row in rows {
        match rated(row) {
            Ok(r) => good.push(r),
            Err(p) => invalid.push((row.number, p)),
        }
    }
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < good.len() {
        let mut j = i + 1;
        while j < good.len() && good[j].prompt == good[i].prompt {
            j += 1;
        }
        let group = &good[i..j];
        i = j;
        report.groups += 1;
        if group.len() < 2 {
            report.unpaired += 1;
            continue;
        }
        if group.len() > 2 {
            report.larger_groups += 1;
        }
        let key = |r: &Rated| match opts.tie_break {
            TieBreak::Drop => (r.helpfulness, 0, 0),
            TieBreak::Attributes => (r.helpfulness, r.correctness, r.coherence),
        };
        // First of the best and first of the worst, so file order decides nothing else.
        let best = group.iter().fold(&group[0], |b, r| if key(r) > key(b) { r } else { b });
        let worst = group.iter().fold(&group[0], |w, r| if key(r) < key(w) { r } else { w });
        let margin = best.helpfulness - worst.helpfulness;
        if key(best) == key(worst) {
            report.ties_dropped += 1;
            continue;
        }
        if margin == 0 {
            report.ties_broken += 1;
        } else if margin < opts.min_margin {
            report.below_margin += 1;
            continue;
        }
        if best.response == worst.response {
            report.identical += 1;
            continue;
        }
        let pair = Pair {
            id: Some(Value::String(format!("{id_prefix}-{}", group[0].number))),
            prompt: parse_helpsteer_prompt(best.prompt),
            chosen: Response::Plain(best.response.to_string()),
            rejected: Response::Plain(worst.response.to_string()),
        };
        let problems = crate::validate::check_pair(&pair, &LoadOptions::default());
        if !problems.is_empty() {
            invalid.extend(problems.into_iter().map(|p| (group[0].number, p)));
            continue;
        }
        report.margins[(margin.clamp(0, 4)) as usize] += 1;
        pairs.push(pair);
    }
    pairs
}

/// HelpSteer2-Preference rows: `preference_strength` in -3..3, negative when
/// response_1 is better, positive when response_2 is; 0 is a tie (dropped).
/// The margin is the strength's magnitude.
fn pair_preference_rows(
    rows: &[Row],
    id_prefix: &str,
    opts: &BuildOptions,
    report: &mut BuildReport,
    invalid: &mut Vec<(usize, Problem)>,
) -> Vec<Pair> {
    let mut pairs = Vec::new();
    for row in rows {
        report.groups += 1;
        let strength = row.required_int("preference_strength");
        let (prompt, r1, r2, strength) = match (row.text("prompt"), row.text("response_1"), row.text("response_2"), strength) {
            (Ok(p), Ok(a), Ok(b), Ok(s)) if (-3..=3).contains(&s) => (p, a, b, s),
            (Ok(_), Ok(_), Ok(_), Ok(s)) => {
                invalid
                    .push((row.number, Problem::new(ProblemCode::ScoreOutOfRange, format!("preference_strength: {s} is outside -3..3"))));
                continue;
            }
            (p, a, b, s) => {
                for e in [p.err(), a.err(), b.err(), s.err()].into_iter().flatten() {
                    invalid.push((row.number, e));
                }
                continue;
            }
        };
        if strength == 0 {
            report.ties_dropped += 1;
            continue;
        }
        if strength.abs() < opts.min_margin {
            report.below_margin += 1;
            continue;
        }
        if r1 == r2 {
            report.identical += 1;
            continue;
        }
        let (chosen, rejected) = if strength > 0 { (r2, r1) } else { (r1, r2) };
        let pair = Pair {
            id: Some(Value::String(format!("{id_prefix}-{}", row.number))),
            prompt: parse_helpsteer_prompt(prompt),
            chosen: Response::Plain(chosen.to_string()),
            rejected: Response::Plain(rejected.to_string()),
        };
        let problems = crate::validate::check_pair(&pair, &LoadOptions::default());
        if !problems.is_empty() {
            invalid.extend(problems.into_iter().map(|p| (row.number, p)));
            continue;
        }
        report.margins[strength.unsigned_abs().min(4) as usize] += 1;
        pairs.push(pair);
    }
    pairs
}

/// Normalises one TRL-style row (`prompt`/`chosen`/`rejected`, standard or
/// conversational, explicit or implicit prompt) into a validated pair.
pub fn normalise_pair_row(fields: &Map<String, Value>) -> Result<Pair, Vec<Problem>> {
    let mut obj = Map::new();
    if let Some(id) = fields.get("id") {
        obj.insert("id".into(), id.clone());
    }
    let chosen = fields.get("chosen").cloned().unwrap_or(Value::Null);
    let rejected = fields.get("rejected").cloned().unwrap_or(Value::Null);
    let prompt = match fields.get("prompt") {
        Some(Value::String(s)) => serde_json::to_value(parse_helpsteer_prompt(s)).unwrap_or(Value::Null),
        Some(p) => p.clone(),
        // Implicit prompt (TRL): the conversations share the history; the prompt is that shared prefix.
        None => match (&chosen, &rejected) {
            (Value::Array(c), Value::Array(r)) if !c.is_empty() && !r.is_empty() => {
                let shared = c.iter().zip(r.iter()).take_while(|(a, b)| a == b).count().min(c.len() - 1).min(r.len() - 1);
                obj.insert("chosen".into(), Value::Array(c[shared..].to_vec()));
                obj.insert("rejected".into(), Value::Array(r[shared..].to_vec()));
                Value::Array(c[..shared].to_vec())
            }
            _ => Value::Null,
        },
    };
    obj.insert("prompt".into(), prompt);
    for (side, v) in [("chosen", chosen), ("rejected", rejected)] {
        let v = obj.remove(side).unwrap_or(v);
        let v = match v {
            Value::Array(msgs) => match assistant_turn(&msgs) {
                Some(text) => Value::String(text),
                None => {
                    return Err(vec![Problem::new(
                        ProblemCode::WrongType,
                        format!("{side}: a conversational response must be one assistant message"),
                    )])
                }
            },
            other => other,
        };
        obj.insert(side.into(), v);
    }
    parse_pair_value(&Value::Object(obj), &LoadOptions::default())
}

fn assistant_turn(msgs: &[Value]) -> Option<String> {
    match msgs {
        [m] if m.get("role").and_then(Value::as_str) == Some("assistant") => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(n: usize, prompt: &str, response: &str, h: i64, c: i64, co: i64) -> Value {
        json!({"prompt": prompt, "response": response, "helpfulness": h, "correctness": c, "coherence": co, "complexity": 1, "verbosity": 2, "_n": n})
    }

    fn rows(values: &[Value]) -> Vec<Row> {
        values.iter().enumerate().map(|(i, v)| Row { number: i + 1, fields: v.as_object().unwrap().clone() }).collect()
    }

    const MULTI: &str = "How do I sort a list?\n<extra_id_1>Assistant\nUse sorted().\n<extra_id_1>User\nAnd in reverse?";

    fn sample() -> Vec<Value> {
        vec![
            row(1, "What is Rust?", "A language.", 3, 4, 4),
            row(2, "What is Rust?", "A fungus only.", 1, 1, 3),
            row(3, MULTI, "Pass reverse=True.", 4, 4, 4),
            row(4, MULTI, "You cannot.", 0, 0, 2),
            row(5, "Tie?", "Yes.", 2, 3, 4),
            row(6, "Tie?", "No.", 2, 2, 4),
            row(7, "Close?", "Better.", 3, 3, 3),
            row(8, "Close?", "Worse.", 2, 3, 3),
            row(9, "Alone", "Only one.", 4, 4, 4),
        ]
    }

    #[test]
    fn multi_turn_prompt_parses_into_messages() {
        let Prompt::Messages(m) = parse_helpsteer_prompt(MULTI) else { panic!("expected messages") };
        let got: Vec<(&str, &str)> = m.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(got, vec![("user", "How do I sort a list?"), ("assistant", "Use sorted()."), ("user", "And in reverse?")]);
        assert_eq!(parse_helpsteer_prompt("plain question"), Prompt::Text("plain question".into()));
        // Content keeps its inner blank lines.
        let Prompt::Messages(m) = parse_helpsteer_prompt("a\n\nb\n<extra_id_1>Assistant\nc\n\nd\n<extra_id_1>User\ne") else { panic!() };
        assert_eq!(m[0].content, "a\n\nb");
        assert_eq!(m[1].content, "c\n\nd");
    }

    #[test]
    fn pairs_by_helpfulness_with_drops_counted() {
        let (pairs, r) = build_pairs(&rows(&sample()), "hs.jsonl", "hs", &BuildOptions::default()).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].chosen, Response::Plain("A language.".into()));
        assert_eq!(pairs[0].rejected, Response::Plain("A fungus only.".into()));
        assert_eq!(pairs[0].id, Some(json!("hs-1")));
        assert!(matches!(&pairs[1].prompt, Prompt::Messages(m) if m.len() == 3));
        assert_eq!(pairs[2].chosen, Response::Plain("Better.".into()));
        assert_eq!((r.rows, r.groups, r.pairs, r.ties_dropped, r.below_margin, r.unpaired), (9, 5, 3, 1, 0, 1));
        assert_eq!(r.multi_turn, 1);
        assert_eq!(r.margins, [0, 1, 1, 0, 1]);
        let text = r.to_string();
        assert!(text.contains("dropped: 1 ties, 0 below min margin, 1 unpaired rows"), "{text}");
    }

    #[test]
    fn min_margin_and_tie_break() {
        let opts = BuildOptions { min_margin: 2, ..Default::default() };
        let (pairs, r) = build_pairs(&rows(&sample()), "hs", "hs", &opts).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(r.below_margin, 1);
        let opts = BuildOptions { tie_break: TieBreak::Attributes, ..Default::default() };
        let (pairs, r) = build_pairs(&rows(&sample()), "hs", "hs", &opts).unwrap();
        assert_eq!(pairs.len(), 4);
        assert_eq!((r.ties_dropped, r.ties_broken), (0, 1));
        let tie = pairs.iter().find(|p| p.prompt == Prompt::Text("Tie?".into())).unwrap();
        assert_eq!(tie.chosen, Response::Plain("Yes.".into()), "higher correctness wins a helpfulness tie");
        assert!(build_pairs(&rows(&sample()), "hs", "hs", &BuildOptions { min_margin: 0, ..Default::default() }).is_err());
    }

    #[test]
    fn swapped_order_still_picks_higher() {
        let v = vec![row(1, "Q", "worse", 1, 1, 1), row(2, "Q", "better", 3, 3, 3)];
        let (pairs, _) = build_pairs(&rows(&v), "x", "x", &BuildOptions::default()).unwrap();
        assert_eq!(pairs[0].chosen, Response::Plain("better".into()));
    }

    #[test]
    fn invalid_rows_strict_and_skipped() {
        let mut v = sample();
        v[2]["helpfulness"] = json!("high");
        v.push(json!({"prompt": "Q", "response": ""}));
        let err = build_pairs(&rows(&v), "hs.jsonl", "hs", &BuildOptions::default()).unwrap_err().to_string();
        assert!(err.contains("hs.jsonl:3: helpfulness: must be a number"), "{err}");
        assert!(err.contains("hs.jsonl:10: response: empty"), "{err}");
        let opts = BuildOptions { skip_invalid: true, ..Default::default() };
        let (pairs, r) = build_pairs(&rows(&v), "hs.jsonl", "hs", &opts).unwrap();
        assert_eq!(r.invalid_rows, 2);
        // Row 3 gone: row 4 is alone now, and row 10 was dropped.
        assert_eq!(pairs.len(), 2);
        assert_eq!(r.unpaired, 2);
    }

    #[test]
    fn trl_rows_normalised() {
        let v = vec![
            json!({"prompt": "Q1", "chosen": "good", "rejected": "bad"}),
            json!({"id": 7, "prompt": [{"role": "user", "content": "Q2"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}),
            json!({"chosen": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "yes"}], "rejected": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "no"}]}),
        ];
        let (pairs, r) = build_pairs(&rows(&v), "t.jsonl", "t", &BuildOptions::default()).unwrap();
        assert_eq!(r.kind, InputKind::Pairs);
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].prompt, Prompt::Text("Q1".into()));
        assert_eq!(pairs[1].id, Some(json!(7)));
        assert_eq!(pairs[1].chosen, Response::Plain("good".into()));
        assert_eq!(pairs[2].prompt.messages()[0].content, "Q3");
        assert_eq!(pairs[2].rejected, Response::Plain("no".into()));
        let bad = vec![json!({"prompt": "Q", "chosen": "same", "rejected": "same"})];
        let err = build_pairs(&rows(&bad), "t.jsonl", "t", &BuildOptions::default()).unwrap_err().to_string();
        assert!(err.contains("t.jsonl:1: chosen and rejected have the same text"), "{err}");
    }

    /// Parquet files written by pyarrow, as dataset hubs publish them (nullable
    /// string columns, dictionary encoding, snappy; and zstd with two row
    /// groups), kept in `tests/fixtures/`.
    #[test]
    fn pyarrow_parquet_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["helpsteer2-sample.parquet", "helpsteer2-sample-zstd.parquet"] {
            let (pairs, r) = build_pairs_from_file(&dir.join(name), &BuildOptions::default()).unwrap();
            assert_eq!((r.rows, r.groups, r.pairs, r.ties_dropped, r.multi_turn), (6, 3, 2, 1, 1), "{name}");
            assert_eq!(pairs[0].chosen.text(), "The capital of France is Paris. It is also its largest city.");
            assert_eq!(pairs[0].rejected.text(), "France's capital is Lyon.");
            let m = pairs[1].prompt.messages();
            assert_eq!(m.len(), 3);
            assert_eq!((m[1].role.as_str(), m[1].content.as_str()), ("assistant", "Use slicing: `xs[::-1]`."));
            assert_eq!(m[2].content, "And in place?");
        }
        let rows = read_rows(&dir.join("helpsteer2-sample.parquet")).unwrap();
        assert_eq!(rows[4].fields["response"], json!("Le chat dort au soleil. 🙂"));
    }

    #[test]
    fn preference_rows_and_split_filter() {
        let pref = |split: &str, prompt: &str, a: &str, b: &str, s: i64| json!({"split": split, "prompt": prompt, "response_1": a, "response_2": b, "preference_strength": s, "preference_statement": "..."});
        let v = vec![
            pref("train", "Q1", "bad", "good", 2),
            pref("train", MULTI, "fine", "worse", -1),
            pref("train", "Q3", "same-ish", "other", 0),
            pref("val", "Q4", "x", "y", 3),
            pref("train", "Q5", "a", "b", 7),
        ];
        let opts = BuildOptions { split: Some("train".into()), skip_invalid: true, ..Default::default() };
        let (pairs, r) = build_pairs(&rows(&v), "pref.jsonl", "pref", &opts).unwrap();
        assert_eq!(r.kind, InputKind::Preference);
        assert_eq!((r.other_split, r.ties_dropped, r.invalid_rows), (1, 1, 1));
        assert_eq!(r.invalid_by_reason.get(&ProblemCode::ScoreOutOfRange), Some(&1));
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].chosen.text(), pairs[0].rejected.text()), ("good".into(), "bad".into()));
        assert_eq!((pairs[1].chosen.text(), pairs[1].rejected.text()), ("fine".into(), "worse".into()));
        assert!(matches!(&pairs[1].prompt, Prompt::Messages(m) if m.len() == 3));
        assert_eq!(pairs[0].id, Some(json!("pref-1")));
        // min margin on the strength's magnitude; mixed splits are pointed out.
        let opts = BuildOptions { min_margin: 2, skip_invalid: true, ..Default::default() };
        let (pairs, r) = build_pairs(&rows(&v), "pref.jsonl", "pref", &opts).unwrap();
        assert_eq!(pairs.len(), 2); // strengths 2 and 3
        assert_eq!(r.below_margin, 1);
        assert!(r.to_string().contains("the rows mix splits (train, val)"), "{r}");
    }

    #[test]
    fn unknown_columns_named() {
        let v = vec![json!({"question": "Q", "answer": "A"})];
        let err = build_pairs(&rows(&v), "x.jsonl", "x", &BuildOptions::default()).unwrap_err().to_string();
        assert!(err.contains("unrecognised columns [answer, question]"), "{err}");
    }

    #[test]
    fn jsonl_and_gz_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["train.jsonl", "train.jsonl.gz"] {
            let p = dir.path().join(name);
            crate::io::write_jsonl(&p, &sample()).unwrap();
            let (pairs, r) = build_pairs_from_file(&p, &BuildOptions::default()).unwrap();
            assert_eq!(pairs.len(), 3, "{name}");
            assert_eq!(pairs[0].id, Some(json!("train-1")));
            assert_eq!(r.rows, 9);
        }
    }

    /// Writes a HelpSteer2-shaped Parquet file with the parquet crate itself.
    pub(crate) fn write_parquet(path: &Path, values: &[Value]) {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;
        let schema = Arc::new(
            parse_message_type(
                "message schema { REQUIRED BYTE_ARRAY prompt (UTF8); REQUIRED BYTE_ARRAY response (UTF8); \
                 REQUIRED INT64 helpfulness; REQUIRED INT64 correctness; REQUIRED INT64 coherence; \
                 REQUIRED INT64 complexity; REQUIRED INT64 verbosity; }",
            )
            .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
        let file = std::fs::File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        for col in ["prompt", "response"] {
            let vals: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(v[col].as_str().unwrap())).collect();
            let mut c = rg.next_column().unwrap().unwrap();
            c.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
            c.close().unwrap();
        }
        for col in ["helpfulness", "correctness", "coherence", "complexity", "verbosity"] {
            let vals: Vec<i64> = values.iter().map(|v| v[col].as_i64().unwrap()).collect();
            let mut c = rg.next_column().unwrap().unwrap();
            c.typed::<Int64Type>().write_batch(&vals, None, None).unwrap();
            c.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
    }

    #[test]
    fn parquet_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train-00000.parquet");
        write_parquet(&p, &sample());
        let read = read_rows(&p).unwrap();
        assert_eq!(read.len(), 9);
        assert_eq!(read[2].fields["prompt"], json!(MULTI));
        assert_eq!(read[0].fields["helpfulness"], json!(3));
        let (pairs, r) = build_pairs_from_file(&p, &BuildOptions::default()).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(r.multi_turn, 1);
        assert_eq!(r.ties_dropped, 1);
        // Detected by magic bytes too.
        let q = dir.path().join("renamed.bin");
        std::fs::copy(&p, &q).unwrap();
        assert_eq!(read_rows(&q).unwrap().len(), 9);
    }
}
