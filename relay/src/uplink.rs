//! The relay's end of the uplink: one WebSocket per replica at `/v1/stands/{stand}/uplink`.
//! The handshake (`halftime_ledger::uplink`) proves both keys; the stand's own ledger decides
//! whether the replica may connect; then every binary message is one ledger wire frame, both
//! ways. Pings every second keep the engine's view of the link alive (a silent cut drops it).

use crate::server::App;
use crate::stand::{CONN_QUEUE_LEN, StandCmd};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use halftime_ledger::StandId;
use halftime_ledger::sync::MAX_FRAME_BYTES;
use halftime_ledger::uplink::{self, Handshake, Side, UPLINK_VERSION};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A replica must answer the relay's challenge within this.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
pub const PING_INTERVAL_MS: u64 = 1_000;

/// WebSocket uplink of a stand replica.
///
/// Not an admin call: the replica proves its key in the handshake (docs/PROTOCOL.md), and the
/// stand's ledger decides whether it may connect; a stand this relay does not serve, or a key
/// it does not admit, is refused in the handshake with the reason. Then one binary message
/// per wire frame, both ways. A stand not loaded since the relay started loads first.
#[utoipa::path(get, path = "/v1/stands/{stand}/uplink", tag = "uplink",
    params(("stand" = String, Path, description = "The stand id.")),
    responses((status = 101, description = "Switching to the uplink protocol.")))]
pub async fn upgrade(
    ws: WebSocketUpgrade,
    Path(stand): Path<String>,
    State(app): State<App>,
) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            if let Err(why) = serve(socket, stand.clone(), app.clone()).await {
                app.metrics.uplinks_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%stand, %why, "refused an uplink");
            }
        })
}

async fn refuse(socket: &mut WebSocket, why: String) -> String {
    let _ = socket
        .send(Message::Binary(
            Handshake::refused(why.clone()).encode().into(),
        ))
        .await;
    let _ = socket.send(Message::Close(None)).await;
    why
}

async fn serve(mut socket: WebSocket, stand: String, app: App) -> Result<(), String> {
    let served = match StandId::new(&stand) {
        Ok(s) => app.serve_stand(&s).await.map_err(|e| e.to_string()),
        Err(_) => Ok(None),
    };
    let served = match served {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(refuse(
                &mut socket,
                format!("this relay does not serve stand {stand:?}"),
            )
            .await);
        }
        Err(why) => return Err(refuse(&mut socket, why).await),
    };
    let (handle, signer) = (served.handle, served.key);
    let mut challenge = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut challenge);
    let hello = Handshake::Hello {
        version: UPLINK_VERSION,
        stand: handle.stand.clone(),
        key: signer.public(),
        challenge,
    };
    socket
        .send(Message::Binary(hello.encode().into()))
        .await
        .map_err(|e| format!("could not greet: {e}"))?;
    let first = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), socket.recv())
        .await
        .map_err(|_| "no answer to the challenge in time".to_owned())?;
    let Some(Ok(Message::Binary(bytes))) = first else {
        return Err("the connection closed or sent text before authenticating".into());
    };
    let (key, their_challenge, signature) = match Handshake::decode(&bytes) {
        Ok(Handshake::Auth {
            key,
            challenge,
            signature,
        }) => (key, challenge, signature),
        Ok(other) => {
            let why = format!("expected an answer to the challenge, got {other:?}");
            return Err(refuse(&mut socket, why).await);
        }
        Err(e) => return Err(refuse(&mut socket, e.to_string()).await),
    };
    let ours = signer.public();
    if !uplink::verify(
        &key,
        Side::Replica,
        &handle.stand,
        &challenge,
        &ours,
        &signature,
    ) {
        let why = format!(
            "the signature of {} does not answer the challenge",
            key.replica_id()
        );
        return Err(refuse(&mut socket, why).await);
    }
    let conn = app.next_conn.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(CONN_QUEUE_LEN);
    let (reply, admitted) = oneshot::channel();
    handle
        .tx
        .send(StandCmd::Connect {
            key,
            conn,
            out: out_tx,
            reply,
        })
        .await
        .map_err(|_| "the stand has stopped".to_owned())?;
    let replica = match admitted.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(refuse(&mut socket, e.to_string()).await),
        Err(_) => return Err(refuse(&mut socket, "the stand has stopped".into()).await),
    };
    let welcome = Handshake::Welcome {
        signature: uplink::sign(&signer, Side::Relay, &handle.stand, &their_challenge, &key),
    };
    if socket
        .send(Message::Binary(welcome.encode().into()))
        .await
        .is_err()
    {
        let _ = handle.tx.send(StandCmd::Closed { conn }).await;
        return Ok(());
    }
    app.metrics.uplinks_open.fetch_add(1, Ordering::Relaxed);
    tracing::info!(stand = %handle.stand, %replica, conn, "uplink open");

    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(Duration::from_millis(PING_INTERVAL_MS));
        loop {
            tokio::select! {
                frame = out_rx.recv() => {
                    let Some(frame) = frame else { break };
                    if sink.send(Message::Binary(frame.into())).await.is_err() {
                        break;
                    }
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    while let Some(msg) = stream.next().await {
        let cmd = match msg {
            Ok(Message::Binary(bytes)) => StandCmd::Frame {
                conn,
                bytes: bytes.to_vec(),
            },
            Ok(Message::Pong(_)) | Ok(Message::Ping(_)) => StandCmd::Heard { conn },
            Ok(Message::Text(_)) => {
                tracing::warn!(stand = %handle.stand, %replica, "text message on the uplink; closing it");
                break;
            }
            Ok(Message::Close(_)) | Err(_) => break,
        };
        if handle.tx.send(cmd).await.is_err() {
            break;
        }
        if writer.is_finished() {
            break;
        }
    }
    writer.abort();
    let _ = handle.tx.send(StandCmd::Closed { conn }).await;
    app.metrics.uplinks_open.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(stand = %handle.stand, %replica, conn, "uplink closed");
    Ok(())
}
