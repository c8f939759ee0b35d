//! The reconciler's loop: decide what is owed, lease what is due, pay it back, record it.

use crate::db::{Db, Decided, Outcome};
use crate::pay::Payer;
use rand::Rng as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, watch};

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// This reconciler's name in leases and logs.
    pub id: String,
    /// Pause between passes when nothing was due.
    pub tick: Duration,
    /// How long a lease lasts: longer than a Stripe call may take.
    pub lease: Duration,
    /// Outbox rows leased per pass.
    pub batch: i64,
    /// Attempts before a refund goes to `dead`.
    pub max_attempts: i64,
    /// First retry delay; it doubles per attempt up to `backoff_max`, ±50 % jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// Latency buckets of the Stripe calls, in seconds.
pub const LATENCY_BUCKETS: [f64; 8] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// The reconciler's own figures.
#[derive(Debug, Default)]
pub struct Metrics {
    pub decisions: AtomicU64,
    pub refunded: AtomicU64,
    pub retries: AtomicU64,
    pub dead: AtomicU64,
    pub stripe_calls: AtomicU64,
    pub stripe_us_sum: AtomicU64,
    pub stripe_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    pub db_errors: AtomicU64,
}

impl Metrics {
    fn observe_stripe(&self, d: Duration) {
        self.stripe_calls.fetch_add(1, Ordering::Relaxed);
        self.stripe_us_sum
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if d.as_secs_f64() <= *b {
                self.stripe_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Prometheus text; `by_status`: outbox rows per status.
    pub fn text(&self, by_status: &[(String, i64)]) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP halftime_reconciler_{name} {help}\n# TYPE halftime_reconciler_{name} counter\nhalftime_reconciler_{name} {v}\n"
            ));
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "decisions_total",
            "Refund decisions written by this reconciler.",
            get(&self.decisions),
        );
        counter(
            "refunds_done_total",
            "Refunds Stripe confirmed to this reconciler.",
            get(&self.refunded),
        );
        counter(
            "retries_total",
            "Stripe attempts that will be tried again.",
            get(&self.retries),
        );
        counter(
            "dead_letters_total",
            "Refunds this reconciler gave up on, with the reason stored.",
            get(&self.dead),
        );
        counter(
            "database_errors_total",
            "Passes that failed on the database.",
            get(&self.db_errors),
        );
        out.push_str("# HELP halftime_reconciler_stripe_seconds Time of each Stripe refund call.\n# TYPE halftime_reconciler_stripe_seconds histogram\n");
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "halftime_reconciler_stripe_seconds_bucket{{le=\"{b}\"}} {}\n",
                get(&self.stripe_buckets[i])
            ));
        }
        let calls = get(&self.stripe_calls);
        out.push_str(&format!(
            "halftime_reconciler_stripe_seconds_bucket{{le=\"+Inf\"}} {calls}\nhalftime_reconciler_stripe_seconds_sum {}\nhalftime_reconciler_stripe_seconds_count {calls}\n",
            get(&self.stripe_us_sum) as f64 / 1e6
        ));
        out.push_str("# HELP halftime_refunds Refunds in the store by status.\n# TYPE halftime_refunds gauge\n");
        for (status, n) in by_status {
            out.push_str(&format!("halftime_refunds{{status=\"{status}\"}} {n}\n"));
        }
        out
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(cfg: &Config, attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let base = cfg.backoff_base.as_millis() as u64;
    let d = base
        .saturating_mul(1u64 << doublings)
        .min(cfg.backoff_max.as_millis() as u64);
    let jitter = rand::rng().random_range(0.5..1.5);
    Duration::from_millis((d as f64 * jitter) as u64)
}

/// Run passes until `stop` turns true; the pass under way is finished first. A pass follows
/// each `wake` (a commit at the relay) at once, and every `cfg.tick` otherwise.
pub async fn run(
    db: Db,
    payer: Payer,
    cfg: Config,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let busy = pass(&db, &payer, &cfg, &metrics).await;
        if !busy {
            tokio::select! {
                _ = tokio::time::sleep(cfg.tick) => {}
                _ = wake.notified() => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// On Postgres: wake the loop whenever the relay commits new changes (its `NOTIFY` on
/// `halftime_changes`), so an oversell is decided as soon as it is stored. Reconnects with a
/// pause when the connection drops; the loop's own tick covers the gap.
pub async fn listen_changes(url: String, wake: Arc<Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut l) => {
                if let Err(e) = l.listen(halftime_relay::store::CHANGES_CHANNEL).await {
                    tracing::warn!(error = %e, "cannot listen for the relay's commits");
                } else {
                    loop {
                        match l.recv().await {
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "lost the relay's commit notifications; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for the relay's commits"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One pass; whether there was anything to pay.
pub async fn pass(db: &Db, payer: &Payer, cfg: &Config, metrics: &Metrics) -> bool {
    let now = now_ms();
    match db.decide(now).await {
        Ok(decided) => {
            for d in &decided {
                log_decision(d);
            }
            metrics
                .decisions
                .fetch_add(decided.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            metrics.db_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "could not decide refunds; trying again");
            return false;
        }
    }
    let lease_until = now.saturating_add(cfg.lease.as_millis() as i64);
    let jobs = match db.lease(&cfg.id, now, lease_until, cfg.batch).await {
        Ok(j) => j,
        Err(e) => {
            metrics.db_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "could not lease refunds; trying again");
            return false;
        }
    };
    if jobs.is_empty() {
        return false;
    }
    let results = futures::future::join_all(jobs.iter().map(|j| payer.refund(j))).await;
    for (job, (outcome, took)) in jobs.iter().zip(results) {
        metrics.observe_stripe(took);
        let next = now_ms().saturating_add(backoff(cfg, job.attempts).as_millis() as i64);
        match db
            .finish(job, &cfg.id, &outcome, next, cfg.max_attempts, now_ms())
            .await
        {
            Ok(Some(status)) => {
                match status {
                    "done" => metrics.refunded.fetch_add(1, Ordering::Relaxed),
                    "dead" => metrics.dead.fetch_add(1, Ordering::Relaxed),
                    _ => metrics.retries.fetch_add(1, Ordering::Relaxed),
                };
                log_outcome(job, &outcome, status, took);
            }
            Ok(None) => tracing::info!(
                refund = job.id,
                "the refund had moved on before this attempt was recorded (another reconciler finished it)"
            ),
            Err(e) => {
                // The lease runs out and the refund is tried again under the same key:
                // Stripe answers with the refund it already made.
                metrics.db_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(refund = job.id, error = %e, "could not record a Stripe answer; it is asked again after the lease");
            }
        }
    }
    true
}

fn log_decision(d: &Decided) {
    tracing::info!(
        refund = d.id,
        stand = %d.stand,
        sale = %d.sale_id,
        sku = %d.sku,
        units = d.units,
        amount_cents = d.amount_cents,
        status = d.status,
        "refund decided"
    );
}

fn log_outcome(job: &crate::db::Job, outcome: &Outcome, status: &str, took: Duration) {
    let ms = took.as_millis() as u64;
    match outcome {
        Outcome::Done { refund } => {
            tracing::info!(refund = job.id, stripe_refund = %refund, sale = %job.sale_id, ms, "refunded")
        }
        Outcome::Retry { why } => {
            tracing::warn!(refund = job.id, attempts = job.attempts, %why, status, ms, "Stripe attempt failed")
        }
        Outcome::Refused { why } => {
            tracing::warn!(refund = job.id, %why, "Stripe refused the refund; it is a dead letter")
        }
    }
}
