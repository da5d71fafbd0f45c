//! Crash-safe output, used by every stage that writes files: a file or a
//! directory is written under a temporary sibling name, flushed to disk, and
//! renamed into place, and the parent directory is flushed after the rename.
//! A reader (or a run resumed after a crash or a power loss) sees the old
//! version or the new one, never a half-written or renamed-but-empty one.
//!
//! [`DirLock`] keeps two runs from writing into one output directory.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

mod lock;

pub use lock::DirLock;

/// The directory that holds `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A hidden sibling of `path` for its temporary version; the extension is
/// kept (writers choose gzip from `.gz`), the process id keeps two writers apart.
fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?.to_string_lossy();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    Ok(parent_of(path).join(format!(".{name}.tmp-{}{ext}", std::process::id())))
}

/// Flush a file's data to disk.
fn sync_file(path: &Path) -> Result<()> {
    #[cfg(test)]
    tests::SYNCED.with(|s| s.borrow_mut().push(path.to_path_buf()));
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot flush {}", path.display()))
}

/// Flush a directory's entries (a rename is durable only once its directory is).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    tests::SYNCED.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    #[cfg(unix)]
    File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot flush directory {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Flush every file below `dir`, then the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            sync_file(&p)?;
        }
    }
    sync_dir(dir)
}

/// Write `path` atomically: `fill` writes the temporary file it is given
/// (in any way: plain, gzip, a safetensors writer), which is then flushed
/// and renamed over `path`. On error the temporary file is removed and
/// `path` is untouched.
pub fn write_file_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let tmp = temp_sibling(path)?;
    let res = (|| -> Result<()> {
        fill(&tmp)?;
        sync_file(&tmp)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
        sync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// Write `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_file_with(path, |tmp| std::fs::write(tmp, bytes.as_ref()).with_context(|| format!("cannot write {}", tmp.display())))
}

/// Write the directory `dir` atomically: `fill` populates a temporary
/// sibling directory; its files are flushed, an older `dir` is replaced,
/// and the parent is flushed. A failed `fill` leaves `dir` as it was.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
    let name = dir.file_name().with_context(|| format!("{} has no name", dir.display()))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp).and_then(|_| sync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))?;
    sync_dir(parent)
}

/// The environment variable that names a [`hang_point`] to stop at.
pub const HANG_AT: &str = "DPO2D_HANG_AT";

/// For crash tests: when `DPO2D_HANG_AT` equals `point`, says `hanging at
/// POINT` on stderr and waits there until the process is killed, so a test
/// can `kill -9` a run at a known place (after the outputs of `point` are on
/// disk). Does nothing otherwise. The points: `step:N` after training update
/// N (and its checkpoint, if one is due), `round-R/sampling:K` and
/// `round-R/scoring:K` after the K-th chunk an iterate process appends.
pub fn hang_point(point: &str) {
    if std::env::var_os(HANG_AT).is_some_and(|v| v == point) {
        eprintln!("hanging at {point}");
        loop {
            std::thread::park();
        }
    }
}

/// Refuse a path that exists, for outputs that must not be overwritten.
pub fn ensure_absent(path: &Path, what: &str) -> Result<()> {
    if path.exists() {
        bail!("{what} {} already exists; remove it or choose another path", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// Every path flushed by this thread, in order.
        pub(super) static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    fn synced() -> Vec<PathBuf> {
        SYNCED.with(|s| s.borrow_mut().drain(..).collect())
    }

    #[test]
    fn data_and_directories_are_flushed_around_the_rename() {
        let d = tempfile::tempdir().unwrap();
        synced();
        write_file(&d.path().join("a.json"), b"{}").unwrap();
        let s = synced();
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].file_name().unwrap().to_string_lossy().starts_with(".a.json.tmp"), "the data before the rename: {s:?}");
        assert_eq!(s[1], d.path(), "the directory after it");
        let cp = d.path().join("checkpoint-1");
        write_dir(&cp, |tmp| {
            std::fs::create_dir(tmp.join("merged"))?;
            std::fs::write(tmp.join("merged/model.safetensors"), b"x")?;
            Ok(std::fs::write(tmp.join("trainer_state.json"), b"{}")?)
        })
        .unwrap();
        let names: Vec<String> = synced().iter().map(|p| p.strip_prefix(d.path()).unwrap().display().to_string()).collect();
        for want in [
            ".checkpoint-1.tmp/merged/model.safetensors",
            ".checkpoint-1.tmp/merged",
            ".checkpoint-1.tmp/trainer_state.json",
            ".checkpoint-1.tmp",
        ] {
            assert!(names.contains(&want.to_string()), "{want} not flushed: {names:?}");
        }
        assert_eq!(names.last().map(String::as_str), Some(""), "the parent after the rename: {names:?}");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn file_is_replaced_whole_and_failures_leave_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/out.jsonl.gz");
        write_file(&p, b"one").unwrap();
        write_file_with(&p, |tmp| {
            assert!(tmp.to_string_lossy().ends_with(".gz"), "temporary name keeps the extension: {}", tmp.display());
            std::fs::write(tmp, b"two")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let e = write_file_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("disk full"));
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d.path().join("sub")), vec!["out.jsonl.gz"]);
    }

    #[test]
    fn directory_is_complete_or_absent() {
        let d = tempfile::tempdir().unwrap();
        let cp = d.path().join("checkpoint-5");
        write_dir(&cp, |tmp| {
            std::fs::create_dir(tmp.join("merged"))?;
            std::fs::write(tmp.join("merged/a"), b"x")?;
            Ok(std::fs::write(tmp.join("state"), b"5")?)
        })
        .unwrap();
        assert_eq!(std::fs::read(cp.join("merged/a")).unwrap(), b"x");
        let e = write_dir(&d.path().join("checkpoint-10"), |tmp| {
            std::fs::write(tmp.join("state"), b"10")?;
            bail!("killed")
        });
        assert!(e.is_err());
        assert_eq!(names(d.path()), vec!["checkpoint-5"]);
        write_dir(&cp, |tmp| Ok(std::fs::write(tmp.join("state"), b"again")?)).unwrap();
        assert_eq!(names(&cp), vec!["state"]);
        assert!(ensure_absent(&cp, "output").is_err());
    }
}
