//! The ledger: one replica of a stand document, its local operations, and the validated apply
//! path for changes received from other replicas.

use crate::error::{OpError, Refusal, Rejection};
use crate::hlc::{Clock, Hlc};
use crate::identity::{PublicKey, ReplicaKey, verify_many};
use crate::ids::{ReplicaId, Role, SaleId, Sku, StandId};
use crate::layout::{
    self, CATALOG, EVENT, MAX_EPOCH_WRITES, MAX_UNITS, REPLICAS, ROLLOVER_WRITES, STOCK,
    SkuCounters, epoch_key, parse_epoch,
};
use crate::message::{
    CatalogItem, ChangeMessage, MAX_LINES, MESSAGE_VERSION, Operation, Payment, Policy, SaleLine,
    SaleRecord, StandInfo,
};
use crate::signed::{MAX_CHANGE_BYTES, SignedChange};
use crate::state::{Cell, Field, Obj, RATE_HISTORY_LEN, ReplicaInfo, SaleEntry, State};
use automerge::legacy::{Key, ObjectId, OpType};
use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjId, ObjType, ROOT, ReadDoc,
    ScalarValue,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Received changes that wait for dependencies or for their actor's enrolment.
pub const MAX_PENDING_CHANGES: usize = 20_000;
/// Hashes of rejected changes remembered (so their duplicates are dropped cheaply).
pub const MAX_REMEMBERED_REJECTIONS: usize = 10_000;

/// A version vector: per replica, the highest contiguous change sequence number held.
pub type VersionVector = BTreeMap<ReplicaId, u64>;

/// The status of an item at the stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StockStatus {
    /// Plenty.
    Ok,
    /// Below the LOW_STOCK threshold.
    Low,
    /// Nothing left.
    Out,
}

/// A sale as asked for by a cashier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleRequest {
    /// What.
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
    Refused {
        /// Why.
        reason: Refusal,
    },
}

/// What became of a batch of received changes.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    /// Newly accepted changes, in application order (persist them; forward them).
    pub accepted: Vec<SignedChange>,
    /// Author and sequence number of each accepted change, in the same order.
    pub accepted_ids: Vec<(ReplicaId, u64)>,
    /// Already held.
    pub duplicates: usize,
    /// Waiting for dependencies or enrolment.
    pub pending: usize,
    /// Rejected, with the rule broken.
    pub rejected: Vec<Rejection>,
}

/// Counters of what this ledger has seen.
#[derive(Debug, Default, Clone)]
pub struct LedgerStats {
    /// Received changes accepted.
    pub accepted: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Rejections by rule.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Pending changes dropped because the queue was full.
    pub pending_dropped: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    signed: SignedChange,
    hash: ChangeHash,
    at: Hlc,
    /// Highest pool sequence number in this change's causal past (itself included).
    pool_seq_seen: u64,
    deps: Vec<ChangeHash>,
}

#[derive(Debug)]
struct Candidate {
    signed: SignedChange,
    change: Change,
    verified: bool,
}

/// Effects of one validated change on the state.
#[derive(Debug, Default)]
struct Effects {
    objects: Vec<((u64, ReplicaId), Obj)>,
    counters: BTreeMap<(Sku, Field), u64>,
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
    by_hash: HashMap<ChangeHash, usize>,
    by_actor: BTreeMap<ReplicaId, Vec<usize>>,
    pending: BTreeMap<ChangeHash, Candidate>,
    rejected: HashSet<ChangeHash>,
    rejected_order: VecDeque<ChangeHash>,
    own_objs: HashMap<Sku, (ObjId, ObjId)>,
    stats: LedgerStats,
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
            by_hash: HashMap::new(),
            by_actor: BTreeMap::new(),
            pending: BTreeMap::new(),
            rejected: HashSet::new(),
            rejected_order: VecDeque::new(),
            own_objs: HashMap::new(),
            stats: LedgerStats::default(),
        }
    }

    /// Create a new stand document as its pool. Returns the genesis change.
    pub fn create_stand(
        key: ReplicaKey,
        stand: StandInfo,
        pool_name: &str,
        now_ms: u64,
    ) -> Result<(Self, SignedChange), OpError> {
        let pool_key = key.public();
        let mut l = Self::join(key, stand.stand.clone(), pool_key);
        let me = l.me;
        let op = Operation::Genesis {
            stand: stand.clone(),
            pool: pool_key,
            name: pool_name.to_owned(),
        };
        let name = pool_name.to_owned();
        let change = l.commit_local(op, now_ms, move |tx, _| {
            let event = tx.put_object(ROOT, EVENT, ObjType::Map)?;
            tx.put(&event, "event", stand.event.as_str())?;
            tx.put(&event, "venue", stand.venue.as_str())?;
            tx.put(&event, "stand", stand.stand.as_str())?;
            tx.put(&event, "policy", policy_str(stand.policy))?;
            tx.put(&event, "allocation", allocation_str(stand.allocation))?;
            tx.put(&event, "low_stock_pct", u64::from(stand.low_stock_pct))?;
            tx.put_object(ROOT, CATALOG, ObjType::Map)?;
            let replicas = tx.put_object(ROOT, REPLICAS, ObjType::Map)?;
            write_replica_entry(tx, &replicas, me, &pool_key, &name, Role::Pool)?;
            let stock = tx.put_object(ROOT, STOCK, ObjType::Map)?;
            tx.put_object(&stock, me.to_string(), ObjType::Map)?;
            Ok(())
        })?;
        Ok((l, change))
    }

    /// Rebuild a replica from its stored changes (any order). Changes that do not validate are
    /// reported, not fatal.
    pub fn restore(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        changes: Vec<SignedChange>,
        now_ms: u64,
    ) -> (Self, ApplyReport) {
        let mut l = Self::join(key, stand_id, pool_key);
        let report = l.apply_remote(changes, now_ms);
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
    /// The catalog.
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
    /// The Automerge document (read only).
    pub fn doc(&self) -> &Automerge {
        &self.doc
    }
    /// Counters of what has been received.
    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }
    /// Changes waiting for dependencies or enrolment.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
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
    /// The current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }
    /// The latest clock value.
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    /// What `replica` may still sell of `sku`.
    pub fn rights(&self, replica: ReplicaId, sku: &Sku) -> i64 {
        self.state.rights(replica, sku)
    }
    /// What the whole stand has left of `sku`.
    pub fn available(&self, sku: &Sku) -> i64 {
        self.state.available(sku)
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
            (Policy::Optimistic, false) => {
                if self.status(sku) == StockStatus::Low {
                    return 0;
                }
                rights + self.offline_cap(sku) as i64
            }
            _ => rights,
        };
        limit.max(0) as u64
    }

    /// The stand's policy (strict until the genesis says otherwise).
    pub fn policy(&self) -> Policy {
        self.state
            .stand
            .as_ref()
            .map(|s| s.policy)
            .unwrap_or_default()
    }

    /// Whether a replica is retired.
    pub fn is_retired(&self, r: ReplicaId) -> bool {
        self.state
            .replicas
            .get(&r)
            .is_some_and(|i| i.retired_at_pool_seq.is_some())
    }

    /// Units per minute sold by `replica` within the last `window_ms` before `now_ms`.
    pub fn sales_rate(&self, replica: ReplicaId, now_ms: u64, window_ms: u64) -> f64 {
        let Some(q) = self.state.recent.get(&replica) else {
            return 0.0;
        };
        let since = now_ms.saturating_sub(window_ms);
        let units: u64 = q
            .iter()
            .filter(|(at, _)| at.wall_ms() >= since)
            .map(|(_, u)| *u)
            .sum();
        units as f64 * 60_000.0 / window_ms.max(1) as f64
    }

    /// Every sale known here, in the order this replica learned of them.
    pub fn sales(&self) -> &[SaleEntry] {
        &self.state.sales
    }
    /// One sale.
    pub fn sale(&self, id: SaleId) -> Option<&SaleEntry> {
        self.state
            .sale_index
            .get(&id)
            .map(|&i| &self.state.sales[i])
    }

    /// The version vector of what this replica holds.
    pub fn version_vector(&self) -> VersionVector {
        self.by_actor
            .iter()
            .map(|(r, v)| (*r, v.len() as u64))
            .collect()
    }

    /// Changes this replica holds beyond `have`, in an order receivers can apply, at most `max`.
    pub fn changes_since(&self, have: &VersionVector, max: usize) -> Vec<SignedChange> {
        let mut idx: Vec<usize> = Vec::new();
        for (r, entries) in &self.by_actor {
            let from = have.get(r).copied().unwrap_or(0) as usize;
            if from < entries.len() {
                idx.extend_from_slice(&entries[from..]);
            }
        }
        idx.sort_unstable();
        idx.truncate(max);
        idx.into_iter()
            .map(|i| self.log[i].signed.clone())
            .collect()
    }

    /// Every change held, in application order (for storage and audit).
    pub fn all_changes(&self) -> impl Iterator<Item = &SignedChange> {
        self.log.iter().map(|e| &e.signed)
    }

    /// The stand's counters read from the document as at `heads`.
    pub fn counters_at(&self, heads: &[ChangeHash]) -> BTreeMap<Sku, SkuCounters> {
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
    pub fn stock_at_time(&self, t: Hlc) -> BTreeMap<Sku, i64> {
        let heads = self.heads_at_time(t);
        if heads.is_empty() {
            return BTreeMap::new();
        }
        self.counters_at(&heads)
            .into_iter()
            .map(|(s, c)| (s, c.available()))
            .collect()
    }

    // ----------------------------------------------------------------------------------------
    // Local operations.

    /// Sell. Refusals are values; a committed sale must be persisted before it is acknowledged.
    pub fn sell(&mut self, req: SaleRequest, now_ms: u64) -> SaleOutcome {
        match self.try_sell(req, now_ms) {
            Ok((sale_id, change)) => SaleOutcome::Committed { sale_id, change },
            Err(OpError::Refused(reason)) => SaleOutcome::Refused { reason },
            Err(OpError::Internal(e)) => SaleOutcome::Refused {
                reason: Refusal::Invalid { why: e },
            },
        }
    }

    fn try_sell(
        &mut self,
        req: SaleRequest,
        now_ms: u64,
    ) -> Result<(SaleId, SignedChange), OpError> {
        self.require_role(&[Role::Terminal])?;
        if req.lines.is_empty() {
            return Err(Refusal::Invalid {
                why: "a sale needs at least one line".into(),
            }
            .into());
        }
        if req.lines.len() > MAX_LINES {
            return Err(Refusal::Invalid {
                why: format!("at most {MAX_LINES} lines"),
            }
            .into());
        }
        let mut units: BTreeMap<Sku, u64> = BTreeMap::new();
        for l in &req.lines {
            if !self.state.catalog.contains_key(&l.sku) {
                return Err(Refusal::UnknownSku { sku: l.sku.clone() }.into());
            }
            if l.qty == 0 || l.qty > MAX_UNITS {
                return Err(Refusal::Invalid {
                    why: format!("quantity of {} must be 1..{MAX_UNITS}", l.sku),
                }
                .into());
            }
            *units.entry(l.sku.clone()).or_insert(0) += l.qty;
        }
        let offline = !req.pool_reachable;
        let optimistic_offline = self.policy() == Policy::Optimistic && offline;
        let mut overdraft = BTreeMap::new();
        for (sku, want) in &units {
            let rights = self.rights(self.me, sku);
            if optimistic_offline {
                if self.status(sku) == StockStatus::Low || self.status(sku) == StockStatus::Out {
                    return Err(Refusal::LockedLowStock { sku: sku.clone() }.into());
                }
                let cap = self.offline_cap(sku);
                let have = rights + cap as i64;
                if have < *want as i64 {
                    return Err(Refusal::InsufficientRights {
                        sku: sku.clone(),
                        have,
                        want: *want,
                    }
                    .into());
                }
                if rights < *want as i64 {
                    overdraft.insert(sku.clone(), cap);
                }
            } else if rights < *want as i64 {
                return Err(Refusal::InsufficientRights {
                    sku: sku.clone(),
                    have: rights,
                    want: *want,
                }
                .into());
            }
        }
        let seq = self.next_seq();
        let sale_id = SaleId {
            replica: self.me,
            seq,
        };
        let at = self.clock.last(); // replaced by the tick inside commit_local
        let record = SaleRecord {
            id: sale_id,
            at,
            lines: req.lines,
            payment: req.payment,
            offline,
            overdraft,
        };
        let writes = self.bump(&units, Field::Out);
        let change = self.commit_local_stock(Operation::Sale(record), now_ms, writes)?;
        Ok((sale_id, change))
    }

    /// Void a sale made here: its units come back.
    pub fn void(&mut self, sale: SaleId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Terminal])?;
        let entry = self.sale(sale).ok_or(Refusal::UnknownSale { sale })?;
        if sale.replica != self.me {
            return Err(Refusal::NotYourSale { sale }.into());
        }
        if entry.voided {
            return Err(Refusal::AlreadyVoided { sale }.into());
        }
        let units = entry.record.units();
        let writes = self.bump(&units, Field::In);
        self.commit_local_stock(Operation::Void { sale, units }, now_ms, writes)
    }

    /// Units arrive at the pool.
    pub fn restock(
        &mut self,
        units: BTreeMap<Sku, u64>,
        note: &str,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool])?;
        self.check_units(&units)?;
        let writes = self.bump(&units, Field::In);
        self.commit_local_stock(
            Operation::Restock {
                units,
                note: note.to_owned(),
            },
            now_ms,
            writes,
        )
    }

    /// Shrink: units lost here.
    pub fn adjust(
        &mut self,
        units: BTreeMap<Sku, u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool, Role::Terminal])?;
        self.check_units(&units)?;
        // Shrink is written where the units are held: the pool can only write off what it has
        // not allocated (more would leave terminals with rights to units that no longer exist),
        // a terminal only its own rights.
        self.check_own_rights(&units)?;
        let writes = self.bump(&units, Field::Out);
        self.commit_local_stock(
            Operation::Adjust {
                units,
                reason: reason.to_owned(),
            },
            now_ms,
            writes,
        )
    }

    /// Give selling rights to another replica.
    pub fn give(
        &mut self,
        to: ReplicaId,
        units: BTreeMap<Sku, u64>,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool, Role::Terminal])?;
        self.check_units(&units)?;
        match self.state.replicas.get(&to) {
            None => return Err(Refusal::UnknownReplica { replica: to }.into()),
            Some(i)
                if i.role == Role::Kitchen || i.retired_at_pool_seq.is_some() || to == self.me =>
            {
                return Err(Refusal::Invalid {
                    why: format!("cannot give to {to}"),
                }
                .into());
            }
            Some(_) => {}
        }
        self.check_own_rights(&units)?;
        let writes = self.bump(&units, Field::Give(to));
        self.commit_local_stock(Operation::Give { to, units }, now_ms, writes)
    }

    /// Add or edit catalog entries (pool).
    pub fn set_catalog(
        &mut self,
        items: Vec<CatalogItem>,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool])?;
        if items.is_empty() || items.len() > MAX_LINES * 8 {
            return Err(Refusal::Invalid {
                why: "1 to 512 catalog items per change".into(),
            }
            .into());
        }
        let existing: BTreeMap<Sku, ()> =
            self.state.catalog.keys().map(|k| (k.clone(), ())).collect();
        let op = Operation::Catalog {
            items: items.clone(),
        };
        self.commit_local(op, now_ms, move |tx, _| {
            let (_, catalog) = get_obj(tx, &ROOT, CATALOG)?;
            for it in &items {
                let obj = if existing.contains_key(&it.sku) {
                    get_obj(tx, &catalog, it.sku.as_str())?.1
                } else {
                    tx.put_object(&catalog, it.sku.as_str(), ObjType::Map)?
                };
                tx.put(&obj, "name", it.name.as_str())?;
                tx.put(&obj, "price_cents", it.price_cents)?;
                tx.put(&obj, "low_stock_at", it.low_stock_at)?;
            }
            Ok(())
        })
    }

    /// Enrol a replica (pool).
    pub fn enrol(
        &mut self,
        key: PublicKey,
        name: &str,
        role: Role,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool])?;
        let rid = key.replica_id();
        if role == Role::Pool {
            return Err(Refusal::Invalid {
                why: "a stand has one pool".into(),
            }
            .into());
        }
        if self.state.replicas.contains_key(&rid) {
            return Err(Refusal::Invalid {
                why: format!("replica {rid} is already enrolled"),
            }
            .into());
        }
        let name = name.to_owned();
        let op = Operation::Enrol {
            key,
            name: name.clone(),
            role,
        };
        self.commit_local(op, now_ms, move |tx, _| {
            let (_, replicas) = get_obj(tx, &ROOT, REPLICAS)?;
            write_replica_entry(tx, &replicas, rid, &key, &name, role)?;
            let (_, stock) = get_obj(tx, &ROOT, STOCK)?;
            tx.put_object(&stock, rid.to_string(), ObjType::Map)?;
            Ok(())
        })
    }

    /// Retire a replica (pool).
    pub fn retire(&mut self, replica: ReplicaId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.check_retirable(replica)?;
        self.commit_local(Operation::Retire { replica }, now_ms, move |tx, _| {
            mark_retired(tx, replica)
        })
    }

    /// Retire a lost replica and re-mint its last known rights at the pool (pool). If it was in
    /// fact still selling offline, the difference shows as oversell for the reconciler.
    pub fn reclaim(&mut self, replica: ReplicaId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.check_retirable(replica)?;
        let units: BTreeMap<Sku, u64> = self
            .state
            .catalog
            .keys()
            .filter_map(|s| {
                let r = self.rights(replica, s);
                (r > 0).then(|| (s.clone(), r as u64))
            })
            .collect();
        let writes = self.bump(&units, Field::Reclaim(replica));
        let op = Operation::Reclaim { replica, units };
        self.commit_local(op, now_ms, move |tx, w| {
            mark_retired(tx, replica)?;
            w.write(tx, &writes)
        })
    }

    // ----------------------------------------------------------------------------------------
    // Received changes.

    /// Verify and apply received changes. Accepted changes are returned for persistence and
    /// forwarding; changes with missing dependencies or unknown actors wait (bounded).
    pub fn apply_remote(&mut self, changes: Vec<SignedChange>, now_ms: u64) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut cands: Vec<Candidate> = Vec::with_capacity(changes.len());
        let mut seen: HashSet<ChangeHash> = HashSet::new();
        for signed in changes {
            if signed.bytes.len() > MAX_CHANGE_BYTES {
                self.reject(
                    &mut report,
                    None,
                    Rejection::TooLarge {
                        len: signed.bytes.len(),
                    },
                );
                continue;
            }
            let change = match Change::try_from(&signed.bytes[..]) {
                Ok(c) => c,
                Err(e) => {
                    self.reject(&mut report, None, Rejection::Malformed(e.to_string()));
                    continue;
                }
            };
            let h = change.hash();
            if self.by_hash.contains_key(&h) || self.pending.contains_key(&h) || !seen.insert(h) {
                report.duplicates += 1;
                self.stats.duplicates += 1;
                continue;
            }
            if self.rejected.contains(&h) {
                report.duplicates += 1;
                continue;
            }
            cands.push(Candidate {
                signed,
                change,
                verified: false,
            });
        }
        // Batch-verify the signatures of actors already known.
        self.verify_known(&mut cands, &mut report);
        cands.extend(std::mem::take(&mut self.pending).into_values());

        let mut batch: Vec<Change> = Vec::new();
        loop {
            let before = batch.len();
            cands = self.apply_ready(cands, &mut batch, &mut report, now_ms);
            if batch.len() == before || cands.is_empty() {
                break;
            }
        }
        for c in cands {
            if self.pending.len() >= MAX_PENDING_CHANGES {
                self.stats.pending_dropped += 1;
                continue;
            }
            self.pending.insert(c.change.hash(), c);
        }
        report.pending = self.pending.len();
        if !batch.is_empty() {
            if self.doc.apply_changes(batch).is_err() {
                // Validation admitted something Automerge refuses: never expected. Rebuild so
                // the state and the document agree again.
                self.rebuild_from_log(now_ms);
            }
        }
        self.stats.accepted += report.accepted.len() as u64;
        report
    }

    fn verify_known(&mut self, cands: &mut Vec<Candidate>, report: &mut ApplyReport) {
        let mut items = Vec::new();
        let mut which = Vec::new();
        for (i, c) in cands.iter().enumerate() {
            if let (Some(k), Some(sig)) = (
                self.key_of_actor(c.change.actor_id()),
                c.signed.signature_array(),
            ) {
                items.push((k, &c.signed.bytes[..], sig));
                which.push(i);
            }
        }
        let bad: HashSet<usize> = verify_many(&items).into_iter().map(|j| which[j]).collect();
        for &i in &which {
            cands[i].verified = true;
        }
        if bad.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(cands.len());
        for (i, c) in std::mem::take(cands).into_iter().enumerate() {
            if bad.contains(&i) {
                let replica =
                    actor_rid(c.change.actor_id()).unwrap_or(ReplicaId::from_public(&[0; 32]));
                self.reject(
                    report,
                    Some(c.change.hash()),
                    Rejection::BadSignature { replica },
                );
            } else {
                kept.push(c);
            }
        }
        *cands = kept;
    }

    /// One pass of Kahn's algorithm over the candidates: apply every change whose dependencies
    /// are held, in dependency order. Returns those that must keep waiting.
    fn apply_ready(
        &mut self,
        cands: Vec<Candidate>,
        batch: &mut Vec<Change>,
        report: &mut ApplyReport,
        now_ms: u64,
    ) -> Vec<Candidate> {
        let mut slots: Vec<Option<Candidate>> = cands.into_iter().map(Some).collect();
        let mut missing: Vec<usize> = vec![0; slots.len()];
        let mut waiters: HashMap<ChangeHash, Vec<usize>> = HashMap::new();
        let mut ready: VecDeque<usize> = VecDeque::new();
        let in_batch: HashMap<ChangeHash, usize> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (c.change.hash(), i)))
            .collect();
        let mut doomed: Vec<usize> = Vec::new();
        for (i, c) in slots.iter().enumerate() {
            let Some(c) = c else { continue };
            for d in c.change.deps() {
                if self.by_hash.contains_key(d) {
                    continue;
                }
                if self.rejected.contains(d) {
                    doomed.push(i);
                }
                missing[i] += 1;
                if in_batch.contains_key(d) {
                    waiters.entry(*d).or_default().push(i);
                }
            }
            if missing[i] == 0 {
                ready.push_back(i);
            }
        }
        for i in doomed {
            if let Some(c) = slots[i].take() {
                self.reject(report, Some(c.change.hash()), Rejection::DependsOnRejected);
            }
        }
        let mut waiting_actor: Vec<Candidate> = Vec::new();
        while let Some(i) = ready.pop_front() {
            let Some(c) = slots[i].take() else { continue };
            let h = c.change.hash();
            match self.accept_one(&c, now_ms) {
                Ok(Some(actor)) => {
                    report.accepted_ids.push((actor, c.change.seq()));
                    batch.push(c.change);
                    report.accepted.push(c.signed);
                    for w in waiters.remove(&h).unwrap_or_default() {
                        missing[w] = missing[w].saturating_sub(1);
                        if missing[w] == 0 {
                            ready.push_back(w);
                        }
                    }
                }
                Ok(None) => waiting_actor.push(c),
                Err(r) => {
                    self.reject(report, Some(h), r);
                    // Dependants of a rejected change can never apply.
                    let mut stack = waiters.remove(&h).unwrap_or_default();
                    while let Some(w) = stack.pop() {
                        if let Some(wc) = slots[w].take() {
                            let wh = wc.change.hash();
                            self.reject(report, Some(wh), Rejection::DependsOnRejected);
                            stack.extend(waiters.remove(&wh).unwrap_or_default());
                        }
                    }
                }
            }
        }
        waiting_actor.extend(slots.into_iter().flatten());
        waiting_actor
    }

    fn reject(&mut self, report: &mut ApplyReport, hash: Option<ChangeHash>, r: Rejection) {
        *self.stats.rejected.entry(r.rule()).or_insert(0) += 1;
        if let Some(h) = hash {
            if self.rejected.insert(h) {
                self.rejected_order.push_back(h);
                if self.rejected_order.len() > MAX_REMEMBERED_REJECTIONS {
                    if let Some(old) = self.rejected_order.pop_front() {
                        self.rejected.remove(&old);
                    }
                }
            }
        }
        report.rejected.push(r);
    }

    fn key_of_actor(&self, actor: &ActorId) -> Option<PublicKey> {
        let b: [u8; 32] = actor.to_bytes().try_into().ok()?;
        if let Some(r) = self.state.by_key.get(&b) {
            return self.state.replicas.get(r).map(|i| i.key);
        }
        (b == *self.pool_key.bytes() && self.state.stand.is_none()).then_some(self.pool_key)
    }

    /// Validate and apply one change whose dependencies are all held; returns its author.
    /// `Ok(None)`: its actor is not enrolled (yet).
    fn accept_one(&mut self, c: &Candidate, now_ms: u64) -> Result<Option<ReplicaId>, Rejection> {
        let Some(key) = self.key_of_actor(c.change.actor_id()) else {
            if c.change.actor_id().to_bytes().len() != 32 {
                return Err(Rejection::UnregisteredActor {
                    actor: c.change.actor_id().to_hex_string(),
                });
            }
            return Ok(None);
        };
        if !c.verified {
            let ok = c
                .signed
                .signature_array()
                .is_some_and(|s| key.verify(&c.signed.bytes, &s));
            if !ok {
                return Err(Rejection::BadSignature {
                    replica: key.replica_id(),
                });
            }
        }
        let msg = ChangeMessage::decode(c.change.message())?;
        let expanded = expand(&c.change)?;
        let actor = key.replica_id();
        let pool_seq_seen = self.pool_seq_seen(&c.change, actor);
        let effects = self.validate(&c.change, &expanded, &msg, actor, pool_seq_seen)?;
        self.apply_effects(actor, &msg, effects, c.change.seq());
        self.record(c.signed.clone(), &c.change, actor, msg.at, pool_seq_seen);
        self.clock.observe(msg.at, now_ms);
        Ok(Some(actor))
    }

    fn pool_seq_seen(&self, change: &Change, actor: ReplicaId) -> u64 {
        let mut m = change
            .deps()
            .iter()
            .filter_map(|d| self.by_hash.get(d))
            .map(|&i| self.log[i].pool_seq_seen)
            .max()
            .unwrap_or(0);
        if actor == self.pool() {
            m = m.max(change.seq());
        }
        m
    }

    fn record(
        &mut self,
        signed: SignedChange,
        change: &Change,
        actor: ReplicaId,
        at: Hlc,
        pool_seq_seen: u64,
    ) {
        let i = self.log.len();
        let hash = change.hash();
        self.log.push(Entry {
            signed,
            hash,
            at,
            pool_seq_seen,
            deps: change.deps().to_vec(),
        });
        self.by_hash.insert(hash, i);
        self.by_actor.entry(actor).or_default().push(i);
    }

    /// Rebuild document and state after an internal fault (a change that validation admitted
    /// but Automerge refused, or an own change that fails validation) by replaying the held
    /// changes through the receive path: whatever fails again is left out (an own faulty change
    /// was never recorded or sent). The stats carry over and count the fault; pending changes
    /// are offered again.
    fn rebuild_from_log(&mut self, now_ms: u64) {
        let changes: Vec<SignedChange> = self.log.iter().map(|e| e.signed.clone()).collect();
        let pending: Vec<SignedChange> = self.pending.values().map(|c| c.signed.clone()).collect();
        let stats = std::mem::take(&mut self.stats);
        let (mut fresh, _) = Self::restore(
            self.key.clone(),
            self.stand_id.clone(),
            self.pool_key,
            changes,
            now_ms,
        );
        fresh.apply_remote(pending, now_ms);
        fresh.stats = stats;
        *fresh.stats.rejected.entry("internal_fault").or_insert(0) += 1;
        *self = fresh;
    }

    // ----------------------------------------------------------------------------------------
    // Validation.

    fn validate(
        &self,
        change: &Change,
        ex: &ExpandedChange,
        msg: &ChangeMessage,
        actor: ReplicaId,
        pool_seq_seen: u64,
    ) -> Result<Effects, Rejection> {
        let is_pool = actor == self.pool();
        let role = if is_pool {
            Role::Pool
        } else {
            self.state
                .replicas
                .get(&actor)
                .map(|i| i.role)
                .ok_or_else(|| Rejection::UnregisteredActor {
                    actor: actor.to_string(),
                })?
        };
        if let Some(info) = self.state.replicas.get(&actor) {
            if let Some(k) = info.retired_at_pool_seq {
                if pool_seq_seen >= k {
                    return Err(Rejection::Retired { replica: actor });
                }
            }
        }
        let op_kind = msg.op.kind();
        let invalid = |why: String| Rejection::InvalidOperation { op: op_kind, why };
        if msg.at.packed() as i64 != change.timestamp() {
            return Err(invalid("message time differs from the change time".into()));
        }
        // Stand-level preconditions per operation.
        match &msg.op {
            Operation::Genesis { stand, pool, .. } => {
                if !is_pool || self.state.stand.is_some() {
                    return Err(invalid("only the pool creates the stand, once".into()));
                }
                if stand.stand != self.stand_id || *pool != self.pool_key {
                    return Err(Rejection::WrongStand(format!(
                        "genesis of stand {}",
                        stand.stand
                    )));
                }
            }
            _ if self.state.stand.is_none() => {
                return Err(Rejection::WrongStand(
                    "the stand's genesis has not been applied".into(),
                ));
            }
            Operation::Catalog { items } => {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section: "catalog",
                    });
                }
                if items.is_empty() || items.len() > MAX_LINES * 8 {
                    return Err(invalid("1 to 512 items".into()));
                }
            }
            Operation::Enrol { key, role: r, .. } => {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section: "replicas",
                    });
                }
                if *r == Role::Pool || self.state.replicas.contains_key(&key.replica_id()) {
                    return Err(invalid(format!(
                        "cannot enrol {} as {:?}",
                        key.replica_id(),
                        r
                    )));
                }
            }
            Operation::Retire { replica } | Operation::Reclaim { replica, .. } => {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section: "replicas",
                    });
                }
                match self.state.replicas.get(replica) {
                    Some(i) if i.role != Role::Pool && i.retired_at_pool_seq.is_none() => {}
                    _ => return Err(invalid(format!("{replica} cannot be retired"))),
                }
            }
            Operation::Restock { .. } if !is_pool => {
                return Err(Rejection::PoolOnly {
                    replica: actor,
                    role,
                    section: "restock",
                });
            }
            Operation::Sale(rec) => {
                if role != Role::Terminal {
                    return Err(invalid(format!("a {} does not sell", role.as_str())));
                }
                if rec.id
                    != (SaleId {
                        replica: actor,
                        seq: change.seq(),
                    })
                    || rec.at != msg.at
                {
                    return Err(invalid("sale id or time does not match the change".into()));
                }
                if rec.lines.is_empty() || rec.lines.len() > MAX_LINES {
                    return Err(invalid("1 to 64 lines".into()));
                }
                for l in &rec.lines {
                    if l.qty == 0 || !self.state.catalog.contains_key(&l.sku) {
                        return Err(invalid(format!("bad line for {}", l.sku)));
                    }
                }
            }
            Operation::Void { sale, units } => {
                if sale.replica != actor {
                    return Err(invalid("only the seller voids a sale".into()));
                }
                match self.sale(*sale) {
                    Some(e) if !e.voided && e.record.units() == *units => {}
                    _ => return Err(invalid(format!("sale {sale} cannot be voided"))),
                }
            }
            Operation::Give { to, .. } => match self.state.replicas.get(to) {
                Some(i) if i.role != Role::Kitchen && *to != actor => {}
                _ => return Err(invalid(format!("cannot give to {to}"))),
            },
            _ => {}
        }
        if role == Role::Kitchen {
            return Err(invalid("a kitchen display writes nothing".into()));
        }

        let mut fx = Effects::default();
        let actor_bytes = ActorId::from(*self.replica_key_bytes(actor)?);
        let mut new_objs: HashMap<u64, Obj> = HashMap::new();
        let mut epoch_written: BTreeMap<Sku, HashSet<Field>> = BTreeMap::new();
        let start = change.start_op().get();
        for (i, op) in ex.operations.iter().enumerate() {
            let opid = start + i as u64;
            let Key::Map(k) = &op.key else {
                return Err(Rejection::ForbiddenOp("list insert".into()));
            };
            if op.insert {
                return Err(Rejection::ForbiddenOp("insert".into()));
            }
            let target = match &op.obj {
                ObjectId::Root => None,
                ObjectId::Id(id) => {
                    let creator =
                        self.rid_of_actor(id.actor())
                            .ok_or_else(|| Rejection::NotOwner {
                                replica: actor,
                                target: "an unknown object".into(),
                            })?;
                    let o = if creator == actor {
                        new_objs.get(&id.counter()).cloned()
                    } else {
                        None
                    };
                    Some(
                        o.or_else(|| self.state.objects.get(&(id.counter(), creator)).cloned())
                            .ok_or_else(|| Rejection::NotOwner {
                                replica: actor,
                                target: "an unknown object".into(),
                            })?,
                    )
                }
            };
            let where_ = || format!("{}/{}", describe(target.as_ref()), k);
            for p in op.pred.iter() {
                if *p.actor() != actor_bytes {
                    return Err(Rejection::ForeignPred {
                        replica: actor,
                        target: where_(),
                    });
                }
            }
            let make_map = matches!(op.action, OpType::Make(ObjType::Map));
            let scalar = match &op.action {
                OpType::Put(v) => Some(v),
                OpType::Make(ObjType::Map) => None,
                other => return Err(Rejection::ForbiddenOp(format!("{other:?} at {}", where_()))),
            };
            let pool_section = |section: &'static str, allowed: bool| -> Result<(), Rejection> {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section,
                    });
                }
                if !allowed {
                    return Err(invalid(format!("writes {section} section")));
                }
                Ok(())
            };
            let genesis = matches!(msg.op, Operation::Genesis { .. });
            let mut created: Option<Obj> = None;
            match target.clone() {
                None => {
                    pool_section("root", genesis)?;
                    if !make_map || !op.pred.is_empty() {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    created = Some(match k.as_str() {
                        EVENT => Obj::Event,
                        CATALOG => Obj::Catalog,
                        REPLICAS => Obj::Replicas,
                        STOCK => Obj::Stock,
                        _ => return Err(invalid(format!("unknown root key {k}"))),
                    });
                }
                Some(Obj::Event) => {
                    pool_section("event", genesis)?;
                    if make_map {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                }
                Some(Obj::Catalog) => {
                    pool_section(
                        "catalog",
                        genesis || matches!(msg.op, Operation::Catalog { .. }),
                    )?;
                    let sku = Sku::new(k.to_string()).map_err(|e| invalid(e.to_string()))?;
                    if !make_map || self.state.catalog.contains_key(&sku) {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    created = Some(Obj::CatalogItem(sku));
                }
                Some(Obj::CatalogItem(_)) => {
                    pool_section(
                        "catalog",
                        genesis || matches!(msg.op, Operation::Catalog { .. }),
                    )?;
                    if make_map {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                }
                Some(Obj::Replicas) => {
                    pool_section(
                        "replicas",
                        genesis || matches!(msg.op, Operation::Enrol { .. }),
                    )?;
                    let rid: ReplicaId = k
                        .parse()
                        .map_err(|e: crate::ids::InvalidId| invalid(e.to_string()))?;
                    if !make_map || !op.pred.is_empty() || self.state.replicas.contains_key(&rid) {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    created = Some(Obj::ReplicaEntry(rid));
                }
                Some(Obj::ReplicaEntry(_)) => {
                    pool_section(
                        "replicas",
                        matches!(
                            msg.op,
                            Operation::Genesis { .. }
                                | Operation::Enrol { .. }
                                | Operation::Retire { .. }
                                | Operation::Reclaim { .. }
                        ),
                    )?;
                    if make_map {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                }
                Some(Obj::Stock) => {
                    pool_section(
                        "stock",
                        genesis || matches!(msg.op, Operation::Enrol { .. }),
                    )?;
                    let rid: ReplicaId = k
                        .parse()
                        .map_err(|e: crate::ids::InvalidId| invalid(e.to_string()))?;
                    if !make_map || !op.pred.is_empty() || self.state.stock_maps.contains_key(&rid)
                    {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    fx.new_stock_maps.push(rid);
                    created = Some(Obj::ReplicaStock(rid));
                }
                Some(Obj::ReplicaStock(owner)) => {
                    if owner != actor {
                        return Err(Rejection::NotOwner {
                            replica: actor,
                            target: where_(),
                        });
                    }
                    let sku = Sku::new(k.to_string()).map_err(|e| invalid(e.to_string()))?;
                    let exists = self
                        .state
                        .cells
                        .get(&(actor, sku.clone()))
                        .is_some_and(|c| c.has_map)
                        || fx.new_sku_maps.contains(&sku);
                    if !make_map
                        || !op.pred.is_empty()
                        || exists
                        || !self.state.catalog.contains_key(&sku)
                    {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    fx.new_sku_maps.push(sku.clone());
                    created = Some(Obj::SkuStock(actor, sku));
                }
                Some(Obj::SkuStock(owner, sku)) => {
                    if owner != actor {
                        return Err(Rejection::NotOwner {
                            replica: actor,
                            target: where_(),
                        });
                    }
                    let current = fx.epochs.get(&sku).and_then(|e| e.0).or_else(|| {
                        self.state
                            .cells
                            .get(&(actor, sku.clone()))
                            .and_then(|c| c.epoch)
                    });
                    let next = current.map_or(0, |e| e + 1);
                    if !make_map || !op.pred.is_empty() || parse_epoch(k) != Some(next) {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    fx.epochs.insert(sku.clone(), (Some(next), 0));
                    epoch_written.insert(sku.clone(), HashSet::new());
                    created = Some(Obj::Epoch(actor, sku, next));
                }
                Some(Obj::Epoch(owner, sku, e)) => {
                    if owner != actor {
                        return Err(Rejection::NotOwner {
                            replica: actor,
                            target: where_(),
                        });
                    }
                    let cell = self.state.cells.get(&(actor, sku.clone()));
                    let (cur_epoch, writes) = match fx.epochs.get(&sku) {
                        Some((Some(ep), w)) => (Some(*ep), *w),
                        _ => (
                            cell.and_then(|c| c.epoch),
                            cell.map_or(0, |c| c.epoch_writes),
                        ),
                    };
                    if cur_epoch != Some(e) {
                        return Err(Rejection::ForbiddenOp(format!(
                            "write to an old epoch at {}",
                            where_()
                        )));
                    }
                    let field =
                        Field::parse(k).ok_or_else(|| invalid(format!("unknown counter {k}")))?;
                    match field {
                        Field::Give(to)
                            if to == actor || !self.state.replicas.contains_key(&to) =>
                        {
                            return Err(invalid(format!("give to {to}")));
                        }
                        Field::Reclaim(_) if !is_pool => {
                            return Err(Rejection::PoolOnly {
                                replica: actor,
                                role,
                                section: "reclaim",
                            });
                        }
                        _ => {}
                    }
                    let v = match scalar {
                        Some(ScalarValue::Uint(v)) => *v,
                        _ => {
                            return Err(invalid(format!(
                                "counter {k} must be an unsigned integer"
                            )));
                        }
                    };
                    if v > MAX_UNITS {
                        return Err(invalid(format!("counter {k} above {MAX_UNITS}")));
                    }
                    let old = fx
                        .counters
                        .get(&(sku.clone(), field))
                        .copied()
                        .unwrap_or_else(|| cell.map_or(0, |c| c.get(field)));
                    if v < old {
                        return Err(Rejection::Shrinking {
                            replica: actor,
                            sku: sku.clone(),
                            field: field.key(),
                            from: old,
                            to: v,
                        });
                    }
                    if writes + 1 > MAX_EPOCH_WRITES {
                        return Err(invalid("epoch map over its write limit".into()));
                    }
                    fx.epochs.insert(sku.clone(), (Some(e), writes + 1));
                    fx.counters.insert((sku.clone(), field), v);
                    if let Some(w) = epoch_written.get_mut(&sku) {
                        w.insert(field);
                    }
                }
            }
            if let Some(o) = created {
                new_objs.insert(opid, o.clone());
                fx.objects.push(((opid, actor), o));
            }
        }
        // A new epoch must carry every non-zero counter forward.
        for (sku, written) in &epoch_written {
            if let Some(cell) = self.state.cells.get(&(actor, sku.clone())) {
                for (f, v) in &cell.values {
                    if *v > 0 && !written.contains(f) {
                        return Err(invalid(format!("new epoch of {sku} drops {}", f.key())));
                    }
                }
            }
        }
        // The counter moves must be exactly what the message says.
        let expected: BTreeMap<(Sku, Field), u64> = match &msg.op {
            Operation::Sale(rec) => keyed(&rec.units(), Field::Out),
            Operation::Void { units, .. } | Operation::Restock { units, .. } => {
                keyed(units, Field::In)
            }
            Operation::Reclaim { replica, units } => keyed(units, Field::Reclaim(*replica)),
            Operation::Adjust { units, .. } => keyed(units, Field::Out),
            Operation::Give { to, units } => keyed(units, Field::Give(*to)),
            _ => BTreeMap::new(),
        };
        let mut actual: BTreeMap<(Sku, Field), u64> = BTreeMap::new();
        for ((sku, f), v) in &fx.counters {
            let old = self.state.value(actor, sku, *f);
            if *v > old {
                actual.insert((sku.clone(), *f), v - old);
            }
        }
        if expected != actual {
            let sku = expected
                .keys()
                .chain(actual.keys())
                .find(|k| expected.get(k) != actual.get(k))
                .map(|(s, _)| s.to_string())
                .unwrap_or_default();
            return Err(Rejection::MessageMismatch { op: op_kind, sku });
        }
        // Policy floor for every writer (the pool too: its gives and write-offs may not exceed
        // what it holds), and no minting by non-pool writers. A retired replica's changes
        // that reach us here were made before it learned of its retirement: its rights were
        // reclaimed, so they are accepted as the oversell the reconciler refunds.
        let retired = self
            .state
            .replicas
            .get(&actor)
            .is_some_and(|i| i.retired_at_pool_seq.is_some());
        if !retired {
            let skus: HashSet<&Sku> = fx.counters.keys().map(|(s, _)| s).collect();
            for sku in skus {
                let get = |f: Field| {
                    fx.counters
                        .get(&(sku.clone(), f))
                        .copied()
                        .unwrap_or_else(|| self.state.value(actor, sku, f))
                };
                let (i, o) = (get(Field::In), get(Field::Out));
                if !is_pool && i > o {
                    return Err(Rejection::Minting {
                        replica: actor,
                        sku: sku.clone(),
                        in_units: i,
                        out_units: o,
                    });
                }
                let old_gave = self
                    .state
                    .cells
                    .get(&(actor, sku.clone()))
                    .map_or(0, |c| c.gave);
                let taken = self
                    .state
                    .reclaimed
                    .get(&(actor, sku.clone()))
                    .copied()
                    .unwrap_or(0);
                let mut gave = old_gave;
                for ((s, f), v) in &fx.counters {
                    if s == sku {
                        if let Field::Give(_) = f {
                            gave += v - self.state.value(actor, sku, *f);
                        }
                    }
                }
                let recv = self
                    .state
                    .received
                    .get(&(actor, sku.clone()))
                    .copied()
                    .unwrap_or(0);
                let rights = i as i64 + recv as i64 - gave as i64 - o as i64 - taken as i64;
                let floor = match &msg.op {
                    Operation::Sale(rec) if self.policy() == Policy::Optimistic => {
                        let od = rec.overdraft.get(sku).copied().unwrap_or(0);
                        if od > self.total_in(sku) {
                            return Err(invalid(format!(
                                "overdraft {od} of {sku} above all stock"
                            )));
                        }
                        -(od as i64)
                    }
                    _ => 0,
                };
                // Only a change that lowers rights is held to the floor: a void that returns
                // units to an overdrawn terminal raises its rights and is always allowed.
                let before = self.state.rights(actor, sku);
                if rights < floor && rights < before {
                    return Err(Rejection::BelowFloor {
                        replica: actor,
                        sku: sku.clone(),
                        rights,
                        floor,
                    });
                }
            }
        }
        Ok(fx)
    }

    fn replica_key_bytes(&self, r: ReplicaId) -> Result<&[u8; 32], Rejection> {
        if r == self.pool() {
            return Ok(self.pool_key.bytes());
        }
        self.state
            .replicas
            .get(&r)
            .map(|i| i.key.bytes())
            .ok_or_else(|| Rejection::UnregisteredActor {
                actor: r.to_string(),
            })
    }

    fn rid_of_actor(&self, a: &ActorId) -> Option<ReplicaId> {
        let b: [u8; 32] = a.to_bytes().try_into().ok()?;
        if b == *self.pool_key.bytes() {
            return Some(self.pool());
        }
        self.state.by_key.get(&b).copied()
    }

    fn apply_effects(&mut self, actor: ReplicaId, msg: &ChangeMessage, fx: Effects, seq: u64) {
        let st = &mut self.state;
        for (id, o) in fx.objects {
            st.objects.insert(id, o);
        }
        for r in fx.new_stock_maps {
            st.stock_maps.insert(r, ());
        }
        for sku in fx.new_sku_maps {
            st.cells.entry((actor, sku)).or_default().has_map = true;
        }
        for (sku, (epoch, writes)) in fx.epochs {
            let c = st.cells.entry((actor, sku)).or_default();
            c.epoch = epoch;
            c.epoch_writes = writes;
        }
        for ((sku, f), v) in fx.counters {
            st.set_value(actor, &sku, f, v);
        }
        if actor == self.pool_key.replica_id() {
            st.pool_seq = seq;
        }
        match &msg.op {
            Operation::Genesis { stand, pool, name } => {
                st.stand = Some(stand.clone());
                st.pool = Some(pool.replica_id());
                st.by_key.insert(*pool.bytes(), pool.replica_id());
                st.replicas.insert(
                    pool.replica_id(),
                    ReplicaInfo {
                        name: name.clone(),
                        role: Role::Pool,
                        key: *pool,
                        retired_at_pool_seq: None,
                    },
                );
            }
            Operation::Catalog { items } => {
                for it in items {
                    st.catalog.insert(it.sku.clone(), it.clone());
                }
            }
            Operation::Enrol { key, name, role } => {
                st.by_key.insert(*key.bytes(), key.replica_id());
                st.replicas.insert(
                    key.replica_id(),
                    ReplicaInfo {
                        name: name.clone(),
                        role: *role,
                        key: *key,
                        retired_at_pool_seq: None,
                    },
                );
            }
            Operation::Retire { replica } | Operation::Reclaim { replica, .. } => {
                if let Some(i) = st.replicas.get_mut(replica) {
                    i.retired_at_pool_seq = Some(seq);
                }
            }
            Operation::Sale(rec) => {
                st.sale_index.insert(rec.id, st.sales.len());
                st.sales.push(SaleEntry {
                    record: rec.clone(),
                    voided: false,
                });
                let q = st.recent.entry(actor).or_default();
                q.push_back((rec.at, rec.units().values().sum()));
                if q.len() > RATE_HISTORY_LEN {
                    q.pop_front();
                }
            }
            Operation::Void { sale, .. } => {
                if let Some(&i) = st.sale_index.get(sale) {
                    st.sales[i].voided = true;
                }
            }
            Operation::Restock { .. } | Operation::Adjust { .. } | Operation::Give { .. } => {}
        }
    }

    // ----------------------------------------------------------------------------------------
    // Writing local changes.

    fn require_role(&self, roles: &[Role]) -> Result<(), OpError> {
        if self.state.stand.is_none() {
            return Err(Refusal::NoStand.into());
        }
        let info = self
            .state
            .replicas
            .get(&self.me)
            .ok_or(Refusal::NotEnrolled)?;
        if info.retired_at_pool_seq.is_some() {
            return Err(Refusal::Retired.into());
        }
        if !roles.contains(&info.role) {
            return Err(Refusal::WrongRole { role: info.role }.into());
        }
        Ok(())
    }

    fn check_units(&self, units: &BTreeMap<Sku, u64>) -> Result<(), OpError> {
        if units.is_empty() || units.len() > MAX_LINES {
            return Err(Refusal::Invalid {
                why: format!("1 to {MAX_LINES} items"),
            }
            .into());
        }
        for (sku, n) in units {
            if !self.state.catalog.contains_key(sku) {
                return Err(Refusal::UnknownSku { sku: sku.clone() }.into());
            }
            if *n == 0 || *n > MAX_UNITS {
                return Err(Refusal::Invalid {
                    why: format!("quantity of {sku} must be 1..{MAX_UNITS}"),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Refuse unless this replica holds at least `units` of rights for every sku.
    fn check_own_rights(&self, units: &BTreeMap<Sku, u64>) -> Result<(), OpError> {
        for (sku, n) in units {
            let have = self.rights(self.me, sku);
            if have < *n as i64 {
                return Err(Refusal::InsufficientRights {
                    sku: sku.clone(),
                    have,
                    want: *n,
                }
                .into());
            }
        }
        Ok(())
    }

    fn check_retirable(&self, replica: ReplicaId) -> Result<(), OpError> {
        self.require_role(&[Role::Pool])?;
        match self.state.replicas.get(&replica) {
            None => Err(Refusal::UnknownReplica { replica }.into()),
            Some(i) if i.role == Role::Pool => Err(Refusal::Invalid {
                why: "the pool cannot be retired".into(),
            }
            .into()),
            Some(i) if i.retired_at_pool_seq.is_some() => Err(Refusal::Invalid {
                why: format!("{replica} is already retired"),
            }
            .into()),
            Some(_) => Ok(()),
        }
    }

    fn next_seq(&self) -> u64 {
        self.by_actor.get(&self.me).map_or(0, |v| v.len() as u64) + 1
    }

    /// New absolute values of this replica's counters after adding `units` to `field`.
    fn bump(&self, units: &BTreeMap<Sku, u64>, field: Field) -> BTreeMap<(Sku, Field), u64> {
        units
            .iter()
            .map(|(s, n)| ((s.clone(), field), self.state.value(self.me, s, field) + n))
            .collect()
    }

    fn commit_local_stock(
        &mut self,
        op: Operation,
        now_ms: u64,
        writes: BTreeMap<(Sku, Field), u64>,
    ) -> Result<SignedChange, OpError> {
        self.commit_local(op, now_ms, move |tx, w| w.write(tx, &writes))
    }

    /// Write one change with `f`, commit it with the typed message, sign it, and run it through
    /// the same validation as a received change so the state is updated by one code path.
    fn commit_local<F>(
        &mut self,
        mut op: Operation,
        now_ms: u64,
        f: F,
    ) -> Result<SignedChange, OpError>
    where
        F: FnOnce(&mut Transaction<'_>, &mut Writer<'_>) -> Result<(), automerge::AutomergeError>,
    {
        let at = self.clock.tick(now_ms);
        if let Operation::Sale(rec) = &mut op {
            rec.at = at;
        }
        let msg = ChangeMessage {
            v: MESSAGE_VERSION,
            at,
            op,
        };
        let text = msg.encode();
        let mut tx = self.doc.transaction();
        let mut writer = Writer {
            me: self.me,
            state: &self.state,
            objs: &mut self.own_objs,
        };
        if let Err(e) = f(&mut tx, &mut writer) {
            tx.rollback();
            self.own_objs.clear();
            return Err(internal(e));
        }
        tx.commit_with(
            CommitOptions::default()
                .with_message(text)
                .with_time(at.packed() as i64),
        );
        let change = self
            .doc
            .get_last_local_change()
            .ok_or_else(|| internal("committed change not found"))?;
        let signed = SignedChange {
            signature: self.key.sign(change.raw_bytes()).to_vec(),
            bytes: change.raw_bytes().to_vec(),
        };
        let expanded = expand(&change).map_err(internal)?;
        let pool_seq_seen = self.pool_seq_seen(&change, self.me);
        match self.validate(&change, &expanded, &msg, self.me, pool_seq_seen) {
            Ok(fx) => {
                self.apply_effects(self.me, &msg, fx, change.seq());
                self.record(signed.clone(), &change, self.me, at, pool_seq_seen);
                Ok(signed)
            }
            Err(r) => {
                // Our own change broke a rule the pre-checks should have caught: a bug. The
                // document already holds it, so rebuild to keep state and document in step.
                let why = format!("own {} change fails validation: {r}", msg.op.kind());
                self.own_objs.clear();
                let now = self.clock.last().wall_ms();
                self.rebuild_from_log(now);
                Err(OpError::Internal(why))
            }
        }
    }
}

/// Writes this replica's counters into its epoch maps, rolling over when an epoch is full.
struct Writer<'a> {
    me: ReplicaId,
    state: &'a State,
    objs: &'a mut HashMap<Sku, (ObjId, ObjId)>,
}

impl Writer<'_> {
    fn write(
        &mut self,
        tx: &mut Transaction<'_>,
        writes: &BTreeMap<(Sku, Field), u64>,
    ) -> Result<(), automerge::AutomergeError> {
        let mut by_sku: BTreeMap<&Sku, Vec<(Field, u64)>> = BTreeMap::new();
        for ((sku, f), v) in writes {
            by_sku.entry(sku).or_default().push((*f, *v));
        }
        for (sku, fields) in by_sku {
            let cell = self
                .state
                .cells
                .get(&(self.me, sku.clone()))
                .cloned()
                .unwrap_or_default();
            let (sku_map, epoch_map) = match (cell.has_map, cell.epoch) {
                (true, Some(e)) => match self.objs.get(sku) {
                    Some(o) => o.clone(),
                    None => {
                        let (_, stock) = get_obj(tx, &ROOT, STOCK)?;
                        let (_, mine) = get_obj(tx, &stock, &self.me.to_string())?;
                        let (_, sm) = get_obj(tx, &mine, sku.as_str())?;
                        let (_, em) = get_obj(tx, &sm, &epoch_key(e))?;
                        (sm, em)
                    }
                },
                _ => {
                    let (_, stock) = get_obj(tx, &ROOT, STOCK)?;
                    let (_, mine) = get_obj(tx, &stock, &self.me.to_string())?;
                    let sm = tx.put_object(&mine, sku.as_str(), ObjType::Map)?;
                    let em = tx.put_object(&sm, epoch_key(0), ObjType::Map)?;
                    self.objs.insert(sku.clone(), (sm.clone(), em.clone()));
                    for (f, v) in &fields {
                        tx.put(&em, f.key(), *v)?;
                    }
                    continue;
                }
            };
            if cell.epoch_writes as usize + fields.len() > ROLLOVER_WRITES as usize {
                let next = cell.epoch.map_or(0, |e| e + 1);
                let em = tx.put_object(&sku_map, epoch_key(next), ObjType::Map)?;
                let mut values: BTreeMap<Field, u64> = cell.values.clone();
                for (f, v) in &fields {
                    values.insert(*f, *v);
                }
                for (f, v) in values {
                    if v > 0 {
                        tx.put(&em, f.key(), v)?;
                    }
                }
                self.objs.insert(sku.clone(), (sku_map, em));
            } else {
                for (f, v) in &fields {
                    tx.put(&epoch_map, f.key(), *v)?;
                }
                self.objs.insert(sku.clone(), (sku_map, epoch_map));
            }
        }
        Ok(())
    }
}

fn get_obj<D: ReadDoc>(
    d: &D,
    obj: &ObjId,
    key: &str,
) -> Result<(ObjType, ObjId), automerge::AutomergeError> {
    match d.get(obj, key)? {
        Some((automerge::Value::Object(t), id)) => Ok((t, id)),
        _ => Err(automerge::AutomergeError::InvalidObjId(format!(
            "no map at {key}"
        ))),
    }
}

fn write_replica_entry(
    tx: &mut Transaction<'_>,
    replicas: &ObjId,
    rid: ReplicaId,
    key: &PublicKey,
    name: &str,
    role: Role,
) -> Result<(), automerge::AutomergeError> {
    let e = tx.put_object(replicas, rid.to_string(), ObjType::Map)?;
    tx.put(&e, "name", name)?;
    tx.put(&e, "role", role.as_str())?;
    tx.put(&e, "key", key.to_string())?;
    tx.put(&e, "retired", false)?;
    Ok(())
}

fn mark_retired(
    tx: &mut Transaction<'_>,
    replica: ReplicaId,
) -> Result<(), automerge::AutomergeError> {
    let (_, replicas) = get_obj(tx, &ROOT, REPLICAS)?;
    let (_, e) = get_obj(tx, &replicas, &replica.to_string())?;
    tx.put(&e, "retired", true)
}

fn keyed(units: &BTreeMap<Sku, u64>, f: Field) -> BTreeMap<(Sku, Field), u64> {
    units
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| ((s.clone(), f), *n))
        .collect()
}

fn actor_rid(a: &ActorId) -> Option<ReplicaId> {
    let b: [u8; 32] = a.to_bytes().try_into().ok()?;
    Some(ReplicaId::from_public(&b))
}

fn describe(o: Option<&Obj>) -> String {
    match o {
        None => String::new(),
        Some(Obj::Event) => "/event".into(),
        Some(Obj::Catalog) => "/catalog".into(),
        Some(Obj::CatalogItem(s)) => format!("/catalog/{s}"),
        Some(Obj::Replicas) => "/replicas".into(),
        Some(Obj::ReplicaEntry(r)) => format!("/replicas/{r}"),
        Some(Obj::Stock) => "/stock".into(),
        Some(Obj::ReplicaStock(r)) => format!("/stock/{r}"),
        Some(Obj::SkuStock(r, s)) => format!("/stock/{r}/{s}"),
        Some(Obj::Epoch(r, s, e)) => format!("/stock/{r}/{s}/{}", epoch_key(*e)),
    }
}

/// Decode a change's ops. Automerge validates op encodings when a change is parsed; the guard
/// keeps a decoding fault in the library from taking the replica down.
fn expand(c: &Change) -> Result<ExpandedChange, Rejection> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.decode()))
        .map_err(|_| Rejection::Malformed("ops do not decode".into()))
}

fn policy_str(p: Policy) -> &'static str {
    match p {
        Policy::Strict => "strict",
        Policy::Optimistic => "optimistic",
    }
}

fn allocation_str(a: crate::message::Allocation) -> &'static str {
    match a {
        crate::message::Allocation::Proportional => "proportional",
        crate::message::Allocation::Velocity => "velocity",
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
