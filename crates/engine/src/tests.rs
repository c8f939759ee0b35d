//! Engines wired by an in-memory network with a manual clock (quinn-proto's `Pair`, for a
//! whole stand): every frame goes through the real encoding and the durability barrier.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use halftime_ledger::{
    Allocation, CatalogItem, EventId, Operation, Payment, PaymentMethod, Policy, ReplicaKey, Sku,
    StandId, StandInfo,
};

const T0: u64 = 1_000_000;

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

struct Stand {
    engines: Vec<Engine>,
    /// Frames in flight: (from, to, bytes, deliver at).
    wire: Vec<(usize, usize, Vec<u8>, u64)>,
    now: u64,
    latency_ms: u64,
    /// Node pairs whose link is cut.
    cut: BTreeSet<(usize, usize)>,
    outcomes: Vec<(usize, Event)>,
    vectors_sent: usize,
    /// The transport's keepalive (libp2p's ping on a terminal) on every link not cut.
    next_ping: u64,
    /// Engines that are instances of one relay: what one hands on reaches the others.
    instances: Vec<usize>,
    handed: Vec<(usize, Elsewhere)>,
}

/// A pool and `rights.len()` terminals; terminal i holds `rights[i]` sodas, the pool `pool`.
fn stand(pool_units: u64, rights: &[u64], cfg: EngineConfig) -> Stand {
    let info = StandInfo {
        event: EventId::new("game").unwrap(),
        venue: "v".into(),
        stand: StandId::new("north").unwrap(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    };
    let pool_key = ReplicaKey::from_seed([1; 32]);
    let (mut pool, genesis) = Ledger::create_stand(pool_key.clone(), info, "pool", T0).unwrap();
    let mut setup = vec![genesis];
    setup.push(
        pool.set_catalog(
            vec![CatalogItem {
                sku: sku("soda"),
                name: "Soda".into(),
                price_cents: 300,
                low_stock_at: 0,
            }],
            T0,
        )
        .unwrap(),
    );
    let keys: Vec<ReplicaKey> = (0..rights.len())
        .map(|i| ReplicaKey::from_seed([10 + i as u8; 32]))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        setup.push(
            pool.enrol(k.public(), &format!("till {i}"), Role::Terminal, T0)
                .unwrap(),
        );
    }
    let total = pool_units + rights.iter().sum::<u64>();
    if total > 0 {
        setup.push(
            pool.restock(BTreeMap::from([(sku("soda"), total)]), "opening", T0)
                .unwrap(),
        );
    }
    for (k, r) in keys.iter().zip(rights) {
        if *r > 0 {
            setup.push(
                pool.give(k.replica_id(), BTreeMap::from([(sku("soda"), *r)]), T0)
                    .unwrap(),
            );
        }
    }
    let mut engines = vec![Engine::new(pool, cfg.clone(), T0)];
    for k in keys {
        let mut l = Ledger::join(k, StandId::new("north").unwrap(), pool_key.public());
        let r = l.apply_remote(setup.clone(), T0);
        assert!(r.rejected.is_empty());
        engines.push(Engine::new(l, cfg.clone(), T0));
    }
    let mut s = Stand {
        engines,
        wire: Vec::new(),
        now: T0,
        latency_ms: 1,
        cut: BTreeSet::new(),
        outcomes: Vec::new(),
        vectors_sent: 0,
        next_ping: T0 + 1_000,
        instances: Vec::new(),
        handed: Vec::new(),
    };
    s.connect_all();
    s
}

impl Stand {
    fn id(&self, i: usize) -> ReplicaId {
        self.engines[i].ledger().me()
    }

    fn connect_all(&mut self) {
        for a in 0..self.engines.len() {
            for b in 0..self.engines.len() {
                if a != b && !self.cut.contains(&(a.min(b), a.max(b))) {
                    let id = self.id(b);
                    self.engines[a].peer_up(id, self.now);
                }
            }
        }
    }

    fn cut(&mut self, a: usize, b: usize) {
        self.cut.insert((a.min(b), a.max(b)));
        let (ia, ib) = (self.id(a), self.id(b));
        self.engines[a].peer_down(ib, self.now);
        self.engines[b].peer_down(ia, self.now);
    }

    fn sell(&mut self, t: usize, ticket: u64, qty: u64) {
        let order = SaleOrder {
            lines: vec![SaleLine {
                sku: sku("soda"),
                qty,
                unit_price_cents: 300,
            }],
            payment: Payment {
                method: PaymentMethod::Cash,
                reference: String::new(),
            },
        };
        let now = self.now;
        self.engines[t].sell(Ticket(ticket), order, now);
    }

    /// Drain events (persisting at once), then frames onto the wire.
    fn pump(&mut self) {
        for i in 0..self.engines.len() {
            loop {
                let mut persist = false;
                while let Some(ev) = self.engines[i].poll_event() {
                    match ev {
                        Event::Persist(_) => persist = true,
                        Event::Committed { .. }
                        | Event::Refused { .. }
                        | Event::AdminAnswered { .. } => self.outcomes.push((i, ev)),
                        Event::Elsewhere(m) => self.handed.push((i, m)),
                        _ => {}
                    }
                }
                if !persist {
                    break;
                }
                self.engines[i].persisted();
            }
            while let Some((to, m)) = self.engines[i].poll_transmit() {
                self.vectors_sent += usize::from(m.is_vector());
                // Instances of one relay share its id: the one linked to the sender, if any
                // (a frame onto a cut link is dropped on delivery).
                let linked = |j: &usize| !self.cut.contains(&(i.min(*j), i.max(*j)));
                let to: Vec<usize> = (0..self.engines.len())
                    .filter(|j| self.id(*j) == to)
                    .collect();
                let j = to.iter().copied().find(linked).unwrap_or(to[0]);
                let bytes = m.encode(self.engines[i].ledger().stand_id());
                self.wire.push((i, j, bytes, self.now + self.latency_ms));
            }
        }
        if !self.handed.is_empty() {
            let now = self.now;
            for (from, m) in std::mem::take(&mut self.handed) {
                for j in self.instances.clone() {
                    if j != from {
                        self.engines[j].handle_elsewhere(m.clone(), now);
                    }
                }
            }
            self.pump();
        }
    }

    /// Advance the clock to `until`, delivering frames and firing timers on the way.
    fn run_until(&mut self, until: u64) {
        loop {
            self.pump();
            let next_frame = self.wire.iter().map(|f| f.3).min().unwrap_or(u64::MAX);
            let next_timer = self
                .engines
                .iter()
                .map(Engine::poll_timeout)
                .min()
                .unwrap_or(u64::MAX);
            let next = next_frame.min(next_timer).min(self.next_ping);
            if next > until {
                self.now = until;
                return;
            }
            self.now = next.max(self.now);
            let now = self.now;
            if now >= self.next_ping {
                self.next_ping = now + 1_000;
                for a in 0..self.engines.len() {
                    for b in 0..self.engines.len() {
                        if a != b && !self.cut.contains(&(a.min(b), a.max(b))) {
                            let id = self.id(b);
                            self.engines[a].heard(id, now);
                        }
                    }
                }
            }
            let (due, rest): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|f| f.3 <= now);
            self.wire = rest;
            for (from, to, bytes, _) in due {
                if self.cut.contains(&(from.min(to), from.max(to))) {
                    continue;
                }
                let id = self.id(from);
                self.engines[to].handle_frame(id, &bytes, now).unwrap();
            }
            for e in &mut self.engines {
                if e.poll_timeout() <= now {
                    e.handle_timeout(now);
                }
            }
        }
    }

    fn outcome(&self, ticket: u64) -> Option<&Event> {
        self.outcomes.iter().map(|(_, e)| e).find(|e| match e {
            Event::Committed { ticket: t, .. } | Event::Refused { ticket: t, .. } => {
                *t == Ticket(ticket)
            }
            _ => false,
        })
    }

    /// Replica `i` marks the soda available or not.
    fn mark(&mut self, i: usize, available: bool) {
        let now = self.now;
        self.engines[i]
            .local_op(now, |l, now| {
                Ok((l.mark(&sku("soda"), available, now)?, ()))
            })
            .unwrap();
    }

    fn rights(&self, i: usize) -> i64 {
        self.engines[i].ledger().rights(self.id(i), &sku("soda"))
    }

    /// The pool restocks `units` sodas.
    fn restock(&mut self, units: u64) {
        let now = self.now;
        self.engines[0]
            .local_op(now, |l, now| {
                Ok((
                    l.restock(BTreeMap::from([(sku("soda"), units)]), "truck", now)?,
                    (),
                ))
            })
            .unwrap();
    }
}

/// A relay's configuration, timers as in [`quiet`].
fn hub() -> EngineConfig {
    EngineConfig {
        hub: true,
        ..quiet()
    }
}

fn quiet() -> EngineConfig {
    // Timers far away, so a test sees only what the sale itself causes.
    EngineConfig {
        sync_interval_ms: 60_000,
        ..EngineConfig::default()
    }
}

#[test]
fn a_terminal_without_rights_sells_by_asking_and_commits_after_the_give() {
    let mut s = stand(10, &[0, 0], quiet());
    s.sell(1, 1, 2);
    s.pump();
    assert!(s.outcome(1).is_none(), "the sale waits for the give");
    assert_eq!(s.engines[1].held_sales(), 1);
    s.run_until(T0 + 100);
    match s.outcome(1) {
        Some(Event::Committed { waited_ms, .. }) => {
            assert!(*waited_ms >= 2 && *waited_ms <= SALE_WAIT_MS, "{waited_ms}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.engines[1].ledger().available(&sku("soda")), 8);
    assert!(s.rights(1) >= 0);
}

#[test]
fn the_last_unit_reaches_the_customer_in_front_of_it() {
    // Terminal 2 holds the stand's last soda; the pool has none. The old rule (a terminal
    // gives at most half of its rights) kept it stuck there.
    let mut s = stand(0, &[0, 1], quiet());
    s.sell(1, 1, 1);
    s.run_until(T0 + 100);
    assert!(
        matches!(s.outcome(1), Some(Event::Committed { .. })),
        "{:?}",
        s.outcome(1)
    );
    assert_eq!(s.rights(2), 0);
    assert_eq!(s.engines[1].ledger().available(&sku("soda")), 0);
}

#[test]
fn a_sale_nobody_can_serve_is_refused_at_once_and_says_so() {
    let mut s = stand(0, &[0, 0], quiet());
    s.sell(1, 1, 1);
    s.pump();
    match s.outcome(1) {
        Some(Event::Refused { refusal, .. }) => {
            assert!(refusal.asked.is_empty());
            assert_eq!(refusal.waited_ms, 0);
            assert!(
                refusal.to_string().contains("do not hold enough"),
                "{refusal}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_holder_that_never_answers_costs_at_most_the_wait_bound() {
    let mut s = stand(10, &[0], quiet());
    s.latency_ms = 10_000; // the answer cannot arrive in time
    s.sell(1, 1, 1);
    s.run_until(T0 + 1_000);
    match s.outcome(1) {
        Some(Event::Refused { refusal, .. }) => {
            assert_eq!(refusal.asked, vec![s.id(0)]);
            assert_eq!(refusal.waited_ms, SALE_WAIT_MS);
            assert!(refusal.to_string().contains("none could give"), "{refusal}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn holders_short_of_the_whole_sale_are_asked_in_parallel() {
    // Needs 5: terminal 2 holds 3, terminal 3 holds 3, pool none.
    let mut s = stand(0, &[0, 3, 3], quiet());
    s.sell(1, 1, 5);
    s.run_until(T0 + 100);
    assert!(
        matches!(s.outcome(1), Some(Event::Committed { .. })),
        "{:?}",
        s.outcome(1)
    );
    assert_eq!(s.engines[1].stats().rights_requests_sent, 2);
    assert_eq!(
        s.rights(1),
        0,
        "each holder was asked for its share, no more"
    );
    assert_eq!(s.rights(2) + s.rights(3), 1);
}

#[test]
fn a_sale_the_stand_cannot_cover_moves_no_rights() {
    let mut s = stand(2, &[0, 3], quiet());
    s.sell(1, 1, 10);
    s.run_until(T0 + 100);
    assert!(matches!(s.outcome(1), Some(Event::Refused { .. })));
    assert_eq!((s.rights(1), s.rights(2)), (0, 3));
    assert_eq!(s.engines[1].stats().rights_requests_sent, 0);
}

#[test]
fn nothing_leaves_and_nothing_is_acknowledged_before_the_change_is_durable() {
    let mut s = stand(0, &[5], quiet());
    s.sell(1, 1, 1);
    let e = &mut s.engines[1];
    assert!(matches!(e.poll_event(), Some(Event::Persist(_))));
    assert!(
        e.poll_event().is_none(),
        "no acknowledgement before persisted()"
    );
    assert!(e.poll_transmit().is_none(), "no frame before persisted()");
    e.persisted();
    let after: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(
        after.iter().any(|e| matches!(e, Event::Committed { .. })),
        "{after:?}"
    );
    assert!(e.poll_transmit().is_some());
}

#[test]
fn a_change_from_an_author_we_do_not_reach_is_repaired_and_relayed() {
    // 1 and 2 cannot reach each other; 3 reaches only 2. Terminal 1's sale reaches the pool
    // by push, terminal 2 by the pool's repair, and terminal 3 only because terminal 2,
    // which does not reach the author, relays it.
    let mut s = stand(0, &[5, 0, 0], EngineConfig::default());
    s.cut(1, 2);
    s.cut(1, 3);
    s.cut(0, 3);
    s.sell(1, 1, 1);
    s.run_until(T0 + 100);
    assert_eq!(s.engines[0].ledger().available(&sku("soda")), 4);
    s.run_until(T0 + 2_500);
    assert_eq!(s.engines[2].ledger().available(&sku("soda")), 4);
    assert!(s.engines[2].stats().changes_relayed >= 1);
    assert_eq!(s.engines[3].ledger().available(&sku("soda")), 4);
}

#[test]
fn a_silent_peer_is_dropped_and_reported() {
    let mut s = stand(0, &[1], EngineConfig::default());
    let pool = s.id(0);
    s.cut.insert((0, 1)); // frames are lost, nobody is told
    s.run_until(T0 + PEER_SILENCE_TIMEOUT_MS + 1_500);
    assert!(!s.engines[1].is_connected(pool));
    assert!(!s.engines[1].pool_reachable());
}

#[test]
fn a_keepalive_heard_on_every_connection_keeps_a_quiet_peer() {
    let mut s = stand(0, &[1], EngineConfig::default());
    let pool = s.id(0);
    s.cut.insert((0, 1)); // no frame, no per-peer ping
    for t in (1..=5).map(|k| T0 + k * 1_000) {
        s.run_until(t);
        s.engines[1].heard_all(t);
    }
    s.run_until(T0 + 5_500);
    assert!(s.engines[1].is_connected(pool));
    assert!(
        !s.engines[0].is_connected(s.id(1)),
        "the other side heard nothing"
    );
}

#[test]
fn the_pool_tops_up_terminals_it_reaches() {
    let mut s = stand(40, &[0, 0], EngineConfig::default());
    s.run_until(T0 + ALLOCATION_INTERVAL_MS + 100);
    assert_eq!(s.rights(1), 20);
    assert_eq!(s.rights(2), 20);
}

#[test]
fn an_idle_link_carries_a_vector_only_now_and_then() {
    // All stock at the one terminal: no allocation or top-up changes to announce.
    let mut s = stand(0, &[5], EngineConfig::default());
    s.run_until(T0 + 500);
    let after_connect = s.vectors_sent;
    assert!(after_connect >= 2, "each side announces itself on connect");
    s.run_until(T0 + 9_000);
    assert!(
        s.engines[1].pool_reachable(),
        "the ping keeps the quiet link alive"
    );
    assert_eq!(s.vectors_sent, after_connect, "nothing new, nothing said");
    s.run_until(T0 + 10_600);
    assert!(
        s.vectors_sent > after_connect,
        "a refresh repairs what a lost frame missed"
    );
    let before_sale = s.vectors_sent;
    s.sell(1, 1, 1);
    s.run_until(T0 + 11_700);
    assert!(
        s.vectors_sent > before_sale,
        "a new change is announced within a second"
    );
}

/// Vectors sent by a stand of a pool and `terminals` terminals while terminal 1 sells one
/// soda every 500 ms for 6 s (every replica has something new to announce all along).
fn vectors_while_busy(terminals: usize, cfg: EngineConfig) -> usize {
    let mut rights = vec![0; terminals];
    rights[0] = 20;
    let mut s = stand(0, &rights, cfg);
    s.run_until(T0 + 1_500);
    let before = s.vectors_sent;
    for i in 0..12 {
        s.sell(1, i, 1);
        s.run_until(T0 + 2_000 + 500 * i);
    }
    s.vectors_sent - before
}

#[test]
fn a_big_stand_spreads_its_vectors_out_and_a_hub_does_not() {
    let busy = EngineConfig {
        sync_interval_ms: 1_000,
        auto_rights: false,
        ..EngineConfig::default()
    };
    // 41 replicas, 40 peers each: the interval is stretched 1,600 / 256 = 7 times.
    let links = 41 * 40;
    let mesh = vectors_while_busy(40, busy.clone());
    assert!(
        mesh >= links / 2 && mesh <= links,
        "{mesh} vectors on {links} links in 6 s: at most one per link"
    );
    // A stand of 16 terminals keeps the plain second.
    let small_links = 17 * 16;
    let small = vectors_while_busy(16, busy.clone());
    assert!(
        small >= small_links * 5,
        "{small} vectors on {small_links} links in 6 s: about six per link"
    );
    let hub = vectors_while_busy(40, EngineConfig { hub: true, ..busy });
    assert!(
        hub >= links * 5,
        "{hub} vectors on {links} links in 6 s: a hub announces every second"
    );
}

#[test]
fn on_a_big_stand_a_lost_push_is_repaired_from_the_others_vectors() {
    let mut rights = vec![0; 40];
    rights[0] = 5;
    let cfg = EngineConfig {
        auto_rights: false,
        ..EngineConfig::default()
    };
    let mut s = stand(0, &rights, cfg);
    s.run_until(T0 + 1_500);
    // The sale's push to terminal 2 is lost; nobody is told.
    s.cut.insert((1, 2));
    s.sell(1, 1, 1);
    s.run_until(T0 + 1_520);
    s.cut.clear();
    let seller = s.id(1);
    assert_eq!(s.engines[2].ledger().held_from(&seller), 0);
    assert_eq!(s.engines[3].ledger().held_from(&seller), 1);
    // Terminal 2's own vectors to the seller go out only every 7 s, but others announce
    // theirs to it; the first that shows more than it holds makes it ask.
    s.run_until(T0 + 1_520 + 3_000);
    assert_eq!(s.engines[2].ledger().held_from(&seller), 1);
}

#[test]
fn an_ask_lost_on_the_way_is_sent_again_before_the_deadline() {
    let mut s = stand(10, &[0], quiet());
    s.cut.insert((0, 1)); // the first ask is lost, nobody is told
    s.sell(1, 1, 1);
    s.run_until(T0 + ASK_RETRY_MS / 2);
    s.cut.clear();
    s.run_until(T0 + SALE_WAIT_MS - 1);
    match s.outcome(1) {
        Some(Event::Committed { waited_ms, .. }) => assert!(*waited_ms >= ASK_RETRY_MS),
        other => panic!("without the second ask the sale waits to its deadline: {other:?}"),
    }
}

#[test]
fn an_item_marked_off_anywhere_is_refused_everywhere_until_it_is_back() {
    let mut s = stand(10, &[5, 0], quiet());
    s.mark(0, false);
    s.run_until(T0 + 50);
    // Terminal 1 holds rights, terminal 2 would ask: both refuse with the mark's own reason.
    s.sell(1, 1, 1);
    s.sell(2, 2, 1);
    s.run_until(T0 + 100);
    for t in [1, 2] {
        match s.outcome(t) {
            Some(Event::Refused { refusal, .. }) => {
                assert_eq!(refusal.reason, Refusal::MarkedOff { sku: sku("soda") });
                assert!(refusal.asked.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.engines[1].ledger().available(&sku("soda")), 15);
    // Terminal 1 brings the item back, with a later mark: every engine sells it again.
    s.mark(1, true);
    s.run_until(T0 + 150);
    s.sell(1, 3, 1);
    s.run_until(T0 + 200);
    assert!(
        matches!(s.outcome(3), Some(Event::Committed { .. })),
        "{:?}",
        s.outcome(3)
    );
    // A sale held for rights is refused once the item is marked off while it waits.
    s.sell(2, 4, 1);
    s.pump();
    assert_eq!(s.engines[2].held_sales(), 1);
    s.mark(2, false);
    s.run_until(T0 + 300);
    match s.outcome(4) {
        Some(Event::Refused { refusal, .. }) => {
            assert_eq!(refusal.reason, Refusal::MarkedOff { sku: sku("soda") })
        }
        other => panic!("{other:?}"),
    }
    assert!(s.engines[1].ledger().is_marked_off(&sku("soda")));
}

#[test]
fn a_busy_terminal_asks_before_its_rate_runs_it_dry() {
    // Terminal 1 holds 100 of the stand's 220 sodas, the others 40 each: every target is 55,
    // so by the target rule alone terminal 1 would ask only below 14 (25 % of 55).
    let mut s = stand(0, &[100, 40, 40, 40], quiet());
    let mut asked_at = None;
    for i in 0..19u64 {
        // A queue: five sodas a second.
        s.sell(1, 100 + i, 5);
        s.pump();
        if asked_at.is_none() && s.engines[1].stats().rights_requests_sent > 0 {
            asked_at = Some(s.rights(1));
        }
        s.run_until(T0 + (i + 1) * 1_000);
    }
    // At that rate it sells out within `ASK_LEAD_MS` once it holds under a quarter of a
    // minute's sales: it asked while still above the target rule's threshold.
    let at = asked_at.expect("the busy terminal never asked");
    assert!(at >= 14, "asked only at {at} left");
}

#[test]
fn what_a_change_did_comes_decoded_a_local_one_once_durable() {
    let mut s = stand(10, &[5, 0], quiet());
    s.sell(1, 1, 2);
    let drain = |e: &mut Engine| std::iter::from_fn(|| e.poll_event()).collect::<Vec<_>>();
    let changed = |evs: &[Event]| -> Vec<Applied> {
        evs.iter()
            .filter_map(|e| match e {
                Event::Changed(a) => Some(a.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let before = drain(&mut s.engines[1]);
    assert!(before.iter().any(|e| matches!(e, Event::Persist(_))));
    assert!(
        changed(&before).is_empty(),
        "nothing shown before it is durable"
    );
    s.engines[1].persisted();
    let after = changed(&drain(&mut s.engines[1]));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].author, s.id(1));
    let Operation::Sale(rec) = &after[0].op else {
        panic!("{:?}", after[0].op)
    };
    assert_eq!(rec.units().get(&sku("soda")), Some(&2));
    // The receiver sees it at once, decoded by its own ledger.
    let (from, to, now) = (s.id(1), s.id(2), s.now);
    while let Some((peer, m)) = s.engines[1].poll_transmit() {
        if peer == to {
            s.engines[2].handle_message(from, m, now);
        }
    }
    let got = changed(&drain(&mut s.engines[2]));
    assert!(
        got.iter()
            .any(|a| a.author == from && matches!(a.op, Operation::Sale(_))),
        "{got:?}"
    );
}

#[test]
fn a_hub_passes_every_change_on_at_once() {
    for hub in [false, true] {
        // Terminals 1 and 2 reach each other only through the pool (a relay's star).
        let mut s = stand(10, &[5, 5], EngineConfig { hub, ..quiet() });
        s.cut(1, 2);
        s.run_until(T0 + 10);
        s.sell(1, 1, 2);
        s.run_until(T0 + 50);
        assert!(matches!(s.outcome(1), Some(Event::Committed { .. })));
        let seen = s.engines[2].ledger().available(&sku("soda"));
        if hub {
            assert_eq!(seen, 18, "the hub passed the sale on within milliseconds");
            assert_eq!(s.engines[0].stats().changes_relayed, 1);
        } else {
            assert_eq!(
                seen, 20,
                "without a hub only the vector exchange repairs it"
            );
        }
    }
}

#[test]
fn a_retired_terminal_hands_over_its_last_sales_and_is_sent_nothing() {
    // Terminals 1 and 2 reach each other only through the pool, a hub (as at a relay).
    let mut s = stand(10, &[5, 5], hub());
    s.cut(1, 2);
    s.run_until(T0 + 10);
    // Terminal 1 drops off and keeps selling on its own; meanwhile the pool retires it.
    s.cut(0, 1);
    s.sell(1, 1, 2);
    s.run_until(T0 + 50);
    assert!(matches!(s.outcome(1), Some(Event::Committed { .. })));
    let t1 = s.id(1);
    let now = s.now;
    s.engines[0]
        .local_op(now, |l, now| Ok((l.retire(t1, now)?, ())))
        .unwrap();
    s.sell(2, 2, 1);
    s.run_until(T0 + 100);
    assert!(s.engines[0].ledger().is_retired(t1));

    // It comes back. The ledger lets it in only to hand over.
    let key = ReplicaKey::from_seed([10; 32]).public();
    assert_eq!(
        s.engines[0].ledger().admission(&key),
        Ok(halftime_ledger::Admission::HandOver(t1))
    );
    s.cut.remove(&(0, 1));
    let (pool, now) = (s.id(0), s.now);
    s.engines[0].peer_up_hand_over(t1, now);
    s.engines[1].peer_up(pool, now);
    // A sale beyond its rights makes it ask the pool, as any terminal would: nothing comes
    // of it, and the sale is refused at its deadline.
    s.run_until(T0 + 150);
    s.sell(1, 3, 4);
    s.run_until(T0 + 1_000);
    assert!(
        matches!(s.outcome(3), Some(Event::Refused { .. })),
        "{:?}",
        s.outcome(3)
    );
    assert!(s.engines[1].stats().rights_requests_sent > 0);

    // Its two units reached the pool and, through the hub, terminal 2.
    assert_eq!(s.engines[0].ledger().available(&sku("soda")), 17);
    assert_eq!(s.engines[2].ledger().available(&sku("soda")), 17);
    // It was sent nothing: not its retirement, not terminal 2's sale, no give.
    let l1 = s.engines[1].ledger();
    assert!(!l1.is_retired(t1));
    assert_eq!(
        l1.available(&sku("soda")),
        18,
        "it knows only its own sales"
    );
    assert_eq!(s.rights(1), 3);
    assert_eq!(s.engines[0].stats().rights_requests_answered, 0);
}

#[test]
fn the_pool_makes_a_relays_admin_request_once_and_answers_everyone_else_no() {
    let mut s = stand(10, &[0], quiet());
    let relay = add_relay(&mut s, quiet());
    let pool = s.id(0);
    let answers = |s: &Stand, id: u64| -> Vec<Result<u64, String>> {
        s.outcomes
            .iter()
            .filter_map(|(i, e)| match e {
                Event::AdminAnswered { id: x, outcome, .. } if *x == id => {
                    assert_eq!(*i, relay, "only the asker hears the answer");
                    Some(outcome.clone())
                }
                _ => None,
            })
            .collect()
    };
    let restock = AdminOp::Restock {
        units: BTreeMap::from([(sku("soda"), 5)]),
        note: "truck".into(),
    };

    assert!(s.engines[relay].request_admin(pool, 7, restock.clone()));
    s.run_until(T0 + 100);
    let seq = s.engines[0].ledger().local_seq();
    assert_eq!(answers(&s, 7), vec![Ok(seq)]);
    assert_eq!(s.engines[0].ledger().request_done(7), Some(seq));
    for e in &s.engines {
        assert_eq!(e.ledger().available(&sku("soda")), 15);
    }

    // Asked again (the answer was lost, say): the same answer, nothing written.
    assert!(s.engines[relay].request_admin(pool, 7, restock.clone()));
    s.run_until(T0 + 200);
    assert_eq!(answers(&s, 7), vec![Ok(seq), Ok(seq)]);
    assert_eq!(s.engines[0].ledger().local_seq(), seq);
    assert_eq!(s.engines[0].ledger().available(&sku("soda")), 15);

    // An operation the pool cannot make is refused with its reason; nothing is written.
    let too_much = AdminOp::Adjust {
        units: BTreeMap::from([(sku("soda"), 500)]),
        reason: "spilled".into(),
    };
    assert!(s.engines[relay].request_admin(pool, 8, too_much));
    s.run_until(T0 + 300);
    assert!(
        matches!(&answers(&s, 8)[..], [Err(_)]),
        "{:?}",
        answers(&s, 8)
    );
    assert_eq!(s.engines[0].ledger().local_seq(), seq);

    // A terminal is not a relay: refused, whatever it asks.
    assert!(s.engines[1].request_admin(pool, 9, restock));
    s.run_until(T0 + 400);
    assert_eq!(s.engines[0].ledger().local_seq(), seq);
    assert_eq!(s.engines[0].ledger().request_done(9), None);
    assert!(s.outcomes.iter().any(|(i, e)| *i == 1
        && matches!(e, Event::AdminAnswered { id: 9, outcome: Err(w), .. }
            if w.contains("not an enrolled relay"))));
}

#[test]
fn frames_that_arrive_together_are_applied_together_and_a_bad_one_is_handed_back() {
    let mut s = stand(0, &[5, 5], quiet());
    s.sell(1, 1, 1);
    s.sell(2, 2, 1);
    s.pump();
    let to_pool: Vec<(usize, Vec<u8>)> = s
        .wire
        .drain(..)
        .filter(|f| f.1 == 0)
        .map(|f| (f.0, f.2))
        .collect();
    assert!(
        to_pool.len() >= 2,
        "each terminal pushed its sale to the pool"
    );
    let mut frames: Vec<(ReplicaId, Vec<u8>)> = to_pool
        .into_iter()
        .map(|(from, b)| (s.id(from), b))
        .collect();
    // Built by hand: bytes that are no frame, from terminal 1.
    frames.insert(1, (s.id(1), vec![0xff, 0x00, 0x13]));
    let now = s.now;
    let bad = s.engines[0].handle_frames(frames, now);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, s.id(1));
    assert!(matches!(
        bad[0].1,
        WireError::Malformed(_) | WireError::Version(_)
    ));
    assert_eq!(s.engines[0].stats().frames_rejected, 1);
    assert_eq!(s.engines[0].stats().changes_received, 2);
    assert_eq!(s.engines[0].ledger().available(&sku("soda")), 8);
}

/// Enrol a relay in `s` and add its engine, connected to every replica; returns its index.
fn add_relay(s: &mut Stand, cfg: EngineConfig) -> usize {
    let relay_key = ReplicaKey::from_seed([50; 32]);
    let now = s.now;
    s.engines[0]
        .local_op(now, |l, now| {
            Ok((l.enrol(relay_key.public(), "relay", Role::Relay, now)?, ()))
        })
        .unwrap();
    let pool_key = ReplicaKey::from_seed([1; 32]).public();
    let mut l = Ledger::join(relay_key, StandId::new("north").unwrap(), pool_key);
    let all: Vec<SignedChange> = s.engines[0].ledger().all_changes().collect();
    assert!(l.apply_remote(all, now).rejected.is_empty());
    s.engines.push(Engine::new(l, cfg, now));
    s.connect_all();
    s.run_until(now + 20);
    s.engines.len() - 1
}

#[test]
fn an_instance_of_the_relay_hands_a_request_it_cannot_answer_to_the_others() {
    // The pool holds 2 sodas and terminal 2 holds 1, both connected to instance A of the
    // relay only; terminal 1 holds none and is connected to instance B only.
    let mut s = stand(2, &[0, 1], quiet());
    let cfg = EngineConfig {
        elsewhere: true,
        ..hub()
    };
    let a = add_relay(&mut s, cfg.clone());
    let mut l = Ledger::join(
        ReplicaKey::from_seed([50; 32]),
        StandId::new("north").unwrap(),
        ReplicaKey::from_seed([1; 32]).public(),
    );
    let all: Vec<SignedChange> = s.engines[a].ledger().all_changes().collect();
    assert!(l.apply_remote(all, s.now).rejected.is_empty());
    s.engines.push(Engine::new(l, cfg, s.now));
    let b = s.engines.len() - 1;
    s.instances = vec![a, b];
    s.cut(0, 1);
    s.cut(1, 2);
    s.cut(1, a);
    for other in [0, 2, a] {
        s.cut.insert((other.min(b), other.max(b)));
    }
    s.connect_all();
    s.run_until(s.now + 20);

    s.sell(1, 1, 3);
    s.run_until(s.now + SALE_WAIT_MS + 50);
    match s.outcome(1) {
        Some(Event::Committed { waited_ms, .. }) => {
            assert!(*waited_ms > 0 && *waited_ms <= SALE_WAIT_MS, "{waited_ms}")
        }
        other => panic!("{other:?}"),
    }
    // B reached no holder and handed each ask to A, which asked the pool, then terminal 2;
    // their answers came back through B.
    assert!(s.engines[b].stats().rights_asked_elsewhere >= 2);
    assert_eq!(s.engines[b].stats().rights_requests_forwarded, 0);
    assert_eq!(s.engines[a].stats().rights_requests_forwarded, 2);
    assert_eq!((s.rights(0), s.rights(1), s.rights(2)), (0, 0, 0));
    // The sale reaches A the way another instance's changes do: from the store.
    let stored: Vec<SignedChange> = s.engines[b].ledger().all_changes().collect();
    let now = s.now;
    s.engines[a].handle_stored(stored, now);
    s.run_until(s.now + 100);
    for i in [0, 1, 2, a, b] {
        assert_eq!(
            s.engines[i].ledger().available(&sku("soda")),
            0,
            "replica {i}"
        );
    }

    // The pool is restocked, then loses its link to A: no instance reaches a holder, so the
    // ask is handed on, nobody answers, and the sale is refused at its bound, naming the relay.
    s.restock(4);
    s.run_until(s.now + 20);
    let stored: Vec<SignedChange> = s.engines[a].ledger().all_changes().collect();
    let now = s.now;
    s.engines[b].handle_stored(stored, now);
    s.run_until(s.now + 20);
    assert_eq!(s.engines[1].ledger().available(&sku("soda")), 4);
    s.cut(0, a);
    let asked_before = s.engines[b].stats().rights_asked_elsewhere;
    s.sell(1, 2, 1);
    s.run_until(s.now + SALE_WAIT_MS + 50);
    match s.outcome(2) {
        Some(Event::Refused { refusal, .. }) => {
            assert_eq!(refusal.asked, vec![s.id(b)]);
            assert!(refusal.waited_ms >= SALE_WAIT_MS, "{}", refusal.waited_ms);
        }
        other => panic!("{other:?}"),
    }
    assert!(s.engines[b].stats().rights_asked_elsewhere > asked_before);
    assert_eq!(s.engines[a].stats().rights_requests_forwarded, 2);
}

#[test]
fn a_terminal_that_reaches_holders_only_through_the_relay_sells_by_asking_through_it() {
    // The pool holds 2 sodas, terminal 2 holds 1; terminal 1 holds none and reaches the others
    // only through the relay (another network, say).
    let mut s = stand(2, &[0, 1], quiet());
    let relay = add_relay(&mut s, hub());
    s.cut(0, 1);
    s.cut(1, 2);
    s.sell(1, 1, 3);
    s.run_until(s.now + 100);
    match s.outcome(1) {
        Some(Event::Committed { waited_ms, .. }) => {
            assert!(*waited_ms > 0 && *waited_ms <= SALE_WAIT_MS, "{waited_ms}")
        }
        other => panic!("{other:?}"),
    }
    // The relay asked the pool (the biggest holder) for all 3, got 2, then terminal 2 for
    // the last one: the stand's last unit reached the customer in front of it.
    assert_eq!(s.engines[relay].stats().rights_requests_forwarded, 2);
    assert_eq!((s.rights(0), s.rights(1), s.rights(2)), (0, 0, 0));
    s.run_until(s.now + 100);
    for e in &s.engines {
        assert_eq!(e.ledger().available(&sku("soda")), 0);
    }
    assert!(s.engines[relay].ledger().rights(s.id(relay), &sku("soda")) == 0);

    // A holder the relay does not reach: the relay says so at once, and the sale is refused
    // without waiting out its bound.
    s.restock(4);
    s.run_until(s.now + 50);
    s.cut(0, relay);
    s.sell(1, 2, 1);
    s.run_until(s.now + 20);
    match s.outcome(2) {
        Some(Event::Refused { refusal, .. }) => {
            assert_eq!(refusal.asked, vec![s.id(relay)]);
            assert!(refusal.waited_ms < 20, "{}", refusal.waited_ms);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.rights(0), 4, "nothing moved");
}

#[test]
fn only_a_relay_may_ask_or_answer_for_another_replica() {
    let mut s = stand(5, &[0, 0], quiet());
    let relay = add_relay(&mut s, hub());
    let (pool, t1, t2, r) = (s.id(0), s.id(1), s.id(2), s.id(relay));
    let stand_id = StandId::new("north").unwrap();
    let ask_for = |beneficiary| {
        WireMessage::RightsRequestFor {
            beneficiary,
            sku: sku("soda"),
            want: 5,
            urgent: true,
        }
        .encode(&stand_id)
    };
    let now = s.now;
    // A terminal asks the pool on another terminal's behalf; the relay asks for itself and
    // for the pool it asks.
    s.engines[0].handle_frame(t2, &ask_for(t1), now).unwrap();
    s.engines[0].handle_frame(r, &ask_for(r), now).unwrap();
    s.engines[0].handle_frame(r, &ask_for(pool), now).unwrap();
    s.run_until(now + 50);
    assert_eq!(s.engines[0].stats().rights_relays_refused, 3);
    assert_eq!(s.rights(0), 5, "no give was made");
    assert_eq!(s.engines[0].stats().rights_requests_answered, 0);

    // An answer "for" someone sent to a replica that is not a relay, or to the relay for the
    // sender itself, is dropped: nothing reaches terminal 1.
    let answer_for = |beneficiary| {
        WireMessage::RightsAnswerFor {
            beneficiary,
            sku: sku("soda"),
            granted: 5,
            change: None,
        }
        .encode(&stand_id)
    };
    let now = s.now;
    s.engines[2]
        .handle_frame(pool, &answer_for(t1), now)
        .unwrap();
    s.engines[relay]
        .handle_frame(t2, &answer_for(t2), now)
        .unwrap();
    assert_eq!(s.engines[2].stats().rights_relays_refused, 1);
    assert_eq!(s.engines[relay].stats().rights_relays_refused, 1);
    assert_eq!(s.engines[relay].poll_transmit_to(t1), None);

    // The relay's own request for a terminal is answered with a give to that terminal.
    s.engines[0].handle_frame(r, &ask_for(t1), now).unwrap();
    s.run_until(now + 50);
    assert_eq!(s.rights(1), 5);
    assert_eq!(s.rights(0), 0);
}
