//! Reading and writing JSONL files, plain or gzip-compressed.
//!
//! Compression is detected from the file's first bytes (the gzip magic
//! number), not only from its name, so a `.jsonl.gz` renamed to `.jsonl`
//! still loads. `-` stands for standard input / standard output.

use anyhow::{Context, Result};
use flate2::read::MultiGzDecoder;
use serde::Serialize;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Opens `path` for buffered reading, decompressing gzip transparently.
pub fn open_reader(path: &Path) -> Result<Box<dyn BufRead>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(BufReader::new(io::stdin())));
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let head = reader.fill_buf().with_context(|| format!("cannot read {}", path.display()))?;
    if head.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(reader))))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads a whole (possibly gzipped) text file into a string, without a
/// leading byte order mark.
pub fn read_to_string(path: &Path) -> Result<String> {
    let mut s = String::new();
    open_reader(path)?.read_to_string(&mut s).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    if s.starts_with('\u{feff}') {
        s.drain(..'\u{feff}'.len_utf8());
    }
    Ok(s)
}

/// Creates `path` for writing (gzip when the name ends in `.gz`); `-` is stdout.
pub fn create_writer(path: &Path) -> Result<Box<dyn Write>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(BufWriter::new(io::stdout())));
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
    }
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let w = BufWriter::with_capacity(1 << 16, file);
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(GzWriter(Some(flate2::write::GzEncoder::new(w, flate2::Compression::default())))))
    } else {
        Ok(Box::new(w))
    }
}

/// A gzip writer that finishes the stream on flush-at-drop, so callers can
/// treat it like any other `Write` (flush, then drop).
struct GzWriter<W: Write>(Option<flate2::write::GzEncoder<W>>);

impl<W: Write> Write for GzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.as_mut().expect("gzip writer used after finish").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.as_mut().expect("gzip writer used after finish").flush()
    }
}

impl<W: Write> Drop for GzWriter<W> {
    fn drop(&mut self) {
        if let Some(enc) = self.0.take() {
            if let Ok(mut inner) = enc.finish() {
                let _ = inner.flush();
            }
        }
    }
}

/// One line of a JSONL file: its 1-based line number and its text.
pub struct Line {
    pub number: usize,
    pub text: String,
}

/// A line whose bytes are not UTF-8. Unlike an I/O error this spoils only
/// its own line, so readers may report or skip it and go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}:{number}: not valid UTF-8")]
pub struct NotUtf8 {
    pub name: String,
    pub number: usize,
}

/// Iterates the non-blank lines of a JSONL file (blank lines are allowed
/// and skipped; they are not data). Errors name the file and line.
pub fn jsonl_lines(path: &Path) -> Result<impl Iterator<Item = Result<Line>>> {
    Ok(lines_of(open_reader(path)?, path.display().to_string()))
}

/// Like [`jsonl_lines`] over any reader; `name` labels errors.
///
/// A UTF-8 byte order mark at the start is dropped (editors on Windows write
/// one). A line that is not UTF-8 yields a [`NotUtf8`] error and reading goes
/// on with the next line; an I/O error ends the iteration.
pub fn lines_of<R: BufRead>(mut reader: R, name: String) -> impl Iterator<Item = Result<Line>> {
    let mut number = 0;
    let mut done = false;
    std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        let mut buf = Vec::new();
        number += 1;
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                done = true;
                return Some(Err(anyhow::Error::new(e).context(format!("{name}:{number}: cannot read line"))));
            }
        }
        let bytes = strip_line_end(if number == 1 { buf.strip_prefix(BOM).unwrap_or(&buf) } else { &buf });
        match std::str::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => return Some(Ok(Line { number, text: text.to_string() })),
            Err(_) => return Some(Err(NotUtf8 { name: name.clone(), number }.into())),
        }
    })
}

const BOM: &[u8] = "\u{feff}".as_bytes();

/// `line` without its `\n` or `\r\n`, as `BufRead::lines` returns it.
fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Every record of a JSONL file (gzip allowed, blank lines skipped), each
/// line parsed as a `T`; an error names the file, the line and `what` the
/// line should have been ("valid JSON", "a pair", ...).
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>> {
    jsonl_lines(path)?
        .map(|line| {
            let line = line?;
            serde_json::from_str(&line.text).with_context(|| format!("{}:{}: not {what}", path.display(), line.number))
        })
        .collect()
}

/// Writes items as JSONL (one compact JSON object per line).
pub fn write_jsonl<'a, T: Serialize + 'a>(path: &Path, items: impl IntoIterator<Item = &'a T>) -> Result<usize> {
    let mut w = create_writer(path)?;
    let mut n = 0;
    for item in items {
        serde_json::to_writer(&mut w, item).context("cannot serialise a record")?;
        w.write_all(b"\n").with_context(|| format!("cannot write {}", path.display()))?;
        n += 1;
    }
    w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gz_round_trip_and_sniffing() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("a.jsonl.gz");
        let items = vec![serde_json::json!({"a": 1}), serde_json::json!({"b": "x"})];
        assert_eq!(write_jsonl(&gz, &items).unwrap(), 2);
        let raw = std::fs::read(&gz).unwrap();
        assert_eq!(&raw[..2], &GZIP_MAGIC, "a .gz name must produce gzip output");
        // A gzip file under a plain name is still decompressed.
        let renamed = dir.path().join("b.jsonl");
        std::fs::copy(&gz, &renamed).unwrap();
        let lines: Vec<_> = jsonl_lines(&renamed).unwrap().map(|l| l.unwrap().text).collect();
        assert_eq!(lines, vec![r#"{"a":1}"#, r#"{"b":"x"}"#]);
    }

    #[test]
    fn blank_lines_skipped_but_numbers_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{}\n\n  \n{\"x\":1}\n").unwrap();
        let nums: Vec<_> = jsonl_lines(&p).unwrap().map(|l| l.unwrap().number).collect();
        assert_eq!(nums, vec![1, 4]);
    }

    #[test]
    fn typed_records_and_errors_naming_file_line_and_kind() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct R {
            x: u32,
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        std::fs::write(&p, "{\"x\":1}\n\n{\"x\":2}\n").unwrap();
        assert_eq!(read_jsonl::<R>(&p, "a record").unwrap(), vec![R { x: 1 }, R { x: 2 }]);
        std::fs::write(&p, "{\"x\":1}\n\n{\"y\":2}\n").unwrap();
        let e = format!("{:#}", read_jsonl::<R>(&p, "a record").unwrap_err());
        assert!(e.starts_with(&format!("{}:3: not a record", p.display())), "{e}");
    }

    #[test]
    fn bad_utf8_spoils_only_its_line() {
        let data = b"{\"a\":1}\r\n{\"b\":\"\xff\xfe\"}\n\n{\"c\":3}";
        let lines: Vec<_> = lines_of(&data[..], "d.jsonl".into()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].as_ref().unwrap().text, r#"{"a":1}"#);
        let err = lines[1].as_ref().err().unwrap();
        assert_eq!(err.to_string(), "d.jsonl:2: not valid UTF-8");
        assert_eq!(err.downcast_ref::<NotUtf8>().map(|e| e.number), Some(2));
        let last = lines[2].as_ref().unwrap();
        assert_eq!((last.number, last.text.as_str()), (4, r#"{"c":3}"#));
    }

    #[test]
    fn leading_bom_is_dropped() {
        let data = "\u{feff}{\"a\":1}\n\u{feff}{}\n";
        let lines: Vec<_> = lines_of(data.as_bytes(), "d".into()).map(|l| l.unwrap().text).collect();
        // Only the file's first bytes are a BOM; one later is data (and invalid JSON).
        assert_eq!(lines, vec![r#"{"a":1}"#.to_string(), "\u{feff}{}".to_string()]);
    }

    #[test]
    fn missing_file_names_path() {
        let err = open_reader(Path::new("no/such/file.jsonl")).err().unwrap();
        assert!(format!("{err:#}").contains("no/such/file.jsonl"));
    }
}
