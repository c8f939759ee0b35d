//! The simulated stand: the pool and the terminals as real stand [`Engine`]s over real
//! [`Ledger`]s, the virtual network, the customers and the faults. The world only moves bytes,
//! keeps the clocks and plays the customers and the admin: every rule of the stand (when a sale
//! waits, whom to ask, allocation, relays, vectors) is the engine's, exactly as on a terminal.
//! One [`World::step`] advances the virtual clock to the next event and handles everything
//! due, then checks the invariants of every replica whose state changed.
//!
//! Here: the world, its main loop and what it does with each engine's events. `links.rs`: the
//! network side; `customers.rs`: arrivals and the oracle of units served; `faults.rs`: outages,
//! crashes and the admin; `checks.rs`: the invariants; `summary.rs`: samples and the report.

use crate::config::{Broken, SimConfig};
use crate::net::{LAN, Network, TICK_MS, WAN};
use crate::report::{Failure, Latencies, Report, SkuReport, StockSample};
use crate::scenario::{self, Fault};
use halftime_engine::{Engine, EngineConfig, EngineStats, Event, PlantedBug, SaleOrder, Ticket};
use halftime_ledger::state::Field;
use halftime_ledger::{
    CatalogItem, EventId, Ledger, LedgerBug, OpError, Policy, RecordMemo, Refusal, ReplicaId,
    ReplicaKey, Role, SaleId, SaleLine, Shared, SignatureMemo, SignedChange, Sku, StandId,
    StandInfo, WireMessage,
};
use halftime_ledger::{Payment, PaymentMethod, plan_allocation};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// The simulated transport's keepalive on every live link (libp2p's ping on a terminal): it
/// tells both engines the peer is alive without a frame.
pub const TRANSPORT_PING_MS: u64 = 1_000;
/// Stands with more terminals than this check a changed replica's invariants at most every
/// `LARGE_STAND_CHECK_MS × (terminals / LARGE_STAND_TERMINALS)²` of virtual time, capped at
/// `LARGE_STAND_CHECK_MAX_MS` (see `World::check_safety`); every replica is checked at the
/// end of the game.
pub const LARGE_STAND_TERMINALS: usize = 16;
/// How often a replica of a stand of `LARGE_STAND_TERMINALS` terminals is checked while its
/// state keeps changing. A check of one replica reads every replica's counters, so checking
/// N replicas costs N² reads; the spacing grows as N², which keeps the checks' cost per
/// virtual second the same whatever the stand's size, up to the cap.
pub const LARGE_STAND_CHECK_MS: u64 = 100;
/// The longest spacing of a replica's checks, however large the stand.
pub const LARGE_STAND_CHECK_MAX_MS: u64 = 4_000;
/// On a stand of more than `LARGE_STAND_TERMINALS` terminals, the sampled check of a
/// replica's document against its cached state rotates over the pool and this many terminals
/// (the first ones), whose documents are then kept up to date; every other replica's is
/// compared at the end. A replica's document is built only when it is read, so checking a
/// hundred in turn would build a hundred.
pub const LARGE_STAND_DOC_CHECKED: usize = 3;
/// After the final heal every live replica must hold the same changes within this bound.
pub const CONVERGENCE_BOUND_MS: u64 = 120_000;
/// Stock is sampled for the plots this many times per game.
pub const SAMPLES_PER_GAME: u64 = 240;
/// Price of every item (the simulator does not model prices).
pub const PRICE_CENTS: u64 = 400;
/// Most steps printed before the failing step by `replay`.
pub const TRACE_STEPS_BEFORE: u64 = 3;
/// Wall-clock time at the start of the game (2025-09-06 19:00 UTC): what the pool's clock reads
/// at virtual time 0. Each terminal's clock reads this plus the virtual time plus its skew.
pub const GAME_START_WALL_MS: u64 = 1_757_185_200_000;
/// Largest clock skew the simulator accepts (one day).
pub const MAX_CLOCK_SKEW_MS: u64 = 24 * 60 * 60 * 1000;
/// ChaCha stream of the clock skews (stream 0 is everything else), so that turning skew on or
/// off leaves customers, faults and the network unchanged.
const SKEW_STREAM: u64 = 1;

mod checks;
mod customers;
mod faults;
mod links;
mod rogue;
mod summary;

use summary::add_stats;

/// A replica of the stand and what the simulator knows about it.
#[derive(Debug)]
struct Node {
    key: ReplicaKey,
    id: ReplicaId,
    engine: Engine,
    /// Offset of this device's wall clock from true time (0 for the pool).
    skew_ms: i64,
    alive: bool,
    dead: bool,
    crashed: bool,
    /// Written at the crash: everything the replica had acknowledged (committed or accepted).
    durable: Vec<SignedChange>,
    /// Customer stream of this terminal (its own RNG, so policies see the same customers).
    customers: ChaCha8Rng,
    next_arrival: u64,
    /// Sales of `ledger.sales()` already folded into `max_cap` and `sold`.
    overdraft_scanned: usize,
    /// Per (seller, sku): the largest offline cap any of the seller's sales was allowed, over
    /// the sales this replica knows. A seller's rights never go below the cap in force.
    max_cap: BTreeMap<(ReplicaId, Sku), u64>,
    /// Per sku: Σ over sellers of `max_cap`.
    cap_sum: BTreeMap<Sku, u64>,
    /// Units per sku of the sales this replica knows.
    sold: BTreeMap<Sku, u64>,
    /// Shrink adjustments (a prefix of `World::adjusts`) this replica is known to hold.
    adjusts_known: usize,
    /// Virtual time of the engine's next timer as of its last drain (0: ask it). Only a
    /// transport ping touches an engine without a drain, and it only moves timers later, so
    /// this is never later than the engine's own.
    wake: u64,
    /// Virtual time before which a replica of a large stand is not checked again.
    next_check: u64,
}

impl Node {
    fn new(key: ReplicaKey, engine: Engine, customers: ChaCha8Rng, skew_ms: i64) -> Self {
        Node {
            id: key.replica_id(),
            key,
            engine,
            skew_ms,
            alive: true,
            dead: false,
            crashed: false,
            durable: Vec::new(),
            customers,
            next_arrival: u64::MAX,
            overdraft_scanned: 0,
            max_cap: BTreeMap::new(),
            cap_sum: BTreeMap::new(),
            sold: BTreeMap::new(),
            adjusts_known: 0,
            wake: 0,
            next_check: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    customers: u64,
    sales: u64,
    units_sold: u64,
    refused: u64,
    lost_sales: u64,
    /// Gives the central baseline's pool made to decide online sales.
    baseline_gives: u64,
    decode_errors: u64,
    rejected_changes: u64,
    crashes: u64,
    restarts: u64,
    deaths: u64,
    restocked_units: u64,
    reclaimed_units: u64,
    shrunk_units: u64,
    replacements: u64,
    replacement_sales: u64,
    voids: u64,
    /// Changes of the rogue terminal that honest replicas rejected.
    rogue_rejections: u64,
    /// Figures of engines replaced by a restart.
    engines_before_restart: EngineStats,
}

/// A violated invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

fn violation(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// The whole simulated stand.
#[derive(Debug)]
pub struct World {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    /// Draws the clock skew of every terminal, replacements included.
    skew_rng: ChaCha8Rng,
    /// Terminals the stand opened with (replacements come after them).
    base_terminals: usize,
    nodes: Vec<Node>,
    /// Node index of every replica id.
    by_replica: BTreeMap<ReplicaId, usize>,
    engine_cfg: EngineConfig,
    up: BTreeSet<(usize, usize)>,
    net: Network,
    stand_id: StandId,
    skus: Vec<Sku>,
    /// The items in text order, each with its place in `skus`.
    sku_order: Vec<(Sku, usize)>,
    zipf_cdf: Vec<f64>,
    expected_demand: BTreeMap<Sku, f64>,
    opening: BTreeMap<Sku, u64>,
    restocked: BTreeMap<Sku, u64>,
    /// Ground truth per sku: units that exist minus every unit sold anywhere.
    truth: BTreeMap<Sku, i64>,
    lost_units: BTreeMap<Sku, u64>,
    sold_units: BTreeMap<Sku, u64>,
    /// Per sku: units the admin took back from lost terminals (the deliberate trade).
    reclaim_allowance: BTreeMap<Sku, u64>,
    /// Per sku: units written off by shrink adjustments.
    shrunk: BTreeMap<Sku, u64>,
    /// Every shrink adjustment: the pool's sequence number of the change and its units.
    adjusts: Vec<(u64, BTreeMap<Sku, u64>)>,
    wan_up: bool,
    lan_up: bool,
    wifi_up: Vec<bool>,
    /// Links cut by a partial partition: (lower node, higher node).
    cut: BTreeSet<(usize, usize)>,
    faults: Vec<(u64, Fault)>,
    next_fault: usize,
    now: u64,
    step: u64,
    game_ms: u64,
    healed_at: Option<u64>,
    converged_at: Option<u64>,
    next_ping: u64,
    next_sample: u64,
    sample_every: u64,
    /// Committed sales not yet seen at the pool: per replica, seq → commit time.
    in_transit: BTreeMap<ReplicaId, BTreeMap<u64, u64>>,
    /// Customers whose sale the engine has not decided yet: terminal, item, units.
    tickets: BTreeMap<Ticket, (usize, Sku, u64)>,
    next_ticket: u64,
    /// The oracle: units each replica served (sales, and the pool's shrink), counted from the
    /// customers and the admin as the world saw them, never from a ledger.
    /// Keyed by item first: the checks read one item's map for every replica of a view.
    served: BTreeMap<Sku, BTreeMap<ReplicaId, u64>>,
    /// The oracle of refunds: units each terminal took back with a void.
    returned: BTreeMap<Sku, BTreeMap<ReplicaId, u64>>,
    /// The oracle of asks: per sku and (holder, asker), the units asked in every rights
    /// request the network delivered. A terminal gives another terminal rights only when asked.
    asked: BTreeMap<Sku, BTreeMap<(ReplicaId, ReplicaId), u64>>,
    /// Refunds to come: virtual time → (terminal, sale, item, units).
    voids: BTreeMap<u64, Vec<(usize, SaleId, Sku, u64)>>,
    /// Voids made: sale, terminal, item, units.
    acked_voids: Vec<(SaleId, usize, Sku, u64)>,
    rogue: Option<rogue::Rogue>,
    /// Good signatures, shared by every replica of this stand: each distinct signed change is
    /// verified once, not once per replica (the same bytes and signature give the same answer).
    memo: SignatureMemo,
    records: RecordMemo,
    /// The signed bytes of the changes the honest replicas hold, kept once for all of them.
    bytes: Shared,
    /// The first sign of a bug that no invariant of the stand would show: a change of an
    /// honest replica rejected, or an operation of a replica's own failing inside its ledger.
    bug_seen: Option<(&'static str, String)>,
    /// Round-robin over replicas for comparing cached state with a read of the document.
    next_doc_check: usize,
    /// How long each customer whose sale waited for rights waited (committed or refused).
    waits: Vec<u64>,
    /// When each customer refused while the stand had stock was refused.
    lost_at: Vec<u64>,
    acked: Vec<(SaleId, usize)>,
    latencies: Vec<u64>,
    counters: Counters,
    dirty: BTreeSet<usize>,
    /// The earliest `next_check` of a dirty node: before it, a large stand's check has nothing
    /// due and returns without walking the dirty set.
    checks_due: u64,
    /// Nodes whose engines were handed something since the last flush: only they can have
    /// frames to send.
    outgoing: BTreeSet<usize>,
    samples: Vec<StockSample>,
    trace_from: Option<u64>,
    trace: Vec<String>,
}

fn key_for(node: usize) -> ReplicaKey {
    let mut seed = [0u8; 32];
    seed[0] = 0x4a;
    seed[1..9].copy_from_slice(&(node as u64).to_le_bytes());
    ReplicaKey::from_seed(seed)
}

fn exp_sample(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    let u: f64 = rng.random();
    -(1.0 - u).ln() * mean
}

/// A terminal's clock offset: uniform within ± `max_ms`.
fn draw_skew(rng: &mut ChaCha8Rng, max_ms: u64) -> i64 {
    let max = max_ms.min(MAX_CLOCK_SKEW_MS) as i64;
    if max == 0 {
        0
    } else {
        rng.random_range(-max..=max)
    }
}

impl World {
    /// Build the stand: the pool creates it, enrols the terminals, records the opening stock and
    /// (unless running the central baseline) spreads rights; every terminal starts with all of it.
    pub fn new(cfg: &SimConfig) -> Result<Self, Violation> {
        let cfg = cfg.clone();
        let terminals = cfg.terminals.clamp(1, crate::config::MAX_TERMINALS);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let game_ms = cfg.game_ms().max(60_000);
        let setup_err = |e: &dyn std::fmt::Display| violation("setup", e.to_string());
        let stand_id = StandId::new("north").map_err(|e| setup_err(&e))?;
        let info = StandInfo {
            event: EventId::new("game").map_err(|e| setup_err(&e))?,
            venue: "North High".into(),
            stand: stand_id.clone(),
            policy: cfg.ledger_policy(),
            allocation: cfg.allocation.allocation(),
            low_stock_pct: 10,
        };
        // Zipf popularity (s = 1.1) and stock sized to run low near the end of the game.
        let nskus = cfg.skus.clamp(1, 64);
        let weights: Vec<f64> = (1..=nskus).map(|i| 1.0 / (i as f64).powf(1.1)).collect();
        let wsum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let zipf_cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / wsum;
                acc
            })
            .collect();
        let skus: Vec<Sku> = (0..nskus)
            .map(|i| Sku::new(format!("item-{i}")).map_err(|e| setup_err(&e)))
            .collect::<Result<_, _>>()?;
        let customers = scenario::expected_customers_per_terminal(cfg.scenario, game_ms / 60_000)
            * terminals as f64;
        let expected_demand: BTreeMap<Sku, f64> = skus
            .iter()
            .zip(&weights)
            .map(|(s, w)| (s.clone(), customers * 2.0 * w / wsum))
            .collect();
        let opening: BTreeMap<Sku, u64> = expected_demand
            .iter()
            .map(|(s, d)| (s.clone(), (d * 0.85).ceil() as u64 + 1))
            .collect();
        let engine_cfg = EngineConfig {
            auto_rights: !cfg.baseline,
            planted_bug: cfg.broken.map(|b| match b {
                Broken::IgnoreRights => PlantedBug::IgnoreRights,
                Broken::AnswerTwice => PlantedBug::AnswerTwice,
                Broken::DropCarryForward => PlantedBug::Ledger(LedgerBug::DropCarryForward),
                Broken::SkipFloorOnReceive => PlantedBug::Ledger(LedgerBug::SkipFloorOnReceive),
                Broken::DoubleCountVoid => PlantedBug::Ledger(LedgerBug::DoubleCountVoid),
            }),
            ..EngineConfig::default()
        };

        // Every terminal's clock is off by a fixed amount; the pool keeps true time.
        let mut skew_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        skew_rng.set_stream(SKEW_STREAM);
        let skews: Vec<i64> = (0..=terminals)
            .map(|i| {
                if i == 0 {
                    0
                } else {
                    draw_skew(&mut skew_rng, cfg.clock_skew_ms)
                }
            })
            .collect();
        let t0 = GAME_START_WALL_MS;
        let (mut pool, genesis) =
            Ledger::create_stand(key_for(0), info, "pool", t0).map_err(|e| setup_err(&e))?;
        let mut setup = vec![genesis];
        let items = skus
            .iter()
            .map(|s| CatalogItem {
                sku: s.clone(),
                name: s.to_string(),
                price_cents: PRICE_CENTS,
                low_stock_at: opening.get(s).copied().unwrap_or(0) / 10,
            })
            .collect();
        setup.push(pool.set_catalog(items, t0).map_err(|e| setup_err(&e))?);
        for i in 1..=terminals {
            setup.push(
                pool.enrol(
                    key_for(i).public(),
                    &format!("till {i}"),
                    Role::Terminal,
                    t0,
                )
                .map_err(|e| setup_err(&e))?,
            );
        }
        setup.push(
            pool.restock(opening.clone(), "opening", t0)
                .map_err(|e| setup_err(&e))?,
        );
        if !cfg.baseline {
            let plans = plan_allocation(&pool, cfg.allocation.allocation(), t0);
            for r in pool.execute_plans(&plans, t0) {
                setup.push(r.map_err(|e| setup_err(&e))?);
            }
        }
        // Enrolled after the opening allocation, so it starts with no rights at all.
        let rogue_key = key_for(usize::MAX);
        if cfg.has_rogue() {
            setup.push(
                pool.enrol(rogue_key.public(), "till 99", Role::Terminal, t0)
                    .map_err(|e| setup_err(&e))?,
            );
        }
        let pool_key = key_for(0).public();
        let memo = SignatureMemo::default();
        pool.share_signature_memo(memo.clone());
        let records = RecordMemo::default();
        pool.share_sale_records(records.clone());
        pool.defer_document();
        let bytes = Shared::default();
        let mut nodes = Vec::with_capacity(terminals + 1);
        nodes.push(Node::new(
            key_for(0),
            Engine::new(pool, engine_cfg.clone(), t0),
            ChaCha8Rng::seed_from_u64(rng.random()),
            0,
        ));
        for (i, skew) in skews.iter().enumerate().skip(1) {
            let wall = t0.saturating_add_signed(*skew);
            let mut l = Ledger::join(key_for(i), stand_id.clone(), pool_key);
            l.share_signature_memo(memo.clone());
            l.share_sale_records(records.clone());
            l.share_change_bytes(bytes.clone());
            l.defer_document();
            let r = l.apply_remote(setup.clone(), wall);
            if !r.rejected.is_empty() {
                return Err(violation(
                    "setup",
                    format!("terminal {i} rejected setup: {:?}", r.rejected),
                ));
            }
            nodes.push(Node::new(
                key_for(i),
                Engine::new(l, engine_cfg.clone(), wall),
                ChaCha8Rng::seed_from_u64(rng.random()),
                *skew,
            ));
        }
        let rogue = if cfg.has_rogue() {
            let mut ledger = Ledger::join(rogue_key.clone(), stand_id.clone(), pool_key);
            ledger.apply_remote(setup.clone(), t0);
            Some(rogue::Rogue {
                key: rogue_key,
                ledger,
                at: game_ms / 3,
            })
        } else {
            None
        };
        let by_replica = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let faults = scenario::schedule(cfg.scenario, terminals, game_ms, &mut rng);
        let truth = opening
            .iter()
            .map(|(s, u)| (s.clone(), *u as i64))
            .collect();
        let mut w = World {
            rng,
            skew_rng,
            base_terminals: terminals,
            nodes,
            by_replica,
            engine_cfg,
            up: BTreeSet::new(),
            net: Network::default(),
            stand_id,
            sku_order: {
                let mut o: Vec<(Sku, usize)> = skus
                    .iter()
                    .cloned()
                    .enumerate()
                    .map(|(i, s)| (s, i))
                    .collect();
                o.sort();
                o
            },
            skus,
            zipf_cdf,
            expected_demand,
            opening,
            restocked: BTreeMap::new(),
            truth,
            lost_units: BTreeMap::new(),
            sold_units: BTreeMap::new(),
            reclaim_allowance: BTreeMap::new(),
            shrunk: BTreeMap::new(),
            adjusts: Vec::new(),
            wan_up: true,
            lan_up: true,
            wifi_up: vec![true; terminals + 1],
            cut: BTreeSet::new(),
            faults,
            next_fault: 0,
            now: 0,
            step: 0,
            game_ms,
            healed_at: None,
            converged_at: None,
            next_ping: TRANSPORT_PING_MS,
            next_sample: 0,
            sample_every: (game_ms / SAMPLES_PER_GAME).max(1),
            in_transit: BTreeMap::new(),
            tickets: BTreeMap::new(),
            next_ticket: 0,
            waits: Vec::new(),
            served: BTreeMap::new(),
            returned: BTreeMap::new(),
            asked: BTreeMap::new(),
            voids: BTreeMap::new(),
            acked_voids: Vec::new(),
            rogue,
            memo,
            records,
            bytes,
            bug_seen: None,
            next_doc_check: 0,
            lost_at: Vec::new(),
            acked: Vec::new(),
            latencies: Vec::new(),
            counters: Counters::default(),
            dirty: (0..=terminals).collect(),
            checks_due: 0,
            outgoing: (0..=terminals).collect(),
            samples: Vec::new(),
            trace_from: None,
            trace: Vec::new(),
            cfg,
        };
        for t in 1..=terminals {
            w.schedule_arrival(t);
        }
        w.update_links();
        Ok(w)
    }

    /// Record a step-by-step trace from `step` on.
    pub fn trace_from(&mut self, step: u64) {
        self.trace_from = Some(step);
    }

    /// The trace recorded so far.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Length of the game.
    pub fn game_ms(&self) -> u64 {
        self.game_ms
    }

    fn tracing(&self) -> bool {
        self.trace_from.is_some_and(|s| self.step >= s)
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if self.tracing() {
            let line = format!("step {} t={}ms {}", self.step, self.now, f());
            self.trace.push(line);
        }
    }

    /// What `node`'s clock reads now: the ledger's idea of wall time. Only ledger operations see
    /// it; sync timers, the network and every measurement run on the virtual clock.
    fn wall(&self, node: usize) -> u64 {
        GAME_START_WALL_MS
            .saturating_add(self.now)
            .saturating_add_signed(self.nodes[node].skew_ms)
    }

    /// Act on everything `node`'s engine asks for: persist (a simulated device's disk never
    /// fails; a crash keeps everything persisted), settle customers, count rejections.
    /// Act on every event of `node`'s engine, then note when it next wants its timer.
    fn drain(&mut self, node: usize) {
        self.outgoing.insert(node);
        self.drain_events(node);
        let wake = self.nodes[node].engine.poll_timeout();
        self.nodes[node].wake = self.virtual_at(node, wake);
    }

    /// `node`'s state changed: its invariants are checked when it is next due.
    pub(super) fn mark_dirty(&mut self, node: usize) {
        self.dirty.insert(node);
        self.checks_due = self.checks_due.min(self.nodes[node].next_check);
    }

    fn drain_events(&mut self, node: usize) {
        loop {
            let mut persist = false;
            while let Some(ev) = self.nodes[node].engine.poll_event() {
                match ev {
                    Event::Persist(_) => {
                        persist = true;
                        self.mark_dirty(node);
                    }
                    Event::Received { .. } => {
                        self.mark_dirty(node);
                    }
                    Event::Changed(_) => {}
                    Event::Committed {
                        ticket,
                        sale_id,
                        waited_ms,
                    } => self.committed(ticket, sale_id, waited_ms),
                    Event::Refused { ticket, refusal } => {
                        // The simulator only rings up valid sales: "invalid" here is the
                        // ledger failing its own change, a bug.
                        if let Refusal::Invalid { why } = &refusal.reason {
                            self.bug_seen.get_or_insert_with(|| {
                                (
                                    "internal-fault",
                                    format!("node {node} failed its own sale: {why}"),
                                )
                            });
                        }
                        if let Some((t, sku, qty)) = self.tickets.remove(&ticket) {
                            if refusal.waited_ms > 0 {
                                self.waits.push(refusal.waited_ms);
                            }
                            let why = refusal.to_string();
                            self.refused(t, &sku, qty, &why);
                        }
                    }
                    Event::Rejected { rejections, from }
                        if from.is_some() && from == self.rogue.as_ref().map(|r| r.id()) =>
                    {
                        self.counters.rogue_rejections += rejections.len() as u64;
                        self.log(|| format!("node {node} rejected the rogue: {rejections:?}"));
                    }
                    Event::Rejected { rejections, from } => {
                        self.counters.rejected_changes += rejections.len() as u64;
                        // Every replica here is honest: a rejection that is not a wait for a
                        // clock or a dependency is a bug in the writer or the receiver.
                        if let Some(r) = rejections.iter().find(|r| !r.is_transient()) {
                            self.bug_seen.get_or_insert_with(|| {
                                (
                                    "honest-change-rejected",
                                    format!("node {node} rejected a change from {from:?}: {r}"),
                                )
                            });
                        }
                        self.log(|| format!("node {node} rejected {rejections:?}"));
                    }
                    // The simulated relay is one instance.
                    Event::AdminAnswered { .. } | Event::Elsewhere(_) => {}
                    Event::Fault(why) => {
                        self.bug_seen.get_or_insert_with(|| {
                            (
                                "internal-fault",
                                format!("node {node} failed an operation of its own: {why}"),
                            )
                        });
                    }
                    Event::PeerGone(peer) => {
                        // The driver redials at once; the link is still up in the world.
                        let wall = self.wall(node);
                        self.nodes[node].engine.peer_up(peer, wall);
                    }
                }
            }
            if !persist {
                return;
            }
            self.nodes[node].engine.persisted();
        }
    }

    /// The virtual time at which `node`'s clock reads `wall`.
    fn virtual_at(&self, node: usize, wall: u64) -> u64 {
        if wall == u64::MAX {
            return u64::MAX;
        }
        let start = GAME_START_WALL_MS.saturating_add_signed(self.nodes[node].skew_ms);
        wall.saturating_sub(start)
    }

    fn next_event(&self) -> u64 {
        let mut t = u64::MAX;
        if let Some((ft, _)) = self.faults.get(self.next_fault) {
            t = t.min(*ft);
        }
        if let Some(d) = self.net.next_delivery() {
            t = t.min(d);
        }
        t = t.min(self.next_ping);
        if let Some((v, _)) = self.voids.first_key_value() {
            t = t.min(*v);
        }
        if let Some(r) = &self.rogue {
            t = t.min(r.at);
        }
        if self.now < self.game_ms {
            for n in &self.nodes[1..] {
                if n.alive {
                    t = t.min(n.next_arrival);
                }
            }
            t = t.min(self.next_sample);
        }
        for n in &self.nodes {
            if n.alive {
                t = t.min(n.wake);
            }
        }
        t.max(self.now)
    }

    /// Run to the end: the game, the final heal and convergence. `progress` is told the virtual
    /// time now and then.
    pub fn run(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), Violation> {
        loop {
            self.step()?;
            if self.step.is_multiple_of(4096) {
                progress(self.now);
            }
            if let Some(h) = self.healed_at {
                if self.converged() {
                    self.converged_at = Some(self.now);
                    self.check_safety(true)?;
                    self.check_liveness()?;
                    progress(self.now);
                    return Ok(());
                }
                if self.now > h + CONVERGENCE_BOUND_MS {
                    return Err(violation(
                        "convergence",
                        format!(
                            "replicas still differ {} ms after the final heal: {}",
                            self.now - h,
                            self.vectors_summary()
                        ),
                    ));
                }
            }
        }
    }

    /// One step: advance to the next event and handle everything due, then check.
    pub fn step(&mut self) -> Result<(), Violation> {
        let next = self.next_event();
        if next == u64::MAX {
            return Err(violation(
                "progress",
                "nothing left to happen before convergence".to_owned(),
            ));
        }
        self.now = next;
        self.step += 1;
        self.run_faults()?;
        self.rogue();
        self.deliver();
        self.timers();
        self.voids();
        self.customers();
        self.flush();
        if self.sample() {
            self.check_document()?;
        }
        self.check_safety(false)
    }
}

/// What a failed run reports: the invariant, where it broke, and how to replay it.
fn failure(cfg: &SimConfig, w: Option<&World>, v: Violation) -> Box<Failure> {
    Box::new(Failure {
        seed: cfg.seed,
        scenario: cfg.scenario.name().to_owned(),
        config: cfg.label(),
        step: w.map_or(0, |w| w.steps()),
        time_ms: w.map_or(0, |w| w.now()),
        invariant: v.invariant.to_owned(),
        detail: v.detail,
        replay: cfg.replay_command(),
        trace: w.map(|w| w.trace().to_vec()).unwrap_or_default(),
    })
}

/// Run one configuration to the end.
pub fn run(cfg: &SimConfig, progress: &mut dyn FnMut(u64, u64)) -> Result<Report, Box<Failure>> {
    let mut w = World::new(cfg).map_err(|v| failure(cfg, None, v))?;
    let game = w.game_ms();
    match w.run(&mut |now| progress(now, game)) {
        Ok(()) => Ok(w.report()),
        Err(v) => Err(failure(cfg, Some(&w), v)),
    }
}

/// Run one configuration, recording a step-by-step trace from `from_step` on.
pub fn run_traced(cfg: &SimConfig, from_step: u64) -> Result<Report, Box<Failure>> {
    let mut w = World::new(cfg).map_err(|v| failure(cfg, None, v))?;
    w.trace_from(from_step);
    match w.run(&mut |_| {}) {
        Ok(()) => Ok(w.report()),
        Err(v) => Err(failure(cfg, Some(&w), v)),
    }
}

#[allow(dead_code)]
const _: () = assert!(TICK_MS > 0);
