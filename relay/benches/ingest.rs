//! Ingest into the store of record, one run side by side on the same database:
//!
//! - **relay**: signed sales sent over the uplink as the stand's pool, 256 per frame, each
//!   decoded, verified (signature, rules) and applied by the stand's engine, then committed
//!   with its projections, until the store holds them all;
//! - **raw**: rows of the same sizes inserted by the store's INSERT path
//!   (`Store::commit_by_insert`: 50 rows per INSERT, one transaction per 256), nothing
//!   verified. (The relay itself sends its rows by `COPY` on Postgres.)
//!
//! `cargo bench -p halftime-relay --bench ingest` (Postgres at 127.0.0.1:5432 with trust auth,
//! or HALFTIME_TEST_POSTGRES=postgres://…/postgres; `-- --sqlite` for a SQLite file;
//! `-- --changes N`, default 20000).

mod common;

use futures::SinkExt;
use halftime_ledger::*;
use halftime_relay::server::{App, router};
use halftime_relay::store::{Batch, ChangeRow, Placement, StandRow, Store};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const PER_FRAME: usize = 256;

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sqlite = args.iter().any(|a| a == "--sqlite");
    let n: usize = args
        .iter()
        .position(|a| a == "--changes")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));

    // The relay path.
    let db = common::database(sqlite, dir.path(), "relay").await;
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    let relay = store.relay_key().await.unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    let all = common::stand_changes("bench", n, relay.public()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "signed {} changes in {:.1} s",
        all.len(),
        t.elapsed().as_secs_f64()
    );
    let stand = StandId::new("bench").unwrap_or_else(|_| unreachable!());
    let row = StandRow {
        stand: stand.clone(),
        pool_key: common::key(1).public(),
        placement: Placement::Device,
        pool_secret: None,
        psk: None,
    };
    store
        .add_stand(&row, 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let app = App::new(store.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string();
    tokio::spawn(async move { axum::serve(listener, router(app)).await });
    let mut ws = common::connect_as(&addr, &common::key(1)).await;
    let t = Instant::now();
    for chunk in all.chunks(PER_FRAME) {
        let frame = WireMessage::Changes {
            changes: chunk.to_vec(),
        };
        ws.send(Message::Binary(frame.encode(&stand).into()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    loop {
        if store.change_count(&stand).await.unwrap_or(0) as usize >= all.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relay_time = t.elapsed();
    drop(ws);

    // The raw path: the same rows by batched INSERT, nothing checked.
    let raw_db = common::database(sqlite, &dir.path().join("raw"), "raw").await;
    let _ = std::fs::create_dir_all(dir.path().join("raw"));
    let raw = Store::open(&raw_db.url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let raw_stand = StandId::new("raw").unwrap_or_else(|_| unreachable!());
    raw.add_stand(
        &StandRow {
            stand: raw_stand.clone(),
            ..row.clone()
        },
        0,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rows: Vec<ChangeRow> = all
        .iter()
        .enumerate()
        .map(|(i, c)| ChangeRow {
            actor: common::key((i % 200) as u8).replica_id(),
            seq: (i / 200 + 1) as u64,
            info: ChangeInfo {
                hash: [(i % 251) as u8; 32],
                deps: vec![[1; 32]],
                at: Hlc::new(1_700_000_000_000 + i as u64, 0),
            },
            change: c.clone(),
        })
        .collect();
    let t = Instant::now();
    for chunk in rows.chunks(PER_FRAME) {
        let batch = Batch {
            changes: chunk.to_vec(),
            ..Batch::default()
        };
        raw.commit_by_insert(&raw_stand, &batch, 0, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let raw_time = t.elapsed();

    let backend = if sqlite { "SQLite file" } else { "Postgres" };
    println!("ingest into {backend}, {} changes, one run:", all.len());
    println!(
        "  relay (uplink, verify, apply, commit with projections): {:>8.0} changes/s  ({:.2} s)",
        rate(all.len(), relay_time),
        relay_time.as_secs_f64()
    );
    println!(
        "  raw batched INSERT of the same rows:                    {:>8.0} changes/s  ({:.2} s)",
        rate(all.len(), raw_time),
        raw_time.as_secs_f64()
    );
    common::drop_database(&db).await;
    common::drop_database(&raw_db).await;
}
