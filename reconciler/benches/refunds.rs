//! Refunds against the fake Stripe answering every call after 10 ms, on the machine's Postgres:
//! how many refunds a reconciler completes per second, and how long from the commit that
//! oversells (with the relay's NOTIFY) until the refund is recorded as done.
//!
//! `cargo bench -p halftime-reconciler --bench refunds` (Postgres at 127.0.0.1:5432, or
//! HALFTIME_BENCH_POSTGRES; a database of its own is made and dropped).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/fake/mod.rs"]
mod fake;

use halftime_reconciler::db::Db;
use halftime_reconciler::fake_stripe::FakeStripe;
use halftime_reconciler::pay::Payer;
use halftime_reconciler::worker::{self, Config, Metrics};
use serde_json::{Value, json};
use sqlx::{Connection, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REFUNDS: usize = 2_000;
const LATENCY_SAMPLES: usize = 200;

fn cfg(batch: i64) -> Config {
    Config {
        id: "bench".into(),
        tick: Duration::from_millis(500),
        lease: Duration::from_secs(15),
        batch,
        max_attempts: 12,
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
    }
}

/// One more oversold unit of `stand`, sold with `pi`, committed with the relay's NOTIFY.
async fn oversell(db: &Db, stand: &str, n: i64, pi: &str) {
    let mut tx = db.pool().begin().await.unwrap();
    let lines = json!([{ "sku": "hotdog", "qty": 1, "unit_price_cents": 400 }]).to_string();
    sqlx::query(
        "INSERT INTO sales (stand, sale_id, replica, seq, at_ms, lines, units, total_cents, \
         method, reference, offline, voided) VALUES ($1, $2, 'r', $3, $3, $4, 1, 400, 'card', $5, 1, 0)",
    )
    .bind(stand)
    .bind(format!("t0-{n}"))
    .bind(n)
    .bind(lines)
    .bind(pi)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE items SET available = $1 WHERE stand = $2")
        .bind(-n)
        .bind(stand)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify('halftime_changes', $1)")
        .bind(stand)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn stand(db: &Db, stand: &str) {
    sqlx::query(
        "INSERT INTO stands (stand, pool_key, placement, created_at) VALUES ($1, 'k', 'device', 0)",
    )
    .bind(stand)
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO items (stand, sku, name, price_cents, total_in, available, marked_off) \
         VALUES ($1, 'hotdog', 'Hot dog', 400, 0, 0, 0)",
    )
    .bind(stand)
    .execute(db.pool())
    .await
    .unwrap();
}

async fn intents(stripe: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(fake::intent(stripe, 400).await);
    }
    out
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    sqlx::any::install_default_drivers();
    let admin = std::env::var("HALFTIME_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("halftime_bench_refunds_{}", std::process::id());
    let mut c = sqlx::AnyConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stripe = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, FakeStripe::default().router()).await });
    let db = Db::open(&url).await.unwrap();
    let payer = Payer::new(&stripe, "sk_test_bench", Duration::from_secs(10));
    let http = reqwest::Client::new();
    http.post(format!("{stripe}_faults"))
        .json(&json!({ "mode": "slow", "delay_ms": 10 }))
        .send()
        .await
        .unwrap();
    println!("halftime-reconciler benchmarks: fake Stripe answering after 10 ms, Postgres");

    // 1. Throughput: REFUNDS oversold units at once, one reconciler, per batch size.
    for batch in [1i64, 8, 32] {
        let s = format!("tp{batch}");
        stand(&db, &s).await;
        let pis = intents(&stripe, REFUNDS).await;
        for (i, pi) in pis.iter().enumerate() {
            oversell(&db, &s, i as i64 + 1, pi).await;
        }
        let m = Metrics::default();
        let t = Instant::now();
        loop {
            let busy = worker::pass(&db, &payer, &cfg(batch), &m).await;
            let left: i64 = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM refund_outbox o JOIN refund_decisions d \
                 ON d.id = o.decision_id WHERE d.stand = $1 AND o.status <> 'done'",
            )
            .bind(&s)
            .fetch_one(db.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
            if !busy && left == 0 {
                break;
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "{REFUNDS} refunds decided and paid, batch {batch:>2}: {dt:.2} s, {:.0} refunds/s",
            REFUNDS as f64 / dt
        );
    }

    // 2. From the commit that oversells to the refund recorded, one at a time, with a running
    //    reconciler woken by the relay's NOTIFY.
    stand(&db, "lat").await;
    let pis = intents(&stripe, LATENCY_SAMPLES).await;
    let wake = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(worker::listen_changes(url.clone(), wake.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(worker::run(
        db.clone(),
        payer.clone(),
        cfg(32),
        Arc::new(Metrics::default()),
        wake,
        stop_rx,
    ));
    let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
    for (i, pi) in pis.iter().enumerate() {
        let n = i as i64 + 1;
        let t = Instant::now();
        oversell(&db, "lat", n, pi).await;
        loop {
            let done: Option<String> = sqlx::query(
                "SELECT o.status FROM refund_outbox o JOIN refund_decisions d ON d.id = o.decision_id \
                 WHERE d.stand = 'lat' AND d.sale_id = $1",
            )
            .bind(format!("t0-{n}"))
            .fetch_optional(db.pool())
            .await
            .unwrap()
            .map(|r| r.try_get(0).unwrap());
            if done.as_deref() == Some("done") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "oversell committed → refund recorded (n={LATENCY_SAMPLES}): p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    let st: Value = http
        .get(format!("{stripe}_stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        st["refunds"].as_u64().unwrap() as usize,
        3 * REFUNDS + LATENCY_SAMPLES,
        "each oversold unit refunded once"
    );
    drop(db);
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut c)
        .await;
}
