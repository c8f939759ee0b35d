//! The receive path's cost. 10 terminals make N one-line sales (default 3,000), and a fresh
//! replica takes them.
//!
//! In instructions, for comparisons that wall-clock noise would drown (batches of 100, inside
//! `receive`):
//!
//! ```text
//! cargo build --release -p halftime-ledger --example receive_cost
//! valgrind --tool=callgrind --callgrind-out-file=cg.out target/release/examples/receive_cost 2000
//! callgrind_annotate --inclusive=yes cg.out | grep receive_cost::receive
//! ```
//!
//! In wall time by the size of the batch the changes arrive in: Automerge's apply alone
//! (changes already decoded), and the ledger's whole receive (signature, checks, state, and the
//! document, which takes accepted changes in batches of up to `DOC_BATCH_MAX`):
//!
//! ```text
//! cargo run --release -p halftime-ledger --example receive_cost -- 4000 --by-batch
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use automerge::{Automerge, Change};
use halftime_ledger::*;
use std::time::Instant;

const BATCHES: [usize; 8] = [1, 8, 32, 64, 128, 256, 512, 1_024];

fn key(n: u8) -> ReplicaKey {
    ReplicaKey::from_seed([n; 32])
}

fn sku(i: usize) -> Sku {
    Sku::new(format!("item{i}")).unwrap()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(3000);
    let (setup, sales) = stand_and_sales(n);
    if std::env::args().any(|a| a == "--by-batch") {
        by_batch(&setup, &sales);
        return;
    }
    let mut fresh = Ledger::join(key(98), StandId::new("s1").unwrap(), key(1).public());
    fresh.apply_remote(setup, 1);
    receive(&mut fresh, sales, n as u64);
}

/// The stand's setup changes, and `n` sales made by its 10 terminals in turn.
fn stand_and_sales(n: usize) -> (Vec<SignedChange>, Vec<SignedChange>) {
    let info = StandInfo {
        event: EventId::new("b").unwrap(),
        venue: "v".into(),
        stand: StandId::new("s1").unwrap(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    };
    let (mut pool, genesis) = Ledger::create_stand(key(1), info, "pool", 1).unwrap();
    let mut setup = vec![genesis];
    let items = (0..8)
        .map(|i| CatalogItem {
            sku: sku(i),
            name: format!("I{i}"),
            price_cents: 100,
            low_stock_at: 10,
        })
        .collect();
    setup.push(pool.set_catalog(items, 1).unwrap());
    for t in 0..10u8 {
        let till = key(10 + t).public();
        setup.push(pool.enrol(till, "t", Role::Terminal, 1).unwrap());
    }
    let stock = (0..8).map(|i| (sku(i), 1u64 << 36)).collect();
    setup.push(pool.restock(stock, "", 1).unwrap());
    for t in 0..10u8 {
        let units = (0..8).map(|i| (sku(i), 1u64 << 32)).collect();
        setup.push(pool.give(key(10 + t).replica_id(), units, 1).unwrap());
    }
    let mut terms: Vec<Ledger> = (0..10u8)
        .map(|t| {
            let mut l = Ledger::join(key(10 + t), StandId::new("s1").unwrap(), key(1).public());
            l.apply_remote(setup.clone(), 1);
            l
        })
        .collect();
    let mut sales = Vec::with_capacity(n);
    for i in 0..n {
        let req = SaleRequest {
            lines: vec![SaleLine {
                sku: sku(i % 8),
                qty: 1,
                unit_price_cents: 100,
            }],
            payment: Payment {
                method: PaymentMethod::Card,
                reference: "pi".into(),
            },
            pool_reachable: true,
        };
        match terms[i % 10].sell(req, 100 + i as u64) {
            SaleOutcome::Committed { change, .. } => sales.push(change),
            SaleOutcome::Refused { reason } => panic!("{reason}"),
        }
    }
    (setup, sales)
}

#[inline(never)]
fn receive(l: &mut Ledger, all: Vec<SignedChange>, now: u64) {
    for c in all.chunks(100) {
        let r = l.apply_remote(c.to_vec(), 100 + now);
        assert_eq!(r.accepted.len(), c.len());
    }
}

fn decoded(changes: &[SignedChange]) -> Vec<Change> {
    changes
        .iter()
        .map(|c| Change::try_from(&c.bytes[..]).unwrap())
        .collect()
}

fn by_batch(setup: &[SignedChange], sales: &[SignedChange]) {
    let n = sales.len();
    println!("{n} sales by 10 terminals, taken by a fresh replica in batches of each size");
    println!(
        "{:>6} {:>22} {:>22}",
        "batch", "Automerge alone µs", "ledger receive µs"
    );
    let per_change = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n as f64;
    for b in BATCHES {
        let mut doc = Automerge::new();
        doc.apply_changes(decoded(setup)).unwrap();
        let changes = decoded(sales);
        let t = Instant::now();
        for batch in changes.chunks(b) {
            doc.apply_changes(batch.to_vec()).unwrap();
        }
        let alone = per_change(t);

        let mut fresh = Ledger::join(key(98), StandId::new("s1").unwrap(), key(1).public());
        fresh.apply_remote(setup.to_vec(), 1);
        let t = Instant::now();
        for batch in sales.chunks(b) {
            let r = fresh.apply_remote(batch.to_vec(), 100 + n as u64);
            assert_eq!(r.accepted.len(), batch.len());
        }
        // Whatever still waits for the document is applied inside the timing.
        assert_eq!(fresh.doc().get_heads().len(), 10);
        let receive = per_change(t);
        println!("{b:>6} {alone:>22.1} {receive:>22.1}");
    }
}
