//! The stand mesh: TCP wrapped in the stand's private-network key, then noise and yamux; mDNS
//! discovery; only PeerIds enrolled in the stand document may connect; one request-response
//! protocol carries the ledger's wire frames (the same bytes the relay carries over WebSocket).

use futures::{AsyncReadExt, AsyncWriteExt};
use halftime_ledger::sync::MAX_FRAME_BYTES;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade::Version;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, allow_block_list, connection_limits, mdns, noise, ping,
    tcp, yamux,
};
use std::io;
use std::time::Duration;

/// The sync protocol name.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/halftime/sync/1");
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
/// A sync request not answered within this is failed (the repair resends what it carried).
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Idle connections are kept this long.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;

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
    /// Ledger frames.
    pub sync: request_response::Behaviour<FrameCodec>,
}

/// Length-prefixed frames; the response is an empty acknowledgement.
#[derive(Debug, Clone, Default)]
pub struct FrameCodec;

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame over the size limit",
            ));
        }
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<()>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&(req.len() as u32).to_be_bytes()).await?;
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, _: ()) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&[1]).await?;
        io.close().await
    }
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
                sync: request_response::Behaviour::new(
                    [(SYNC_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
                        .with_max_concurrent_streams(256),
                ),
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
