//! Fan-out through the relay: one terminal's sale, sent over its uplink, until every other
//! connected terminal of the stand has received it. 10, 100 and 1,000 connected terminals
//! (simulated uplink clients in this process, each a real WebSocket with the real handshake);
//! 50 sales each, latency counted per receiving terminal; the relay commits each sale before
//! it passes it on.
//!
//! `cargo bench -p halftime-relay --bench fanout` (Postgres at 127.0.0.1:5432, or
//! HALFTIME_TEST_POSTGRES; `-- --sqlite` for a SQLite file; `-- --sales N`).

mod common;

use futures::{SinkExt, StreamExt};
use halftime_ledger::*;
use halftime_relay::server::{App, router};
use halftime_relay::store::{Placement, StandRow, Store};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

fn key(i: u32) -> ReplicaKey {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    ReplicaKey::from_seed(seed)
}

fn sku() -> Sku {
    Sku::new("soda").unwrap_or_else(|_| unreachable!())
}

fn stand() -> StandId {
    StandId::new("bench").unwrap_or_else(|_| unreachable!())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn run(n: u32, sales: usize, sqlite: bool, dir: &std::path::Path) {
    let db = common::database(sqlite, dir, &format!("fanout{n}")).await;
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    let relay = store.relay_key().await.unwrap_or_else(|e| panic!("{e}"));
    let pool_key = key(u32::MAX);
    let info = StandInfo {
        event: EventId::new("game").unwrap_or_else(|_| unreachable!()),
        venue: "bench".into(),
        stand: stand(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 0,
    };
    let t0 = 1_700_000_000_000;
    let made = (|| -> Result<Vec<SignedChange>, OpError> {
        let (mut pool, g) = Ledger::create_stand(pool_key.clone(), info, "pool", t0)?;
        let mut setup = vec![g];
        setup.push(pool.set_catalog(
            vec![CatalogItem {
                sku: sku(),
                name: "Soda".into(),
                price_cents: 300,
                low_stock_at: 0,
            }],
            t0,
        )?);
        setup.push(pool.enrol(relay.public(), "relay", Role::Relay, t0)?);
        for i in 0..n {
            setup.push(pool.enrol(key(i).public(), &format!("till {i}"), Role::Terminal, t0)?);
        }
        setup.push(pool.restock(BTreeMap::from([(sku(), 10_000)]), "open", t0)?);
        setup.push(pool.give(key(0).replica_id(), BTreeMap::from([(sku(), 10_000)]), t0)?);
        Ok(setup)
    })()
    .unwrap_or_else(|e| panic!("{e}"));
    let row = StandRow {
        stand: stand(),
        pool_key: pool_key.public(),
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

    // The pool hands the relay the stand, so the relay admits its terminals.
    let mut pool = common::connect_as(&addr, &pool_key).await;
    for chunk in made.chunks(halftime_ledger::sync::MAX_CHANGES_PER_MESSAGE) {
        let frame = WireMessage::Changes {
            changes: chunk.to_vec(),
        };
        pool.send(Message::Binary(frame.encode(&stand()).into()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    while (store.change_count(&stand()).await.unwrap_or(0) as usize) < made.len() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(pool);

    // Terminal 0 sells; the others only listen (answering pings as they read).
    let (arrived, mut arrivals) = mpsc::unbounded_channel::<(u32, Instant)>();
    let connecting = Instant::now();
    let mut seller = common::connect_as(&addr, &key(0)).await;
    for i in 1..n {
        if i % 200 == 0 {
            eprintln!(
                "  {i} of {n} terminals connected ({:.1} s)",
                connecting.elapsed().as_secs_f64()
            );
        }
        let mut ws = common::connect_as(&addr, &key(i)).await;
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(b) = m {
                    if let Ok(WireMessage::Changes { changes }) = WireMessage::decode(&b, &stand())
                    {
                        for _ in changes {
                            let _ = arrived.send((i, Instant::now()));
                        }
                    }
                }
            }
        });
    }
    let mut till = Ledger::join(key(0), stand(), pool_key.public());
    till.apply_remote(made, t0);
    let mut lat: Vec<Duration> = Vec::with_capacity(sales * n as usize);
    let mut missing = 0usize;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while arrivals.try_recv().is_ok() {}
    for s in 0..sales {
        let req = SaleRequest {
            lines: vec![SaleLine {
                sku: sku(),
                qty: 1,
                unit_price_cents: 300,
            }],
            payment: Payment {
                method: PaymentMethod::Cash,
                reference: String::new(),
            },
            pool_reachable: false,
        };
        let SaleOutcome::Committed { change, .. } = till.sell(req, t0 + 1 + s as u64) else {
            panic!("the seller ran out of rights");
        };
        let frame = WireMessage::Changes {
            changes: vec![change],
        };
        let sent = Instant::now();
        seller
            .send(Message::Binary(frame.encode(&stand()).into()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got < (n - 1) as usize {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some((_, at))) => {
                    lat.push(at.duration_since(sent));
                    got += 1;
                }
                _ => break,
            }
        }
        missing += (n - 1) as usize - got;
    }
    lat.sort();
    println!(
        "{n:>5} terminals: {:>6} deliveries  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  missing {missing}",
        lat.len(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        pct(&lat, 1.0).as_secs_f64() * 1e3,
    );
    common::drop_database(&db).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sqlite = args.iter().any(|a| a == "--sqlite");
    let sales: usize = args
        .iter()
        .position(|a| a == "--sales")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "fan-out of one sale through the relay ({}), {sales} sales per row:",
        if sqlite { "SQLite file" } else { "Postgres" }
    );
    for n in [10, 100, 1_000] {
        let sub = dir.path().join(n.to_string());
        let _ = std::fs::create_dir_all(&sub);
        run(n, sales, sqlite, &sub).await;
    }
}
