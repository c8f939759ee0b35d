//! How fast one relay instance hears another's commit, the two ways on offer: Postgres
//! `NOTIFY` sent inside the committing transaction (what the relay does) against a NATS
//! publish after the commit, on this machine's Postgres and NATS server. One message at a
//! time: the clock runs from just before the commit until the listener has the message.
//!
//! `cargo bench -p halftime-relay --bench notify --features nats-bench` (Postgres at 127.0.0.1:5432 with trust auth,
//! or HALFTIME_TEST_POSTGRES; NATS at 127.0.0.1:4222, or HALFTIME_BENCH_NATS;
//! `-- --rounds N`, default 2000).

mod common;

use futures::StreamExt;
use std::time::{Duration, Instant};

const CHANNEL: &str = "halftime_bench";

fn summary(mut xs: Vec<Duration>) -> String {
    xs.sort();
    let at = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (n = {})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
        xs.len()
    )
}

/// Commit one row, with `notify` sent on [`CHANNEL`] inside the transaction when given.
async fn commit_row(pool: &sqlx::PgPool, body: &[u8], notify: Option<&str>) {
    let mut tx = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("INSERT INTO rows (body) VALUES ($1)")
        .bind(body)
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(payload) = notify {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = common::database(false, dir.path(), "notify").await;
    let pool = sqlx::postgres::PgPool::connect(&db.url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("CREATE TABLE rows (id BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL)")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let body = vec![7u8; 470];

    // Postgres: a row and its NOTIFY committed in one transaction; heard by a listener.
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    listener
        .listen(CHANNEL)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut pg = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        commit_row(&pool, &body, Some(&i.to_string())).await;
        let n = listener.recv().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.payload(), i.to_string());
        pg.push(t.elapsed());
    }

    // NATS: the same row committed, then a publish; heard by a subscriber.
    let nats_url = std::env::var("HALFTIME_BENCH_NATS").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let nats = async_nats::connect(&nats_url)
        .await
        .unwrap_or_else(|e| panic!("NATS at {nats_url}: {e}"));
    let mut sub = nats
        .subscribe(CHANNEL)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    nats.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let mut nt = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        commit_row(&pool, &body, None).await;
        nats.publish(CHANNEL, i.to_string().into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        nats.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let m = sub.next().await.unwrap_or_else(|| panic!("NATS closed"));
        assert_eq!(&m.payload[..], i.to_string().as_bytes());
        nt.push(t.elapsed());
    }

    // The commit alone, for reference.
    let mut commit = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        commit_row(&pool, &body, None).await;
        commit.push(t.elapsed());
    }
    println!("commit of one row alone: {}", summary(commit));
    println!("commit with NOTIFY inside, until heard: {}", summary(pg));
    println!("commit, then NATS publish, until heard: {}", summary(nt));
    pool.close().await;
    common::drop_database(&db).await;
}
