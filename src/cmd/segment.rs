//! `dpo2d segment`: split responses into sentence segments (exact cover).
//!
//! Input: `--text`, plain text (file or stdin), a JSONL of responses
//! (`{"response": ...}` or the field named by `--field`), or a pair file
//! (prompt/chosen/rejected). Output is JSONL: one object per segment for
//! plain text; the input object plus `segments` for responses; pairs with
//! unscored `{"segments": [...]}` responses for pair files.
use anyhow::{bail, Context, Result};
use dpo2d_data::io::{create_writer, lines_of, read_to_string};
use dpo2d_data::segment::{segment_spans, SegmentKind, SegmentOptions, Span, SAMPLE_RESPONSE};
use dpo2d_data::{load_pairs_from_str, segment_response, LoadOptions, Pair, Response};
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Pick from the first line: pairs, responses, or else plain text.
    Auto,
    Text,
    Responses,
    Pairs,
}

#[derive(clap::Args)]
pub struct Args {
    /// Input file (.txt, .jsonl or .jsonl.gz); `-` or nothing reads standard input.
    pub input: Option<PathBuf>,
    /// Segment this text instead of reading a file (may start with `-`, e.g. a list item) [default: none].
    #[arg(long, conflicts_with = "input", allow_hyphen_values = true)]
    pub text: Option<String>,
    /// Input format.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// JSONL field holding the response text.
    #[arg(long, default_value = "response")]
    pub field: String,
    /// Output JSONL file (`.gz` compresses); `-` is standard output.
    #[arg(short, long, default_value = "-")]
    pub output: PathBuf,
    /// Treat the text as plain prose, not markdown.
    #[arg(long)]
    pub no_markdown: bool,
    /// Do not end a segment at a line break inside a paragraph.
    #[arg(long)]
    pub no_split_lines: bool,
    /// Split code blocks longer than this many bytes at blank lines.
    #[arg(long, default_value_t = SegmentOptions::default().max_code_bytes)]
    pub max_code_bytes: usize,
    /// Pair files: drop invalid lines (reported) instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Measure throughput (MB/s) on the input and print it; without an input,
    /// on a built-in sample of 2000 chat-style markdown responses (about 4 MB).
    #[arg(long)]
    pub bench: bool,
}

/// One output segment: its text, byte offsets, character offsets, kind.
#[derive(serde::Serialize)]
struct SpanOut<'a> {
    text: &'a str,
    start: usize,
    end: usize,
    char_start: usize,
    char_end: usize,
    kind: SegmentKind,
}

impl<'a> SpanOut<'a> {
    fn new(text: &'a str, s: &Span) -> Self {
        SpanOut { text: s.text(text), start: s.start, end: s.end, char_start: s.char_start, char_end: s.char_end, kind: s.kind }
    }
}

fn span_json(text: &str, s: &Span) -> Value {
    serde_json::to_value(SpanOut::new(text, s)).unwrap_or(Value::Null)
}

pub fn run(args: Args) -> Result<()> {
    let opts = SegmentOptions { markdown: !args.no_markdown, split_lines: !args.no_split_lines, max_code_bytes: args.max_code_bytes };
    let input = args.input.clone().unwrap_or_else(|| PathBuf::from("-"));
    let name = input.display().to_string();
    if args.bench && args.input.is_none() && args.text.is_none() {
        let sample: Vec<String> = (0..2000).map(|_| SAMPLE_RESPONSE.to_string()).collect();
        return bench(&sample, &opts);
    }
    let (content, format) = match &args.text {
        Some(t) => (t.clone(), Format::Text),
        None => {
            let content = read_to_string(&input)?;
            let format = if args.format == Format::Auto { detect(&content, &name, &args.field)? } else { args.format };
            (content, format)
        }
    };
    if args.bench {
        return bench(&texts_of(&content, &name, format, &args.field)?, &opts);
    }
    let mut out = create_writer(&args.output)?;
    match format {
        Format::Text | Format::Auto => {
            for s in segment_spans(&content, &opts) {
                writeln!(out, "{}", serde_json::to_string(&SpanOut::new(&content, &s))?)?;
            }
        }
        Format::Responses => {
            let mut n = 0;
            for line in lines_of(content.as_bytes(), name.clone()) {
                let line = line?;
                let at = format!("{name}:{}", line.number);
                let mut v: Value = serde_json::from_str(&line.text).with_context(|| format!("{at}: not valid JSON"))?;
                let Some(text) = v.get(&args.field).and_then(Value::as_str).map(str::to_string) else {
                    bail!("{at}: no string field {:?} (name the response field with --field)", args.field);
                };
                let spans: Vec<Value> = segment_spans(&text, &opts).iter().map(|s| span_json(&text, s)).collect();
                v["segments"] = Value::Array(spans);
                writeln!(out, "{v}")?;
                n += 1;
            }
            eprintln!("segmented {n} response(s)");
        }
        Format::Pairs => {
            let loaded = load_pairs_from_str(&content, &name, &LoadOptions::default().skip_invalid(args.skip_invalid))?;
            if !loaded.skipped.is_empty() {
                eprintln!("skipped {} invalid line(s):\n{}", loaded.skipped.lines_skipped, loaded.skipped);
            }
            let (mut segmented, mut kept) = (0, 0);
            for mut pair in loaded.pairs {
                for r in [&mut pair.chosen, &mut pair.rejected] {
                    if let Response::Plain(t) = r {
                        *r = segment_response(t, &opts);
                        segmented += 1;
                    } else {
                        kept += 1;
                    }
                }
                writeln!(out, "{}", serde_json::to_string::<Pair>(&pair)?)?;
            }
            eprintln!("segmented {segmented} response(s); {kept} already segmented, left as they were");
        }
    }
    out.flush().context("cannot write output")?;
    Ok(())
}

/// Looks at the first non-blank line: pairs, responses, or plain text.
fn detect(content: &str, name: &str, field: &str) -> Result<Format> {
    let Some(first) = content.lines().find(|l| !l.trim().is_empty()) else {
        return Ok(Format::Text);
    };
    Ok(match serde_json::from_str::<Value>(first) {
        Ok(Value::Object(o)) if o.contains_key("chosen") && o.contains_key("rejected") => Format::Pairs,
        Ok(Value::Object(o)) if o.contains_key(field) => Format::Responses,
        Ok(Value::Object(o)) => {
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            bail!(
                "{name}: JSON lines with neither chosen/rejected nor {field:?} (keys: {}); name the response field with --field, or pass --format text",
                keys.join(", ")
            )
        }
        _ => Format::Text,
    })
}

/// The texts a benchmark segments: the input's responses, or a built-in sample.
fn texts_of(content: &str, name: &str, format: Format, field: &str) -> Result<Vec<String>> {
    Ok(match format {
        Format::Text | Format::Auto => vec![content.to_string()],
        Format::Responses => content
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get(field).and_then(Value::as_str).map(str::to_string))
            .collect(),
        Format::Pairs => load_pairs_from_str(content, name, &LoadOptions::default().skip_invalid(true))?
            .pairs
            .iter()
            .flat_map(|p| [p.chosen.text(), p.rejected.text()])
            .collect(),
    })
}

fn bench(texts: &[String], opts: &SegmentOptions) -> Result<()> {
    let bytes: usize = texts.iter().map(String::len).sum();
    if bytes == 0 {
        bail!("nothing to segment");
    }
    let start = Instant::now();
    let (mut rounds, mut segments) = (0usize, 0usize);
    while rounds == 0 || start.elapsed().as_secs_f64() < 1.0 {
        for t in texts {
            segments += segment_spans(t, opts).len();
        }
        rounds += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = (bytes * rounds) as f64 / 1e6;
    println!(
        "segmented {mb:.1} MB in {secs:.2} s: {:.1} MB/s, {:.0} segments/s ({} texts, {} segments per pass)",
        mb / secs,
        segments as f64 / secs,
        texts.len(),
        segments / rounds
    );
    Ok(())
}
