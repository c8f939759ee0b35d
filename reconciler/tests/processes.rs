#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The reconciler and the fake Stripe as real processes on the machine's Postgres: a
//! reconciler killed (kill -9) after Stripe made the refund and before it recorded the answer,
//! again and again, never makes a second refund.

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod fake;

use common::*;
use fake::try_stats as stats;
use serde_json::{Value, json};
use sqlx::Row;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_halftime-reconciler");

/// This package's program, with `args`.
fn spawn(args: &[&str], log: &std::path::Path) -> Proc {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Proc::spawn(std::path::Path::new(BIN), &args, log.to_path_buf())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciler_killed_between_the_refund_and_its_record_never_refunds_twice() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::postgres().await;
    let db = halftime_reconciler::db::Db::open(&t.url).await.unwrap();
    let stripe_port = free_port();
    let stripe = format!("http://127.0.0.1:{stripe_port}");
    let _fake = spawn(
        &[
            "fake-stripe",
            "--listen",
            &format!("127.0.0.1:{stripe_port}"),
        ],
        &dir.path().join("stripe.log"),
    );
    eventually(20, "the fake Stripe up", || async { stats(&stripe).await }).await;
    sqlx::query(
        "INSERT INTO stands (stand, pool_key, placement, created_at) VALUES ('north', 'k', 'device', 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO items (stand, sku, name, price_cents, total_in, available, marked_off) \
         VALUES ('north', 'hotdog', 'Hot dog', 400, 100, 0, 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let rounds = 3;
    for round in 1..=rounds {
        // One more unit oversold, sold with a card the fake knows.
        let pi = fake::intent(&stripe, 400).await;
        let lines = json!([{ "sku": "hotdog", "qty": 1, "unit_price_cents": 400 }]).to_string();
        sqlx::query(
            "INSERT INTO sales (stand, sale_id, replica, seq, at_ms, lines, units, total_cents, \
             method, reference, offline, voided) VALUES ('north', $1, 'r', $2, $3, $4, 1, 400, 'card', $5, 1, 0)",
        )
        .bind(format!("t0-{round}"))
        .bind(round)
        .bind(1_000 * round)
        .bind(lines)
        .bind(&pi)
        .execute(db.pool())
        .await
        .unwrap();
        sqlx::query("UPDATE items SET available = $1 WHERE stand = 'north'")
            .bind(-round)
            .execute(db.pool())
            .await
            .unwrap();

        // Stripe will do the work and never answer; the reconciler is killed while it waits.
        let r = http()
            .post(format!("{stripe}/_faults"))
            .json(&json!({ "mode": "hang_after" }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let (mut doomed, _) = reconciler(
            &t.url,
            &stripe,
            dir.path(),
            &format!("doomed{round}"),
            &["--stripe-timeout-ms", "2000", "--lease-ms", "2500"],
        );
        let before = round - 1;
        eventually(20, "Stripe refunds the new unit", || {
            let stripe = stripe.clone();
            async move {
                let s = stats(&stripe).await?;
                (s["refunds"].as_i64()? > before).then_some(())
            }
        })
        .await;
        doomed.kill9();
        let status: String = sqlx::query(
            "SELECT o.status FROM refund_outbox o JOIN refund_decisions d ON d.id = o.decision_id \
             WHERE d.sale_id = $1",
        )
        .bind(format!("t0-{round}"))
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
        assert_eq!(
            status, "pending",
            "killed before it could record the refund"
        );

        // Stripe answers again; the next reconciler takes the refund over once the lease ends.
        http()
            .delete(format!("{stripe}/_faults"))
            .send()
            .await
            .unwrap();
        let _next = reconciler(
            &t.url,
            &stripe,
            dir.path(),
            &format!("next{round}"),
            &["--stripe-timeout-ms", "2000", "--lease-ms", "2500"],
        );
        let sale = format!("t0-{round}");
        eventually(30, "the refund recorded as done", || {
            let (pool, sale) = (db.pool().clone(), sale.clone());
            async move {
                let r = sqlx::query(
                    "SELECT o.status FROM refund_outbox o JOIN refund_decisions d \
                     ON d.id = o.decision_id WHERE d.sale_id = $1",
                )
                .bind(sale)
                .fetch_one(&pool)
                .await
                .ok()?;
                let s: String = r.try_get(0).ok()?;
                (s == "done").then_some(())
            }
        })
        .await;
        let s = stats(&stripe).await.unwrap();
        assert_eq!(
            s["refunds"], round,
            "one refund per unit, however it went: {s}"
        );
        assert_eq!(s["by_payment_intent"][&pi]["refunds"], 1, "{s}");
    }
    let s = stats(&stripe).await.unwrap();
    assert!(
        s["replays"].as_i64().unwrap() >= rounds,
        "each retry was answered from Stripe's record: {s}"
    );
}

/// `halftime-reconciler run` named `id` on `db` against the fake Stripe at `stripe`, passes
/// every 100 ms, with `extra` settings; its log is `dir/<id>.log`. Returns it and the port of
/// its `/metrics`.
fn reconciler(
    db: &str,
    stripe: &str,
    dir: &std::path::Path,
    id: &str,
    extra: &[&str],
) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "run",
        "--database",
        db,
        "--stripe-url",
        stripe,
        "--stripe-key",
        "sk_test_halftime",
        "--listen",
        &listen,
        "--id",
        id,
        "--tick-ms",
        "100",
    ];
    args.extend_from_slice(extra);
    (spawn(&args, &dir.join(format!("{id}.log"))), port)
}

/// A relay (a real process) on a fresh Postgres database, serving `stand`, created at the relay
/// from its admin API.
struct Venue {
    relay_bin: std::path::PathBuf,
    peer_bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    db: TestDb,
    relay: Proc,
    rport: u16,
    url: String,
    admin: String,
    viewer: String,
}

impl Venue {
    async fn open(stand: Value) -> Self {
        let (relay_bin, peer_bin) = (
            sibling(BIN, "halftime-relay"),
            sibling(BIN, "halftime-peer"),
        );
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::postgres().await;
        let token = |role: &str| {
            run(
                &relay_bin,
                &["--database", &db.url, "token", "create", "--role", role],
            )
            .trim()
            .to_owned()
        };
        let (admin, viewer) = (token("admin"), token("viewer"));
        let rport = free_port();
        let relay = spawn_relay(&relay_bin, &db.url, rport, dir.path().join("relay.log"));
        let url = format!("http://127.0.0.1:{rport}");
        eventually(20, "the relay up", || async {
            get(&format!("{url}/v1/relay"), Some(&viewer)).await
        })
        .await;
        let (code, body) = call(
            reqwest::Method::POST,
            &format!("{url}/v1/stands"),
            &admin,
            stand,
        )
        .await;
        assert_eq!(code, 201, "{body}");
        Self {
            relay_bin,
            peer_bin,
            dir,
            db,
            relay,
            rport,
            url,
            admin,
            viewer,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimistic_stand_that_oversells_offline_is_refunded_exactly_the_oversold_units() {
    let venue = Venue::open(json!({
        "stand": "east", "event": "game", "venue": "Field", "policy": "optimistic",
        "items": [{"sku": "hotdog", "name": "Hot dog", "price_cents": 400, "stock": 6}],
    }))
    .await;
    let Venue {
        relay_bin,
        peer_bin,
        dir,
        db: t,
        mut relay,
        rport,
        url,
        admin,
        viewer,
    } = venue;

    // Two terminals, on no shared network: they reach each other only through the relay.
    let mut tills = Vec::new();
    for i in 0..2 {
        let data = dir.path().join(format!("t{i}"));
        enrol_till(&peer_bin, &url, &admin, "east", &data, &format!("till{i}")).await;
        let api = free_port();
        let p = spawn_till(&peer_bin, &data, api, &[rport], None, Some(500));
        tills.push((p, format!("http://127.0.0.1:{api}")));
    }
    for (_, api) in &tills {
        let api = api.clone();
        eventually(30, "a till holds rights from the relay's pool", || {
            let api = api.clone();
            async move {
                let s = get(&format!("{api}/v1/stock"), None).await?;
                (s[0]["available"] == 6 && s[0]["rights"].as_i64()? > 0).then_some(())
            }
        })
        .await;
    }

    // A fake Stripe that knows every card payment the tills take.
    let sport = free_port();
    let stripe = format!("http://127.0.0.1:{sport}");
    let _fake = spawn(
        &["fake-stripe", "--listen", &format!("127.0.0.1:{sport}")],
        &dir.path().join("stripe.log"),
    );
    eventually(20, "the fake Stripe up", || async { stats(&stripe).await }).await;

    // The internet drops: the relay is gone. Each till sells on its own until it refuses.
    relay.kill9();
    let mut sold: Vec<(String, String, String)> = Vec::new(); // (sale id, method, reference)
    for (i, (_, api)) in tills.iter().enumerate() {
        for n in 0..20 {
            let (method, reference) = if n == 1 {
                ("cash".to_owned(), String::new())
            } else {
                ("card".to_owned(), fake::intent(&stripe, 400).await)
            };
            let r = http()
                .post(format!("{api}/v1/sales"))
                .json(&json!({"lines":[{"sku":"hotdog","qty":1}],"payment":{"method":method,"reference":reference}}))
                .send()
                .await
                .unwrap();
            let code = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if code != 201 {
                assert_eq!(code, 409, "till {i}: {body}");
                break;
            }
            sold.push((
                body["sale_id"].as_str().unwrap().to_owned(),
                method,
                reference,
            ));
        }
    }
    let oversold = sold.len() as i64 - 6;
    assert!(
        oversold > 0,
        "the tills oversold offline: {} sold of 6",
        sold.len()
    );

    // The reconciler runs from before the heal.
    let (_reconciler, _) = reconciler(&t.url, &stripe, dir.path(), "reconciler", &[]);
    // The internet is back: the relay restarts and the tills hand their sales over.
    let _relay = spawn_relay(&relay_bin, &t.url, rport, dir.path().join("relay2.log"));
    let stock_url = format!("{url}/v1/stands/east/stock");
    eventually(60, "every sale at the relay", || {
        let (stock_url, viewer) = (stock_url.clone(), viewer.clone());
        async move {
            let s = get(&stock_url, Some(&viewer)).await?;
            (s["items"][0]["available"].as_i64()? == 6 - (oversold + 6)).then_some(())
        }
    })
    .await;
    let refunds_url = format!("{url}/v1/stands/east/refunds");
    let refunds = eventually(60, "every oversold unit refunded or listed", || {
        let (refunds_url, viewer) = (refunds_url.clone(), viewer.clone());
        async move {
            let r = get(&refunds_url, Some(&viewer)).await?;
            let rows = r.as_array()?.clone();
            let units: i64 = rows.iter().map(|x| x["units"].as_i64().unwrap_or(0)).sum();
            let settled = rows
                .iter()
                .all(|x| x["status"] == "done" || x["status"] == "manual");
            (units == oversold && settled).then_some(rows)
        }
    })
    .await;

    // Exactly the oversold units, each once; the latest sales; cash on the manual list.
    let st = stats(&stripe).await.unwrap();
    let card_refunds = refunds.iter().filter(|r| r["method"] == "card").count();
    assert_eq!(st["refunds"], card_refunds as u64, "{st}");
    for r in &refunds {
        let (_, method, reference) = sold.iter().find(|s| s.0 == r["sale_id"]).unwrap();
        assert_eq!(&r["method"], method.as_str());
        if method == "card" {
            assert_eq!(r["status"], "done");
            assert_eq!(st["by_payment_intent"][reference]["refunds"], 1, "{st}");
            assert_eq!(st["by_payment_intent"][reference]["amount"], 400, "{st}");
        } else {
            assert_eq!(r["status"], "manual");
        }
    }
    let refunded: Vec<&str> = refunds
        .iter()
        .map(|r| r["sale_id"].as_str().unwrap())
        .collect();
    for (id, method, reference) in &sold {
        if method == "card" && !refunded.contains(&id.as_str()) {
            assert!(
                st["by_payment_intent"].get(reference).is_none(),
                "{id} was served: {st}"
            );
        }
    }
    // Nothing more is decided later.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        stats(&stripe).await.unwrap()["refunds"],
        card_refunds as u64
    );

    // Each refund reaches the stand as a change of its pool: every till shows it on the sale.
    let mut shown = 0;
    for (_, api) in &tills {
        let (api, refunds) = (api.clone(), refunds.clone());
        let n = eventually(30, "the till shows every refund of its sales", || {
            let (api, refunds) = (api.clone(), refunds.clone());
            async move {
                let mine = get(&format!("{api}/v1/sales"), None).await?;
                let mine = mine.as_array()?;
                let all = mine.iter().all(|s| {
                    let owed: i64 = refunds
                        .iter()
                        .filter(|r| r["sale_id"] == s["sale_id"])
                        .map(|r| r["units"].as_i64().unwrap_or(0))
                        .sum();
                    s["refunded"]["hotdog"].as_i64().unwrap_or(0) == owed
                });
                let n: i64 = mine
                    .iter()
                    .map(|s| s["refunded"]["hotdog"].as_i64().unwrap_or(0))
                    .sum();
                all.then_some(n)
            }
        })
        .await;
        shown += n;
    }
    assert_eq!(shown, oversold, "the tills show every refunded unit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_terminal_that_kept_selling_hands_its_sales_over_and_they_are_refunded() {
    let venue = Venue::open(json!({
        "stand": "west", "event": "game", "venue": "Field",
        "items": [{"sku": "hotdog", "name": "Hot dog", "price_cents": 400, "stock": 10}],
    }))
    .await;
    let Venue {
        relay_bin: _,
        peer_bin,
        dir,
        db: t,
        relay: _relay,
        rport,
        url,
        admin,
        viewer,
    } = venue;
    let (d0, d1) = (dir.path().join("t0"), dir.path().join("t1"));
    enrol_till(&peer_bin, &url, &admin, "west", &d0, "till0").await;
    enrol_till(&peer_bin, &url, &admin, "west", &d1, "till1").await;
    let (a0, a1) = (free_port(), free_port());
    let _t0 = spawn_till(&peer_bin, &d0, a0, &[rport], None, Some(500));
    let mut t1 = spawn_till(&peer_bin, &d1, a1, &[rport], None, Some(500));
    let (api0, api1) = (
        format!("http://127.0.0.1:{a0}"),
        format!("http://127.0.0.1:{a1}"),
    );
    let rights = |api: String| async move {
        get(&format!("{api}/v1/stock"), None).await?[0]["rights"].as_i64()
    };
    for api in [&api0, &api1] {
        let api = api.clone();
        eventually(30, "a till holds rights", || {
            let api = api.clone();
            async move { (rights(api).await? > 0).then_some(()) }
        })
        .await;
    }
    let status = get(&format!("{api1}/v1/status"), None).await.unwrap();
    let till1 = status["replica"].as_str().unwrap().to_owned();

    // Till 1 loses the internet and keeps selling on its own (restarted without its uplink;
    // a clean stop, so the rights it was just given are on its disk).
    let pid = t1.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(t1.child.wait().unwrap().success());
    let mut t1 = spawn_till(&peer_bin, &d1, a1, &[], None, Some(500));
    eventually(20, "till 1 back, alone", || async {
        get(&format!("{api1}/v1/status"), None).await
    })
    .await;
    let mut late = Vec::new();
    for _ in 0..3 {
        let r = http()
            .post(format!("{api1}/v1/sales"))
            .json(&json!({"lines":[{"sku":"hotdog","qty":1}],"payment":{"method":"cash","reference":""}}))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_eq!(code, 201, "{b}");
        late.push(b["sale_id"].as_str().unwrap().to_owned());
    }
    // Meanwhile the manager reclaims it, and till 0 sells everything the stand has left.
    let (code, body) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/stands/west/replicas/{till1}/reclaim"),
        &admin,
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["rights"]["hotdog"], 5,
        "what it held, moved back: {body}"
    );
    let mut sold0 = 0;
    for _ in 0..20 {
        let r = http()
            .post(format!("{api0}/v1/sales"))
            .json(&json!({"lines":[{"sku":"hotdog","qty":1}],"payment":{"method":"cash","reference":""}}))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() != 201 {
            break;
        }
        sold0 += 1;
    }
    let stock_url = format!("{url}/v1/stands/west/stock");
    let available = |stock_url: String, viewer: String| async move {
        get(&stock_url, Some(&viewer)).await?["items"][0]["available"].as_i64()
    };
    assert_eq!(sold0, 10, "till 0 sold out the stand after the reclaim");
    eventually(20, "every sale of till 0 at the relay", || {
        let (s, v) = (stock_url.clone(), viewer.clone());
        async move { (available(s, v).await? == 0).then_some(()) }
    })
    .await;

    // Till 1 is back online: retired, it may only hand over. Its three sales reach the record.
    t1.kill9();
    let t1 = spawn_till(&peer_bin, &d1, a1, &[rport], None, Some(500));
    let since = std::time::Instant::now();
    while available(stock_url.clone(), viewer.clone()).await != Some(-3) {
        // On failure, say why from both sides.
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the late sales did not reach the relay in 30 s.\n--- till 1 ---\n{}\n--- relay ---\n{}",
            t1.log(),
            std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relay_log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap();
    assert!(
        relay_log.contains("a retired replica connected"),
        "{relay_log}"
    );
    let sales = get(&format!("{url}/v1/stands/west/sales"), Some(&viewer))
        .await
        .unwrap();
    for id in &late {
        assert!(
            sales.to_string().contains(id.as_str()),
            "{id} not stored: {sales}"
        );
    }

    // The reconciler refunds the three units oversold, each once: the latest sales by time.
    let sport = free_port();
    let stripe = format!("http://127.0.0.1:{sport}");
    let _fake = spawn(
        &["fake-stripe", "--listen", &format!("127.0.0.1:{sport}")],
        &dir.path().join("stripe.log"),
    );
    let (_reconciler, _) = reconciler(&t.url, &stripe, dir.path(), "reconciler", &[]);
    let refunds_url = format!("{url}/v1/stands/west/refunds");
    let refunds = eventually(30, "the oversold units refunded", || {
        let (u, v) = (refunds_url.clone(), viewer.clone());
        async move {
            let rows = get(&u, Some(&v)).await?.as_array()?.clone();
            let units: i64 = rows.iter().map(|x| x["units"].as_i64().unwrap_or(0)).sum();
            (units == 3).then_some(rows)
        }
    })
    .await;
    let mut by_time: Vec<(i64, String)> = sales
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["voided"].as_bool().unwrap_or(false))
        .map(|s| {
            (
                s["at_ms"].as_i64().unwrap(),
                s["sale_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    by_time.sort();
    let mut latest: Vec<String> = by_time.iter().rev().take(3).map(|x| x.1.clone()).collect();
    let mut refunded: Vec<String> = refunds
        .iter()
        .map(|r| r["sale_id"].as_str().unwrap().to_owned())
        .collect();
    latest.sort();
    refunded.sort();
    assert_eq!(refunded, latest, "{refunds:?}");
    assert!(
        refunds.iter().all(|r| r["status"] == "manual"),
        "cash: {refunds:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = get(&refunds_url, Some(&viewer)).await.unwrap();
    assert_eq!(
        again.as_array().unwrap().len(),
        refunds.len(),
        "nothing decided twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_down_for_30_seconds_then_everything_owed_is_refunded_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::postgres().await;
    let db = halftime_reconciler::db::Db::open(&t.url).await.unwrap();
    let sport = free_port();
    let stripe = format!("http://127.0.0.1:{sport}");
    let _fake = spawn(
        &["fake-stripe", "--listen", &format!("127.0.0.1:{sport}")],
        &dir.path().join("stripe.log"),
    );
    eventually(20, "the fake Stripe up", || async { stats(&stripe).await }).await;
    sqlx::query(
        "INSERT INTO stands (stand, pool_key, placement, created_at) VALUES ('north', 'k', 'device', 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let n = 12;
    let mut pis = Vec::new();
    for i in 1..=n {
        let pi = fake::intent(&stripe, 400).await;
        let lines = json!([{ "sku": "hotdog", "qty": 1, "unit_price_cents": 400 }]).to_string();
        sqlx::query(
            "INSERT INTO sales (stand, sale_id, replica, seq, at_ms, lines, units, total_cents, \
             method, reference, offline, voided) VALUES ('north', $1, 'r', $2, $2, $3, 1, 400, 'card', $4, 1, 0)",
        )
        .bind(format!("t0-{i}"))
        .bind(i as i64)
        .bind(lines)
        .bind(&pi)
        .execute(db.pool())
        .await
        .unwrap();
        pis.push(pi);
    }
    // Stripe answers 500 to everything for 30 s from now.
    fake::fault(&stripe, Some(json!({ "mode": "error", "for_ms": 30_000 }))).await;
    let down = std::time::Instant::now();
    sqlx::query(
        "INSERT INTO items (stand, sku, name, price_cents, total_in, available, marked_off) \
         VALUES ('north', 'hotdog', 'Hot dog', 400, 0, $1, 0)",
    )
    .bind(-(n as i64))
    .execute(db.pool())
    .await
    .unwrap();
    let (_reconciler, mport) = reconciler(
        &t.url,
        &stripe,
        dir.path(),
        "reconciler",
        &[
            "--backoff-base-ms",
            "200",
            "--backoff-max-ms",
            "2000",
            "--max-attempts",
            "100",
        ],
    );
    let pool = db.pool().clone();
    let statuses = || {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "SELECT status, CAST(COUNT(*) AS BIGINT) FROM refund_outbox GROUP BY status",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.try_get::<String, _>(0).unwrap(),
                    r.try_get::<i64, _>(1).unwrap(),
                )
            })
            .collect::<Vec<_>>()
        }
    };
    // While it is down: every unit decided, none refunded, the attempts retried.
    eventually(20, "every unit decided", || async {
        (statuses().await == vec![("pending".to_owned(), n as i64)]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(stats(&stripe).await.unwrap()["refunds"], 0);
    let m = http()
        .get(format!("http://127.0.0.1:{mport}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("halftime_reconciler_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(retries >= n as u64, "{m}");
    // Once it is back, everything owed is refunded, each once.
    eventually(60, "every refund done", || async {
        (statuses().await == vec![("done".to_owned(), n as i64)]).then_some(())
    })
    .await;
    assert!(
        down.elapsed() >= Duration::from_secs(30),
        "not before Stripe was back"
    );
    let s = stats(&stripe).await.unwrap();
    assert_eq!(s["refunds"], n, "{s}");
    for pi in &pis {
        assert_eq!(s["by_payment_intent"][pi]["refunds"], 1, "{s}");
    }
}
