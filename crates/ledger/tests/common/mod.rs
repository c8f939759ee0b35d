#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Shared fixtures: a stand with a pool and terminals.

use halftime_ledger::*;
use std::collections::BTreeMap;

pub fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

pub fn key(n: u8) -> ReplicaKey {
    ReplicaKey::from_seed([n; 32])
}

pub fn stand_info(policy: Policy) -> StandInfo {
    StandInfo {
        event: EventId::new("game").unwrap(),
        venue: "North High".into(),
        stand: StandId::new("north").unwrap(),
        policy,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    }
}

pub const SKUS: [&str; 3] = ["hotdog", "soda", "fries"];

pub struct Stand {
    pub pool: Ledger,
    pub terminals: Vec<Ledger>,
    pub setup: Vec<SignedChange>,
}

/// A pool with `n` terminals, `stock` units of each sku, `alloc` given to each terminal; every
/// replica holds every setup change.
pub fn stand(policy: Policy, n: usize, stock: u64, alloc: u64) -> Stand {
    let t0 = 1_000;
    let (mut pool, g) = Ledger::create_stand(key(1), stand_info(policy), "pool", t0).unwrap();
    let mut setup = vec![g];
    let items = SKUS
        .iter()
        .map(|s| CatalogItem {
            sku: sku(s),
            name: s.to_string(),
            price_cents: 300,
            low_stock_at: stock / 10,
        })
        .collect();
    setup.push(pool.set_catalog(items, t0).unwrap());
    for i in 0..n {
        setup.push(
            pool.enrol(
                key(10 + i as u8).public(),
                &format!("till {i}"),
                Role::Terminal,
                t0,
            )
            .unwrap(),
        );
    }
    let units: BTreeMap<Sku, u64> = SKUS.iter().map(|s| (sku(s), stock)).collect();
    setup.push(pool.restock(units, "opening", t0).unwrap());
    if alloc > 0 {
        for i in 0..n {
            let units: BTreeMap<Sku, u64> = SKUS.iter().map(|s| (sku(s), alloc)).collect();
            setup.push(
                pool.give(key(10 + i as u8).replica_id(), units, t0)
                    .unwrap(),
            );
        }
    }
    let terminals = (0..n)
        .map(|i| {
            let mut t = Ledger::join(
                key(10 + i as u8),
                StandId::new("north").unwrap(),
                key(1).public(),
            );
            let r = t.apply_remote(setup.clone(), t0);
            assert!(r.rejected.is_empty(), "{:?}", r.rejected);
            t
        })
        .collect();
    Stand {
        pool,
        terminals,
        setup,
    }
}

pub fn sale_req(s: &str, qty: u64, online: bool) -> SaleRequest {
    SaleRequest {
        lines: vec![SaleLine {
            sku: sku(s),
            qty,
            unit_price_cents: 300,
        }],
        payment: Payment {
            method: PaymentMethod::Card,
            reference: "pi_test".into(),
        },
        pool_reachable: online,
    }
}

/// A copy of `l`'s document rebuilt from every change it holds, to forge changes on top of.
pub fn doc_of(l: &Ledger) -> automerge::Automerge {
    let changes: Vec<automerge::Change> = l
        .all_changes()
        .map(|c| automerge::Change::try_from(&c.bytes[..]).unwrap())
        .collect();
    let mut doc = automerge::Automerge::new();
    doc.apply_changes(changes).unwrap();
    doc
}
