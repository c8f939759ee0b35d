#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A structured fuzz of the receive path: an enrolled terminal ("mallory") writes real
//! changes, which are then taken apart and rebuilt with arbitrary sequence numbers, op ids,
//! dependencies, times, messages, preds, keys, values and actions — and signed again with its
//! key, so every one of them passes the signature check and reaches the rules. They are
//! delivered with the honest replicas' changes, shuffled and batched at random.
//!
//! After each run: no panic (the receive path never aborts), the state equals a read of the
//! document after every change (checked in debug builds and with `check-invariants`),
//! the saved document loads, the pending queue stays within its quotas, every honest change
//! is held, nothing is oversold under strict, and an honest terminal still sells.
//!
//! `cargo test -p halftime-ledger --test fuzz_receive` runs 32 cases;
//! `PROPTEST_CASES=3000 cargo test --release -p halftime-ledger --features check-invariants
//! --test fuzz_receive` runs longer.

mod common;
use automerge::legacy::{Key, ObjectId, OpId, OpType};
use automerge::{ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjType, ScalarValue};
use common::*;
use halftime_ledger::*;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashSet};

const MALLORY: usize = 2;

#[derive(Debug, Clone)]
enum Mutation {
    Seq(i8),
    StartOp(i16),
    DropDeps,
    AddDep(usize),
    Time(i64),
    Qty(u64),
    Overdraft(u64),
    Garbage(String),
    OpValue(usize, u64),
    OpNegative(usize),
    OpKey(usize, u8),
    OpPredClear(usize),
    OpPredForeign(usize),
    OpObjRoot(usize),
    OpAction(usize, u8),
    ForkMessage,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (-3i8..4).prop_map(Mutation::Seq),
        (-50i16..50).prop_map(Mutation::StartOp),
        Just(Mutation::DropDeps),
        (0usize..1000).prop_map(Mutation::AddDep),
        prop_oneof![
            -1_000_000i64..1_000_000,
            Just(i64::MAX / 2),
            Just(-(1i64 << 40))
        ]
        .prop_map(Mutation::Time),
        prop_oneof![0u64..200, Just(u64::MAX), Just(1u64 << 40)].prop_map(Mutation::Qty),
        prop_oneof![0u64..500, Just(u64::MAX)].prop_map(Mutation::Overdraft),
        "[ -~]{0,40}".prop_map(Mutation::Garbage),
        (0usize..8, prop_oneof![0u64..300, Just(u64::MAX)])
            .prop_map(|(i, v)| Mutation::OpValue(i, v)),
        (0usize..8).prop_map(Mutation::OpNegative),
        (0usize..8, any::<u8>()).prop_map(|(i, k)| Mutation::OpKey(i, k)),
        (0usize..8).prop_map(Mutation::OpPredClear),
        (0usize..8).prop_map(Mutation::OpPredForeign),
        (0usize..8).prop_map(Mutation::OpObjRoot),
        (0usize..8, any::<u8>()).prop_map(|(i, a)| Mutation::OpAction(i, a)),
        Just(Mutation::ForkMessage),
    ]
}

fn op_mut(ex: &mut ExpandedChange, i: usize) -> Option<&mut automerge::legacy::Op> {
    let n = ex.operations.len();
    if n == 0 {
        return None;
    }
    ex.operations.get_mut(i % n)
}

fn apply_mutation(
    ex: &mut ExpandedChange,
    m: &Mutation,
    hashes: &[ChangeHash],
    others: &[ActorId],
) {
    let msg = ex
        .message
        .as_deref()
        .and_then(|s| ChangeMessage::decode(Some(s)).ok());
    let set_msg = |ex: &mut ExpandedChange, m: &ChangeMessage| {
        ex.message = Some(m.encode());
    };
    match m {
        Mutation::Seq(d) => ex.seq = ex.seq.saturating_add_signed(i64::from(*d)),
        Mutation::StartOp(d) => {
            let s = ex
                .start_op
                .get()
                .saturating_add_signed(i64::from(*d))
                .max(1);
            ex.start_op = std::num::NonZeroU64::new(s).unwrap();
        }
        Mutation::DropDeps => ex.deps.clear(),
        Mutation::AddDep(i) => {
            if !hashes.is_empty() {
                ex.deps.push(hashes[i % hashes.len()]);
                ex.deps.sort();
                ex.deps.dedup();
            }
        }
        Mutation::Time(d) => {
            if let Some(mut mm) = msg {
                let w = (mm.at.wall_ms() as i64).saturating_add(*d).max(0) as u64;
                mm.at = Hlc::at_wall(w.min(1 << 47));
                if let Operation::Sale(r) = &mut mm.op {
                    r.at = mm.at;
                }
                ex.time = mm.at.packed() as i64;
                set_msg(ex, &mm);
            }
        }
        Mutation::Qty(q) => {
            if let Some(mut mm) = msg {
                match &mut mm.op {
                    Operation::Sale(r) => r.lines[0].qty = *q,
                    Operation::Give { units, .. } | Operation::Void { units, .. } => {
                        for v in units.values_mut() {
                            *v = *q;
                        }
                    }
                    _ => {}
                }
                set_msg(ex, &mm);
            }
        }
        Mutation::Overdraft(o) => {
            if let Some(mut mm) = msg {
                if let Operation::Sale(r) = &mut mm.op {
                    r.offline = true;
                    r.overdraft.insert(r.lines[0].sku.clone(), *o);
                }
                set_msg(ex, &mm);
            }
        }
        Mutation::Garbage(s) => ex.message = Some(s.clone()),
        Mutation::OpValue(i, v) => {
            if let Some(op) = op_mut(ex, *i) {
                if matches!(op.action, OpType::Put(_)) {
                    op.action = OpType::Put(ScalarValue::Uint(*v));
                }
            }
        }
        Mutation::OpNegative(i) => {
            if let Some(op) = op_mut(ex, *i) {
                op.action = OpType::Put(ScalarValue::Int(-5));
            }
        }
        Mutation::OpKey(i, k) => {
            let target = others
                .get(*k as usize % others.len().max(1))
                .map(|a| hex::encode(&a.to_bytes()[..8]))
                .unwrap_or_default();
            let keys = [
                "in".to_owned(),
                "out".to_owned(),
                format!("give>{target}"),
                format!("reclaim>{target}"),
                "00000001".to_owned(),
                "bogus".to_owned(),
            ];
            if let Some(op) = op_mut(ex, *i) {
                op.key = Key::Map(keys[*k as usize % keys.len()].clone().into());
            }
        }
        Mutation::OpPredClear(i) => {
            if let Some(op) = op_mut(ex, *i) {
                op.pred = Vec::new().into();
            }
        }
        Mutation::OpPredForeign(i) => {
            let actor = others.first().cloned();
            if let (Some(op), Some(a)) = (op_mut(ex, *i), actor) {
                op.pred = vec![OpId::new(3, &a)].into();
            }
        }
        Mutation::OpObjRoot(i) => {
            if let Some(op) = op_mut(ex, *i) {
                op.obj = ObjectId::Root;
            }
        }
        Mutation::OpAction(i, a) => {
            if let Some(op) = op_mut(ex, *i) {
                op.action = match a % 5 {
                    0 => OpType::Delete,
                    1 => OpType::Increment(1),
                    2 => OpType::Make(ObjType::List),
                    3 => OpType::Make(ObjType::Map),
                    _ => OpType::Put(ScalarValue::Str("x".into())),
                };
                op.insert = a % 7 == 0;
            }
        }
        Mutation::ForkMessage => {
            if let Some(mut mm) = msg {
                if let Operation::Sale(r) = &mut mm.op {
                    r.payment.reference = "fork".into();
                }
                set_msg(ex, &mm);
            }
        }
    }
}

/// Rebuild `c` with the mutations and sign it with `k`; `None` where Automerge's own encoder
/// will not build such a change (then there is nothing to send).
fn rebuild(
    c: &SignedChange,
    k: &ReplicaKey,
    muts: &[Mutation],
    hashes: &[ChangeHash],
    others: &[ActorId],
) -> Option<SignedChange> {
    let mut ex = Change::try_from(&c.bytes[..]).ok()?.decode();
    for m in muts {
        apply_mutation(&mut ex, m, hashes, others);
    }
    ex.hash = None;
    let built = std::panic::catch_unwind(move || Change::from(ex)).ok()?;
    Some(SignedChange {
        bytes: built.raw_bytes().to_vec(),
        signature: k.sign(built.raw_bytes()).to_vec(),
    })
}

fn sale(t: &mut Ledger, s: &str, qty: u64, online: bool, at: u64) -> Option<SignedChange> {
    match t.sell(sale_req(s, qty, online), at) {
        SaleOutcome::Committed { change, .. } => Some(change),
        SaleOutcome::Refused { .. } => None,
    }
}

fn run(seed: u64, muts: Vec<Mutation>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let policy = if seed % 2 == 0 {
        Policy::Strict
    } else {
        Policy::Optimistic
    };
    let mut st = stand(policy, 3, 60, 15);
    let mut honest: Vec<SignedChange> = st.setup.clone();
    let mut at = 2_000;
    // Honest terminals sell; mallory sells, voids, gives and writes off — for real.
    for i in 0..12 {
        at += 10;
        let who = i % 2;
        let s = SKUS[rng.random_range(0..SKUS.len())];
        if let Some(c) = sale(&mut st.terminals[who], s, rng.random_range(1..3), true, at) {
            honest.push(c);
        }
    }
    let mut mallory: Vec<SignedChange> = Vec::new();
    let to = st.terminals[0].me();
    for i in 0..10 {
        at += 10;
        let m = &mut st.terminals[MALLORY];
        let s = SKUS[i % SKUS.len()];
        let c = match i % 5 {
            0 | 1 => sale(m, s, 1, i % 2 == 0, at),
            2 => m.give(to, BTreeMap::from([(sku(s), 1)]), at).ok(),
            3 => m
                .sales()
                .iter()
                .rev()
                .find(|e| e.record.id.replica == m.me() && !e.voided)
                .map(|e| e.record.id)
                .and_then(|id| m.void(id, at).ok()),
            _ => m.adjust(BTreeMap::from([(sku(s), 1)]), "dropped", at).ok(),
        };
        mallory.extend(c);
    }
    // Take mallory's changes apart.
    let hashes: Vec<ChangeHash> = honest
        .iter()
        .chain(&mallory)
        .map(|c| Change::try_from(&c.bytes[..]).unwrap().hash())
        .collect();
    let others: Vec<ActorId> = [key(1), key(10), key(11)]
        .iter()
        .map(|k| k.public().actor())
        .collect();
    let mut hostile: Vec<SignedChange> = Vec::new();
    // Half the time the hostile copy replaces the genuine one, so it is first in line and
    // meets the rules past the sequence check.
    let mut withheld: HashSet<usize> = HashSet::new();
    for chunk in muts.chunks(2) {
        let j = rng.random_range(0..mallory.len());
        if rng.random_ratio(1, 2) {
            withheld.insert(j);
        }
        let target = &mallory[j];
        let signer = if rng.random_ratio(1, 10) {
            key(10)
        } else {
            key(10 + MALLORY as u8)
        };
        hostile.extend(rebuild(target, &signer, chunk, &hashes, &others));
    }
    let sent = mallory
        .iter()
        .enumerate()
        .filter(|(j, _)| !withheld.contains(j))
        .map(|(_, c)| c);
    let mut all: Vec<SignedChange> = honest.iter().chain(sent).chain(&hostile).cloned().collect();
    for receiver in 0..2 {
        let mut r = if receiver == 0 {
            std::mem::replace(
                &mut st.pool,
                Ledger::join(key(4), StandId::new("north").unwrap(), key(1).public()),
            )
        } else {
            Ledger::join(key(3), StandId::new("north").unwrap(), key(1).public())
        };
        all.shuffle(&mut rng);
        let mut rest = &all[..];
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len().min(40));
            r.apply_remote(rest[..n].to_vec(), at + 100);
            rest = &rest[n..];
            assert!(
                r.pending_bytes() <= MAX_PENDING_BYTES + MAX_UNKNOWN_PENDING_BYTES,
                "pending over its quotas"
            );
        }
        // Anything honest that waited and was squeezed out comes again with repair.
        r.apply_remote(honest.clone(), at + 100);
        let held: HashSet<ChangeHash> = r
            .all_changes()
            .map(|c| Change::try_from(&c.bytes[..]).unwrap().hash())
            .collect();
        for c in &honest {
            let h = Change::try_from(&c.bytes[..]).unwrap().hash();
            assert!(held.contains(&h), "an honest change was lost");
        }
        let saved = r.doc().save();
        let loaded = Automerge::load(&saved).expect("the saved document loads");
        assert_eq!(loaded.get_heads(), r.heads());
        if policy == Policy::Strict {
            for s in SKUS {
                assert!(r.available(&sku(s)) >= 0, "oversold {s} under strict");
            }
        }
        if receiver == 0 {
            st.pool = r;
        }
    }
    // An honest terminal still sells, and the pool takes it.
    let pool_changes: Vec<SignedChange> = st.pool.all_changes().collect();
    st.terminals[1].apply_remote(pool_changes, at + 200);
    let before = st.terminals[1].rights(st.terminals[1].me(), &sku("fries"));
    if before > 0 {
        let c = sale(&mut st.terminals[1], "fries", 1, true, at + 300).unwrap();
        let r = st.pool.apply_remote(vec![c], at + 300);
        assert_eq!(r.accepted.len(), 1, "{:?}", r.rejected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_changes_from_an_enrolled_key_never_break_a_replica(
        seed in any::<u64>(),
        muts in prop::collection::vec(mutation(), 2..40),
    ) {
        run(seed, muts);
    }
}
