//! The signed bytes of a stand's changes, read from the `changes` table by hash for the
//! stand's ledger, so the relay does not keep every stand's whole history in memory.
//!
//! The ledger asks synchronously, from inside the stand's task. The reads therefore run on a
//! thread of their own with its own runtime and its own connection: the asking task waits
//! (briefly, and only for changes older than the latest [`RECENT_CHANGES`] it accepted, which
//! are kept in memory), but nothing it waits for needs its own runtime to make progress. The
//! thread starts at the first read and serves every stand of the process.

use halftime_ledger::{ChangeBytes, ChangeHash, Recent, SignedChange, StandId};
use sqlx::Row;
use sqlx::any::AnyPoolOptions;
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Accepted changes whose bytes each stand keeps in memory besides the store: the latest,
/// which replicas ask for most, and any not committed yet.
pub const RECENT_CHANGES: usize = 4096;
/// Longest a ledger waits for one read before it serves without those changes (a replica
/// asks again at its next vector).
pub const READ_TIMEOUT_MS: u64 = 5_000;
/// Hashes per query.
const READ_CHUNK: usize = 256;

type Answer = Result<HashMap<[u8; 32], SignedChange>, String>;

enum Request {
    Read {
        stand: StandId,
        hashes: Vec<[u8; 32]>,
        reply: mpsc::SyncSender<Answer>,
    },
    Count {
        stand: StandId,
        reply: mpsc::SyncSender<Result<u64, String>>,
    },
}

/// The process's reader of stored changes (cheap to clone).
#[derive(Clone, Debug)]
pub struct Reader {
    url: Arc<str>,
    tx: Arc<OnceLock<mpsc::Sender<Request>>>,
}

impl Reader {
    /// A reader of the database at `url` (the store's own URL).
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            tx: Arc::new(OnceLock::new()),
        }
    }

    fn send(&self, r: Request) -> bool {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let url = self.url.clone();
            let spawned = std::thread::Builder::new()
                .name("halftime-change-reader".into())
                .spawn(move || serve(&url, rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start the reader of stored changes");
            }
            tx
        });
        tx.send(r).is_ok()
    }

    /// The bytes of one stand's changes, for its ledger.
    pub fn stand(&self, stand: StandId) -> StandBytes {
        StandBytes {
            reader: self.clone(),
            stand,
            recent: Recent::new(RECENT_CHANGES),
        }
    }
}

/// The reader's thread: one connection, one request at a time.
fn serve(url: &str, rx: mpsc::Receiver<Request>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "the reader of stored changes has no runtime");
            return;
        }
    };
    let mut pool = None;
    while let Ok(req) = rx.recv() {
        rt.block_on(async {
            if pool.is_none() {
                match AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_millis(READ_TIMEOUT_MS))
                    .connect(url)
                    .await
                {
                    Ok(p) => pool = Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "the reader of stored changes cannot connect")
                    }
                }
            }
            let Some(p) = &pool else {
                return;
            };
            match req {
                Request::Read {
                    stand,
                    hashes,
                    reply,
                } => {
                    let _ = reply.send(read(p, &stand, &hashes).await.map_err(|e| e.to_string()));
                }
                Request::Count { stand, reply } => {
                    let n = sqlx::query("SELECT COUNT(*) FROM changes WHERE stand = $1")
                        .bind(stand.as_str())
                        .fetch_one(p)
                        .await
                        .and_then(|r| r.try_get::<i64, _>(0))
                        .map(|n| u64::try_from(n).unwrap_or(0))
                        .map_err(|e| e.to_string());
                    let _ = reply.send(n);
                }
            }
        });
    }
}

async fn read(
    pool: &sqlx::AnyPool,
    stand: &StandId,
    hashes: &[[u8; 32]],
) -> Result<HashMap<[u8; 32], SignedChange>, sqlx::Error> {
    let mut out = HashMap::with_capacity(hashes.len());
    for chunk in hashes.chunks(READ_CHUNK) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT hash, bytes, signature FROM changes WHERE stand = $1 AND hash IN ({})",
            marks.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(stand.as_str());
        for h in chunk {
            q = q.bind(h.to_vec());
        }
        for r in q.fetch_all(pool).await? {
            let hash: Vec<u8> = r.try_get(0)?;
            if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                out.insert(
                    hash,
                    SignedChange {
                        bytes: r.try_get(1)?,
                        signature: r.try_get(2)?,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// One stand's changes' bytes: the latest accepted in memory, the rest read from the store.
#[derive(Debug)]
pub struct StandBytes {
    reader: Reader,
    stand: StandId,
    recent: Recent,
}

impl StandBytes {
    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::SyncSender<Result<T, String>>) -> Request,
    ) -> Option<T> {
        let (reply, answer) = mpsc::sync_channel(1);
        if !self.reader.send(make(reply)) {
            return None;
        }
        match answer.recv_timeout(Duration::from_millis(READ_TIMEOUT_MS)) {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::error!(stand = %self.stand, error = %e, "could not read stored changes");
                None
            }
            Err(_) => {
                tracing::error!(stand = %self.stand, "no answer from the reader of stored changes");
                None
            }
        }
    }
}

impl ChangeBytes for StandBytes {
    fn keep(&mut self, hash: ChangeHash, change: &SignedChange) {
        self.recent.keep(hash, change);
    }

    fn get(&self, hash: &ChangeHash) -> Option<SignedChange> {
        self.get_many(std::slice::from_ref(hash)).pop().flatten()
    }

    fn get_many(&self, hashes: &[ChangeHash]) -> Vec<Option<SignedChange>> {
        let missing: Vec<[u8; 32]> = hashes
            .iter()
            .filter(|h| self.recent.get(h).is_none())
            .map(|h| h.0)
            .collect();
        let mut read = if missing.is_empty() {
            HashMap::new()
        } else {
            let stand = self.stand.clone();
            self.ask(|reply| Request::Read {
                stand,
                hashes: missing,
                reply,
            })
            .unwrap_or_default()
        };
        hashes
            .iter()
            .map(|h| self.recent.get(h).cloned().or_else(|| read.remove(&h.0)))
            .collect()
    }

    fn count(&self) -> Option<usize> {
        let stand = self.stand.clone();
        self.ask(|reply| Request::Count { stand, reply })
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }
}
