//! An OS-level lock on an output directory: two runs writing into one
//! directory would interleave their metrics and checkpoints. The lock is
//! held on an open file, so the OS drops it when the process dies: a killed
//! run leaves no stale lock behind.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the locked directory.
pub const LOCK_FILE: &str = ".dpo2d.lock";

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

/// Unlocks explicitly rather than by closing the file: a child process
/// forked by another thread holds a copy of the descriptor until it execs,
/// and the lock would live on in that copy (a run resuming in the same
/// process was then refused as "another dpo2d run").
impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl DirLock {
    /// Lock `dir` (created if missing) or fail with
    /// `another dpo2d run (pid N) is using DIR`.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if pid.is_empty() { String::new() } else { format!(" (pid {pid})") };
                bail!("another dpo2d run{who} is using {}; wait for it to finish or choose another output directory", dir.display());
            }
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(DirLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(d.path()).unwrap();
        let e = DirLock::acquire(d.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("another dpo2d run (pid {})", std::process::id())), "{e}");
        assert!(e.contains(&d.path().display().to_string()), "{e}");
        drop(first);
        DirLock::acquire(d.path()).unwrap();
    }

    /// A copy of the descriptor (what a forked child holds until it execs)
    /// does not keep the lock after its holder drops it.
    #[test]
    fn released_on_drop_while_a_copy_of_the_descriptor_lives() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(d.path()).unwrap();
        let copy = first.file.try_clone().unwrap();
        drop(first);
        DirLock::acquire(d.path()).unwrap();
        drop(copy);
    }
}
