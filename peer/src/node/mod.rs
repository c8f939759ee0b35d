//! The node: one task that owns the stand engine, the store and the swarm, driven by commands
//! from the local API, by the network and by the engine's timer. Every rule of the stand is
//! the engine's; this loop feeds it, writes what it asks to persist, sends what it wants sent
//! and answers the API (quinn's driver pattern).
//!
//! Here: the node, its loop and its disk (what the engine asks to persist). `commands.rs`: the
//! API's commands and the views they read; `requests.rs`: their types; `mesh.rs`: connections,
//! frames, redials; `kitchen.rs`: what changes mean for the live feed and the kitchen queue;
//! `metrics.rs`: the Prometheus text.

use crate::net::{Behaviour, BehaviourEvent, Inbound};
use crate::store::Store;
use futures::StreamExt;
use halftime_engine::{Engine, EngineConfig, Event, SaleOrder, Ticket};
use halftime_ledger::sync::ANTI_ENTROPY_INTERVAL_MS;
use halftime_ledger::{OpError, Refusal, ReplicaId, SaleId, SignedChange, Sku};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm, mdns, ping};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};

mod commands;
mod kitchen;
mod mesh;
mod metrics;
mod relay;
mod requests;

use metrics::Metrics;
pub use requests::*;

/// Commands queued from the API.
pub const COMMAND_QUEUE_LEN: usize = 1_024;
/// Commands handled per group commit.
pub const GROUP_COMMIT_MAX: usize = 128;
/// Live events buffered per subscriber.
pub const LIVE_QUEUE_LEN: usize = 1_024;
/// Housekeeping tick: redials and warnings (the engine's own timer is separate).
pub const TICK_MS: u64 = 200;
/// Received changes are made durable at most this long after they were stored (a group
/// commit; a local sale's immediate commit covers them sooner).
pub const RECEIVED_SYNC_MS: u64 = 100;
/// A replica that reaches no peer warns why at most this often.
pub const DIAL_WARNING_INTERVAL_MS: u64 = 10_000;
/// How long a replica may run before it warns that it has not reached its stand.
pub const NOT_A_MEMBER_GRACE_MS: u64 = 3_000;
/// Redial a known but unconnected peer this often.
pub const REDIAL_INTERVAL_MS: u64 = 2_000;
/// A peer's sync stream that failed is opened again at most this often.
pub const STREAM_REOPEN_MS: u64 = 500;
/// Received frames handled together (their changes applied as one batch).
pub const FRAMES_PER_BATCH: usize = 256;
/// Orders shown on the kitchen page.
pub const KITCHEN_QUEUE_LEN: usize = 500;
/// Sales listed by `GET /v1/sales`.
pub const RECENT_SALES: usize = 20;
/// A snapshot is written once this many changes were added since the last one.
pub const SNAPSHOT_EVERY: u64 = 20_000;

/// Wall-clock milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A connected peer, as the transport sees it.
struct Conn {
    replica: ReplicaId,
    /// The queue of the task writing our stream to the peer (none until the first flush).
    stream: Option<mpsc::Sender<Vec<u8>>>,
    /// When the stream was last opened: a failing one is reopened only `STREAM_REOPEN_MS` on.
    opened: Option<Instant>,
}

impl Conn {
    fn new(replica: ReplicaId) -> Self {
        Self {
            replica,
            stream: None,
            opened: None,
        }
    }
}

/// The node's configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Static peers to dial (for networks that block multicast).
    pub static_peers: Vec<Multiaddr>,
    /// Anti-entropy interval.
    pub sync_interval_ms: u64,
    /// Longest a sale waits for rights from other replicas.
    pub sale_wait_ms: u64,
    /// Changes between snapshots (0: only on a clean stop).
    pub snapshot_every: u64,
}

/// The node state owned by the loop.
pub struct Node {
    engine: Engine,
    store: Store,
    swarm: Swarm<Behaviour>,
    /// Opens the sync streams to peers.
    streams: libp2p_stream::Control,
    /// Peers' sync streams, until `run` starts reading them.
    incoming: Option<libp2p_stream::IncomingStreams>,
    peers: BTreeMap<PeerId, Conn>,
    peer_of: BTreeMap<PeerId, ReplicaId>,
    known_addrs: BTreeMap<PeerId, BTreeSet<Multiaddr>>,
    static_conn: BTreeMap<Multiaddr, Option<PeerId>>,
    last_dial: BTreeMap<String, Instant>,
    /// Sales the engine has not decided yet: the API's reply and when the sale came in.
    sales: BTreeMap<Ticket, (oneshot::Sender<Result<SaleView, ApiError>>, Instant)>,
    next_ticket: u64,
    live: broadcast::Sender<LiveEvent>,
    orders: VecDeque<OrderView>,
    metrics: Metrics,
    listen: Vec<Multiaddr>,
    /// Set when a local change could not be made durable: the node stops so that a restart
    /// rebuilds it from what is on disk (the unwritten change was never sent anywhere, so its
    /// sequence number is free again).
    fatal: Option<String>,
    last_dial_warning: Option<Instant>,
    started: Instant,
    /// When the oldest received change not yet made durable was stored.
    received_unsynced: Option<Instant>,
    relay: Option<relay::RelayConn>,
    relay_key: Option<halftime_ledger::PublicKey>,
    uplink: Option<mpsc::Receiver<crate::uplink::UplinkEvent>>,
    snapshot_every: u64,
    /// Changes held when the latest snapshot was written or loaded.
    snapshot_len: usize,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.engine.ledger().me())
    }
}

impl Node {
    /// A node over a restored ledger.
    pub fn new(
        ledger: halftime_ledger::Ledger,
        store: Store,
        swarm: Swarm<Behaviour>,
        cfg: NodeConfig,
        live: broadcast::Sender<LiveEvent>,
    ) -> Self {
        let static_conn = cfg.static_peers.iter().map(|a| (a.clone(), None)).collect();
        let engine_cfg = EngineConfig {
            sync_interval_ms: cfg.sync_interval_ms,
            sale_wait_ms: cfg.sale_wait_ms,
            ..EngineConfig::default()
        };
        let mut streams = swarm.behaviour().streams.new_control();
        // A new control on a new behaviour: the protocol cannot be registered already.
        let incoming = streams
            .accept(crate::net::SYNC_PROTOCOL)
            .inspect_err(|e| tracing::error!(error = %e, "cannot accept sync streams"))
            .ok();
        let mut n = Self {
            engine: Engine::new(ledger, engine_cfg, now_ms()),
            store,
            swarm,
            streams,
            incoming,
            peers: BTreeMap::new(),
            peer_of: BTreeMap::new(),
            known_addrs: BTreeMap::new(),
            static_conn,
            last_dial: BTreeMap::new(),
            sales: BTreeMap::new(),
            next_ticket: 0,
            live,
            orders: VecDeque::new(),
            metrics: Metrics::default(),
            listen: Vec::new(),
            fatal: None,
            received_unsynced: None,
            last_dial_warning: None,
            started: Instant::now(),
            relay: None,
            relay_key: None,
            uplink: None,
            snapshot_every: cfg.snapshot_every,
            snapshot_len: 0,
        };
        n.refresh_allowlist();
        let now = now_ms();
        // The kitchen queue keeps only the latest orders: fill it from those alone.
        let all = n.engine.ledger().sales();
        let sales: Vec<_> = all[all.len().saturating_sub(KITCHEN_QUEUE_LEN)..]
            .iter()
            .map(|e| e.record.clone())
            .collect();
        for s in sales {
            n.note_order(&s, now, false);
        }
        n
    }

    /// The replica was loaded from a snapshot covering `covered` changes.
    pub fn snapshot_covers(mut self, covered: usize) -> Self {
        self.snapshot_len = covered;
        self
    }

    /// Take the relay uplink's events (see [`crate::uplink::run`]).
    /// `relay_key`: the relay's key as the operator gave it, trusted until the document says
    /// otherwise (see `Ledger::admits_pinned`).
    pub fn with_uplink(
        mut self,
        events: mpsc::Receiver<crate::uplink::UplinkEvent>,
        relay_key: Option<halftime_ledger::PublicKey>,
    ) -> Self {
        self.uplink = Some(events);
        self.relay_key = relay_key;
        self
    }

    /// Run until `shutdown` fires; an error when the store failed and the node had to stop.
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut shutdown: oneshot::Receiver<()>,
    ) -> Result<(), String> {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut uplink = self.uplink.take();
        let (inbound_tx, mut inbound) = mpsc::channel(crate::net::INBOUND_QUEUE_LEN);
        if let Some(incoming) = self.incoming.take() {
            tokio::spawn(crate::net::accept_streams(incoming, inbound_tx));
        }
        loop {
            let engine_wait = self.engine_wait();
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { break };
                    let mut batch = vec![cmd];
                    while batch.len() < GROUP_COMMIT_MAX {
                        match cmds.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    self.handle_commands(batch);
                }
                ev = self.swarm.select_next_some() => self.handle_swarm(ev),
                Some(first) = inbound.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < FRAMES_PER_BATCH {
                        match inbound.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    self.handle_inbound(batch);
                }
                ev = async {
                    match uplink.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match ev {
                    Some(ev) => self.handle_uplink(ev),
                    None => uplink = None,
                },
                _ = tick.tick() => self.handle_tick(),
                _ = tokio::time::sleep(engine_wait) => {
                    self.engine.handle_timeout(now_ms());
                }
            }
            self.pump();
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            self.sync_received(false);
            self.flush();
            self.snapshot(false);
        }
        self.sync_received(true);
        self.snapshot(true);
        tracing::info!(
            changes = self.engine.ledger().len(),
            "stopped; every change held is on disk"
        );
        Ok(())
    }

    /// Group-commit received changes: once `RECEIVED_SYNC_MS` after the first unsynced one,
    /// or now when `force`d (on the way out).
    fn sync_received(&mut self, force: bool) {
        let Some(since) = self.received_unsynced else {
            return;
        };
        if !force && since.elapsed() < Duration::from_millis(RECEIVED_SYNC_MS) {
            return;
        }
        match self.store.sync() {
            Ok(()) => self.received_unsynced = None,
            Err(e) => {
                // Not fatal: what is not durable is fetched again by the repair.
                self.metrics.store_errors += 1;
                tracing::error!(error = %e, "could not make received changes durable");
            }
        }
    }

    /// Write a snapshot once `snapshot_every` changes came in since the last one, or now when
    /// `force`d and anything did (on the way out). It runs on this task, between events: the
    /// time it takes is in `/metrics`. A failure is logged; the store of changes is intact
    /// and the next start replays more of it.
    fn snapshot(&mut self, force: bool) {
        let held = self.engine.ledger().len();
        let new = held.saturating_sub(self.snapshot_len) as u64;
        let due = if force {
            new > 0
        } else {
            self.snapshot_every > 0 && new >= self.snapshot_every
        };
        if !due {
            return;
        }
        let t = Instant::now();
        let bytes = self.engine.snapshot();
        match self.store.put_snapshot(&bytes) {
            Ok(()) => {
                self.received_unsynced = None;
                self.snapshot_len = held;
                self.metrics.snapshots += 1;
                self.metrics.snapshot_ms = t.elapsed().as_millis() as u64;
                tracing::info!(
                    covers = held,
                    bytes = bytes.len(),
                    ms = self.metrics.snapshot_ms,
                    "snapshot written"
                );
            }
            Err(e) => {
                self.metrics.store_errors += 1;
                // Retried after as many changes again, not on every event.
                self.snapshot_len = held;
                tracing::error!(error = %e, "could not write a snapshot; the next start replays more");
            }
        }
    }

    /// How long until the engine wants `handle_timeout` (at most a tick, so a clock that
    /// jumps is noticed).
    fn engine_wait(&self) -> Duration {
        let wake = self.engine.poll_timeout();
        Duration::from_millis(wake.saturating_sub(now_ms()).min(TICK_MS))
    }

    /// Act on everything the engine asks for: local changes are written durably (then the
    /// engine releases their acknowledgements and frames), received ones stored for the next
    /// group commit, outcomes answered. A failed durable write stops the node (see `fatal`):
    /// nothing of those changes has left this replica.
    fn pump(&mut self) {
        loop {
            let mut local: Vec<SignedChange> = Vec::new();
            while let Some(ev) = self.engine.poll_event() {
                match ev {
                    Event::Persist(changes) => local.extend(changes),
                    Event::Received { changes, .. } => self.store_received(&changes),
                    Event::Changed(applied) => self.after_change(&applied),
                    Event::Committed {
                        ticket,
                        sale_id,
                        waited_ms,
                    } => {
                        let Some((reply, since)) = self.sales.remove(&ticket) else {
                            continue;
                        };
                        self.metrics.ack_us_sum += since.elapsed().as_micros() as u64;
                        self.metrics.ack_count += 1;
                        let view = self.sale_view(sale_id).map(|v| SaleView { waited_ms, ..v });
                        let _ = reply.send(
                            view.ok_or_else(|| ApiError::internal("sale not found after commit")),
                        );
                    }
                    Event::Refused { ticket, refusal } => {
                        if let Some((reply, _)) = self.sales.remove(&ticket) {
                            let _ = reply.send(Err(ApiError::sale_refused(refusal)));
                        }
                    }
                    Event::Rejected { from, rejections } => {
                        for r in &rejections {
                            tracing::warn!(?from, rule = r.rule(), error = %r, "rejected a received change");
                        }
                    }
                    Event::Fault(why) => {
                        tracing::error!(%why, "an operation of this replica's own failed (a bug); nothing of it was written");
                    }
                    // Answers to admin requests go to the relay that asks them; a device
                    // asks none.
                    Event::AdminAnswered { from, id, .. } => {
                        tracing::debug!(%from, id, "an admin answer this replica did not ask for");
                    }
                    // Only a relay of several instances hands anything to its others.
                    Event::Elsewhere(_) => {}
                    Event::PeerGone(replica) => {
                        // A silent cut leaves TCP connections open and closing them waits on
                        // the dead link: the engine has dropped the peer, close it here too;
                        // the redial brings it back once the link heals.
                        let ids: Vec<PeerId> = self
                            .peers
                            .iter()
                            .filter(|(_, c)| c.replica == replica)
                            .map(|(p, _)| *p)
                            .collect();
                        for id in ids {
                            tracing::info!(peer = %id, "peer silent; dropping it");
                            let _ = self.swarm.disconnect_peer_id(id);
                            self.peers.remove(&id);
                        }
                        // Dropping the uplink's sender closes it; the uplink reconnects.
                        if self.relay.take_if(|r| r.replica == replica).is_some() {
                            tracing::info!(%replica, "relay silent; dropping the uplink");
                        }
                        self.publish_peers();
                    }
                }
            }
            if local.is_empty() {
                return;
            }
            let t = Instant::now();
            let written = self.store.append(&local, true);
            self.metrics.commit_us_sum += t.elapsed().as_micros() as u64;
            self.metrics.commit_count += 1;
            if let Err(e) = written {
                self.metrics.store_errors += 1;
                let msg = format!(
                    "could not make local changes durable: {e}; stopping so a restart recovers from disk"
                );
                tracing::error!("{msg}");
                for (_, (reply, _)) in std::mem::take(&mut self.sales) {
                    let _ = reply.send(Err(ApiError::unavailable(&msg)));
                }
                self.fatal = Some(msg);
                return;
            }
            // The immediate commit made every received change stored before it durable too.
            self.received_unsynced = None;
            self.engine.persisted();
        }
    }

    fn store_received(&mut self, changes: &[SignedChange]) {
        match self.store.append(changes, false) {
            Ok(()) => {
                self.received_unsynced.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                // Not fatal: what is not stored is fetched again by the repair after a restart.
                self.metrics.store_errors += 1;
                tracing::error!(error = %e, "could not store received changes");
            }
        }
    }
}

/// Default anti-entropy interval for the peer.
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = ANTI_ENTROPY_INTERVAL_MS;
