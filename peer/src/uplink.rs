//! The replica's end of the relay uplink: one WebSocket to `RELAY/v1/stands/{stand}/uplink`,
//! kept open whenever the relay can be reached, reconnecting with backoff and jitter. The
//! handshake (`halftime_ledger::uplink`) proves both keys; the node's ledger decides whether
//! the relay's key may connect (the rule the mesh uses); then each binary message is one
//! ledger wire frame, the same bytes as on the stand mesh. `wss://` is TLS (rustls), trusting
//! the system's roots and any CA the operator adds (`--relay-ca`).

use futures::{SinkExt, StreamExt};
use halftime_ledger::sync::MAX_FRAME_BYTES;
use halftime_ledger::uplink::{self, Handshake, Side, UPLINK_VERSION};
use halftime_ledger::{NotAdmitted, PublicKey, ReplicaId, ReplicaKey, StandId};
use rand::Rng;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// First wait before reconnecting; doubles up to [`RECONNECT_MAX_MS`], each wait jittered
/// by ±50 % so that a venue's terminals do not come back in step after an outage.
pub const RECONNECT_MIN_MS: u64 = 500;
pub const RECONNECT_MAX_MS: u64 = 30_000;
/// A connection that lived this long resets the backoff.
pub const STABLE_AFTER_MS: u64 = 10_000;
/// The relay must greet, and welcome, within this.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Frames queued to the relay before the node stops giving more (the engine keeps the rest).
pub const OUT_QUEUE_LEN: usize = 256;
pub const PING_INTERVAL_MS: u64 = 1_000;

/// What the uplink tells the node.
pub enum UplinkEvent {
    /// The relay proved its key; the node decides with its ledger whether it may connect.
    Up {
        conn: u64,
        key: PublicKey,
        out: mpsc::Sender<Vec<u8>>,
        reply: oneshot::Sender<Result<ReplicaId, NotAdmitted>>,
    },
    Frame {
        conn: u64,
        bytes: Vec<u8>,
    },
    Heard {
        conn: u64,
    },
    Down {
        conn: u64,
    },
}

impl std::fmt::Debug for UplinkEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UplinkEvent::Up { conn, .. } => write!(f, "Up({conn})"),
            UplinkEvent::Frame { conn, bytes } => write!(f, "Frame({conn}, {})", bytes.len()),
            UplinkEvent::Heard { conn } => write!(f, "Heard({conn})"),
            UplinkEvent::Down { conn } => write!(f, "Down({conn})"),
        }
    }
}

/// `ws://host:port` (or `http://`) plus the stand's uplink path.
pub fn uplink_url(relay: &str, stand: &StandId) -> Result<String, String> {
    let base = relay.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        return Err(format!(
            "{relay}: the relay URL must start with wss://, ws://, https:// or http://"
        ));
    };
    Ok(format!("{base}/v1/stands/{stand}/uplink"))
}

/// The TLS client for `wss://` relays: the system's root certificates, plus those in the PEM
/// file `extra_ca` (a venue's own CA, or a relay's self-signed certificate).
pub fn tls_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
        }
    } else if added == 0 {
        return Err(
            "no root certificates found on this system for wss://; give the relay's CA with \
             --relay-ca FILE"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Keep an uplink to one of `urls` (instances of one relay, tried in turn) for as long as
/// `events` has a receiver.
pub async fn run(
    urls: Vec<String>,
    key: ReplicaKey,
    stand: StandId,
    tls: Option<Arc<rustls::ClientConfig>>,
    events: mpsc::Sender<UplinkEvent>,
) {
    if urls.is_empty() {
        return;
    }
    let mut backoff = RECONNECT_MIN_MS;
    let mut conn: u64 = 0;
    let mut last_error = String::new();
    loop {
        let url = &urls[(conn as usize) % urls.len()];
        conn += 1;
        let started = Instant::now();
        match session(url, &key, &stand, tls.clone(), conn, &events).await {
            Ok(()) => tracing::info!(%url, "relay uplink closed"),
            Err(why) => {
                // Say a new reason once; repeat the same one quietly.
                if why != last_error {
                    tracing::warn!(%url, %why, "relay uplink not up");
                    last_error = why;
                } else {
                    tracing::debug!(%url, %why, "relay uplink not up");
                }
            }
        }
        if events.is_closed() {
            return;
        }
        if started.elapsed() >= Duration::from_millis(STABLE_AFTER_MS) {
            backoff = RECONNECT_MIN_MS;
            last_error.clear();
        }
        let jittered = rand::rng().random_range(backoff / 2..=backoff + backoff / 2);
        tokio::time::sleep(Duration::from_millis(jittered)).await;
        backoff = (backoff * 2).min(RECONNECT_MAX_MS);
    }
}

async fn session(
    url: &str,
    key: &ReplicaKey,
    stand: &StandId,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: u64,
    events: &mpsc::Sender<UplinkEvent>,
) -> Result<(), String> {
    let mut cfg = WebSocketConfig::default();
    cfg.max_message_size = Some(MAX_FRAME_BYTES);
    cfg.max_frame_size = Some(MAX_FRAME_BYTES);
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let (mut ws, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(cfg),
            false,
            tls.map(Connector::Rustls),
        ),
    )
    .await
    .map_err(|_| "the relay did not answer in time".to_owned())?
    .map_err(|e| format!("cannot connect: {e}"))?;
    let next = |m: Option<Result<Message, _>>| -> Result<Handshake, String> {
        match m {
            Some(Ok(Message::Binary(b))) => Handshake::decode(&b).map_err(|e| e.to_string()),
            Some(Ok(other)) => Err(format!(
                "unexpected message during the handshake: {other:?}"
            )),
            Some(Err(e)) => Err(format!("connection failed: {e}")),
            None => Err("the relay closed the connection".into()),
        }
    };
    let hello = tokio::time::timeout(timeout, ws.next())
        .await
        .map_err(|_| "no greeting from the relay".to_owned())?;
    let (relay_key, challenge) = match next(hello)? {
        Handshake::Hello {
            version,
            stand: s,
            key: k,
            challenge,
        } => {
            if version != UPLINK_VERSION {
                return Err(format!(
                    "the relay speaks uplink version {version}, this replica {UPLINK_VERSION}"
                ));
            }
            if s != *stand {
                return Err(format!("the relay answered for stand {s}, not {stand}"));
            }
            (k, challenge)
        }
        Handshake::Refused { reason } => return Err(format!("the relay refused: {reason}")),
        other => return Err(format!("expected a greeting, got {other:?}")),
    };
    let mut mine = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut mine);
    let auth = Handshake::Auth {
        key: key.public(),
        challenge: mine,
        signature: uplink::sign(key, Side::Replica, stand, &challenge, &relay_key),
    };
    ws.send(Message::Binary(auth.encode().into()))
        .await
        .map_err(|e| format!("connection failed: {e}"))?;
    let welcome = tokio::time::timeout(timeout, ws.next())
        .await
        .map_err(|_| "no answer from the relay".to_owned())?;
    match next(welcome)? {
        Handshake::Welcome { signature } => {
            if !uplink::verify(
                &relay_key,
                Side::Relay,
                stand,
                &mine,
                &key.public(),
                &signature,
            ) {
                return Err(format!(
                    "the relay's signature does not answer our challenge (key {relay_key})"
                ));
            }
        }
        Handshake::Refused { reason } => return Err(format!("the relay refused: {reason}")),
        other => return Err(format!("expected a welcome, got {other:?}")),
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE_LEN);
    let (reply, admitted) = oneshot::channel();
    events
        .send(UplinkEvent::Up {
            conn,
            key: relay_key,
            out: out_tx,
            reply,
        })
        .await
        .map_err(|_| "the node stopped".to_owned())?;
    let relay = match admitted.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = ws.close(None).await;
            return Err(format!("not connecting to the relay: {e}"));
        }
        Err(_) => return Err("the node stopped".into()),
    };
    tracing::info!(%url, %relay, "relay uplink open");
    let mut ping = tokio::time::interval(Duration::from_millis(PING_INTERVAL_MS));
    let result = loop {
        tokio::select! {
            frame = out_rx.recv() => {
                // The node dropped the sender: it let go of this connection.
                let Some(frame) = frame else { break Ok(()) };
                if let Err(e) = ws.send(Message::Binary(frame.into())).await {
                    break Err(format!("connection failed: {e}"));
                }
            }
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    break Err(format!("connection failed: {e}"));
                }
            }
            msg = ws.next() => {
                let ev = match msg {
                    Some(Ok(Message::Binary(bytes))) => UplinkEvent::Frame { conn, bytes: bytes.to_vec() },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => UplinkEvent::Heard { conn },
                    Some(Ok(Message::Close(_))) | None => break Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(format!("connection failed: {e}")),
                };
                if events.send(ev).await.is_err() {
                    break Ok(());
                }
            }
        }
    };
    let _ = events.send(UplinkEvent::Down { conn }).await;
    let _ = ws.close(None).await;
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn relay_urls_are_checked_and_completed() {
        let s = StandId::new("north").unwrap();
        assert_eq!(
            uplink_url("ws://relay:8090/", &s).unwrap(),
            "ws://relay:8090/v1/stands/north/uplink"
        );
        assert_eq!(
            uplink_url("http://10.0.0.1:8090", &s).unwrap(),
            "ws://10.0.0.1:8090/v1/stands/north/uplink"
        );
        assert_eq!(
            uplink_url("wss://relay.example", &s).unwrap(),
            "wss://relay.example/v1/stands/north/uplink"
        );
        assert_eq!(
            uplink_url("https://relay.example/", &s).unwrap(),
            "wss://relay.example/v1/stands/north/uplink"
        );
        assert!(uplink_url("relay:8090", &s).is_err());
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        assert!(
            tls_config(Some(&missing))
                .unwrap_err()
                .contains("cannot read")
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(
            tls_config(Some(&empty))
                .unwrap_err()
                .contains("no PEM certificate")
        );
    }
}
