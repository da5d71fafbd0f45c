//! The durable judgement cache: one SQLite row per finished (pair, aspect)
//! judgement, keyed by the judge model and the SHA-256 of the request body.
//! Each row is committed as soon as the judgement is done (WAL mode), so an
//! interrupted run loses nothing and a rerun sends only what is missing.
//! A second table keeps plain texts under the same kind of key (a judge's
//! raw answer, a model's answer), for `dpo2d eval`. A third keeps the Batch
//! API batches still to be read, so a killed run polls them again instead
//! of submitting their requests twice.

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A finished judgement: ratings in segment order for the first (chosen) and
/// second (rejected) response, as the judge gave them (before the
/// completeness running maximum, which is re-applied on load).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Judgement {
    pub first: Vec<u8>,
    pub second: Vec<u8>,
    /// Whether a repair request was needed.
    pub repaired: bool,
    /// The judge's final answer text, kept for auditing.
    pub answer: String,
}

/// The cache key: model name and request body, hashed.
pub fn cache_key(model: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0u8]);
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

/// A mutex-guarded connection; async callers go through `spawn_blocking`.
#[derive(Clone)]
pub struct Cache {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Cache {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("cannot open the cache {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(10)))
            .and_then(|_| {
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS judgements (
                        key TEXT PRIMARY KEY,
                        model TEXT NOT NULL,
                        aspect TEXT NOT NULL,
                        ratings TEXT NOT NULL,
                        created_at INTEGER NOT NULL
                    );
                    CREATE TABLE IF NOT EXISTS texts (
                        key TEXT PRIMARY KEY,
                        kind TEXT NOT NULL,
                        text TEXT NOT NULL,
                        created_at INTEGER NOT NULL
                    );
                    CREATE TABLE IF NOT EXISTS batches (
                        id TEXT PRIMARY KEY,
                        custom_ids TEXT NOT NULL,
                        created_at INTEGER NOT NULL
                    );",
                )
            })
            .with_context(|| format!("cannot set up the cache {} (is it an SQLite file?)", path.display()))?;
        Ok(Cache { conn: Arc::new(Mutex::new(conn)), path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Result<Option<Judgement>> {
        let conn = self.lock();
        let row: Option<String> = conn
            .query_row("SELECT ratings FROM judgements WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .with_context(|| format!("cannot read the cache {}", self.path.display()))?;
        match row {
            None => Ok(None),
            // An unreadable row is treated as missing: the request is simply redone.
            Some(s) => Ok(serde_json::from_str(&s).ok()),
        }
    }

    pub fn put(&self, key: &str, model: &str, aspect: &str, j: &Judgement) -> Result<()> {
        let json = serde_json::to_string(j)?;
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO judgements (key, model, aspect, ratings, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key, model, aspect, json, unix_now()],
            )
            .with_context(|| format!("cannot write to the cache {}", self.path.display()))?;
        Ok(())
    }

    /// A stored text (`None` if missing).
    pub fn get_text(&self, key: &str) -> Result<Option<String>> {
        self.lock()
            .query_row("SELECT text FROM texts WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .with_context(|| format!("cannot read the cache {}", self.path.display()))
    }

    /// Stores a text; `kind` says what it is (for someone reading the file).
    pub fn put_text(&self, key: &str, kind: &str, text: &str) -> Result<()> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO texts (key, kind, text, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![key, kind, text, unix_now()],
            )
            .with_context(|| format!("cannot write to the cache {}", self.path.display()))?;
        Ok(())
    }

    pub async fn get_text_async(&self, key: String) -> Result<Option<String>> {
        let c = self.clone();
        tokio::task::spawn_blocking(move || c.get_text(&key)).await.context("cache reader stopped")?
    }

    pub async fn put_text_async(&self, key: String, kind: &'static str, text: String) -> Result<()> {
        let c = self.clone();
        tokio::task::spawn_blocking(move || c.put_text(&key, kind, &text)).await.context("cache writer stopped")?
    }

    /// Records a submitted batch and the `custom_id`s of its requests.
    pub fn add_batch(&self, id: &str, custom_ids: &[String]) -> Result<()> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO batches (id, custom_ids, created_at) VALUES (?1, ?2, ?3)",
                params![id, serde_json::to_string(custom_ids)?, unix_now()],
            )
            .with_context(|| format!("cannot write to the cache {}", self.path.display()))?;
        Ok(())
    }

    /// The batches submitted and not yet read back, oldest first, with their `custom_id`s.
    pub fn open_batches(&self) -> Result<Vec<(String, Vec<String>)>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT id, custom_ids FROM batches ORDER BY created_at, rowid")
            .with_context(|| format!("cannot read the cache {}", self.path.display()))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, ids) = row?;
            out.push((id, serde_json::from_str(&ids).unwrap_or_default()));
        }
        Ok(out)
    }

    /// Forgets a batch whose results are read (and cached).
    pub fn close_batch(&self, id: &str) -> Result<()> {
        self.lock()
            .execute("DELETE FROM batches WHERE id = ?1", params![id])
            .with_context(|| format!("cannot write to the cache {}", self.path.display()))?;
        Ok(())
    }

    /// Number of stored judgements.
    pub fn len(&self) -> Result<usize> {
        let n: i64 = self
            .lock()
            .query_row("SELECT COUNT(*) FROM judgements", [], |r| r.get(0))
            .with_context(|| format!("cannot read the cache {}", self.path.display()))?;
        Ok(n as usize)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub async fn get_async(&self, key: String) -> Result<Option<Judgement>> {
        let c = self.clone();
        tokio::task::spawn_blocking(move || c.get(&key)).await.context("cache reader stopped")?
    }

    pub async fn put_async(&self, key: String, model: String, aspect: &'static str, j: Judgement) -> Result<()> {
        let c = self.clone();
        tokio::task::spawn_blocking(move || c.put(&key, &model, aspect, &j)).await.context("cache writer stopped")?
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip_beside_judgements() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        {
            let c = Cache::open(&p).unwrap();
            assert_eq!(c.get_text("k").unwrap(), None);
            c.put_text("k", "answer", "Paris.").unwrap();
            c.put_text("k", "answer", "Paris!").unwrap();
        }
        let c = Cache::open(&p).unwrap();
        assert_eq!(c.get_text("k").unwrap().as_deref(), Some("Paris!"));
        assert!(c.is_empty().unwrap(), "texts are not judgements");
    }

    #[test]
    fn round_trip_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let j = Judgement { first: vec![1, 2], second: vec![4], repaired: true, answer: "[1] x => rating: 1".into() };
        let k = cache_key("m", "{\"a\":1}");
        assert_ne!(k, cache_key("m2", "{\"a\":1}"));
        assert_ne!(k, cache_key("m", "{\"a\":2}"));
        {
            let c = Cache::open(&p).unwrap();
            assert_eq!(c.get(&k).unwrap(), None);
            c.put(&k, "m", "safety", &j).unwrap();
        }
        let c = Cache::open(&p).unwrap();
        assert_eq!(c.get(&k).unwrap(), Some(j));
        assert_eq!(c.len().unwrap(), 1);
    }

    #[test]
    fn not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        std::fs::write(&p, "this is not sqlite at all, just text that is long enough to look like a header").unwrap();
        let e = Cache::open(&p).err().unwrap();
        assert!(format!("{e:#}").contains("c.sqlite"));
    }
}
