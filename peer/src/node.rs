//! The node: one task that owns the stand engine, the store and the swarm, driven by commands
//! from the local API, by the network and by the engine's timer. Every rule of the stand is
//! the engine's; this loop feeds it, writes what it asks to persist, sends what it wants sent
//! and answers the API (quinn's driver pattern).

use crate::net::{Behaviour, BehaviourEvent};
use crate::store::Store;
use futures::StreamExt;
use halftime_engine::{Engine, EngineConfig, Event, SaleOrder, SaleRefusal, Ticket};
use halftime_ledger::sync::ANTI_ENTROPY_INTERVAL_MS;
use halftime_ledger::{
    OpError, Policy, Refusal, ReplicaId, Role, SaleId, SignedChange, Sku, StockStatus,
};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm, mdns, ping, request_response};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};

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
/// Sync frames in flight to one peer before further ones wait.
pub const MAX_INFLIGHT_PER_PEER: usize = 64;
/// Orders shown on the kitchen page.
pub const KITCHEN_QUEUE_LEN: usize = 500;

/// Wall-clock milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request from the API to the node.
#[derive(Debug)]
pub enum Command {
    /// Sell.
    Sell(SaleInput, oneshot::Sender<Result<SaleView, ApiError>>),
    /// Void a sale.
    Void(SaleId, oneshot::Sender<Result<SaleView, ApiError>>),
    /// Stock view.
    Stock(oneshot::Sender<Vec<StockRow>>),
    /// Status.
    Status(oneshot::Sender<StatusView>),
    /// Kitchen queue.
    Orders(oneshot::Sender<Vec<OrderView>>),
    /// Mark an order done.
    OrderDone(SaleId, oneshot::Sender<Result<(), ApiError>>),
    /// Prometheus text.
    Metrics(oneshot::Sender<String>),
    /// Pool: retire a lost replica and take its rights back, on the stand's latest view of it.
    Reclaim(ReplicaId, oneshot::Sender<Result<ReclaimResult, ApiError>>),
}

/// What a reclaim did, and what it was based on.
#[derive(Debug, Clone, Serialize)]
pub struct ReclaimResult {
    #[serde(flatten)]
    pub view: halftime_ledger::ReclaimView,
    /// How long before the reclaim the replica made its last change (`None`: never wrote).
    pub last_change_age_ms: Option<u64>,
}

/// A sale as the API takes it. Unknown fields are refused: a field this version does not know
/// (`"discount": 100`) must not be silently ignored.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleInput {
    pub lines: Vec<LineInput>,
    pub payment: PaymentInput,
}

/// How a sale is paid, as the API takes it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentInput {
    pub method: halftime_ledger::PaymentMethod,
    /// The processor's reference (a payment intent id); empty for cash. At most
    /// `MAX_TEXT_BYTES`, like every text a change carries.
    #[serde(default)]
    pub reference: String,
}

/// One line as the API takes it: the price comes from the catalog.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineInput {
    /// Item.
    pub sku: Sku,
    /// Units.
    pub qty: u64,
}

/// A sale as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct SaleView {
    /// Id.
    pub sale_id: SaleId,
    /// Record.
    pub sale: halftime_ledger::SaleRecord,
    /// Total.
    pub total_cents: u64,
    /// Voided.
    pub voided: bool,
    /// How long the sale waited for rights from other replicas before it committed (0: it
    /// committed at once).
    pub waited_ms: u64,
}

/// An API error: status code and body.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// Short error code.
    pub error: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// The structured refusal, when the ledger refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// For a refused sale: the replicas asked for rights before giving up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked: Option<Vec<ReplicaId>>,
    /// For a refused sale: how long it waited for rights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

impl ApiError {
    fn refused(r: Refusal) -> Self {
        let (status, error) = match r {
            Refusal::UnknownSale { .. } => (404, "refused"),
            Refusal::Invalid { .. } | Refusal::UnknownSku { .. } => (422, "refused"),
            Refusal::NoStand | Refusal::NotEnrolled => (409, "not_a_member"),
            Refusal::UnknownReplica { .. } => (404, "refused"),
            _ => (409, "refused"),
        };
        Self {
            status,
            error,
            message: r.to_string(),
            refusal: Some(r),
            asked: None,
            waited_ms: None,
        }
    }
    fn sale_refused(r: SaleRefusal) -> Self {
        let message = r.to_string();
        Self {
            message,
            asked: Some(r.asked),
            waited_ms: Some(r.waited_ms),
            ..Self::refused(r.reason)
        }
    }
    fn internal(m: impl std::fmt::Display) -> Self {
        Self {
            status: 500,
            error: "internal",
            message: m.to_string(),
            refusal: None,
            asked: None,
            waited_ms: None,
        }
    }
    fn unavailable(m: impl std::fmt::Display) -> Self {
        Self {
            status: 503,
            error: "storage_unavailable",
            message: m.to_string(),
            refusal: None,
            asked: None,
            waited_ms: None,
        }
    }
}

/// One row of the stock view.
#[derive(Debug, Clone, Serialize)]
pub struct StockRow {
    /// Item.
    pub sku: Sku,
    /// Name.
    pub name: String,
    /// Price.
    pub price_cents: u64,
    /// What the stand has left.
    pub available: i64,
    /// This replica's rights.
    pub rights: i64,
    /// ok | low | out.
    pub status: StockStatus,
    /// Units this replica may sell right now.
    pub sellable_now: u64,
}

/// Node status.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// This replica.
    pub replica: ReplicaId,
    /// Its libp2p identity.
    pub peer_id: String,
    /// Role, once enrolled.
    pub role: Option<Role>,
    /// Stand.
    pub stand: String,
    /// Policy.
    pub policy: Policy,
    /// Connected peers (replica ids).
    pub peers: Vec<ReplicaId>,
    /// Whether the pool is connected (on the pool: whether any replica is connected to it).
    pub pool_reachable: bool,
    /// Sync messages waiting to go out.
    pub repair_backlog: usize,
    /// Received changes waiting for dependencies.
    pub pending: usize,
    /// Changes held.
    pub changes: usize,
    /// Listening addresses.
    pub listen: Vec<String>,
}

/// A kitchen order.
#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    /// Sale.
    pub sale_id: SaleId,
    /// Lines.
    pub lines: Vec<halftime_ledger::SaleLine>,
    /// When it reached this replica (ms).
    pub received_ms: u64,
    /// Marked done here.
    pub done: bool,
    /// Voided by the seller.
    pub voided: bool,
}

/// A live event.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// Stock of these items changed.
    Stock {
        /// Rows.
        rows: Vec<StockRow>,
    },
    /// A new order (kitchen).
    Order {
        /// The order.
        order: OrderView,
    },
    /// Peers changed.
    Peers {
        /// Connected replicas.
        peers: Vec<ReplicaId>,
        /// Pool connected.
        pool_reachable: bool,
    },
}

#[derive(Debug, Default)]
struct Metrics {
    voids: u64,
    connections_refused: u64,
    dials_failed: u64,
    frames_sent: u64,
    ack_us_sum: u64,
    ack_count: u64,
    store_errors: u64,
}

/// A connected peer, as the transport sees it.
struct Conn {
    replica: ReplicaId,
    inflight: usize,
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
}

/// The node state owned by the loop.
pub struct Node {
    engine: Engine,
    store: Store,
    swarm: Swarm<Behaviour>,
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
        let mut n = Self {
            engine: Engine::new(ledger, engine_cfg, now_ms()),
            store,
            swarm,
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
        };
        n.refresh_allowlist();
        let now = now_ms();
        let sales: Vec<_> = n
            .engine
            .ledger()
            .sales()
            .iter()
            .map(|e| e.record.clone())
            .collect();
        for s in sales {
            n.note_order(&s, now, false);
        }
        n
    }

    /// Run until `shutdown` fires; an error when the store failed and the node had to stop.
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut shutdown: oneshot::Receiver<()>,
    ) -> Result<(), String> {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        }
        self.sync_received(true);
        tracing::info!(
            changes = self.engine.ledger().len(),
            "stopped; every change held is on disk"
        );
        Ok(())
    }

    /// A replica that has not reached its stand says so, first after a few seconds, then every
    /// `DIAL_WARNING_INTERVAL_MS`, with what to check.
    fn warn_if_outside_the_stand(&mut self) {
        let member =
            self.engine.ledger().stand().is_some() && self.engine.ledger().role().is_some();
        if member || self.started.elapsed() < Duration::from_millis(NOT_A_MEMBER_GRACE_MS) {
            return;
        }
        let quiet = self
            .last_dial_warning
            .is_some_and(|t| t.elapsed() < Duration::from_millis(DIAL_WARNING_INTERVAL_MS));
        if quiet {
            return;
        }
        self.last_dial_warning = Some(Instant::now());
        tracing::warn!(
            peers = self.peers.len(),
            has_stand_document = self.engine.ledger().stand().is_some(),
            "not a member of any stand yet, cannot reach the stand: check that this device has \
             the stand's key (`halftime-peer join --psk`, same stand_key_fingerprint as the \
             pool's log) and that the pool enrolled its public key"
        );
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
                    Event::Received(changes) => self.store_received(&changes),
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
                        self.publish_peers();
                    }
                }
            }
            if local.is_empty() {
                return;
            }
            if let Err(e) = self.store.append(&local, true) {
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
            self.after_change(&local);
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
        self.after_change(changes);
    }

    // ---------------------------------------------------------------------------------------
    // Commands (group commit).

    fn handle_commands(&mut self, batch: Vec<Command>) {
        let now = now_ms();
        let mut replies: Vec<Box<dyn FnOnce(&mut Node, Option<&str>)>> = Vec::new();
        for cmd in batch {
            match cmd {
                Command::Sell(input, reply) => match self.sale_order(input) {
                    Ok(order) => {
                        let ticket = Ticket(self.next_ticket);
                        self.next_ticket += 1;
                        self.sales.insert(ticket, (reply, Instant::now()));
                        self.engine.sell(ticket, order, now);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Command::Void(sale, reply) => {
                    match self
                        .engine
                        .local_op(now, |l, now| Ok((l.void(sale, now)?, ())))
                    {
                        Ok(()) => {
                            replies.push(Box::new(move |n: &mut Node, err| {
                                let _ = match err {
                                    None => {
                                        n.metrics.voids += 1;
                                        reply.send(
                                            n.sale_view(sale)
                                                .ok_or_else(|| ApiError::internal("void lost")),
                                        )
                                    }
                                    Some(e) => reply.send(Err(ApiError::unavailable(e))),
                                };
                            }));
                        }
                        Err(OpError::Refused(r)) => {
                            let _ = reply.send(Err(ApiError::refused(r)));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(ApiError::internal(e)));
                        }
                    }
                }
                Command::Stock(reply) => {
                    let _ = reply.send(self.stock_rows(None));
                }
                Command::Reclaim(replica, reply) => match self.engine.reclaim(replica, now) {
                    Ok(view) => {
                        let age = view.last_change_at.map(|t| now.saturating_sub(t.wall_ms()));
                        tracing::info!(
                            %replica,
                            last_seq = view.last_seq,
                            last_change_age_ms = age,
                            peers_consulted = view.peers_consulted,
                            "reclaimed"
                        );
                        let result = ReclaimResult {
                            view,
                            last_change_age_ms: age,
                        };
                        replies.push(Box::new(move |_: &mut Node, err| {
                            let _ = match err {
                                None => reply.send(Ok(result)),
                                Some(e) => reply.send(Err(ApiError::unavailable(e))),
                            };
                        }));
                    }
                    Err(OpError::Refused(r)) => {
                        let _ = reply.send(Err(ApiError::refused(r)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::internal(e)));
                    }
                },
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Command::Orders(reply) => {
                    let _ = reply.send(self.orders.iter().cloned().collect());
                }
                Command::OrderDone(sale, reply) => {
                    let r = match self.orders.iter_mut().find(|o| o.sale_id == sale) {
                        Some(o) => {
                            o.done = true;
                            Ok(())
                        }
                        None => Err(ApiError::refused(Refusal::UnknownSale { sale })),
                    };
                    let _ = reply.send(r);
                }
                Command::Metrics(reply) => {
                    let _ = reply.send(self.metrics_text());
                }
            }
        }
        // One durable write for the whole batch, then the acknowledgements.
        self.pump();
        let err = self.fatal.clone();
        for r in replies {
            r(self, err.as_deref());
        }
    }

    fn sale_order(&self, input: SaleInput) -> Result<SaleOrder, ApiError> {
        // Membership first: a replica outside any stand has no catalog, and "unknown sku"
        // would send the operator looking in the wrong place.
        if self.engine.ledger().stand().is_none() {
            return Err(ApiError::refused(Refusal::NoStand));
        }
        if self.engine.ledger().role().is_none() {
            return Err(ApiError::refused(Refusal::NotEnrolled));
        }
        let mut lines = Vec::new();
        for l in input.lines {
            let item = self
                .engine
                .ledger()
                .catalog()
                .get(&l.sku)
                .ok_or_else(|| ApiError::refused(Refusal::UnknownSku { sku: l.sku.clone() }))?;
            lines.push(halftime_ledger::SaleLine {
                sku: l.sku,
                qty: l.qty,
                unit_price_cents: item.price_cents,
            });
        }
        Ok(SaleOrder {
            lines,
            payment: halftime_ledger::Payment {
                method: input.payment.method,
                reference: input.payment.reference,
            },
        })
    }

    fn sale_view(&self, id: SaleId) -> Option<SaleView> {
        self.engine.ledger().sale(id).map(|e| SaleView {
            sale_id: id,
            total_cents: e.record.total_cents(),
            sale: e.record.clone(),
            voided: e.voided,
            waited_ms: 0,
        })
    }

    /// Stock rows, for all items or only `only`.
    pub fn stock_rows(&self, only: Option<&BTreeSet<Sku>>) -> Vec<StockRow> {
        let me = self.engine.ledger().me();
        let online = self.pool_reachable();
        self.engine
            .ledger()
            .catalog()
            .values()
            .filter(|c| only.is_none_or(|o| o.contains(&c.sku)))
            .map(|c| StockRow {
                sku: c.sku.clone(),
                name: c.name.clone(),
                price_cents: c.price_cents,
                available: self.engine.ledger().available(&c.sku),
                rights: self.engine.ledger().rights(me, &c.sku),
                status: self.engine.ledger().status(&c.sku),
                sellable_now: self.engine.ledger().sellable_now(&c.sku, online),
            })
            .collect()
    }

    fn status(&self) -> StatusView {
        StatusView {
            replica: self.engine.ledger().me(),
            peer_id: self.swarm.local_peer_id().to_string(),
            role: self.engine.ledger().role(),
            stand: self.engine.ledger().stand_id().to_string(),
            policy: self.engine.ledger().policy(),
            peers: self.connected_replicas(),
            // On the pool itself "reachable" means some replica of the stand is connected to
            // it: a pool alone must not look like a healthy stand.
            pool_reachable: self.pool_reachable(),
            repair_backlog: self
                .peers
                .values()
                .map(|c| self.engine.backlog(c.replica))
                .sum(),
            pending: self.engine.ledger().pending_len(),
            changes: self.engine.ledger().len(),
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn connected_replicas(&self) -> Vec<ReplicaId> {
        self.engine.peers().collect()
    }

    /// Whether this replica reaches the pool (on the pool: whether any replica reaches it).
    pub fn pool_reachable(&self) -> bool {
        self.engine.pool_reachable()
    }

    fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let e = self.engine.stats();
        let s = self.engine.ledger().stats();
        let mut out = String::new();
        let mut line = |name: &str, help: &str, kind: &str, v: String| {
            out.push_str(&format!("# HELP halftime_{name} {help}\n# TYPE halftime_{name} {kind}\nhalftime_{name} {v}\n"));
        };
        line(
            "sales_committed_total",
            "Sales committed and acknowledged here.",
            "counter",
            e.sales_committed.to_string(),
        );
        line(
            "sales_refused_total",
            "Sales refused here.",
            "counter",
            e.sales_refused.to_string(),
        );
        line(
            "sales_held_total",
            "Sales that waited for rights from other replicas before their outcome.",
            "counter",
            e.sales_held.to_string(),
        );
        line(
            "rights_requests_sent_total",
            "Requests for rights sent to other replicas.",
            "counter",
            e.rights_requests_sent.to_string(),
        );
        line(
            "gives_total",
            "Gives of rights made here (answers and allocation plans).",
            "counter",
            (e.gives_answered + e.gives_planned).to_string(),
        );
        line(
            "voids_total",
            "Sales voided here.",
            "counter",
            m.voids.to_string(),
        );
        line(
            "changes_received_total",
            "Received changes accepted.",
            "counter",
            e.changes_received.to_string(),
        );
        line(
            "changes_duplicate_total",
            "Received duplicates dropped.",
            "counter",
            e.changes_duplicate.to_string(),
        );
        line(
            "frames_rejected_total",
            "Frames from peers that did not decode.",
            "counter",
            e.frames_rejected.to_string(),
        );
        line(
            "connections_refused_total",
            "Incoming connections refused (wrong stand key or not enrolled).",
            "counter",
            m.connections_refused.to_string(),
        );
        line(
            "dials_failed_total",
            "Outgoing connections that failed.",
            "counter",
            m.dials_failed.to_string(),
        );
        line(
            "frames_sent_total",
            "Sync frames sent.",
            "counter",
            m.frames_sent.to_string(),
        );
        line(
            "store_errors_total",
            "Failed durable writes.",
            "counter",
            m.store_errors.to_string(),
        );
        line(
            "ack_seconds_sum",
            "Time from a sale's arrival to its durable acknowledgement (a sale that waits for rights included).",
            "counter",
            format!("{}", m.ack_us_sum as f64 / 1e6),
        );
        line(
            "ack_seconds_count",
            "Acknowledged sales.",
            "counter",
            m.ack_count.to_string(),
        );
        line(
            "peers_connected",
            "Connected stand replicas.",
            "gauge",
            self.peers.len().to_string(),
        );
        line(
            "pool_reachable",
            "1 when the pool is connected.",
            "gauge",
            (self.pool_reachable() as u8).to_string(),
        );
        line(
            "changes_stored",
            "Changes in the document.",
            "gauge",
            self.engine.ledger().len().to_string(),
        );
        line(
            "changes_pending",
            "Received changes waiting for dependencies.",
            "gauge",
            self.engine.ledger().pending_len().to_string(),
        );
        line(
            "changes_pending_bytes",
            "Bytes held by received changes that wait.",
            "gauge",
            self.engine.ledger().pending_bytes().to_string(),
        );
        out.push_str("# HELP halftime_changes_rejected_total Received changes rejected, by rule.\n# TYPE halftime_changes_rejected_total counter\n");
        for (rule, n) in &s.rejected {
            out.push_str(&format!(
                "halftime_changes_rejected_total{{rule=\"{rule}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP halftime_changes_rejected_by_replica_total Received changes rejected, by the replica whose key signed them and rule.\n# TYPE halftime_changes_rejected_by_replica_total counter\n");
        for (replica, rules) in &s.by_replica {
            for (rule, n) in rules {
                out.push_str(&format!(
                    "halftime_changes_rejected_by_replica_total{{replica=\"{replica}\",rule=\"{rule}\"}} {n}\n"
                ));
            }
        }
        out
    }

    // ---------------------------------------------------------------------------------------
    // Network.

    fn refresh_allowlist(&mut self) {
        let pool_key = self.engine.ledger().pool_key();
        let mut allowed: BTreeMap<PeerId, ReplicaId> = BTreeMap::new();
        if let Ok(p) = pool_key.peer_id() {
            allowed.insert(p, pool_key.replica_id());
        }
        for (rid, info) in self.engine.ledger().replicas() {
            if info.retired_at_pool_seq.is_none() {
                if let Ok(p) = info.key.peer_id() {
                    allowed.insert(p, *rid);
                }
            }
        }
        let me = *self.swarm.local_peer_id();
        for p in allowed.keys() {
            if *p != me && !self.peer_of.contains_key(p) {
                self.swarm.behaviour_mut().allow.allow_peer(*p);
            }
        }
        let removed: Vec<PeerId> = self
            .peer_of
            .keys()
            .filter(|p| !allowed.contains_key(p))
            .copied()
            .collect();
        for p in removed {
            self.swarm.behaviour_mut().allow.disallow_peer(p);
            let _ = self.swarm.disconnect_peer_id(p);
        }
        self.peer_of = allowed;
    }

    fn handle_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        let now = now_ms();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    if let Some(slot) = self.static_conn.get_mut(&addr) {
                        *slot = Some(peer_id);
                    }
                }
                // Only enrolled replicas pass the allowlist, so every connection has one.
                let replica = self.peer_of.get(&peer_id).copied();
                if let (false, Some(replica)) = (self.peers.contains_key(&peer_id), replica) {
                    tracing::info!(%peer_id, %replica, "peer connected");
                    self.engine.peer_up(replica, now);
                    self.peers.insert(
                        peer_id,
                        Conn {
                            replica,
                            inflight: 0,
                        },
                    );
                    self.publish_peers();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                if num_established == 0 {
                    if let Some(c) = self.peers.remove(&peer_id) {
                        tracing::info!(%peer_id, ?cause, "peer disconnected");
                        self.engine.peer_down(c.replica, now);
                        self.publish_peers();
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                // Remember every address: a peer not yet known to be enrolled (before the
                // registry has synced) is dialled as soon as it is.
                for (peer, addr) in list {
                    self.known_addrs.entry(peer).or_default().insert(addr);
                    if self.peer_of.contains_key(&peer) && !self.peers.contains_key(&peer) {
                        self.dial_peer(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                for (peer, addr) in list {
                    if let Some(s) = self.known_addrs.get_mut(&peer) {
                        s.remove(&addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            })) => match result {
                Ok(_) => self.heard(&peer, now),
                Err(e) => {
                    tracing::info!(%peer, error = %e, "ping failed; closing the connection");
                    self.swarm.close_connection(connection);
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.handle_sync(ev, now),
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                self.metrics.connections_refused += 1;
                tracing::warn!(
                    %send_back_addr,
                    %error,
                    "refused an incoming connection: not this stand's network key, or a key \
                     the stand has not enrolled"
                );
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.metrics.dials_failed += 1;
                // A replica that reaches no one says why, now and then: the usual cause is a
                // stand key that differs, or a key the pool has not enrolled yet.
                let quiet = self
                    .last_dial_warning
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(DIAL_WARNING_INTERVAL_MS));
                if self.peers.is_empty() && !quiet {
                    self.last_dial_warning = Some(Instant::now());
                    tracing::warn!(
                        ?peer_id,
                        %error,
                        member = self.engine.ledger().role().is_some(),
                        "cannot reach the stand: check that this device has the stand's key \
                         (`halftime-peer join --psk`) and that the pool enrolled it"
                    );
                } else {
                    tracing::debug!(?peer_id, %error, "dial failed");
                }
            }
            _ => {}
        }
    }

    fn handle_sync(&mut self, ev: request_response::Event<Vec<u8>, ()>, now: u64) {
        match ev {
            request_response::Event::Message { peer, message, .. } => {
                self.heard(&peer, now);
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let _ = self.swarm.behaviour_mut().sync.send_response(channel, ());
                        let Some(replica) = self.peers.get(&peer).map(|c| c.replica) else {
                            return;
                        };
                        if let Err(e) = self.engine.handle_frame(replica, &request, now) {
                            tracing::warn!(%peer, error = %e, "rejected a frame");
                        }
                    }
                    request_response::Message::Response { .. } => {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.inflight = p.inflight.saturating_sub(1);
                        }
                    }
                }
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "sync frame not delivered");
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.inflight = p.inflight.saturating_sub(1);
                }
            }
            _ => {}
        }
    }

    /// Registry, live feed and kitchen after changes were applied.
    fn after_change(&mut self, changes: &[SignedChange]) {
        let now = now_ms();
        let before = self.peer_of.len();
        self.refresh_allowlist();
        if self.peer_of.len() != before {
            self.publish_peers();
        }
        let mut skus = BTreeSet::new();
        let mut new_sales = Vec::new();
        for c in changes {
            if let Ok(ch) = automerge::Change::try_from(&c.bytes[..]) {
                if let Ok(m) = halftime_ledger::ChangeMessage::decode(ch.message()) {
                    match &m.op {
                        halftime_ledger::Operation::Sale(rec) => {
                            skus.extend(rec.units().into_keys());
                            new_sales.push(rec.clone());
                        }
                        halftime_ledger::Operation::Void { sale, units } => {
                            skus.extend(units.keys().cloned());
                            if let Some(o) = self.orders.iter_mut().find(|o| o.sale_id == *sale) {
                                o.voided = true;
                                let _ = self.live.send(LiveEvent::Order { order: o.clone() });
                            }
                        }
                        halftime_ledger::Operation::Restock { units, .. }
                        | halftime_ledger::Operation::Adjust { units, .. }
                        | halftime_ledger::Operation::Give { units, .. }
                        | halftime_ledger::Operation::Reclaim { units, .. } => {
                            skus.extend(units.keys().cloned())
                        }
                        _ => skus.extend(self.engine.ledger().catalog().keys().cloned()),
                    }
                }
            }
        }
        for s in &new_sales {
            self.note_order(s, now, true);
        }
        if !skus.is_empty() {
            let rows = self.stock_rows(Some(&skus));
            let _ = self.live.send(LiveEvent::Stock { rows });
        }
    }

    fn note_order(&mut self, rec: &halftime_ledger::SaleRecord, now: u64, publish: bool) {
        if self.orders.iter().any(|o| o.sale_id == rec.id) {
            return;
        }
        let order = OrderView {
            sale_id: rec.id,
            lines: rec.lines.clone(),
            received_ms: now,
            done: false,
            voided: false,
        };
        if self.orders.len() >= KITCHEN_QUEUE_LEN {
            self.orders.pop_front();
        }
        self.orders.push_back(order.clone());
        if publish {
            let _ = self.live.send(LiveEvent::Order { order });
        }
    }

    fn publish_peers(&self) {
        let _ = self.live.send(LiveEvent::Peers {
            peers: self.connected_replicas(),
            pool_reachable: self.pool_reachable(),
        });
    }

    fn dial_peer(&mut self, peer: PeerId) {
        let key = peer.to_string();
        if self
            .last_dial
            .get(&key)
            .is_some_and(|t| t.elapsed() < Duration::from_millis(REDIAL_INTERVAL_MS))
        {
            return;
        }
        self.last_dial.insert(key, Instant::now());
        let addrs: Vec<Multiaddr> = self
            .known_addrs
            .get(&peer)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        if addrs.is_empty() {
            return;
        }
        let _ = self
            .swarm
            .dial(DialOpts::peer_id(peer).addresses(addrs).build());
    }

    fn heard(&mut self, peer: &PeerId, now: u64) {
        if let Some(c) = self.peers.get(peer) {
            self.engine.heard(c.replica, now);
        }
    }

    fn handle_tick(&mut self) {
        self.warn_if_outside_the_stand();
        // Redial static peers and discovered peers that are not connected.
        let statics: Vec<(Multiaddr, Option<PeerId>)> = self
            .static_conn
            .iter()
            .map(|(a, p)| (a.clone(), *p))
            .collect();
        for (addr, p) in statics {
            if p.is_some_and(|p| self.peers.contains_key(&p)) {
                continue;
            }
            let key = addr.to_string();
            if self
                .last_dial
                .get(&key)
                .is_some_and(|t| t.elapsed() < Duration::from_millis(REDIAL_INTERVAL_MS))
            {
                continue;
            }
            self.last_dial.insert(key, Instant::now());
            let _ = self.swarm.dial(addr);
        }
        let discovered: Vec<PeerId> = self
            .known_addrs
            .keys()
            .filter(|p| self.peer_of.contains_key(p) && !self.peers.contains_key(p))
            .copied()
            .collect();
        for p in discovered {
            self.dial_peer(p);
        }
    }

    /// Send what the engine wants sent to each peer, within the in-flight cap.
    fn flush(&mut self) {
        let stand = self.engine.ledger().stand_id().clone();
        let mut sends = Vec::new();
        for (p, c) in self.peers.iter_mut() {
            while c.inflight < MAX_INFLIGHT_PER_PEER {
                let Some(m) = self.engine.poll_transmit_to(c.replica) else {
                    break;
                };
                c.inflight += 1;
                sends.push((*p, m.encode(&stand)));
            }
        }
        for (p, bytes) in sends {
            self.metrics.frames_sent += 1;
            self.swarm.behaviour_mut().sync.send_request(&p, bytes);
        }
    }
}

/// Default anti-entropy interval for the peer.
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = ANTI_ENTROPY_INTERVAL_MS;
