#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real processes on Postgres: a pool and two terminals that share no network reach each other
//! only through the relay; the relay is killed (kill -9) and restarted while they sell; every
//! acknowledged sale ends in the store of record once, and its projection equals the ledger.
//! A device the pool never enrolled is refused, and both sides say why. A till short of rights
//! gets them from holders it reaches only through the relay. Terminals reach a relay
//! behind TLS over wss://, trusting its CA, and one that does not trust it says why.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RELAY: &str = env!("CARGO_BIN_EXE_halftime-relay");

fn peer_bin() -> PathBuf {
    sibling(RELAY, "halftime-peer")
}

async fn available(api: &str, sku: &str) -> Option<i64> {
    let stock = get(&format!("{api}/v1/stock"), None).await?;
    stock.as_array()?.iter().find(|i| i["sku"] == sku)?["available"].as_i64()
}

async fn sell(api: &str, qty: u64) -> (u16, Value) {
    let r = http()
        .post(format!("{api}/v1/sales"))
        .json(&serde_json::json!({"lines":[{"sku":"hotdog","qty":qty}],"payment":{"method":"card","reference":"pi_t"}}))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Both terminals (APIs `t0` and `t1`) learn the stand of 100 hot dogs, then a sale of 3 on
/// the first reaches the second; `how` names the way in the failure messages.
async fn learn_then_cross(t0: &str, t1: &str, how: &str) {
    for api in [t0, t1] {
        eventually(
            30,
            &format!("a terminal learns the stand {how}"),
            || async { (available(api, "hotdog").await == Some(100)).then_some(()) },
        )
        .await;
    }
    let (code, body) = sell(t0, 3).await;
    assert_eq!(code, 201, "{body}");
    eventually(10, &format!("till1 sees till0's sale {how}"), || async {
        (available(t1, "hotdog").await == Some(97)).then_some(())
    })
    .await;
}

fn spawn_relay_at(db: &str, port: u16, log: PathBuf) -> Proc {
    spawn_relay(Path::new(RELAY), db, port, log)
}

fn spawn_peer(data: &Path, api: u16, relay: u16, relay_key: &str) -> Proc {
    spawn_till(
        &peer_bin(),
        data,
        api,
        &[relay],
        Some(relay_key),
        Some(2000),
    )
}

/// A stand made on a pool device with terminals till0 and till1 (and, unenrolled, the devices
/// named in `strangers`), every device joined, the relay enrolled and serving it. Data folders
/// are `dir/pool`, `dir/t0`, `dir/t1` and `dir/<stranger>`; returns the relay's public key.
fn device_stand(db: &str, dir: &Path, strangers: &[&str]) -> String {
    let peer = peer_bin();
    let d = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let key_of = |n: &str| field(&run(&peer, &["init", "--data", &d(n)]), "public key:");
    let (pool_key, k0, k1) = (key_of("pool"), key_of("t0"), key_of("t1"));
    for x in strangers {
        key_of(x);
    }
    let relay_key = field(
        &run(Path::new(RELAY), &["--database", db, "key"]),
        "public key:",
    );
    let (t0, t1) = (format!("{k0}=till0"), format!("{k1}=till1"));
    let out = run(
        &peer,
        &[
            "create-stand",
            "--data",
            &d("pool"),
            "--stand",
            "north",
            "--event",
            "game",
            "--item",
            "hotdog=Hot dog:400:100",
            "--terminal",
            &t0,
            "--terminal",
            &t1,
        ],
    );
    let join: Vec<String> = out
        .lines()
        .find(|l| l.contains("halftime-peer join"))
        .unwrap()
        .split_whitespace()
        .skip_while(|w| *w != "--stand")
        .map(String::from)
        .collect();
    let relay = format!("{relay_key}=relay");
    run(
        &peer,
        &[
            "enrol",
            "--data",
            &d("pool"),
            "--replica",
            &relay,
            "--role",
            "relay",
        ],
    );
    for n in ["t0", "t1"].iter().chain(strangers) {
        let mut a = vec!["join".to_string(), "--data".into(), d(n)];
        a.extend(join.iter().cloned());
        run(&peer, &a.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let add = [
        "--database",
        db,
        "stand",
        "add",
        "--stand",
        "north",
        "--pool-key",
        &pool_key,
    ];
    run(Path::new(RELAY), &add);
    relay_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_on_no_shared_network_converge_through_the_relay_and_survive_its_crash() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let relay_key = device_stand(&db.url, dir.path(), &["x"]);
    let token = run(
        Path::new(RELAY),
        &["--database", &db.url, "token", "create", "--role", "viewer"],
    )
    .trim()
    .to_owned();

    let rport = free_port();
    let mut relay = spawn_relay_at(&db.url, rport, d("relay.log"));
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let _pool = spawn_peer(&d("pool"), ports[0], rport, &relay_key);
    let t0 = spawn_peer(&d("t0"), ports[1], rport, &relay_key);
    let t1 = spawn_peer(&d("t1"), ports[2], rport, &relay_key);
    let x = spawn_peer(&d("x"), ports[3], rport, &relay_key);
    let api = |i: usize| format!("http://127.0.0.1:{}", ports[i]);

    // The terminals learn the stand from the pool, through the relay alone.
    learn_then_cross(&api(1), &api(2), "through the relay").await;

    // The relay dies without warning; the terminals keep selling and acknowledging.
    relay.kill9();
    let (code, body) = sell(&api(1), 2).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = sell(&api(2), 1).await;
    assert_eq!(code, 201, "{body}");
    let mut relay = spawn_relay_at(&db.url, rport, d("relay2.log"));
    for i in 0..3 {
        eventually(
            30,
            "every replica catches up after the relay's restart",
            || async { (available(&api(i), "hotdog").await == Some(94)).then_some(()) },
        )
        .await;
    }

    // The store of record holds every change once, and its projection equals the ledgers.
    let status = get(&format!("{}/v1/status", api(0)), None).await.unwrap();
    let held = status["changes"].as_u64().unwrap();
    let url = format!("http://127.0.0.1:{rport}");
    let stands = eventually(10, "the relay stores every change", || async {
        let v = get(&format!("{url}/v1/stands"), Some(&token)).await?;
        (v[0]["changes"].as_u64() == Some(held)).then_some(v)
    })
    .await;
    assert_eq!(stands[0]["member"], true, "{stands}");
    let sales = get(&format!("{url}/v1/stands/north/sales"), Some(&token))
        .await
        .unwrap();
    let units: Vec<i64> = sales
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["units"].as_i64().unwrap())
        .collect();
    assert_eq!(units.iter().sum::<i64>(), 6, "{sales}");
    assert_eq!(units.len(), 3, "{sales}");
    let stock = get(&format!("{url}/v1/stands/north/stock"), Some(&token))
        .await
        .unwrap();
    assert_eq!(stock["items"][0]["available"], 94, "{stock}");
    sqlx::any::install_default_drivers();
    let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let n: i64 = sqlx::Row::get(
        &sqlx::query("SELECT COUNT(*) FROM (SELECT DISTINCT actor, seq FROM changes) AS d")
            .fetch_one(&mut c)
            .await
            .unwrap(),
        0,
    );
    assert_eq!(n as u64, held);

    // The stranger was never let in, and both sides said why.
    eventually(10, "the stranger says why it is not let in", || async {
        x.log()
            .contains("not enrolled in stand north")
            .then_some(())
    })
    .await;
    let refused = relay.log() + &std::fs::read_to_string(d("relay.log")).unwrap_or_default();
    assert!(refused.contains("refused an uplink"), "{refused}");
    assert_eq!(
        available(&api(3), "hotdog").await,
        None,
        "the stranger learned nothing"
    );

    // A till short of rights sells by asking, through the relay, holders it does not reach
    // itself: the relay passes its request on, and the 201 comes after the give.
    let stock = get(&format!("{}/v1/stock", api(1)), None).await.unwrap();
    let own = stock[0]["rights"].as_u64().unwrap();
    let (code, body) = sell(&api(1), own + 1).await;
    assert_eq!(code, 201, "{body}");
    assert!(body["waited_ms"].as_u64().unwrap() > 0, "{body}");
    let v = get(&format!("{url}/v1/stands"), Some(&token))
        .await
        .unwrap();
    assert!(v[0]["rights_forwarded"].as_u64().unwrap() >= 1, "{v}");
    let left = 94 - own as i64 - 1;
    for i in 0..3 {
        eventually(10, "every replica sees the sale made by asking", || async {
            (available(&api(i), "hotdog").await == Some(left)).then_some(())
        })
        .await;
    }
    relay.kill9();
    drop((t0, t1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stand_made_at_the_relay_is_run_from_its_admin_api() {
    use reqwest::Method;
    let peer = peer_bin();
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let relay_bin = Path::new(RELAY);
    let token = |role: &str| {
        run(
            relay_bin,
            &["--database", &db.url, "token", "create", "--role", role],
        )
        .trim()
        .to_owned()
    };
    let (admin, manager, viewer) = (token("admin"), token("manager"), token("viewer"));
    let rport = free_port();
    let _relay = spawn_relay_at(&db.url, rport, dir.path().join("relay.log"));
    let url = format!("http://127.0.0.1:{rport}");
    eventually(10, "the relay is up", || async {
        get(&format!("{url}/v1/relay"), Some(&viewer)).await
    })
    .await;

    let stand = serde_json::json!({
        "stand": "east", "event": "game", "venue": "Field",
        "items": [{"sku": "hotdog", "name": "Hot dog", "price_cents": 400, "stock": 40}],
    });
    let (code, body) = call(
        Method::POST,
        &format!("{url}/v1/stands"),
        &viewer,
        stand.clone(),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = call(Method::POST, &format!("{url}/v1/stands"), &admin, stand).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["placement"], "relay");

    // Enrol a terminal through the admin API; the answer is what it needs to join.
    let data = dir.path().join("t0");
    enrol_till(&peer, &url, &admin, "east", &data, "till0").await;
    let api_port = free_port();
    let _t0 = spawn_till(&peer, &data, api_port, &[rport], None, Some(3000));
    let api = format!("http://127.0.0.1:{api_port}");

    // The pool at the relay allocates to the terminal it reaches; the terminal sells.
    eventually(
        30,
        "the terminal learns the stand from the relay's pool",
        || async { (available(&api, "hotdog").await == Some(40)).then_some(()) },
    )
    .await;
    let (code, body) = sell(&api, 2).await;
    assert_eq!(code, 201, "{body}");

    // A manager restocks; the terminal's stock rises, and the live feed says so.
    let feed = http()
        .get(format!("{url}/v1/stands/east/live"))
        .bearer_auth(&viewer)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    let mut feed = feed.bytes_stream();
    let restock = serde_json::json!({"units": {"hotdog": 10}, "note": "second van"});
    let (code, body) = call(
        Method::POST,
        &format!("{url}/v1/stands/east/restock"),
        &manager,
        restock,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    eventually(10, "the restock reaches the terminal", || async {
        (available(&api, "hotdog").await == Some(48)).then_some(())
    })
    .await;
    let mut seen = String::new();
    let fed = tokio::time::timeout(Duration::from_secs(10), async {
        use futures::StreamExt;
        while let Some(Ok(chunk)) = feed.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("event: stock") && seen.contains(r#""available":48"#) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(fed, Ok(true), "live feed: {seen}");

    // A manager "86"s the item; the terminal refuses it.
    let off = serde_json::json!({"available": false});
    let (code, body) = call(
        Method::PUT,
        &format!("{url}/v1/stands/east/items/hotdog/availability"),
        &manager,
        off,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    eventually(10, "the mark reaches the terminal", || async {
        let stock = get(&format!("{api}/v1/stock"), None).await?;
        (stock[0]["marked_off"] == true).then_some(())
    })
    .await;
    let (code, body) = sell(&api, 1).await;
    assert_eq!(
        (code, &body["refusal"]["reason"]),
        (409, &Value::from("marked_off")),
        "{body}"
    );
    let (code, _) = call(
        Method::POST,
        &format!("{url}/v1/stands/east/restock"),
        &manager,
        serde_json::json!({"units": {"caviar": 1}}),
    )
    .await;
    assert_eq!(code, 404, "an unknown item is refused");

    let stock = get(&format!("{url}/v1/stands/east/stock"), Some(&viewer))
        .await
        .unwrap();
    assert_eq!(stock["items"][0]["available"], 48, "{stock}");
    assert_eq!(stock["items"][0]["marked_off"], true, "{stock}");
}

/// Stand north as the relay instance at `port` lists it.
async fn north_at(port: u16, admin: &str) -> Option<Value> {
    let v = get(&format!("http://127.0.0.1:{port}/v1/stands"), Some(admin)).await?;
    v.as_array()?
        .iter()
        .find(|s| s["stand"] == "north")
        .cloned()
}

/// A till with an uplink to each of `relays`, tried in turn. A sale may wait 2 s for rights:
/// an ask between instances crosses the relay twice each way on a loaded 2-core machine.
fn spawn_peer_to(data: &Path, api: u16, relays: &[u16], relay_key: &str) -> Proc {
    spawn_till(&peer_bin(), data, api, relays, Some(relay_key), Some(2000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_instances_share_a_stand_and_one_survives_the_other() {
    use reqwest::Method;
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let relay_bin = Path::new(RELAY);
    let relay_key = device_stand(&db.url, dir.path(), &[]);
    let admin = run(
        relay_bin,
        &["--database", &db.url, "token", "create", "--role", "admin"],
    )
    .trim()
    .to_owned();

    let (ra, rb) = (free_port(), free_port());
    let up = |port: u16| {
        let admin = admin.clone();
        async move {
            eventually(20, "the relay instance answers", || async {
                get(&format!("http://127.0.0.1:{port}/v1/relay"), Some(&admin)).await
            })
            .await;
        }
    };
    // The pool and till0 start while only A is up, so they are A's (B is their fallback).
    let mut a = spawn_relay_at(&db.url, ra, d("a.log"));
    up(ra).await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let api = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
    let _pool = spawn_peer_to(&d("pool"), ports[0], &[ra, rb], &relay_key);
    let _t0 = spawn_peer_to(&d("t0"), ports[1], &[ra, rb], &relay_key);
    eventually(30, "the pool and till0 are connected to A", || async {
        let north = north_at(ra, &admin).await?;
        (north["connected"].as_array()?.len() == 2).then_some(())
    })
    .await;
    let b = spawn_relay_at(&db.url, rb, d("b.log"));
    up(rb).await;
    let _t1 = spawn_peer_to(&d("t1"), ports[2], &[rb], &relay_key);

    // till0 and the pool on instance A, till1 on B: a sale on A reaches B's terminal.
    learn_then_cross(&api(1), &api(2), "from instance A to instance B").await;

    // till1 sells beyond its rights: B reaches no holder and hands the ask to A, which passes
    // it to a holder there; the answer comes back through B and the 201 follows the give.
    let stock = get(&format!("{}/v1/stock", api(2)), None).await.unwrap();
    let own = stock[0]["rights"].as_u64().unwrap();
    let (code, body) = sell(&api(2), own + 1).await;
    assert_eq!(code, 201, "{body}");
    assert!(body["waited_ms"].as_u64().unwrap() > 0, "{body}");
    let (on_a, on_b) = (
        north_at(ra, &admin).await.unwrap(),
        north_at(rb, &admin).await.unwrap(),
    );
    assert!(
        on_b["rights_asked_elsewhere"].as_u64().unwrap() >= 1,
        "{on_b}"
    );
    assert!(on_a["rights_forwarded"].as_u64().unwrap() >= 1, "{on_a}");
    let left = 97 - own as i64 - 1;
    for i in 0..3 {
        eventually(10, "every replica sees the sale made by asking", || async {
            (available(&api(i), "hotdog").await == Some(left)).then_some(())
        })
        .await;
    }

    // A stand whose pool is at the relay: one instance holds it, the other stands by.
    let east = serde_json::json!({"stand": "east", "event": "game",
        "items": [{"sku": "soda", "name": "Soda", "price_cents": 250, "stock": 10}]});
    let (code, body) = call(
        Method::POST,
        &format!("http://127.0.0.1:{ra}/v1/stands"),
        &admin,
        east,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let restock = |port: u16| {
        let admin = admin.clone();
        async move {
            call(
                Method::POST,
                &format!("http://127.0.0.1:{port}/v1/stands/east/restock"),
                &admin,
                serde_json::json!({"units": {"soda": 5}}),
            )
            .await
        }
    };
    // B learns of the new stand only at its next start; restart B so it stands by for east.
    drop(b);
    let _b = spawn_relay_at(&db.url, rb, d("b2.log"));
    let (code, body) = eventually(10, "instance B answers", || async {
        let (code, body) = restock(rb).await;
        (code != 0 && code != 404 || body["error"] == "served_elsewhere").then_some((code, body))
    })
    .await;
    assert_eq!(
        (code, &body["error"]),
        (503, &Value::from("served_elsewhere")),
        "{body}"
    );
    assert_eq!(restock(ra).await.0, 201);

    // Instance A dies: till0 and the pool move to B, B takes over east's pool, nothing is lost.
    a.kill9();
    let (code, body) = sell(&api(1), 2).await;
    assert_eq!(code, 201, "{body}");
    for i in 0..3 {
        eventually(30, "every replica converges through instance B", || async {
            (available(&api(i), "hotdog").await == Some(left - 2)).then_some(())
        })
        .await;
    }
    eventually(15, "instance B takes over east's pool", || async {
        (restock(rb).await.0 == 201).then_some(())
    })
    .await;
    let audit = get(
        &format!("http://127.0.0.1:{rb}/v1/stands/east/audit/verify"),
        Some(&admin),
    )
    .await
    .unwrap();
    assert_eq!(audit["ok"], true, "{audit}");
    let stock = get(
        &format!("http://127.0.0.1:{rb}/v1/stands/east/stock"),
        Some(&admin),
    )
    .await
    .unwrap();
    assert_eq!(stock["items"][0]["available"], 20, "{stock}");
    let held = get(&format!("{}/v1/status", api(0)), None).await.unwrap()["changes"]
        .as_u64()
        .unwrap();
    let north = eventually(10, "B's store view holds every change of north", || async {
        let n = north_at(rb, &admin).await?;
        (n["changes"].as_u64() == Some(held)).then_some(n)
    })
    .await;
    assert_eq!(north["member"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_pool_carries_out_admin_requests_once_including_those_queued_while_away() {
    use reqwest::Method;
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let relay_key = device_stand(&db.url, dir.path(), &[]);
    let admin = run(
        Path::new(RELAY),
        &["--database", &db.url, "token", "create", "--role", "admin"],
    )
    .trim()
    .to_owned();
    let rport = free_port();
    let url = format!("http://127.0.0.1:{rport}");
    let mut relay = spawn_relay_at(&db.url, rport, d("relay.log"));
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut pool = spawn_peer(&d("pool"), ports[0], rport, &relay_key);
    let _t0 = spawn_peer(&d("t0"), ports[1], rport, &relay_key);
    let till = format!("http://127.0.0.1:{}", ports[1]);
    eventually(
        30,
        "the till learns the stand through the relay",
        || async { (available(&till, "hotdog").await == Some(100)).then_some(()) },
    )
    .await;
    let stock_move = |what: &'static str, units: u64| {
        let (url, admin) = (url.clone(), admin.clone());
        async move {
            call(
                Method::POST,
                &format!("{url}/v1/stands/north/{what}"),
                &admin,
                serde_json::json!({"units": {"hotdog": units}, "note": "from the relay"}),
            )
            .await
        }
    };

    // The pool is connected: the restock is made by it within the call.
    let (code, body) = eventually(20, "the pool answers through its uplink", || async {
        let (code, body) = stock_move("restock", 5).await;
        (code == 201).then_some((code, body))
    })
    .await;
    assert_eq!(code, 201, "{body}");
    assert!(body["pool_seq"].as_u64().is_some(), "{body}");
    eventually(10, "the till sees the restock", || async {
        (available(&till, "hotdog").await == Some(105)).then_some(())
    })
    .await;

    // The pool is away: requests wait, visibly, and one it cannot make is queued too.
    pool.kill9();
    let (code, queued) = stock_move("restock", 7).await;
    assert_eq!(code, 202, "{queued}");
    assert_eq!(queued["status"], "queued", "{queued}");
    let (code, doomed) = stock_move("adjust", 1_000).await;
    assert_eq!(code, 202, "{doomed}");
    let listed = get(&format!("{url}/v1/stands/north/requests"), Some(&admin))
        .await
        .unwrap();
    let status_of = |v: &Value, id: &Value| {
        v.as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == *id))
            .map(|r| r["status"].clone())
    };
    assert_eq!(
        status_of(&listed, &queued["request"]),
        Some("queued".into())
    );

    // The relay restarts meanwhile; the pool comes back: each request is made once.
    relay.kill9();
    let mut relay = spawn_relay_at(&db.url, rport, d("relay2.log"));
    let _pool = spawn_peer(&d("pool"), ports[0], rport, &relay_key);
    let done = eventually(30, "the queued requests are answered", || async {
        let v = get(&format!("{url}/v1/stands/north/requests"), Some(&admin)).await?;
        let open = v.as_array()?.iter().any(|r| r["status"] == "queued");
        (!open).then_some(v)
    })
    .await;
    assert_eq!(
        status_of(&done, &queued["request"]),
        Some("done".into()),
        "{done}"
    );
    assert_eq!(
        status_of(&done, &doomed["request"]),
        Some("refused".into()),
        "{done}"
    );
    eventually(10, "the till sees the queued restock", || async {
        (available(&till, "hotdog").await == Some(112)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(available(&till, "hotdog").await, Some(112), "made once");
    let stock = get(&format!("{url}/v1/stands/north/stock"), Some(&admin))
        .await
        .unwrap();
    assert_eq!(stock["items"][0]["available"], 112, "{stock}");
    relay.kill9();
}

/// A TLS-terminating proxy on loopback in front of 127.0.0.1:`to`, with a certificate for
/// `localhost` issued by a CA made here. Returns its port and the CA's PEM.
async fn tls_proxy(to: u16) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use std::sync::Arc;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut relay) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut relay).await;
            });
        }
    });
    (port, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_reach_a_relay_behind_tls_over_wss() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let relay_key = device_stand(&db.url, dir.path(), &["x"]);
    let rport = free_port();
    let _relay = spawn_relay_at(&db.url, rport, d("relay.log"));
    let (tport, ca) = tls_proxy(rport).await;
    let ca_file = d("relay-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let wss = format!("wss://localhost:{tport}");
    let till = |name: &str, api: u16, trust: bool| {
        let mut args: Vec<String> = [
            "run",
            "--data",
            d(name).to_str().unwrap(),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            &format!("127.0.0.1:{api}"),
            "--no-mdns",
            "--relay",
            &wss,
            "--relay-key",
            &relay_key,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if trust {
            args.extend([
                "--relay-ca".to_owned(),
                ca_file.to_str().unwrap().to_owned(),
            ]);
        }
        Proc::spawn(&peer_bin(), &args, d(name).join("peer.log"))
    };
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let _pool = till("pool", ports[0], true);
    let _t0 = till("t0", ports[1], true);
    let _t1 = till("t1", ports[2], true);
    // A device that does not trust the relay's CA: TLS refuses the relay before any frame.
    let x = till("x", ports[3], false);
    let api = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
    learn_then_cross(&api(1), &api(2), "over wss://").await;
    eventually(10, "the device without the CA says why", || async {
        let log = x.log();
        (log.contains("relay uplink not up") && log.contains("certificate")).then_some(())
    })
    .await;
}
