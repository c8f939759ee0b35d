//! The materialised state of the stand document: registry, catalog and counters, kept beside
//! the Automerge document so every query is a map lookup. It is updated only through
//! `apply_effects`, from changes that passed validation, so it mirrors the document exactly
//! (the tests compare it against a read of the document itself).

use crate::hlc::Hlc;
use crate::identity::PublicKey;
use crate::ids::{ReplicaId, Role, SaleId, Sku};
use crate::message::{CatalogItem, SaleRecord, StandInfo};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Sales kept per replica for the recent-rate window.
pub const RATE_HISTORY_LEN: usize = 256;

/// A registered replica.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// Units that came into being here.
    In,
    /// Units consumed here.
    Out,
    /// Rights given to another replica.
    Give(ReplicaId),
    /// Pool only: rights taken back from a retired replica (admin reclaim).
    Reclaim(ReplicaId),
}

impl Field {
    /// The document key of this counter.
    pub fn key(&self) -> String {
        match self {
            Field::In => "in".to_owned(),
            Field::Out => "out".to_owned(),
            Field::Give(to) => format!("give>{to}"),
            Field::Reclaim(from) => format!("reclaim>{from}"),
        }
    }
    /// Parse a document key.
    pub fn parse(k: &str) -> Option<Field> {
        match k {
            "in" => Some(Field::In),
            "out" => Some(Field::Out),
            _ => match k.strip_prefix("give>") {
                Some(r) => r.parse().ok().map(Field::Give),
                None => k.strip_prefix("reclaim>")?.parse().ok().map(Field::Reclaim),
            },
        }
    }
}

/// One replica's counters for one sku, and where they live in the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    /// Counter values.
    pub values: BTreeMap<Field, u64>,
    /// Sum of the `Give` values.
    pub gave: u64,
    /// Current epoch map, if one exists.
    pub epoch: Option<u32>,
    /// Ops written into the current epoch map.
    pub epoch_writes: u32,
    /// The `/stock/<rid>/<sku>` map exists.
    pub has_map: bool,
}

impl Cell {
    /// A counter's value.
    pub fn get(&self, f: Field) -> u64 {
        self.values.get(&f).copied().unwrap_or(0)
    }
}

/// What an object id of the document is, in the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleEntry {
    /// The record from the change message.
    pub record: SaleRecord,
    /// Voided since.
    pub voided: bool,
}

/// The materialised state.
#[derive(Debug, Clone, Default)]
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
    /// Replicas whose `/stock/<rid>` map exists.
    pub stock_maps: BTreeMap<ReplicaId, ()>,
    /// Per replica and sku.
    pub cells: BTreeMap<(ReplicaId, Sku), Cell>,
    /// Σ give[*>r] + Σ reclaim[r>*] per (r, sku).
    pub received: BTreeMap<(ReplicaId, Sku), u64>,
    /// Σ reclaim[*>r] per (r, sku): rights taken back from a retired replica.
    pub reclaimed: BTreeMap<(ReplicaId, Sku), u64>,
    /// Σ in and Σ out per sku.
    pub totals: BTreeMap<Sku, (u64, u64)>,
    /// Starting stock per sku: the first restock's units (for the LOW_STOCK default).
    pub sales: Vec<SaleEntry>,
    /// Sale id → index in `sales`.
    pub sale_index: HashMap<SaleId, usize>,
    /// Recent (time, units) per selling replica.
    pub recent: BTreeMap<ReplicaId, VecDeque<(Hlc, u64)>>,
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
        let key = (r, sku.clone());
        let (i, o, g) = self
            .cells
            .get(&key)
            .map(|c| (c.get(Field::In), c.get(Field::Out), c.gave))
            .unwrap_or((0, 0, 0));
        let recv = self.received.get(&key).copied().unwrap_or(0);
        let taken = self.reclaimed.get(&key).copied().unwrap_or(0);
        to_i64(i as i128 + recv as i128 - g as i128 - o as i128 - taken as i128)
    }

    /// available(s) = Σ in − Σ out.
    pub fn available(&self, sku: &Sku) -> i64 {
        let (i, o) = self.totals.get(sku).copied().unwrap_or((0, 0));
        to_i64(i as i128 - o as i128)
    }

    /// Set a counter (already validated) and keep the aggregates in step.
    pub fn set_value(&mut self, r: ReplicaId, sku: &Sku, f: Field, new: u64) {
        let cell = self.cells.entry((r, sku.clone())).or_default();
        let old = cell.get(f);
        let delta = new.saturating_sub(old);
        cell.values.insert(f, new);
        let totals = self.totals.entry(sku.clone()).or_insert((0, 0));
        match f {
            Field::In => totals.0 += delta,
            Field::Out => totals.1 += delta,
            Field::Give(to) => {
                cell.gave += delta;
                *self.received.entry((to, sku.clone())).or_insert(0) += delta;
            }
            Field::Reclaim(from) => {
                *self.received.entry((r, sku.clone())).or_insert(0) += delta;
                *self.reclaimed.entry((from, sku.clone())).or_insert(0) += delta;
            }
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
