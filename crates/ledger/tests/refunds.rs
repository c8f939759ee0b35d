#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Refunds written into the stand: the store of record's decision reaches every page as a
//! change by the relay (or the pool), moves no stock, and counts the same on every replica.

mod common;
use common::*;
use halftime_ledger::*;
use std::collections::BTreeMap;

/// A stand of two terminals with a relay enrolled; the relay holds the whole history.
fn stand_with_relay(alloc: u64) -> (Stand, Ledger) {
    let mut st = stand(Policy::Strict, 2, 1_000, alloc);
    let enrol = st
        .pool
        .enrol(key(50).public(), "relay", Role::Relay, 1_500)
        .unwrap();
    st.setup.push(enrol.clone());
    for t in &mut st.terminals {
        assert!(
            t.apply_remote(vec![enrol.clone()], 1_500)
                .rejected
                .is_empty()
        );
    }
    let mut relay = Ledger::join(key(50), StandId::new("north").unwrap(), key(1).public());
    let r = relay.apply_remote(st.setup.clone(), 1_500);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    (st, relay)
}

fn deliver(to: &mut Ledger, changes: &[SignedChange], now: u64) {
    let r = to.apply_remote(changes.to_vec(), now);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(r.pending, 0);
}

fn sold(t: &mut Ledger, qty: u64, at: u64) -> (SaleId, SignedChange) {
    match t.sell(sale_req("hotdog", qty, true), at) {
        SaleOutcome::Committed { sale_id, change } => (sale_id, change),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refund_recorded_by_the_relay_shows_everywhere_and_moves_no_stock() {
    let hd = sku("hotdog");
    let (mut st, mut relay) = stand_with_relay(10);
    let (sale, change) = sold(&mut st.terminals[0], 2, 2_000);
    deliver(&mut relay, std::slice::from_ref(&change), 2_000);
    deliver(&mut st.pool, std::slice::from_ref(&change), 2_000);
    let before = st.pool.available(&hd);

    let one = relay.refund(sale, &hd, 1, 3_000).unwrap();
    for r in [&mut st.pool, &mut st.terminals[0]] {
        deliver(r, std::slice::from_ref(&one), 3_000);
    }
    // Terminal 1 gets the refund before the sale: it waits for it, then both apply.
    let r = st.terminals[1].apply_remote(vec![one.clone()], 3_000);
    assert_eq!(r.pending, 1);
    deliver(&mut st.terminals[1], std::slice::from_ref(&change), 3_000);
    let [t0, t1, ..] = &mut st.terminals[..] else {
        unreachable!()
    };
    for l in [&mut st.pool, t0, t1, &mut relay] {
        assert_eq!(l.refunded(sale, &hd), 1);
        assert_eq!(l.refunds(), BTreeMap::from([((sale, hd.clone()), 1)]));
        assert_eq!(l.refunded_lines(sale), BTreeMap::from([(hd.clone(), 1)]));
        assert_eq!(l.available(&hd), before, "a refund moves no stock");
        assert_eq!(l.counters_in_document(), l.counters_from_state());
    }

    // Never more than the line sold, counting what this writer recorded.
    let over = relay.refund(sale, &hd, 2, 3_100).unwrap_err();
    assert!(
        over.to_string().contains("it sold 2, 1 already refunded"),
        "{over}"
    );
    let two = relay.refund(sale, &hd, 1, 3_200).unwrap();
    deliver(&mut st.pool, std::slice::from_ref(&two), 3_200);
    deliver(&mut st.terminals[0], &[two], 3_200);
    assert_eq!(st.pool.refunded(sale, &hd), 2);
    assert!(
        relay.refund(sale, &sku("soda"), 1, 3_300).is_err(),
        "not on the sale"
    );
    let nothing = SaleId {
        replica: key(11).replica_id(),
        seq: 40,
    };
    assert!(matches!(
        relay.refund(nothing, &hd, 1, 3_300),
        Err(OpError::Refused(Refusal::UnknownSale { .. }))
    ));

    // The pool may record one too; a line shows the most any one writer recorded.
    let by_pool = st.pool.refund(sale, &hd, 1, 3_400).unwrap();
    deliver(&mut st.terminals[0], &[by_pool], 3_400);
    assert_eq!(st.pool.refunded(sale, &hd), 2);

    // Terminals and the kitchen do not record refunds; the relay still writes nothing else.
    assert!(matches!(
        st.terminals[0].refund(sale, &hd, 1, 3_500),
        Err(OpError::Refused(Refusal::WrongRole { .. }))
    ));
    assert!(relay.mark(&hd, false, 3_500).is_err());

    // A snapshot keeps them.
    let snap = st.pool.snapshot();
    let stored: Vec<SignedChange> = st.pool.all_changes().collect();
    let (back, report, _) = Ledger::from_snapshot(
        key(1),
        StandId::new("north").unwrap(),
        key(1).public(),
        &snap,
        stored,
        4_000,
    )
    .unwrap();
    assert!(report.rejected.is_empty());
    assert_eq!(back.refunds(), st.pool.refunds());
}

#[test]
fn many_refunds_by_one_writer_roll_its_counter_over_epochs() {
    let hd = sku("hotdog");
    let (mut st, mut relay) = stand_with_relay(100);
    let mut sales = Vec::new();
    for i in 0..(layout::ROLLOVER_WRITES as u64 + 3) {
        let (sale, change) = sold(&mut st.terminals[i as usize % 2], 1, 2_000 + i);
        deliver(&mut relay, std::slice::from_ref(&change), 2_000 + i);
        deliver(&mut st.pool, &[change], 2_000 + i);
        sales.push(sale);
    }
    let mut notes = Vec::new();
    for (i, sale) in sales.iter().enumerate() {
        notes.push(relay.refund(*sale, &hd, 1, 3_000 + i as u64).unwrap());
    }
    deliver(&mut st.pool, &notes, 4_000);
    assert_eq!(st.pool.refunds().len(), sales.len());
    assert_eq!(
        st.pool.counters_in_document(),
        st.pool.counters_from_state()
    );
}
