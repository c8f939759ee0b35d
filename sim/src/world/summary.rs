//! What a run measured: stock samples for the plots and the report.

use super::*;

impl World {
    /// Take a stock sample when one is due; true when it did.
    pub(super) fn sample(&mut self) -> bool {
        if self.now < self.next_sample || self.now > self.game_ms {
            return false;
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
        true
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
            voids: c.voids,
            rogue_rejections: c.rogue_rejections,
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

pub(super) fn add_stats(sum: &mut EngineStats, s: &EngineStats) {
    sum.rights_requests_sent += s.rights_requests_sent;
    sum.gives_answered += s.gives_answered;
    sum.gives_planned += s.gives_planned;
    sum.changes_relayed += s.changes_relayed;
    sum.sales_held += s.sales_held;
}
