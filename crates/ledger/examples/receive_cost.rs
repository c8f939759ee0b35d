//! The receive path's cost in instructions, for comparisons that wall-clock noise would drown:
//! 10 terminals make N one-line sales (default 2,000), and a fresh replica takes them in
//! batches of 100, inside `receive`.
//!
//! ```text
//! cargo build --release -p halftime-ledger --example receive_cost
//! valgrind --tool=callgrind --callgrind-out-file=cg.out target/release/examples/receive_cost 2000
//! callgrind_annotate --inclusive=yes cg.out | grep receive_cost::receive
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use halftime_ledger::*;
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
    let info = StandInfo {
        event: EventId::new("b").unwrap(),
        venue: "v".into(),
        stand: StandId::new("s1").unwrap(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    };
    let (mut pool, g) = Ledger::create_stand(key(1), info, "pool", 1).unwrap();
    let mut setup = vec![g];
    setup.push(
        pool.set_catalog(
            (0..8)
                .map(|i| CatalogItem {
                    sku: sku(i),
                    name: format!("I{i}"),
                    price_cents: 100,
                    low_stock_at: 10,
                })
                .collect(),
            1,
        )
        .unwrap(),
    );
    for t in 0..10 {
        setup.push(
            pool.enrol(key(10 + t as u8).public(), "t", Role::Terminal, 1)
                .unwrap(),
        );
    }
    setup.push(
        pool.restock((0..8).map(|i| (sku(i), 1u64 << 36)).collect(), "", 1)
            .unwrap(),
    );
    for t in 0..10 {
        setup.push(
            pool.give(
                key(10 + t as u8).replica_id(),
                (0..8).map(|i| (sku(i), 1u64 << 32)).collect(),
                1,
            )
            .unwrap(),
        );
    }
    let mut terms: Vec<Ledger> = (0..10)
        .map(|t| {
            let mut l = Ledger::join(
                key(10 + t as u8),
                StandId::new("s1").unwrap(),
                key(1).public(),
            );
            l.apply_remote(setup.clone(), 1);
            l
        })
        .collect();
    let mut all = Vec::new();
    for i in 0..n {
        let t = &mut terms[i % 10];
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
        match t.sell(req, 100 + i as u64) {
            SaleOutcome::Committed { change, .. } => all.push(change),
            _ => panic!(),
        }
    }
    let mut fresh = Ledger::join(key(98), StandId::new("s1").unwrap(), key(1).public());
    fresh.apply_remote(setup, 1);
    receive(&mut fresh, all, n as u64);
}
#[inline(never)]
fn receive(l: &mut Ledger, all: Vec<SignedChange>, now: u64) {
    for c in all.chunks(100) {
        let r = l.apply_remote(c.to_vec(), 100 + now);
        assert_eq!(r.accepted.len(), c.len());
    }
}
