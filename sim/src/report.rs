//! What a run measured, as a terminal table and as JSON; and what a failed run prints.

use crate::net::NetStats;
use serde::Serialize;
use std::fmt::Write as _;

/// Percentiles of a latency sample, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Latencies {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Latencies {
    /// Percentiles of `samples` (nearest rank).
    pub fn from_samples(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v = samples.to_vec();
        v.sort_unstable();
        let pct = |p: usize| {
            v[((v.len() * p).div_ceil(100))
                .saturating_sub(1)
                .min(v.len() - 1)]
        };
        Self {
            count: v.len() as u64,
            p50: pct(50),
            p90: pct(90),
            p99: pct(99),
            max: v[v.len() - 1],
        }
    }
}

/// Per item figures.
#[derive(Clone, Debug, Serialize)]
pub struct SkuReport {
    /// Item.
    pub sku: String,
    /// Opening stock.
    pub opening: u64,
    /// Delivered mid-event.
    pub restocked: u64,
    /// Written off by shrink adjustments.
    pub shrunk: u64,
    /// Units sold (acknowledged to customers).
    pub sold: u64,
    /// Ground-truth units left at the end (negative: oversold).
    pub left: i64,
    /// Units refused while the stand still had them.
    pub lost_units: u64,
    /// Units left at the end that a refused customer had wanted: min(left, lost).
    pub stranded: u64,
    /// Units oversold, as the pool sees it after convergence.
    pub oversell: u64,
}

/// One sample of stock for the plots.
#[derive(Clone, Debug, Serialize)]
pub struct StockSample {
    /// Virtual time.
    pub t_ms: u64,
    /// Σ own rights of each terminal, in its own view (0 while down).
    pub terminal_rights: Vec<i64>,
    /// Σ rights the pool holds.
    pub pool_rights: i64,
    /// Σ available in the pool's view.
    pub pool_available: i64,
    /// Σ ground truth.
    pub truth: i64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Seed.
    pub seed: u64,
    /// Scenario.
    pub scenario: String,
    /// `policy/allocation` or `baseline`.
    pub config: String,
    /// Terminals.
    pub terminals: usize,
    /// Game length.
    pub game_minutes: u64,
    /// Simulation steps.
    pub steps: u64,
    /// Customers who walked up.
    pub customers: u64,
    /// Sales committed.
    pub sales: u64,
    /// Units sold.
    pub units_sold: u64,
    /// Sales made while the pool was unreachable (as recorded at the pool).
    pub offline_sales_at_pool: u64,
    /// Customers refused.
    pub refused: u64,
    /// Customers refused while the stand still had what they wanted.
    pub lost_sales: u64,
    /// Units those customers wanted.
    pub lost_units: u64,
    /// Units left at the end that refused customers had wanted.
    pub stranded_units: u64,
    /// Units oversold (pool view, after convergence).
    pub oversell_units: u64,
    /// Refunds owed: one per oversold unit.
    pub refunds_owed: u64,
    /// Their value.
    pub refunds_owed_cents: u64,
    /// Σ overdraft granted to offline sales (optimistic).
    pub overdraft_granted_units: u64,
    /// Acknowledged sales the pool never received (a lost terminal's unsynced sales).
    pub sales_never_at_pool: u64,
    /// Sale committed at its terminal → accepted at the pool.
    pub propagation_ms: Latencies,
    /// Final heal → every live replica holds the same changes.
    pub convergence_ms: Option<u64>,
    /// Rights requests sent.
    pub rights_requests: u64,
    /// Rights requests answered with units.
    pub rights_answers_granted: u64,
    /// Give changes written (top-ups, returns, answers).
    pub gives: u64,
    /// Sales that waited for rights before their outcome.
    pub held_sales: u64,
    /// How long those customers waited.
    pub sale_wait_ms: Latencies,
    /// Units delivered by admin restocks.
    pub restocked_units: u64,
    /// Units taken back from lost terminals.
    pub reclaimed_units: u64,
    /// Units written off by shrink adjustments at the pool.
    pub shrunk_units: u64,
    /// Replacement terminals enrolled for lost ones.
    pub replacement_terminals: u64,
    /// Sales committed by replacement terminals.
    pub replacement_sales: u64,
    /// Sales voided when their customer came back for a refund.
    pub voids: u64,
    /// Forged changes of the rogue terminal rejected by honest replicas (one per replica).
    pub rogue_rejections: u64,
    /// Received changes a replica passed on because their author was not linked to it.
    pub relayed_changes: u64,
    /// Largest offset of a terminal's clock from true time.
    pub clock_skew_max_ms: u64,
    /// Terminal crashes.
    pub crashes: u64,
    /// Restarts from durable state.
    pub restarts: u64,
    /// Terminals lost for good.
    pub deaths: u64,
    /// Frames that failed to decode.
    pub decode_errors: u64,
    /// Received changes a ledger rejected.
    pub rejected_changes: u64,
    /// Network counters.
    pub net: NetStats,
    /// Per item.
    pub per_sku: Vec<SkuReport>,
    /// Stock over time (for plots).
    pub samples: Vec<StockSample>,
    /// Every propagation latency, sorted (for the CDF).
    pub latencies_ms: Vec<u64>,
    /// Virtual time of every customer refused while the stand still had what they wanted.
    pub lost_sale_times_ms: Vec<u64>,
    /// Every wait of a sale that waited for rights (committed or refused), in order.
    pub sale_waits_ms: Vec<u64>,
}

impl Report {
    /// The report as pretty JSON (deterministic: no wall-clock figures).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<36} {v:>14}");
        };
        let _ = writeln!(
            s,
            "halftime-sim  scenario={}  config={}  seed={}  terminals={}  game={} min",
            self.scenario, self.config, self.seed, self.terminals, self.game_minutes
        );
        let _ = writeln!(s, "  {:-<51}", "");
        row(&mut s, "customers", self.customers.to_string());
        row(
            &mut s,
            "sales / units sold",
            format!("{} / {}", self.sales, self.units_sold),
        );
        row(
            &mut s,
            "offline sales (at pool)",
            self.offline_sales_at_pool.to_string(),
        );
        row(&mut s, "refused customers", self.refused.to_string());
        row(
            &mut s,
            "lost sales (refused, stock left)",
            format!("{} ({} u)", self.lost_sales, self.lost_units),
        );
        row(
            &mut s,
            "stranded stock at end (units)",
            self.stranded_units.to_string(),
        );
        row(&mut s, "oversell (units)", self.oversell_units.to_string());
        row(
            &mut s,
            "refunds owed",
            format!(
                "{} (${:.2})",
                self.refunds_owed,
                self.refunds_owed_cents as f64 / 100.0
            ),
        );
        row(
            &mut s,
            "overdraft granted (units)",
            self.overdraft_granted_units.to_string(),
        );
        row(
            &mut s,
            "sales never at pool (lost terminal)",
            self.sales_never_at_pool.to_string(),
        );
        let p = &self.propagation_ms;
        row(
            &mut s,
            "propagation to pool p50 / p99 (ms)",
            format!("{} / {}", p.p50, p.p99),
        );
        row(&mut s, "propagation to pool max (ms)", p.max.to_string());
        row(
            &mut s,
            "convergence after final heal (ms)",
            self.convergence_ms.map_or("-".into(), |c| c.to_string()),
        );
        row(
            &mut s,
            "rights requests / granted",
            format!("{} / {}", self.rights_requests, self.rights_answers_granted),
        );
        row(&mut s, "gives", self.gives.to_string());
        row(
            &mut s,
            "sales that waited for rights",
            format!(
                "{} (wait p50 {} ms, p99 {} ms, max {} ms)",
                self.held_sales,
                self.sale_wait_ms.p50,
                self.sale_wait_ms.p99,
                self.sale_wait_ms.max
            ),
        );
        row(
            &mut s,
            "restocked / reclaimed units",
            format!("{} / {}", self.restocked_units, self.reclaimed_units),
        );
        row(&mut s, "shrink (units)", self.shrunk_units.to_string());
        row(
            &mut s,
            "crashes / restarts / deaths",
            format!("{} / {} / {}", self.crashes, self.restarts, self.deaths),
        );
        row(
            &mut s,
            "replacement terminals (their sales)",
            format!(
                "{} ({})",
                self.replacement_terminals, self.replacement_sales
            ),
        );
        row(
            &mut s,
            "voids (refunds at the till)",
            self.voids.to_string(),
        );
        if self.rogue_rejections > 0 {
            row(
                &mut s,
                "rogue's forged changes rejected",
                self.rogue_rejections.to_string(),
            );
        }
        row(
            &mut s,
            "largest clock skew (ms)",
            self.clock_skew_max_ms.to_string(),
        );
        row(
            &mut s,
            "changes relayed (author not linked)",
            self.relayed_changes.to_string(),
        );
        row(&mut s, "messages sent", self.net.messages_sent.to_string());
        row(
            &mut s,
            "bytes sent",
            format!("{:.1} KB", self.net.bytes_sent as f64 / 1024.0),
        );
        row(
            &mut s,
            "lost / duplicated / dropped (link down)",
            format!(
                "{} / {} / {}",
                self.net.messages_lost,
                self.net.messages_duplicated,
                self.net.messages_dropped_link_down
            ),
        );
        row(
            &mut s,
            "rejected changes / decode errors",
            format!("{} / {}", self.rejected_changes, self.decode_errors),
        );
        row(&mut s, "simulation steps", self.steps.to_string());
        let _ = writeln!(
            s,
            "\n  {:<8} {:>7} {:>9} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8}",
            "sku", "opening", "restocked", "shrunk", "sold", "left", "lost", "stranded", "oversell"
        );
        for k in &self.per_sku {
            let _ = writeln!(
                s,
                "  {:<8} {:>7} {:>9} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8}",
                k.sku,
                k.opening,
                k.restocked,
                k.shrunk,
                k.sold,
                k.left,
                k.lost_units,
                k.stranded,
                k.oversell
            );
        }
        s
    }
}

/// A violated invariant, with what it takes to replay it.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// Seed.
    pub seed: u64,
    /// Scenario.
    pub scenario: String,
    /// `policy/allocation` or `baseline`.
    pub config: String,
    /// Step at which the check failed.
    pub step: u64,
    /// Virtual time of that step.
    pub time_ms: u64,
    /// Which invariant.
    pub invariant: String,
    /// The figures.
    pub detail: String,
    /// The command that replays the run.
    pub replay: String,
    /// Step-by-step trace (replay only).
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "INVARIANT VIOLATED: {} — seed {} scenario {} config {} at step {} (t={} ms)",
            self.invariant, self.seed, self.scenario, self.config, self.step, self.time_ms
        )?;
        writeln!(f, "  {}", self.detail)?;
        write!(f, "  replay: {}", self.replay)
    }
}
