//! The simulated stand: the pool and the terminals as real stand [`Engine`]s over real
//! [`Ledger`]s, the virtual network, the customers and the faults. The world only moves bytes,
//! keeps the clocks and plays the customers and the admin: every rule of the stand (when a sale
//! waits, whom to ask, allocation, relays, vectors) is the engine's, exactly as on a terminal.
//! One [`World::step`] advances the virtual clock to the next event and handles everything
//! due, then checks the invariants of every replica whose state changed.

use crate::config::{Broken, SimConfig};
use crate::net::{LAN, Network, TICK_MS, WAN};
use crate::report::{Failure, Latencies, Report, SkuReport, StockSample};
use crate::scenario::{self, Fault};
use halftime_engine::{Engine, EngineConfig, EngineStats, Event, PlantedBug, SaleOrder, Ticket};
use halftime_ledger::{
    CatalogItem, EventId, Ledger, Policy, ReplicaId, ReplicaKey, Role, SaleId, SaleLine,
    SignedChange, Sku, StandId, StandInfo, WireMessage,
};
use halftime_ledger::{Payment, PaymentMethod, plan_allocation};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// The simulated transport's keepalive on every live link (libp2p's ping on a terminal): it
/// tells both engines the peer is alive without a frame.
pub const TRANSPORT_PING_MS: u64 = 1_000;
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
    /// Sales of `ledger.sales()` already folded into `overdraft` and `sold`.
    overdraft_scanned: usize,
    /// Σ SaleRecord.overdraft per sku over the sales this replica knows.
    overdraft: BTreeMap<Sku, u64>,
    /// Units per sku of the sales this replica knows.
    sold: BTreeMap<Sku, u64>,
    /// Shrink adjustments (a prefix of `World::adjusts`) this replica is known to hold.
    adjusts_known: usize,
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
            overdraft: BTreeMap::new(),
            sold: BTreeMap::new(),
            adjusts_known: 0,
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
    /// Figures of engines replaced by a restart.
    engines_before_restart: EngineStats,
}

/// A violated invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// The figures.
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
    /// How long each customer whose sale waited for rights waited (committed or refused).
    waits: Vec<u64>,
    /// When each customer refused while the stand had stock was refused.
    lost_at: Vec<u64>,
    acked: Vec<(SaleId, usize)>,
    latencies: Vec<u64>,
    counters: Counters,
    dirty: BTreeSet<usize>,
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
            planted_bug: match cfg.broken {
                Some(Broken::IgnoreRights) => Some(PlantedBug::IgnoreRights),
                None => None,
            },
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
        let pool_key = key_for(0).public();
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
            lost_at: Vec::new(),
            acked: Vec::new(),
            latencies: Vec::new(),
            counters: Counters::default(),
            dirty: (0..=terminals).collect(),
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

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Virtual time.
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

    // ---------------------------------------------------------------------------------------
    // Connectivity.

    fn connected(&self, a: usize, b: usize) -> bool {
        let (a, b) = (a.min(b), a.max(b));
        if a == b
            || !self.nodes[a].alive
            || !self.nodes[b].alive
            || !self.lan_up
            || self.cut.contains(&(a, b))
        {
            return false;
        }
        if a == 0 {
            self.wan_up && self.wifi_up[b]
        } else {
            self.wifi_up[a] && self.wifi_up[b]
        }
    }

    fn link_up(&self, a: usize, b: usize) -> bool {
        self.up.contains(&(a.min(b), a.max(b)))
    }

    /// Tell both engines of every link whose state changed.
    fn update_links(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                let now_up = self.connected(a, b);
                let was_up = self.up.contains(&(a, b));
                if now_up && !was_up {
                    self.up.insert((a, b));
                    self.link_event(a, b, true);
                    self.log(|| format!("link {a}<->{b} up"));
                } else if !now_up && was_up {
                    self.up.remove(&(a, b));
                    self.link_event(a, b, false);
                    self.log(|| format!("link {a}<->{b} down"));
                }
            }
        }
    }

    fn link_event(&mut self, a: usize, b: usize, up: bool) {
        for (x, y) in [(a, b), (b, a)] {
            if !self.nodes[x].alive {
                continue;
            }
            let (wall, peer) = (self.wall(x), self.nodes[y].id);
            let e = &mut self.nodes[x].engine;
            if up {
                e.peer_up(peer, wall);
            } else {
                e.peer_down(peer, wall);
            }
            self.drain(x);
        }
    }

    /// Act on everything `node`'s engine asks for: persist (a simulated device's disk never
    /// fails; a crash keeps everything persisted), settle customers, count rejections.
    fn drain(&mut self, node: usize) {
        loop {
            let mut persist = false;
            while let Some(ev) = self.nodes[node].engine.poll_event() {
                match ev {
                    Event::Persist(_) => {
                        persist = true;
                        self.dirty.insert(node);
                    }
                    Event::Received(_) => {
                        self.dirty.insert(node);
                    }
                    Event::Committed {
                        ticket,
                        sale_id,
                        waited_ms,
                    } => self.committed(ticket, sale_id, waited_ms),
                    Event::Refused { ticket, refusal } => {
                        if let Some((t, sku, qty)) = self.tickets.remove(&ticket) {
                            if refusal.waited_ms > 0 {
                                self.waits.push(refusal.waited_ms);
                            }
                            let why = refusal.to_string();
                            self.refused(t, &sku, qty, &why);
                        }
                    }
                    Event::Rejected { rejections, .. } => {
                        self.counters.rejected_changes += rejections.len() as u64;
                        self.log(|| format!("node {node} rejected {rejections:?}"));
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

    fn committed(&mut self, ticket: Ticket, sale_id: SaleId, waited_ms: u64) {
        let Some((t, sku, qty)) = self.tickets.remove(&ticket) else {
            return;
        };
        let now = self.now;
        self.log(|| {
            format!("terminal {t} sells {sku} x{qty} ({sale_id:?}, waited {waited_ms} ms)")
        });
        if waited_ms > 0 {
            self.waits.push(waited_ms);
        }
        self.counters.sales += 1;
        self.counters.units_sold += qty;
        if t > self.base_terminals {
            self.counters.replacement_sales += 1;
        }
        *self.truth.entry(sku.clone()).or_insert(0) -= qty as i64;
        *self.sold_units.entry(sku).or_insert(0) += qty;
        self.in_transit
            .entry(sale_id.replica)
            .or_default()
            .insert(sale_id.seq, now);
        self.acked.push((sale_id, t));
    }

    // ---------------------------------------------------------------------------------------
    // The main loop.

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
        if self.now < self.game_ms {
            for n in &self.nodes[1..] {
                if n.alive {
                    t = t.min(n.next_arrival);
                }
            }
            t = t.min(self.next_sample);
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.alive {
                t = t.min(self.virtual_at(i, n.engine.poll_timeout()));
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
        self.deliver();
        self.timers();
        self.customers();
        self.flush();
        self.sample();
        self.check_safety()
    }

    fn run_faults(&mut self) -> Result<(), Violation> {
        let mut changed = false;
        while let Some(&(t, f)) = self.faults.get(self.next_fault) {
            if t > self.now {
                break;
            }
            self.next_fault += 1;
            changed = true;
            self.log(|| format!("fault {f:?}"));
            match f {
                Fault::WanDown => self.wan_up = false,
                Fault::WanUp => self.wan_up = true,
                Fault::LanDown => self.lan_up = false,
                Fault::LanUp => self.lan_up = true,
                Fault::WifiDown(i) => self.wifi_up[i] = false,
                Fault::WifiUp(i) => self.wifi_up[i] = true,
                Fault::LinkDown(a, b) => {
                    self.cut.insert((a.min(b), a.max(b)));
                }
                Fault::LinkUp(a, b) => {
                    self.cut.remove(&(a.min(b), a.max(b)));
                }
                Fault::Crash(i) => self.crash(i),
                Fault::Restart(i) => self.restart(i)?,
                Fault::Die(i) => {
                    let n = &mut self.nodes[i];
                    if n.alive {
                        n.alive = false;
                        n.dead = true;
                        self.counters.deaths += 1;
                    }
                }
                Fault::Reclaim(i) => self.reclaim(i)?,
                Fault::Restock(pct) => self.restock(pct)?,
                Fault::Adjust(pct) => self.adjust(pct)?,
                Fault::Replace(i) => self.replace(i)?,
                Fault::Heal => {
                    self.wan_up = true;
                    self.lan_up = true;
                    self.wifi_up.iter_mut().for_each(|w| *w = true);
                    self.cut.clear();
                    for i in 1..self.nodes.len() {
                        if self.nodes[i].crashed {
                            self.restart(i)?;
                        }
                    }
                    self.healed_at = Some(self.now);
                }
            }
        }
        if changed {
            self.update_links();
        }
        Ok(())
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.alive {
            return;
        }
        // Everything applied was persisted before it was acknowledged.
        n.durable = n.engine.ledger().all_changes().cloned().collect();
        n.alive = false;
        n.crashed = true;
        self.counters.crashes += 1;
        // Customers waiting at the crashed terminal leave unserved.
        let waiting: Vec<Ticket> = self
            .tickets
            .iter()
            .filter(|(_, (t, _, _))| *t == i)
            .map(|(k, _)| *k)
            .collect();
        for k in waiting {
            if let Some((t, sku, qty)) = self.tickets.remove(&k) {
                self.refused(t, &sku, qty, "terminal crashed");
            }
        }
    }

    fn restart(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.now;
        let wall = self.wall(i);
        let pool_key = self.nodes[0].key.public();
        let n = &mut self.nodes[i];
        if !n.crashed {
            return Ok(());
        }
        let durable = std::mem::take(&mut n.durable);
        let held = durable.len();
        let (ledger, report) = Ledger::restore(
            n.key.clone(),
            self.stand_id.clone(),
            pool_key,
            durable,
            wall,
        );
        if !report.rejected.is_empty() || report.accepted.len() != held {
            return Err(violation(
                "restore",
                format!(
                    "terminal {i} restored {} of {held} durable changes, rejected {:?}",
                    report.accepted.len(),
                    report.rejected
                ),
            ));
        }
        add_stats(&mut self.counters.engines_before_restart, n.engine.stats());
        n.engine = Engine::new(ledger, self.engine_cfg.clone(), wall);
        n.alive = true;
        n.crashed = false;
        n.overdraft_scanned = 0;
        n.overdraft.clear();
        n.sold.clear();
        n.adjusts_known = 0;
        if n.next_arrival < now {
            self.schedule_arrival(i);
        }
        self.counters.restarts += 1;
        self.dirty.insert(i);
        Ok(())
    }

    fn reclaim(&mut self, i: usize) -> Result<(), Violation> {
        let rid = self.nodes[i].id;
        for s in &self.skus {
            let r = self.nodes[0].engine.ledger().rights(rid, s).max(0) as u64;
            *self.reclaim_allowance.entry(s.clone()).or_insert(0) += r;
            self.counters.reclaimed_units += r;
        }
        let wall = self.wall(0);
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| Ok((l.reclaim(rid, now)?, ())))
            .map_err(|e| violation("reclaim", e.to_string()))?;
        self.drain(0);
        Ok(())
    }

    fn restock(&mut self, pct: u64) -> Result<(), Violation> {
        let units: BTreeMap<Sku, u64> = self
            .expected_demand
            .iter()
            .map(|(s, d)| (s.clone(), ((d * pct as f64) / 100.0).ceil() as u64))
            .filter(|(_, u)| *u > 0)
            .collect();
        if units.is_empty() {
            return Ok(());
        }
        for (s, u) in &units {
            *self.truth.entry(s.clone()).or_insert(0) += *u as i64;
            *self.restocked.entry(s.clone()).or_insert(0) += u;
            self.counters.restocked_units += u;
        }
        let wall = self.wall(0);
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| Ok((l.restock(units, "delivery", now)?, ())))
            .map_err(|e| violation("restock", e.to_string()))?;
        self.drain(0);
        Ok(())
    }

    /// Shrink at the pool: for one or two items the pool holds (drawn from the seed), `pct` of
    /// their opening stock is written off, never more than the pool holds (the spoiled units are
    /// in its store room, not in a terminal's hands) nor than the stand really has. The ledger
    /// lets the pool write off more than it holds; that would leave terminals holding rights to
    /// units that no longer exist (oversell under strict), so the admin here does not.
    fn adjust(&mut self, pct: u64) -> Result<(), Violation> {
        let pool = &self.nodes[0];
        let mut held: Vec<(i64, Sku)> = self
            .skus
            .iter()
            .map(|s| (pool.engine.ledger().rights(pool.id, s), s.clone()))
            .filter(|(r, _)| *r > 0)
            .collect();
        let how_many = self.rng.random_range(1..=2usize).min(held.len());
        let mut picked = Vec::with_capacity(how_many);
        for _ in 0..how_many {
            let i = self.rng.random_range(0..held.len());
            picked.push(held.remove(i));
        }
        let mut units = BTreeMap::new();
        for (r, s) in picked {
            let want = (self.opening.get(&s).copied().unwrap_or(0) * pct).div_ceil(100);
            let left = self.truth.get(&s).copied().unwrap_or(0).max(0) as u64;
            let u = want.min(r as u64).min(left);
            if u > 0 {
                units.insert(s, u);
            }
        }
        if units.is_empty() {
            return Ok(());
        }
        let wall = self.wall(0);
        let shrink = units.clone();
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| Ok((l.adjust(shrink, "spoiled", now)?, ())))
            .map_err(|e| violation("adjust", e.to_string()))?;
        for (s, u) in &units {
            *self.truth.entry(s.clone()).or_insert(0) -= *u as i64;
            *self.shrunk.entry(s.clone()).or_insert(0) += u;
            self.counters.shrunk_units += u;
        }
        self.adjusts
            .push((self.nodes[0].engine.ledger().local_seq(), units));
        self.drain(0);
        Ok(())
    }

    /// The admin enrols a replacement for lost terminal `lost`: a new device with a new key
    /// (from the seed), a fresh `Ledger::join` that holds nothing, links to every replica (opened
    /// by `update_links`), and its own customers from now on.
    fn replace(&mut self, lost: usize) -> Result<(), Violation> {
        let key = ReplicaKey::from_seed(self.rng.random());
        let new = self.nodes.len();
        let wall = self.wall(0);
        let name = format!("till {new} (replaces till {lost})");
        let public = key.public();
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| {
                Ok((l.enrol(public, &name, Role::Terminal, now)?, ()))
            })
            .map_err(|e| violation("enrol", e.to_string()))?;
        self.drain(0);
        let pool_key = self.nodes[0].key.public();
        let ledger = Ledger::join(key.clone(), self.stand_id.clone(), pool_key);
        let customers = ChaCha8Rng::seed_from_u64(self.rng.random());
        let skew = draw_skew(&mut self.skew_rng, self.cfg.clock_skew_ms);
        let now_wall = GAME_START_WALL_MS
            .saturating_add(self.now)
            .saturating_add_signed(skew);
        let engine = Engine::new(ledger, self.engine_cfg.clone(), now_wall);
        let node = Node::new(key, engine, customers, skew);
        self.by_replica.insert(node.id, new);
        self.nodes.push(node);
        self.wifi_up.push(true);
        self.dirty.insert(new);
        self.counters.replacements += 1;
        self.schedule_arrival(new);
        Ok(())
    }

    /// Deliver every message due; what reaches one replica in this tick is handed to its
    /// engine together, so the changes in it are applied as one batch.
    fn deliver(&mut self) {
        let due = self.net.due(self.now);
        if due.is_empty() {
            return;
        }
        let mut by_to: BTreeMap<usize, Vec<(ReplicaId, WireMessage)>> = BTreeMap::new();
        for m in due {
            if !self.link_up(m.from, m.to) {
                self.net.stats.messages_dropped_link_down += 1;
                continue;
            }
            match WireMessage::decode(&m.bytes, &self.stand_id) {
                Ok(msg) => {
                    self.net.stats.messages_delivered += 1;
                    if self.tracing() {
                        let (from, to) = (m.from, m.to);
                        let kind = match &msg {
                            WireMessage::Vector { .. } => "vector".to_owned(),
                            WireMessage::RightsRequest { sku, want, urgent } => {
                                format!("rights-request {sku} x{want} urgent={urgent}")
                            }
                            WireMessage::RightsAnswer { sku, granted, .. } => {
                                format!("rights-answer {sku} x{granted}")
                            }
                            WireMessage::Changes { changes } => {
                                format!("changes x{}", changes.len())
                            }
                        };
                        self.log(|| format!("deliver {from}->{to} {kind}"));
                    }
                    by_to
                        .entry(m.to)
                        .or_default()
                        .push((self.nodes[m.from].id, msg));
                }
                Err(_) => self.counters.decode_errors += 1,
            }
        }
        for (to, msgs) in by_to {
            let wall = self.wall(to);
            self.nodes[to].engine.handle_messages(msgs, wall);
            self.drain(to);
            if to == 0 {
                self.arrived_at_pool();
            }
        }
    }

    /// Propagation: committed sales the pool now holds.
    fn arrived_at_pool(&mut self) {
        let now = self.now;
        let vv = self.nodes[0].engine.ledger().version_vector();
        for (rid, waiting) in self.in_transit.iter_mut() {
            let held = vv.get(rid).copied().unwrap_or(0);
            let later = waiting.split_off(&(held + 1));
            for at in waiting.values() {
                self.latencies.push(now - at);
            }
            *waiting = later;
        }
    }

    fn timers(&mut self) {
        if self.now >= self.next_ping {
            self.next_ping = self.now + TRANSPORT_PING_MS;
            let links: Vec<(usize, usize)> = self.up.iter().copied().collect();
            for (a, b) in links {
                let (ida, idb) = (self.nodes[a].id, self.nodes[b].id);
                let (wa, wb) = (self.wall(a), self.wall(b));
                self.nodes[a].engine.heard(idb, wa);
                self.nodes[b].engine.heard(ida, wb);
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let wall = self.wall(i);
            if self.nodes[i].engine.poll_timeout() <= wall {
                self.nodes[i].engine.handle_timeout(wall);
                self.drain(i);
            }
        }
    }

    fn schedule_arrival(&mut self, t: usize) {
        let scenario = self.cfg.scenario;
        let game = self.game_ms as f64;
        let n = &mut self.nodes[t];
        let mut at = n.next_arrival.min(self.now) as f64;
        if n.next_arrival == u64::MAX {
            at = self.now as f64;
        }
        // Piecewise-constant Poisson process: draw with the current rate; if the draw crosses a
        // phase boundary, restart from the boundary (the process is memoryless).
        loop {
            let frac = at / game;
            if frac >= 1.0 {
                n.next_arrival = u64::MAX;
                return;
            }
            let rate_per_ms = scenario::rate_per_min(scenario, frac) / 60_000.0;
            let next = at + exp_sample(&mut n.customers, 1.0 / rate_per_ms);
            let boundary = scenario::next_phase_boundary(frac) * game;
            if next < boundary {
                n.next_arrival = (next.ceil() as u64).max(self.now + 1);
                return;
            }
            at = boundary;
        }
    }

    fn customers(&mut self) {
        if self.now >= self.game_ms {
            return;
        }
        for t in 1..self.nodes.len() {
            while self.nodes[t].alive && self.nodes[t].next_arrival <= self.now {
                self.serve(t);
                self.schedule_arrival(t);
            }
        }
    }

    fn pick_sku(&mut self, t: usize) -> (Sku, u64) {
        let n = &mut self.nodes[t];
        let u: f64 = n.customers.random();
        let i = self
            .zipf_cdf
            .iter()
            .position(|c| u < *c)
            .unwrap_or(self.zipf_cdf.len() - 1);
        let qty = n.customers.random_range(1..=3u64);
        (self.skus[i].clone(), qty)
    }

    /// One customer at terminal `t`.
    fn serve(&mut self, t: usize) {
        let now = self.now;
        let (wall, pool_wall) = (self.wall(t), self.wall(0));
        let (sku, qty) = self.pick_sku(t);
        self.counters.customers += 1;
        let me = self.nodes[t].id;
        if self.cfg.baseline && self.link_up(0, t) {
            // The central design: an online sale is decided by the pool.
            let pool_has = self.nodes[0].engine.ledger().available(&sku);
            let have = self.nodes[t].engine.ledger().rights(me, &sku);
            let ok = if pool_has < qty as i64 {
                false
            } else if have < qty as i64 {
                let short = qty - have.max(0) as u64;
                let units = BTreeMap::from([(sku.clone(), short)]);
                let give = self.nodes[0].engine.local_op(pool_wall, |l, now| {
                    let c = l.give(me, units, now)?;
                    Ok((c.clone(), c))
                });
                match give {
                    Ok(change) => {
                        self.counters.baseline_gives += 1;
                        self.drain(0);
                        // The round trip to the relay is the sale's answer: the give is
                        // handed to the terminal at once.
                        let pool_id = self.nodes[0].id;
                        self.nodes[t].engine.handle_message(
                            pool_id,
                            WireMessage::Changes {
                                changes: vec![change],
                            },
                            wall,
                        );
                        self.drain(t);
                        true
                    }
                    Err(_) => false,
                }
            } else {
                true
            };
            if !ok {
                self.refused(t, &sku, qty, "pool says none left");
                return;
            }
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.tickets.insert(ticket, (t, sku.clone(), qty));
        let order = SaleOrder {
            lines: vec![SaleLine {
                sku,
                qty,
                unit_price_cents: PRICE_CENTS,
            }],
            payment: Payment {
                method: PaymentMethod::Card,
                reference: format!("pi_{t}_{now}"),
            },
        };
        self.nodes[t].engine.sell(ticket, order, wall);
        self.drain(t);
    }

    fn refused(&mut self, t: usize, sku: &Sku, qty: u64, why: &str) {
        self.counters.refused += 1;
        let left = self.truth.get(sku).copied().unwrap_or(0);
        if left >= qty as i64 {
            self.counters.lost_sales += 1;
            self.lost_at.push(self.now);
            *self.lost_units.entry(sku.clone()).or_insert(0) += qty;
        }
        self.log(|| format!("terminal {t} refuses {sku} x{qty}: {why} (stand has {left})"));
    }

    /// Put every frame the engines want sent on the network.
    fn flush(&mut self) {
        let now = self.now;
        for a in 0..self.nodes.len() {
            if !self.nodes[a].alive {
                continue;
            }
            while let Some((to, msg)) = self.nodes[a].engine.poll_transmit() {
                let Some(&b) = self.by_replica.get(&to) else {
                    continue;
                };
                let model = if a == 0 || b == 0 { &WAN } else { &LAN };
                let bytes = msg.encode(&self.stand_id);
                self.net.send(&mut self.rng, model, now, a, b, bytes);
            }
        }
    }

    fn sample(&mut self) {
        if self.now < self.next_sample || self.now > self.game_ms {
            return;
        }
        self.next_sample = self.now - self.now % self.sample_every + self.sample_every;
        let terminal_rights = self.nodes[1..]
            .iter()
            .map(|n| {
                if n.alive {
                    self.skus
                        .iter()
                        .map(|s| n.engine.ledger().rights(n.id, s))
                        .sum()
                } else {
                    0
                }
            })
            .collect();
        let pool = &self.nodes[0];
        self.samples.push(StockSample {
            t_ms: self.now,
            terminal_rights,
            pool_rights: self
                .skus
                .iter()
                .map(|s| pool.engine.ledger().rights(pool.id, s))
                .sum(),
            pool_available: self
                .skus
                .iter()
                .map(|s| pool.engine.ledger().available(s))
                .sum(),
            truth: self.truth.values().sum(),
        });
    }

    // ---------------------------------------------------------------------------------------
    // Invariants.

    fn check_safety(&mut self) -> Result<(), Violation> {
        let dirty = std::mem::take(&mut self.dirty);
        let policy = self.cfg.checked_policy();
        let pool_id = self.nodes[0].id;
        for n in dirty {
            if !self.nodes[n].alive {
                continue;
            }
            // Fold newly known sales into the overdraft allowance and the units sold of this view.
            let node = &mut self.nodes[n];
            let sales = node.engine.ledger().sales();
            for e in &sales[node.overdraft_scanned..] {
                for (s, u) in &e.record.overdraft {
                    *node.overdraft.entry(s.clone()).or_insert(0) += u;
                }
                for (s, u) in e.record.units() {
                    *node.sold.entry(s).or_insert(0) += u;
                }
            }
            node.overdraft_scanned = sales.len();
            let l = node.engine.ledger();
            // Shrink this view knows of: the adjustments up to the pool's last change it holds
            // (the pool writes them in order, so they are a prefix).
            if node.adjusts_known < self.adjusts.len() {
                let pool_seen = l.version_vector().get(&pool_id).copied().unwrap_or(0);
                node.adjusts_known = self
                    .adjusts
                    .iter()
                    .take_while(|(seq, _)| *seq <= pool_seen)
                    .count();
            }
            let known = &self.adjusts[..node.adjusts_known];
            for s in &self.skus {
                // Every unit that came in (opening, restocks) either went out with a sale or a
                // shrink adjustment this view knows of, or is still available.
                let shrunk: u64 = known.iter().filter_map(|(_, u)| u.get(s)).sum();
                let sold = node.sold.get(s).copied().unwrap_or(0);
                let came_in = l.total_in(s);
                if came_in as i128 - sold as i128 - shrunk as i128 != l.available(s) as i128 {
                    return Err(violation(
                        "units-conserved",
                        format!(
                            "node {n}: {s} came in {came_in}, sold {sold}, shrunk {shrunk}, but available = {}",
                            l.available(s)
                        ),
                    ));
                }
                let avail = l.available(s);
                let mut sum = 0i64;
                for (rid, info) in l.replicas() {
                    let r = l.rights(*rid, s);
                    sum += r;
                    let retired = info.retired_at_pool_seq.is_some();
                    if policy == Policy::Strict && r < 0 && !retired {
                        return Err(violation(
                            "rights-non-negative",
                            format!(
                                "node {n} sees replica {rid} with rights {r} for {s} under strict"
                            ),
                        ));
                    }
                }
                // Gives a reclaimed replica made out of the pool's sight are nobody's rights.
                let unbacked = l.unbacked(s) as i64;
                if sum + unbacked != avail {
                    return Err(violation(
                        "units-conserved",
                        format!(
                            "node {n}: Σ rights of {s} = {sum} (+{unbacked} unbacked) but available = {avail}"
                        ),
                    ));
                }
                let oversell = (-avail).max(0) as u64;
                let reclaimed = self.reclaim_allowance.get(s).copied().unwrap_or(0);
                let allowed = match policy {
                    Policy::Strict => reclaimed,
                    Policy::Optimistic => reclaimed + node.overdraft.get(s).copied().unwrap_or(0),
                };
                if oversell > allowed {
                    return Err(violation(
                        if policy == Policy::Strict {
                            "no-oversell"
                        } else {
                            "oversell-bounded"
                        },
                        format!(
                            "node {n}: available {s} = {avail}, oversell {oversell} > allowed {allowed}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.dead)
    }

    fn converged(&self) -> bool {
        if self.live().any(|n| !n.alive) {
            return false;
        }
        let mut it = self.live();
        let Some(first) = it.next() else { return true };
        let v = first.engine.ledger().version_vector();
        it.all(|n| n.engine.ledger().version_vector() == v)
            && self
                .live()
                .all(|n| n.engine.ledger().heads() == first.engine.ledger().heads())
    }

    fn vectors_summary(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.dead)
            .map(|(i, n)| {
                format!(
                    "node {i}: {} changes",
                    n.engine.ledger().version_vector().values().sum::<u64>()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// After convergence: every acknowledged sale of a live terminal is at the pool, and the
    /// pool's stock equals the ground truth less what died unsynced with a lost terminal.
    fn check_liveness(&self) -> Result<(), Violation> {
        let pool = self.nodes[0].engine.ledger();
        let mut missing_dead: BTreeMap<Sku, i64> = BTreeMap::new();
        for (id, t) in &self.acked {
            if pool.sale(*id).is_none() {
                if self.nodes[*t].dead {
                    let Some(e) = self.nodes[*t].engine.ledger().sale(*id) else {
                        continue;
                    };
                    for (s, u) in e.record.units() {
                        *missing_dead.entry(s).or_insert(0) += u as i64;
                    }
                } else {
                    return Err(violation(
                        "sale-at-pool",
                        format!("acknowledged sale {id:?} of terminal {t} never reached the pool"),
                    ));
                }
            }
        }
        for s in &self.skus {
            let truth = self.truth.get(s).copied().unwrap_or(0);
            let lost_with_dead = missing_dead.get(s).copied().unwrap_or(0);
            let avail = pool.available(s);
            if avail != truth + lost_with_dead {
                return Err(violation(
                    "pool-matches-truth",
                    format!(
                        "pool available {s} = {avail}, ground truth {truth} + {lost_with_dead} sold by a lost terminal"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The report of a finished run.
    pub fn report(&self) -> Report {
        let pool = self.nodes[0].engine.ledger();
        let mut per_sku = Vec::new();
        let (mut stranded, mut oversell, mut lost_units) = (0, 0, 0);
        for s in &self.skus {
            let left = self.truth.get(s).copied().unwrap_or(0);
            let lost = self.lost_units.get(s).copied().unwrap_or(0);
            let over = (-pool.available(s)).max(0) as u64;
            let str_ = (left.max(0) as u64).min(lost);
            stranded += str_;
            oversell += over;
            lost_units += lost;
            per_sku.push(SkuReport {
                sku: s.to_string(),
                opening: self.opening.get(s).copied().unwrap_or(0),
                restocked: self.restocked.get(s).copied().unwrap_or(0),
                shrunk: self.shrunk.get(s).copied().unwrap_or(0),
                sold: self.sold_units.get(s).copied().unwrap_or(0),
                left,
                lost_units: lost,
                stranded: str_,
                oversell: over,
            });
        }
        let overdraft_granted: u64 = pool
            .sales()
            .iter()
            .flat_map(|e| e.record.overdraft.values())
            .sum();
        let offline_sales = pool.sales().iter().filter(|e| e.record.offline).count() as u64;
        let c = &self.counters;
        let mut engines = c.engines_before_restart.clone();
        for n in &self.nodes {
            add_stats(&mut engines, n.engine.stats());
        }
        Report {
            seed: self.cfg.seed,
            scenario: self.cfg.scenario.name().to_owned(),
            config: self.cfg.label(),
            terminals: self.base_terminals,
            game_minutes: self.game_ms / 60_000,
            steps: self.step,
            customers: c.customers,
            sales: c.sales,
            units_sold: c.units_sold,
            offline_sales_at_pool: offline_sales,
            refused: c.refused,
            lost_sales: c.lost_sales,
            lost_units,
            stranded_units: stranded,
            oversell_units: oversell,
            refunds_owed: oversell,
            refunds_owed_cents: oversell * PRICE_CENTS,
            overdraft_granted_units: overdraft_granted,
            sales_never_at_pool: self
                .acked
                .iter()
                .filter(|(id, _)| pool.sale(*id).is_none())
                .count() as u64,
            propagation_ms: Latencies::from_samples(&self.latencies),
            convergence_ms: match (self.healed_at, self.converged_at) {
                (Some(h), Some(c)) => Some(c - h),
                _ => None,
            },
            rights_requests: engines.rights_requests_sent,
            rights_answers_granted: engines.gives_answered,
            gives: engines.gives_answered + engines.gives_planned + c.baseline_gives,
            held_sales: engines.sales_held,
            sale_wait_ms: Latencies::from_samples(&self.waits),
            restocked_units: c.restocked_units,
            reclaimed_units: c.reclaimed_units,
            shrunk_units: c.shrunk_units,
            replacement_terminals: c.replacements,
            replacement_sales: c.replacement_sales,
            relayed_changes: engines.changes_relayed,
            clock_skew_max_ms: self
                .nodes
                .iter()
                .map(|n| n.skew_ms.unsigned_abs())
                .max()
                .unwrap_or(0),
            crashes: c.crashes,
            restarts: c.restarts,
            deaths: c.deaths,
            decode_errors: c.decode_errors,
            rejected_changes: c.rejected_changes,
            net: self.net.stats.clone(),
            per_sku,
            samples: self.samples.clone(),
            lost_sale_times_ms: self.lost_at.clone(),
            sale_waits_ms: self.waits.clone(),
            latencies_ms: {
                let mut v = self.latencies.clone();
                v.sort_unstable();
                v
            },
        }
    }
}

/// Run one configuration to the end.
pub fn run(cfg: &SimConfig, progress: &mut dyn FnMut(u64, u64)) -> Result<Report, Box<Failure>> {
    let fail = |w: Option<&World>, v: Violation| {
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
    };
    let mut w = World::new(cfg).map_err(|v| fail(None, v))?;
    let game = w.game_ms();
    match w.run(&mut |now| progress(now, game)) {
        Ok(()) => Ok(w.report()),
        Err(v) => Err(fail(Some(&w), v)),
    }
}

/// Run one configuration, recording a step-by-step trace from `from_step` on.
pub fn run_traced(cfg: &SimConfig, from_step: u64) -> Result<Report, Box<Failure>> {
    let fail = |w: Option<&World>, v: Violation| {
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
    };
    let mut w = World::new(cfg).map_err(|v| fail(None, v))?;
    w.trace_from(from_step);
    match w.run(&mut |_| {}) {
        Ok(()) => Ok(w.report()),
        Err(v) => Err(fail(Some(&w), v)),
    }
}

#[allow(dead_code)]
const _: () = assert!(TICK_MS > 0);

fn add_stats(sum: &mut EngineStats, s: &EngineStats) {
    sum.rights_requests_sent += s.rights_requests_sent;
    sum.gives_answered += s.gives_answered;
    sum.gives_planned += s.gives_planned;
    sum.changes_relayed += s.changes_relayed;
    sum.sales_held += s.sales_held;
}
