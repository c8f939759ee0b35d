#![allow(dead_code)]
//! What the relay's benchmarks share: a database of their own, and an uplink opened by hand.

use futures::{SinkExt, StreamExt};
use halftime_ledger::uplink::{self, Handshake, Side};
use halftime_ledger::*;
use sqlx::Connection;
use std::collections::BTreeMap;
use tokio_tungstenite::tungstenite::Message;

pub struct Db {
    pub url: String,
    admin: Option<(String, String)>,
}

pub async fn database(sqlite: bool, dir: &std::path::Path, tag: &str) -> Db {
    if sqlite {
        return Db {
            url: format!("sqlite:{}", dir.join("bench.db").display()),
            admin: None,
        };
    }
    let admin = std::env::var("HALFTIME_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("Postgres at {admin}: {e}"));
    let name = format!("halftime_bench_{tag}_{}", std::process::id());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |x| x.0);
    Db {
        url: format!("{base}/{name}"),
        admin: Some((admin.clone(), name)),
    }
}

pub async fn drop_database(db: &Db) {
    if let Some((admin, name)) = &db.admin {
        if let Ok(mut c) = sqlx::AnyConnection::connect(admin).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut c)
                .await;
        }
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open an uplink to stand `bench` as the holder of `k`.
pub async fn connect_as(addr: &str, k: &ReplicaKey) -> Ws {
    let stand = StandId::new("bench").unwrap_or_else(|_| unreachable!());
    let url = format!("ws://{addr}/v1/stands/bench/uplink");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let next = |m: Option<Result<Message, _>>| match m {
        Some(Ok(Message::Binary(b))) => Handshake::decode(&b).unwrap_or_else(|e| panic!("{e}")),
        other => panic!("{other:?}"),
    };
    let Handshake::Hello {
        key: relay,
        challenge,
        ..
    } = next(ws.next().await)
    else {
        panic!("no hello")
    };
    let auth = Handshake::Auth {
        key: k.public(),
        challenge: [0; 32],
        signature: uplink::sign(k, Side::Replica, &stand, &challenge, &relay),
    };
    ws.send(Message::Binary(auth.encode().into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match next(ws.next().await) {
        Handshake::Welcome { .. } => ws,
        other => panic!("{other:?}"),
    }
}

pub const TERMINALS: usize = 10;

pub fn sku() -> Sku {
    Sku::new("soda").unwrap_or_else(|_| unreachable!())
}

pub fn key(n: u8) -> ReplicaKey {
    ReplicaKey::from_seed([n; 32])
}

/// Stand `stand`'s set-up (the relay enrolled) and `n` one-line sales spread over
/// [`TERMINALS`] terminals, all signed.
pub fn stand_changes(
    stand: &str,
    n: usize,
    relay: PublicKey,
) -> Result<Vec<SignedChange>, OpError> {
    let stand = StandId::new(stand).unwrap_or_else(|_| unreachable!());
    let info = StandInfo {
        event: EventId::new("game").unwrap_or_else(|_| unreachable!()),
        venue: "bench".into(),
        stand: stand.clone(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 0,
    };
    let t0 = 1_700_000_000_000;
    let (mut pool, g) = Ledger::create_stand(key(1), info, "pool", t0)?;
    let mut out = vec![g];
    out.push(pool.set_catalog(
        vec![CatalogItem {
            sku: sku(),
            name: "Soda".into(),
            price_cents: 300,
            low_stock_at: 0,
        }],
        t0,
    )?);
    out.push(pool.enrol(relay, "relay", Role::Relay, t0)?);
    let per = (n / TERMINALS + 1) as u64;
    out.push(pool.restock(
        BTreeMap::from([(sku(), per * TERMINALS as u64)]),
        "open",
        t0,
    )?);
    let mut tills = Vec::new();
    for i in 0..TERMINALS {
        let k = key(10 + i as u8);
        out.push(pool.enrol(k.public(), &format!("till {i}"), Role::Terminal, t0)?);
        out.push(pool.give(k.replica_id(), BTreeMap::from([(sku(), per)]), t0)?);
        tills.push(Ledger::join(k, stand.clone(), key(1).public()));
    }
    for t in &mut tills {
        t.apply_remote(out.clone(), t0);
    }
    for i in 0..n {
        let req = SaleRequest {
            lines: vec![SaleLine {
                sku: sku(),
                qty: 1,
                unit_price_cents: 300,
            }],
            payment: Payment {
                method: PaymentMethod::Card,
                reference: format!("pi_{i}"),
            },
            pool_reachable: true,
        };
        match tills[i % TERMINALS].sell(req, t0 + 1 + i as u64) {
            SaleOutcome::Committed { change, .. } => out.push(change),
            SaleOutcome::Refused { reason } => return Err(reason.into()),
        }
    }
    Ok(out)
}
