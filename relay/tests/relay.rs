#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The relay in-process, on SQLite and on the machine's Postgres: the store refuses to change
//! history, the uplink admits only members, hostile frames are counted and never stored, and
//! admin calls need a token with a strong enough role.

mod common;
use common::*;
use futures::{SinkExt, StreamExt};
use halftime_ledger::uplink::{self, Handshake, Side};
use halftime_ledger::*;
use halftime_relay::server::{App, router};
use halftime_relay::store::{
    AdminRole, Backend, Batch, ChangeRow, Placement, StandRow, Store, StoreError,
};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

fn north() -> StandId {
    StandId::new("north").unwrap()
}

/// A stand made in memory: the pool (key 1), terminal key 10 with 5 sodas, the relay enrolled.
fn stand(relay: PublicKey) -> (Ledger, Ledger, Vec<SignedChange>) {
    let info = StandInfo {
        event: EventId::new("game").unwrap(),
        venue: "v".into(),
        stand: north(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    };
    let (mut pool, g) = Ledger::create_stand(key(1), info, "pool", 1_000).unwrap();
    let mut setup = vec![g];
    let item = CatalogItem {
        sku: sku("soda"),
        name: "Soda".into(),
        price_cents: 300,
        low_stock_at: 0,
    };
    setup.push(pool.set_catalog(vec![item], 1_000).unwrap());
    setup.push(
        pool.enrol(key(10).public(), "till", Role::Terminal, 1_000)
            .unwrap(),
    );
    setup.push(pool.enrol(relay, "relay", Role::Relay, 1_000).unwrap());
    setup.push(
        pool.restock(BTreeMap::from([(sku("soda"), 20)]), "open", 1_000)
            .unwrap(),
    );
    setup.push(
        pool.give(
            key(10).replica_id(),
            BTreeMap::from([(sku("soda"), 5)]),
            1_000,
        )
        .unwrap(),
    );
    let mut till = Ledger::join(key(10), north(), key(1).public());
    assert!(till.apply_remote(setup.clone(), 1_000).rejected.is_empty());
    (pool, till, setup)
}

/// The till sells `qty` sodas; the sale's id and change.
fn sell_soda(
    till: &mut Ledger,
    qty: u64,
    method: PaymentMethod,
    at: u64,
) -> (SaleId, SignedChange) {
    let reference = match method {
        PaymentMethod::Card => "pi_1".into(),
        _ => String::new(),
    };
    let req = SaleRequest {
        lines: vec![SaleLine {
            sku: sku("soda"),
            qty,
            unit_price_cents: 300,
        }],
        payment: Payment { method, reference },
        pool_reachable: true,
    };
    match till.sell(req, at) {
        SaleOutcome::Committed { sale_id, change } => (sale_id, change),
        SaleOutcome::Refused { reason } => panic!("the till could not sell: {reason}"),
    }
}

fn key(n: u8) -> ReplicaKey {
    ReplicaKey::from_seed([n; 32])
}

async fn serve(store: Store) -> (String, App) {
    let app = App::new(store).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = router(app.clone());
    tokio::spawn(async move { axum::serve(listener, r).await });
    (format!("127.0.0.1:{}", addr.port()), app)
}

async fn next_handshake(ws: &mut Ws) -> Handshake {
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => Handshake::decode(&b).unwrap(),
        other => panic!("expected a handshake message, got {other:?}"),
    }
}

/// Open an uplink as `k`; Err(reason) when the relay refuses.
async fn connect(addr: &str, stand: &str, k: &ReplicaKey) -> Result<Ws, String> {
    let url = format!("ws://{addr}/v1/stands/{stand}/uplink");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (relay, challenge) = match next_handshake(&mut ws).await {
        Handshake::Hello { key, challenge, .. } => (key, challenge),
        Handshake::Refused { reason } => return Err(reason),
        other => panic!("{other:?}"),
    };
    let mine = [7u8; 32];
    let auth = Handshake::Auth {
        key: k.public(),
        challenge: mine,
        signature: uplink::sign(k, Side::Replica, &north(), &challenge, &relay),
    };
    ws.send(Message::Binary(auth.encode().into()))
        .await
        .unwrap();
    match next_handshake(&mut ws).await {
        Handshake::Welcome { signature } => {
            assert!(uplink::verify(
                &relay,
                Side::Relay,
                &north(),
                &mine,
                &k.public(),
                &signature
            ));
            Ok(ws)
        }
        Handshake::Refused { reason } => Err(reason),
        other => panic!("{other:?}"),
    }
}

async fn send(ws: &mut Ws, m: &WireMessage) {
    ws.send(Message::Binary(m.encode(&north()).into()))
        .await
        .unwrap();
}

/// Frames from the relay until one carries changes (within 5 s); their count.
async fn changes_received(ws: &mut Ws) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if let Ok(WireMessage::Changes { changes }) = WireMessage::decode(&b, &north()) {
                    return changes.len();
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no changes from the relay: {other:?}"),
        }
    }
}

async fn stored(store: &Store) -> u64 {
    store.change_count(&north()).await.unwrap()
}

/// Poll until the store holds `n` changes of the stand.
async fn until_stored(store: &Store, n: u64) {
    eventually(10, "changes stored", || async {
        (stored(store).await == n).then_some(())
    })
    .await;
}

/// The pool connects to the relay at `addr` and hands over the stand's set-up; its
/// connection, once the relay stored all of it.
async fn pool_hands_over(addr: &str, store: &Store, setup: &[SignedChange]) -> Ws {
    let mut p = connect(addr, "north", &key(1)).await.unwrap();
    send(
        &mut p,
        &WireMessage::Changes {
            changes: setup.to_vec(),
        },
    )
    .await;
    until_stored(store, setup.len() as u64).await;
    p
}

/// A relay on `db` serving the in-memory stand (device placement).
async fn served_stand(db: &TestDb) -> (Store, String, App, (Ledger, Ledger, Vec<SignedChange>)) {
    served_stand_with(db, halftime_relay::stand::SNAPSHOT_EVERY).await
}

/// Stand north, its pool a stand device (key 1).
fn north_row() -> StandRow {
    StandRow {
        stand: north(),
        pool_key: key(1).public(),
        placement: Placement::Device,
        pool_secret: None,
        psk: None,
    }
}

/// [`served_stand`], writing the stand's snapshot every `snapshot_every` changes.
async fn served_stand_with(
    db: &TestDb,
    snapshot_every: usize,
) -> (Store, String, App, (Ledger, Ledger, Vec<SignedChange>)) {
    let store = Store::open(&db.url).await.unwrap();
    let relay_key = store.relay_key().await.unwrap();
    let made = stand(relay_key.public());
    let row = north_row();
    store.add_stand(&row, 1_000).await.unwrap();
    let app = App::open(store.clone(), snapshot_every).await.unwrap();
    let addr = serve_app(app.clone()).await;
    (store, addr, app, made)
}

async fn whole_story(db: &TestDb) {
    let (store, addr, _app, (mut pool, mut till, setup)) = served_stand(db).await;

    // A stranger, a wrong stand, a bad signature: refused, and they say why.
    let why = connect(&addr, "north", &key(99)).await.err().unwrap();
    assert!(why.contains("not enrolled in stand north"), "{why}");
    let why = connect(&addr, "south", &key(1)).await.err().unwrap();
    assert!(why.contains("does not serve stand"), "{why}");

    // The pool connects and hands over the stand; the relay stores every change once.
    let mut p = pool_hands_over(&addr, &store, &setup).await;
    // The same changes again are duplicates, not new rows.
    send(
        &mut p,
        &WireMessage::Changes {
            changes: setup.clone(),
        },
    )
    .await;

    // The terminal is now a known member: it connects, sells, and the pool hears at once.
    let mut t = connect(&addr, "north", &key(10)).await.unwrap();
    let (_, change) = sell_soda(&mut till, 2, PaymentMethod::Card, 2_000);
    send(
        &mut t,
        &WireMessage::Changes {
            changes: vec![change.clone()],
        },
    )
    .await;
    assert!(
        changes_received(&mut p).await >= 1,
        "the relay passed the sale on to the pool"
    );
    until_stored(&store, setup.len() as u64 + 1).await;
    let r = pool.apply_remote(vec![change.clone()], 2_000);
    assert_eq!(r.accepted.len(), 1);

    // Hostile: a forged signature and a garbage frame. Counted per key and rule, never stored.
    let mut forged = till
        .void(
            SaleId {
                replica: key(10).replica_id(),
                seq: 1,
            },
            3_000,
        )
        .unwrap();
    forged.signature[0] ^= 1;
    send(
        &mut t,
        &WireMessage::Changes {
            changes: vec![forged],
        },
    )
    .await;
    t.send(Message::Binary(vec![0xde, 0xad].into()))
        .await
        .unwrap();
    let rejected = eventually(10, "the rejection counted", || async {
        let rows = store.rejections(&north()).await.unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(
        rejected,
        vec![(
            key(10).replica_id().to_string(),
            "bad_signature".to_string(),
            1
        )]
    );
    assert_eq!(stored(&store).await, setup.len() as u64 + 1);

    // The projections equal the ledger.
    let (items, rights) = store.stock(&north()).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].available, pool.available(&sku("soda")));
    assert_eq!(items[0].available, 18);
    let till_rights = rights
        .iter()
        .find(|(s, r, _)| s == "soda" && *r == key(10).replica_id().to_string())
        .map(|x| x.2);
    assert_eq!(till_rights, Some(3));
    let sales = store.sales(&north(), 10).await.unwrap();
    assert_eq!(sales.len(), 1);
    assert_eq!((sales[0].units, sales[0].total_cents), (2, 600));

    // The audit re-checks every stored change; stock can be read as at any past time.
    let token = store.create_token("t", AdminRole::Viewer, 1).await.unwrap();
    let http = reqwest::Client::new();
    let viewer_get = |path: String| {
        let req = http.get(format!("http://{addr}{path}")).bearer_auth(&token);
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let audit = viewer_get("/v1/stands/north/audit/verify".into()).await;
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["changes"], setup.len() + 1, "{audit}");
    let before = viewer_get("/v1/stands/north/stock/at?at=1500".into()).await;
    assert_eq!(before["available"]["soda"], 20, "{before}");
    let after = viewer_get("/v1/stands/north/stock/at?at=2500".into()).await;
    assert_eq!(after["available"]["soda"], 18, "{after}");

    // History cannot be rewritten, by anyone with a connection to the database.
    for sql in ["UPDATE changes SET seq = seq + 100", "DELETE FROM changes"] {
        let e = store.execute_raw(sql).await.unwrap_err().to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
    assert_eq!(stored(&store).await, setup.len() as u64 + 1);

    // Someone who can drop the triggers can change a row, but not unseen: the audit finds it.
    if store.backend() == Backend::Sqlite {
        store
            .execute_raw("DROP TRIGGER changes_no_update")
            .await
            .unwrap();
        store
            .execute_raw(
                "UPDATE changes SET signature = zeroblob(64) WHERE id = (SELECT MAX(id) FROM changes)",
            )
            .await
            .unwrap();
        let audit = viewer_get("/v1/stands/north/audit/verify".into()).await;
        assert_eq!(audit["ok"], false, "{audit}");
        let brk = &audit["first_break"];
        assert_eq!(brk["actor"], key(10).replica_id().to_string(), "{audit}");
        assert_eq!(brk["seq"], 1, "{audit}");
        assert!(
            brk["why"].as_str().unwrap().contains("signature"),
            "{audit}"
        );
    }

    // A relay restarted on the same database serves the stand again from the store.
    drop((p, t));
    let store2 = Store::open(&db.url).await.unwrap();
    let (addr2, _app2) = serve(store2.clone()).await;
    let mut t2 = connect(&addr2, "north", &key(10)).await.unwrap();
    send(
        &mut t2,
        &WireMessage::Vector {
            vector: VersionVector::new(),
        },
    )
    .await;
    assert_eq!(changes_received(&mut t2).await, setup.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_stores_checks_and_passes_on_sqlite() {
    whole_story(&TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_stores_checks_and_passes_on_postgres() {
    whole_story(&TestDb::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_a_token_with_a_strong_enough_role() {
    let db = TestDb::sqlite();
    let store = Store::open(&db.url).await.unwrap();
    let viewer = store.create_token("v", AdminRole::Viewer, 1).await.unwrap();
    let admin = store.create_token("a", AdminRole::Admin, 1).await.unwrap();
    let (addr, _app) = serve(store.clone()).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(http.get(url("/v1/stands")).send().await.unwrap()),
        401
    );
    let forged = http
        .get(url("/v1/stands"))
        .bearer_auth("ht_00")
        .send()
        .await
        .unwrap();
    assert_eq!(status(forged), 401);
    let ok = http
        .get(url("/v1/stands"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(status(ok), 200);
    let body = serde_json::json!({"stand": "north", "pool_key": key(1).public().to_string()});
    let weak = http
        .post(url("/v1/stands"))
        .bearer_auth(&viewer)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(status(weak), 403);
    let unknown_field = serde_json::json!({"stand": "north", "pool_key": "x", "extra": 1});
    let bad = http
        .post(url("/v1/stands"))
        .bearer_auth(&admin)
        .json(&unknown_field)
        .send()
        .await
        .unwrap();
    assert_eq!(status(bad), 400);
    let made = http
        .post(url("/v1/stands"))
        .bearer_auth(&admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(status(made), 201);
    let listed: serde_json::Value = http
        .get(url("/v1/stands"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["stand"], "north");
    assert_eq!(
        listed[0]["member"], false,
        "not enrolled until the pool's word arrives"
    );
    let missing = http
        .get(url("/v1/stands/south/stock"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(status(missing), 404);
    let metrics = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("halftime_relay_admin_unauthorized_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("halftime_relay_admin_forbidden_total 1"),
        "{metrics}"
    );
}

/// Frames from `ws` for `ms`: whether any carried changes, and the highest sequence of
/// `replica` any vector claimed.
async fn watch(ws: &mut Ws, ms: u64, replica: ReplicaId) -> (bool, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    let (mut changes, mut claimed) = (false, 0);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Binary(b) = m {
            match WireMessage::decode(&b, &north()) {
                Ok(WireMessage::Changes { .. }) => changes = true,
                Ok(
                    WireMessage::Vector { vector }
                    | WireMessage::VectorHello { vector }
                    | WireMessage::VectorChanged {
                        changed: vector, ..
                    },
                ) => claimed = claimed.max(vector.get(&replica).copied().unwrap_or(0)),
                _ => {}
            }
        }
    }
    (changes, claimed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_database_holds_every_acknowledgement_until_it_is_back() {
    let db = TestDb::postgres().await;
    let (store, addr, _app, (_pool, mut till, setup)) = served_stand(&db).await;
    let mut p = pool_hands_over(&addr, &store, &setup).await;
    let mut t = connect(&addr, "north", &key(10)).await.unwrap();
    watch(&mut p, 300, key(10).replica_id()).await;

    // The database goes away: no new connection, the relay's own cut.
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&postgres_admin_url())
        .await
        .unwrap();
    for sql in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }
    // Two sales, the second while the first one's commit is failing: the stand applies it
    // meanwhile, and must hold what it would say about either.
    for at in [2_000, 2_010] {
        let (_, change) = sell_soda(&mut till, 1, PaymentMethod::Cash, at);
        send(
            &mut t,
            &WireMessage::Changes {
                changes: vec![change],
            },
        )
        .await;
        send(
            &mut t,
            &WireMessage::Vector {
                vector: till.version_vector(),
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (passed_on, _) = watch(&mut p, 1_500, key(10).replica_id()).await;
    assert!(!passed_on, "nothing uncommitted is passed on");
    let (_, claimed) = watch(&mut t, 500, key(10).replica_id()).await;
    assert_eq!(
        claimed, 0,
        "the relay does not claim what it has not committed"
    );

    // Back: the held change is committed, then passed on.
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (passed_on, _) = watch(&mut p, 500, key(10).replica_id()).await;
        if passed_on {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change never went on"
        );
    }
    assert_eq!(stored(&store).await, setup.len() as u64 + 2);
}

async fn serve_app(app: App) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = router(app);
    tokio::spawn(async move { axum::serve(listener, r).await });
    format!("127.0.0.1:{}", addr.port())
}

/// How the relay at `addr` says it loaded stand north.
async fn loaded(addr: &str, token: &str) -> serde_json::Value {
    listing(addr, token).await["loaded"].clone()
}

/// Stand north as the relay at `addr` lists it.
async fn listing(addr: &str, token: &str) -> serde_json::Value {
    let stands: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{addr}/v1/stands"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stands[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_loads_its_stands_from_snapshots_and_replays_a_damaged_one() {
    restart_from_snapshots(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_on_postgres_serves_what_its_snapshot_covers_from_the_store() {
    restart_from_snapshots(TestDb::postgres().await).await;
}

/// A relay restarted from its snapshots serves a replica that holds nothing every change:
/// those the snapshot covers are read back from `changes`, never held in memory.
async fn restart_from_snapshots(db: TestDb) {
    let (store, addr, _app, (_pool, mut till, setup)) = served_stand_with(&db, 10).await;
    let token = store.create_token("v", AdminRole::Viewer, 1).await.unwrap();
    assert_eq!(loaded(&addr, &token).await["from"], "not_yet");
    let p = pool_hands_over(&addr, &store, &setup).await;
    assert_eq!(loaded(&addr, &token).await["from"], "replay");
    // The till sells and voids, 15 times: 30 changes.
    let mut t = connect(&addr, "north", &key(10)).await.unwrap();
    let mut made = Vec::new();
    for i in 0..15u64 {
        let (sale_id, change) = sell_soda(&mut till, 1, PaymentMethod::Cash, 2_000 + i * 10);
        made.push(change);
        made.push(till.void(sale_id, 2_005 + i * 10).unwrap());
    }
    send(
        &mut t,
        &WireMessage::Changes {
            changes: made.clone(),
        },
    )
    .await;
    let total = setup.len() + made.len();
    until_stored(&store, total as u64).await;
    let first = eventually(10, "a snapshot written", || async {
        store.stand_snapshot(&north()).await.unwrap()
    })
    .await;
    assert!(!first.is_empty());
    drop((p, t));

    // A restart loads the snapshot and replays the rest; the stand is whole.
    let store2 = Store::open(&db.url).await.unwrap();
    let addr2 = serve_app(App::open(store2, 10).await.unwrap()).await;
    // Nothing is loaded until asked; the listing says what the store holds.
    let listed = listing(&addr2, &token).await;
    assert_eq!(listed["loaded"]["from"], "not_yet", "{listed}");
    assert_eq!(listed["changes"], total, "{listed}");
    assert_eq!(listed["member"], serde_json::Value::Null, "{listed}");
    let mut t2 = connect(&addr2, "north", &key(10)).await.unwrap();
    let how = loaded(&addr2, &token).await;
    assert_eq!(how["from"], "snapshot", "{how}");
    assert_eq!(listing(&addr2, &token).await["member"], true);
    let covered = how["covered"].as_u64().unwrap() as usize;
    assert!(covered >= 10, "{how}");
    assert_eq!(
        covered + how["replayed"].as_u64().unwrap() as usize,
        total,
        "{how}"
    );
    send(
        &mut t2,
        &WireMessage::Vector {
            vector: VersionVector::new(),
        },
    )
    .await;
    assert_eq!(changes_received(&mut t2).await, total);
    drop(t2);

    // One byte of the snapshot changed on disk: refused with the reason, every change replayed.
    let mut snap = store.stand_snapshot(&north()).await.unwrap().unwrap();
    let mid = snap.len() / 2;
    snap[mid] ^= 0x10;
    store
        .put_stand_snapshot(&north(), covered, &snap, 9_000)
        .await
        .unwrap();
    let store3 = Store::open(&db.url).await.unwrap();
    let addr3 = serve_app(App::open(store3, 0).await.unwrap()).await;
    let mut t3 = connect(&addr3, "north", &key(10)).await.unwrap();
    let how = loaded(&addr3, &token).await;
    assert_eq!(how["from"], "replay", "{how}");
    assert!(how["why"].as_str().unwrap().contains("checksum"), "{how}");
    send(
        &mut t3,
        &WireMessage::Vector {
            vector: VersionVector::new(),
        },
    )
    .await;
    assert_eq!(changes_received(&mut t3).await, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_names_every_route_and_only_those() {
    use std::collections::BTreeSet;
    // The routes as the router declares them, read from its source.
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/server.rs")).unwrap();
    let body = &src[src.find("pub fn router(").unwrap()..];
    let body = &body[..body.find("\n}\n").unwrap()];
    let mut declared = BTreeSet::new();
    for part in body.split(".route(").skip(1) {
        let part = part.split(".fallback(").next().unwrap();
        let path = part.split('"').nth(1).unwrap().to_owned();
        for m in ["get", "post", "put", "delete", "patch"] {
            let found = part.match_indices(&format!("{m}(")).any(|(i, _)| {
                i == 0
                    || !part.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && part.as_bytes()[i - 1] != b'_'
            });
            if found {
                declared.insert((m.to_owned(), path.clone()));
            }
        }
    }
    assert!(declared.len() > 20, "{declared:?}");
    let doc: serde_json::Value =
        serde_json::from_str(&halftime_relay::openapi::document()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut described = BTreeSet::new();
    let mut guarded = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (m, op) in ops.as_object().unwrap() {
            assert!(op["summary"].is_string(), "{m} {path} has no summary");
            let answers = op["responses"].as_object().unwrap();
            assert!(
                answers.keys().any(|c| c.starts_with('2') || c == "101"),
                "{m} {path} names no success"
            );
            // Every call that needs a token says which role and what it answers without one.
            if op["security"].is_array() {
                guarded += 1;
                for code in ["401", "403"] {
                    assert!(answers.contains_key(code), "{m} {path} lacks {code}");
                }
                let said = op["description"].as_str().unwrap_or_default();
                assert!(
                    said.contains("Role: "),
                    "{m} {path} names no role: {said:?}"
                );
            }
            described.insert((m.clone(), path.clone()));
        }
    }
    assert!(guarded >= 18, "{guarded} operations need a token");
    assert_eq!(
        declared, described,
        "the router and the operations the handlers describe differ"
    );
    // The schemas the answers name are in the document.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "StandView",
        "Loaded",
        "Error",
        "StockView",
        "SaleRow",
        "AuditReport",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}");
    }
    // And it is served.
    let db = TestDb::sqlite();
    let (addr, _app) = serve(Store::open(&db.url).await.unwrap()).await;
    let served: serde_json::Value = reqwest::get(format!("http://{addr}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, doc);
}

/// Changes the relay sends on `ws` within `secs`, applied to `to`, until `done` holds.
async fn apply_until(ws: &mut Ws, to: &mut Ledger, secs: u64, done: impl Fn(&Ledger) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done(to) {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if let Ok(WireMessage::Changes { changes }) = WireMessage::decode(&b, &north()) {
                    let r = to.apply_remote(changes, now_ms());
                    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the relay sent nothing that satisfies the test: {other:?}"),
        }
    }
}

fn now_ms() -> u64 {
    halftime_relay::stand::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_decided_for_a_device_stand_reaches_it_once_as_a_change_of_the_relay() {
    let db = TestDb::postgres().await;
    let (store, addr, _app, (_pool, mut till, setup)) = served_stand(&db).await;
    // A second instance on the same database: the two share the relay's key, one writes.
    let second = App::open(store.clone(), halftime_relay::stand::SNAPSHOT_EVERY)
        .await
        .unwrap();
    view_of(&second).await;
    let _p = pool_hands_over(&addr, &store, &setup).await;
    let mut t = connect(&addr, "north", &key(10)).await.unwrap();
    let (sale_id, change) = sell_soda(&mut till, 3, PaymentMethod::Cash, now_ms());
    send(
        &mut t,
        &WireMessage::Changes {
            changes: vec![change],
        },
    )
    .await;
    until_stored(&store, setup.len() as u64 + 1).await;

    // The store of record decides to refund 2 of the 3 units, after a decision about a sale
    // this relay does not hold (it must not hold the others back).
    let unheard = SaleId {
        replica: sale_id.replica,
        seq: 99,
    };
    for (sale, units) in [(unheard, 1i64), (sale_id, 2)] {
        sqlx::query(
            "INSERT INTO refund_decisions (stand, sale_id, sku, units, amount_cents, method, \
             reference, available, decided_at) VALUES ('north', $1, 'soda', $2, 600, 'cash', '', -2, 0)",
        )
        .bind(sale.to_string())
        .bind(units)
        .execute(store.pool())
        .await
        .unwrap();
    }
    apply_until(&mut t, &mut till, 15, |l| {
        l.refunded(sale_id, &sku("soda")) == 2
    })
    .await;
    assert_eq!(till.available(&sku("soda")), 17, "a refund moves no stock");
    let relay = store.relay_key().await.unwrap().replica_id();
    let heads = store.actor_heads(&north()).await.unwrap();
    assert_eq!(heads.get(&relay), Some(&1), "{heads:?}");

    // Read again by both instances, and by a third started now: nothing more is written.
    let third = App::open(store.clone(), halftime_relay::stand::SNAPSHOT_EVERY)
        .await
        .unwrap();
    view_of(&third).await;
    tokio::time::sleep(Duration::from_millis(
        3 * halftime_relay::stand::REFUND_SCAN_MS,
    ))
    .await;
    let heads = store.actor_heads(&north()).await.unwrap();
    assert_eq!(heads.get(&relay), Some(&1), "{heads:?}");
    assert_eq!(stored(&store).await, setup.len() as u64 + 2);
    // Every instance holds that one change and no fork of it.
    for app in [&_app, &second, &third] {
        let want = setup.len() + 2;
        let v = eventually(10, "each instance holds the refund", || async {
            let v = view_of(app).await;
            (v.changes == want).then_some(v)
        })
        .await;
        assert_eq!((v.commit_failures, v.changes_rejected), (0, 0), "{v:?}");
    }
}

async fn view_of(app: &App) -> halftime_relay::stand::StandView {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = halftime_relay::stand::StandCmd::View { reply: tx };
    app.serve_stand(&north())
        .await
        .unwrap()
        .unwrap()
        .handle
        .tx
        .send(cmd)
        .await
        .unwrap();
    rx.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_lost_the_pools_lease_stores_nothing_it_signs_and_stands_by() {
    use reqwest::Method;
    let db = TestDb::postgres().await;
    let store = Store::open(&db.url).await.unwrap();
    let token = store.create_token("t", AdminRole::Admin, 0).await.unwrap();
    let a = serve_app(App::open(store.clone(), 0).await.unwrap()).await;
    let east = serde_json::json!({"stand": "east", "event": "game",
        "items": [{"sku": "soda", "name": "Soda", "price_cents": 250, "stock": 10}]});
    let (code, body) = call(Method::POST, &format!("http://{a}/v1/stands"), &token, east).await;
    assert_eq!(code, 201, "{body}");
    let b = serve_app(App::open(store.clone(), 0).await.unwrap()).await;
    let restock = |addr: String| {
        let token = token.clone();
        async move {
            call(
                Method::POST,
                &format!("http://{addr}/v1/stands/east/restock"),
                &token,
                serde_json::json!({"units": {"soda": 5}}),
            )
            .await
        }
    };
    assert_eq!(restock(b.clone()).await.1["error"], "served_elsewhere");

    // A's lock connection dies (as in a network cut between A and the database): B takes the
    // lease while A still believes it holds it.
    let cut: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(cut, 1);
    // Calls keep reaching B while it takes over: one arriving between its taking the lease
    // and its serving the stand must not make it stand by for good.
    let hammer = {
        let (b, token) = (b.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let _ = get(&format!("http://{b}/v1/stands/east/stock"), Some(&token)).await;
            }
        })
    };
    eventually(10, "B takes the pool over", || async {
        (restock(b.clone()).await.0 == 201).then_some(())
    })
    .await;
    hammer.abort();

    // A signs a restock as the pool: its commit finds the lease gone, stores nothing, answers
    // no success, and A stands by.
    let (code, body) = restock(a.clone()).await;
    assert_ne!(code, 201, "{body}");
    eventually(10, "A stands by", || async {
        (restock(a.clone()).await.1["error"] == "served_elsewhere").then_some(())
    })
    .await;
    assert_eq!(restock(b.clone()).await.0, 201);
    let stock = get(&format!("http://{b}/v1/stands/east/stock"), Some(&token))
        .await
        .unwrap();
    assert_eq!(
        stock["items"][0]["available"], 20,
        "B's two restocks only: {stock}"
    );
    let audit = get(
        &format!("http://{b}/v1/stands/east/audit/verify"),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(audit["ok"], true, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sales_listing_pages_through_every_sale_latest_first() {
    sales_pages(TestDb::postgres().await).await;
    sales_pages(TestDb::sqlite()).await;
}

async fn sales_pages(db: TestDb) {
    let (store, addr, _app, (_pool, mut till, setup)) = served_stand(&db).await;
    let _p = pool_hands_over(&addr, &store, &setup).await;
    let mut t = connect(&addr, "north", &key(10)).await.unwrap();
    // Five sales, two of them at the same moment (the sale id orders those).
    let mut made = Vec::new();
    let mut ids = Vec::new();
    for at in [2_000, 2_010, 2_010, 2_020, 2_030] {
        let (id, change) = sell_soda(&mut till, 1, PaymentMethod::Cash, at);
        ids.push(id.to_string());
        made.push(change);
    }
    send(&mut t, &WireMessage::Changes { changes: made }).await;
    until_stored(&store, setup.len() as u64 + 5).await;
    let token = store.create_token("v", AdminRole::Viewer, 1).await.unwrap();
    let http = reqwest::Client::new();
    let list = |query: String| {
        let req = http
            .get(format!("http://{addr}/v1/stands/north/sales?{query}"))
            .bearer_auth(&token);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };

    let (code, all) = list("limit=10".into()).await;
    assert_eq!(code, 200, "{all}");
    let all: Vec<(i64, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["at_ms"].as_i64().unwrap(),
                r["sale_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(all.len(), 5);
    let mut by_time = all.clone();
    by_time.sort_by(|a, b| b.cmp(a));
    assert_eq!(all, by_time, "latest first, then by sale id");

    // Two at a time, each page after the previous page's last row: every sale once, in order.
    let mut paged = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let (code, page) = list(query.clone()).await;
        assert_eq!(code, 200, "{page}");
        let rows = page.as_array().unwrap();
        if rows.is_empty() {
            break;
        }
        assert!(rows.len() <= 2);
        for r in rows {
            paged.push((
                r["at_ms"].as_i64().unwrap(),
                r["sale_id"].as_str().unwrap().to_owned(),
            ));
        }
        let (at, id) = paged.last().unwrap().clone();
        query = format!("limit=2&before_ms={at}&before_sale={id}");
    }
    assert_eq!(paged, all);
    let mut sold: Vec<String> = paged.into_iter().map(|(_, id)| id).collect();
    sold.sort();
    ids.sort();
    assert_eq!(sold, ids);

    // A half cursor, a cursor longer than any sale id, an unknown field: 400 with the reason.
    for bad in [
        "before_ms=2010".to_owned(),
        "before_sale=x".to_owned(),
        format!("before_ms=1&before_sale={}", "x".repeat(65)),
        "after=1".to_owned(),
    ] {
        let (code, body) = list(bad.clone()).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request", "{bad}: {body}");
    }
}

/// The line `name value` of the relay's `/metrics`.
async fn metric(addr: &str, name: &str) -> u64 {
    let text = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stand_loads_once_at_its_first_call_even_one_another_instance_added() {
    use reqwest::Method;
    let db = TestDb::sqlite();
    let store = Store::open(&db.url).await.unwrap();
    let token = store.create_token("t", AdminRole::Admin, 0).await.unwrap();
    let a = serve_app(App::open(store.clone(), 0).await.unwrap()).await;
    let b = serve_app(
        App::open(Store::open(&db.url).await.unwrap(), 0)
            .await
            .unwrap(),
    )
    .await;
    // Stand south is added through A after B started.
    let south = serde_json::json!({"stand": "south", "pool_key": key(1).public().to_string()});
    let (code, body) = call(
        Method::POST,
        &format!("http://{a}/v1/stands"),
        &token,
        south,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let listed = get(&format!("http://{b}/v1/stands"), Some(&token))
        .await
        .unwrap();
    assert_eq!(listed[0]["stand"], "south", "{listed}");
    assert_eq!(listed[0]["loaded"]["from"], "not_yet", "{listed}");
    assert_eq!(metric(&b, "halftime_relay_stands_loaded_total").await, 0);

    // Twenty calls at once: every one served, the stand loaded once.
    let url = format!("http://{b}/v1/stands/south/stock");
    let asks = (0..20).map(|_| get(&url, Some(&token)));
    for stock in futures::future::join_all(asks).await {
        let stock = stock.unwrap();
        assert!(stock["items"].is_array(), "{stock}");
    }
    assert_eq!(metric(&b, "halftime_relay_stands_loaded_total").await, 1);
    let listed = get(&format!("http://{b}/v1/stands"), Some(&token))
        .await
        .unwrap();
    assert_eq!(listed[0]["loaded"]["from"], "replay", "{listed}");
    assert_eq!(listed[0]["member"], false, "{listed}");

    // A stand nobody stored is not found, and nothing is loaded for it.
    let (code, body) = call(
        Method::GET,
        &format!("http://{b}/v1/stands/nowhere/stock"),
        &token,
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(
        (code, &body["error"]),
        (404, &serde_json::json!("unknown_stand"))
    );
    assert_eq!(metric(&b, "halftime_relay_stands_loaded_total").await, 1);

    // A stand whose stored row cannot be served (its pool at the relay, but no pool key
    // stored): each call says why, nothing is loaded, and the next call tries again.
    sqlx::query(
        "INSERT INTO stands (stand, pool_key, placement, pool_secret, created_at) \
         VALUES ('broken', $1, 'relay', NULL, 0)",
    )
    .bind(key(2).public().to_string())
    .execute(store.pool())
    .await
    .unwrap();
    for _ in 0..2 {
        let (code, body) = call(
            Method::GET,
            &format!("http://{b}/v1/stands/broken/stock"),
            &token,
            serde_json::Value::Null,
        )
        .await;
        assert_eq!(code, 503, "{body}");
        let why = body["message"].as_str().unwrap();
        assert!(
            why.contains("could not be loaded") && why.contains("no pool key is stored"),
            "{body}"
        );
    }
    assert_eq!(metric(&b, "halftime_relay_stands_loaded_total").await, 1);
    let listed = get(&format!("http://{b}/v1/stands"), Some(&token))
        .await
        .unwrap();
    assert_eq!(listed[0]["stand"], "broken", "{listed}");
    assert_eq!(listed[0]["loaded"]["from"], "not_yet", "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_written_again_is_stored_once_and_a_fork_of_it_never() {
    written_again(TestDb::postgres().await).await;
    written_again(TestDb::sqlite()).await;
}

async fn written_again(db: TestDb) {
    let store = Store::open(&db.url).await.unwrap();
    let row = north_row();
    store.add_stand(&row, 0).await.unwrap();
    let signed = |fill: u8| SignedChange {
        bytes: vec![fill; 300],
        signature: vec![fill; 64],
    };
    let change = |seq: u64, fill: u8| ChangeRow {
        actor: key(10).replica_id(),
        seq,
        info: ChangeInfo {
            hash: [fill; 32],
            deps: vec![[fill.wrapping_sub(1); 32]],
            at: Hlc::new(1_000 + seq, 0),
        },
        change: signed(fill),
    };
    let sale = |seq: u64| SaleRecord {
        id: SaleId {
            replica: key(10).replica_id(),
            seq,
        },
        at: Hlc::new(1_000 + seq, 0),
        lines: vec![SaleLine {
            sku: sku("soda"),
            qty: 2,
            unit_price_cents: 250,
        }],
        payment: Payment {
            method: PaymentMethod::Card,
            reference: format!("pi_{seq}"),
        },
        offline: false,
        overdraft: BTreeMap::new(),
    };
    let sales = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sales")
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    let first = Batch {
        changes: vec![change(1, 1), change(2, 2)],
        sales: vec![sale(1), sale(2)],
        ..Batch::default()
    };
    store.commit(&north(), &first, 0).await.unwrap();
    // The same batch again, as after a commit that went unconfirmed: nothing new.
    store.commit(&north(), &first, 0).await.unwrap();
    assert_eq!((stored(&store).await, sales().await), (2, 2));
    // A new change beside a sale projected already (as by another instance): both kept once.
    let next = Batch {
        changes: vec![change(3, 3)],
        sales: vec![sale(2), sale(3)],
        ..Batch::default()
    };
    store.commit(&north(), &next, 0).await.unwrap();
    assert_eq!((stored(&store).await, sales().await), (3, 3));
    // Another change at a stored (actor, seq) is a fork: refused, nothing of its batch stored.
    let fork = Batch {
        changes: vec![change(4, 4), change(2, 9)],
        ..Batch::default()
    };
    let e = store.commit(&north(), &fork, 0).await.unwrap_err();
    assert!(matches!(e, StoreError::Fork { seq: 2, .. }), "{e}");
    assert_eq!(stored(&store).await, 3);
    // What is stored is what was sent, byte for byte, in order.
    let back = store.load_changes(&north()).await.unwrap();
    assert_eq!(back, vec![signed(1), signed(2), signed(3)]);
    let listed = store.sales(&north(), 10).await.unwrap();
    let id = SaleId {
        replica: key(10).replica_id(),
        seq: 2,
    }
    .to_string();
    let sale2 = listed.iter().find(|r| r.sale_id == id).unwrap();
    assert_eq!(
        (
            sale2.at_ms,
            sale2.units,
            sale2.total_cents,
            sale2.method.as_str()
        ),
        (1_002, 2, 500, "card")
    );
    assert_eq!(sale2.lines[0]["sku"], "soda");
}
