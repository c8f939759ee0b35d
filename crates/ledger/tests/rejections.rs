#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Each rule of the receive path, broken on purpose: the change is rejected with the named
//! rule and the receiving document is left unchanged.

mod common;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ObjType, ROOT, ReadDoc};
use common::*;
use halftime_ledger::*;
use std::collections::BTreeMap;

/// Build a change by `author` on top of `base`'s document, with any ops and any message.
fn forge(
    base: &Ledger,
    author: &ReplicaKey,
    op: Operation,
    at: u64,
    f: impl FnOnce(&mut automerge::transaction::Transaction<'_>),
) -> SignedChange {
    let mut doc = doc_of(base);
    doc.set_actor(author.public().actor());
    let hlc = Hlc::at_wall(at);
    let msg = ChangeMessage {
        v: 1,
        at: hlc,
        op,
        req: None,
    };
    let mut tx = doc.transaction();
    f(&mut tx);
    tx.commit_with(
        CommitOptions::default()
            .with_message(msg.encode())
            .with_time(hlc.packed() as i64),
    );
    let c = doc.get_last_local_change().unwrap();
    SignedChange {
        bytes: c.raw_bytes().to_vec(),
        signature: author.sign(c.raw_bytes()).to_vec(),
    }
}

fn obj(doc: &impl ReadDoc, path: &[&str]) -> automerge::ObjId {
    let mut o = ROOT;
    for p in path {
        o = doc.get(&o, *p).unwrap().unwrap().1;
    }
    o
}

/// Apply `c` to the pool and check the rule and that nothing changed.
fn assert_rejected(st: &mut Stand, c: SignedChange, rule: &str) {
    let heads = st.pool.heads();
    let before = st.pool.counters_from_state();
    let vv = st.pool.version_vector();
    let r = st.pool.apply_remote(vec![c], 5_000);
    assert!(r.accepted.is_empty(), "accepted a change breaking {rule}");
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert_eq!(r.rejected[0].rule(), rule, "{:?}", r.rejected[0]);
    assert_eq!(st.pool.heads(), heads);
    assert_eq!(st.pool.counters_from_state(), before);
    assert_eq!(st.pool.version_vector(), vv);
    assert_eq!(st.pool.counters_in_document(), before);
}

fn sale_op(t: &Ledger, qty: u64) -> Operation {
    Operation::Sale(SaleRecord {
        id: SaleId {
            replica: t.me(),
            seq: t.local_seq() + 1,
        },
        at: Hlc::at_wall(4_000),
        lines: vec![SaleLine {
            sku: sku("hotdog"),
            qty,
            unit_price_cents: 300,
        }],
        payment: Payment {
            method: PaymentMethod::Cash,
            reference: String::new(),
        },
        offline: false,
        overdraft: BTreeMap::new(),
    })
}

#[test]
fn a_valid_forged_sale_is_accepted() {
    // The control for every test below: the forge helper makes changes the pool accepts.
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let t = &mut st.terminals[0];
    // First a real sale creates the terminal's maps.
    let SaleOutcome::Committed { change, .. } = t.sell(sale_req("hotdog", 1, true), 3_000) else {
        panic!()
    };
    assert_eq!(st.pool.apply_remote(vec![change], 3_000).accepted.len(), 1);
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let c = forge(t, &key(10), sale_op(t, 2), 4_000, |tx| {
        let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
        tx.put(&e, "out", 3u64).unwrap();
    });
    let r = st.pool.apply_remote(vec![c], 5_000);
    assert_eq!(r.accepted.len(), 1, "{:?}", r.rejected);
    assert_eq!(st.pool.rights(key(10).replica_id(), &sku("hotdog")), 7);
}

fn stand_with_sale() -> Stand {
    let mut st = stand(Policy::Strict, 2, 100, 10);
    let SaleOutcome::Committed { change, .. } =
        st.terminals[0].sell(sale_req("hotdog", 1, true), 3_000)
    else {
        panic!()
    };
    assert_eq!(st.pool.apply_remote(vec![change], 3_000).accepted.len(), 1);
    st
}

#[test]
fn forged_signature_is_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let mut c = forge(t, &key(10), sale_op(t, 1), 4_000, |tx| {
        let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
        tx.put(&e, "out", 2u64).unwrap();
    });
    c.signature = key(11).sign(&c.bytes).to_vec();
    assert_rejected(&mut st, c, "bad_signature");
}

#[test]
fn unregistered_actor_waits_then_is_never_applied() {
    let mut st = stand_with_sale();
    let stranger = key(99);
    let c = forge(
        &st.pool,
        &stranger,
        Operation::Restock {
            units: BTreeMap::new(),
            note: String::new(),
        },
        4_000,
        |tx| {
            let s = obj(tx, &["stock"]);
            tx.put_object(&s, stranger.replica_id().to_string(), ObjType::Map)
                .unwrap();
        },
    );
    let heads = st.pool.heads();
    let r = st.pool.apply_remote(vec![c], 5_000);
    assert!(r.accepted.is_empty());
    assert_eq!(
        r.pending, 1,
        "an unknown actor's change waits for its enrolment"
    );
    assert_eq!(st.pool.heads(), heads);
}

#[test]
fn write_to_another_replicas_key_is_rejected() {
    let mut st = stand_with_sale();
    let victim = st.terminals[0].me().to_string();
    let t = &st.terminals[1];
    // Terminal 1 raises terminal 0's `out` (would strand its stock).
    let c = forge(
        &st.terminals[0],
        &key(11),
        Operation::Adjust {
            units: BTreeMap::new(),
            reason: "x".into(),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &victim, "hotdog", "00000000"]);
            tx.put(&e, "out", 9u64).unwrap();
        },
    );
    let _ = t;
    assert_rejected(&mut st, c, "foreign_pred");
    // Without a pred (a fresh key in the victim's map) it is a plain ownership violation.
    let c = forge(
        &st.terminals[0],
        &key(11),
        Operation::Adjust {
            units: BTreeMap::new(),
            reason: "x".into(),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &victim, "hotdog", "00000000"]);
            tx.put(&e, "in", 9u64).unwrap();
        },
    );
    assert_rejected(&mut st, c, "not_owner");
}

#[test]
fn own_key_with_a_foreign_pred_is_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    // /stock/<me> was created by the pool; overwriting it would delete the pool's op.
    let c = forge(t, &key(10), sale_op(t, 1), 4_000, |tx| {
        let s = obj(tx, &["stock"]);
        tx.put_object(&s, me.as_str(), ObjType::Map).unwrap();
    });
    assert_rejected(&mut st, c, "foreign_pred");
}

#[test]
fn shrinking_value_is_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let c = forge(
        t,
        &key(10),
        Operation::Adjust {
            units: BTreeMap::new(),
            reason: "x".into(),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
            tx.put(&e, "out", 0u64).unwrap();
        },
    );
    assert_rejected(&mut st, c, "shrinking");
}

#[test]
fn minting_by_void_is_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let sale = t.sales()[0].record.id;
    // Void the 1-unit sale but raise `in` by 5.
    let c = forge(
        t,
        &key(10),
        Operation::Void {
            sale,
            units: BTreeMap::from([(sku("hotdog"), 5)]),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
            tx.put(&e, "in", 5u64).unwrap();
        },
    );
    let rej = st.pool.apply_remote(vec![c.clone()], 5_000).rejected;
    assert_eq!(rej.len(), 1);
    assert!(
        matches!(rej[0].rule(), "invalid_operation" | "minting"),
        "{:?}",
        rej[0]
    );
    // With a message that matches the ops, the rule that catches it is `in` above `out`.
    let t = &st.terminals[0];
    let c = forge(
        t,
        &key(10),
        Operation::Void {
            sale,
            units: BTreeMap::from([(sku("hotdog"), 1)]),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
            tx.put(&e, "in", 1u64).unwrap();
            tx.put(&e, "in", 2u64).unwrap();
        },
    );
    let r = st.pool.apply_remote(vec![c], 5_000);
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert!(
        matches!(r.rejected[0].rule(), "message_mismatch" | "minting"),
        "{:?}",
        r.rejected[0]
    );
}

#[test]
fn sale_message_that_lies_about_its_ops_is_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    // The message says 1 unit, the ops take 5.
    let c = forge(t, &key(10), sale_op(t, 1), 4_000, |tx| {
        let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
        tx.put(&e, "out", 6u64).unwrap();
    });
    assert_rejected(&mut st, c, "message_mismatch");
}

#[test]
fn pool_only_write_by_a_terminal_is_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let c = forge(
        t,
        &key(10),
        Operation::Catalog { items: vec![] },
        4_000,
        |tx| {
            let e = obj(tx, &["catalog", "hotdog"]);
            tx.put(&e, "price_cents", 1u64).unwrap();
        },
    );
    assert_rejected(&mut st, c, "pool_only");
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let c = forge(
        t,
        &key(10),
        Operation::Restock {
            units: BTreeMap::from([(sku("hotdog"), 50)]),
            note: String::new(),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
            tx.put(&e, "in", 50u64).unwrap();
        },
    );
    assert_rejected(&mut st, c, "pool_only");
}

#[test]
fn selling_beyond_rights_is_rejected_under_strict() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let c = forge(t, &key(10), sale_op(t, 20), 4_000, |tx| {
        let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
        tx.put(&e, "out", 21u64).unwrap();
    });
    assert_rejected(&mut st, c, "below_floor");
}

#[test]
fn malformed_bytes_are_rejected() {
    let mut st = stand_with_sale();
    let c = SignedChange {
        bytes: vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
        signature: vec![0; 64],
    };
    assert_rejected(&mut st, c, "malformed");
    let c = SignedChange {
        bytes: vec![],
        signature: vec![],
    };
    assert_rejected(&mut st, c, "malformed");
}

#[test]
fn dependants_of_a_rejected_change_are_rejected() {
    let mut st = stand_with_sale();
    let t = &st.terminals[0];
    let me = t.me().to_string();
    let bad = forge(t, &key(10), sale_op(t, 1), 4_000, |tx| {
        let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
        tx.put(&e, "out", 7u64).unwrap();
    });
    // A second change built on top of the bad one.
    let mut doc = doc_of(&st.terminals[0]);
    doc.set_actor(key(10).public().actor());
    doc.apply_changes(vec![automerge::Change::try_from(&bad.bytes[..]).unwrap()])
        .unwrap();
    let hlc = Hlc::at_wall(4_500);
    let msg = ChangeMessage {
        v: 1,
        req: None,
        at: hlc,
        op: Operation::Adjust {
            units: BTreeMap::new(),
            reason: "x".into(),
        },
    };
    let mut tx = doc.transaction();
    let e = obj(&tx, &["stock", &me, "hotdog", "00000000"]);
    tx.put(&e, "out", 8u64).unwrap();
    tx.commit_with(
        CommitOptions::default()
            .with_message(msg.encode())
            .with_time(hlc.packed() as i64),
    );
    let c = doc.get_last_local_change().unwrap();
    let next = SignedChange {
        bytes: c.raw_bytes().to_vec(),
        signature: key(10).sign(c.raw_bytes()).to_vec(),
    };
    let heads = st.pool.heads();
    let r = st
        .pool
        .apply_remote(vec![next.clone(), bad.clone(), bad], 5_000);
    let rules: Vec<&str> = r.rejected.iter().map(|x| x.rule()).collect();
    assert_eq!(rules, vec!["message_mismatch", "depends_on_rejected"]);
    assert_eq!(r.duplicates, 1);
    assert_eq!(r.pending, 0);
    assert_eq!(st.pool.heads(), heads);
    // Arriving again later, it is dropped at once.
    assert_eq!(st.pool.apply_remote(vec![next], 6_000).duplicates, 1);
}

#[test]
fn the_pool_cannot_write_off_stock_it_has_allocated() {
    // 100 in, 10 given to each of 2 terminals: the pool holds 80.
    let mut st = stand(Policy::Strict, 2, 100, 10);
    assert!(matches!(
        st.pool
            .adjust(BTreeMap::from([(sku("hotdog"), 81)]), "spoiled", 3_000),
        Err(OpError::Refused(Refusal::InsufficientRights {
            have: 80,
            want: 81,
            ..
        }))
    ));
    let ok = st
        .pool
        .adjust(BTreeMap::from([(sku("hotdog"), 80)]), "spoiled", 3_000)
        .unwrap();
    assert!(
        st.terminals[0]
            .apply_remote(vec![ok], 3_000)
            .rejected
            .is_empty()
    );
    // A forged pool change writing off allocated stock is rejected by every receiver.
    let pool_key = key(1);
    let p = st.pool.me().to_string();
    let c = forge(
        &st.pool,
        &pool_key,
        Operation::Adjust {
            units: BTreeMap::from([(sku("hotdog"), 5)]),
            reason: "x".into(),
        },
        4_000,
        |tx| {
            let e = obj(tx, &["stock", &p, "hotdog", "00000000"]);
            tx.put(&e, "out", 85u64).unwrap();
        },
    );
    let r = st.terminals[0].apply_remote(vec![c], 5_000);
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert_eq!(r.rejected[0].rule(), "below_floor");
}

fn mark_op(available: bool) -> Operation {
    Operation::Mark {
        sku: sku("hotdog"),
        available,
    }
}

#[test]
fn a_mark_holds_its_own_time_and_only_what_its_message_says() {
    let at = Hlc::at_wall(4_000).packed();
    let mut st = stand_with_sale();
    let me = st.terminals[0].me().to_string();
    let put = |field: &'static str, v: u64| {
        let me = me.clone();
        move |tx: &mut automerge::transaction::Transaction<'_>| {
            let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
            tx.put(&e, field, v).unwrap();
        }
    };
    let t = &st.terminals[0];
    // A mark dated after its own change would win every later mark.
    let ahead = forge(t, &key(10), mark_op(false), 4_000, put("off_at", at + 1));
    // The message says "unavailable" but the ops bring the item back.
    let swapped = forge(t, &key(10), mark_op(false), 4_000, put("on_at", at));
    // A sale that also marks the item off.
    let sneaky = forge(t, &key(10), sale_op(t, 1), 4_000, |tx| {
        let e = obj(tx, &["stock", &me, "hotdog", "00000000"]);
        tx.put(&e, "out", 2u64).unwrap();
        tx.put(&e, "off_at", at).unwrap();
    });
    // A mark of an item the stand does not sell.
    let unknown = forge(
        t,
        &key(10),
        Operation::Mark {
            sku: sku("caviar"),
            available: false,
        },
        4_000,
        put("off_at", at),
    );
    let control = forge(t, &key(10), mark_op(false), 4_000, put("off_at", at));
    assert_rejected(&mut st, ahead, "invalid_operation");
    assert_rejected(&mut st, swapped, "message_mismatch");
    assert_rejected(&mut st, sneaky, "message_mismatch");
    assert_rejected(&mut st, unknown, "invalid_operation");
    assert!(!st.pool.is_marked_off(&sku("hotdog")));
    let r = st.pool.apply_remote(vec![control], 5_000);
    assert_eq!(r.accepted.len(), 1, "{:?}", r.rejected);
    assert!(st.pool.is_marked_off(&sku("hotdog")));
}
