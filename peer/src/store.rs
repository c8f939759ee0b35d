//! Durable storage of one replica: its key, its stand settings and every change of the stand
//! document, in one redb file.
//!
//! Local changes are written with `Durability::Immediate` before the sale is acknowledged or
//! the change is sent anywhere. Changes received from peers are written with
//! `Durability::None` off the sale path and group-committed by [`Store::sync`] (one immediate
//! commit makes every non-durable commit before it durable): the node syncs within
//! `RECEIVED_SYNC_MS` of receiving and before it stops on SIGTERM or SIGINT.
//!
//! Beside the changes the store keeps the replica's latest snapshot (`Ledger::snapshot`) and
//! where the store stood when it was written, so a restart loads it and reads and replays only
//! the changes stored after it. The ledger does not keep the changes' signed bytes in memory:
//! it reads them from here ([`StoreBytes`], by hash) when a peer needs them.

use halftime_ledger::{
    ChangeBytes, ChangeHash, Ledger, PublicKey, Recent, ReplicaKey, SignedChange, StandId,
    change_hash,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use std::path::Path;
use std::sync::Arc;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// redb's page cache. Its default (1 GiB) kept every page a start-up read — the whole store of
/// changes and the snapshot — resident for the life of the process; the replica reads its store
/// only when it starts, and appends touch a handful of pages.
pub const STORE_CACHE_BYTES: usize = 16 * 1024 * 1024;
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// A stored change's hash → its key in `CHANGES`.
const BY_HASH: TableDefinition<&[u8], u64> = TableDefinition::new("changes_by_hash");
/// Accepted changes whose bytes [`StoreBytes`] keeps in memory besides the store: the latest,
/// which peers ask for most, and any the node has not written yet.
pub const RECENT_CHANGES: usize = 4096;

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
    db: Arc<Database>,
    next: u64,
}

impl Store {
    /// Open or create the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)?;
        let tx = db.begin_write()?;
        let indexed = {
            let changes = tx.open_table(CHANGES)?;
            let by_hash = tx.open_table(BY_HASH)?;
            tx.open_table(META)?;
            changes.is_empty()? || !by_hash.is_empty()?
        };
        tx.commit()?;
        if !indexed {
            Self::index(&db)?;
        }
        let next = {
            let rx = db.begin_read().map_err(redb::Error::from)?;
            let t = rx.open_table(CHANGES)?;
            t.last()?.map_or(0, |(k, _)| k.value() + 1)
        };
        Ok(Self {
            db: Arc::new(db),
            next,
        })
    }

    /// Index by hash every stored change of a store written before the index existed.
    fn index(db: &Database) -> Result<(), StoreError> {
        let tx = db.begin_write()?;
        let mut n = 0u64;
        {
            let changes = tx.open_table(CHANGES)?;
            let mut by_hash = tx.open_table(BY_HASH)?;
            for row in changes.iter()? {
                let (k, v) = row?;
                if let Some(h) = SignedChange::from_slice(v.value())
                    .ok()
                    .and_then(|c| change_hash(&c.bytes))
                {
                    by_hash.insert(&h[..], k.value())?;
                    n += 1;
                }
            }
        }
        tx.commit()?;
        tracing::info!(changes = n, "indexed the stored changes by hash");
        Ok(())
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
            let mut by_hash = tx.open_table(BY_HASH)?;
            for c in changes {
                t.insert(next, c.to_vec().as_slice())?;
                if let Some(h) = change_hash(&c.bytes) {
                    by_hash.insert(&h[..], next)?;
                }
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
        self.changes_from(0)
    }

    /// The changes stored at position `from` and after, as [`Store::changes`].
    pub fn changes_from(&self, from: u64) -> Result<(Vec<SignedChange>, usize), StoreError> {
        let rx = self.db.begin_read().map_err(redb::Error::from)?;
        let t = rx.open_table(CHANGES)?;
        let mut out = Vec::new();
        let mut bad = 0;
        for row in t.range(from..)? {
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

    /// Where the store stood when the latest snapshot was written: the changes stored from
    /// there on are the ones it may not cover.
    pub fn snapshot_at(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .meta("snapshot_at")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes))
    }

    /// Replace the snapshot, durably, with where the store stands. The commit also makes
    /// every change appended before it durable, so a snapshot never covers a change the disk
    /// could still lose.
    pub fn put_snapshot(&mut self, snapshot: &[u8]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut t = tx.open_table(META)?;
            t.insert("snapshot", snapshot)?;
            t.insert("snapshot_at", &self.next.to_le_bytes()[..])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored changes' bytes, read by hash, for the ledger (see [`StoreBytes`]).
    pub fn bytes(&self) -> StoreBytes {
        StoreBytes {
            db: self.db.clone(),
            recent: Recent::new(RECENT_CHANGES),
        }
    }

    /// Raw fsync cost probe for benchmarks: one tiny immediate commit into the meta table.
    pub fn probe_fsync(&self) -> Result<(), StoreError> {
        self.put_meta("probe", &[0u8; 8])
    }
}

/// The signed bytes of the replica's changes, read from its store by hash, so the ledger
/// keeps none of them in memory. The latest [`RECENT_CHANGES`] accepted are also kept in
/// memory: peers mostly ask for those, and a change the node has not written yet (it writes
/// received changes between events) is served all the same.
#[derive(Debug)]
pub struct StoreBytes {
    db: Arc<Database>,
    recent: Recent,
}

impl StoreBytes {
    /// Those of `hashes` not kept in memory, in one read transaction.
    fn read(&self, hashes: &[ChangeHash]) -> Result<Vec<Option<SignedChange>>, StoreError> {
        let rx = self.db.begin_read().map_err(redb::Error::from)?;
        let by_hash = rx.open_table(BY_HASH)?;
        let changes = rx.open_table(CHANGES)?;
        let mut out = Vec::with_capacity(hashes.len());
        for h in hashes {
            if let Some(c) = self.recent.get(h) {
                out.push(Some(c.clone()));
                continue;
            }
            let Some(k) = by_hash.get(&h.0[..])?.map(|v| v.value()) else {
                out.push(None);
                continue;
            };
            let c = match changes.get(k)? {
                Some(v) => Some(
                    SignedChange::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ),
                None => None,
            };
            out.push(c);
        }
        Ok(out)
    }
}

impl ChangeBytes for StoreBytes {
    fn keep(&mut self, hash: ChangeHash, change: &SignedChange) {
        self.recent.keep(hash, change);
    }

    fn get(&self, hash: &ChangeHash) -> Option<SignedChange> {
        self.get_many(std::slice::from_ref(hash)).pop().flatten()
    }

    fn get_many(&self, hashes: &[ChangeHash]) -> Vec<Option<SignedChange>> {
        if hashes.iter().all(|h| self.recent.get(h).is_some()) {
            return hashes.iter().map(|h| self.recent.get(h).cloned()).collect();
        }
        match self.read(hashes) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "could not read held changes from the store");
                hashes.iter().map(|h| self.recent.get(h).cloned()).collect()
            }
        }
    }

    fn count(&self) -> Option<usize> {
        let rx = self.db.begin_read().ok()?;
        let t = rx.open_table(BY_HASH).ok()?;
        t.len().ok().map(|n| n as usize)
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
    let (stand, pool) = (settings.stand.clone(), settings.pool);
    let mut why = None;
    if let Some(snap) = store.snapshot()? {
        let (tail, undecodable) = store.changes_from(store.snapshot_at()?.unwrap_or(0))?;
        let bytes = Box::new(store.bytes());
        match Ledger::from_snapshot_with(
            key.clone(),
            stand.clone(),
            pool,
            &snap,
            tail,
            bytes,
            now_ms,
        ) {
            Ok((l, report, load)) => {
                warn_unused(undecodable, report.rejected.len());
                let loaded = Loaded::Snapshot {
                    covered: load.covered,
                    replayed: load.replayed,
                };
                return Ok((l, loaded));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the snapshot cannot be used; replaying every stored change");
                why = Some(e.to_string());
            }
        }
    }
    let (stored, undecodable) = store.changes()?;
    let n = stored.len();
    let (ledger, report) =
        Ledger::restore_with(key, stand, pool, stored, Box::new(store.bytes()), now_ms);
    warn_unused(undecodable, report.rejected.len());
    Ok((ledger, Loaded::Replay { changes: n, why }))
}

fn warn_unused(undecodable: usize, rejected: usize) {
    if undecodable > 0 || rejected > 0 {
        tracing::warn!(
            undecodable,
            rejected,
            "some stored changes could not be used"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use halftime_ledger::{
        Allocation, CatalogItem, EventId, Payment, PaymentMethod, Policy, Role, SaleLine,
        SaleOutcome, SaleRequest, Sku, StandInfo, VersionVector,
    };
    use std::collections::BTreeMap;

    fn hotdog(method: PaymentMethod) -> SaleRequest {
        let sku = Sku::new("hotdog").unwrap();
        let reference = match method {
            PaymentMethod::Card => "pi_1".into(),
            _ => String::new(),
        };
        let payment = Payment { method, reference };
        let lines = vec![SaleLine {
            sku,
            qty: 1,
            unit_price_cents: 400,
        }];
        SaleRequest {
            lines,
            payment,
            pool_reachable: true,
        }
    }

    /// A terminal's store holding a stand's set-up and `sales` of its own sales.
    fn terminal_store(dir: &Path, sales: u64) -> (Store, ReplicaKey, StandSettings) {
        let key = ReplicaKey::from_seed([42; 32]);
        let pool_key = ReplicaKey::from_seed([43; 32]);
        let stand = StandId::new("big").unwrap();
        let info = StandInfo {
            event: EventId::new("big").unwrap(),
            venue: String::new(),
            stand: stand.clone(),
            policy: Policy::Strict,
            allocation: Allocation::Proportional,
            low_stock_pct: 10,
        };
        let (mut pool, g) = Ledger::create_stand(pool_key.clone(), info, "pool", 1).unwrap();
        let sku = Sku::new("hotdog").unwrap();
        let item = CatalogItem {
            sku: sku.clone(),
            name: "Hot dog".into(),
            price_cents: 400,
            low_stock_at: 1,
        };
        let changes = vec![
            g,
            pool.set_catalog(vec![item], 1).unwrap(),
            pool.enrol(key.public(), "t", Role::Terminal, 1).unwrap(),
            pool.restock(BTreeMap::from([(sku.clone(), 10_000)]), "", 1)
                .unwrap(),
            pool.give(key.replica_id(), BTreeMap::from([(sku.clone(), 5_000)]), 1)
                .unwrap(),
        ];
        let mut store = Store::open(&dir.join("replica.redb")).unwrap();
        store.key_or_init(|| [42; 32]).unwrap();
        let settings = StandSettings {
            stand: stand.clone(),
            pool: pool_key.public(),
            psk: "00".repeat(32),
        };
        store.set_settings(&settings).unwrap();
        store.append(&changes, true).unwrap();
        let (mut t, _) = load_ledger(&store, key.clone(), &settings, 2).unwrap();
        for i in 0..sales {
            let SaleOutcome::Committed { change, .. } = t.sell(hotdog(PaymentMethod::Cash), 10 + i)
            else {
                panic!()
            };
            store.append(&[change], i % 10 == 0).unwrap();
        }
        store.put_snapshot(&t.snapshot()).unwrap();
        (store, key, settings)
    }

    #[test]
    fn a_replica_loaded_from_its_snapshot_reads_only_the_tail_and_serves_the_rest_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, key, settings) = terminal_store(dir.path(), 40);
        let at = store.snapshot_at().unwrap().unwrap();
        assert_eq!(at, store.len());
        // Three sales after the snapshot.
        let (mut t, _) = load_ledger(&store, key.clone(), &settings, 100).unwrap();
        for i in 0..3 {
            let SaleOutcome::Committed { change, .. } =
                t.sell(hotdog(PaymentMethod::Card), 200 + i)
            else {
                panic!()
            };
            store.append(&[change], true).unwrap();
        }
        drop(t);
        let (back, loaded) = load_ledger(&store, key.clone(), &settings, 300).unwrap();
        assert_eq!(
            loaded,
            Loaded::Snapshot {
                covered: at as usize,
                replayed: 3
            }
        );
        // Every change, the covered ones read back from the store by hash.
        let served = back.changes_since(&VersionVector::new(), usize::MAX);
        assert_eq!(served.len() as u64, store.len());
        let (on_disk, bad) = store.changes().unwrap();
        assert_eq!(bad, 0);
        assert_eq!(served, on_disk);
        let mut fresh = Ledger::join(
            ReplicaKey::from_seed([7; 32]),
            settings.stand.clone(),
            settings.pool,
        );
        let r = fresh.apply_remote(served, 400);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        assert_eq!(fresh.version_vector(), back.version_vector());
    }

    #[test]
    fn a_store_without_the_hash_index_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key, settings) = terminal_store(dir.path(), 20);
        let n = store.len();
        drop(store);
        // As a store written before the index existed.
        {
            let db = Database::open(dir.path().join("replica.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            assert!(tx.delete_table(BY_HASH).unwrap());
            tx.commit().unwrap();
        }
        let store = Store::open(&dir.path().join("replica.redb")).unwrap();
        assert_eq!(store.bytes().count(), Some(n as usize));
        let (back, loaded) = load_ledger(&store, key, &settings, 100).unwrap();
        assert_eq!(loaded.covered() as u64, n);
        assert_eq!(
            back.changes_since(&VersionVector::new(), usize::MAX).len() as u64,
            n
        );
    }
}
