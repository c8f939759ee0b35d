#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The reconciler against the fake Stripe, on SQLite and on the machine's Postgres: decisions,
//! the outbox, retries, lost answers and two reconcilers at once.

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod fake;

use common::{TestDb, http};
use fake::{fault, intent, stats};
use halftime_reconciler::db::Db;
use halftime_reconciler::fake_stripe::FakeStripe;
use halftime_reconciler::pay::Payer;
use halftime_reconciler::worker::{self, Config, Metrics};
use serde_json::{Value, json};
use sqlx::Row;
use std::time::Duration;

async fn fake() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, FakeStripe::default().router()).await });
    format!("http://{addr}/")
}

fn cfg(id: &str) -> Config {
    Config {
        id: id.into(),
        tick: Duration::from_millis(20),
        lease: Duration::from_millis(800),
        batch: 16,
        max_attempts: 50,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
    }
}

fn payer(stripe: &str) -> Payer {
    Payer::new(stripe, "sk_test_halftime", Duration::from_millis(400))
}

/// A stand with one item, `available` units left (negative: oversold), and its sales:
/// (sale id, time, quantity, method, reference, voided).
async fn seed(db: &Db, stand: &str, available: i64, sales: &[(&str, i64, u64, &str, &str, bool)]) {
    let p = db.pool();
    sqlx::query(
        "INSERT INTO stands (stand, pool_key, placement, created_at) VALUES ($1, 'k', 'device', 0) \
         ON CONFLICT (stand) DO NOTHING",
    )
    .bind(stand)
    .execute(p)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO items (stand, sku, name, price_cents, total_in, available, marked_off) \
         VALUES ($1, 'hotdog', 'Hot dog', 400, 100, $2, 0) \
         ON CONFLICT (stand, sku) DO UPDATE SET available = $2",
    )
    .bind(stand)
    .bind(available)
    .execute(p)
    .await
    .unwrap();
    for (i, (id, at, qty, method, reference, voided)) in sales.iter().enumerate() {
        let lines = json!([{ "sku": "hotdog", "qty": qty, "unit_price_cents": 400 }]).to_string();
        sqlx::query(
            "INSERT INTO sales (stand, sale_id, replica, seq, at_ms, lines, units, total_cents, \
             method, reference, offline, voided) VALUES ($1, $2, 'r', $3, $4, $5, $6, $7, $8, $9, 0, $10)",
        )
        .bind(stand)
        .bind(*id)
        .bind(i as i64 + 1)
        .bind(*at)
        .bind(lines)
        .bind(*qty as i64)
        .bind(*qty as i64 * 400)
        .bind(*method)
        .bind(*reference)
        .bind(i64::from(*voided))
        .execute(p)
        .await
        .unwrap();
    }
}

/// (sale id, units, status, last error) per decision, by sale id.
async fn refunds(db: &Db) -> Vec<(String, i64, String, Option<String>)> {
    sqlx::query(
        "SELECT d.sale_id, d.units, o.status, o.last_error FROM refund_decisions d \
         JOIN refund_outbox o ON o.decision_id = d.id ORDER BY d.sale_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        (
            r.try_get(0).unwrap(),
            r.try_get(1).unwrap(),
            r.try_get(2).unwrap(),
            r.try_get(3).unwrap(),
        )
    })
    .collect()
}

/// Run passes until none has anything to pay and nothing is pending, or `secs` pass.
async fn settle(db: &Db, p: &Payer, c: &Config, secs: u64) {
    let m = Metrics::default();
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let busy = worker::pass(db, p, c, &m).await;
        let pending = refunds(db).await.iter().any(|r| r.2 == "pending");
        if !busy && !pending {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "refunds still pending after {secs} s: {:?}",
            refunds(db).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_fake_keeps_stripes_rules() {
    let stripe = fake().await;
    let pi = intent(&stripe, 1000).await;
    let refund = |key: &'static str, amount: &'static str, pi: String| {
        let stripe = stripe.clone();
        async move {
            let r = http()
                .post(format!("{stripe}v1/refunds"))
                .header("Idempotency-Key", key)
                .form(&[("payment_intent", pi.as_str()), ("amount", amount)])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s1, b1) = refund("k1", "400", pi.clone()).await;
    assert_eq!(s1, 200, "{b1}");
    // Same key, same parameters: the same refund, nothing new.
    let (s2, b2) = refund("k1", "400", pi.clone()).await;
    assert_eq!((s2, &b2["id"]), (200, &b1["id"]));
    // Same key, other parameters: Stripe's idempotency error.
    let (s3, b3) = refund("k1", "500", pi.clone()).await;
    assert_eq!(
        (s3, b3["error"]["type"].as_str()),
        (400, Some("idempotency_error"))
    );
    // Never more than was charged.
    let (s4, b4) = refund("k2", "700", pi.clone()).await;
    assert_eq!(
        (s4, b4["error"]["code"].as_str()),
        (400, Some("amount_too_large"))
    );
    let (s5, _) = refund("k3", "600", pi.clone()).await;
    assert_eq!(s5, 200);
    let (s6, b6) = refund("k4", "1", pi.clone()).await;
    assert_eq!(
        (s6, b6["error"]["code"].as_str()),
        (400, Some("charge_already_refunded"))
    );
    // An unknown payment intent, in Stripe's error shape.
    let (s7, b7) = refund("k5", "1", "pi_nope".into()).await;
    assert_eq!(s7, 404);
    assert_eq!(b7["error"]["code"], "resource_missing");
    assert_eq!(b7["error"]["param"], "payment_intent");
    // A 500 is not remembered: the same key works once Stripe is back.
    let pi2 = intent(&stripe, 300).await;
    fault(&stripe, Some(json!({ "mode": "error" }))).await;
    let (s8, b8) = refund("k6", "300", pi2.clone()).await;
    assert_eq!((s8, b8["error"]["type"].as_str()), (500, Some("api_error")));
    fault(&stripe, None).await;
    let (s9, _) = refund("k6", "300", pi2.clone()).await;
    assert_eq!(s9, 200);
    let st = stats(&stripe).await;
    assert_eq!(st["refunds"], 3);
    assert_eq!(st["by_payment_intent"][&pi]["amount"], 1000);
    assert_eq!(st["replays"], 1);
    // A fault mode it does not know is refused.
    let r = http()
        .post(format!("{stripe}_faults"))
        .json(&json!({ "mode": "explode" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

async fn oversold_units_are_refunded_once(db: TestDb) {
    let stripe = fake().await;
    let db = Db::open(&db.url).await.unwrap();
    let (a, b, c) = (
        intent(&stripe, 800).await,
        intent(&stripe, 400).await,
        intent(&stripe, 400).await,
    );
    // Three units oversold. The latest sale was voided: it is not refunded.
    seed(
        &db,
        "north",
        -3,
        &[
            ("t0-1", 1_000, 2, "card", &a, false),
            ("t1-1", 2_000, 1, "cash", "", false),
            ("t0-2", 3_000, 1, "card", &b, false),
            ("t1-2", 4_000, 1, "card", &c, true),
            ("t0-0", 500, 1, "card", "not-a-payment-intent", false),
        ],
    )
    .await;
    let p = payer(&stripe);
    settle(&db, &p, &cfg("r1"), 10).await;
    let got = refunds(&db).await;
    let brief: Vec<(&str, i64, &str)> = got
        .iter()
        .map(|(s, u, st, _)| (s.as_str(), *u, st.as_str()))
        .collect();
    assert_eq!(
        brief,
        vec![
            ("t0-1", 1, "done"),
            ("t0-2", 1, "done"),
            ("t1-1", 1, "manual")
        ]
    );
    let st = stats(&stripe).await;
    assert_eq!(st["refunds"], 2);
    assert_eq!(st["by_payment_intent"][&a]["amount"], 400);
    assert_eq!(st["by_payment_intent"][&b]["amount"], 400);
    assert!(st["by_payment_intent"].get(&c).is_none());

    // Passes after that decide and pay nothing more.
    settle(&db, &p, &cfg("r1"), 10).await;
    assert_eq!(stats(&stripe).await["refunds"], 2);
    // One more unit oversold: the only line left is a card sale without a payment intent,
    // a dead letter with the reason.
    seed(&db, "north", -4, &[]).await;
    settle(&db, &p, &cfg("r1"), 10).await;
    let last = refunds(&db).await;
    let dead = last.iter().find(|r| r.0 == "t0-0").unwrap();
    assert_eq!(dead.2, "dead");
    assert!(
        dead.3.as_deref().unwrap().contains("payment intent"),
        "{dead:?}"
    );
    // A decision is never undone.
    let r = sqlx::query("UPDATE refund_decisions SET units = 0")
        .execute(db.pool())
        .await;
    assert!(r.is_err());
    let r = sqlx::query("DELETE FROM refund_decisions")
        .execute(db.pool())
        .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn oversold_units_are_refunded_once_on_sqlite() {
    oversold_units_are_refunded_once(TestDb::sqlite()).await;
}

#[tokio::test]
async fn oversold_units_are_refunded_once_on_postgres() {
    oversold_units_are_refunded_once(TestDb::postgres().await).await;
}

#[tokio::test]
async fn stripe_down_then_up_and_a_lost_answer_refund_once() {
    let stripe = fake().await;
    let t = TestDb::postgres().await;
    let db = Db::open(&t.url).await.unwrap();
    let pis: Vec<String> = futures::future::join_all((0..4).map(|_| intent(&stripe, 400))).await;
    let sales: Vec<(String, i64, u64, &str, String, bool)> = pis
        .iter()
        .enumerate()
        .map(|(i, pi)| {
            (
                format!("t0-{}", i + 1),
                i as i64,
                1,
                "card",
                pi.clone(),
                false,
            )
        })
        .collect();
    let sales: Vec<(&str, i64, u64, &str, &str, bool)> = sales
        .iter()
        .map(|(a, b, c, d, e, f)| (a.as_str(), *b, *c, *d, e.as_str(), *f))
        .collect();
    seed(&db, "north", -2, &sales).await;
    let p = payer(&stripe);
    let c = cfg("r1");
    let m = Metrics::default();

    // Stripe down: the attempts fail, nothing is paid, the refunds stay pending.
    fault(&stripe, Some(json!({ "mode": "error" }))).await;
    for _ in 0..5 {
        worker::pass(&db, &p, &c, &m).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = refunds(&db).await;
    assert_eq!(now.len(), 2);
    assert!(
        now.iter()
            .all(|r| r.2 == "pending" && r.3.as_deref().unwrap().contains("500")),
        "{now:?}"
    );
    // Hanging: the client's timeout ends each attempt.
    fault(&stripe, Some(json!({ "mode": "hang" }))).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    worker::pass(&db, &p, &c, &m).await;
    let now = refunds(&db).await;
    assert!(
        now.iter()
            .any(|r| r.3.as_deref().unwrap_or("").contains("no answer")),
        "{now:?}"
    );
    // Stripe does the work but the answer is lost: the next attempt gets the same refund.
    fault(&stripe, Some(json!({ "mode": "hang_after" }))).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    worker::pass(&db, &p, &c, &m).await;
    assert_eq!(
        stats(&stripe).await["refunds"],
        2,
        "Stripe refunded, the reconciler did not hear"
    );
    fault(&stripe, None).await;
    settle(&db, &p, &c, 10).await;
    assert!(refunds(&db).await.iter().all(|r| r.2 == "done"));
    let st = stats(&stripe).await;
    assert_eq!(st["refunds"], 2, "{st}");
    assert!(st["replays"].as_u64().unwrap() >= 2, "{st}");
}

#[tokio::test]
async fn too_many_failures_make_a_dead_letter_with_the_reason() {
    let stripe = fake().await;
    let t = TestDb::sqlite();
    let db = Db::open(&t.url).await.unwrap();
    let pi = intent(&stripe, 400).await;
    seed(&db, "north", -1, &[("t0-1", 1, 1, "card", &pi, false)]).await;
    fault(&stripe, Some(json!({ "mode": "error" }))).await;
    let c = Config {
        max_attempts: 3,
        ..cfg("r1")
    };
    settle(&db, &payer(&stripe), &c, 10).await;
    let r = refunds(&db).await;
    assert_eq!(r[0].2, "dead");
    assert!(
        r[0].3
            .as_deref()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{r:?}"
    );
    assert_eq!(stats(&stripe).await["refunds"], 0);
}

#[tokio::test]
async fn two_reconcilers_on_one_postgres_pay_each_refund_once() {
    let stripe = fake().await;
    let t = TestDb::postgres().await;
    let setup = Db::open(&t.url).await.unwrap();
    let n = 40;
    let pis: Vec<String> = futures::future::join_all((0..n).map(|_| intent(&stripe, 400))).await;
    let owned: Vec<(String, String)> = pis
        .iter()
        .enumerate()
        .map(|(i, pi)| (format!("t{}-{}", i % 4, i / 4 + 1), pi.clone()))
        .collect();
    let sales: Vec<(&str, i64, u64, &str, &str, bool)> = owned
        .iter()
        .enumerate()
        .map(|(i, (id, pi))| (id.as_str(), i as i64, 1, "card", pi.as_str(), false))
        .collect();
    seed(&setup, "north", -(n as i64), &sales).await;
    // Slow answers, so the two overlap in every pass.
    fault(&stripe, Some(json!({ "mode": "slow", "delay_ms": 15 }))).await;
    let run = |id: &'static str| {
        let (url, stripe) = (t.url.clone(), stripe.clone());
        tokio::spawn(async move {
            let db = Db::open(&url).await.unwrap();
            let c = Config {
                batch: 4,
                ..cfg(id)
            };
            settle(&db, &payer(&stripe), &c, 30).await;
        })
    };
    let (a, b) = (run("r1"), run("r2"));
    a.await.unwrap();
    b.await.unwrap();
    let r = refunds(&setup).await;
    assert_eq!(r.len(), n);
    assert!(r.iter().all(|x| x.2 == "done"), "{r:?}");
    let st = stats(&stripe).await;
    assert_eq!(st["refunds"], n as u64, "{st}");
    for pi in &pis {
        assert_eq!(st["by_payment_intent"][pi]["refunds"], 1, "{pi}: {st}");
    }
    // Both did some of the work.
    let by: Vec<String> = sqlx::query("SELECT DISTINCT leased_by FROM refund_outbox")
        .fetch_all(setup.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.try_get(0).unwrap())
        .collect();
    assert_eq!(by.len(), 2, "{by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_admin_api_shows_refunds_and_takes_cash_paid_out() {
    use halftime_relay::server::{App, router};
    use halftime_relay::store::{AdminRole, Store};
    let stripe = fake().await;
    let t = TestDb::sqlite();
    let store = Store::open(&t.url).await.unwrap();
    let viewer = store.create_token("v", AdminRole::Viewer, 1).await.unwrap();
    let manager = store
        .create_token("m", AdminRole::Manager, 1)
        .await
        .unwrap();
    let admin = store.create_token("a", AdminRole::Admin, 1).await.unwrap();
    let app = App::new(store).await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, router(app)).await });
    let pool_key = halftime_ledger::ReplicaKey::from_seed([1; 32])
        .public()
        .to_string();
    let made = http()
        .post(format!("{relay}/v1/stands"))
        .bearer_auth(&admin)
        .json(&json!({ "stand": "north", "pool_key": pool_key }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        made.status().as_u16(),
        201,
        "{}",
        made.text().await.unwrap()
    );
    let db = Db::open(&t.url).await.unwrap();
    let pi = intent(&stripe, 400).await;
    seed(
        &db,
        "north",
        -2,
        &[
            ("t0-1", 1, 1, "cash", "", false),
            ("t0-2", 2, 1, "card", &pi, false),
        ],
    )
    .await;
    settle(&db, &payer(&stripe), &cfg("r1"), 10).await;

    let list: Value = http()
        .get(format!("{relay}/v1/stands/north/refunds"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{list}");
    let cash = rows.iter().find(|r| r["method"] == "cash").unwrap();
    let card = rows.iter().find(|r| r["method"] == "card").unwrap();
    assert_eq!(cash["status"], "manual");
    assert_eq!(card["status"], "done");
    assert!(card["stripe_refund"].as_str().unwrap().starts_with("re_"));
    assert_eq!(card["amount_cents"], 400);
    assert_eq!(card["available_then"], -2);

    let paid = |id: String, token: String, body: Value| {
        let relay = relay.clone();
        async move {
            let r = http()
                .post(format!("{relay}/v1/stands/north/refunds/{id}/paid-out"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let cash_id = cash["id"].to_string();
    let card_id = card["id"].to_string();
    let by = json!({ "by": "Jo at the stand" });
    assert_eq!(
        paid(cash_id.clone(), viewer.clone(), by.clone()).await.0,
        403
    );
    assert_eq!(
        paid(
            cash_id.clone(),
            manager.clone(),
            json!({ "by": "Jo", "amount": 1 })
        )
        .await
        .0,
        400
    );
    assert_eq!(
        paid(cash_id.clone(), manager.clone(), json!({ "by": " " }))
            .await
            .0,
        400
    );
    assert_eq!(paid("x".into(), manager.clone(), by.clone()).await.0, 400);
    let (s, b) = paid("999".into(), manager.clone(), by.clone()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (404, Some("unknown_refund")),
        "{b}"
    );
    let (s, b) = paid(cash_id.clone(), manager.clone(), by.clone()).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("paid_out")), "{b}");
    let (s, b) = paid(cash_id.clone(), manager.clone(), by.clone()).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (409, Some("not_a_cash_refund")),
        "{b}"
    );
    let (s, _) = paid(card_id, manager.clone(), by.clone()).await;
    assert_eq!(s, 409);

    let m = http()
        .get(format!("{relay}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("halftime_refunds{status=\"paid_out\"} 1"), "{m}");
    assert!(m.contains("halftime_refunds{status=\"done\"} 1"), "{m}");
}
