#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Received changes reach the Automerge document in batches; nothing that reads or writes the
//! document can tell: heads, reads of the document, point-in-time stock and a change of our
//! own all see every accepted change.

mod common;
use common::*;
use halftime_ledger::*;

fn hash(c: &SignedChange) -> ChangeHash {
    ChangeHash(change_hash(&c.bytes).unwrap())
}

fn sell(t: &mut Ledger, item: &str, at: u64) -> SignedChange {
    match t.sell(sale_req(item, 1, true), at) {
        SaleOutcome::Committed { change, .. } => change,
        SaleOutcome::Refused { reason } => panic!("{reason}"),
    }
}

#[test]
fn changes_waiting_for_the_document_are_seen_by_every_reader_and_built_on() {
    let mut st = stand(Policy::Strict, 2, 1_000, 400);
    let mut sales = Vec::new();
    for i in 0..5 {
        let c = sell(&mut st.terminals[0], "hotdog", 3_000 + i);
        let r = st.terminals[1].apply_remote(vec![c.clone()], 3_000 + i);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        sales.push(c);
    }
    let t = &mut st.terminals[1];
    let last = hash(&sales[4]);
    // The heads move on as each change is accepted, before the document has it.
    assert_eq!(t.heads(), vec![last]);
    let stock = t.stock_at_time(Hlc::at_wall(3_010));
    assert_eq!(stock[&sku("hotdog")], 995);
    // A read at past heads, not the current ones.
    let stock = t.stock_at_time(Hlc::at_wall(3_002));
    assert_eq!(stock[&sku("hotdog")], 997);
    assert_eq!(t.counters_in_document(), t.counters_from_state());
    assert_eq!(t.doc().get_heads(), vec![last]);

    // A change of our own depends on everything accepted, received or not yet in the document.
    let c = sell(&mut st.terminals[0], "soda", 3_010);
    let t = &mut st.terminals[1];
    t.apply_remote(vec![c.clone()], 3_010);
    let own = sell(t, "soda", 3_020);
    let change = automerge::Change::try_from(&own.bytes[..]).unwrap();
    assert_eq!(change.deps(), &[hash(&c)]);
    assert_eq!(t.heads(), vec![hash(&own)]);

    // The replica that receives both agrees.
    let pool = &mut st.pool;
    let mut all = sales.clone();
    all.extend([c, own.clone()]);
    let r = pool.apply_remote(all, 3_030);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(pool.heads(), vec![hash(&own)]);
    assert_eq!(pool.counters_in_document(), pool.counters_from_state());
}

#[test]
fn a_snapshot_taken_while_changes_wait_holds_them() {
    let mut st = stand(Policy::Strict, 2, 1_000, 400);
    let c = sell(&mut st.terminals[0], "hotdog", 3_000);
    let t = &mut st.terminals[1];
    t.apply_remote(vec![c.clone()], 3_000);
    let snap = t.snapshot();
    let stored: Vec<SignedChange> = t.all_changes().collect();
    let north = StandId::new("north").unwrap();
    let (loaded, _, _) =
        Ledger::from_snapshot(key(11), north, key(1).public(), &snap, stored, 4_000).unwrap();
    assert_eq!(loaded.heads(), vec![hash(&c)]);
    assert_eq!(loaded.counters_from_state(), t.counters_from_state());
}

/// Keeps nothing it can be asked for again: a store that is not always readable.
#[derive(Debug)]
struct Forgetful;

impl ChangeBytes for Forgetful {
    fn keep(&mut self, _: ChangeHash, _: &SignedChange) {}
    fn get(&self, _: &ChangeHash) -> Option<SignedChange> {
        None
    }
    fn count(&self) -> Option<usize> {
        None
    }
}

#[test]
fn a_deferred_document_is_built_from_the_held_bytes_when_read() {
    let mut st = stand(Policy::Strict, 2, 1_000, 400);
    assert!(st.terminals[1].defer_document());
    // Past a rollover of the terminal's own epoch maps, with received changes in between.
    let mut received = Vec::new();
    for i in 0..300u64 {
        let at = 3_000 + 10 * i;
        let c = sell(&mut st.terminals[0], "hotdog", at);
        let t = &mut st.terminals[1];
        let r = t.apply_remote(vec![c.clone()], at);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        received.push(c);
        if i % 2 == 0 {
            received.push(sell(t, "soda", at + 1));
        }
    }
    let t = &mut st.terminals[1];
    assert_eq!(t.counters_in_document(), t.counters_from_state());
    let heads = t.heads();
    assert_eq!(t.doc().get_heads(), heads);
    // Its own changes, written by hand beside a lagging document, are what Automerge and
    // another replica take.
    let pool = &mut st.pool;
    let r = pool.apply_remote(received, 7_000);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(pool.heads(), heads);
    assert_eq!(pool.counters_in_document(), pool.counters_from_state());
    assert_eq!(pool.counters_from_state(), t.counters_from_state());

    let snap = t.snapshot();
    let stored: Vec<SignedChange> = t.all_changes().collect();
    let north = StandId::new("north").unwrap();
    let (mut loaded, _, _) =
        Ledger::from_snapshot(key(11), north, key(1).public(), &snap, stored, 8_000).unwrap();
    assert_eq!(loaded.heads(), heads);
    assert_eq!(loaded.counters_in_document(), t.counters_from_state());

    // Only where the bytes can always be read back.
    let north = StandId::new("north").unwrap();
    let (mut other, _) = Ledger::restore_with(
        key(10),
        north,
        key(1).public(),
        Vec::new(),
        Box::new(Forgetful),
        8_000,
    );
    assert!(!other.defer_document());
}
