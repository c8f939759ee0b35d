#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Arbitrary bytes into every decoding entry point: errors, never panics, nothing lost.

mod common;
use common::*;
use halftime_ledger::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), sig in prop::collection::vec(any::<u8>(), 0..70)) {
        let stand_id = StandId::new("north").unwrap();
        let _ = WireMessage::decode(&bytes, &stand_id);
        let _ = SignedChange::from_slice(&bytes);
        let _ = ChangeMessage::decode(std::str::from_utf8(&bytes).ok());
        let mut st = stand(Policy::Strict, 1, 10, 2);
        let heads = st.pool.heads();
        let r = st.pool.apply_remote(vec![SignedChange { bytes, signature: sig }], 5_000);
        prop_assert!(r.accepted.is_empty());
        prop_assert_eq!(st.pool.heads(), heads);
    }

    #[test]
    fn corrupted_valid_changes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), resign in any::<bool>()) {
        let mut st = stand(Policy::Strict, 1, 10, 2);
        let SaleOutcome::Committed { change, .. } = st.terminals[0].sell(sale_req("hotdog", 1, true), 3_000) else { panic!() };
        let mut bytes = change.bytes.clone();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        // Re-signing makes the corruption reach the decoder and validator, not just the signature check.
        let signature = if resign { key(10).sign(&bytes).to_vec() } else { change.signature.clone() };
        let before = st.pool.counters_from_state();
        let _ = st.pool.apply_remote(vec![SignedChange { bytes, signature }], 5_000);
        // Whatever happened, the original still applies and nothing stored was lost.
        let r = st.pool.apply_remote(vec![change], 5_000);
        prop_assert!(r.rejected.is_empty() || r.duplicates == 0);
        prop_assert!(st.pool.counters_from_state().len() >= before.len());
        let frame = WireMessage::Changes { changes: vec![] }.encode(st.pool.stand_id());
        prop_assert!(WireMessage::decode(&frame, st.pool.stand_id()).is_ok());
    }
}

#[test]
fn wire_frames_round_trip_and_check_the_stand() {
    let st = stand(Policy::Strict, 1, 10, 2);
    let m = WireMessage::Vector {
        vector: st.pool.version_vector(),
    };
    let f = m.encode(st.pool.stand_id());
    assert_eq!(WireMessage::decode(&f, st.pool.stand_id()).unwrap(), m);
    assert!(matches!(
        WireMessage::decode(&f, &StandId::new("south").unwrap()),
        Err(WireError::WrongStand(_))
    ));
    assert!(WireMessage::decode(&[], st.pool.stand_id()).is_err());
}

#[test]
fn admin_frames_round_trip_and_are_bounded_before_use() {
    let north = StandId::new("north").unwrap();
    let ok = WireMessage::AdminRequest {
        id: 3,
        op: AdminOp::Restock {
            units: BTreeMap::from([(sku("hotdog"), 5)]),
            note: "truck".into(),
        },
    };
    assert_eq!(WireMessage::decode(&ok.encode(&north), &north).unwrap(), ok);
    let answer = WireMessage::AdminAnswer {
        id: 3,
        outcome: Err("no".into()),
    };
    assert_eq!(
        WireMessage::decode(&answer.encode(&north), &north).unwrap(),
        answer
    );

    // Built by hand past each bound: a note longer than a change may carry, a restock of
    // nothing, a quantity past the counters' range, a refusal longer than an answer carries.
    let over = [
        WireMessage::AdminRequest {
            id: 4,
            op: AdminOp::Restock {
                units: BTreeMap::from([(sku("hotdog"), 5)]),
                note: "x".repeat(message::MAX_TEXT_BYTES + 1),
            },
        },
        WireMessage::AdminRequest {
            id: 5,
            op: AdminOp::Adjust {
                units: BTreeMap::new(),
                reason: String::new(),
            },
        },
        WireMessage::AdminRequest {
            id: 6,
            op: AdminOp::Restock {
                units: BTreeMap::from([(sku("hotdog"), u64::MAX)]),
                note: String::new(),
            },
        },
        WireMessage::AdminAnswer {
            id: 7,
            outcome: Err("x".repeat(sync::MAX_ANSWER_BYTES + 1)),
        },
    ];
    for m in over {
        assert!(
            matches!(
                WireMessage::decode(&m.encode(&north), &north),
                Err(WireError::OverLimit(_))
            ),
            "{m:?}"
        );
    }
}

#[test]
fn stock_at_a_past_time_matches_a_replay_of_the_history() {
    let mut st = stand(Policy::Strict, 2, 50, 20);
    let mut all = st.setup.clone();
    let mut times = Vec::new();
    for i in 0..30u64 {
        let t = 10_000 + i * 1_000;
        let who = (i % 2) as usize;
        if let SaleOutcome::Committed { change, .. } =
            st.terminals[who].sell(sale_req(SKUS[(i % 3) as usize], 1, true), t)
        {
            st.pool.apply_remote(vec![change.clone()], t);
            all.push(change);
        }
        if i == 12 {
            let c = st
                .pool
                .restock(BTreeMap::from([(sku("soda"), 7)]), "", t)
                .unwrap();
            all.push(c);
        }
        times.push(t);
    }
    for &t in &times {
        let at = Hlc::at_wall(t + 1);
        let from_doc = st.pool.stock_at_time(at);
        // Replay: a fresh replica fed only the changes made up to t.
        let prefix: Vec<SignedChange> = all
            .iter()
            .filter(|c| {
                let ch = automerge::Change::try_from(&c.bytes[..]).unwrap();
                (ch.timestamp() as u64) < at.packed()
            })
            .cloned()
            .collect();
        let (replay, rep) = Ledger::restore(
            key(50),
            StandId::new("north").unwrap(),
            key(1).public(),
            prefix,
            t,
        );
        assert!(rep.rejected.is_empty() && rep.pending == 0);
        for s in SKUS {
            assert_eq!(
                from_doc.get(&sku(s)).copied().unwrap_or(0),
                replay.available(&sku(s)),
                "{s} at {t}"
            );
        }
    }
    // And the present equals the live state.
    let now = st.pool.stock_at_time(Hlc::at_wall(u64::MAX >> 17));
    for s in SKUS {
        assert_eq!(now[&sku(s)], st.pool.available(&sku(s)));
    }
}

#[test]
fn restore_rebuilds_the_same_state_and_never_reuses_a_sequence() {
    let mut st = stand(Policy::Strict, 1, 50, 20);
    for i in 0..5 {
        let SaleOutcome::Committed { .. } =
            st.terminals[0].sell(sale_req("hotdog", 1, true), 3_000 + i)
        else {
            panic!()
        };
    }
    let t = &st.terminals[0];
    let stored: Vec<SignedChange> = t.all_changes().collect();
    let (mut back, rep) = Ledger::restore(
        key(10),
        StandId::new("north").unwrap(),
        key(1).public(),
        stored,
        9_000,
    );
    assert!(rep.rejected.is_empty());
    assert_eq!(back.counters_from_state(), t.counters_from_state());
    assert_eq!(back.local_seq(), t.local_seq());
    let SaleOutcome::Committed { sale_id, change } = back.sell(sale_req("hotdog", 1, true), 9_001)
    else {
        panic!()
    };
    assert_eq!(sale_id.seq, t.local_seq() + 1);
    // The pool accepts the restored replica's next change.
    let all: Vec<SignedChange> = back.all_changes().collect();
    let r = st.pool.apply_remote(all, 9_002);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert!(r.accepted.contains(&change));
}

#[test]
fn peer_sync_repairs_a_lossy_link() {
    let mut st = stand(Policy::Strict, 2, 100, 50);
    let (mut a, mut b) = (st.terminals.remove(0), st.terminals.remove(0));
    let mut sa = PeerSync::new(&a, 0, 100);
    let mut sb = PeerSync::new(&b, 0, 100);
    let mut now = 0;
    for i in 0..40u64 {
        now += 10;
        let SaleOutcome::Committed { change, .. } = a.sell(sale_req("fries", 1, false), now) else {
            panic!()
        };
        sa.push(a.me(), a.local_seq(), &change);
        // Drop every second message from a to b; everything from b arrives.
        let mut k = 0;
        while let Some(m) = sa.poll_transmit() {
            k += 1;
            if (i + k) % 2 == 0 {
                sb.handle(&mut b, m, now);
            }
        }
        while let Some(m) = sb.poll_transmit() {
            sa.handle(&mut a, m, now);
        }
    }
    assert!(
        b.version_vector() != a.version_vector(),
        "the loss must have left a gap"
    );
    for _ in 0..5 {
        now += 100;
        sa.handle_timeout(&a, now);
        sb.handle_timeout(&b, now);
        for _ in 0..4 {
            while let Some(m) = sa.poll_transmit() {
                sb.handle(&mut b, m, now);
            }
            while let Some(m) = sb.poll_transmit() {
                sa.handle(&mut a, m, now);
            }
        }
    }
    assert_eq!(b.version_vector(), a.version_vector());
    assert_eq!(b.available(&sku("fries")), 60);
}

/// Deliver everything queued both ways until both are quiet.
fn exchange(a: &mut Ledger, sa: &mut PeerSync, b: &mut Ledger, sb: &mut PeerSync, now: u64) {
    for _ in 0..8 {
        while let Some(m) = sa.poll_transmit() {
            sb.handle(b, m, now);
        }
        while let Some(m) = sb.poll_transmit() {
            sa.handle(a, m, now);
        }
    }
}

#[test]
fn vectors_between_whole_ones_name_what_rose_and_a_lost_one_is_asked_for_again() {
    let mut st = stand(Policy::Strict, 2, 100, 50);
    let (mut a, mut b) = (st.terminals.remove(0), st.terminals.remove(0));
    let (mut sa, mut sb) = (PeerSync::new(&a, 0, 100), PeerSync::new(&b, 0, 100));
    // A new connection opens with the whole vector and asks for the peer's.
    assert!(matches!(
        sa.poll_transmit(),
        Some(WireMessage::VectorHello { .. })
    ));
    sa = PeerSync::new(&a, 0, 100);
    exchange(&mut a, &mut sa, &mut b, &mut sb, 0);
    assert_eq!(sb.their_vector(), a.vector());

    // A sale: the next vector names only the seller.
    let SaleOutcome::Committed { change, .. } = a.sell(sale_req("fries", 1, false), 100) else {
        panic!()
    };
    sa.push(a.me(), a.local_seq(), &change);
    exchange(&mut a, &mut sa, &mut b, &mut sb, 100);
    sa.handle_timeout(&a, 200);
    let Some(WireMessage::VectorChanged { changed, total }) = sa.poll_transmit() else {
        panic!("a vector of what changed")
    };
    assert_eq!(changed, VersionVector::from([(a.me(), a.local_seq())]));
    assert_eq!(total, a.vector().total());
    sb.handle(&mut b, WireMessage::VectorChanged { changed, total }, 200);
    assert_eq!(sb.their_vector(), a.vector());

    // A pool change reaches a; the vector saying so is lost; the next names only a's sale.
    let restock = st
        .pool
        .restock(BTreeMap::from([(sku("soda"), 7)]), "truck", 300)
        .unwrap();
    a.apply_remote(vec![restock], 300);
    sa.handle_timeout(&a, 400);
    assert!(matches!(
        sa.poll_transmit(),
        Some(WireMessage::VectorChanged { .. })
    ));
    let SaleOutcome::Committed { change, .. } = a.sell(sale_req("fries", 1, false), 500) else {
        panic!()
    };
    sa.push(a.me(), a.local_seq(), &change);
    exchange(&mut a, &mut sa, &mut b, &mut sb, 500);
    sa.handle_timeout(&a, 600);
    let m = sa.poll_transmit().unwrap();
    assert!(matches!(&m, WireMessage::VectorChanged { changed, .. } if changed.len() == 1));
    sb.handle(&mut b, m, 600);
    // b sees its view fall short of a's word and asks for the whole vector.
    assert_ne!(sb.their_vector(), a.vector());
    let ask = sb.poll_transmit().unwrap();
    assert!(matches!(ask, WireMessage::VectorHello { .. }), "{ask:?}");
    sa.handle(&mut a, ask, 600);
    let whole = sa.poll_transmit().unwrap();
    assert!(matches!(whole, WireMessage::Vector { .. }), "{whole:?}");
    sb.handle(&mut b, whole, 600);
    assert_eq!(sb.their_vector(), a.vector());
    // And b, now knowing a holds the restock, gets it.
    exchange(&mut a, &mut sa, &mut b, &mut sb, 600);
    assert_eq!(b.vector(), a.vector());
}

#[test]
fn a_forged_vector_gets_at_most_a_vector_back() {
    let mut st = stand(Policy::Strict, 2, 100, 50);
    let (mut a, mut b) = (st.terminals.remove(0), st.terminals.remove(0));
    let (mut sa, mut sb) = (PeerSync::new(&a, 0, 100), PeerSync::new(&b, 0, 100));
    exchange(&mut a, &mut sa, &mut b, &mut sb, 0);
    let held = b.len();
    // Hostile: totals no vector could reach, and a replica nobody enrolled.
    let stranger = ReplicaId::from_public(&[0xee; 32]);
    let forged = [
        (VersionVector::new(), u64::MAX),
        (VersionVector::from([(stranger, u64::MAX)]), u64::MAX),
        (VersionVector::from([(a.me(), u64::MAX - 1)]), 3),
    ];
    for (i, (changed, total)) in forged.into_iter().enumerate() {
        let m = WireMessage::VectorChanged { changed, total };
        let m = WireMessage::decode(&m.encode(b.stand_id()), b.stand_id()).unwrap();
        sb.handle(&mut b, m, 100 * i as u64);
        let sent: Vec<WireMessage> = std::iter::from_fn(|| sb.poll_transmit()).collect();
        assert!(
            sent.len() <= 1 && sent.iter().all(WireMessage::is_vector),
            "{sent:?}"
        );
    }
    assert_eq!(b.len(), held);
}

#[test]
fn optimistic_offline_sells_within_the_cap_and_locks_low_stock() {
    let mut st = stand(Policy::Optimistic, 2, 100, 10);
    let t = &mut st.terminals[0];
    // available 100, 2 terminals: cap 50 on top of rights 10.
    assert_eq!(t.sellable_now(&sku("hotdog"), false), 60);
    assert_eq!(t.sellable_now(&sku("hotdog"), true), 10);
    let SaleOutcome::Committed { .. } = t.sell(sale_req("hotdog", 30, false), 2_000) else {
        panic!()
    };
    let rec = t.sales().last().unwrap().record.clone();
    assert_eq!(rec.overdraft.get(&sku("hotdog")), Some(&50));
    assert!(rec.offline);
    // Online it is strict again.
    assert!(matches!(
        t.sell(sale_req("hotdog", 1, true), 2_001),
        SaleOutcome::Refused { .. }
    ));
    // The cap follows the last known available: 70 left, 35 each, rights -20.
    assert_eq!(t.sellable_now(&sku("hotdog"), false), 15);
    // Shrink at the pool drives the item below LOW_STOCK (10): offline sales of it stop.
    let shrink = st
        .pool
        .adjust(BTreeMap::from([(sku("hotdog"), 65)]), "spoiled", 2_002)
        .unwrap();
    let t = &mut st.terminals[0];
    t.apply_remote(vec![shrink], 2_003);
    assert_eq!(t.status(&sku("hotdog")), StockStatus::Low);
    assert_eq!(
        t.sell(sale_req("hotdog", 1, false), 2_004),
        SaleOutcome::Refused {
            reason: Refusal::LockedLowStock { sku: sku("hotdog") }
        }
    );
    // Within its own rights a terminal still sells a LOW_STOCK item offline.
    let mut known: Vec<SignedChange> = st.pool.all_changes().collect();
    known.extend(st.terminals[0].all_changes());
    let other = &mut st.terminals[1];
    other.apply_remote(known, 2_003);
    assert_eq!(other.status(&sku("hotdog")), StockStatus::Low);
    assert_eq!(other.sellable_now(&sku("hotdog"), false), 10);
    let SaleOutcome::Committed { change: within, .. } =
        other.sell(sale_req("hotdog", 10, false), 2_004)
    else {
        panic!("a sale within own rights is refused offline")
    };
    assert!(other.sales().last().unwrap().record.overdraft.is_empty());
    assert!(matches!(
        other.sell(sale_req("hotdog", 1, false), 2_004),
        SaleOutcome::Refused {
            reason: Refusal::LockedLowStock { .. }
        }
    ));
    let t = &st.terminals[0];
    let mut all: Vec<SignedChange> = t.all_changes().collect();
    all.push(within);
    assert!(st.pool.apply_remote(all, 2_005).rejected.is_empty());
}

#[test]
fn reclaim_remints_rights_and_late_sales_show_as_oversell() {
    let mut st = stand(Policy::Strict, 2, 20, 10);
    let dead = st.terminals[1].me();
    // The "dead" terminal sells offline before the reclaim reaches it.
    let SaleOutcome::Committed { change: late, .. } =
        st.terminals[1].sell(sale_req("hotdog", 10, false), 2_000)
    else {
        panic!()
    };
    let rc = st.pool.reclaim(dead, 2_100).unwrap();
    assert!(st.pool.is_retired(dead));
    assert_eq!(
        st.pool.rights(st.pool.me(), &sku("hotdog")),
        10,
        "took its 10 back to the pool"
    );
    assert_eq!(st.pool.rights(dead, &sku("hotdog")), 0);
    assert_eq!(
        st.pool.available(&sku("hotdog")),
        20,
        "reclaim moves rights, not stock"
    );
    // The pool sells on the reclaimed rights (through another terminal)...
    let give = st
        .pool
        .give(
            st.terminals[0].me(),
            BTreeMap::from([(sku("hotdog"), 10)]),
            2_150,
        )
        .unwrap();
    st.terminals[0].apply_remote(vec![rc.clone(), give], 2_150);
    let SaleOutcome::Committed { change: sold, .. } =
        st.terminals[0].sell(sale_req("hotdog", 20, true), 2_160)
    else {
        panic!()
    };
    st.pool.apply_remote(vec![sold], 2_170);
    assert_eq!(st.pool.available(&sku("hotdog")), 0);
    // ...and the dead terminal's sale, made before it learned of the retirement, is still
    // accepted (real money was taken): it shows as oversell for the reconciler.
    let r = st.pool.apply_remote(vec![late], 2_200);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(
        st.pool.available(&sku("hotdog")),
        -10,
        "20 in stock, 30 sold"
    );
    // Once it knows it is retired it cannot sell.
    st.terminals[1].apply_remote(vec![rc], 2_300);
    assert_eq!(
        st.terminals[1].sell(sale_req("hotdog", 1, false), 2_400),
        SaleOutcome::Refused {
            reason: Refusal::Retired
        }
    );
}

#[test]
fn restore_takes_a_large_store_in_any_order() {
    // More changes of one author than its pending quota holds, in store order and reversed.
    let mut st = stand(Policy::Strict, 1, 10_000, 9_000);
    let t = &mut st.terminals[0];
    for i in 0..7_000u64 {
        let SaleOutcome::Committed { .. } = t.sell(sale_req("hotdog", 1, true), 2_000 + i) else {
            panic!("sale {i}")
        };
    }
    let stored: Vec<SignedChange> = t.all_changes().collect();
    for order in ["stored", "reversed"] {
        let mut changes = stored.clone();
        if order == "reversed" {
            changes.reverse();
        }
        let (back, rep) = Ledger::restore(
            key(10),
            StandId::new("north").unwrap(),
            key(1).public(),
            changes,
            1_000,
        );
        assert!(rep.rejected.is_empty(), "{order}: {:?}", rep.rejected);
        assert_eq!(
            back.len(),
            stored.len(),
            "{order}: every stored change is back"
        );
        assert_eq!(back.pending_len(), 0, "{order}");
        assert_eq!(back.heads(), t.heads(), "{order}");
    }
    // The replay of its own store skips signature checks; what arrives afterwards does not.
    let (mut back, _) = Ledger::restore(
        key(10),
        StandId::new("north").unwrap(),
        key(1).public(),
        stored,
        1_000,
    );
    let SaleOutcome::Committed { mut change, .. } =
        st.terminals[0].sell(sale_req("hotdog", 1, true), 20_000)
    else {
        panic!()
    };
    change.signature[3] ^= 1;
    let r = back.apply_remote(vec![change], 20_000);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].rule(), "bad_signature");
}

#[test]
fn a_live_reclaim_is_refused_while_a_reachable_replica_knows_more() {
    let mut st = stand(Policy::Strict, 2, 100, 20);
    let dead = st.terminals[1].me();
    // The dead terminal sold twice; the pool heard of the first sale only, terminal 0 of both.
    let mut sold = Vec::new();
    for at in [2_000, 2_001] {
        let SaleOutcome::Committed { change, .. } =
            st.terminals[1].sell(sale_req("hotdog", 5, true), at)
        else {
            panic!()
        };
        sold.push(change);
    }
    st.pool.apply_remote(vec![sold[0].clone()], 2_010);
    st.terminals[0].apply_remote(sold.clone(), 2_010);
    let known = vec![st.terminals[0].version_vector()];
    assert_eq!(
        st.pool.reclaim_checked(dead, &known, 2_020).unwrap_err(),
        OpError::Refused(Refusal::PoolBehind {
            replica: dead,
            have: 1,
            known: 2
        })
    );
    assert!(!st.pool.is_retired(dead), "nothing written");
    // Once synced it moves what the terminal held at its last sale: 20 − 10.
    st.pool.apply_remote(vec![sold[1].clone()], 2_030);
    let (_, view) = st.pool.reclaim_checked(dead, &known, 2_040).unwrap();
    assert_eq!(view.last_seq, 2);
    assert_eq!(view.rights[&sku("hotdog")], 10);
    assert_eq!(view.last_change_at.map(|t| t.wall_ms()), Some(2_001));
    assert_eq!(st.pool.rights(dead, &sku("hotdog")), 0);
    assert!(st.pool.is_retired(dead));
}

#[test]
fn each_sellers_sales_are_numbered_alike_on_every_replica() {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let mut changes = Vec::new();
    for (t, n) in [(0usize, 3u64), (1, 2)] {
        for i in 0..n {
            if let SaleOutcome::Committed { change, .. } =
                st.terminals[t].sell(sale_req("hotdog", 1, true), 3_000 + i)
            {
                changes.push(change);
            }
        }
    }
    // A give between sales takes a sequence number but no order number.
    let to = st.terminals[1].me();
    changes.push(
        st.terminals[0]
            .give(to, BTreeMap::from([(sku("soda"), 1)]), 3_100)
            .unwrap(),
    );
    if let SaleOutcome::Committed { change, .. } =
        st.terminals[0].sell(sale_req("hotdog", 1, true), 3_200)
    {
        changes.push(change);
    }
    changes.reverse();
    let r = st.pool.apply_remote(changes, 4_000);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    let ordinals = |l: &Ledger, who: ReplicaId| -> Vec<(u64, u32)> {
        l.sales()
            .iter()
            .filter(|e| e.record.id.replica == who)
            .map(|e| (e.record.id.seq, e.ordinal))
            .collect()
    };
    let t0 = st.terminals[0].me();
    assert_eq!(
        ordinals(&st.pool, t0)
            .iter()
            .map(|(_, o)| *o)
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(ordinals(&st.pool, t0), ordinals(&st.terminals[0], t0));
    assert_eq!(
        ordinals(&st.pool, to)
            .iter()
            .map(|(_, o)| *o)
            .collect::<Vec<_>>(),
        [1, 2]
    );
}

#[test]
fn replica_ids_are_hex_in_json_and_raw_bytes_on_the_wire() {
    let r = key(10).replica_id();
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        format!("\"{r}\""),
        "16 hex digits for people"
    );
    let bin = postcard::to_stdvec(&r).unwrap();
    assert_eq!(bin, r.bytes(), "8 raw bytes on the wire");
    assert_eq!(postcard::from_bytes::<ReplicaId>(&bin).unwrap(), r);
    assert_eq!(
        serde_json::from_str::<ReplicaId>(&format!("\"{r}\"")).unwrap(),
        r
    );
    assert!(serde_json::from_str::<ReplicaId>("\"zz\"").is_err());
    // A vector keyed by replica: one frame entry is 8 bytes of id and a varint.
    let v = VersionVector::from([(r, 5)]);
    assert_eq!(postcard::to_stdvec(&v).unwrap().len(), 1 + 8 + 1);
}
