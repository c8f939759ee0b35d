//! The stand mesh: TCP wrapped in the stand's private-network key, then noise and yamux; mDNS
//! discovery; only PeerIds enrolled in the stand document may connect. The ledger's wire
//! frames (the same bytes the relay carries over WebSocket) travel on one long-lived stream per
//! peer and direction, each frame prefixed by its length: no stream is opened per frame.

use futures::{AsyncReadExt, AsyncWriteExt};
use halftime_ledger::sync::MAX_FRAME_BYTES;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade::Version;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, Swarm, SwarmBuilder, allow_block_list, connection_limits, mdns, noise,
    ping, tcp, yamux,
};
use std::io;
use std::time::Duration;
use tokio::sync::mpsc;

/// The sync protocol name.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/halftime/sync/2");
/// A connection still upgrading after this long is dropped (a wrong-key peer can hang one).
pub const UPGRADE_TIMEOUT_MS: u64 = 5_000;
/// Incoming connections allowed to be mid-handshake at once.
pub const MAX_PENDING_INCOMING: u32 = 16;
/// Connections per peer (both sides may dial: expect two).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// mDNS query interval (libp2p's default of 5 minutes is useless in a stand).
pub const MDNS_QUERY_INTERVAL_MS: u64 = 2_000;
/// Ping interval and timeout: a silent cut is noticed within about three seconds.
pub const PING_INTERVAL_MS: u64 = 1_000;
/// Ping timeout.
pub const PING_TIMEOUT_MS: u64 = 2_000;
/// Idle connections are kept this long.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// Frames queued for one peer's stream; beyond them the engine's own outbox holds the rest
/// (and drops the oldest pushes when that is full: the repair resends them).
pub const STREAM_QUEUE_LEN: usize = 64;
/// Frames received from all peers and not yet handled by the node; a full queue stops reading,
/// which stops the senders through the streams' flow control.
pub const INBOUND_QUEUE_LEN: usize = 1_024;

/// The mesh behaviour.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Only enrolled replicas.
    pub allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    /// Caps on pending and per-peer connections.
    pub limits: connection_limits::Behaviour,
    /// Discovery (off for loopback-only runs).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// The sync streams (opened and accepted through a [`libp2p_stream::Control`]).
    pub streams: libp2p_stream::Behaviour,
}

/// What the stream tasks tell the node.
#[derive(Debug)]
pub enum Inbound {
    /// A whole frame from `peer`, not yet decoded.
    Frame(PeerId, Vec<u8>),
    /// `peer`'s stream broke a framing rule and was closed.
    Refused(PeerId, String),
}

/// Read one length-prefixed frame. `Ok(None)`: the stream ended cleanly between frames. The
/// length is checked against [`MAX_FRAME_BYTES`] before anything is allocated for it.
pub async fn read_frame<R>(io: &mut R) -> io::Result<Option<Vec<u8>>>
where
    R: futures::AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match io.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {MAX_FRAME_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Append `frame` with its length prefix to `out`.
pub fn put_frame(out: &mut Vec<u8>, frame: &[u8]) {
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
}

/// Accept every sync stream peers open and read each until it ends.
pub async fn accept_streams(
    mut incoming: libp2p_stream::IncomingStreams,
    to_node: mpsc::Sender<Inbound>,
) {
    use futures::StreamExt;
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(read_stream(peer, stream, to_node.clone()));
    }
}

async fn read_stream(peer: PeerId, mut stream: libp2p::Stream, to_node: mpsc::Sender<Inbound>) {
    loop {
        match read_frame(&mut stream).await {
            Ok(Some(frame)) => {
                if to_node.send(Inbound::Frame(peer, frame)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = to_node.send(Inbound::Refused(peer, e.to_string())).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "sync stream from the peer ended");
                return;
            }
        }
    }
}

/// Open a sync stream to `peer` and write what `frames` brings, every frame ready at once in
/// one write. Ends when the node drops the sender or the stream fails; what was queued is then
/// lost to this stream and resent by the repair.
pub async fn write_stream(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    mut frames: mpsc::Receiver<Vec<u8>>,
) {
    let mut stream = match control.open_stream(peer, SYNC_PROTOCOL).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "could not open a sync stream");
            return;
        }
    };
    let mut buf = Vec::new();
    while let Some(frame) = frames.recv().await {
        buf.clear();
        put_frame(&mut buf, &frame);
        while let Ok(more) = frames.try_recv() {
            put_frame(&mut buf, &more);
        }
        let sent = async {
            stream.write_all(&buf).await?;
            stream.flush().await
        };
        if let Err(e) = sent.await {
            tracing::debug!(%peer, error = %e, "sync stream to the peer failed");
            return;
        }
    }
    let _ = stream.close().await;
}

/// Build the swarm for `keypair` on the stand's private network.
pub fn build_swarm(
    keypair: libp2p::identity::Keypair,
    psk: PreSharedKey,
    use_mdns: bool,
) -> Result<Swarm<Behaviour>, Box<dyn std::error::Error + Send + Sync>> {
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(
            move |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let noise = noise::Config::new(key)?;
                // TCP → private-network handshake → multistream → noise → yamux. Nothing else:
                // any other transport would admit peers without the key.
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_millis(UPGRADE_TIMEOUT_MS)),
                )
            },
        )?
        .with_behaviour(|key| {
            let mdns = if use_mdns {
                let cfg = mdns::Config {
                    query_interval: Duration::from_millis(MDNS_QUERY_INTERVAL_MS),
                    ttl: Duration::from_secs(20),
                    ..mdns::Config::default()
                };
                Some(mdns::tokio::Behaviour::new(cfg, key.public().to_peer_id())?)
            } else {
                None
            };
            Ok(Behaviour {
                allow: allow_block_list::Behaviour::default(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER)),
                ),
                mdns: Toggle::from(mdns),
                ping: ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(Duration::from_millis(PING_INTERVAL_MS))
                        .with_timeout(Duration::from_millis(PING_TIMEOUT_MS)),
                ),
                streams: libp2p_stream::Behaviour::new(),
            })
        })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_millis(IDLE_TIMEOUT_MS))
        })
        .build();
    Ok(swarm)
}

/// Parse a 64-hex-digit private-network key.
pub fn parse_psk(hex_key: &str) -> Result<PreSharedKey, String> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut b)
        .map_err(|_| "the stand key must be 64 hex digits".to_string())?;
    Ok(PreSharedKey::new(b))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;

    #[test]
    fn frames_written_back_to_back_are_read_one_by_one_then_the_end() {
        let mut wire = Vec::new();
        for f in [&b"one"[..], &[], &[7u8; 300][..]] {
            put_frame(&mut wire, f);
        }
        let mut r = Cursor::new(wire);
        assert_eq!(block_on(read_frame(&mut r)).unwrap(), Some(b"one".to_vec()));
        assert_eq!(block_on(read_frame(&mut r)).unwrap(), Some(Vec::new()));
        assert_eq!(block_on(read_frame(&mut r)).unwrap(), Some(vec![7u8; 300]));
        assert_eq!(block_on(read_frame(&mut r)).unwrap(), None);
    }

    #[test]
    fn a_length_over_the_limit_is_refused_before_anything_is_read_for_it() {
        // Built by hand: a 4-byte prefix announcing one byte more than a frame may hold,
        // followed by nothing.
        let len = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        let err = block_on(read_frame(&mut Cursor::new(len.to_vec()))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over the limit"), "{err}");
        let huge = u32::MAX.to_be_bytes();
        let err = block_on(read_frame(&mut Cursor::new(huge.to_vec()))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_stream_cut_inside_a_prefix_or_a_frame_is_an_error_not_a_frame() {
        let err = block_on(read_frame(&mut Cursor::new(vec![0u8, 0]))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut cut = Vec::new();
        put_frame(&mut cut, b"hello");
        cut.truncate(7);
        let err = block_on(read_frame(&mut Cursor::new(cut))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
