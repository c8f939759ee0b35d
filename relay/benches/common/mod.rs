//! What the relay's benchmarks share: a database of their own, and an uplink opened by hand.

use futures::{SinkExt, StreamExt};
use halftime_ledger::uplink::{self, Handshake, Side};
use halftime_ledger::{ReplicaKey, StandId};
use sqlx::Connection;
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
