#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property tests: replicas run random operations while their changes are delivered with
//! loss, duplication, reordering and partitions; then the network is repaired. Every replica
//! must end with the same heads and the same counters as a simple reference model, the
//! materialised state must equal a read of the document itself, and the policy bounds must
//! hold at every step.

mod common;
use common::*;
use halftime_ledger::state::Field;
use halftime_ledger::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Step {
    Sell {
        who: usize,
        sku: usize,
        qty: u64,
        online: bool,
    },
    Give {
        who: usize,
        to: usize,
        sku: usize,
        qty: u64,
    },
    Void {
        who: usize,
    },
    Restock {
        sku: usize,
        qty: u64,
    },
    Adjust {
        who: usize,
        sku: usize,
    },
    Deliver {
        n: usize,
        pick: usize,
    },
    Partition {
        who: usize,
    },
    Heal,
    Mark {
        who: usize,
        sku: usize,
        available: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..16usize, 0..3usize, 1..4u64, any::<bool>()).prop_map(|(who, sku, qty, online)| Step::Sell { who, sku, qty, online }),
        2 => (0..16usize, 0..16usize, 0..3usize, 1..6u64).prop_map(|(who, to, sku, qty)| Step::Give { who, to, sku, qty }),
        1 => (0..16usize).prop_map(|who| Step::Void { who }),
        1 => (0..3usize, 1..20u64).prop_map(|(sku, qty)| Step::Restock { sku, qty }),
        1 => (0..16usize, 0..3usize).prop_map(|(who, sku)| Step::Adjust { who, sku }),
        4 => (1..8usize, any::<usize>()).prop_map(|(n, pick)| Step::Deliver { n, pick }),
        1 => (0..16usize).prop_map(|who| Step::Partition { who }),
        1 => Just(Step::Heal),
        1 => (0..16usize, 0..3usize, any::<bool>()).prop_map(|(who, sku, available)| Step::Mark { who, sku, available }),
    ]
}

/// Reference model: the sum of every committed counter move.
#[derive(Default)]
struct Model {
    counters: BTreeMap<(ReplicaId, Sku, Field), u64>,
    overdraft: u64,
    /// Per sku: the latest "off" and "on" marks' times.
    marks: BTreeMap<Sku, (Hlc, Hlc)>,
}

impl Model {
    fn add(&mut self, r: ReplicaId, sku: &Sku, f: Field, n: u64) {
        *self.counters.entry((r, sku.clone(), f)).or_insert(0) += n;
    }
    fn available(&self, sku: &Sku) -> i64 {
        self.counters
            .iter()
            .filter(|((_, s, _), _)| s == sku)
            .map(|((_, _, f), n)| match f {
                Field::In => *n as i64,
                Field::Out => -(*n as i64),
                Field::Give(_)
                | Field::Reclaim(_)
                | Field::OffAt
                | Field::OnAt
                | Field::Refunded => 0,
            })
            .sum()
    }
}

struct Net {
    /// (to, change, from-partition-side) in flight.
    flight: Vec<(usize, SignedChange)>,
    cut: Vec<bool>,
}

fn run(policy: Policy, n: usize, steps: Vec<Step>, loss: u8, dup: u8) -> Result<(), TestCaseError> {
    run_with(policy, n, 30, 4, steps, loss, dup)
}

fn run_with(
    policy: Policy,
    n: usize,
    stock: u64,
    alloc: u64,
    steps: Vec<Step>,
    loss: u8,
    dup: u8,
) -> Result<(), TestCaseError> {
    let st = stand(policy, n, stock, alloc);
    let mut reps: Vec<Ledger> = vec![st.pool];
    reps.extend(st.terminals);
    let total = reps.len();
    let mut model = Model::default();
    // The setup changes are already everywhere; replay their moves into the model.
    for c in &st.setup {
        let ch = automerge::Change::try_from(&c.bytes[..]).unwrap();
        let msg = ChangeMessage::decode(ch.message()).unwrap();
        let pool = reps[0].me();
        match msg.op {
            Operation::Restock { units, .. } => units
                .iter()
                .for_each(|(s, q)| model.add(pool, s, Field::In, *q)),
            Operation::Give { to, units } => units
                .iter()
                .for_each(|(s, q)| model.add(pool, s, Field::Give(to), *q)),
            _ => {}
        }
    }
    let mut net = Net {
        flight: Vec::new(),
        cut: vec![false; total],
    };
    let mut now = 2_000u64;
    let mut rng_state = 0x9e3779b97f4a7c15u64 ^ (loss as u64) << 8 ^ dup as u64;
    let mut rnd = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let broadcast = |net: &mut Net, from: usize, c: &SignedChange| {
        for to in 0..total {
            if to != from {
                net.flight.push((to, c.clone()));
            }
        }
    };
    for s in steps {
        now += 10;
        match s {
            Step::Sell {
                who,
                sku: k,
                qty,
                online,
            } => {
                let who = 1 + who % (total - 1);
                let online = online && !net.cut[who];
                if let SaleOutcome::Committed { change, .. } =
                    reps[who].sell(sale_req(SKUS[k], qty, online), now)
                {
                    let me = reps[who].me();
                    model.add(me, &sku(SKUS[k]), Field::Out, qty);
                    let rec = &reps[who].sales().last().unwrap().record;
                    model.overdraft += rec.overdraft.values().sum::<u64>();
                    broadcast(&mut net, who, &change);
                }
            }
            Step::Give {
                who,
                to,
                sku: k,
                qty,
            } => {
                let (who, to) = (who % total, to % total);
                let to_id = reps[to].me();
                if let Ok(c) = reps[who].give(to_id, BTreeMap::from([(sku(SKUS[k]), qty)]), now) {
                    let me = reps[who].me();
                    model.add(me, &sku(SKUS[k]), Field::Give(to_id), qty);
                    broadcast(&mut net, who, &c);
                }
            }
            Step::Mark {
                who,
                sku: k,
                available,
            } => {
                let who = who % total;
                let c = reps[who].mark(&sku(SKUS[k]), available, now).unwrap();
                let at = reps[who].clock();
                let m = model.marks.entry(sku(SKUS[k])).or_default();
                let t = if available { &mut m.1 } else { &mut m.0 };
                *t = (*t).max(at);
                broadcast(&mut net, who, &c);
            }
            Step::Void { who } => {
                let who = 1 + who % (total - 1);
                let me = reps[who].me();
                let last = reps[who]
                    .sales()
                    .iter()
                    .rev()
                    .find(|e| e.record.id.replica == me && !e.voided)
                    .map(|e| e.record.clone());
                if let Some(rec) = last {
                    let c = reps[who].void(rec.id, now).unwrap();
                    rec.units()
                        .iter()
                        .for_each(|(s, q)| model.add(me, s, Field::In, *q));
                    broadcast(&mut net, who, &c);
                }
            }
            Step::Restock { sku: k, qty } => {
                let c = reps[0]
                    .restock(BTreeMap::from([(sku(SKUS[k]), qty)]), "delivery", now)
                    .unwrap();
                let me = reps[0].me();
                model.add(me, &sku(SKUS[k]), Field::In, qty);
                broadcast(&mut net, 0, &c);
            }
            Step::Adjust { who, sku: k } => {
                let who = who % total;
                if let Ok(c) = reps[who].adjust(BTreeMap::from([(sku(SKUS[k]), 1)]), "dropped", now)
                {
                    let me = reps[who].me();
                    model.add(me, &sku(SKUS[k]), Field::Out, 1);
                    broadcast(&mut net, who, &c);
                }
            }
            Step::Deliver { n: count, pick } => {
                for i in 0..count {
                    if net.flight.is_empty() {
                        break;
                    }
                    let idx = (pick.wrapping_add(i * 7919)) % net.flight.len();
                    let (to, _) = net.flight[idx];
                    if net.cut[to] {
                        continue; // partitioned: stays in flight
                    }
                    let (to, c) = if (rnd() % 100) < dup as u64 {
                        net.flight[idx].clone()
                    } else {
                        net.flight.swap_remove(idx)
                    };
                    if (rnd() % 100) < loss as u64 {
                        continue; // lost
                    }
                    let r = reps[to].apply_remote(vec![c], now);
                    prop_assert!(
                        r.rejected.is_empty(),
                        "valid change rejected: {:?}",
                        r.rejected
                    );
                }
            }
            Step::Partition { who } => net.cut[who % total] = !net.cut[who % total],
            Step::Heal => net.cut.iter_mut().for_each(|c| *c = false),
        }
        // Safety at every step, in every replica's view.
        for r in &reps {
            for s in SKUS {
                let s = sku(s);
                if policy == Policy::Strict {
                    prop_assert!(r.available(&s) >= 0, "available below zero under strict");
                    for other in &reps {
                        if other.me() != reps[0].me() {
                            prop_assert!(
                                r.rights(other.me(), &s) >= 0,
                                "negative rights under strict"
                            );
                        }
                    }
                }
            }
        }
    }
    // Full repair: version-vector exchange until nothing moves.
    for _round in 0..10 {
        let mut moved = false;
        for a in 0..total {
            for b in 0..total {
                if a == b {
                    continue;
                }
                let vv = reps[b].version_vector();
                let missing = reps[a].changes_since(&vv, usize::MAX);
                if !missing.is_empty() {
                    let r = reps[b].apply_remote(missing, now);
                    prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                    moved |= !r.accepted.is_empty();
                }
            }
        }
        if !moved {
            break;
        }
    }
    let heads = reps[0].heads();
    let counters = reps[0].counters_from_state();
    for r in &mut reps {
        prop_assert_eq!(r.pending_len(), 0);
        let mut h = r.heads();
        h.sort();
        let mut h0 = heads.clone();
        h0.sort();
        prop_assert_eq!(h, h0, "heads differ");
        prop_assert_eq!(
            &r.counters_from_state(),
            &counters,
            "state differs between replicas"
        );
        let heads = r.heads();
        prop_assert_eq!(
            &r.counters_at(&heads),
            &counters,
            "state differs from the document"
        );
    }
    // A snapshot of the pool and of the last terminal, after everything the run did (reclaims,
    // marks, voids), loads to the same replica.
    for (i, k) in [(0, key(1)), (total - 1, key(10 + (total - 2) as u8))] {
        let snap = reps[i].snapshot();
        let stored: Vec<SignedChange> = reps[i].all_changes().collect();
        let (back, _, load) = Ledger::from_snapshot(
            k,
            reps[i].stand_id().clone(),
            key(1).public(),
            &snap,
            stored,
            u64::MAX >> 20,
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(load.replayed, 0);
        prop_assert_eq!(back.counters_from_state(), counters.clone());
        prop_assert_eq!(back.version_vector(), reps[i].version_vector());
        prop_assert_eq!(back.sales(), reps[i].sales());
        for s in SKUS {
            let s = sku(s);
            prop_assert_eq!(back.is_marked_off(&s), reps[i].is_marked_off(&s));
            prop_assert_eq!(back.unbacked(&s), reps[i].unbacked(&s));
            for r in &reps {
                prop_assert_eq!(back.rights(r.me(), &s), reps[i].rights(r.me(), &s));
            }
        }
    }
    // Against the reference model.
    for ((rid, s, f), n) in &model.counters {
        let got = counters
            .get(s)
            .and_then(|c| c.by_replica.get(rid))
            .and_then(|m| m.get(f))
            .copied()
            .unwrap_or(0);
        prop_assert_eq!(got, *n, "counter {:?} {} {:?}", rid, s, f);
    }
    for s in SKUS {
        let s = sku(s);
        let off = model.marks.get(&s).is_some_and(|(off, on)| off > on);
        for r in &reps {
            prop_assert_eq!(r.is_marked_off(&s), off, "mark of {}", s);
        }
        prop_assert_eq!(reps[0].available(&s), model.available(&s));
        match policy {
            Policy::Strict => prop_assert!(reps[0].available(&s) >= 0),
            Policy::Optimistic => {
                let oversell = (-reps[0].available(&s)).max(0) as u64;
                prop_assert!(
                    oversell <= model.overdraft,
                    "oversell {} above overdrafts {}",
                    oversell,
                    model.overdraft
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn strict_replicas_converge_and_never_oversell(n in 2usize..=6, steps in prop::collection::vec(step(), 1..90), loss in 0u8..40, dup in 0u8..30) {
        run(Policy::Strict, n, steps, loss, dup)?;
    }

    #[test]
    fn optimistic_oversell_stays_within_overdrafts(n in 2usize..=6, steps in prop::collection::vec(step(), 1..90), loss in 0u8..40, dup in 0u8..30) {
        run(Policy::Optimistic, n, steps, loss, dup)?;
    }
}

#[test]
fn replicas_converge_through_many_epoch_rollovers() {
    // ~400 one-unit sales per terminal on one sku: each terminal's epoch map rolls over
    // several times, and receivers must follow every rollover.
    let steps = (0..2400)
        .map(|i| {
            if i % 3 == 2 {
                Step::Deliver { n: 7, pick: i }
            } else {
                Step::Sell {
                    who: i,
                    sku: 0,
                    qty: 1,
                    online: true,
                }
            }
        })
        .collect();
    run_with(Policy::Strict, 4, 2_000, 450, steps, 5, 5).unwrap();
}

#[test]
fn a_vector_is_read_against_what_each_author_wrote() {
    let mut st = stand(Policy::Strict, 3, 100, 10);
    let (a, b) = (key(10).replica_id(), key(11).replica_id());
    let mut sold = Vec::new();
    for _ in 0..2 {
        let SaleOutcome::Committed { change, .. } =
            st.terminals[0].sell(sale_req("hotdog", 1, true), 2_000)
        else {
            panic!("the sale commits")
        };
        sold.push(change);
    }
    let r = st.terminals[2].apply_remote(vec![sold[0].clone()], 2_000);
    assert_eq!(r.accepted.len(), 1);
    let full = st.terminals[0].version_vector();
    let behind = st.terminals[2].version_vector();
    assert!(
        st.terminals[2].lacks_any_of(&full),
        "one of a's sales is missing"
    );
    assert!(!st.terminals[0].lacks_any_of(&behind));
    assert!(!st.terminals[0].lacks_any_of(&full));
    // A replica it never heard of, named first or last in the order.
    for stranger in [
        ReplicaId::from_public(&[0; 32]),
        ReplicaId::from_public(&[255; 32]),
    ] {
        let mut v = full.clone();
        v.insert(stranger, 1);
        assert!(st.terminals[0].lacks_any_of(&v));
        v.insert(stranger, 0);
        assert!(!st.terminals[0].lacks_any_of(&v));
    }
    // What it is sent is exactly what it lacks, whatever else the vector names.
    let mut v = behind.clone();
    v.insert(ReplicaId::from_public(&[0; 32]), 7);
    v.insert(b, 0);
    let missing = st.terminals[0].changes_since(&v, usize::MAX);
    assert_eq!(missing, vec![sold[1].clone()]);
    assert_eq!(behind.get(&a).copied(), Some(1));
}

#[test]
fn replicas_sharing_change_bytes_serve_only_what_each_holds() {
    let st = stand(Policy::Strict, 2, 100, 10);
    let shared = Shared::default();
    let join = |i: u8| {
        let mut l = Ledger::join(key(10 + i), StandId::new("north").unwrap(), key(1).public());
        assert!(l.share_change_bytes(shared.clone()));
        assert!(l.apply_remote(st.setup.clone(), 1_000).rejected.is_empty());
        l
    };
    let (mut a, mut b) = (join(0), join(1));
    let SaleOutcome::Committed { change, .. } = a.sell(sale_req("hotdog", 1, true), 2_000) else {
        panic!("the sale commits")
    };
    let all = VersionVector::new();
    assert_eq!(a.changes_since(&all, usize::MAX).len(), st.setup.len() + 1);
    let served = b.changes_since(&all, usize::MAX);
    assert_eq!(served, st.setup, "b serves what it holds, not what a added");
    assert!(
        b.apply_remote(vec![change.clone()], 2_000)
            .rejected
            .is_empty()
    );
    assert_eq!(b.changes_since(&a.version_vector(), usize::MAX), vec![]);
    assert_eq!(b.all_changes().last(), Some(change));
    // A replica that holds changes already keeps its own store.
    assert!(!a.share_change_bytes(shared.clone()));
}

#[test]
fn replicas_sharing_sale_records_keep_each_sale_once() {
    let mut st = stand(Policy::Strict, 3, 100, 10);
    let records = RecordMemo::default();
    st.terminals[1].share_sale_records(records.clone());
    st.terminals[2].share_sale_records(records.clone());
    let SaleOutcome::Committed { change, sale_id } =
        st.terminals[0].sell(sale_req("hotdog", 2, true), 2_000)
    else {
        panic!("the sale commits")
    };
    for l in st.terminals[1..].iter_mut().chain([&mut st.pool]) {
        assert!(
            l.apply_remote(vec![change.clone()], 2_000)
                .rejected
                .is_empty()
        );
    }
    let record = |l: &Ledger| l.sale(sale_id).expect("held").record.clone();
    let (a, b) = (record(&st.terminals[1]), record(&st.terminals[2]));
    assert!(std::sync::Arc::ptr_eq(&a, &b), "one record for both");
    // A replica without the memo keeps its own copy of the same record.
    let own = record(&st.pool);
    assert!(!std::sync::Arc::ptr_eq(&own, &a));
    assert_eq!(own, a);
    assert_eq!(record(&st.terminals[0]), a);
}
