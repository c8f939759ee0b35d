#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Marking an item unavailable ("86") and back: each replica writes its own mark, the latest by
//! hybrid logical clock wins everywhere, whatever order the marks arrive in.

mod common;
use common::*;
use halftime_ledger::*;

fn all_agree(st: &mut Stand, off: bool) {
    let hd = sku("hotdog");
    assert_eq!(st.pool.is_marked_off(&hd), off, "pool");
    for (i, t) in st.terminals.iter_mut().enumerate() {
        assert_eq!(t.is_marked_off(&hd), off, "terminal {i}");
        assert_eq!(t.counters_in_document(), t.counters_from_state());
    }
    assert!(!st.pool.is_marked_off(&sku("soda")), "only the marked item");
}

fn deliver(to: &mut Ledger, changes: &[SignedChange], now: u64) {
    let r = to.apply_remote(changes.to_vec(), now);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
}

#[test]
fn the_latest_mark_of_any_replica_wins_in_any_order() {
    let hd = sku("hotdog");
    let mut st = stand(Policy::Strict, 2, 100, 10);
    // Terminal 0 marks the item off; everyone learns it.
    let off = st.terminals[0].mark(&hd, false, 3_000).unwrap();
    deliver(&mut st.pool, std::slice::from_ref(&off), 3_000);
    deliver(&mut st.terminals[1], std::slice::from_ref(&off), 3_000);
    all_agree(&mut st, true);
    // Concurrently, terminal 1 brings it back at 5 s and the pool marks it off at 4 s: the
    // later mark (back on) wins on every replica, whichever arrives first.
    let on = st.terminals[1].mark(&hd, true, 5_000).unwrap();
    let off2 = st.pool.mark(&hd, false, 4_000).unwrap();
    deliver(&mut st.pool, std::slice::from_ref(&on), 5_000);
    deliver(&mut st.terminals[1], std::slice::from_ref(&off2), 5_000);
    deliver(&mut st.terminals[0], &[off2.clone(), on.clone()], 5_000);
    all_agree(&mut st, false);
    // Terminal 0, whose clock is behind, marks it off again: its clock has seen 5 s, so its
    // mark is later still and wins.
    let off3 = st.terminals[0].mark(&hd, false, 2_000).unwrap();
    deliver(&mut st.pool, std::slice::from_ref(&off3), 5_000);
    deliver(&mut st.terminals[1], std::slice::from_ref(&off3), 5_000);
    all_agree(&mut st, true);
    // Marks carry over an epoch rollover with the counters.
    for i in 0..(layout::ROLLOVER_WRITES as u64 + 5) {
        let SaleOutcome::Committed { change, .. } =
            st.terminals[0].sell(sale_req("soda", 1, true), 6_000 + i)
        else {
            break;
        };
        deliver(&mut st.pool, &[change], 7_000);
    }
    all_agree(&mut st, true);
}

#[test]
fn the_kitchen_marks_items_but_writes_nothing_else() {
    let hd = sku("hotdog");
    let mut st = stand(Policy::Strict, 1, 100, 10);
    let enrol = st
        .pool
        .enrol(key(40).public(), "kitchen", Role::Kitchen, 2_000)
        .unwrap();
    deliver(&mut st.terminals[0], std::slice::from_ref(&enrol), 2_000);
    let mut kitchen = Ledger::join(key(40), StandId::new("north").unwrap(), key(1).public());
    let mut history = st.setup.clone();
    history.push(enrol);
    deliver(&mut kitchen, &history, 2_000);
    let off = kitchen.mark(&hd, false, 3_000).unwrap();
    deliver(&mut st.pool, std::slice::from_ref(&off), 3_000);
    deliver(&mut st.terminals[0], std::slice::from_ref(&off), 3_000);
    all_agree(&mut st, true);
    assert!(matches!(
        kitchen.sell(sale_req("hotdog", 1, true), 3_000),
        SaleOutcome::Refused { .. }
    ));
    assert!(kitchen.mark(&sku("caviar"), false, 3_000).is_err());
}
