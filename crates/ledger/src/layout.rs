//! The physical layout of the stand document, and reading it back.
//!
//! ```text
//! /event                          map: event, venue, stand, policy, allocation, low_stock_pct
//! /catalog/<sku>                  map: name, price_cents, low_stock_at            (pool only)
//! /replicas/<rid>                 map: name, role, key, retired                   (pool only)
//! /stock/<rid>                    map, created by the pool when it enrols rid
//! /stock/<rid>/<sku>              map of epochs, created by rid
//! /stock/<rid>/<sku>/<epoch>      map: in, out, give><to>, reclaim><from> (pool),
//!                                 off_at, on_at (availability marks)          (rid only)
//! ```
//!
//! Every counter has a single writer that `put`s its new absolute value. A received change
//! costs Automerge time in proportion to the op history of the map it lands in, so a replica
//! starts a fresh epoch map for an sku every [`ROLLOVER_WRITES`] writes, carrying its current
//! values forward; the newest epoch holds the current values and every map's history stays
//! bounded however long the event runs.

use crate::ids::{ReplicaId, Sku};
use crate::state::Field;
use automerge::{ChangeHash, ROOT, ReadDoc, ScalarValueRef, ValueRef};
use std::collections::BTreeMap;

/// Writes into one epoch map before the writer rolls over to a new one.
pub const ROLLOVER_WRITES: u32 = 128;
/// Writes a receiver accepts into one epoch map (a writer that never rolls over is refused).
pub const MAX_EPOCH_WRITES: u32 = 4 * ROLLOVER_WRITES;
/// Largest value a counter may hold (keeps every sum far inside i64).
pub const MAX_UNITS: u64 = 1 << 40;

/// Root keys.
pub const EVENT: &str = "event";
/// Root keys.
pub const CATALOG: &str = "catalog";
/// Root keys.
pub const REPLICAS: &str = "replicas";
/// Root keys.
pub const STOCK: &str = "stock";

/// The document key of epoch `e`.
pub fn epoch_key(e: u32) -> String {
    format!("{e:08}")
}

/// Parse an epoch key.
pub fn parse_epoch(k: &str) -> Option<u32> {
    if k.len() == 8 && k.bytes().all(|b| b.is_ascii_digit()) {
        k.parse().ok()
    } else {
        None
    }
}

/// Stock of one sku as read from the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkuCounters {
    /// Per replica: (field → value).
    pub by_replica: BTreeMap<ReplicaId, BTreeMap<Field, u64>>,
}

impl SkuCounters {
    /// Σ in − Σ out.
    pub fn available(&self) -> i64 {
        let mut a: i128 = 0;
        for f in self.by_replica.values() {
            a += *f.get(&Field::In).unwrap_or(&0) as i128;
            a -= *f.get(&Field::Out).unwrap_or(&0) as i128;
        }
        a as i64
    }
    /// rights(r) from the counters.
    pub fn rights(&self, r: ReplicaId) -> i64 {
        let mut v: i128 = 0;
        for (who, f) in &self.by_replica {
            for (field, n) in f {
                let n = *n as i128;
                match field {
                    Field::In if *who == r => v += n,
                    Field::Out if *who == r => v -= n,
                    Field::Give(to) if *who == r => v -= n,
                    Field::Give(to) if *to == r => v += n,
                    Field::Reclaim(_) if *who == r => v += n,
                    Field::Reclaim(from) if *from == r => v -= n,
                    _ => {}
                }
            }
        }
        v as i64
    }
}

/// Read every counter of the document as at `heads` (the current state when `heads` is the
/// document's heads), following the layout: for each replica and sku, the newest epoch.
pub fn read_counters<D: ReadDoc>(doc: &D, heads: &[ChangeHash]) -> BTreeMap<Sku, SkuCounters> {
    let mut out: BTreeMap<Sku, SkuCounters> = BTreeMap::new();
    let Ok(Some((_, stock))) = doc.get_at(ROOT, STOCK, heads) else {
        return out;
    };
    for item in doc.map_range_at(&stock, .., heads).collect::<Vec<_>>() {
        let Ok(rid) = item.key.parse::<ReplicaId>() else {
            continue;
        };
        let rstock = item.id();
        for sitem in doc.map_range_at(&rstock, .., heads).collect::<Vec<_>>() {
            let Ok(sku) = Sku::new(sitem.key.to_string()) else {
                continue;
            };
            let skumap = sitem.id();
            // Epoch keys are zero-padded, so the last key is the newest epoch.
            let Some(latest) = doc.map_range_at(&skumap, .., heads).last() else {
                continue;
            };
            if parse_epoch(&latest.key).is_none() {
                continue;
            }
            let emap = latest.id();
            let mut fields = BTreeMap::new();
            for v in doc.map_range_at(&emap, .., heads) {
                if let (Some(f), Some(n)) = (Field::parse(&v.key), uint(&v.value)) {
                    fields.insert(f, n);
                }
            }
            out.entry(sku).or_default().by_replica.insert(rid, fields);
        }
    }
    out
}

fn uint(v: &ValueRef<'_>) -> Option<u64> {
    match v {
        ValueRef::Scalar(ScalarValueRef::Uint(n)) => Some(*n),
        _ => None,
    }
}
