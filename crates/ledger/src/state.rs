//! The materialised state of the stand document: registry, catalog and counters, kept beside
//! the Automerge document so every query is a map lookup. It is updated only through
//! `apply_effects`, from changes that passed validation, so it mirrors the document exactly
//! (the tests compare it against a read of the document itself).

use crate::hlc::Hlc;
use crate::identity::PublicKey;
use crate::ids::{ReplicaId, Role, SaleId, Sku};
use crate::message::{CatalogItem, SaleRecord, StandInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Sales kept per replica for the recent-rate window.
pub const RATE_HISTORY_LEN: usize = 256;

/// A registered replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Its key.
    pub key: PublicKey,
    /// Retired, and the pool sequence number of the retiring change.
    pub retired_at_pool_seq: Option<u64>,
}

/// A counter of a replica's per-sku cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Field {
    /// Units that came into being here.
    In,
    /// Units consumed here.
    Out,
    /// Rights given to another replica.
    Give(ReplicaId),
    /// Pool only: rights taken back from a retired replica (admin reclaim).
    Reclaim(ReplicaId),
    /// Not a count: the packed hybrid-logical-clock time this replica last marked the item
    /// unavailable ("86'd"). It only grows, like every counter.
    OffAt,
    /// The packed time this replica last marked the item available again.
    OnAt,
    /// Not stock: units of the item this replica has recorded as refunded.
    Refunded,
}

impl Field {
    /// The document key of this counter.
    pub fn key(&self) -> String {
        match self {
            Field::In => "in".to_owned(),
            Field::Out => "out".to_owned(),
            Field::Give(to) => format!("give>{to}"),
            Field::Reclaim(from) => format!("reclaim>{from}"),
            Field::OffAt => "off_at".to_owned(),
            Field::OnAt => "on_at".to_owned(),
            Field::Refunded => "refunded".to_owned(),
        }
    }
    /// Whether the field holds a time (an availability mark) rather than a number of units.
    pub fn is_mark(&self) -> bool {
        matches!(self, Field::OffAt | Field::OnAt)
    }
    /// Parse a document key.
    pub fn parse(k: &str) -> Option<Field> {
        match k {
            "in" => Some(Field::In),
            "out" => Some(Field::Out),
            "off_at" => Some(Field::OffAt),
            "on_at" => Some(Field::OnAt),
            "refunded" => Some(Field::Refunded),
            _ => match k.strip_prefix("give>") {
                Some(r) => r.parse().ok().map(Field::Give),
                None => k.strip_prefix("reclaim>")?.parse().ok().map(Field::Reclaim),
            },
        }
    }
}

/// An op of the document: (counter, writer).
pub type OpAddr = (u64, ReplicaId);
/// An object of the document: the op that made it, or `None` for the root.
pub type ObjAddr = Option<OpAddr>;

/// One replica's counters for one sku, and where they live in the document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Counter values.
    pub values: BTreeMap<Field, u64>,
    /// Op counter of the put that wrote each current value (a later put must name it as `pred`).
    pub ops: BTreeMap<Field, u64>,
    /// Sum of the `Give` values.
    pub gave: u64,
    /// Current epoch map, if one exists.
    pub epoch: Option<u32>,
    /// Ops written into the current epoch map.
    pub epoch_writes: u32,
    /// The `/stock/<rid>/<sku>` map exists.
    pub has_map: bool,
    /// Σ give[*>r] + Σ reclaim[r>*]: the rights others handed this replica.
    pub received: u64,
    /// Σ reclaim[*>r]: rights taken back from this replica after it was retired.
    pub reclaimed: u64,
    /// `values[In]` and `values[Out]`, read by every rights check without a map lookup;
    /// rebuilt from `values` when a snapshot is loaded.
    #[serde(skip)]
    in_out: (u64, u64),
}

impl Cell {
    /// A counter's value.
    pub fn get(&self, f: Field) -> u64 {
        match f {
            Field::In => self.in_out.0,
            Field::Out => self.in_out.1,
            _ => self.values.get(&f).copied().unwrap_or(0),
        }
    }

    /// in + Σ give[*>r] − Σ give[r>*] − out, less what the pool reclaimed.
    pub fn rights(&self) -> i64 {
        let (i, o) = (self.get(Field::In), self.get(Field::Out));
        to_i64(
            i as i128 + self.received as i128
                - self.gave as i128
                - o as i128
                - self.reclaimed as i128,
        )
    }
}

/// What an object id of the document is, in the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Obj {
    /// `/event`.
    Event,
    /// `/catalog`.
    Catalog,
    /// `/catalog/<sku>`.
    CatalogItem(Sku),
    /// `/replicas`.
    Replicas,
    /// `/replicas/<rid>`.
    ReplicaEntry(ReplicaId),
    /// `/stock`.
    Stock,
    /// `/stock/<rid>`.
    ReplicaStock(ReplicaId),
    /// `/stock/<rid>/<sku>`.
    SkuStock(ReplicaId, Sku),
    /// `/stock/<rid>/<sku>/<epoch>`.
    Epoch(ReplicaId, Sku, u32),
}

/// A sale as known to this replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleEntry {
    /// The record from the change message.
    #[serde(with = "record_fields")]
    pub record: std::sync::Arc<SaleRecord>,
    /// Voided since.
    pub voided: bool,
    /// Its place among its seller's sales (1 for the first): the same on every replica, since
    /// a seller's sales are applied in their order.
    pub ordinal: u32,
}

/// The materialised state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// `/event`.
    pub stand: Option<StandInfo>,
    /// The pool's id.
    pub pool: Option<ReplicaId>,
    /// Changes by the pool applied so far.
    pub pool_seq: u64,
    /// `/catalog`.
    pub catalog: BTreeMap<Sku, CatalogItem>,
    /// `/replicas`.
    pub replicas: BTreeMap<ReplicaId, ReplicaInfo>,
    /// Full key bytes → replica.
    pub by_key: HashMap<[u8; 32], ReplicaId>,
    /// Object id (counter, creator) → layout role.
    pub objects: HashMap<(u64, ReplicaId), Obj>,
    /// Outside the epoch maps: the op holding the current value of each (object, key).
    pub current_ops: HashMap<(ObjAddr, String), OpAddr>,
    /// Replicas whose `/stock/<rid>` map exists.
    pub stock_maps: BTreeMap<ReplicaId, ()>,
    /// Per replica and sku: its counters, and the rights others handed it, so that a replica's
    /// rights are one lookup.
    pub cells: BTreeMap<(ReplicaId, Sku), Cell>,
    /// Σ in and Σ out per sku.
    pub totals: BTreeMap<Sku, (u64, u64)>,
    /// A reclaimed replica's gives as the pool saw them when it reclaimed: (giver, sku, to) →
    /// the most of that give that counts as rights for `to`.
    pub give_caps: BTreeMap<(ReplicaId, Sku, ReplicaId), u64>,
    /// Reclaims in pool order: (pool sequence number, reclaimed replica).
    pub reclaims: Vec<(u64, ReplicaId)>,
    /// Active terminals after each pool change that enrolled or retired one: (pool seq, count).
    pub terminals_at: Vec<(u64, u64)>,
    /// Every sale known here, in the order this replica learned of them.
    pub sales: Vec<SaleEntry>,
    /// Sale id → index in `sales`.
    pub sale_index: HashMap<SaleId, usize>,
    /// Sales applied per seller.
    pub sales_by: HashMap<ReplicaId, u32>,
    /// Recent (time, units) per selling replica.
    pub recent: BTreeMap<ReplicaId, VecDeque<(Hlc, u64)>>,
    /// Per sku, the latest "unavailable" and "available again" marks of any replica.
    pub marks: BTreeMap<Sku, Marks>,
    /// Units refunded per (sale, sku, writer of the refund).
    pub refunds: BTreeMap<(SaleId, Sku, ReplicaId), u64>,
    /// Admin requests carried out by the pool: request id → the pool change's sequence number.
    pub requests: BTreeMap<u64, u64>,
    /// Per sku, Σ over every cell of its rights where positive, kept in step with the cells:
    /// the stand's total is then this less the few replicas that do not count, not a lookup
    /// per terminal. Rebuilt when a snapshot is loaded.
    #[serde(skip)]
    positive_rights: HashMap<Sku, i128>,
}

/// The newest availability marks of an item across the stand: the later one wins, and a tie
/// (two replicas marking at the same instant) leaves the item available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// Packed time of the latest "unavailable" mark.
    pub off_at: u64,
    /// Packed time of the latest "available again" mark.
    pub on_at: u64,
}

impl Marks {
    /// Whether the item is marked unavailable.
    pub fn is_off(&self) -> bool {
        self.off_at > self.on_at
    }
}

impl State {
    /// Counter value.
    pub fn value(&self, r: ReplicaId, sku: &Sku, f: Field) -> u64 {
        self.cells
            .get(&(r, sku.clone()))
            .map(|c| c.get(f))
            .unwrap_or(0)
    }

    /// rights(r, s) = in + Σ give[*>r] − Σ give[r>*] − out.
    pub fn rights(&self, r: ReplicaId, sku: &Sku) -> i64 {
        self.cells.get(&(r, sku.clone())).map_or(0, Cell::rights)
    }

    /// available(s) = Σ in − Σ out.
    pub fn available(&self, sku: &Sku) -> i64 {
        let (i, o) = self.totals.get(sku).copied().unwrap_or((0, 0));
        to_i64(i as i128 - o as i128)
    }

    /// Rebuild what the cells keep beside their values (after a snapshot is loaded).
    pub fn after_load(&mut self) {
        for c in self.cells.values_mut() {
            c.in_out = (
                c.values.get(&Field::In).copied().unwrap_or(0),
                c.values.get(&Field::Out).copied().unwrap_or(0),
            );
        }
        self.positive_rights = self.count_positive_rights();
    }

    /// Σ over every replica of its rights of `sku` where they are positive.
    pub fn positive_rights(&self, sku: &Sku) -> i64 {
        to_i64(self.positive_rights.get(sku).copied().unwrap_or(0))
    }

    /// [`State::positive_rights`] of every sku, counted cell by cell.
    pub fn count_positive_rights(&self) -> HashMap<Sku, i128> {
        let mut m: HashMap<Sku, i128> = HashMap::new();
        for ((_, sku), c) in &self.cells {
            *m.entry(sku.clone()).or_default() += i128::from(c.rights().max(0));
        }
        m
    }

    fn positive_of(&self, r: ReplicaId, sku: &Sku, other: Option<ReplicaId>) -> i128 {
        let one = |r: ReplicaId| i128::from(self.rights(r, sku).max(0));
        one(r) + other.filter(|o| *o != r).map_or(0, one)
    }

    /// Set a counter (already validated) and keep the aggregates in step.
    pub fn set_value(&mut self, r: ReplicaId, sku: &Sku, f: Field, new: u64) {
        let other = match f {
            Field::Give(to) => Some(to),
            Field::Reclaim(from) => Some(from),
            _ => None,
        };
        let moves_rights = matches!(
            f,
            Field::In | Field::Out | Field::Give(_) | Field::Reclaim(_)
        );
        let before = if moves_rights {
            self.positive_of(r, sku, other)
        } else {
            0
        };
        self.set_counter(r, sku, f, new);
        if moves_rights {
            let after = self.positive_of(r, sku, other);
            *self.positive_rights.entry(sku.clone()).or_default() += after - before;
        }
    }

    fn set_counter(&mut self, r: ReplicaId, sku: &Sku, f: Field, new: u64) {
        let cell = self.cells.entry((r, sku.clone())).or_default();
        let old = cell.get(f);
        let delta = new.saturating_sub(old);
        cell.values.insert(f, new);
        let totals = self.totals.entry(sku.clone()).or_insert((0, 0));
        match f {
            Field::In => {
                cell.in_out.0 = new;
                totals.0 = totals.0.saturating_add(delta);
            }
            Field::Out => {
                cell.in_out.1 = new;
                totals.1 = totals.1.saturating_add(delta);
            }
            Field::Give(to) => {
                cell.gave = cell.gave.saturating_add(delta);
                let counted = match self.give_caps.get(&(r, sku.clone(), to)) {
                    Some(cap) => new.min(*cap).saturating_sub(old.min(*cap)),
                    None if self.is_reclaimed(r) => 0,
                    None => delta,
                };
                let to = self.cells.entry((to, sku.clone())).or_default();
                to.received = to.received.saturating_add(counted);
            }
            Field::Reclaim(from) => {
                cell.received = cell.received.saturating_add(delta);
                let from = self.cells.entry((from, sku.clone())).or_default();
                from.reclaimed = from.reclaimed.saturating_add(delta);
            }
            Field::OffAt => {
                let m = self.marks.entry(sku.clone()).or_default();
                m.off_at = m.off_at.max(new);
            }
            Field::OnAt => {
                let m = self.marks.entry(sku.clone()).or_default();
                m.on_at = m.on_at.max(new);
            }
            Field::Refunded => {}
        }
    }

    /// Units of `sale`'s `sku` refunded, as the most any one writer recorded, never more
    /// than the sale sold (a writer is trusted to record, not to mint refunds).
    pub fn refunded(&self, sale: SaleId, sku: &Sku) -> u64 {
        let sold = self
            .sale_index
            .get(&sale)
            .and_then(|&i| self.sales.get(i))
            .and_then(|e| e.record.units().get(sku).copied())
            .unwrap_or(0);
        self.refunds
            .iter()
            .filter(|((s, k, _), _)| *s == sale && k == sku)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
            .min(sold)
    }

    /// Whether the pool has reclaimed `r`.
    pub fn is_reclaimed(&self, r: ReplicaId) -> bool {
        self.reclaims.iter().any(|(_, x)| *x == r)
    }

    /// Cap the gives of `giver` at what the pool saw when it reclaimed it (`caps`: sku → to →
    /// units; a give not named is capped at zero): from now on only that much of each counts
    /// as rights for its recipient.
    pub fn cap_gives(
        &mut self,
        giver: ReplicaId,
        pool_seq: u64,
        caps: &BTreeMap<Sku, BTreeMap<ReplicaId, u64>>,
    ) {
        let gives: Vec<(Sku, ReplicaId, u64)> = self
            .cells
            .iter()
            .filter(|((r, _), _)| *r == giver)
            .flat_map(|((_, sku), c)| {
                c.values.iter().filter_map(move |(f, v)| match f {
                    Field::Give(to) => Some((sku.clone(), *to, *v)),
                    _ => None,
                })
            })
            .collect();
        for (sku, to, value) in gives {
            let cap = caps
                .get(&sku)
                .and_then(|m| m.get(&to))
                .copied()
                .unwrap_or(0);
            let excess = value.saturating_sub(cap);
            let before = self.positive_of(to, &sku, None);
            if let Some(c) = self.cells.get_mut(&(to, sku.clone())) {
                c.received = c.received.saturating_sub(excess);
            }
            let after = self.positive_of(to, &sku, None);
            *self.positive_rights.entry(sku.clone()).or_default() += after - before;
        }
        for (sku, m) in caps {
            for (to, cap) in m {
                self.give_caps.insert((giver, sku.clone(), *to), *cap);
            }
        }
        self.reclaims.push((pool_seq, giver));
    }

    /// Units a reclaimed `giver` gave `to` beyond what the pool saw when it reclaimed it: they
    /// stay in the document but are not rights of `to`.
    pub fn give_excess(&self, giver: ReplicaId, sku: &Sku, to: ReplicaId) -> u64 {
        let v = self.value(giver, sku, Field::Give(to));
        let cap = self
            .give_caps
            .get(&(giver, sku.clone(), to))
            .copied()
            .unwrap_or(0);
        v.saturating_sub(cap)
    }

    /// Σ of every reclaimed replica's give excess for `sku`: the units of `available` that are
    /// nobody's rights.
    pub fn unbacked(&self, sku: &Sku) -> u64 {
        let mut n = 0u64;
        for (_, giver) in &self.reclaims {
            if let Some(c) = self.cells.get(&(*giver, sku.clone())) {
                for f in c.values.keys() {
                    if let Field::Give(to) = f {
                        n = n.saturating_add(self.give_excess(*giver, sku, *to));
                    }
                }
            }
        }
        n
    }

    /// Active terminals as of pool change `pool_seq`.
    pub fn terminals_as_of(&self, pool_seq: u64) -> u64 {
        let i = self.terminals_at.partition_point(|(s, _)| *s <= pool_seq);
        if i == 0 {
            0
        } else {
            self.terminals_at[i - 1].1
        }
    }

    /// Active (not retired) terminals.
    pub fn active_terminals(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.replicas
            .iter()
            .filter(|(_, i)| i.role == Role::Terminal && i.retired_at_pool_seq.is_none())
            .map(|(r, _)| *r)
    }
}

fn to_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// A sale record as every field in order, for binary formats (snapshots): the change message's
/// JSON form leaves an empty overdraft out, which a format without field names cannot do.
mod record_fields {
    use crate::hlc::Hlc;
    use crate::ids::{SaleId, Sku};
    use crate::message::{Payment, SaleLine, SaleRecord};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    type Fields = (
        SaleId,
        Hlc,
        Vec<SaleLine>,
        Payment,
        bool,
        BTreeMap<Sku, u64>,
    );

    pub(super) fn serialize<S: Serializer>(r: &Arc<SaleRecord>, s: S) -> Result<S::Ok, S::Error> {
        (&r.id, &r.at, &r.lines, &r.payment, &r.offline, &r.overdraft).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<SaleRecord>, D::Error> {
        let (id, at, lines, payment, offline, overdraft) = Fields::deserialize(d)?;
        Ok(Arc::new(SaleRecord {
            id,
            at,
            lines,
            payment,
            offline,
            overdraft,
        }))
    }
}
