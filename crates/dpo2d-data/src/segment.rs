//! Splitting a response into sentence-like segments, the unit that 2-D
//! scores are given to. `docs/segmentation.md` is the user-facing description.
//!
//! Guarantees:
//! - the segments concatenate to exactly the input text, in order;
//! - no segment is empty, and only a whitespace-only input gives a
//!   whitespace-only segment;
//! - whitespace between two segments belongs to the EARLIER segment
//!   (leading whitespace of the text belongs to the first one); the one
//!   exception is a code block split at blank lines, where the next piece
//!   starts at the beginning of its line so that its indentation stays with it.
//!
//! Rules: a sentence ends at `. ! ?` (followed by whitespace or the end of
//! the text) or at `。！？` (no space needed), after any closing quotes,
//! brackets and emphasis markers, except after common abbreviations, inside
//! numbers, versions, URLs and e-mail addresses (no whitespace follows the
//! dot there) and at ellipses. With markdown on (the default), the text is
//! parsed with pulldown-cmark: each heading, list item, paragraph, code block,
//! table and HTML block starts a new segment; code blocks, tables, headings,
//! HTML blocks, inline code and links are never split inside (a code block
//! longer than `max_code_bytes` is split at blank lines). With `split_lines`
//! (the default), a line break inside a paragraph also ends a segment, since
//! chat models put one item per line without markdown markers.

use crate::pair::{Response, Segment};
use pulldown_cmark::{Event, Options, Parser, Tag};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// A chat-style markdown response (about 2 KB) with every construct the
/// segmenter handles; the throughput benchmarks repeat it.
pub const SAMPLE_RESPONSE: &str = "## Setting up the project\n\nInstall the toolchain first. Then run `cargo build --release` (it takes a minute or two). See e.g. the guide at https://example.com/docs/v1.2.3/install.html for details. Dr. Smith's notes say \"always pin versions.\" It costs $3.50, i.e. almost nothing!\n\n1. Open the configuration file.\n2. Set the learning rate to 1e-7 (the paper's value).\n3. Check the batch size. Is it 64? Good.\n\n- Use bf16 where the hardware supports it.\n- Keep the reference model frozen.\n\n```python\ndef loss(chosen, rejected, beta=0.2):\n    # Bradley-Terry on segment rewards.\n    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()\n\nprint(loss(torch.tensor([1.0]), torch.tensor([0.5])))\n```\n\n| model | Arena-Hard | AlpacaEval LC |\n|---|---|---|\n| base | 25.1 | 30.68 |\n| 2D-DPO | 30.3 | 31.51 |\n\n> Note. Results vary with the seed... and with the judge.\n\nIn short, the method works well. It is simple to implement. 中文句子也能切分。这是第二句！最后一句？\nQuestions are welcome; mail help@example.org or open an issue at https://example.com/issues?label=question.\n";

/// How to segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SegmentOptions {
    /// Parse markdown (code blocks, tables, lists, headings). Off: prose rules only,
    /// with blank lines as paragraph breaks.
    pub markdown: bool,
    /// A line break inside a paragraph ends a segment.
    pub split_lines: bool,
    /// Code blocks longer than this (bytes) are split at blank lines.
    pub max_code_bytes: usize,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions { markdown: true, split_lines: true, max_code_bytes: 2000 }
    }
}

/// What a segment starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    /// Prose: a sentence or a line of a paragraph.
    Text,
    Heading,
    /// Text of a list item (a sentence of it).
    ListItem,
    Code,
    Table,
    Html,
}

/// One segment's place in the text: byte offsets (`start..end`, on UTF-8
/// character boundaries; what tokenizer offset mappings use) and character
/// offsets (Unicode scalar values; what Python's `str` indexing uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub char_start: usize,
    pub char_end: usize,
    pub kind: SegmentKind,
}

impl Span {
    /// The segment's text in `text` (the string it was computed from).
    pub fn text<'a>(&self, text: &'a str) -> &'a str {
        &text[self.start..self.end]
    }
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// Segments `text` with default options; returns the segment texts.
pub fn segment(text: &str) -> Vec<&str> {
    segment_with(text, &SegmentOptions::default())
}

/// Segments `text`; returns the segment texts.
pub fn segment_with<'a>(text: &'a str, opts: &SegmentOptions) -> Vec<&'a str> {
    segment_spans(text, opts).iter().map(|s| s.text(text)).collect()
}

/// A segmented, unscored response (what `dpo2d annotate` takes).
pub fn segment_response(text: &str, opts: &SegmentOptions) -> Response {
    Response::Segmented { segments: segment_with(text, opts).into_iter().map(|t| Segment { text: t.to_string(), scores: None }).collect() }
}

/// Segments `text` into spans. Empty text gives no spans.
pub fn segment_spans(text: &str, opts: &SegmentOptions) -> Vec<Span> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut plan = Plan::default();
    if opts.markdown {
        plan_markdown(text, opts, &mut plan);
    }
    plan.atomic.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
    let atomic = merge_ranges(&plan.atomic);
    scan_prose(text, opts, &atomic, &mut plan.cuts);

    // Normalise: a cut moves forward over whitespace (whitespace stays with
    // the earlier segment); no cut strictly inside an atomic range.
    let len = text.len();
    let mut cuts: Vec<usize> =
        plan.cuts.iter().map(|&c| skip_ws(text, c)).filter(|&c| c > 0 && c < len && !strictly_inside(&atomic, c)).collect();
    cuts.extend(code_cuts(text, &plan.code, opts.max_code_bytes));
    cuts.sort_unstable();
    cuts.dedup();

    // Build pieces, merging trivial ones (list markers, rules, lone numbers)
    // into the following segment, or into the previous one at the end.
    let mut bounds: Vec<usize> = Vec::with_capacity(cuts.len() + 2);
    bounds.push(0);
    let mut start = 0;
    for &c in &cuts {
        if is_trivial(&text[start..c]) {
            continue;
        }
        bounds.push(c);
        start = c;
    }
    if bounds.len() > 1 && is_trivial(&text[start..]) {
        bounds.pop();
    }
    bounds.push(len);

    plan.blocks.sort_by_key(|b| b.0.start);
    let mut spans = Vec::with_capacity(bounds.len() - 1);
    let mut chars = 0;
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        let n = text[s..e].chars().count();
        let first = skip_ws(text, s).min(e.saturating_sub(1));
        spans.push(Span { start: s, end: e, char_start: chars, char_end: chars + n, kind: kind_at(&plan.blocks, first) });
        chars += n;
    }
    spans
}

#[derive(Default)]
struct Plan {
    /// Candidate segment starts (before whitespace normalisation).
    cuts: Vec<usize>,
    /// Ranges never split inside.
    atomic: Vec<Range<usize>>,
    /// Code blocks (split at blank lines past the size cap).
    code: Vec<Range<usize>>,
    /// Block ranges with their kinds, for labelling segments.
    blocks: Vec<(Range<usize>, SegmentKind)>,
}

fn plan_markdown(text: &str, opts: &SegmentOptions, plan: &mut Plan) {
    let md = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS | Options::ENABLE_MATH;
    for (event, range) in Parser::new_ext(text, md).into_offset_iter() {
        match event {
            Event::Start(tag) => {
                let kind = match tag {
                    Tag::Paragraph
                    | Tag::BlockQuote(_)
                    | Tag::FootnoteDefinition(_)
                    | Tag::DefinitionListTitle
                    | Tag::DefinitionListDefinition => None,
                    Tag::Item => Some(SegmentKind::ListItem),
                    Tag::Heading { .. } => Some(SegmentKind::Heading),
                    Tag::CodeBlock(_) => {
                        plan.code.push(range.clone());
                        Some(SegmentKind::Code)
                    }
                    Tag::Table(_) => Some(SegmentKind::Table),
                    Tag::HtmlBlock => Some(SegmentKind::Html),
                    Tag::Link { .. } | Tag::Image { .. } => {
                        plan.atomic.push(range.clone());
                        continue;
                    }
                    _ => continue,
                };
                plan.cuts.push(range.start);
                plan.cuts.push(range.end);
                if let Some(kind) = kind {
                    if kind != SegmentKind::ListItem {
                        plan.atomic.push(range.clone());
                    }
                    plan.blocks.push((range, kind));
                }
            }
            Event::Code(_) | Event::InlineHtml(_) | Event::InlineMath(_) | Event::DisplayMath(_) => plan.atomic.push(range),
            Event::SoftBreak | Event::HardBreak if opts.split_lines => plan.cuts.push(range.end),
            Event::HardBreak => plan.cuts.push(range.end),
            _ => {}
        }
    }
}

fn merge_ranges(sorted: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => out.push(r.clone()),
        }
    }
    out
}

fn strictly_inside(atomic: &[Range<usize>], c: usize) -> bool {
    let i = atomic.partition_point(|r| r.start < c);
    i > 0 && atomic[i - 1].end > c
}

fn skip_ws(text: &str, mut p: usize) -> usize {
    let b = text.as_bytes();
    while p < b.len() {
        if b[p].is_ascii_whitespace() {
            p += 1;
            continue;
        }
        match text[p..].chars().next() {
            Some(c) if c.is_whitespace() => p += c.len_utf8(),
            _ => break,
        }
    }
    p
}

/// Pieces a reader would not score on their own: only whitespace, list or
/// quote markers, rules, or a lone number like `1.`.
fn is_trivial(piece: &str) -> bool {
    let t = piece.trim();
    t.is_empty() || (t.chars().count() <= 12 && t.chars().all(|c| c.is_ascii_digit() || c.is_whitespace() || "-*+>#.)=_~[]xX".contains(c)))
}

fn kind_at(blocks: &[(Range<usize>, SegmentKind)], p: usize) -> SegmentKind {
    let i = blocks.partition_point(|b| b.0.start <= p);
    for (r, kind) in blocks[..i].iter().rev().take(64) {
        if r.contains(&p) {
            return *kind;
        }
    }
    SegmentKind::Text
}

/// Cuts inside code blocks longer than `cap`: at the start of a line that
/// follows a blank line, packing greedily so pieces stay under the cap where
/// the blank lines allow.
fn code_cuts(text: &str, blocks: &[Range<usize>], cap: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    for r in blocks {
        if r.end - r.start <= cap {
            continue;
        }
        let body = &text[r.clone()];
        let mut candidates = Vec::new();
        let mut prev_blank = false;
        let mut pos = r.start;
        for line in body.split_inclusive('\n') {
            let blank = line.trim().is_empty();
            if !blank && prev_blank && pos > r.start {
                candidates.push(pos);
            }
            prev_blank = blank;
            pos += line.len();
        }
        candidates.push(r.end);
        let mut chunk_start = r.start;
        let mut last = r.start;
        for c in candidates {
            if c - chunk_start > cap && last > chunk_start {
                cuts.push(last);
                chunk_start = last;
            }
            last = c;
        }
    }
    cuts.retain(|&c| c < text.len());
    cuts
}

const CLOSERS: &str = "\"'”’»)]}」』》〉】）*_";
const OPENERS: &str = "\"'“‘«([{「『《〈【（*_";

fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '。' | '！' | '？')
}

fn is_cjk_terminator(c: char) -> bool {
    matches!(c, '。' | '！' | '？')
}

/// Abbreviations after which a `.` never ends a sentence.
const NEVER_END: &[&str] = &[
    "e.g", "i.e", "eg", "ie", "cf", "vs", "viz", "mr", "mrs", "ms", "dr", "prof", "sr", "st", "mt", "ft", "rev", "hon", "gen", "col",
    "capt", "lt", "sgt", "gov", "sen", "rep", "u.s", "u.k", "u.n", "e.u", "approx", "fig", "figs", "vol", "p", "pp", "ch", "sec", "eq",
    "eqs", "ref", "refs", "dept", "est", "ave", "blvd", "resp", "min", "max", "nos",
];

/// Abbreviations that end a sentence only when the next word is capitalised.
const END_IF_CAPITALISED: &[&str] = &["etc", "inc", "ltd", "co", "corp", "a.m", "p.m", "al", "jr", "ph.d", "m.sc", "b.sc"];

/// Finds sentence ends (and line/paragraph breaks) in prose outside atomic ranges.
fn scan_prose(text: &str, opts: &SegmentOptions, atomic: &[Range<usize>], cuts: &mut Vec<usize>) {
    let bytes = text.as_bytes();
    let mut next_atomic = 0;
    // Where an open double quote started, if any: a sentence end inside a
    // quotation is not a segment end unless the quote closes right after it.
    // Reset at every line break, and ignored when far back (a stray inch mark).
    let mut quote_open: Option<usize> = None;
    let mut i = 0;
    while i < bytes.len() {
        if next_atomic < atomic.len() && i >= atomic[next_atomic].start {
            i = i.max(atomic[next_atomic].end);
            next_atomic += 1;
            continue;
        }
        let b = bytes[i];
        if b == b'\n' {
            quote_open = None;
            // Markdown line and paragraph breaks come from the parser.
            if !opts.markdown && (opts.split_lines || text[i + 1..].split('\n').next().is_some_and(|l| l.trim().is_empty())) {
                cuts.push(i + 1);
            }
            i += 1;
            continue;
        }
        // A straight double quote after a digit opens nothing: an inch mark (`5"`).
        if b == b'"' && (quote_open.is_some() || !(i > 0 && bytes[i - 1].is_ascii_digit())) {
            quote_open = if quote_open.is_some() { None } else { Some(i) };
            i += 1;
            continue;
        }
        if b.is_ascii() && !matches!(b, b'.' | b'!' | b'?') {
            i += 1;
            continue;
        }
        let Some(c) = text[i..].chars().next() else {
            break;
        };
        if !is_terminator(c) {
            match c {
                '“' | '「' | '『' => quote_open = Some(i),
                '”' | '」' | '』' => quote_open = None,
                _ => {}
            }
            i += c.len_utf8();
            continue;
        }
        let in_quote = quote_open.is_some_and(|q| i - q <= 500);
        let end = sentence_end(text, i, in_quote);
        if end.is_end {
            cuts.push(end.pos);
        }
        if end.closed_quote {
            quote_open = None;
        }
        i = end.pos.max(i + c.len_utf8());
    }
}

struct End {
    /// Byte position after the terminator run and its closers.
    pos: usize,
    is_end: bool,
    /// A closing double quote was among the closers.
    closed_quote: bool,
}

/// Looks at the terminator run starting at `i`: where it and its closers
/// end, and whether a sentence ends there.
fn sentence_end(text: &str, i: usize, in_quote: bool) -> End {
    let mut j = i;
    let mut dots = 0;
    let mut others = 0;
    let mut cjk = false;
    while let Some(c) = text[j..].chars().next().filter(|&c| is_terminator(c)) {
        if c == '.' {
            dots += 1;
        } else {
            others += 1;
        }
        cjk |= is_cjk_terminator(c);
        j += c.len_utf8();
    }
    let run_end = j;
    let mut closed_by_bracket = false;
    let mut closed_quote = false;
    while let Some(c) = text[j..].chars().next().filter(|&c| CLOSERS.contains(c)) {
        closed_by_bracket |= c != '*' && c != '_';
        closed_quote |= matches!(c, '"' | '”' | '」' | '』');
        j += c.len_utf8();
    }
    let no = |pos| End { pos, is_end: false, closed_quote };
    let yes = |pos| End { pos, is_end: true, closed_quote };
    // Ellipsis ("..." or ". . ."-style runs of dots): a pause, not an end.
    if dots >= 2 && others == 0 {
        return no(j);
    }
    // Inside a quotation that goes on: `"Hi? Thanks." She left.` is one sentence up to the closing quote.
    if in_quote && !closed_quote {
        return no(j);
    }
    let next = text[j..].chars().next();
    if cjk {
        return yes(j);
    }
    match next {
        None => return yes(j),
        Some(n) if n.is_whitespace() => {}
        // "3.14", "v1.2.3", "example.com", "a@b.org", "?q=1": no space after.
        Some(_) => return no(run_end),
    }
    let next_word = next_word_start(text, j);
    let next_upper = next_word.is_some_and(|c| c.is_uppercase());
    // `He asked "why?" and left.`: a closing quote followed by lowercase.
    if closed_by_bracket && next_word.is_some_and(|c| c.is_lowercase()) {
        return no(j);
    }
    // A factorial: "7! = 5040", "5! means".
    if others == 1 && dots == 0 && text[..i].ends_with(|c: char| c.is_ascii_digit()) && !next_upper {
        return no(j);
    }
    if dots == 1 && others == 0 && is_abbreviation(text, i, next_word) {
        return no(j);
    }
    yes(j)
}

/// The first character of the next word after `p` (skipping whitespace and openers).
fn next_word_start(text: &str, p: usize) -> Option<char> {
    text[p..].chars().find(|&c| !c.is_whitespace() && !OPENERS.contains(c))
}

/// The start of the word that ends right before position `i`.
fn token_start(text: &str, i: usize) -> usize {
    let head = &text[..i];
    head.rfind(|c: char| c.is_whitespace()).map(|k| k + head[k..].chars().next().map_or(1, char::len_utf8)).unwrap_or(0)
}

/// The word right before position `i` (a `.`), without leading openers.
fn token_before(text: &str, i: usize) -> &str {
    text[token_start(text, i)..i].trim_start_matches(|c: char| OPENERS.contains(c))
}

/// Whether the `.` at `i` closes an abbreviation rather than a sentence.
fn is_abbreviation(text: &str, i: usize, next: Option<char>) -> bool {
    let word = token_before(text, i);
    if word.is_empty() {
        return false;
    }
    let lower = word.to_lowercase();
    let next_upper = next.is_some_and(|c| c.is_uppercase());
    if NEVER_END.contains(&lower.as_str()) {
        return true;
    }
    if lower == "no" {
        return next.is_some_and(|c| c.is_ascii_digit());
    }
    if END_IF_CAPITALISED.contains(&lower.as_str()) {
        return !next_upper;
    }
    let mut chars = word.chars();
    // An initial next to another initial: "J. K. Rowling"; but "A, T, C and G. The",
    // "vitamin C. It" and "John F. Kennedy" (rare) end at the dot.
    if let (Some(c), None) = (chars.next(), chars.next()) {
        if !c.is_uppercase() {
            return false;
        }
        let start = token_start(text, i);
        let prev = token_before(text, text[..start].trim_end().len());
        let prev_is_initial = prev.len() == 2 && prev.ends_with('.') && prev.starts_with(char::is_uppercase);
        let rest = &text[i + 1..];
        let w = rest.trim_start();
        let next_is_initial =
            w.len() >= 2 && w.starts_with(char::is_uppercase) && w[w.chars().next().map_or(1, char::len_utf8)..].starts_with('.');
        return prev_is_initial || next_is_initial || start == 0;
    }
    // Dotted acronyms like "U.S.A", "a.k.a", "Ph.D": short letter groups and dots.
    if word.contains('.') && word.split('.').all(|p| !p.is_empty() && p.chars().count() <= 2 && p.chars().all(char::is_alphabetic)) {
        return !next_upper;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(text: &str) -> Vec<&str> {
        let out = segment(text);
        assert_eq!(out.concat(), text, "segments must concatenate to the input");
        out
    }

    /// Table-driven tricky cases: input, expected segments.
    #[test]
    fn tricky_cases() {
        let cases: &[(&str, &[&str])] = &[
            ("Hello world. How are you? Fine!", &["Hello world. ", "How are you? ", "Fine!"]),
            ("  Leading space. Next.", &["  Leading space. ", "Next."]),
            ("Trailing.  \n", &["Trailing.  \n"]),
            ("Pi is 3.14 roughly. Yes.", &["Pi is 3.14 roughly. ", "Yes."]),
            ("Use v1.2.3 or later. Then run it.", &["Use v1.2.3 or later. ", "Then run it."]),
            ("See e.g. the docs. Also i.e. this.", &["See e.g. the docs. ", "Also i.e. this."]),
            ("Dr. Smith met Mr. Jones. They talked.", &["Dr. Smith met Mr. Jones. ", "They talked."]),
            ("The U.S. economy grew. Prices rose.", &["The U.S. economy grew. ", "Prices rose."]),
            ("Apples, pears, etc. are fruit. Yes.", &["Apples, pears, etc. are fruit. ", "Yes."]),
            ("Apples, pears, etc. Then more.", &["Apples, pears, etc. ", "Then more."]),
            ("Cats vs. dogs is old. Right.", &["Cats vs. dogs is old. ", "Right."]),
            ("Visit https://example.com/a.b?x=1 now. Then go.", &["Visit https://example.com/a.b?x=1 now. ", "Then go."]),
            ("Go to https://example.com. Then log in.", &["Go to https://example.com. ", "Then log in."]),
            ("Mail jane.doe@mail.example.org today. Thanks.", &["Mail jane.doe@mail.example.org today. ", "Thanks."]),
            ("Wait... what? Really.", &["Wait... what? ", "Really."]),
            ("He said \"Stop.\" Then he left.", &["He said \"Stop.\" ", "Then he left."]),
            ("(This is aside.) Next one.", &["(This is aside.) ", "Next one."]),
            ("He asked \"why?\" and left.", &["He asked \"why?\" and left."]),
            ("Really?! Yes.", &["Really?! ", "Yes."]),
            ("**Note.** Read this.", &["**Note.** ", "Read this."]),
            ("J. K. Rowling wrote it. True.", &["J. K. Rowling wrote it. ", "True."]),
            ("A pairs with T and G with C. The order matters.", &["A pairs with T and G with C. ", "The order matters."]),
            ("Take vitamin C. It helps.", &["Take vitamin C. ", "It helps."]),
            ("7! means 7 × 6 × 5. Next.", &["7! means 7 × 6 × 5. ", "Next."]),
            ("So 5! = 120. Wow! Great.", &["So 5! = 120. ", "Wow! ", "Great."]),
            ("Say: \"Hi, can you help? Thanks.\" Then wait.", &["Say: \"Hi, can you help? Thanks.\" ", "Then wait."]),
            ("\"Thanks! We're on it.\"", &["\"Thanks! We're on it.\""]),
            ("A 5\" screen. It is small. Yes.", &["A 5\" screen. ", "It is small. ", "Yes."]),
            ("Aim for \"set 3\", then rest. Next.", &["Aim for \"set 3\", then rest. ", "Next."]),
            ("Quote “one. two.” Next.", &["Quote “one. two.” ", "Next."]),
            ("Item No. 5 is here. Ok.", &["Item No. 5 is here. ", "Ok."]),
            ("Is it? No. It isn't.", &["Is it? ", "No. ", "It isn't."]),
            ("你好。我很好！谢谢？好", &["你好。", "我很好！", "谢谢？", "好"]),
            ("他说：“好。”然后走了。", &["他说：“好。”", "然后走了。"]),
            ("Call `obj.method()` now. Done.", &["Call `obj.method()` now. ", "Done."]),
            ("It costs $3. Then it costs $4. Done.", &["It costs $3. ", "Then it costs $4. ", "Done."]),
            ("Let $x = 1.5$. Then $y. z$ is 2. Ok.", &["Let $x = 1.5$. ", "Then $y. z$ is 2. ", "Ok."]),
            ("Windows line.\r\nNext line. End.", &["Windows line.\r\n", "Next line. ", "End."]),
            ("See [the docs. here](http://x.y/z). Ok.", &["See [the docs. here](http://x.y/z). ", "Ok."]),
            ("No terminator at all", &["No terminator at all"]),
            ("Line one\nLine two\n\nPara two.", &["Line one\n", "Line two\n\n", "Para two."]),
            ("# Title. With dot\n\nIntro text. More.\n", &["# Title. With dot\n\n", "Intro text. ", "More.\n"]),
            (
                "Steps:\n\n1. First step. Details.\n2. Second step.\n- bullet\n",
                &["Steps:\n\n", "1. First step. ", "Details.\n", "2. Second step.\n", "- bullet\n"],
            ),
            (
                "Code:\n\n```python\nx = 1. \nprint(x). Done\n```\n\nAfter.",
                &["Code:\n\n", "```python\nx = 1. \nprint(x). Done\n```\n\n", "After."],
            ),
            ("Table:\n\n| a. b | c |\n|---|---|\n| 1. | 2? |\n\nEnd.", &["Table:\n\n", "| a. b | c |\n|---|---|\n| 1. | 2? |\n\n", "End."]),
            ("    indented code. here\n    more. code\n\nText.", &["    indented code. here\n    more. code\n\n", "Text."]),
            ("> Quoted one. Quoted two.\n\nAfter.", &["> Quoted one. ", "Quoted two.\n\n", "After."]),
            ("Para.\n\n---\n\nNext para.", &["Para.\n\n", "---\n\nNext para."]),
            ("- [ ] task one\n- [x] task two", &["- [ ] task one\n", "- [x] task two"]),
            ("", &[]),
            ("   ", &["   "]),
        ];
        for (input, want) in cases {
            assert_eq!(seg(input), *want, "input: {input:?}");
        }
    }

    #[test]
    fn kinds_and_offsets() {
        let text = "# Über\n\nSchön. Grüße.\n\n- item\n\n```\ncode\n```\n\n| a |\n|---|\n| 1 |\n";
        let spans = segment_spans(text, &SegmentOptions::default());
        let kinds: Vec<_> = spans.iter().map(|s| s.kind).collect();
        use SegmentKind::*;
        assert_eq!(kinds, vec![Heading, Text, Text, ListItem, Code, Table]);
        for s in &spans {
            assert_eq!(text[..s.start].chars().count(), s.char_start);
            assert_eq!(text[..s.end].chars().count(), s.char_end);
        }
        assert_eq!(spans.last().unwrap().end, text.len());
        assert_eq!(spans[1].text(text), "Schön. ");
        assert_eq!((spans[1].start, spans[1].char_start), (9, 8));
    }

    #[test]
    fn long_code_blocks_split_at_blank_lines_only() {
        let mut code = String::from("```\n");
        for i in 0..6 {
            code.push_str(&format!("fn f{i}() {{\n    let x = {i}. ;\n}}\n\n"));
        }
        code.push_str("```\n");
        let opts = SegmentOptions { max_code_bytes: 80, ..Default::default() };
        let spans = segment_spans(&code, &opts);
        assert!(spans.len() > 1, "a long block must be split");
        let texts: Vec<_> = spans.iter().map(|s| s.text(&code)).collect();
        assert_eq!(texts.concat(), code);
        for t in &texts[1..] {
            assert!(t.starts_with("fn ") || t.starts_with("```"), "pieces start at a line after a blank line: {t:?}");
        }
        for t in &texts {
            assert!(t.len() <= 80, "piece over cap: {t:?}");
        }
        // Under the cap: one segment.
        assert_eq!(segment_spans(&code, &SegmentOptions::default()).len(), 1);
    }

    #[test]
    fn options_change_behaviour() {
        let text = "Line one\nLine two. Three.\n\nPara.";
        let no_lines = SegmentOptions { split_lines: false, ..Default::default() };
        assert_eq!(segment_with(text, &no_lines), vec!["Line one\nLine two. ", "Three.\n\n", "Para."]);
        let plain = SegmentOptions { markdown: false, split_lines: false, ..Default::default() };
        assert_eq!(segment_with("```\na. b\n```", &plain), vec!["```\na. ", "b\n```"]);
        assert_eq!(segment_with("One\ntwo\n\nThree", &plain), vec!["One\ntwo\n\n", "Three"]);
    }

    #[test]
    fn segment_response_is_unscored_and_exact() {
        let r = segment_response("One. Two.", &SegmentOptions::default());
        assert_eq!(r.text(), "One. Two.");
        assert_eq!(r.segments().unwrap().len(), 2);
        assert!(!r.is_scored());
    }

    fn check_invariants(text: &str, opts: &SegmentOptions) -> Result<(), TestCaseError> {
        let spans = segment_spans(text, opts);
        let joined: String = spans.iter().map(|s| s.text(text)).collect();
        prop_assert_eq!(&joined, text);
        let mut prev_end = 0;
        let mut chars = 0;
        for s in &spans {
            prop_assert!(s.start < s.end, "empty segment");
            prop_assert_eq!(s.start, prev_end);
            prop_assert_eq!(s.char_start, chars);
            chars += s.text(text).chars().count();
            prop_assert_eq!(s.char_end, chars);
            prev_end = s.end;
            if spans.len() > 1 {
                prop_assert!(!s.text(text).trim().is_empty(), "whitespace-only segment {:?}", s.text(text));
            }
        }
        prop_assert_eq!(prev_end, text.len());
        Ok(())
    }

    fn markdownish() -> impl Strategy<Value = String> {
        let atoms = prop::sample::select(vec![
            "Hello",
            "world",
            ". ",
            "! ",
            "? ",
            "...",
            "e.g.",
            "Dr.",
            "3.14",
            "v1.2",
            "https://a.b/c?d=1",
            "a@b.co",
            "\n",
            "\n\n",
            "# ",
            "## Head",
            "- ",
            "* ",
            "1. ",
            "> ",
            "```",
            "```rust\n",
            "    ",
            "| a | b |\n|---|---|\n",
            "`x.y`",
            "[l.](u)",
            "**",
            "_",
            "\"",
            "”",
            ")",
            "(",
            "。",
            "！",
            "？",
            "中文",
            "é",
            "🙂",
            " ",
            "\t",
            "\r\n",
            "<div>",
            "---",
            "~~~",
            "\\",
            "[ ]",
            "1)",
            "etc.",
            "U.S.",
        ]);
        prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_unicode_round_trips(text in "\\PC{0,200}") {
            check_invariants(&text, &SegmentOptions::default())?;
            check_invariants(&text, &SegmentOptions { markdown: false, ..Default::default() })?;
        }

        #[test]
        fn any_chars_round_trip(text in any::<String>()) {
            check_invariants(&text, &SegmentOptions::default())?;
        }

        #[test]
        fn markdown_round_trips(text in markdownish(), cap in 1usize..64) {
            check_invariants(&text, &SegmentOptions::default())?;
            check_invariants(&text, &SegmentOptions { max_code_bytes: cap, ..Default::default() })?;
            check_invariants(&text, &SegmentOptions { split_lines: false, markdown: false, max_code_bytes: cap })?;
        }
    }

    /// Throughput: `cargo test -p dpo2d-data --release segment_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn segment_throughput() {
        let text = SAMPLE_RESPONSE.repeat(5_000);
        let opts = SegmentOptions::default();
        let t = std::time::Instant::now();
        let n = segment_spans(&text, &opts).len();
        let secs = t.elapsed().as_secs_f64();
        println!("{} MB, {n} segments, {:.1} MB/s", text.len() / 1_000_000, text.len() as f64 / 1e6 / secs);
    }
}
