#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The reconciler and the fake Stripe as real processes on the machine's Postgres: a
//! reconciler killed (kill -9) after Stripe made the refund and before it recorded the answer,
//! again and again, never makes a second refund.

#[path = "../../relay/tests/common/mod.rs"]
mod common;

use common::{TestDb, eventually};
use serde_json::{Value, json};
use sqlx::Row;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_halftime-reconciler");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], log: &std::path::Path) -> Proc {
    Proc(
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn stats(stripe: &str) -> Option<Value> {
    http()
        .get(format!("{stripe}/_stats"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
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
        let pi: Value = http()
            .post(format!("{stripe}/v1/payment_intents"))
            .form(&[("amount", "400"), ("currency", "usd")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pi = pi["id"].as_str().unwrap().to_owned();
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
        let mut doomed = reconciler(&t.url, &stripe, dir.path(), &format!("doomed{round}"));
        let before = round - 1;
        eventually(20, "Stripe refunds the new unit", || {
            let stripe = stripe.clone();
            async move {
                let s = stats(&stripe).await?;
                (s["refunds"].as_i64()? > before).then_some(())
            }
        })
        .await;
        doomed.0.kill().unwrap();
        doomed.0.wait().unwrap();
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
        let _next = reconciler(&t.url, &stripe, dir.path(), &format!("next{round}"));
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

fn reconciler(db: &str, stripe: &str, dir: &std::path::Path, id: &str) -> Proc {
    let listen = format!("127.0.0.1:{}", free_port());
    spawn(
        &[
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
            "--stripe-timeout-ms",
            "2000",
            "--lease-ms",
            "2500",
            "--tick-ms",
            "100",
        ],
        &dir.join(format!("{id}.log")),
    )
}
