//! Allocation planners: where selling rights should sit ahead of a disconnect.
//!
//! `proportional` aims each terminal at 1/N of what the stand has left, less a small reserve
//! the pool keeps to answer requests; `velocity` weights the share by each terminal's recent
//! sales rate, so rights sit where the queue is. The planner
//! proposes gives: pool → terminal top-ups (executed by the pool) and terminal → pool returns
//! of surplus a terminal cannot use (executed by that terminal).

use crate::error::OpError;
use crate::ids::{ReplicaId, Role, Sku};
use crate::ledger::Ledger;
use crate::message::Allocation;
use crate::signed::SignedChange;
use std::collections::BTreeMap;

/// Window over which the velocity planner measures sales rates.
pub const VELOCITY_WINDOW_MS: u64 = 10 * 60 * 1000;
/// A terminal is topped up when its rights fall below this share (percent) of its target.
pub const TOP_UP_BELOW_PCT: i64 = 75;
/// A terminal returns surplus above this multiple (percent) of its target.
pub const RETURN_ABOVE_PCT: i64 = 300;
/// Share (percent) of an item's rights the pool keeps back from allocation, to answer the
/// requests of terminals that run short. Tuned with `halftime-sim compare`: 0. A reserve at the
/// pool is stranded behind the WAN in an outage (2 % and 5 % lost 8 % and 21 % more sales with
/// the WAN down), and with the network up a short terminal is served as well by its peers.
pub const POOL_RESERVE_PCT: i64 = 0;

/// What the pool keeps back when the stand holds `total` rights of an item.
fn reserve(total: i64, pct: i64) -> i64 {
    total.max(0) * pct.clamp(0, 100) / 100
}

fn active_terminals(ledger: &Ledger) -> Vec<ReplicaId> {
    ledger
        .replicas()
        .iter()
        .filter(|(_, i)| i.role == Role::Terminal && i.retired_at_pool_seq.is_none())
        .map(|(r, _)| *r)
        .collect()
}

/// One proposed give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivePlan {
    /// Giver.
    pub from: ReplicaId,
    /// Receiver.
    pub to: ReplicaId,
    /// Item.
    pub sku: Sku,
    /// Units.
    pub units: u64,
}

/// How the stand's rights of any item are shared among its active terminals at one instant:
/// the weights do not depend on the item, so one `Shares` serves every item of a plan.
#[derive(Debug, Clone)]
pub struct Shares {
    terminals: Vec<ReplicaId>,
    /// Replicas whose rights do not count towards the stand's (retired terminals, relays).
    outside: Vec<ReplicaId>,
    weights: Vec<f64>,
    sum: f64,
    reserve_pct: i64,
}

impl Shares {
    /// The shares as `ledger` sees the stand at `now_ms`, the pool keeping [`POOL_RESERVE_PCT`].
    pub fn new(ledger: &Ledger, allocation: Allocation, now_ms: u64) -> Self {
        Self::with_reserve(ledger, allocation, now_ms, POOL_RESERVE_PCT)
    }

    /// [`Shares::new`] with the pool keeping `reserve_pct` percent back.
    pub fn with_reserve(
        ledger: &Ledger,
        allocation: Allocation,
        now_ms: u64,
        reserve_pct: i64,
    ) -> Self {
        let terminals = active_terminals(ledger);
        let weights: Vec<f64> = match allocation {
            Allocation::Proportional => vec![1.0; terminals.len()],
            Allocation::Velocity => {
                let rates: Vec<f64> = terminals
                    .iter()
                    .map(|t| ledger.sales_rate(*t, now_ms, VELOCITY_WINDOW_MS))
                    .collect();
                let mean = rates.iter().sum::<f64>() / rates.len() as f64;
                // A floor keeps an idle terminal able to sell the first customer that walks up.
                rates.iter().map(|r| r + 0.1 * mean + 1e-6).collect()
            }
        };
        let sum = weights.iter().sum();
        let pool = ledger.pool();
        let outside = ledger
            .replicas()
            .keys()
            .filter(|r| **r != pool && terminals.binary_search(r).is_err())
            .copied()
            .collect();
        Self {
            terminals,
            outside,
            weights,
            sum,
            reserve_pct,
        }
    }

    /// Rights of `sku` held by the pool and the active terminals: what every replica holds,
    /// less what the few outside them do.
    fn stand_total(&self, ledger: &Ledger, sku: &Sku) -> i64 {
        self.outside
            .iter()
            .map(|r| ledger.rights(*r, sku).max(0))
            .fold(ledger.positive_rights(sku), i64::saturating_sub)
    }

    fn share(&self, allocated: i64, weight: f64) -> i64 {
        ((allocated as f64) * weight / self.sum).floor() as i64
    }

    /// Target rights of `sku` per active terminal, given the stand's total of it.
    fn targets_of(&self, total: i64) -> impl Iterator<Item = (ReplicaId, i64)> + '_ {
        let allocated = total - reserve(total, self.reserve_pct);
        self.terminals
            .iter()
            .zip(&self.weights)
            .map(move |(t, w)| (*t, self.share(allocated, *w)))
    }

    /// Target rights of `sku` per active terminal.
    pub fn targets(&self, ledger: &Ledger, sku: &Sku) -> BTreeMap<ReplicaId, i64> {
        self.targets_of(self.stand_total(ledger, sku)).collect()
    }

    /// `terminal`'s target rights of `sku` (0 for a replica that is not an active terminal).
    pub fn target(&self, ledger: &Ledger, sku: &Sku, terminal: ReplicaId) -> i64 {
        let Some(i) = self.terminals.iter().position(|t| *t == terminal) else {
            return 0;
        };
        let total = self.stand_total(ledger, sku);
        self.share(total - reserve(total, self.reserve_pct), self.weights[i])
    }
}

/// Target rights per active terminal for `sku`.
pub fn targets(
    ledger: &Ledger,
    allocation: Allocation,
    sku: &Sku,
    now_ms: u64,
) -> BTreeMap<ReplicaId, i64> {
    Shares::new(ledger, allocation, now_ms).targets(ledger, sku)
}

/// [`targets`] with the pool keeping `reserve_pct` percent back.
pub fn targets_with(
    ledger: &Ledger,
    allocation: Allocation,
    sku: &Sku,
    now_ms: u64,
    reserve_pct: i64,
) -> BTreeMap<ReplicaId, i64> {
    Shares::with_reserve(ledger, allocation, now_ms, reserve_pct).targets(ledger, sku)
}

/// Propose gives for every catalog item.
pub fn plan_allocation(ledger: &Ledger, allocation: Allocation, now_ms: u64) -> Vec<GivePlan> {
    plan_allocation_with(ledger, allocation, now_ms, POOL_RESERVE_PCT)
}

/// [`plan_allocation`] with the pool keeping `reserve_pct` percent back.
pub fn plan_allocation_with(
    ledger: &Ledger,
    allocation: Allocation,
    now_ms: u64,
    reserve_pct: i64,
) -> Vec<GivePlan> {
    let pool = ledger.pool();
    let shares = Shares::with_reserve(ledger, allocation, now_ms, reserve_pct);
    let mut plans = Vec::new();
    if shares.terminals.is_empty() {
        return plans;
    }
    for sku in ledger.catalog().keys() {
        let total = shares.stand_total(ledger, sku);
        let mut pool_left = (ledger.rights(pool, sku) - reserve(total, reserve_pct)).max(0);
        for (t, target) in shares.targets_of(total) {
            let have = ledger.rights(t, sku);
            if have * 100 < target * TOP_UP_BELOW_PCT && pool_left > 0 {
                let units = (target - have).min(pool_left);
                if units > 0 {
                    pool_left -= units;
                    plans.push(GivePlan {
                        from: pool,
                        to: t,
                        sku: sku.clone(),
                        units: units as u64,
                    });
                }
            } else if let Some(units) = surplus(have, target) {
                plans.push(GivePlan {
                    from: t,
                    to: pool,
                    sku: sku.clone(),
                    units,
                });
            }
        }
    }
    plans
}

/// What a terminal holding `have` against a target of `target` returns to the pool, if any.
/// (Never a terminal that [`plan_allocation`] would top up: that one holds under its target.)
fn surplus(have: i64, target: i64) -> Option<u64> {
    (have * 100 > target.max(1) * RETURN_ABOVE_PCT).then(|| (have - target) as u64)
}

/// The returns `terminal` makes under [`plan_allocation`], found without planning every other
/// terminal's gives: each terminal of a large stand looks for its surplus every few seconds.
pub fn plan_returns(
    ledger: &Ledger,
    allocation: Allocation,
    now_ms: u64,
    terminal: ReplicaId,
) -> Vec<GivePlan> {
    let shares = Shares::new(ledger, allocation, now_ms);
    if !shares.terminals.contains(&terminal) {
        return Vec::new();
    }
    let pool = ledger.pool();
    let mut plans = Vec::new();
    for sku in ledger.catalog().keys() {
        let target = shares.target(ledger, sku, terminal);
        if let Some(units) = surplus(ledger.rights(terminal, sku), target) {
            plans.push(GivePlan {
                from: terminal,
                to: pool,
                sku: sku.clone(),
                units,
            });
        }
    }
    plans
}

impl Ledger {
    /// Execute the plans this replica is the giver of; one give change per recipient.
    pub fn execute_plans(
        &mut self,
        plans: &[GivePlan],
        now_ms: u64,
    ) -> Vec<Result<SignedChange, OpError>> {
        let mut by_to: BTreeMap<ReplicaId, BTreeMap<Sku, u64>> = BTreeMap::new();
        for p in plans.iter().filter(|p| p.from == self.me()) {
            *by_to
                .entry(p.to)
                .or_default()
                .entry(p.sku.clone())
                .or_insert(0) += p.units;
        }
        by_to
            .into_iter()
            .map(|(to, units)| self.give(to, units, now_ms))
            .collect()
    }
}
