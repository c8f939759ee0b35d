#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Snapshots: a replica loaded from its snapshot plus the tail of its store is the replica that
//! wrote it; a damaged or foreign snapshot is refused with the reason, and the full replay
//! still works from the same store.

mod common;
use common::*;
use halftime_ledger::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

fn north() -> StandId {
    StandId::new("north").unwrap()
}

/// A terminal that has sold `n` hot dogs and received the other terminal's sales.
fn busy_terminal(n: u64) -> (Stand, Ledger) {
    let mut st = stand(Policy::Strict, 2, 1_000, 400);
    let mut other = st.terminals.remove(1);
    let mut t = st.terminals.remove(0);
    for i in 0..n {
        let SaleOutcome::Committed { .. } = t.sell(sale_req("hotdog", 1, true), 3_000 + i) else {
            panic!()
        };
        if i % 3 == 0 {
            let SaleOutcome::Committed { change, .. } =
                other.sell(sale_req("soda", 1, true), 3_000 + i)
            else {
                panic!()
            };
            let r = t.apply_remote(vec![change], 3_000 + i);
            assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        }
    }
    st.terminals.push(other);
    (st, t)
}

fn stored(l: &Ledger) -> Vec<SignedChange> {
    l.all_changes().collect()
}

fn same(a: &Ledger, b: &Ledger) {
    assert_eq!(a.counters_from_state(), b.counters_from_state());
    assert_eq!(a.version_vector(), b.version_vector());
    assert_eq!(a.local_seq(), b.local_seq());
    // In the order each learned of them, which follows the order the store gave.
    let sorted = |l: &Ledger| {
        let mut v = l.sales().to_vec();
        v.sort_by_key(|e| e.record.id);
        v
    };
    assert_eq!(sorted(a), sorted(b));
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.clock(), b.clock());
    for s in SKUS {
        assert_eq!(a.available(&sku(s)), b.available(&sku(s)));
        assert_eq!(a.rights(a.me(), &sku(s)), b.rights(b.me(), &sku(s)));
    }
}

#[test]
fn the_hash_read_from_the_bytes_is_automerges() {
    let (_, t) = busy_terminal(5);
    for c in t.all_changes() {
        let parsed = automerge::Change::try_from(&c.bytes[..]).unwrap();
        assert_eq!(change_hash(&c.bytes), Some(parsed.hash().0));
    }
    assert_eq!(change_hash(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0]), None);
}

#[test]
fn a_replica_loaded_from_its_snapshot_and_tail_is_the_replica_that_wrote_it() {
    let (mut st, mut t) = busy_terminal(60);
    let snap = t.snapshot();
    // The tail: more own sales and received ones after the snapshot.
    for i in 0..20 {
        let SaleOutcome::Committed { .. } = t.sell(sale_req("fries", 1, true), 9_000 + i) else {
            panic!()
        };
        let SaleOutcome::Committed { change, .. } =
            st.terminals[0].sell(sale_req("soda", 1, true), 9_000 + i)
        else {
            panic!()
        };
        t.apply_remote(vec![change], 9_000 + i);
    }
    // The store holds the changes in any order.
    let mut changes = stored(&t);
    changes.reverse();
    let (mut back, report, load) =
        Ledger::from_snapshot(key(10), north(), key(1).public(), &snap, changes, 10_000).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(load.replayed, 40);
    assert_eq!(load.covered + load.replayed, t.len());
    same(&back, &t);

    // It carries on where the writer would: the next sale has the next number, and another
    // replica takes it.
    let SaleOutcome::Committed { sale_id, change } = back.sell(sale_req("hotdog", 1, true), 11_000)
    else {
        panic!()
    };
    assert_eq!(sale_id.seq, t.local_seq() + 1);
    let r = st.pool.apply_remote(stored(&back), 11_001);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert!(r.accepted.contains(&change) || st.pool.all_changes().any(|c| c == change));

    // A snapshot of the loaded replica loads again to the same replica.
    let again = back.snapshot();
    let (twice, _, load) = Ledger::from_snapshot(
        key(10),
        north(),
        key(1).public(),
        &again,
        stored(&back),
        11_002,
    )
    .unwrap();
    assert_eq!(load.replayed, 0);
    same(&twice, &back);
}

#[test]
fn a_damaged_snapshot_is_refused_and_the_full_replay_still_works() {
    let (_, mut t) = busy_terminal(30);
    let snap = t.snapshot();
    let load = |bytes: &[u8], changes: Vec<SignedChange>| {
        Ledger::from_snapshot(key(10), north(), key(1).public(), bytes, changes, 10_000)
            .map(|(l, _, _)| l)
    };

    // One byte flipped anywhere in the body.
    for at in [40, snap.len() / 3, snap.len() / 2, snap.len() - 1] {
        let mut bad = snap.clone();
        bad[at] ^= 0x01;
        assert_eq!(load(&bad, stored(&t)).unwrap_err(), SnapshotError::Checksum);
    }
    // Cut short, empty, or another file altogether.
    assert_eq!(
        load(&snap[..snap.len() - 10], stored(&t)).unwrap_err(),
        SnapshotError::Checksum
    );
    assert_eq!(
        load(&[], stored(&t)).unwrap_err(),
        SnapshotError::NotASnapshot
    );
    assert_eq!(
        load(b"HTSNAP99rest", stored(&t)).unwrap_err(),
        SnapshotError::NotASnapshot
    );
    // Well summed, but not a snapshot: a document length past the end, a body that does not
    // decode, a document that does not load. And the format before the document came apart.
    use sha2::Digest as _;
    let summed = |magic: &[u8], rest: &[u8]| {
        let mut f = magic.to_vec();
        f.extend_from_slice(&sha2::Sha256::digest(rest));
        f.extend_from_slice(rest);
        f
    };
    let junk = vec![0xffu8; 64];
    let mut no_body = 0u64.to_le_bytes().to_vec();
    no_body.extend_from_slice(&junk);
    for forged in [summed(b"HTSNAP03", &junk), summed(b"HTSNAP03", &no_body)] {
        assert!(matches!(
            load(&forged, stored(&t)).unwrap_err(),
            SnapshotError::Decode(_)
        ));
    }
    let doc_len = u64::from_le_bytes(snap[40..48].try_into().unwrap()) as usize;
    let mut bad_doc = snap[40..].to_vec();
    bad_doc[8 + doc_len / 2] ^= 0x01;
    assert!(matches!(
        load(&summed(b"HTSNAP03", &bad_doc), stored(&t)).unwrap_err(),
        SnapshotError::Document(_)
    ));
    assert_eq!(
        load(&summed(b"HTSNAP02", &junk), stored(&t)).unwrap_err(),
        SnapshotError::NotASnapshot
    );
    // A change the snapshot covers is gone from the store.
    let mut short = stored(&t);
    short.remove(short.len() / 2);
    assert_eq!(
        load(&snap, short).unwrap_err(),
        SnapshotError::Missing { missing: 1 }
    );
    // Another replica's snapshot.
    assert!(matches!(
        Ledger::from_snapshot(key(11), north(), key(1).public(), &snap, stored(&t), 10_000)
            .unwrap_err(),
        SnapshotError::Foreign { .. }
    ));

    // The full replay needs only the store.
    let (back, report) = Ledger::restore(key(10), north(), key(1).public(), stored(&t), 10_000);
    assert!(report.rejected.is_empty());
    same(&back, &t);
}

/// Bytes kept outside the ledger, as a replica's store keeps them, counting what is read.
#[derive(Debug, Default, Clone)]
struct Outside(Arc<Mutex<(HashMap<ChangeHash, SignedChange>, usize)>>);

impl Outside {
    fn held(&self) -> usize {
        self.0.lock().unwrap().0.len()
    }
    fn reads(&self) -> usize {
        self.0.lock().unwrap().1
    }
}

impl ChangeBytes for Outside {
    fn keep(&mut self, hash: ChangeHash, change: &SignedChange) {
        self.0.lock().unwrap().0.insert(hash, change.clone());
    }
    fn get(&self, hash: &ChangeHash) -> Option<SignedChange> {
        let mut o = self.0.lock().unwrap();
        o.1 += 1;
        o.0.get(hash).cloned()
    }
    fn count(&self) -> Option<usize> {
        Some(self.held())
    }
}

#[test]
fn a_replica_loaded_with_its_bytes_outside_serves_them_from_there() {
    let (_, mut t) = busy_terminal(30);
    let snap = t.snapshot();
    let before = stored(&t);
    for i in 0..5 {
        let SaleOutcome::Committed { .. } = t.sell(sale_req("hotdog", 1, true), 9_000 + i) else {
            panic!()
        };
    }
    let all = stored(&t);
    let tail: Vec<SignedChange> = all
        .iter()
        .filter(|c| !before.contains(c))
        .cloned()
        .collect();
    assert_eq!(tail.len(), 5);
    let hash = |c: &SignedChange| ChangeHash(change_hash(&c.bytes).unwrap());

    let mut outside = Outside::default();
    for c in &before {
        outside.keep(hash(c), c);
    }
    // Only the tail is given; the covered changes are never handed over.
    let (back, report, load) = Ledger::from_snapshot_with(
        key(10),
        north(),
        key(1).public(),
        &snap,
        tail,
        Box::new(outside.clone()),
        10_000,
    )
    .unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!((load.covered, load.replayed), (before.len(), 5));
    same(&back, &t);
    // The replayed tail was kept there too, and a newcomer gets every change, read from
    // outside the ledger.
    assert_eq!(outside.held(), all.len());
    let reads = outside.reads();
    let served = back.changes_since(&VersionVector::new(), usize::MAX);
    assert_eq!(served.len(), all.len());
    assert_eq!(outside.reads(), reads + all.len());
    let mut fresh = Ledger::join(key(12), north(), key(1).public());
    let r = fresh.apply_remote(served, 10_001);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(fresh.version_vector(), t.version_vector());

    // Fewer bytes held than the snapshot covers: refused, so the caller replays everything.
    let mut short = Outside::default();
    for c in &before[1..] {
        short.keep(hash(c), c);
    }
    let err = Ledger::from_snapshot_with(
        key(10),
        north(),
        key(1).public(),
        &snap,
        Vec::new(),
        Box::new(short),
        10_000,
    )
    .unwrap_err();
    assert_eq!(err, SnapshotError::Missing { missing: 1 });
}
