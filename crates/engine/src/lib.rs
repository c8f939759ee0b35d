//! # halftime-engine
//!
//! Every rule of a stand replica in one sans-I/O state machine: when a sale commits or waits
//! while rights are asked for, whom to ask, how much a holder gives, when the pool re-plans
//! allocation and a terminal returns surplus, what is pushed and relayed, when vectors go out,
//! when a peer counts as gone. The terminal daemon, the relay and the simulator are drivers:
//! they move bytes, keep time and write to disk; none of them decides anything the engine does,
//! so the simulator judges exactly what terminals do.
//!
//! The shape is quinn-proto's `Endpoint`: feed it what happened, drain what it wants done.
//!
//! ```text
//! driver                                engine
//!   sell(ticket, order, now)       ──►  commit, or hold and ask holders in parallel
//!   handle_frame(peer, bytes, now) ──►  validate, apply, answer, relay
//!   peer_up / peer_down / heard    ──►  who is reachable
//!   handle_timeout(now)            ──►  deadlines, vectors, allocation, silence
//!   ◄── poll_event()     Persist(local changes) → write durably, then persisted()
//!                        Received(changes), Committed(ticket), Refused(ticket), PeerGone …
//!   ◄── poll_transmit()  (peer, message): nothing leaves before our own changes are durable
//!   ◄── poll_timeout()   when to call handle_timeout next
//! ```
//!
//! ```
//! use halftime_engine::*;
//! use halftime_ledger::*;
//! use std::collections::BTreeMap;
//!
//! let pool_key = ReplicaKey::from_seed([1; 32]);
//! let till_key = ReplicaKey::from_seed([2; 32]);
//! let info = StandInfo {
//!     event: EventId::new("game-1").unwrap(), venue: "North High".into(),
//!     stand: StandId::new("north").unwrap(), policy: Policy::Strict,
//!     allocation: Allocation::Proportional, low_stock_pct: 10,
//! };
//! let soda = Sku::new("soda").unwrap();
//! let (mut pool, genesis) = Ledger::create_stand(pool_key.clone(), info, "pool", 1_000).unwrap();
//! let mut setup = vec![genesis];
//! setup.push(pool.set_catalog(vec![CatalogItem {
//!     sku: soda.clone(), name: "Soda".into(), price_cents: 300, low_stock_at: 0,
//! }], 1_000).unwrap());
//! setup.push(pool.enrol(till_key.public(), "till", Role::Terminal, 1_000).unwrap());
//! setup.push(pool.restock(BTreeMap::from([(soda.clone(), 10)]), "opening", 1_000).unwrap());
//! let mut till = Ledger::join(till_key, StandId::new("north").unwrap(), pool_key.public());
//! till.apply_remote(setup, 1_000);
//!
//! // The till holds no rights yet: the sale waits while it asks the pool.
//! let (mut p, mut t) = (Engine::new(pool, EngineConfig::default(), 1_000),
//!                       Engine::new(till, EngineConfig::default(), 1_000));
//! let (pid, tid) = (p.ledger().me(), t.ledger().me());
//! p.peer_up(tid, 1_000);
//! t.peer_up(pid, 1_000);
//! let order = SaleOrder {
//!     lines: vec![SaleLine { sku: soda.clone(), qty: 1, unit_price_cents: 300 }],
//!     payment: Payment { method: PaymentMethod::Cash, reference: String::new() },
//! };
//! t.sell(Ticket(7), order, 1_001);
//! // Wire the two engines by hand (a driver would use sockets and a disk).
//! let mut committed = false;
//! for _ in 0..4 {
//!     for e in [&mut p, &mut t] {
//!         while let Some(ev) = e.poll_event() {
//!             match ev {
//!                 Event::Persist(_changes) => e.persisted(), // after an fsync
//!                 Event::Committed { ticket: Ticket(7), .. } => committed = true,
//!                 _ => {}
//!             }
//!         }
//!     }
//!     while let Some((_, m)) = t.poll_transmit() { p.handle_message(tid, m, 1_002); }
//!     while let Some((_, m)) = p.poll_transmit() { t.handle_message(pid, m, 1_002); }
//! }
//! assert!(committed);
//! assert_eq!(t.ledger().available(&soda), 9);
//! ```

mod peers;
mod rights;

use halftime_ledger::layout::SkuCounters;
use halftime_ledger::sync::{ANTI_ENTROPY_INTERVAL_MS, SyncEvent};
use halftime_ledger::{
    AdminOp, Applied, ApplyReport, Hlc, Ledger, OpError, PeerSync, Refusal, ReplicaId, Role,
    SaleId, SaleLine, SignedChange, Sku, VersionVector, WireError, WireMessage,
};
use peers::{Peer, Peers};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

pub use rights::{
    ALLOCATION_INTERVAL_MS, ASK_BELOW_TARGET_PCT, ASK_RETRY_MS, MAX_HELD_SALES, PARALLEL_ASKS,
    RETURN_INTERVAL_MS, RIGHTS_CHECK_INTERVAL_MS, SALE_WAIT_MS, TOP_UP_REQUEST_TIMEOUT_MS,
};

/// A peer not heard from for this long (no frame, no ping the driver reports) counts as gone:
/// with transport pings every second, silence this long means a cut link. A silent cut leaves TCP
/// connections open for many seconds; the driver closes the connection when told.
pub const PEER_SILENCE_TIMEOUT_MS: u64 = 3_000;

/// On a full mesh, about this many vector entries go out per sync interval, whatever the
/// number of peers. A vector names up to one entry per replica and goes to every peer, so each
/// peer's interval is stretched by `peers² / VECTOR_ENTRIES_PER_INTERVAL`: not at all up to
/// 16 peers, 40 times at 100. A replica that missed a change still hears vectors from a few
/// holders of it every interval (each naming what rose over the stretched one) and asks; a
/// 100-terminal stand no longer sends N³ entries a second. A hub's peers reach only it, so it
/// keeps the plain interval.
pub const VECTOR_ENTRIES_PER_INTERVAL: usize = 256;

/// The driver's handle on one sale, chosen by the driver and returned in the sale's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// A sale as the cashier rang it up: lines at the prices charged, and the payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleOrder {
    pub lines: Vec<SaleLine>,
    pub payment: halftime_ledger::Payment,
}

/// A bug planted on purpose, so that the simulator's checks are shown to catch it.
/// Never set outside the simulator's planted-bug sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Every sale is made as if the pool were out of reach (optimistic overdraft online).
    IgnoreRights,
    /// Answers every rights request twice, giving up to twice what was asked.
    AnswerTwice,
    /// A bug inside the ledger (planted only with the `planted-bugs` feature).
    #[cfg(feature = "planted-bugs")]
    Ledger(halftime_ledger::LedgerBug),
}

/// How a replica's engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Interval of the periodic version-vector exchange with every peer.
    pub sync_interval_ms: u64,
    /// Longest a sale waits for rights from other replicas before it is refused.
    pub sale_wait_ms: u64,
    /// Whether rights move by themselves: the pool's allocation, terminals' top-ups, surplus
    /// returns and asking holders for a waiting sale. Off only for the simulator's central
    /// baseline, where the pool decides each online sale.
    pub auto_rights: bool,
    /// This replica is the centre of a star (the relay): its peers do not reach one another,
    /// so every change it accepts goes on at once to every other peer it reaches. On a full
    /// mesh this would cost N² frames per sale; there, only changes whose author is out of
    /// reach are passed on.
    pub hub: bool,
    /// This replica is one of several instances of a relay, each reaching some of the stand's
    /// replicas: a rights request no peer here can answer is handed to the others
    /// ([`Event::Elsewhere`], [`Engine::handle_elsewhere`]) instead of refused at once.
    pub elsewhere: bool,
    pub planted_bug: Option<PlantedBug>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            sync_interval_ms: ANTI_ENTROPY_INTERVAL_MS,
            sale_wait_ms: SALE_WAIT_MS,
            auto_rights: true,
            hub: false,
            elsewhere: false,
            planted_bug: None,
        }
    }
}

/// Why a sale was not made, and whom the engine asked for rights before giving up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SaleRefusal {
    #[serde(flatten)]
    pub reason: Refusal,
    /// Replicas asked for rights for this sale (empty: none was reachable and held any).
    pub asked: Vec<ReplicaId>,
    /// How long the sale waited before the refusal.
    pub waited_ms: u64,
}

impl std::fmt::Display for SaleRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)?;
        if !matches!(
            self.reason,
            Refusal::InsufficientRights { .. } | Refusal::LockedLowStock { .. }
        ) {
            return Ok(());
        }
        if self.asked.is_empty() {
            write!(f, "; the replicas in reach do not hold enough to give")
        } else {
            let asked: Vec<String> = self.asked.iter().map(ToString::to_string).collect();
            write!(
                f,
                "; asked {} and none could give within {} ms",
                asked.join(", "),
                self.waited_ms
            )
        }
    }
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// New changes written here. Make them durable, then call [`Engine::persisted`]: until
    /// then no frame leaves and no sale is acknowledged.
    Persist(Vec<SignedChange>),
    /// Received changes the ledger accepted. Store them; they may be made durable lazily
    /// (a group commit): what is lost in a crash is fetched again by the repair.
    Received {
        changes: Vec<SignedChange>,
        /// Author and sequence number of each, in the same order.
        ids: Vec<(ReplicaId, u64)>,
    },
    /// What changes did to the stand (sales, voids, stock moves, marks), already decoded: for
    /// screens and feeds. A local change's comes once it is durable, a received one's at once.
    Changed(Vec<Applied>),
    /// A sale is durable: acknowledge it.
    Committed {
        ticket: Ticket,
        sale_id: SaleId,
        /// From `sell` to the commit (0 unless the sale waited for rights).
        waited_ms: u64,
    },
    /// A sale was not made; nothing of it was written.
    Refused {
        ticket: Ticket,
        refusal: SaleRefusal,
    },
    /// Received changes broke a rule and were rejected (the stand document is unchanged).
    Rejected {
        from: Option<ReplicaId>,
        rejections: Vec<halftime_ledger::Rejection>,
    },
    /// A peer was silent too long and is dropped: close its connection.
    PeerGone(ReplicaId),
    /// An operation the engine made on its own (an allocation give, an answer) failed inside
    /// the ledger: a bug, never a refusal. Nothing of it was written.
    Fault(String),
    /// The pool answered admin request `id` (relay): carried out by its change `Ok(seq)`, or
    /// refused with the reason.
    AdminAnswered {
        from: ReplicaId,
        id: u64,
        outcome: Result<u64, String>,
    },
    /// For the relay's other instances (with [`EngineConfig::elsewhere`]): hand it to each,
    /// whose engine takes it in [`Engine::handle_elsewhere`].
    Elsewhere(Elsewhere),
}

/// A rights request or answer one instance of a relay hands its other instances, for a
/// replica connected to one of them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Elsewhere {
    /// `beneficiary` asked for `want` of `sku` and no replica connected here holds any.
    Ask {
        beneficiary: ReplicaId,
        sku: Sku,
        want: u64,
        urgent: bool,
    },
    /// A holder connected here answered the request made for `beneficiary`; `change` is its
    /// give, when it gave.
    Answer {
        beneficiary: ReplicaId,
        sku: Sku,
        granted: u64,
        change: Option<SignedChange>,
    },
}

/// An admin operation the pool made, or had made before for the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminDone {
    /// The pool's change that carried it out.
    pub pool_seq: u64,
    /// What a reclaim moved, and what it was based on.
    pub reclaim: Option<halftime_ledger::ReclaimView>,
    /// The request had been carried out before; nothing was written now.
    pub again: bool,
}

/// Figures of what the engine did, for metrics and the simulator's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub sales_committed: u64,
    pub sales_refused: u64,
    /// Sales that waited for rights before their outcome.
    pub sales_held: u64,
    pub rights_requests_sent: u64,
    pub rights_requests_answered: u64,
    /// Answers that gave at least one unit (ours to others).
    pub gives_answered: u64,
    /// Gives from the pool's allocation plan or a terminal's surplus return.
    pub gives_planned: u64,
    pub changes_received: u64,
    pub changes_duplicate: u64,
    pub changes_rejected: u64,
    pub changes_relayed: u64,
    pub frames_rejected: u64,
    /// Relay: rights requests passed on to a holder for a replica that reaches it only here.
    pub rights_requests_forwarded: u64,
    /// Rights requests handed to the relay's other instances, no peer here holding any.
    pub rights_asked_elsewhere: u64,
    /// Requests or answers on behalf of another replica that broke the rule of who may send
    /// them (only a relay, never for itself or for us), dropped.
    pub rights_relays_refused: u64,
}

/// The stand engine of one replica.
#[derive(Debug)]
pub struct Engine {
    ledger: Ledger,
    cfg: EngineConfig,
    peers: Peers,
    /// Every peer by when its vector timer is next due, earliest on top, so that a wake-up visits
    /// only the peers due rather than all of them (a large stand wakes each replica many times
    /// a second). A peer filed again leaves its old entry behind, stale (its time is no longer
    /// the peer's `due_ms`); stale entries are dropped when they reach the top.
    due: BinaryHeap<Reverse<(u64, ReplicaId)>>,
    /// When the first peer could fall silent, as of the last look: peers are looked at again
    /// then, not at every frame or ping that moves it later.
    silence_check_ms: u64,
    rights: rights::Rights,
    events: VecDeque<Event>,
    /// Our highest sequence number known durable.
    persisted_seq: u64,
    /// Outcomes released once the change they acknowledge is durable: (its seq, event).
    after_persist: VecDeque<(u64, Event)>,
    stats: EngineStats,
}

impl Engine {
    /// An engine over a ledger restored from durable storage (or freshly joined) at `now_ms`.
    pub fn new(ledger: Ledger, cfg: EngineConfig, now_ms: u64) -> Self {
        #[cfg(feature = "planted-bugs")]
        let ledger = {
            let mut ledger = ledger;
            if let Some(PlantedBug::Ledger(bug)) = cfg.planted_bug {
                ledger.plant_bug(bug);
            }
            ledger
        };
        let mut ledger = ledger;
        ledger.record_applied();
        ledger.take_applied();
        let persisted_seq = ledger.local_seq();
        Self {
            rights: rights::Rights::new(now_ms),
            ledger,
            cfg,
            peers: Peers::default(),
            due: BinaryHeap::new(),
            silence_check_ms: u64::MAX,
            events: VecDeque::new(),
            persisted_seq,
            after_persist: VecDeque::new(),
            stats: EngineStats::default(),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Available stock per item as at time `t`, read from the document.
    pub fn stock_at_time(&mut self, t: Hlc) -> BTreeMap<Sku, i64> {
        self.ledger.stock_at_time(t)
    }

    /// The counters read from the document at its current heads (to check the ledger's
    /// cached state against).
    pub fn counters_in_document(&mut self) -> BTreeMap<Sku, SkuCounters> {
        self.ledger.counters_in_document()
    }

    /// The ledger's snapshot (see `Ledger::snapshot`), for the driver to store.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.ledger.snapshot()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Connected peers, in order.
    pub fn peers(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.peers.keys().copied()
    }

    pub fn is_connected(&self, peer: ReplicaId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Whether this replica reaches the pool right now (the pool itself: whether any replica
    /// reaches it). Decides the offline flag of a sale and the optimistic policy's overdraft.
    pub fn pool_reachable(&self) -> bool {
        pool_reachable(&self.ledger, &self.peers)
    }

    /// Sales waiting for rights.
    pub fn held_sales(&self) -> usize {
        self.rights.held_len()
    }

    /// Frames queued for `peer`.
    pub fn backlog(&self, peer: ReplicaId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.sync.backlog())
    }

    // -----------------------------------------------------------------------------------
    // Connectivity.

    /// A connection to `peer` opened (or reopened): exchange vectors from scratch.
    pub fn peer_up(&mut self, peer: ReplicaId, now_ms: u64) {
        if peer == self.ledger.me() || self.peers.contains_key(&peer) {
            return;
        }
        let sync = PeerSync::new(&self.ledger, now_ms, self.cfg.sync_interval_ms);
        self.add_peer(peer, sync, now_ms);
    }

    /// A retired replica connected to hand over what it wrote (see `Ledger::admission`): its
    /// changes are received and checked like anyone's; it is sent vectors, never a change,
    /// a give or an answer.
    pub fn peer_up_hand_over(&mut self, peer: ReplicaId, now_ms: u64) {
        if peer == self.ledger.me() || self.peers.contains_key(&peer) {
            return;
        }
        let sync = PeerSync::hand_over(&self.ledger, now_ms, self.cfg.sync_interval_ms);
        self.add_peer(peer, sync, now_ms);
    }

    fn add_peer(&mut self, peer: ReplicaId, sync: PeerSync, now_ms: u64) {
        let p = Peer::new(sync, now_ms);
        self.due.push(Reverse((p.due_ms, peer)));
        self.silence_check_ms = self.silence_check_ms.min(self.peers.silent_from(&p));
        self.peers.insert(peer, p);
        self.settle_due();
        self.spread_vectors();
    }

    /// After `peer`'s timers may have moved: file it under its new time.
    fn refile(&mut self, peer: ReplicaId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            let due = p.next_due();
            if due != p.due_ms {
                self.due.push(Reverse((due, peer)));
                p.due_ms = due;
            }
        }
    }

    /// Drop stale entries from the top of `due`, so that the top is the earliest peer.
    fn settle_due(&mut self) {
        while let Some(&Reverse((t, r))) = self.due.peek() {
            if self.peers.get(&r).is_some_and(|p| p.due_ms == t) {
                break;
            }
            self.due.pop();
        }
    }

    /// The last connection to `peer` closed.
    pub fn peer_down(&mut self, peer: ReplicaId, now_ms: u64) {
        if self.peers.remove(&peer).is_some() {
            self.settle_due();
            self.spread_vectors();
            self.rights.peer_down(peer);
            self.progress(now_ms);
        }
    }

    /// The driver heard from `peer` outside a frame (a transport ping).
    pub fn heard(&mut self, peer: ReplicaId, now_ms: u64) {
        self.peers.heard(&peer, now_ms);
    }

    /// The driver's transport heard from every connected peer outside a frame (a keepalive
    /// that covers all of them at once).
    pub fn heard_all(&mut self, now_ms: u64) {
        self.peers.heard_all(now_ms);
    }

    // -----------------------------------------------------------------------------------
    // Input.

    /// Decode and handle one frame from `peer`. Every byte is hostile until checked: a frame
    /// that does not decode is counted and returned as an error for the driver to log.
    pub fn handle_frame(
        &mut self,
        peer: ReplicaId,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), WireError> {
        match self.handle_frames([(peer, bytes)], now_ms).pop() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Decode and handle frames that arrived together: the changes of all that decode are
    /// applied as one batch. Each frame that does not decode is counted and returned with its
    /// sender, for the driver to log.
    pub fn handle_frames<B: AsRef<[u8]>>(
        &mut self,
        frames: impl IntoIterator<Item = (ReplicaId, B)>,
        now_ms: u64,
    ) -> Vec<(ReplicaId, WireError)> {
        let mut msgs = Vec::new();
        let mut bad = Vec::new();
        for (peer, bytes) in frames {
            match WireMessage::decode(bytes.as_ref(), self.ledger.stand_id()) {
                Ok(m) => msgs.push((peer, m)),
                Err(e) => {
                    self.stats.frames_rejected += 1;
                    bad.push((peer, e));
                }
            }
        }
        if !msgs.is_empty() {
            self.handle_messages(msgs, now_ms);
        }
        bad
    }

    /// Handle one decoded message from `peer`.
    pub fn handle_message(&mut self, peer: ReplicaId, msg: WireMessage, now_ms: u64) {
        self.handle_messages(vec![(peer, msg)], now_ms);
    }

    /// Handle several decoded messages that arrived together: the changes of all of them are
    /// applied in one batch (much cheaper than one by one), then the rest in order.
    pub fn handle_messages(&mut self, msgs: Vec<(ReplicaId, WireMessage)>, now_ms: u64) {
        let mut batch = Vec::new();
        let mut senders = BTreeSet::new();
        let mut others = Vec::new();
        let mut heard = BTreeSet::new();
        for (from, msg) in msgs {
            if !self.peers.heard(&from, now_ms) {
                continue; // not connected (a frame that raced the close)
            }
            heard.insert(from);
            match msg {
                WireMessage::Changes { changes } => {
                    batch.extend(changes);
                    senders.insert(from);
                }
                other => others.push((from, other)),
            }
        }
        if !batch.is_empty() {
            let from = if senders.len() == 1 {
                senders.first().copied()
            } else {
                None
            };
            let report = self.ledger.apply_remote(batch, now_ms);
            let pending = report.pending > 0;
            self.after_apply(report, from);
            for s in senders {
                if let Some(p) = self.peers.get_mut(&s) {
                    p.sync.after_apply(&self.ledger, pending, now_ms);
                }
            }
        }
        for (from, msg) in others {
            let Some(p) = self.peers.get_mut(&from) else {
                continue;
            };
            for ev in p.sync.handle(&mut self.ledger, msg, now_ms) {
                match ev {
                    SyncEvent::Applied(report) => self.after_apply(report, Some(from)),
                    SyncEvent::RightsRequested { sku, want, urgent } => {
                        let (rights, mut ctx) = self.split();
                        rights.requested(&mut ctx, from, sku, want, urgent, now_ms);
                    }
                    SyncEvent::RightsRequestedFor {
                        beneficiary,
                        sku,
                        want,
                        urgent,
                    } => {
                        let (rights, mut ctx) = self.split();
                        rights.requested_for(
                            &mut ctx,
                            from,
                            beneficiary,
                            sku,
                            want,
                            urgent,
                            now_ms,
                        );
                    }
                    SyncEvent::RightsAnsweredFor {
                        beneficiary,
                        sku,
                        granted,
                        change,
                    } => {
                        let (_, mut ctx) = self.split();
                        rights::Rights::pass_answer(
                            &mut ctx,
                            from,
                            beneficiary,
                            sku,
                            granted,
                            change,
                        );
                    }
                    SyncEvent::RightsAnswered { sku, granted } => {
                        self.rights.answered(from, &sku, granted)
                    }
                    SyncEvent::AdminRequested { id, op } => {
                        let outcome = self.admin_requested(from, id, op, now_ms);
                        if let Some(p) = self.peers.get_mut(&from) {
                            p.sync.send_admin(WireMessage::AdminAnswer { id, outcome });
                        }
                    }
                    SyncEvent::AdminAnswered { id, outcome } => {
                        self.events
                            .push_back(Event::AdminAnswered { from, id, outcome });
                    }
                }
            }
        }
        for peer in heard {
            self.refile(peer);
        }
        self.settle_due();
        self.progress(now_ms);
    }

    /// A rights request or answer another instance of this relay handed on
    /// ([`Event::Elsewhere`]).
    pub fn handle_elsewhere(&mut self, msg: Elsewhere, now_ms: u64) {
        let (_, mut ctx) = self.split();
        rights::Rights::elsewhere(&mut ctx, msg);
        self.progress(now_ms);
    }

    /// Changes that reached this replica's store by another way than a peer (another instance
    /// of a relay wrote them): checked and applied like any received change, and passed on as
    /// if their author were out of reach.
    pub fn handle_stored(&mut self, changes: Vec<SignedChange>, now_ms: u64) {
        if changes.is_empty() {
            return;
        }
        let report = self.ledger.apply_remote(changes, now_ms);
        self.after_apply(report, None);
        self.progress(now_ms);
    }

    /// Sell: commits at once when this replica may, otherwise waits (at most
    /// [`EngineConfig::sale_wait_ms`]) while it asks the best holders in parallel. The outcome
    /// comes back as [`Event::Committed`] or [`Event::Refused`] with `ticket`.
    pub fn sell(&mut self, ticket: Ticket, order: SaleOrder, now_ms: u64) {
        let (rights, mut ctx) = self.split();
        rights.sell(&mut ctx, ticket, order, now_ms);
        self.progress(now_ms);
    }

    /// A local operation other than a sale (void, restock, adjust, give, enrol, retire,
    /// catalog): `op` makes the change on the ledger; the engine has it persisted and pushed.
    pub fn local_op<T>(
        &mut self,
        now_ms: u64,
        op: impl FnOnce(&mut Ledger, u64) -> Result<(SignedChange, T), OpError>,
    ) -> Result<T, OpError> {
        let (change, out) = op(&mut self.ledger, now_ms)?;
        self.split().1.record_local(change, None);
        self.progress(now_ms);
        Ok(out)
    }

    /// Pool: make an admin operation, once per `request` (the relay's id for it, carried in the
    /// change): a request carried out before answers with that change and writes nothing.
    pub fn admin(
        &mut self,
        op: AdminOp,
        request: Option<u64>,
        now_ms: u64,
    ) -> Result<AdminDone, OpError> {
        if let Some(seq) = request.and_then(|id| self.ledger.request_done(id)) {
            return Ok(AdminDone {
                pool_seq: seq,
                reclaim: None,
                again: true,
            });
        }
        let plain = |c: SignedChange| Ok((c, None));
        let reclaim = match op {
            AdminOp::Restock { units, note } => self.local_op(now_ms, |l, now| {
                l.with_request(request, |l| plain(l.restock(units, &note, now)?))
            }),
            AdminOp::Adjust { units, reason } => self.local_op(now_ms, |l, now| {
                l.with_request(request, |l| plain(l.adjust(units, &reason, now)?))
            }),
            AdminOp::Mark { sku, available } => self.local_op(now_ms, |l, now| {
                l.with_request(request, |l| plain(l.mark(&sku, available, now)?))
            }),
            AdminOp::Catalog { items } => self.local_op(now_ms, |l, now| {
                l.with_request(request, |l| plain(l.set_catalog(items, now)?))
            }),
            AdminOp::Enrol { key, name, role } => self.local_op(now_ms, |l, now| {
                l.with_request(request, |l| plain(l.enrol(key, &name, role, now)?))
            }),
            AdminOp::Retire { replica } => self.local_op(now_ms, |l, now| {
                l.with_request(request, |l| plain(l.retire(replica, now)?))
            }),
            AdminOp::Reclaim { replica } => {
                let known: Vec<VersionVector> = self
                    .peers
                    .values()
                    .map(|p| p.sync.their_vector().clone())
                    .collect();
                self.local_op(now_ms, |l, now| {
                    l.with_request(request, |l| {
                        let (c, view) = l.reclaim_checked(replica, &known, now)?;
                        Ok((c, Some(view)))
                    })
                })
            }
        }?;
        Ok(AdminDone {
            pool_seq: self.ledger.local_seq(),
            reclaim,
            again: false,
        })
    }

    /// The rule of who may ask the pool for admin operations over the wire: an enrolled,
    /// unretired relay, and only of the pool.
    fn admin_requested(
        &mut self,
        from: ReplicaId,
        id: u64,
        op: AdminOp,
        now_ms: u64,
    ) -> Result<u64, String> {
        if self.ledger.role() != Some(Role::Pool) {
            return Err("this replica is not the stand's pool".into());
        }
        match self.ledger.replicas().get(&from) {
            Some(i) if i.role == Role::Relay && i.retired_at_pool_seq.is_none() => {}
            _ => return Err(format!("{from} is not an enrolled relay of this stand")),
        }
        self.admin(op, Some(id), now_ms)
            .map(|d| d.pool_seq)
            .map_err(|e| e.to_string())
    }

    /// Relay: ask the pool, connected as `pool`, for admin operation `id`; the answer comes
    /// as [`Event::AdminAnswered`]. Ask again if none comes: the pool makes it once.
    pub fn request_admin(&mut self, pool: ReplicaId, id: u64, op: AdminOp) -> bool {
        match self.peers.get_mut(&pool) {
            Some(p) if pool == self.ledger.pool() => {
                p.sync.send_admin(WireMessage::AdminRequest { id, op });
                true
            }
            _ => false,
        }
    }

    /// Pool: retire a lost replica and take its rights back, refused while any reachable
    /// replica holds more of that replica's changes than the pool does.
    pub fn reclaim(
        &mut self,
        replica: ReplicaId,
        now_ms: u64,
    ) -> Result<halftime_ledger::ReclaimView, OpError> {
        let known: Vec<VersionVector> = self
            .peers
            .values()
            .map(|p| p.sync.their_vector().clone())
            .collect();
        self.local_op(now_ms, |l, now| l.reclaim_checked(replica, &known, now))
    }

    /// Every change of every [`Event::Persist`] drained so far is durable.
    pub fn persisted(&mut self) {
        self.persisted_through(self.ledger.local_seq());
    }

    /// This replica's own changes up to `seq` are durable (a driver that writes while the
    /// engine goes on making more).
    pub fn persisted_through(&mut self, seq: u64) {
        self.persisted_seq = self.persisted_seq.max(seq.min(self.ledger.local_seq()));
        while self
            .after_persist
            .front()
            .is_some_and(|(seq, _)| *seq <= self.persisted_seq)
        {
            if let Some((_, ev)) = self.after_persist.pop_front() {
                self.events.push_back(ev);
            }
        }
    }

    /// Timers: sale deadlines, vectors, allocation, surplus returns, silent peers.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if now_ms >= self.silence_check_ms {
            let silent: Vec<ReplicaId> = (self.peers.iter())
                .filter(|(_, p)| self.peers.silent_from(p) <= now_ms)
                .map(|(r, _)| *r)
                .collect();
            for r in silent {
                self.peer_down(r, now_ms);
                self.events.push_back(Event::PeerGone(r));
            }
            self.silence_check_ms =
                (self.peers.values().map(|p| self.peers.silent_from(p)).min()).unwrap_or(u64::MAX);
        }
        let mut due = Vec::new();
        while let Some(&Reverse((t, r))) = self.due.peek() {
            if t > now_ms {
                break;
            }
            self.due.pop();
            if self.peers.get(&r).is_some_and(|p| p.due_ms == t) {
                due.push(r);
            }
        }
        // A peer filed twice under one time is due once.
        due.sort_unstable();
        due.dedup();
        for r in due {
            if let Some(p) = self.peers.get_mut(&r) {
                p.sync.handle_timeout(&self.ledger, now_ms);
                p.due_ms = p.next_due();
                self.due.push(Reverse((p.due_ms, r)));
            }
        }
        self.settle_due();
        let (rights, mut ctx) = self.split();
        rights.handle_timeout(&mut ctx, now_ms);
    }

    // -----------------------------------------------------------------------------------
    // Output.

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next frame to send, to any peer. None while a change of ours is not yet durable:
    /// a change sent and then lost in a crash would have its sequence number reused.
    pub fn poll_transmit(&mut self) -> Option<(ReplicaId, WireMessage)> {
        if !self.durable() {
            return None;
        }
        self.peers.poll_transmit()
    }

    /// Every frame ready to send, in the order [`Engine::poll_transmit`] would give them.
    pub fn drain_transmit(&mut self) -> Vec<(ReplicaId, WireMessage)> {
        let mut out = Vec::new();
        if !self.durable() {
            return out;
        }
        self.peers.drain_transmit(&mut out);
        out
    }

    /// The next frame for `peer` (for drivers that cap what is in flight per peer).
    pub fn poll_transmit_to(&mut self, peer: ReplicaId) -> Option<WireMessage> {
        if !self.durable() {
            return None;
        }
        self.peers.get_mut(&peer)?.sync.poll_transmit()
    }

    /// When to call [`Engine::handle_timeout`] next (milliseconds on the driver's clock).
    pub fn poll_timeout(&self) -> u64 {
        debug_assert!(
            (self.peers.values()).all(|p| p.due_ms == p.next_due())
                && self.due.peek().map(|Reverse((t, _))| *t)
                    == self.peers.values().map(|p| p.due_ms).min()
                && (self.peers.values())
                    .all(|p| self.peers.silent_from(p) >= self.silence_check_ms)
                && self.peers.queued_complete(),
            "every peer filed under when it is due"
        );
        let t = self.rights.poll_timeout(&self.ledger, &self.cfg);
        let t = t.min(self.silence_check_ms);
        self.due.peek().map_or(t, |Reverse((due, _))| t.min(*due))
    }

    /// Stretch every peer's vector interval so that about [`VECTOR_ENTRIES_PER_INTERVAL`]
    /// entries go out per sync interval.
    fn spread_vectors(&mut self) {
        let stretch = if self.cfg.hub {
            1
        } else {
            let n = self.peers.len();
            n.saturating_mul(n)
                .div_ceil(VECTOR_ENTRIES_PER_INTERVAL)
                .max(1) as u64
        };
        let ms = self.cfg.sync_interval_ms.saturating_mul(stretch);
        // Seeded by both ends: every replica's vectors to one peer must not keep in step.
        let me = u64::from_be_bytes(self.ledger.me().bytes());
        for (r, p) in self.peers.iter_mut() {
            let stagger = (stretch > 1).then(|| me ^ u64::from_be_bytes(r.bytes()).rotate_left(32));
            p.sync.set_interval(ms, stagger);
        }
    }

    fn durable(&self) -> bool {
        self.persisted_seq >= self.ledger.local_seq()
    }

    // -----------------------------------------------------------------------------------
    // Internals.

    /// The rights logic and everything it may touch, borrowed apart.
    fn split(&mut self) -> (&mut rights::Rights, Ctx<'_>) {
        (
            &mut self.rights,
            Ctx {
                ledger: &mut self.ledger,
                cfg: &self.cfg,
                peers: &mut self.peers,
                events: &mut self.events,
                after_persist: &mut self.after_persist,
                stats: &mut self.stats,
            },
        )
    }

    /// Received changes were applied: report them, relay what their authors could not have
    /// pushed themselves.
    fn after_apply(&mut self, report: ApplyReport, from: Option<ReplicaId>) {
        self.stats.changes_received += report.accepted.len() as u64;
        self.stats.changes_duplicate += report.duplicates as u64;
        self.stats.changes_rejected += report.rejected.len() as u64;
        if !report.rejected.is_empty() {
            self.events.push_back(Event::Rejected {
                from,
                rejections: report.rejected,
            });
        }
        if report.accepted.is_empty() {
            return;
        }
        // On a full stand mesh every replica pushes its own changes to everyone; relaying
        // them again would cost N² frames per sale. A change whose author is not connected to
        // us (a partial partition, a lost device, a repair) goes on to every other peer, and a
        // hub passes on every change.
        let me = self.ledger.me();
        for ((rid, seq), c) in report.accepted_ids.iter().zip(&report.accepted) {
            // A replica that only hands over pushes to nobody else: its changes go on.
            let pushes_itself = self.peers.get(rid).is_some_and(|p| !p.sync.is_hand_over());
            if *rid == me || (!self.cfg.hub && pushes_itself) {
                continue;
            }
            self.stats.changes_relayed += 1;
            for (p, peer) in self.peers.iter_mut() {
                if Some(*p) != from && p != rid {
                    peer.sync.push(*rid, *seq, c);
                }
            }
        }
        self.events.push_back(Event::Received {
            changes: report.accepted,
            ids: report.accepted_ids,
        });
        let applied = self.ledger.take_applied();
        if !applied.is_empty() {
            self.events.push_back(Event::Changed(applied));
        }
    }

    /// After any input: held sales that can now commit, or must give up, do.
    fn progress(&mut self, now_ms: u64) {
        let (rights, mut ctx) = self.split();
        rights.progress(&mut ctx, now_ms);
    }
}

/// What the rights logic may touch: everything but itself.
struct Ctx<'a> {
    ledger: &'a mut Ledger,
    cfg: &'a EngineConfig,
    peers: &'a mut Peers,
    events: &'a mut VecDeque<Event>,
    after_persist: &'a mut VecDeque<(u64, Event)>,
    stats: &'a mut EngineStats,
}

impl Ctx<'_> {
    fn pool_reachable(&self) -> bool {
        pool_reachable(self.ledger, self.peers)
    }

    /// A change made here: to disk first, then to every peer but `except` (held back by
    /// `poll_transmit` until durable).
    fn record_local(&mut self, change: SignedChange, except: Option<ReplicaId>) {
        let me = self.ledger.me();
        let seq = self.ledger.local_seq();
        for (p, peer) in self.peers.iter_mut() {
            if Some(*p) != except {
                peer.sync.push(me, seq, &change);
            }
        }
        match self.events.back_mut() {
            Some(Event::Persist(v)) => v.push(change),
            _ => self.events.push_back(Event::Persist(vec![change])),
        }
        let applied = self.ledger.take_applied();
        if !applied.is_empty() {
            self.after_persist.push_back((seq, Event::Changed(applied)));
        }
    }
}

/// Whether this replica reaches the pool (the pool itself: whether any replica reaches it).
fn pool_reachable(ledger: &Ledger, peers: &Peers) -> bool {
    if ledger.role() == Some(Role::Pool) {
        !peers.is_empty()
    } else {
        peers.contains_key(&ledger.pool())
    }
}

#[cfg(test)]
mod tests;
