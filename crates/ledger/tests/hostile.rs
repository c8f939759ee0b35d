#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile changes built by hand, each signed by a key the stand enrolled: the receive path
//! rejects them with a typed rule, never panics, and the honest replicas keep selling.

mod common;
use automerge::legacy::{Key, OpType};
use automerge::{Automerge, Change, ExpandedChange, ScalarValue};
use common::*;
use halftime_ledger::*;
use std::collections::BTreeMap;

/// Re-encode `c` with `f` applied to its expanded form and sign it with `k`.
fn reforge(c: &SignedChange, k: &ReplicaKey, f: impl FnOnce(&mut ExpandedChange)) -> SignedChange {
    let mut ex = Change::try_from(&c.bytes[..]).unwrap().decode();
    f(&mut ex);
    ex.hash = None;
    let c = Change::from(ex);
    SignedChange {
        bytes: c.raw_bytes().to_vec(),
        signature: k.sign(c.raw_bytes()).to_vec(),
    }
}

fn message(c: &SignedChange) -> ChangeMessage {
    let ch = Change::try_from(&c.bytes[..]).unwrap();
    ChangeMessage::decode(ch.message()).unwrap()
}

fn set_message(ex: &mut ExpandedChange, m: &ChangeMessage) {
    ex.message = Some(m.encode());
    ex.time = m.at.packed() as i64;
}

fn sell(t: &mut Ledger, s: &str, qty: u64, at: u64) -> SignedChange {
    match t.sell(sale_req(s, qty, true), at) {
        SaleOutcome::Committed { change, .. } => change,
        other => panic!("{other:?}"),
    }
}

fn rules(r: &ApplyReport) -> Vec<&'static str> {
    r.rejected.iter().map(|x| x.rule()).collect()
}

/// The replica still works: the document saves and loads to the same heads, and an honest
/// sale from terminal 0 is accepted.
fn still_healthy(st: &mut Stand, at: u64) {
    let saved = st.pool.doc().save();
    let loaded = Automerge::load(&saved).expect("the saved document loads");
    assert_eq!(loaded.get_heads(), st.pool.heads());
    assert_eq!(
        st.pool.counters_in_document(),
        st.pool.counters_from_state()
    );
    let all: Vec<SignedChange> = st.pool.all_changes().collect();
    st.terminals[0].apply_remote(all, at);
    let c = sell(&mut st.terminals[0], "soda", 1, at);
    let r = st.pool.apply_remote(vec![c], at);
    assert_eq!(r.accepted.len(), 1, "{:?}", r.rejected);
}

// 1. Sequence numbers, forks and op ids.

#[test]
fn a_change_that_skips_a_sequence_number_is_rejected_not_a_crash() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let gap = reforge(&c, &key(10), |ex| ex.seq += 1);
    let r = st.pool.apply_remote(vec![gap.clone()], 2_100);
    assert_eq!(rules(&r), ["sequence_gap"]);
    // Resent after "every restart": rejected again at once, nothing held.
    let r = st.pool.apply_remote(vec![gap], 2_100);
    assert_eq!(r.duplicates, 1);
    assert_eq!(st.pool.apply_remote(vec![c], 2_100).accepted.len(), 1);
    still_healthy(&mut st, 2_200);
}

#[test]
fn a_second_change_with_a_taken_number_is_equivocation() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let mut m = message(&c);
    m.at = Hlc::at_wall(2_001);
    if let Operation::Sale(rec) = &mut m.op {
        rec.at = m.at;
        rec.payment.reference = "pi_other".into();
    }
    let fork = reforge(&c, &key(10), |ex| set_message(ex, &m));
    // Both copies in one batch, and again the fork after the original.
    let r = st.pool.apply_remote(vec![c.clone(), fork.clone()], 2_100);
    assert_eq!(r.accepted.len(), 1);
    assert_eq!(rules(&r), ["equivocation"]);
    let me = st.terminals[0].me();
    assert_eq!(st.pool.stats().by_replica[&me]["equivocation"], 1);
    assert_eq!(st.pool.stats().misbehaviour(me), 1);
    // A fresh replica that gets the fork first keeps it and refuses the original the same way.
    let mut other = Ledger::join(key(3), StandId::new("north").unwrap(), key(1).public());
    other.apply_remote(st.setup.clone(), 2_000);
    let r = other.apply_remote(vec![fork, c], 2_100);
    assert_eq!(rules(&r), ["equivocation"]);
    still_healthy(&mut st, 2_200);
}

#[test]
fn op_ids_must_follow_the_causal_past_and_never_repeat() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let first = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let first_start = Change::try_from(&first.bytes[..]).unwrap().start_op();
    st.pool.apply_remote(vec![first], 2_000);
    let c = sell(&mut st.terminals[0], "hotdog", 1, 2_001);
    // Ahead of the causal past (would drag every later op id up), and reusing its own ids.
    let ahead = reforge(&c, &key(10), |ex| {
        ex.start_op = ex.start_op.checked_add(1_000).unwrap()
    });
    let reused = reforge(&c, &key(10), |ex| ex.start_op = first_start);
    for bad in [ahead, reused] {
        let r = st.pool.apply_remote(vec![bad], 2_100);
        assert_eq!(rules(&r), ["bad_op_ids"]);
    }
    assert_eq!(st.pool.apply_remote(vec![c], 2_100).accepted.len(), 1);
    still_healthy(&mut st, 2_200);
}

// 2. A forged copy never taints the genuine change.

#[test]
fn a_corrupted_signature_does_not_block_the_genuine_copy() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c1 = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let c2 = sell(&mut st.terminals[0], "hotdog", 1, 2_001);
    let mut forged = c1.clone();
    forged.signature[7] ^= 1;
    let r = st.pool.apply_remote(vec![forged.clone()], 2_100);
    assert_eq!(rules(&r), ["bad_signature"]);
    let r = st.pool.apply_remote(vec![c1.clone(), c2.clone()], 2_100);
    assert_eq!(r.accepted.len(), 2, "{:?}", r.rejected);

    // The same while the author is not enrolled yet at the receiver: the forged copy is
    // dropped before it can wait in the queue in the genuine copy's place.
    let mut fresh = Ledger::join(key(3), StandId::new("north").unwrap(), key(1).public());
    let r = fresh.apply_remote(vec![forged, c2.clone()], 2_100);
    assert_eq!(rules(&r), ["bad_signature"]);
    let mut rest = st.setup.clone();
    rest.push(c1);
    let r = fresh.apply_remote(rest, 2_100);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(fresh.heads(), st.pool.heads());
}

#[test]
fn a_shared_signature_memo_vouches_only_for_the_exact_bytes_and_signature() {
    let memo = SignatureMemo::default();
    let mut st = stand(Policy::Strict, 2, 100, 10);
    st.pool.share_signature_memo(memo.clone());
    st.terminals[1].share_signature_memo(memo.clone());
    let c1 = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    // The pool verifies the genuine change and remembers it.
    assert_eq!(
        st.pool.apply_remote(vec![c1.clone()], 2_100).accepted.len(),
        1
    );
    // The other replica sharing the memo is sent a copy with a flipped signature bit, and one
    // whose bytes were altered under the genuine signature: neither is believed.
    let mut bad_sig = c1.clone();
    bad_sig.signature[5] ^= 1;
    let mut bad_bytes = c1.clone();
    let last = bad_bytes.bytes.len() - 1;
    bad_bytes.bytes[last] ^= 1;
    let t = &mut st.terminals[1];
    let r = t.apply_remote(vec![bad_sig], 2_100);
    assert_eq!(rules(&r), ["bad_signature"]);
    let r = t.apply_remote(vec![bad_bytes], 2_100);
    assert!(r.accepted.is_empty(), "{r:?}");
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    // The genuine copy is accepted there too.
    assert_eq!(t.apply_remote(vec![c1], 2_100).accepted.len(), 1);
}

// 3. A reclaimed key cannot mint rights.

/// Strict stand, 2 terminals with 10 of each item; the pool reclaims terminal 0, which has not
/// heard of it. Returns the stand and the reclaim.
fn reclaimed_stand() -> (Stand, SignedChange) {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let dead = st.terminals[0].me();
    let rc = st.pool.reclaim(dead, 2_000).unwrap();
    (st, rc)
}

#[test]
fn a_reclaimed_key_cannot_mint_rights_with_a_give() {
    let (mut st, rc) = reclaimed_stand();
    let b = st.terminals[1].me();
    // Terminal 0 sells one before it hears of the reclaim (its first write makes its maps).
    let s = sell(&mut st.terminals[0], "hotdog", 1, 2_040);
    st.pool.apply_remote(vec![s.clone()], 2_040);
    st.terminals[1].apply_remote(vec![s], 2_040);
    // 1,000 is far more than terminal 0 ever held (9 left): rejected wherever it lands.
    let huge = reforge_give(&st, 1_000);
    let r = st.pool.apply_remote(vec![huge], 2_100);
    assert_eq!(rules(&r), ["below_floor"]);

    // What it held (9) is a valid change in its own view, so it is kept, but it gives B no
    // rights at a replica that knows of the reclaim — in either order of arrival.
    let give = reforge_give(&st, 9);
    let r = st.pool.apply_remote(vec![give.clone()], 2_100);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(st.pool.rights(b, &sku("hotdog")), 10);
    assert_eq!(st.pool.unbacked(&sku("hotdog")), 9);
    let mut b_first = std::mem::replace(
        &mut st.terminals[1],
        Ledger::join(key(2), StandId::new("north").unwrap(), key(1).public()),
    );
    let mut b_second = Ledger::join(key(11), StandId::new("north").unwrap(), key(1).public());
    b_second.apply_remote(b_first.all_changes().collect(), 2_100);
    b_first.apply_remote(vec![give.clone()], 2_100);
    assert_eq!(
        b_first.rights(b, &sku("hotdog")),
        19,
        "before the reclaim it counts"
    );
    b_first.apply_remote(vec![rc.clone()], 2_110);
    b_second.apply_remote(vec![rc, give], 2_110);
    for l in [&b_first, &b_second] {
        assert_eq!(l.rights(b, &sku("hotdog")), 10);
        assert_eq!(l.available(&sku("hotdog")), 99);
    }
    // B sells all it may under strict: the stand never goes below zero.
    let mut b_now = b_second;
    let c = sell(&mut b_now, "hotdog", 10, 2_200);
    assert!(matches!(
        b_now.sell(sale_req("hotdog", 1, true), 2_201),
        SaleOutcome::Refused { .. }
    ));
    let r = st.pool.apply_remote(vec![c], 2_300);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert!(st.pool.available(&sku("hotdog")) >= 0);
}

/// A give by terminal 0's key of `units` hot dogs to terminal 1, on terminal 0's own view.
fn reforge_give(st: &Stand, units: u64) -> SignedChange {
    let t = &st.terminals[0];
    let to = st.terminals[1].me();
    let mut doc = doc_of(t);
    doc.set_actor(key(10).public().actor());
    let at = Hlc::at_wall(2_050);
    let m = ChangeMessage {
        v: 1,
        req: None,
        at,
        op: Operation::Give {
            to,
            units: BTreeMap::from([(sku("hotdog"), units)]),
        },
    };
    use automerge::ReadDoc;
    use automerge::transaction::{CommitOptions, Transactable};
    let mut tx = doc.transaction();
    let mut o = automerge::ROOT;
    for p in ["stock", &t.me().to_string(), "hotdog", "00000000"] {
        o = tx.get(&o, p).unwrap().unwrap().1;
    }
    tx.put(&o, format!("give>{to}"), units).unwrap();
    tx.commit_with(
        CommitOptions::default()
            .with_message(m.encode())
            .with_time(at.packed() as i64),
    );
    let c = doc.get_last_local_change().unwrap();
    SignedChange {
        bytes: c.raw_bytes().to_vec(),
        signature: key(10).sign(c.raw_bytes()).to_vec(),
    }
}

#[test]
fn a_reclaimed_replicas_late_sales_are_bounded_by_what_it_held() {
    let (mut st, _rc) = reclaimed_stand();
    // Sold offline before it heard of the reclaim: 10 is all it held.
    let ok = sell(&mut st.terminals[0], "hotdog", 10, 2_040);
    let r = st.pool.apply_remote(vec![ok.clone()], 2_100);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(st.pool.available(&sku("hotdog")), 90);
    // One more, forged past its own rights: refused even though the floor of a reclaimed
    // writer used to be skipped.
    let mut m = message(&ok);
    let mut extra = ok.clone();
    if let Operation::Sale(rec) = &mut m.op {
        rec.lines[0].qty = 11;
    }
    extra = reforge(&extra, &key(10), |ex| {
        set_message(ex, &m);
        for op in &mut ex.operations {
            if let (Key::Map(k), OpType::Put(_)) = (&op.key, &op.action) {
                if k == "out" {
                    op.action = OpType::Put(ScalarValue::Uint(11));
                }
            }
        }
    });
    let mut fresh = Ledger::join(key(3), StandId::new("north").unwrap(), key(1).public());
    let mut all: Vec<SignedChange> = st.pool.all_changes().collect();
    all.retain(|c| c != &ok);
    fresh.apply_remote(all, 2_100);
    let r = fresh.apply_remote(vec![extra], 2_100);
    assert_eq!(rules(&r), ["below_floor"]);
}

// 4. Memory.

#[test]
fn compressed_chunks_and_oversized_op_counts_are_refused_before_parsing_much() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    // A catalog change big enough for Automerge to deflate.
    let items: Vec<CatalogItem> = (0..40)
        .map(|i| CatalogItem {
            sku: sku(&format!("item{i}")),
            name: "x".repeat(100),
            price_cents: 100,
            low_stock_at: 1,
        })
        .collect();
    let c = st.pool.set_catalog(items, 2_000).unwrap();
    let mut ch = Change::try_from(&c.bytes[..]).unwrap();
    let compressed = ch.bytes().to_vec();
    assert_eq!(compressed[8], 2, "deflated chunk");
    let mut fresh = Ledger::join(key(3), StandId::new("north").unwrap(), key(1).public());
    fresh.apply_remote(st.setup.clone(), 2_000);
    let r = fresh.apply_remote(
        vec![SignedChange {
            signature: key(1).sign(&compressed).to_vec(),
            bytes: compressed,
        }],
        2_100,
    );
    assert_eq!(rules(&r), ["malformed"]);
    assert_eq!(fresh.apply_remote(vec![c], 2_100).accepted.len(), 1);

    // 5,000 ops in one change.
    let s = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let many = reforge(&s, &key(10), |ex| {
        let op = ex.operations[0].clone();
        ex.operations = vec![op; MAX_OPS_PER_CHANGE + 1];
    });
    let r = st.pool.apply_remote(vec![many], 2_100);
    assert_eq!(rules(&r), ["malformed"]);
}

#[test]
fn strangers_fill_only_their_own_quota_and_never_push_out_an_honest_change() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    // An honest change that arrives before its dependency: it must wait.
    let c1 = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let c2 = sell(&mut st.terminals[0], "hotdog", 1, 2_001);
    assert_eq!(st.pool.apply_remote(vec![c2], 2_010).pending, 1);
    // A never-enrolled key floods the queue with valid, signed changes.
    let stranger = key(77);
    let mut doc = Automerge::new().with_actor(stranger.public().actor());
    let mut flood = Vec::new();
    for i in 0..3_000u64 {
        use automerge::transaction::{CommitOptions, Transactable};
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "k", format!("{i:0>300}")).unwrap();
        tx.commit_with(CommitOptions::default().with_message(format!("{i}")));
        let c = doc.get_last_local_change().unwrap();
        flood.push(SignedChange {
            bytes: c.raw_bytes().to_vec(),
            signature: stranger.sign(c.raw_bytes()).to_vec(),
        });
    }
    // Newest first, so every one of them waits for a dependency.
    flood.reverse();
    for chunk in flood.chunks(256) {
        st.pool.apply_remote(chunk.to_vec(), 2_020);
    }
    assert!(st.pool.pending_bytes() <= MAX_UNKNOWN_PENDING_BYTES + MAX_PENDING_BYTES_PER_AUTHOR);
    assert!(st.pool.pending_len() < 1_000, "{}", st.pool.pending_len());
    assert!(
        st.pool.stats().pending_dropped > 2_000,
        "{:?} {}",
        st.pool.stats(),
        st.pool.pending_bytes()
    );
    // The honest change is still there and goes in with its dependency.
    let r = st.pool.apply_remote(vec![c1], 2_030);
    assert_eq!(r.accepted.len(), 2, "{:?}", r.rejected);
}

// 5. The document and the state never disagree.

#[test]
fn a_pred_that_is_not_exactly_the_current_value_is_rejected() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c1 = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    st.pool.apply_remote(vec![c1], 2_000);
    let c2 = sell(&mut st.terminals[0], "hotdog", 1, 2_001);
    // An empty pred beside the author's current `out`: Automerge would keep both as a
    // conflict and show the older one.
    let no_pred = reforge(&c2, &key(10), |ex| {
        for op in &mut ex.operations {
            op.pred = Vec::new().into();
        }
    });
    let r = st.pool.apply_remote(vec![no_pred], 2_100);
    assert_eq!(rules(&r), ["bad_pred"]);
    assert_eq!(st.pool.apply_remote(vec![c2], 2_100).accepted.len(), 1);
    still_healthy(&mut st, 2_200);
}

// 6. Numbers from a peer are bounded and summed with checks.

#[test]
fn quantities_that_overflow_are_rejected() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    for (a, b) in [(u64::MAX, 2), (u64::MAX, 1), (1u64 << 41, 1)] {
        let mut m = message(&c);
        if let Operation::Sale(rec) = &mut m.op {
            let mut l2 = rec.lines[0].clone();
            rec.lines[0].qty = a;
            l2.qty = b;
            rec.lines.push(l2);
        }
        let bad = reforge(&c, &key(10), |ex| set_message(ex, &m));
        let r = st.pool.apply_remote(vec![bad], 2_100);
        assert_eq!(rules(&r), ["invalid_operation"], "{a} + {b}");
    }
    let mut m = message(&c);
    if let Operation::Sale(rec) = &mut m.op {
        rec.lines[0].unit_price_cents = u64::MAX / 2;
        rec.lines[0].qty = 1;
    }
    let bad = reforge(&c, &key(10), |ex| set_message(ex, &m));
    assert_eq!(
        rules(&st.pool.apply_remote(vec![bad], 2_100)),
        ["invalid_operation"]
    );
    assert_eq!(st.pool.apply_remote(vec![c], 2_100).accepted.len(), 1);
}

// 7. Time.

#[test]
fn a_change_dated_before_its_past_or_far_ahead_is_rejected() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c = sell(&mut st.terminals[0], "hotdog", 1, 2_000);
    let redate = |c: &SignedChange, wall: u64| {
        let mut m = message(c);
        m.at = Hlc::at_wall(wall);
        if let Operation::Sale(rec) = &mut m.op {
            rec.at = m.at;
        }
        reforge(c, &key(10), |ex| set_message(ex, &m))
    };
    // Before the stand existed.
    let r = st.pool.apply_remote(vec![redate(&c, 5)], 2_100);
    assert_eq!(rules(&r), ["before_its_past"]);
    // Ten years ahead: refused, and not remembered, so the same change is taken later.
    let ten_years = 10 * 365 * 24 * 3_600_000u64;
    let r = st.pool.apply_remote(vec![redate(&c, ten_years)], 2_100);
    assert_eq!(rules(&r), ["from_the_future"]);
    let near = redate(&c, 2_000 + 11 * 60_000);
    let r = st.pool.apply_remote(vec![near.clone()], 2_100);
    assert_eq!(rules(&r), ["from_the_future"]);
    let r = st.pool.apply_remote(vec![near], 2_000 + 2 * 60_000);
    assert_eq!(r.accepted.len(), 1, "{:?}", r.rejected);
    // Dated 11 minutes ahead of the sale it follows, it counts in no rate window until then.
    let me = st.terminals[0].me();
    assert_eq!(st.pool.sales_rate(me, 2_000 + 2 * 60_000, 60_000), 0.0);
    assert!(st.pool.sales_rate(me, 2_000 + 11 * 60_000, 60_000) > 0.0);
    // Point-in-time stock before the stand existed is nothing.
    assert!(st.pool.stock_at_time(Hlc::at_wall(4)).is_empty());
}

// 8. Optimistic overdraft claims are checked against the seller's own view.

#[test]
fn an_overdraft_claim_above_the_sellers_offline_cap_is_rejected() {
    let mut st = stand(Policy::Optimistic, 2, 100, 10);
    // Available 100, 2 terminals: an offline cap of 50 on top of 10 rights.
    let t = &mut st.terminals[0];
    let SaleOutcome::Committed { change: c, .. } = t.sell(sale_req("hotdog", 30, false), 2_000)
    else {
        panic!()
    };
    let claim = |od: u64, qty: u64| {
        let mut m = message(&c);
        if let Operation::Sale(rec) = &mut m.op {
            rec.overdraft.insert(sku("hotdog"), od);
            rec.lines[0].qty = qty;
        }
        reforge(&c, &key(10), |ex| {
            set_message(ex, &m);
            for op in &mut ex.operations {
                if let (Key::Map(k), OpType::Put(_)) = (&op.key, &op.action) {
                    if k == "out" {
                        op.action = OpType::Put(ScalarValue::Uint(qty));
                    }
                }
            }
        })
    };
    // 90 is within all the stand's stock (100), which is all the old check asked.
    let r = st.pool.apply_remote(vec![claim(90, 100)], 2_100);
    assert_eq!(rules(&r), ["invalid_operation"]);
    assert_eq!(st.pool.apply_remote(vec![c], 2_100).accepted.len(), 1);
}

#[test]
fn misbehaviour_is_counted_per_key() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let c = sell(&mut st.terminals[1], "hotdog", 1, 2_000);
    let bad = reforge(&c, &key(11), |ex| ex.seq += 5);
    st.pool.apply_remote(vec![bad], 2_100);
    let me = st.terminals[1].me();
    assert_eq!(st.pool.stats().by_replica[&me]["sequence_gap"], 1);
    assert_eq!(st.pool.stats().misbehaviour(st.terminals[0].me()), 0);
    // A bad signature is not held against the key it names: anyone can forge that.
    let mut forged = c.clone();
    forged.signature[0] ^= 1;
    st.pool.apply_remote(vec![forged], 2_100);
    assert_eq!(st.pool.stats().misbehaviour(me), 1);
}

#[test]
fn a_relay_writes_only_refunds_is_given_nothing_and_admits_only_members() {
    let mut st = stand(Policy::Strict, 1, 100, 10);
    let t0 = 2_000;
    let mut history = st.setup.clone();
    history.push(
        st.pool
            .enrol(key(40).public(), "kitchen", Role::Kitchen, t0)
            .unwrap(),
    );
    history.push(
        st.pool
            .enrol(key(50).public(), "relay", Role::Relay, t0)
            .unwrap(),
    );
    let north = StandId::new("north").unwrap();
    let mut kitchen = Ledger::join(key(40), north.clone(), key(1).public());
    kitchen.apply_remote(history.clone(), t0);
    let mut relay = Ledger::join(key(50), north.clone(), key(1).public());
    let r = relay.apply_remote(history.clone(), t0);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(relay.role(), Some(Role::Relay));

    // Its own ledger refuses every write, and nobody may give it rights.
    assert!(relay.mark(&sku("soda"), false, t0).is_err());
    assert!(matches!(
        relay.sell(sale_req("soda", 1, true), t0),
        SaleOutcome::Refused { .. }
    ));
    let one = BTreeMap::from([(sku("soda"), 1)]);
    assert!(st.pool.give(key(50).replica_id(), one, t0).is_err());

    // A change forged under its key is rejected by the rule, not by chance.
    let mark = kitchen.mark(&sku("soda"), false, 3_000).unwrap();
    let forged = reforge(&mark, &key(50), |ex| ex.actor_id = key(50).public().actor());
    let r = st.pool.apply_remote(vec![forged], 3_000);
    assert_eq!(rules(&r), vec!["invalid_operation"], "{:?}", r.rejected);
    assert!(
        r.rejected[0]
            .to_string()
            .contains("a relay writes only refunds")
    );

    // Who may connect: the pool and enrolled, unretired replicas, by the same rule everywhere.
    assert_eq!(relay.admits(&key(1).public()), Ok(key(1).replica_id()));
    assert_eq!(relay.admits(&key(10).public()), Ok(key(10).replica_id()));
    assert!(matches!(
        relay.admits(&key(99).public()),
        Err(NotAdmitted::NotEnrolled { .. })
    ));
    // A key the operator pinned is let in until the document says otherwise.
    let stranger = kitchen.admits(&key(98).public());
    assert!(stranger.is_err());
    assert_eq!(
        kitchen.admits_pinned(&key(98).public(), Some(&key(98).public())),
        Ok(key(98).replica_id())
    );
    assert!(
        kitchen
            .admits_pinned(&key(97).public(), Some(&key(98).public()))
            .is_err()
    );
    let retire = st.pool.retire(key(10).replica_id(), 4_000).unwrap();
    relay.apply_remote(vec![retire], 4_000);
    let refused = relay.admits(&key(10).public()).unwrap_err();
    assert!(matches!(refused, NotAdmitted::Retired { .. }));
    assert!(refused.to_string().contains("retired from stand north"));
    assert!(
        relay
            .admits_pinned(&key(10).public(), Some(&key(10).public()))
            .is_err(),
        "a pin does not outlive the pool's word"
    );
}

#[test]
fn forged_refunds_are_rejected_by_their_rule() {
    let hd = sku("hotdog");
    let mut st = stand(Policy::Strict, 1, 100, 10);
    let t0 = 2_000;
    let mut history = st.setup.clone();
    for (n, name, role) in [(40, "kitchen", Role::Kitchen), (50, "relay", Role::Relay)] {
        history.push(st.pool.enrol(key(n).public(), name, role, t0).unwrap());
    }
    let north = StandId::new("north").unwrap();
    let mut relay = Ledger::join(key(50), north.clone(), key(1).public());
    relay.apply_remote(history.clone(), t0);
    st.terminals[0].apply_remote(history.clone(), t0);
    let sale = sell(&mut st.terminals[0], "hotdog", 2, t0);
    relay.apply_remote(vec![sale.clone()], t0);
    st.pool.apply_remote(vec![sale], t0);
    let sale_id = relay.sales()[0].record.id;
    let note = relay.refund(sale_id, &hd, 1, 3_000).unwrap();

    // The kitchen's key on a refund: the role rule, before anything else is read.
    let by_kitchen = reforge(&note, &key(40), |ex| ex.actor_id = key(40).public().actor());
    let r = st.pool.apply_remote(vec![by_kitchen], 3_000);
    assert_eq!(rules(&r), vec!["invalid_operation"], "{:?}", r.rejected);
    assert!(
        r.rejected[0]
            .to_string()
            .contains("does not record refunds")
    );

    // The counter moves more than the message says.
    let inflated = reforge(&note, &key(50), |ex| {
        for op in &mut ex.operations {
            if let (Key::Map(k), OpType::Put(ScalarValue::Uint(v))) = (&op.key, &mut op.action) {
                if k == "refunded" {
                    *v += 1;
                }
            }
        }
    });
    let r = st.pool.apply_remote(vec![inflated], 3_000);
    assert_eq!(rules(&r), vec!["message_mismatch"], "{:?}", r.rejected);

    // A quantity out of bounds in the message, the counter matching it.
    let huge = reforge(&note, &key(50), |ex| {
        let mut m = message(&note);
        if let Operation::Refund { units, .. } = &mut m.op {
            *units = u64::MAX;
        }
        set_message(ex, &m);
    });
    let r = st.pool.apply_remote(vec![huge], 3_000);
    assert_eq!(rules(&r), vec!["invalid_operation"], "{:?}", r.rejected);

    // A refund of a sale nobody made is kept as written but shows nothing: whether a replica
    // knows a sale must not decide whether it accepts the change.
    let ghost = reforge(&note, &key(50), |ex| {
        let mut m = message(&note);
        if let Operation::Refund { sale, .. } = &mut m.op {
            sale.seq = 77;
        }
        set_message(ex, &m);
    });
    let r = st.pool.apply_remote(vec![ghost], 3_000);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert!(st.pool.refunds().is_empty());
    assert_eq!(st.pool.refunded(sale_id, &hd), 0);
    still_healthy(&mut st, 4_000);
}

#[test]
fn an_admin_request_is_carried_out_by_the_pool_once() {
    let mut st = stand(Policy::Strict, 1, 100, 10);
    let five = || BTreeMap::from([(sku("soda"), 5)]);
    let first = st
        .pool
        .with_request(Some(5), |l| l.restock(five(), "truck", 2_000))
        .unwrap();
    assert_eq!(message(&first).req, Some(5));
    let r = st.terminals[0].apply_remote(vec![first], 2_000);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(st.terminals[0].request_done(5), Some(st.pool.local_seq()));
    // The pool's own ledger refuses to carry it out again.
    let again = st
        .pool
        .with_request(Some(5), |l| l.restock(five(), "truck", 2_100))
        .unwrap_err();
    assert!(again.to_string().contains("already carried out"), "{again}");

    // By hand: the pool's next change claiming the same request.
    let next = st.pool.restock(five(), "more", 2_200).unwrap();
    let replay = reforge(&next, &key(1), |ex| {
        let mut m = message(&next);
        m.req = Some(5);
        set_message(ex, &m);
    });
    let r = st.terminals[0].apply_remote(vec![replay], 2_200);
    assert_eq!(rules(&r), vec!["invalid_operation"], "{:?}", r.rejected);
    assert!(r.rejected[0].to_string().contains("already carried out"));

    // A terminal's change claiming to carry out a request.
    let sale = sell(&mut st.terminals[0], "soda", 1, 2_300);
    let claimed = reforge(&sale, &key(10), |ex| {
        let mut m = message(&sale);
        m.req = Some(6);
        set_message(ex, &m);
    });
    let r = st.pool.apply_remote(vec![claimed], 2_300);
    assert_eq!(rules(&r), vec!["invalid_operation"], "{:?}", r.rejected);
    assert!(r.rejected[0].to_string().contains("only the pool"));
    assert_eq!(st.pool.request_done(6), None);
    let r = st.pool.apply_remote(vec![sale], 2_300);
    assert!(r.rejected.is_empty());
    let r = st.terminals[0].apply_remote(vec![next], 2_300);
    assert!(r.rejected.is_empty());
    still_healthy(&mut st, 3_000);
}
