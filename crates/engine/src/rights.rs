//! Where selling rights go: a sale waits while holders are asked, holders answer, terminals
//! top up ahead of demand and return surplus, the pool re-plans allocation.

use crate::{Ctx, Elsewhere, Event, PlantedBug, SaleOrder, SaleRefusal, Ticket};
use halftime_ledger::allocation::{Shares, plan_returns};
use halftime_ledger::{
    Ledger, OpError, Refusal, ReplicaId, Role, SaleId, SaleOutcome, SaleRequest, SignedChange, Sku,
    plan_allocation,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Default bound on how long a sale waits for rights from other replicas.
pub const SALE_WAIT_MS: u64 = 250;
/// Holders asked at once for one item of a waiting sale.
pub const PARALLEL_ASKS: usize = 3;
/// An ask still unanswered this long after it went out is sent once more: a request or its
/// answer lost on a lossy uplink would otherwise cost the customer the whole wait.
pub const ASK_RETRY_MS: u64 = 100;
/// Sales waiting for rights at once; more are refused at once.
pub const MAX_HELD_SALES: usize = 256;
/// A terminal asks for a top-up when its rights for an item fall below this share (percent)
/// of its allocation target.
pub const ASK_BELOW_TARGET_PCT: i64 = 25;
/// A terminal also asks when, at its own recent rate, it would sell out of an item within this
/// long: early enough for the answer to land before the queue reaches the last unit.
pub const ASK_LEAD_MS: u64 = 15_000;
/// The window over which a terminal measures its own rate per item.
pub const RATE_WINDOW_MS: u64 = 60_000;
/// At most one top-up request per item in this window.
pub const TOP_UP_REQUEST_TIMEOUT_MS: u64 = 2_000;
/// A terminal looks at its rights for every item this often (besides after every sale).
pub const RIGHTS_CHECK_INTERVAL_MS: u64 = 2_000;
/// The pool re-plans allocation this often while any replica reaches it.
pub const ALLOCATION_INTERVAL_MS: u64 = 2_000;
/// A terminal that reaches the pool returns the surplus it will not sell this often.
pub const RETURN_INTERVAL_MS: u64 = 10_000;

/// A sale waiting for rights.
#[derive(Debug)]
struct Held {
    ticket: Ticket,
    order: SaleOrder,
    since_ms: u64,
    deadline_ms: u64,
    /// When the unanswered asks are sent again (`u64::MAX`: already sent twice).
    retry_ms: u64,
    /// Per (holder, item): `None` while the answer is awaited, else the units granted.
    asks: BTreeMap<(ReplicaId, Sku), Option<u64>>,
}

impl Held {
    fn units(&self) -> BTreeMap<Sku, u64> {
        let mut u = BTreeMap::new();
        for l in &self.order.lines {
            let e = u.entry(l.sku.clone()).or_insert(0u64);
            *e = e.saturating_add(l.qty);
        }
        u
    }

    fn asked(&self) -> Vec<ReplicaId> {
        let set: BTreeSet<ReplicaId> = self.asks.keys().map(|(r, _)| *r).collect();
        set.into_iter().collect()
    }
}

#[derive(Debug)]
pub(crate) struct Rights {
    held: VecDeque<Held>,
    /// Per item: when the last top-up request went out.
    topup_asked: BTreeMap<Sku, u64>,
    /// Per item: this terminal's own sales in the last `RATE_WINDOW_MS` (time, units).
    sold: BTreeMap<Sku, VecDeque<(u64, u64)>>,
    next_check_ms: u64,
    next_plan_ms: u64,
    next_return_ms: u64,
}

/// Holders `(rights, is the pool, id)` in the order they are asked: most rights first, the pool
/// first among equals (it gives all it holds).
fn ask_order(a: &(u64, bool, ReplicaId), b: &(u64, bool, ReplicaId)) -> std::cmp::Ordering {
    b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2))
}

/// Why a sale may wait instead of being refused: this replica lacks the rights.
fn lacks_rights(r: &Refusal) -> bool {
    matches!(
        r,
        Refusal::InsufficientRights { .. } | Refusal::LockedLowStock { .. }
    )
}

impl Rights {
    pub(crate) fn new(now_ms: u64) -> Self {
        Self {
            held: VecDeque::new(),
            topup_asked: BTreeMap::new(),
            sold: BTreeMap::new(),
            next_check_ms: now_ms.saturating_add(RIGHTS_CHECK_INTERVAL_MS),
            next_plan_ms: now_ms.saturating_add(ALLOCATION_INTERVAL_MS),
            next_return_ms: now_ms.saturating_add(RETURN_INTERVAL_MS),
        }
    }

    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }

    fn request(ctx: &Ctx<'_>, order: &SaleOrder) -> SaleRequest {
        SaleRequest {
            lines: order.lines.clone(),
            payment: order.payment.clone(),
            pool_reachable: ctx.pool_reachable()
                && ctx.cfg.planted_bug != Some(PlantedBug::IgnoreRights),
        }
    }

    /// The stand's rule for one attempt: an item marked unavailable is not sold, whatever
    /// rights are held; otherwise the ledger sells within rights and the policy.
    fn attempt(ctx: &mut Ctx<'_>, order: &SaleOrder, now: u64) -> SaleOutcome {
        if let Some(l) = order
            .lines
            .iter()
            .find(|l| ctx.ledger.is_marked_off(&l.sku))
        {
            return SaleOutcome::Refused {
                reason: Refusal::MarkedOff { sku: l.sku.clone() },
            };
        }
        ctx.ledger.sell(Self::request(ctx, order), now)
    }

    pub(crate) fn sell(&mut self, ctx: &mut Ctx<'_>, ticket: Ticket, order: SaleOrder, now: u64) {
        match Self::attempt(ctx, &order, now) {
            SaleOutcome::Committed { sale_id, change } => {
                self.commit(ctx, ticket, sale_id, change, 0, now)
            }
            SaleOutcome::Refused { reason }
                if lacks_rights(&reason)
                    && ctx.cfg.auto_rights
                    && self.held.len() < MAX_HELD_SALES =>
            {
                let mut h = Held {
                    ticket,
                    order,
                    since_ms: now,
                    deadline_ms: now.saturating_add(ctx.cfg.sale_wait_ms),
                    retry_ms: now.saturating_add(ASK_RETRY_MS),
                    asks: BTreeMap::new(),
                };
                if self.ask_for(ctx, &mut h) {
                    ctx.stats.sales_held += 1;
                    self.held.push_back(h);
                } else {
                    Self::refuse(ctx, ticket, reason, Vec::new(), 0);
                }
            }
            SaleOutcome::Refused { reason } => Self::refuse(ctx, ticket, reason, Vec::new(), 0),
        }
    }

    /// Ask the best reachable holders, in parallel, for what `h` lacks: the largest holders
    /// first, each for the part of the shortfall it can cover. A holder is asked again only
    /// after it gave something. False when nobody could be asked, or when everything the
    /// reachable replicas hold would not cover the sale (moving rights would not serve it).
    fn ask_for(&self, ctx: &mut Ctx<'_>, h: &mut Held) -> bool {
        let me = ctx.ledger.me();
        let pool = ctx.ledger.pool();
        let reachable = ctx.pool_reachable();
        let mut plan: Vec<(ReplicaId, Sku, u64)> = Vec::new();
        for (sku, want) in h.units() {
            let can = ctx.ledger.sellable_now(&sku, reachable);
            let mut short = want.saturating_sub(can);
            if short == 0 {
                continue;
            }
            let awaited: u64 = h
                .asks
                .iter()
                .filter(|((_, s), a)| *s == sku && a.is_none())
                .count() as u64;
            let mut holders: Vec<(u64, bool, ReplicaId)> = ctx
                .peers
                .iter()
                .filter(|(_, peer)| !peer.sync.is_hand_over())
                .map(|(p, _)| p)
                .filter(|p| **p != me)
                .filter(|p| !matches!(h.asks.get(&(**p, sku.clone())), Some(None) | Some(Some(0))))
                .map(|p| (Self::can_give(ctx, *p, &sku).max(0) as u64, *p == pool, *p))
                .filter(|(r, _, _)| *r > 0)
                .collect();
            let in_reach: u64 = holders
                .iter()
                .map(|(r, _, _)| *r)
                .fold(0, u64::saturating_add);
            if in_reach < short && awaited == 0 {
                return false;
            }
            holders.sort_by(ask_order);
            for (r, _, p) in holders.into_iter().take(PARALLEL_ASKS) {
                if short == 0 {
                    break;
                }
                let ask = short.min(r);
                short -= ask;
                plan.push((p, sku.clone(), ask));
            }
        }
        for (p, sku, want) in &plan {
            if let Some(peer) = ctx.peers.get_mut(p) {
                peer.sync.request_rights(sku.clone(), *want, true);
                ctx.stats.rights_requests_sent += 1;
                h.asks.insert((*p, sku.clone()), None);
            }
        }
        !plan.is_empty()
    }

    /// Send every unanswered ask of `h` once more. A holder that then answers both gives
    /// twice: the surplus is the asker's, returned with its other surplus.
    fn ask_again(ctx: &mut Ctx<'_>, h: &mut Held) {
        h.retry_ms = u64::MAX;
        let units = h.units();
        let reachable = ctx.pool_reachable();
        for ((p, sku), a) in &h.asks {
            if a.is_some() {
                continue;
            }
            let want = units.get(sku).copied().unwrap_or(0);
            let short = want.saturating_sub(ctx.ledger.sellable_now(sku, reachable));
            if let (Some(peer), true) = (ctx.peers.get_mut(p), short > 0) {
                peer.sync.request_rights(sku.clone(), short, true);
                ctx.stats.rights_requests_sent += 1;
            }
        }
    }

    fn commit(
        &mut self,
        ctx: &mut Ctx<'_>,
        ticket: Ticket,
        sale_id: SaleId,
        change: SignedChange,
        waited_ms: u64,
        now: u64,
    ) {
        ctx.stats.sales_committed += 1;
        let seq = ctx.ledger.local_seq();
        ctx.record_local(change, None);
        ctx.after_persist.push_back((
            seq,
            Event::Committed {
                ticket,
                sale_id,
                waited_ms,
            },
        ));
        // Ask for more right after the sale that ran an item low, not at the next check.
        let units = ctx
            .ledger
            .sale(sale_id)
            .map(|e| e.record.units())
            .unwrap_or_default();
        for (sku, n) in &units {
            self.sold
                .entry(sku.clone())
                .or_default()
                .push_back((now, *n));
        }
        let skus: BTreeSet<Sku> = units.into_keys().collect();
        self.top_up(ctx, Some(&skus), now);
    }

    fn refuse(
        ctx: &mut Ctx<'_>,
        ticket: Ticket,
        reason: Refusal,
        asked: Vec<ReplicaId>,
        waited_ms: u64,
    ) {
        ctx.stats.sales_refused += 1;
        ctx.events.push_back(Event::Refused {
            ticket,
            refusal: SaleRefusal {
                reason,
                asked,
                waited_ms,
            },
        });
    }

    /// A holder answered for `sku`.
    pub(crate) fn answered(&mut self, from: ReplicaId, sku: &Sku, granted: u64) {
        for h in &mut self.held {
            if let Some(a) = h.asks.get_mut(&(from, sku.clone())) {
                a.get_or_insert(granted);
            }
        }
        if granted == 0 {
            // Ask someone else at the next check.
            self.topup_asked.remove(sku);
        }
    }

    /// No answer will come from `peer`.
    pub(crate) fn peer_down(&mut self, peer: ReplicaId) {
        for h in &mut self.held {
            for ((p, _), a) in h.asks.iter_mut() {
                if *p == peer {
                    a.get_or_insert(0);
                }
            }
        }
    }

    /// Waiting sales that can commit now do; those past their deadline, or whose every holder
    /// answered without enough and nobody new can be asked, are refused.
    pub(crate) fn progress(&mut self, ctx: &mut Ctx<'_>, now: u64) {
        if self.held.is_empty() {
            return;
        }
        let mut waiting = VecDeque::with_capacity(self.held.len());
        while let Some(mut h) = self.held.pop_front() {
            let waited = now.saturating_sub(h.since_ms);
            match Self::attempt(ctx, &h.order, now) {
                SaleOutcome::Committed { sale_id, change } => {
                    self.commit(ctx, h.ticket, sale_id, change, waited, now);
                }
                SaleOutcome::Refused { reason } if lacks_rights(&reason) => {
                    let answered = h.asks.values().all(Option::is_some);
                    if now >= h.deadline_ms || (answered && !self.ask_for(ctx, &mut h)) {
                        let asked = h.asked();
                        Self::refuse(ctx, h.ticket, reason, asked, waited);
                    } else {
                        if now >= h.retry_ms {
                            Self::ask_again(ctx, &mut h);
                        }
                        waiting.push_back(h);
                    }
                }
                SaleOutcome::Refused { reason } => {
                    let asked = h.asked();
                    Self::refuse(ctx, h.ticket, reason, asked, waited);
                }
            }
        }
        self.held = waiting;
    }

    /// `from` asks for rights. A relay holds none: it passes the request on to the holder it
    /// reaches that holds most (the pool first among equals), on `from`'s behalf, or answers
    /// none when it reaches no holder. Any other replica answers itself.
    pub(crate) fn requested(
        &mut self,
        ctx: &mut Ctx<'_>,
        from: ReplicaId,
        sku: Sku,
        want: u64,
        urgent: bool,
        now: u64,
    ) {
        if ctx.ledger.role() != Some(Role::Relay) {
            return self.answer(ctx, from, None, sku, want, urgent, now);
        }
        if Self::forward(ctx, from, &sku, want, urgent) {
            return;
        }
        if ctx.cfg.elsewhere {
            // Another instance may reach a holder: it forwards the request, and its answer
            // comes back through this instance. Until then the sale waits, at most its bound.
            ctx.stats.rights_asked_elsewhere += 1;
            ctx.events.push_back(Event::Elsewhere(Elsewhere::Ask {
                beneficiary: from,
                sku,
                want,
                urgent,
            }));
        } else if let Some(peer) = ctx.peers.get_mut(&from) {
            peer.sync.answer_rights(sku, 0, None);
        }
    }

    /// Relay: pass `beneficiary`'s request on to the peer here that holds most of `sku` (the
    /// pool first among equals); false when no peer here holds any.
    fn forward(
        ctx: &mut Ctx<'_>,
        beneficiary: ReplicaId,
        sku: &Sku,
        want: u64,
        urgent: bool,
    ) -> bool {
        let pool = ctx.ledger.pool();
        let holder = ctx
            .peers
            .iter()
            .filter(|(p, peer)| **p != beneficiary && !peer.sync.is_hand_over())
            .map(|(p, _)| (ctx.ledger.rights(*p, sku).max(0) as u64, *p == pool, *p))
            .filter(|(r, _, _)| *r > 0)
            .min_by(ask_order);
        let Some(peer) = holder.and_then(|(_, _, h)| ctx.peers.get_mut(&h)) else {
            return false;
        };
        peer.sync
            .request_rights_for(beneficiary, sku.clone(), want, urgent);
        ctx.stats.rights_requests_forwarded += 1;
        true
    }

    /// Relay: what another instance of this relay passed on. A request is forwarded to a
    /// holder connected here (none: dropped, the asking instance's sale waits out its bound);
    /// an answer reaches its beneficiary if it is connected here.
    pub(crate) fn elsewhere(ctx: &mut Ctx<'_>, msg: Elsewhere) {
        if ctx.ledger.role() != Some(Role::Relay) {
            return;
        }
        match msg {
            Elsewhere::Ask {
                beneficiary,
                sku,
                want,
                urgent,
            } => {
                // A replica connected here asks this instance itself.
                if !ctx.peers.contains_key(&beneficiary) {
                    Self::forward(ctx, beneficiary, &sku, want, urgent);
                }
            }
            Elsewhere::Answer {
                beneficiary,
                sku,
                granted,
                change,
            } => {
                if let Some(peer) = ctx.peers.get_mut(&beneficiary) {
                    peer.sync.answer_rights(sku, granted, change);
                }
            }
        }
    }

    /// `relay` asks on behalf of `beneficiary`: answered like `beneficiary`'s own request,
    /// the give made out to it and the answer sent back through the relay. Only an enrolled,
    /// unretired relay may ask for another replica.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn requested_for(
        &mut self,
        ctx: &mut Ctx<'_>,
        relay: ReplicaId,
        beneficiary: ReplicaId,
        sku: Sku,
        want: u64,
        urgent: bool,
        now: u64,
    ) {
        let by_relay = ctx
            .ledger
            .replicas()
            .get(&relay)
            .is_some_and(|i| i.role == Role::Relay && i.retired_at_pool_seq.is_none());
        if !by_relay || beneficiary == relay || beneficiary == ctx.ledger.me() {
            ctx.stats.rights_relays_refused += 1;
            return;
        }
        self.answer(ctx, beneficiary, Some(relay), sku, want, urgent, now);
    }

    /// Relay: a holder answered a request made for `beneficiary`; pass the answer on as the
    /// answer to `beneficiary`'s own request (to the relay). The give was applied already and
    /// is pushed like any change; it rides along so that the waiting sale needs nothing else.
    pub(crate) fn pass_answer(
        ctx: &mut Ctx<'_>,
        from: ReplicaId,
        beneficiary: ReplicaId,
        sku: Sku,
        granted: u64,
        change: Option<SignedChange>,
    ) {
        if ctx.ledger.role() != Some(Role::Relay) || beneficiary == from {
            ctx.stats.rights_relays_refused += 1;
            return;
        }
        match ctx.peers.get_mut(&beneficiary) {
            Some(peer) => peer.sync.answer_rights(sku, granted, change),
            None if ctx.cfg.elsewhere => {
                ctx.events.push_back(Event::Elsewhere(Elsewhere::Answer {
                    beneficiary,
                    sku,
                    granted,
                    change,
                }))
            }
            None => {}
        }
    }

    /// Answer `to`'s request for `sku` (made through the relay `via`, if any): the pool gives
    /// what it holds; a terminal gives what its own waiting sales do not need, all of it when
    /// a customer waits at the asker (so the stand's last units always reach the customer in
    /// front of them) and half otherwise.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        ctx: &mut Ctx<'_>,
        to: ReplicaId,
        via: Option<ReplicaId>,
        sku: Sku,
        want: u64,
        urgent: bool,
        now: u64,
    ) {
        ctx.stats.rights_requests_answered += 1;
        let me = ctx.ledger.me();
        let have = ctx.ledger.rights(me, &sku).max(0) as u64;
        let needed: u64 = self
            .held
            .iter()
            .map(|h| h.units().get(&sku).copied().unwrap_or(0))
            .fold(0, u64::saturating_add);
        let free = have.saturating_sub(needed);
        let spare = match ctx.ledger.role() {
            Some(Role::Pool) => free,
            Some(Role::Terminal) if urgent => free,
            Some(Role::Terminal) if ctx.cfg.auto_rights => free / 2,
            _ => 0,
        };
        let units = spare.min(want);
        let mut change = None;
        if ctx.cfg.planted_bug == Some(PlantedBug::AnswerTwice) && units > 0 && to != me {
            let units = BTreeMap::from([(sku.clone(), units)]);
            if let Ok(c) = ctx.ledger.give(to, units, now) {
                ctx.record_local(c, None);
            }
        }
        if units > 0 && to != me {
            match ctx
                .ledger
                .give(to, BTreeMap::from([(sku.clone(), units)]), now)
            {
                Ok(c) => {
                    ctx.stats.gives_answered += 1;
                    // The answer carries the give to the asker; everyone else gets it pushed.
                    ctx.record_local(c.clone(), Some(via.unwrap_or(to)));
                    change = Some(c);
                }
                Err(OpError::Refused(_)) => {}
                Err(OpError::Internal(e)) => ctx.events.push_back(Event::Fault(e)),
            }
        }
        let granted = if change.is_some() { units } else { 0 };
        match via {
            None => {
                if let Some(p) = ctx.peers.get_mut(&to) {
                    p.sync.answer_rights(sku, granted, change);
                }
            }
            Some(relay) => {
                if let Some(p) = ctx.peers.get_mut(&relay) {
                    p.sync.answer_rights_for(to, sku, granted, change);
                }
            }
        }
    }

    /// What `peer` can give us of `sku`: its own rights, or, for a relay (which holds none
    /// and passes requests on), the rights of every replica we reach only through it.
    fn can_give(ctx: &Ctx<'_>, peer: ReplicaId, sku: &Sku) -> i64 {
        let replicas = ctx.ledger.replicas();
        if !replicas.get(&peer).is_some_and(|i| i.role == Role::Relay) {
            return ctx.ledger.rights(peer, sku);
        }
        let me = ctx.ledger.me();
        replicas
            .iter()
            .filter(|(r, i)| {
                **r != me
                    && !ctx.peers.contains_key(r)
                    && matches!(i.role, Role::Pool | Role::Terminal)
                    && i.retired_at_pool_seq.is_none()
            })
            .map(|(r, _)| ctx.ledger.rights(*r, sku).max(0))
            .fold(0, i64::saturating_add)
    }

    /// Units of `sku` this terminal will sell in the next `ASK_LEAD_MS` at its rate over the
    /// last `RATE_WINDOW_MS`.
    fn demand_soon(&mut self, sku: &Sku, now: u64) -> i64 {
        let Some(q) = self.sold.get_mut(sku) else {
            return 0;
        };
        while q
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > RATE_WINDOW_MS)
        {
            q.pop_front();
        }
        let units: u64 = q.iter().map(|(_, n)| *n).fold(0, u64::saturating_add);
        let soon = u128::from(units) * u128::from(ASK_LEAD_MS) / u128::from(RATE_WINDOW_MS);
        i64::try_from(soon).unwrap_or(i64::MAX)
    }

    /// A terminal low on an item (below `ASK_BELOW_TARGET_PCT` of its allocation target, or
    /// about to sell out at its own rate) asks the best holder it reaches for the difference:
    /// the pool when it holds any, else the terminal holding most.
    fn top_up(&mut self, ctx: &mut Ctx<'_>, only: Option<&BTreeSet<Sku>>, now: u64) {
        if !ctx.cfg.auto_rights || ctx.ledger.role() != Some(Role::Terminal) {
            return;
        }
        let Some(allocation) = ctx.ledger.stand().map(|s| s.allocation) else {
            return;
        };
        let me = ctx.ledger.me();
        let pool = ctx.ledger.pool();
        let skus: Vec<Sku> = match only {
            Some(s) => s.iter().cloned().collect(),
            None => ctx.ledger.catalog().keys().cloned().collect(),
        };
        let mut shares = None;
        for sku in skus {
            if self
                .topup_asked
                .get(&sku)
                .is_some_and(|t| now.saturating_sub(*t) < TOP_UP_REQUEST_TIMEOUT_MS)
            {
                continue;
            }
            let shares = shares.get_or_insert_with(|| Shares::new(ctx.ledger, allocation, now));
            let target = shares.target(ctx.ledger, &sku, me);
            let have = ctx.ledger.rights(me, &sku);
            let soon = self.demand_soon(&sku, now);
            let low = target > 0
                && have.saturating_mul(100) < target.saturating_mul(ASK_BELOW_TARGET_PCT);
            let running_out = soon > 0 && have < soon;
            if !low && !running_out {
                continue;
            }
            let holder = ctx
                .peers
                .iter()
                .filter(|(_, peer)| !peer.sync.is_hand_over())
                .map(|(p, _)| (*p, Self::can_give(ctx, *p, &sku)))
                .max_by_key(|(p, r)| (*p == pool && *r > 0, *r));
            let Some((p, r)) = holder else { continue };
            if r <= 1 {
                continue;
            }
            let want = target
                .max(soon.saturating_mul(2))
                .saturating_sub(have)
                .max(1) as u64;
            if let Some(peer) = ctx.peers.get_mut(&p) {
                peer.sync.request_rights(sku.clone(), want, false);
                ctx.stats.rights_requests_sent += 1;
                self.topup_asked.insert(sku, now);
            }
        }
    }

    /// The pool's allocation plan, or this terminal's surplus returns.
    fn execute_plan(ctx: &mut Ctx<'_>, now: u64) {
        let Some(allocation) = ctx.ledger.stand().map(|s| s.allocation) else {
            return;
        };
        let plans = match ctx.ledger.role() {
            Some(Role::Pool) => plan_allocation(ctx.ledger, allocation, now),
            _ => plan_returns(ctx.ledger, allocation, now, ctx.ledger.me()),
        };
        if plans.is_empty() {
            return;
        }
        for r in ctx.ledger.execute_plans(&plans, now) {
            match r {
                Ok(c) => {
                    ctx.stats.gives_planned += 1;
                    ctx.record_local(c, None);
                }
                // A plan raced a sale and no longer fits: the next plan sees the new rights.
                Err(OpError::Refused(_)) => {}
                Err(OpError::Internal(e)) => ctx.events.push_back(Event::Fault(e)),
            }
        }
    }

    pub(crate) fn handle_timeout(&mut self, ctx: &mut Ctx<'_>, now: u64) {
        if ctx.cfg.auto_rights {
            match ctx.ledger.role() {
                Some(Role::Pool) if now >= self.next_plan_ms => {
                    self.next_plan_ms = now.saturating_add(ALLOCATION_INTERVAL_MS);
                    if !ctx.peers.is_empty() {
                        Self::execute_plan(ctx, now);
                    }
                }
                Some(Role::Terminal) => {
                    if now >= self.next_return_ms {
                        self.next_return_ms = now.saturating_add(RETURN_INTERVAL_MS);
                        if ctx.pool_reachable() {
                            Self::execute_plan(ctx, now);
                        }
                    }
                    if now >= self.next_check_ms {
                        self.next_check_ms = now.saturating_add(RIGHTS_CHECK_INTERVAL_MS);
                        self.top_up(ctx, None, now);
                    }
                }
                _ => {}
            }
        }
        self.progress(ctx, now);
    }

    pub(crate) fn poll_timeout(&self, ledger: &Ledger, cfg: &crate::EngineConfig) -> u64 {
        let mut t = self
            .held
            .iter()
            .map(|h| h.deadline_ms.min(h.retry_ms))
            .min()
            .unwrap_or(u64::MAX);
        if cfg.auto_rights {
            match ledger.role() {
                Some(Role::Pool) => t = t.min(self.next_plan_ms),
                Some(Role::Terminal) => t = t.min(self.next_check_ms).min(self.next_return_ms),
                _ => {}
            }
        }
        t
    }
}
