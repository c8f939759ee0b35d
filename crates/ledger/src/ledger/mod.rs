//! The ledger: one replica of a stand document, and what it answers about the stand.
//!
//! The rest of the replica lives beside this file, one concern each: `local` (the operations
//! this replica writes), `draft` (the ops of such a change, built from the state), `receive`
//! (the path every received byte takes, in order of its checks), `pending` (changes waiting
//! for a dependency or an enrolment), `validate` (the rules of the layout and the policy, one
//! typed rejection each) and `invariants` (the consistency checks the test builds run after
//! every change).

mod draft;
mod held;
#[cfg(any(debug_assertions, feature = "check-invariants"))]
mod invariants;
mod local;
mod pending;
mod receive;
mod snapshot;
mod validate;
mod vector;

pub use held::{ChangeBytes, InMemory, Recent, Shared};
pub use pending::{
    MAX_PENDING_BYTES, MAX_PENDING_BYTES_PER_AUTHOR, MAX_UNKNOWN_PENDING_BYTES,
    MAX_UNKNOWN_PENDING_BYTES_PER_AUTHOR,
};
pub use receive::{MAX_OPS_PER_CHANGE, MAX_TRACKED_KEYS};
pub use snapshot::{SnapshotError, SnapshotLoad, change_hash};
pub use vector::VersionVector;

use crate::error::{NotAdmitted, OpError, Refusal, Rejection};
use crate::hlc::{Clock, Hlc};
use crate::identity::{PublicKey, ReplicaKey, verify_many};
use crate::ids::{ReplicaId, Role, SaleId, Sku, StandId};
use crate::layout::{
    self, CATALOG, EVENT, MAX_EPOCH_WRITES, MAX_UNITS, REPLICAS, ROLLOVER_WRITES, STOCK,
    SkuCounters, epoch_key, parse_epoch,
};
use crate::message::{
    CatalogItem, ChangeMessage, MAX_CATALOG_ITEMS, MAX_LINES, MAX_MESSAGE_BYTES, MESSAGE_VERSION,
    Operation, Payment, Policy, SaleLine, SaleRecord, StandInfo,
};
use crate::signed::{MAX_CHANGE_BYTES, SignedChange};
use crate::state::{
    Cell, Field, Obj, ObjAddr, OpAddr, RATE_HISTORY_LEN, ReplicaInfo, SaleEntry, State,
};
use automerge::legacy::{Key, ObjectId, OpType};
use automerge::{ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjType, ScalarValue};
use ed25519_dalek::VerifyingKey;
use pending::Pending;
use receive::Causal;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use validate::expand;

/// Changes read at once from where their bytes are kept, when all are read.
const ALL_CHANGES_CHUNK: usize = 1024;

/// Hashes of rejected changes remembered (so their duplicates are dropped cheaply).
pub const MAX_REMEMBERED_REJECTIONS: usize = 10_000;

/// The status of an item at the stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StockStatus {
    /// At or above the item's LOW_STOCK mark.
    Ok,
    /// Below the LOW_STOCK threshold.
    Low,
    /// Nothing available, or oversold.
    Out,
}

/// A sale as asked for by a cashier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleRequest {
    /// Items and quantities, each at the price charged.
    pub lines: Vec<SaleLine>,
    /// How it is paid.
    pub payment: Payment,
    /// Whether the pool (relay) is reachable right now.
    pub pool_reachable: bool,
}

/// Result of a sale attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleOutcome {
    /// Durable in memory; persist `change` before acknowledging.
    Committed {
        /// The new sale's id.
        sale_id: SaleId,
        /// The signed change to persist and send.
        change: SignedChange,
    },
    /// Not sold; nothing written.
    Refused { reason: Refusal },
}

/// What became of a batch of received changes.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    /// Newly accepted changes, in application order (persist them; forward them).
    pub accepted: Vec<SignedChange>,
    /// Author and sequence number of each accepted change, in the same order.
    pub accepted_ids: Vec<(ReplicaId, u64)>,
    /// Dropped because they were already held, waiting or rejected.
    pub duplicates: usize,
    /// Waiting for dependencies or enrolment.
    pub pending: usize,
    /// Rejected, with the rule broken.
    pub rejected: Vec<Rejection>,
}

/// How a connecting replica is let in (see [`Ledger::admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A member: changes flow both ways.
    Member(ReplicaId),
    /// A retired replica, taken in only to hand over what it wrote; it is sent nothing.
    HandOver(ReplicaId),
}

impl Admission {
    pub fn replica(&self) -> ReplicaId {
        match self {
            Admission::Member(r) | Admission::HandOver(r) => *r,
        }
    }
}

/// A held change's hash, the hashes it depends on, and when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeInfo {
    pub hash: [u8; 32],
    pub deps: Vec<[u8; 32]>,
    pub at: Hlc,
}

/// What a reclaim on a live pool was based on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimView {
    /// The reclaimed replica.
    pub replica: ReplicaId,
    /// The sequence number of its latest change held (and known anywhere reachable).
    pub last_seq: u64,
    /// When it made that change (`None`: it never wrote anything).
    pub last_change_at: Option<Hlc>,
    /// How many reachable replicas' version vectors were compared.
    pub peers_consulted: usize,
    /// Its rights per sku at that change: what the reclaim moved to the pool where positive.
    pub rights: BTreeMap<Sku, i64>,
}

/// Counters of what this ledger has seen.
#[derive(Debug, Default, Clone)]
pub struct LedgerStats {
    /// Received changes accepted.
    pub accepted: u64,
    /// Received changes dropped as already held, waiting or rejected.
    pub duplicates: u64,
    /// Rejections by rule.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Pending changes dropped because the queue was full.
    pub pending_dropped: u64,
    /// Per key that signed them (signature checked): rejections by rule, `equivocation` and
    /// `pending_full` included. At most [`MAX_TRACKED_KEYS`] keys.
    pub by_replica: BTreeMap<ReplicaId, BTreeMap<&'static str, u64>>,
}

impl LedgerStats {
    /// Changes signed by `replica` that broke a rule.
    pub fn misbehaviour(&self, replica: ReplicaId) -> u64 {
        self.by_replica
            .get(&replica)
            .map_or(0, |m| m.values().sum())
    }
}

#[derive(Debug, Clone)]
struct Entry {
    hash: ChangeHash,
    at: Hlc,
    /// Highest pool sequence number in this change's causal past (itself included).
    pool_seq_seen: u64,
    /// Highest op counter in this change's causal past (itself included).
    max_op: u64,
    /// Its own last op counter.
    own_max_op: u64,
    deps: Vec<ChangeHash>,
}

/// A received change whose signature by its actor's key has been checked.
#[derive(Debug)]
struct Candidate {
    signed: SignedChange,
    change: Change,
    /// Its key in the shared memo, when there is one and the change is signed.
    memo_key: Option<MemoKey>,
    /// Found in the memo: parsed and verified already.
    verified: bool,
    /// Its entry in the memo, once it has one.
    parsed: Option<std::sync::Arc<Parsed>>,
    hash: ChangeHash,
    actor: [u8; 32],
    key: PublicKey,
}

/// Effects of one validated change on the state.
#[derive(Debug, Default)]
struct Effects {
    objects: Vec<((u64, ReplicaId), Obj)>,
    /// Outside the epoch maps: the new current op of each (object, key) written.
    ops: Vec<((ObjAddr, String), OpAddr)>,
    /// New counter values with the op counter that wrote each.
    counters: BTreeMap<(Sku, Field), (u64, u64)>,
    epochs: BTreeMap<Sku, (Option<u32>, u32)>,
    new_sku_maps: Vec<Sku>,
    new_stock_maps: Vec<ReplicaId>,
}

/// One replica of one stand document.
#[derive(Debug)]
pub struct Ledger {
    key: ReplicaKey,
    me: ReplicaId,
    stand_id: StandId,
    pool_key: PublicKey,
    doc: Automerge,
    state: State,
    clock: Clock,
    log: Vec<Entry>,
    /// The signed bytes of every change in `log`.
    bytes: Box<dyn ChangeBytes>,
    by_hash: HashMap<ChangeHash, usize>,
    by_actor: BTreeMap<ReplicaId, Vec<usize>>,
    /// The held changes no other held change depends on.
    heads: BTreeSet<ChangeHash>,
    /// `by_actor`'s lengths: what this replica holds of each author, as it tells its peers.
    vector: VersionVector,
    pending: Pending,
    rejected: HashSet<ChangeHash>,
    rejected_order: VecDeque<ChangeHash>,
    /// This replica's own maps of each item, as last written or found.
    own_objs: HashMap<Sku, draft::OwnMaps>,
    stats: LedgerStats,
    /// Accepted changes not yet applied to the document, in the order accepted (see
    /// `DOC_BATCH_MAX`); empty when the document is deferred.
    unapplied: Vec<Change>,
    /// How many changes of `log`, from its start, the document holds.
    doc_upto: usize,
    /// The document is brought up to date only when it is read, from the held bytes (see
    /// [`Ledger::defer_document`]).
    deferred: bool,
    /// Rebuilding: apply each change to the document as it is accepted, so a fault inside
    /// Automerge is pinned to one change.
    careful: bool,
    /// Rebuilding: the change Automerge panicked on.
    poisoned: Option<ChangeHash>,
    /// The key enrolled by the change just accepted (its waiting changes are woken).
    last_enrolled: Option<[u8; 32]>,
    #[cfg(feature = "planted-bugs")]
    planted: Option<LedgerBug>,
    memo: Option<SignatureMemo>,
    records: Option<RecordMemo>,
    /// The enrolled keys, decompressed once: a change's author key is otherwise decompressed
    /// twice per change, to check it is a point and to verify the signature.
    verifying: HashMap<[u8; 32], VerifyingKey>,
    /// When recording: what each change applied since the last `take_applied` was.
    applied: Option<Vec<Applied>>,
    /// The admin request the next local change carries out (see [`Ledger::with_request`]).
    request: Option<u64>,
}

/// A change applied to the state, local or received: who wrote it and what it was (its
/// message's operation, already decoded and checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The change's author.
    pub author: ReplicaId,
    /// Its sequence number.
    pub seq: u64,
    /// What it did.
    pub op: Operation,
    /// The admin request it carried out, if any.
    pub req: Option<u64>,
}

/// Signatures found good, with the changes they sign as parsed, shared by the replicas of one
/// process that receive the same changes (the simulator's stand): the same bytes with the same
/// signature verify the same way every time, and parse to the same change, so each pair is
/// checked and parsed once. Keyed by a digest of the exact bytes and the signature; a copy
/// that differs in either is parsed and verified on its own.
#[derive(Debug, Clone, Default)]
pub struct SignatureMemo(MemoMap);

type MemoKey = ([u8; 32], [u8; 64]);
type MemoMap = std::sync::Arc<std::sync::Mutex<HashMap<MemoKey, std::sync::Arc<Parsed>>>>;

/// A change in the memo, and what was read from it, each read once for all the replicas.
#[derive(Debug)]
pub(crate) struct Parsed {
    change: Change,
    message: std::sync::OnceLock<Result<ChangeMessage, Rejection>>,
    expanded: std::sync::OnceLock<Result<ExpandedChange, Rejection>>,
}

impl Parsed {
    /// Its envelope, decoded.
    fn message(&self) -> Result<&ChangeMessage, Rejection> {
        let m = (self.message).get_or_init(|| Ok(ChangeMessage::decode(self.change.message())?));
        m.as_ref().map_err(Clone::clone)
    }
    /// Its ops, decoded.
    fn expanded(&self) -> Result<&ExpandedChange, Rejection> {
        let e = self.expanded.get_or_init(|| expand(&self.change));
        e.as_ref().map_err(Clone::clone)
    }
}

impl SignatureMemo {
    pub(crate) fn key(bytes: &[u8], signature: [u8; 64]) -> MemoKey {
        use sha2::Digest as _;
        (sha2::Sha256::digest(bytes).into(), signature)
    }
    /// The change signed by `key`, parsed, if its signature was found good.
    pub(crate) fn get(&self, key: &MemoKey) -> Option<std::sync::Arc<Parsed>> {
        self.0.lock().ok()?.get(key).cloned()
    }
    pub(crate) fn insert(&self, key: MemoKey, change: &Change) -> Option<std::sync::Arc<Parsed>> {
        let mut m = self.0.lock().ok()?;
        let p = m.entry(key).or_insert_with(|| {
            std::sync::Arc::new(Parsed {
                change: change.clone(),
                message: std::sync::OnceLock::new(),
                expanded: std::sync::OnceLock::new(),
            })
        });
        Some(p.clone())
    }
}

/// Sale records shared by the replicas of one process that hold the same changes (the
/// simulator's stand): each sale is kept once, not once per replica. Keyed by the hash of the
/// change that carries it, so only the same bytes share a record.
#[derive(Debug, Clone, Default)]
pub struct RecordMemo(
    std::sync::Arc<std::sync::Mutex<HashMap<ChangeHash, std::sync::Arc<SaleRecord>>>>,
);

impl RecordMemo {
    pub(crate) fn intern(&self, hash: ChangeHash, rec: &SaleRecord) -> std::sync::Arc<SaleRecord> {
        match self.0.lock() {
            Ok(mut m) => m
                .entry(hash)
                .or_insert_with(|| std::sync::Arc::new(rec.clone()))
                .clone(),
            Err(_) => std::sync::Arc::new(rec.clone()),
        }
    }
}

/// A bug planted on purpose in the ledger, so that the simulator's checks are shown to catch it
/// (planted only with the `planted-bugs` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerBug {
    /// A new epoch map carries only the counters the change writes, dropping the others.
    DropCarryForward,
    /// A received change is not held to the policy floor: a writer past its rights is believed.
    SkipFloorOnReceive,
    /// Applying a void returns its units to the stand's totals a second time.
    DoubleCountVoid,
}

impl Ledger {
    #[cfg(feature = "planted-bugs")]
    fn planted(&self, bug: LedgerBug) -> bool {
        self.planted == Some(bug)
    }
    #[cfg(not(feature = "planted-bugs"))]
    fn planted(&self, _: LedgerBug) -> bool {
        false
    }
}

fn internal(e: impl std::fmt::Display) -> OpError {
    OpError::Internal(e.to_string())
}

impl Ledger {
    /// A replica that will join `stand`, trusting `pool` as its creator. It holds nothing until
    /// the pool's changes arrive.
    pub fn join(key: ReplicaKey, stand_id: StandId, pool_key: PublicKey) -> Self {
        let me = key.replica_id();
        let doc = Automerge::new().with_actor(key.public().actor());
        Self {
            key,
            me,
            stand_id,
            pool_key,
            doc,
            state: State::default(),
            clock: Clock::new(),
            log: Vec::new(),
            bytes: Box::new(InMemory::default()),
            by_hash: HashMap::new(),
            by_actor: BTreeMap::new(),
            heads: BTreeSet::new(),
            vector: VersionVector::new(),
            pending: Pending::default(),
            rejected: HashSet::new(),
            rejected_order: VecDeque::new(),
            own_objs: HashMap::new(),
            stats: LedgerStats::default(),
            unapplied: Vec::new(),
            doc_upto: 0,
            deferred: false,
            careful: false,
            poisoned: None,
            last_enrolled: None,
            #[cfg(feature = "planted-bugs")]
            planted: None,
            request: None,
            memo: None,
            records: None,
            verifying: HashMap::new(),
            applied: None,
        }
    }

    /// Keep a record of every change applied from now on, for [`Ledger::take_applied`].
    pub fn record_applied(&mut self) {
        self.applied.get_or_insert_with(Vec::new);
    }

    /// The changes applied since the last call, in order (empty unless recording).
    pub fn take_applied(&mut self) -> Vec<Applied> {
        self.applied
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Share a memo of good signatures with the other replicas of this process.
    pub fn share_signature_memo(&mut self, memo: SignatureMemo) {
        self.memo = Some(memo);
    }

    /// Share a memo of sale records with the other replicas of this process.
    pub fn share_sale_records(&mut self, records: RecordMemo) {
        self.records = Some(records);
    }

    /// Keep the signed bytes of changes in `bytes`, shared with other replicas of this
    /// process; a replica that already holds changes keeps its own store.
    pub fn share_change_bytes(&mut self, bytes: Shared) -> bool {
        if !self.log.is_empty() {
            return false;
        }
        self.bytes = Box::new(bytes);
        true
    }

    /// Apply accepted changes to the Automerge document only when it is read (a snapshot, a
    /// read at some heads, an offline overdraft's check), from the bytes held, instead of in
    /// batches as they come: every rule reads the state, so a replica whose document is
    /// seldom read saves the document's time and memory. Only where every held change's
    /// bytes can always be read back (kept in memory); returns whether it took effect.
    pub fn defer_document(&mut self) -> bool {
        if !self.bytes.always_readable() {
            return false;
        }
        self.deferred = true;
        self.unapplied.clear();
        true
    }

    /// Plant a bug (the simulator's planted-bug sweeps only).
    #[cfg(feature = "planted-bugs")]
    pub fn plant_bug(&mut self, bug: LedgerBug) {
        self.planted = Some(bug);
    }

    /// Rebuild a replica from its stored changes (any order). Changes that do not validate are
    /// reported, not fatal. Every rule is checked again except the signature (each stored
    /// change was verified when this replica took it) and the future-date bound (a clock set
    /// back since must not lose them: a replica that forgot its own changes would reuse their
    /// numbers). Only this replica's own store may be given here.
    pub fn restore(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        changes: Vec<SignedChange>,
        now_ms: u64,
    ) -> (Self, ApplyReport) {
        let bytes = Box::new(InMemory::default());
        Self::restore_with(key, stand_id, pool_key, changes, bytes, now_ms)
    }

    /// [`Ledger::restore`], keeping the signed bytes of what it accepts in `bytes` (the
    /// replica's store, which holds them already) instead of in memory.
    pub fn restore_with(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        changes: Vec<SignedChange>,
        bytes: Box<dyn ChangeBytes>,
        now_ms: u64,
    ) -> (Self, ApplyReport) {
        let mut l = Self::join(key, stand_id, pool_key);
        l.bytes = bytes;
        let latest = Hlc::from_packed(u64::MAX).wall_ms();
        l.pending.trusted = true;
        let report = l.apply_remote(changes, latest.max(now_ms));
        l.pending.trusted = false;
        (l, report)
    }

    // ----------------------------------------------------------------------------------------
    // Accessors and queries.

    /// This replica's id.
    pub fn me(&self) -> ReplicaId {
        self.me
    }
    /// This replica's key.
    pub fn key(&self) -> &ReplicaKey {
        &self.key
    }
    /// The stand this ledger belongs to.
    pub fn stand_id(&self) -> &StandId {
        &self.stand_id
    }
    /// The trusted pool key.
    pub fn pool_key(&self) -> PublicKey {
        self.pool_key
    }
    /// Event metadata, once the genesis has arrived.
    pub fn stand(&self) -> Option<&StandInfo> {
        self.state.stand.as_ref()
    }
    /// The pool's replica id.
    pub fn pool(&self) -> ReplicaId {
        self.pool_key.replica_id()
    }
    /// The catalog, by sku.
    pub fn catalog(&self) -> &BTreeMap<Sku, CatalogItem> {
        &self.state.catalog
    }
    /// The replica registry.
    pub fn replicas(&self) -> &BTreeMap<ReplicaId, ReplicaInfo> {
        &self.state.replicas
    }
    /// This replica's role, once enrolled.
    pub fn role(&self) -> Option<Role> {
        self.state.replicas.get(&self.me).map(|i| i.role)
    }
    /// The Automerge document (read only), with every accepted change applied.
    pub fn doc(&mut self) -> &Automerge {
        self.settle_doc();
        &self.doc
    }

    /// Apply to the document the accepted changes still waiting for it.
    fn settle_doc(&mut self) {
        let now = self.clock.last().wall_ms();
        self.flush_doc(now);
    }
    /// Counters of what has been received.
    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }
    /// Changes waiting for dependencies or enrolment.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
    /// Bytes the waiting changes are charged against their quotas.
    pub fn pending_bytes(&self) -> usize {
        self.pending.bytes()
    }
    /// Number of changes held.
    pub fn len(&self) -> usize {
        self.log.len()
    }
    /// No changes held.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }
    /// Sequence number of this replica's latest change (0: none yet).
    pub fn local_seq(&self) -> u64 {
        self.by_actor.get(&self.me).map_or(0, |v| v.len() as u64)
    }
    /// How many of `replica`'s changes this replica holds (its entry in the version vector).
    pub fn held_from(&self, replica: &ReplicaId) -> u64 {
        self.by_actor.get(replica).map_or(0, |v| v.len() as u64)
    }
    /// What the store of record keeps beside a held change's bytes.
    pub fn change_info(&self, replica: ReplicaId, seq: u64) -> Option<ChangeInfo> {
        let i = usize::try_from(seq.checked_sub(1)?).ok()?;
        let e = &self.log[*self.by_actor.get(&replica)?.get(i)?];
        Some(ChangeInfo {
            hash: e.hash.0,
            deps: e.deps.iter().map(|d| d.0).collect(),
            at: e.at,
        })
    }
    /// The current heads, in order.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.heads.iter().copied().collect()
    }
    /// The latest clock value.
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    /// What `replica` may still sell of `sku`.
    pub fn rights(&self, replica: ReplicaId, sku: &Sku) -> i64 {
        self.state.rights(replica, sku)
    }
    /// Σ over every replica of its rights of `sku` where they are positive.
    pub fn positive_rights(&self, sku: &Sku) -> i64 {
        self.state.positive_rights(sku)
    }
    /// What the whole stand has left of `sku`.
    pub fn available(&self, sku: &Sku) -> i64 {
        self.state.available(sku)
    }
    /// Units of `available` that are nobody's rights: gives a reclaimed replica made beyond
    /// what the pool saw when it reclaimed it. Σ rights + unbacked = available.
    pub fn unbacked(&self, sku: &Sku) -> u64 {
        self.state.unbacked(sku)
    }
    /// Every counter of `replica` for `sku`, and its rights (`None`: it has none yet).
    pub fn cell(&self, replica: ReplicaId, sku: &Sku) -> Option<&Cell> {
        self.state.cells.get(&(replica, sku.clone()))
    }
    /// Every cell, in replica order and by sku within a replica.
    pub fn cells(&self) -> impl Iterator<Item = (&(ReplicaId, Sku), &Cell)> {
        self.state.cells.iter()
    }
    /// One counter of `replica` for `sku` as this replica knows it (0 when never written).
    pub fn counter(&self, replica: ReplicaId, sku: &Sku, field: Field) -> u64 {
        self.state
            .cells
            .get(&(replica, sku.clone()))
            .map_or(0, |c| c.get(field))
    }

    /// Σ in of `sku`: all units that ever came into being.
    pub fn total_in(&self, sku: &Sku) -> u64 {
        self.state.totals.get(sku).map(|t| t.0).unwrap_or(0)
    }
    /// ok | low | out.
    pub fn status(&self, sku: &Sku) -> StockStatus {
        let a = self.available(sku);
        let low = self
            .state
            .catalog
            .get(sku)
            .map(|c| c.low_stock_at)
            .unwrap_or(0);
        if a <= 0 {
            StockStatus::Out
        } else if (a as u64) < low {
            StockStatus::Low
        } else {
            StockStatus::Ok
        }
    }

    /// The offline overdraft this replica may use for `sku` under the optimistic policy:
    /// floor(last known available / terminals).
    pub fn offline_cap(&self, sku: &Sku) -> u64 {
        let terminals = self.state.active_terminals().count().max(1) as u64;
        (self.available(sku).max(0) as u64) / terminals
    }

    /// How many units of `sku` this replica may sell right now under its policy and
    /// connectivity (0 where it may not sell at all).
    pub fn sellable_now(&self, sku: &Sku, pool_reachable: bool) -> u64 {
        if self.role() != Some(Role::Terminal) || self.is_retired(self.me) {
            return 0;
        }
        let rights = self.rights(self.me, sku);
        let policy = self.policy();
        let limit = match (policy, pool_reachable) {
            (Policy::Optimistic, false) => match self.status(sku) {
                StockStatus::Low | StockStatus::Out => rights,
                StockStatus::Ok => rights + self.offline_cap(sku) as i64,
            },
            _ => rights,
        };
        limit.max(0) as u64
    }

    /// Whether the item is marked unavailable ("86'd") at the stand.
    pub fn is_marked_off(&self, sku: &Sku) -> bool {
        self.state.marks.get(sku).is_some_and(|m| m.is_off())
    }

    /// The stand's policy (strict until the genesis says otherwise).
    pub fn policy(&self) -> Policy {
        self.state
            .stand
            .as_ref()
            .map(|s| s.policy)
            .unwrap_or_default()
    }

    /// Whether the holder of `key` may connect to this replica: the stand's pool, or a replica
    /// the pool enrolled and has not retired, as far as this replica has heard. Every
    /// transport (the stand mesh, the relay's uplink) admits by this one rule.
    pub fn admits(&self, key: &PublicKey) -> Result<ReplicaId, NotAdmitted> {
        let replica = key.replica_id();
        if *key == self.pool_key {
            return Ok(replica);
        }
        let stand = self.stand_id.to_string();
        match self.state.replicas.get(&replica) {
            Some(i) if i.key != *key => Err(NotAdmitted::NotEnrolled { replica, stand }),
            Some(i) if i.retired_at_pool_seq.is_some() => {
                Err(NotAdmitted::Retired { replica, stand })
            }
            Some(_) => Ok(replica),
            None => Err(NotAdmitted::NotEnrolled { replica, stand }),
        }
    }

    /// How the holder of `key` may connect: as a member ([`Ledger::admits`]), or, retired, only
    /// to hand over what it wrote before it learned of its retirement. A device can be
    /// reclaimed while it is in fact still selling offline; its sales are real and belong in
    /// the record (oversold units are refunded from there). Letting it hand them over widens
    /// nothing it can write: the receive path checks every change as from anyone, and refuses
    /// any change whose past holds the retirement, so a retired key can still only write what
    /// its rights allowed before it. It is sent nothing.
    pub fn admission(&self, key: &PublicKey) -> Result<Admission, NotAdmitted> {
        match self.admits(key) {
            Ok(r) => Ok(Admission::Member(r)),
            Err(NotAdmitted::Retired { replica, .. }) => Ok(Admission::HandOver(replica)),
            Err(e) => Err(e),
        }
    }

    /// [`Ledger::admits`], and also `pinned`, a key the operator configured (the relay's, on a
    /// device that has not yet heard the pool enrol it), until the document says otherwise:
    /// once the pool's enrolment arrives the document decides, and a retired key is refused.
    pub fn admits_pinned(
        &self,
        key: &PublicKey,
        pinned: Option<&PublicKey>,
    ) -> Result<ReplicaId, NotAdmitted> {
        match self.admits(key) {
            Err(NotAdmitted::NotEnrolled { replica, .. })
                if pinned == Some(key) && !self.state.replicas.contains_key(&replica) =>
            {
                Ok(replica)
            }
            other => other,
        }
    }

    /// Whether a replica is retired.
    pub fn is_retired(&self, r: ReplicaId) -> bool {
        self.state
            .replicas
            .get(&r)
            .is_some_and(|i| i.retired_at_pool_seq.is_some())
    }

    /// Units per minute sold by `replica` within the last `window_ms` before `now_ms`. A sale
    /// dated after `now_ms` counts in no window: a writer's clock cannot steer the rate.
    pub fn sales_rate(&self, replica: ReplicaId, now_ms: u64, window_ms: u64) -> f64 {
        let Some(q) = self.state.recent.get(&replica) else {
            return 0.0;
        };
        let since = now_ms.saturating_sub(window_ms);
        let units: u64 = q
            .iter()
            .filter(|(at, _)| (since..=now_ms).contains(&at.wall_ms()))
            .map(|(_, u)| *u)
            .fold(0, u64::saturating_add);
        units as f64 * 60_000.0 / window_ms.max(1) as f64
    }

    /// Every sale known here, in the order this replica learned of them.
    pub fn sales(&self) -> &[SaleEntry] {
        &self.state.sales
    }
    /// Refunds recorded at the stand: units per (sale, sku), as [`State::refunded`] counts them.
    pub fn refunds(&self) -> BTreeMap<(SaleId, Sku), u64> {
        let lines: BTreeSet<(SaleId, Sku)> = self
            .state
            .refunds
            .keys()
            .map(|(s, k, _)| (*s, k.clone()))
            .collect();
        lines
            .into_iter()
            .map(|(s, k)| {
                let n = self.state.refunded(s, &k);
                ((s, k), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Units of `sale`'s `sku` line refunded (see [`State::refunded`]).
    pub fn refunded(&self, sale: SaleId, sku: &Sku) -> u64 {
        self.state.refunded(sale, sku)
    }

    /// Refunded units per sku of `sale`'s lines (only those with any).
    pub fn refunded_lines(&self, sale: SaleId) -> BTreeMap<Sku, u64> {
        let Some(e) = self.sale(sale) else {
            return BTreeMap::new();
        };
        e.record
            .units()
            .into_keys()
            .map(|k| {
                let n = self.state.refunded(sale, &k);
                (k, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The pool's change that carried out admin request `id` (its sequence number), if any.
    pub fn request_done(&self, id: u64) -> Option<u64> {
        self.state.requests.get(&id).copied()
    }

    /// Run `f` with its change (the first it makes) carrying out admin request `id`: a receiver
    /// refuses a second change for the same request, so it is carried out once.
    pub fn with_request<T>(&mut self, id: Option<u64>, f: impl FnOnce(&mut Self) -> T) -> T {
        self.request = id;
        let out = f(self);
        self.request = None;
        out
    }

    /// Units of `sale`'s `sku` line this replica has recorded as refunded itself.
    pub fn refunded_by_me(&self, sale: SaleId, sku: &Sku) -> u64 {
        self.state
            .refunds
            .get(&(sale, sku.clone(), self.me))
            .copied()
            .unwrap_or(0)
    }

    /// The sale with this id, if this replica has received it.
    pub fn sale(&self, id: SaleId) -> Option<&SaleEntry> {
        self.state
            .sale_index
            .get(&id)
            .map(|&i| &self.state.sales[i])
    }

    /// The version vector of what this replica holds.
    pub fn version_vector(&self) -> VersionVector {
        self.vector.clone()
    }

    /// [`Ledger::version_vector`], borrowed.
    pub fn vector(&self) -> &VersionVector {
        &self.vector
    }

    /// The version vector counted from the per-author index.
    fn count_vector(&self) -> VersionVector {
        VersionVector::from_sorted(
            self.by_actor
                .iter()
                .map(|(r, v)| (*r, v.len() as u64))
                .collect(),
        )
    }

    /// Whether `their` names a change this replica lacks: one merge of two sorted runs.
    pub fn lacks_any_of(&self, their: &VersionVector) -> bool {
        let mut mine = self.vector.iter().peekable();
        for (r, seq) in their.iter() {
            while mine.next_if(|(m, _)| *m < r).is_some() {}
            let held = match mine.peek() {
                Some((m, v)) if *m == r => **v,
                _ => 0,
            };
            if held < *seq {
                return true;
            }
        }
        false
    }

    /// Changes this replica holds beyond `have`, in an order receivers can apply, at most `max`.
    pub fn changes_since(&self, have: &VersionVector, max: usize) -> Vec<SignedChange> {
        let mut idx: Vec<usize> = Vec::new();
        let mut theirs = have.iter().peekable();
        // The vector is the per-author index's lengths, in one run: walk it, and look in the
        // index only for the authors `have` is behind on.
        for (r, held) in self.vector.iter() {
            while theirs.next_if(|(t, _)| *t < r).is_some() {}
            let from = match theirs.peek() {
                Some((t, s)) if *t == r => **s,
                _ => 0,
            };
            if from >= *held {
                continue;
            }
            if let Some(entries) = self.by_actor.get(r) {
                let from = usize::try_from(from).unwrap_or(usize::MAX);
                if from < entries.len() {
                    idx.extend_from_slice(&entries[from..]);
                }
            }
        }
        idx.sort_unstable();
        idx.truncate(max);
        let hashes: Vec<ChangeHash> = idx.into_iter().map(|i| self.log[i].hash).collect();
        self.bytes.get_many(&hashes).into_iter().flatten().collect()
    }

    /// Every change held, in application order (for storage and audit), read from where the
    /// bytes are kept; a change whose bytes cannot be found there is left out.
    pub fn all_changes(&self) -> impl Iterator<Item = SignedChange> + '_ {
        self.log.chunks(ALL_CHANGES_CHUNK).flat_map(|chunk| {
            let hashes: Vec<ChangeHash> = chunk.iter().map(|e| e.hash).collect();
            self.bytes.get_many(&hashes).into_iter().flatten()
        })
    }

    /// The stand's counters read from the document at its current heads.
    pub fn counters_in_document(&mut self) -> BTreeMap<Sku, SkuCounters> {
        let heads = self.heads();
        self.counters_at(&heads)
    }

    /// The stand's counters read from the document as at `heads`.
    pub fn counters_at(&mut self, heads: &[ChangeHash]) -> BTreeMap<Sku, SkuCounters> {
        self.settle_doc();
        layout::read_counters(&self.doc, heads)
    }

    /// The heads of the document as it was at hybrid-logical time `t`: every change whose time
    /// is at or before `t`, closed under dependencies by Automerge when read.
    pub fn heads_at_time(&self, t: Hlc) -> Vec<ChangeHash> {
        let chosen: Vec<&Entry> = self.log.iter().filter(|e| e.at <= t).collect();
        let mut referenced: HashSet<ChangeHash> = HashSet::new();
        for e in &chosen {
            referenced.extend(e.deps.iter().copied());
        }
        chosen
            .iter()
            .filter(|e| !referenced.contains(&e.hash))
            .map(|e| e.hash)
            .collect()
    }

    /// Available stock per sku as at time `t` (point-in-time reconstruction).
    pub fn stock_at_time(&mut self, t: Hlc) -> BTreeMap<Sku, i64> {
        let heads = self.heads_at_time(t);
        if heads.is_empty() {
            return BTreeMap::new();
        }
        self.counters_at(&heads)
            .into_iter()
            .map(|(s, c)| (s, c.available()))
            .collect()
    }
}

impl Cell {
    /// Used by tests that compare state with the document.
    pub fn nonzero(&self) -> BTreeMap<Field, u64> {
        self.values
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(f, v)| (*f, *v))
            .collect()
    }
}

impl Ledger {
    /// The counters as the state holds them, in the shape `counters_at` reads from the
    /// document (for consistency checks).
    pub fn counters_from_state(&self) -> BTreeMap<Sku, SkuCounters> {
        let mut out: BTreeMap<Sku, SkuCounters> = BTreeMap::new();
        for ((r, s), c) in &self.state.cells {
            if c.epoch.is_some() {
                out.entry(s.clone())
                    .or_default()
                    .by_replica
                    .insert(*r, c.nonzero());
            }
        }
        out
    }
}
