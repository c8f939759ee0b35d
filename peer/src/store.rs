//! Durable storage of one replica: its key, its stand settings and every change of the stand
//! document, in one redb file.
//!
//! Local changes are written with `Durability::Immediate` before the sale is acknowledged or
//! the change is sent anywhere. Changes received from peers are written with
//! `Durability::None` off the sale path and group-committed by [`Store::sync`] (one immediate
//! commit makes every non-durable commit before it durable): the node syncs within
//! `RECEIVED_SYNC_MS` of receiving and before it stops on SIGTERM or SIGINT.
//!
//! Beside the changes the store keeps the replica's latest snapshot (`Ledger::snapshot`), so a
//! restart loads it and replays only the changes stored after it.

use halftime_ledger::{Ledger, PublicKey, ReplicaKey, SignedChange, StandId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// redb's page cache. Its default (1 GiB) kept every page a start-up read — the whole store of
/// changes and the snapshot — resident for the life of the process; the replica reads its store
/// only when it starts, and appends touch a handful of pages.
pub const STORE_CACHE_BYTES: usize = 16 * 1024 * 1024;
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

/// Storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("storage: {0}")]
    Db(#[from] redb::Error),
    /// Something stored cannot be read back.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The replica has not joined a stand yet.
    #[error("this replica has not joined a stand yet (run `halftime-peer create-stand` or `join`)")]
    NoStand,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The stand a replica belongs to and how to reach its mesh.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StandSettings {
    /// The stand.
    pub stand: StandId,
    /// The pool's public key (trust anchor).
    pub pool: PublicKey,
    /// The stand's private-network key, hex.
    pub psk: String,
}

/// The replica's redb file.
#[derive(Debug)]
pub struct Store {
    db: Database,
    next: u64,
}

impl Store {
    /// Open or create the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(META)?;
            tx.open_table(CHANGES)?;
        }
        tx.commit()?;
        let next = {
            let rx = db.begin_read().map_err(redb::Error::from)?;
            let t = rx.open_table(CHANGES)?;
            t.last()?.map_or(0, |(k, _)| k.value() + 1)
        };
        Ok(Self { db, next })
    }

    fn meta(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rx = self.db.begin_read().map_err(redb::Error::from)?;
        let t = rx.open_table(META)?;
        Ok(t.get(k)?.map(|v| v.value().to_vec()))
    }

    fn put_meta(&self, k: &str, v: &[u8]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut t = tx.open_table(META)?;
            t.insert(k, v)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The replica key, created from `seed` on first use.
    pub fn key_or_init(&self, seed: impl FnOnce() -> [u8; 32]) -> Result<ReplicaKey, StoreError> {
        if let Some(k) = self.key()? {
            return Ok(k);
        }
        let k = ReplicaKey::from_seed(seed());
        self.put_meta("key", &k.secret_bytes())?;
        Ok(k)
    }

    /// The replica key, if one exists.
    pub fn key(&self) -> Result<Option<ReplicaKey>, StoreError> {
        match self.meta("key")? {
            None => Ok(None),
            Some(b) => {
                let seed: [u8; 32] = b
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("key is not 32 bytes".into()))?;
                Ok(Some(ReplicaKey::from_seed(seed)))
            }
        }
    }

    /// Stand settings.
    pub fn settings(&self) -> Result<StandSettings, StoreError> {
        let b = self.meta("stand")?.ok_or(StoreError::NoStand)?;
        serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Save stand settings (once; a replica belongs to one stand).
    pub fn set_settings(&self, s: &StandSettings) -> Result<(), StoreError> {
        if let Ok(old) = self.settings() {
            if &old != s {
                return Err(StoreError::Corrupt(format!(
                    "this replica already belongs to stand {}",
                    old.stand
                )));
            }
        }
        let b = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.put_meta("stand", &b)
    }

    /// Append changes in one transaction; `durable` forces them to disk before returning.
    pub fn append(&mut self, changes: &[SignedChange], durable: bool) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut next = self.next;
        {
            let mut t = tx.open_table(CHANGES)?;
            for c in changes {
                t.insert(next, c.to_vec().as_slice())?;
                next += 1;
            }
        }
        tx.commit()?;
        self.next = next;
        Ok(())
    }

    /// Every stored change, in the order stored. Entries that do not decode are reported and
    /// skipped (the ledger re-validates everything it is given anyway).
    pub fn changes(&self) -> Result<(Vec<SignedChange>, usize), StoreError> {
        let rx = self.db.begin_read().map_err(redb::Error::from)?;
        let t = rx.open_table(CHANGES)?;
        let mut out = Vec::new();
        let mut bad = 0;
        for row in t.iter()? {
            let (_, v) = row?;
            match SignedChange::from_slice(v.value()) {
                Ok(c) => out.push(c),
                Err(_) => bad += 1,
            }
        }
        Ok((out, bad))
    }

    /// Number of stored changes.
    pub fn len(&self) -> u64 {
        self.next
    }

    /// Make every change appended so far durable, with one immediate commit.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.put_meta("synced", &self.next.to_le_bytes())
    }

    /// The latest snapshot of the replica (see `Ledger::snapshot`), if one was written.
    pub fn snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta("snapshot")
    }

    /// Replace the snapshot, durably. The commit also makes every change appended before it
    /// durable, so a snapshot never covers a change the disk could still lose.
    pub fn put_snapshot(&mut self, snapshot: &[u8]) -> Result<(), StoreError> {
        self.put_meta("snapshot", snapshot)
    }

    /// Raw fsync cost probe for benchmarks: one tiny immediate commit into the meta table.
    pub fn probe_fsync(&self) -> Result<(), StoreError> {
        self.put_meta("probe", &[0u8; 8])
    }
}

/// How a replica came back from its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// From its snapshot, then the changes stored after it.
    Snapshot { covered: usize, replayed: usize },
    /// Every stored change replayed: there was no snapshot, or it could not be used (`why`).
    Replay { changes: usize, why: Option<String> },
}

impl Loaded {
    /// Changes the snapshot covered (0 after a full replay).
    pub fn covered(&self) -> usize {
        match self {
            Loaded::Snapshot { covered, .. } => *covered,
            Loaded::Replay { .. } => 0,
        }
    }
}

/// Rebuild the replica `key` of stand `settings` from `store`: from its snapshot and the
/// changes after it when the snapshot is sound, else by replaying every stored change. A bad
/// snapshot is logged with the reason and costs time only: the replay needs nothing but the
/// changes. Stored changes that do not decode or validate are logged and left out.
pub fn load_ledger(
    store: &Store,
    key: ReplicaKey,
    settings: &StandSettings,
    now_ms: u64,
) -> Result<(Ledger, Loaded), StoreError> {
    let (mut stored, undecodable) = store.changes()?;
    let n = stored.len();
    let (stand, pool) = (settings.stand.clone(), settings.pool);
    let mut why = None;
    let mut result = None;
    if let Some(snap) = store.snapshot()? {
        let given = std::mem::take(&mut stored);
        match Ledger::from_snapshot(key.clone(), stand.clone(), pool, &snap, given, now_ms) {
            Ok((l, report, load)) => {
                result = Some((
                    l,
                    report,
                    Loaded::Snapshot {
                        covered: load.covered,
                        replayed: load.replayed,
                    },
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, changes = n, "the snapshot cannot be used; replaying every stored change");
                why = Some(e.to_string());
                stored = store.changes()?.0;
            }
        }
    }
    let (ledger, report, loaded) = match result {
        Some(r) => r,
        None => {
            let (l, report) = Ledger::restore(key, stand, pool, stored, now_ms);
            (l, report, Loaded::Replay { changes: n, why })
        }
    };
    if undecodable > 0 || !report.rejected.is_empty() {
        tracing::warn!(
            undecodable,
            rejected = report.rejected.len(),
            "some stored changes could not be used"
        );
    }
    Ok((ledger, loaded))
}
