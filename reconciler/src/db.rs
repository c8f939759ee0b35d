//! The reconciler's reads and writes in the relay's store of record: it decides refunds from
//! the `items` and `sales` projections and works the `refund_outbox`.
//!
//! Several reconcilers may run on one database. Deciding for one item of one stand takes a
//! transaction-scoped advisory lock on Postgres (SQLite has one writer at a time anyway), and
//! the unique `(stand, sale_id, sku)` of `refund_decisions` refuses any second decision for a
//! line whatever happens. Outbox rows are leased (`lease_until`): on Postgres the lease is
//! taken with `FOR UPDATE SKIP LOCKED`, on SQLite by the single writer; a reconciler that dies
//! holding a lease loses it when it expires, and the next one retries with the same Stripe
//! idempotency key.

use crate::decide::{self, Line};
use halftime_relay::store::{Backend, Store, StoreError};
use sqlx::{AnyPool, Row};

/// Sale rows read per page while choosing lines.
const PAGE: i64 = 200;

/// A refund decided in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub id: i64,
    pub stand: String,
    pub sale_id: String,
    pub sku: String,
    pub units: u64,
    pub amount_cents: u64,
    pub status: &'static str,
}

/// An outbox row leased to this reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub stand: String,
    pub sale_id: String,
    pub sku: String,
    pub amount_cents: i64,
    pub reference: String,
    pub attempts: i64,
}

impl Job {
    pub fn idempotency_key(&self) -> String {
        decide::idempotency_key(&self.stand, &self.sale_id, &self.sku)
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stripe made (or had already made) the refund.
    Done { refund: String },
    /// Worth another try later (Stripe down, slow, or unreachable).
    Retry { why: String },
    /// Stripe refused it for good (no such payment, more than was charged, …).
    Refused { why: String },
}

#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connect to the relay's database, bringing its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = Store::open(url).await?;
        Ok(Self {
            pool: store.pool().clone(),
            backend: store.backend(),
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Decide refunds for every item of every stand that is below zero.
    pub async fn decide(&self, now_ms: i64) -> Result<Vec<Decided>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT stand, sku FROM items WHERE available < 0 ORDER BY stand, sku")
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::new();
        for r in rows {
            let stand: String = r.try_get(0)?;
            let sku: String = r.try_get(1)?;
            out.extend(self.decide_item(&stand, &sku, now_ms).await?);
        }
        Ok(out)
    }

    async fn decide_item(
        &self,
        stand: &str,
        sku: &str,
        now_ms: i64,
    ) -> Result<Vec<Decided>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("halftime-refunds:{stand}:{sku}"))
                .execute(&mut *tx)
                .await?;
        }
        let available: i64 =
            sqlx::query("SELECT available FROM items WHERE stand = $1 AND sku = $2")
                .bind(stand)
                .bind(sku)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?
                .unwrap_or(0);
        let decided: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) FROM refund_decisions \
             WHERE stand = $1 AND sku = $2",
        )
        .bind(stand)
        .bind(sku)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        let deficit = available.checked_neg().unwrap_or(i64::MAX).max(0);
        let owed = u64::try_from(deficit.saturating_sub(decided)).unwrap_or(0);
        if owed == 0 {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let lines = self.lines(&mut tx, stand, sku, owed).await?;
        let mut out = Vec::new();
        for c in decide::choose(owed, lines) {
            let units = i64::try_from(c.units).unwrap_or(i64::MAX);
            let amount = i64::try_from(c.amount_cents()).unwrap_or(i64::MAX);
            let row = sqlx::query(
                "INSERT INTO refund_decisions (stand, sale_id, sku, units, amount_cents, method, \
                 reference, available, decided_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (stand, sale_id, sku) DO NOTHING RETURNING id",
            )
            .bind(stand)
            .bind(&c.line.sale_id)
            .bind(sku)
            .bind(units)
            .bind(amount)
            .bind(&c.line.method)
            .bind(&c.line.reference)
            .bind(available)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let id: i64 = row.try_get(0)?;
            let (status, error) = match c.line.method.as_str() {
                "cash" => ("manual", None),
                _ if c.line.reference.starts_with("pi_") => ("pending", None),
                _ => (
                    "dead",
                    Some(format!(
                        "card sale without a payment intent to refund (reference {:?})",
                        c.line.reference
                    )),
                ),
            };
            sqlx::query(
                "INSERT INTO refund_outbox (decision_id, status, next_attempt_at, last_error, \
                 updated_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(status)
            .bind(now_ms)
            .bind(error)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            out.push(Decided {
                id,
                stand: stand.to_owned(),
                sale_id: c.line.sale_id.clone(),
                sku: sku.to_owned(),
                units: c.units,
                amount_cents: c.amount_cents(),
                status,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The item's sale lines not voided and not decided yet, latest first, until they hold
    /// `owed` units (a page more than needed at most).
    async fn lines(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        stand: &str,
        sku: &str,
        owed: u64,
    ) -> Result<Vec<Line>, sqlx::Error> {
        let mut out: Vec<Line> = Vec::new();
        let mut offset = 0i64;
        let mut units = 0u64;
        loop {
            let rows = sqlx::query(
                "SELECT sale_id, at_ms, lines, method, reference FROM sales \
                 WHERE stand = $1 AND voided = 0 AND lines LIKE $2 AND sale_id NOT IN \
                 (SELECT sale_id FROM refund_decisions WHERE stand = $1 AND sku = $3) \
                 ORDER BY at_ms DESC, sale_id DESC LIMIT $4 OFFSET $5",
            )
            .bind(stand)
            .bind(format!("%\"sku\":\"{sku}\"%"))
            .bind(sku)
            .bind(PAGE)
            .bind(offset)
            .fetch_all(&mut **tx)
            .await?;
            let n = rows.len() as i64;
            for r in rows {
                let sale_id: String = r.try_get(0)?;
                let at_ms: i64 = r.try_get(1)?;
                let lines: String = r.try_get(2)?;
                let method: String = r.try_get(3)?;
                let reference: String = r.try_get(4)?;
                let parsed: Vec<serde_json::Value> =
                    serde_json::from_str(&lines).unwrap_or_default();
                let (mut qty, mut price) = (0u64, 0u64);
                for l in parsed.iter().filter(|l| l["sku"] == sku) {
                    qty = qty.saturating_add(l["qty"].as_u64().unwrap_or(0));
                    price = l["unit_price_cents"].as_u64().unwrap_or(0);
                }
                if qty == 0 {
                    continue;
                }
                units = units.saturating_add(qty);
                out.push(Line {
                    sale_id,
                    at_ms,
                    units: qty,
                    unit_price_cents: price,
                    method,
                    reference,
                });
            }
            if n < PAGE || units >= owed {
                return Ok(out);
            }
            offset += PAGE;
        }
    }

    /// Lease up to `max` due outbox rows to `me` until `lease_until`.
    pub async fn lease(
        &self,
        me: &str,
        now_ms: i64,
        lease_until: i64,
        max: i64,
    ) -> Result<Vec<Job>, sqlx::Error> {
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE refund_outbox SET lease_until = $1, leased_by = $2, attempts = attempts + 1, \
             updated_at = $3 WHERE decision_id IN (SELECT decision_id FROM refund_outbox \
             WHERE status = 'pending' AND next_attempt_at <= $3 AND lease_until <= $3 \
             ORDER BY decision_id LIMIT $4{lock}) RETURNING decision_id"
        );
        let ids: Vec<i64> = sqlx::query(&sql)
            .bind(lease_until)
            .bind(me)
            .bind(now_ms)
            .bind(max)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            let r = sqlx::query(
                "SELECT d.id, d.stand, d.sale_id, d.sku, d.amount_cents, d.reference, o.attempts \
                 FROM refund_decisions d JOIN refund_outbox o ON o.decision_id = d.id \
                 WHERE d.id = $1",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
            jobs.push(Job {
                id: r.try_get(0)?,
                stand: r.try_get(1)?,
                sale_id: r.try_get(2)?,
                sku: r.try_get(3)?,
                amount_cents: r.try_get(4)?,
                reference: r.try_get(5)?,
                attempts: r.try_get(6)?,
            });
        }
        Ok(jobs)
    }

    /// Record how an attempt ended. A retry that used up `max_attempts` goes to `dead`.
    /// Returns the status written (`None`: the row had moved on, e.g. another reconciler
    /// finished it after this one's lease ran out).
    pub async fn finish(
        &self,
        job: &Job,
        me: &str,
        outcome: &Outcome,
        next_attempt_at: i64,
        max_attempts: i64,
        now_ms: i64,
    ) -> Result<Option<&'static str>, sqlx::Error> {
        let (status, refund, error, next) = match outcome {
            Outcome::Done { refund } => ("done", Some(refund.as_str()), None, now_ms),
            Outcome::Retry { why } if job.attempts >= max_attempts => (
                "dead",
                None,
                Some(format!(
                    "gave up after {} attempts; last: {why}",
                    job.attempts
                )),
                now_ms,
            ),
            Outcome::Retry { why } => ("pending", None, Some(why.clone()), next_attempt_at),
            Outcome::Refused { why } => ("dead", None, Some(format!("refused: {why}")), now_ms),
        };
        // A success is recorded whoever holds the lease now; anything else only by the
        // holder, so a late failure never overwrites another's success.
        let r = sqlx::query(
            "UPDATE refund_outbox SET status = $1, stripe_refund = COALESCE($2, stripe_refund), \
             last_error = $3, next_attempt_at = $4, lease_until = 0, updated_at = $5 \
             WHERE decision_id = $6 AND status = 'pending' AND ($1 = 'done' OR leased_by = $7)",
        )
        .bind(status)
        .bind(refund)
        .bind(error)
        .bind(next)
        .bind(now_ms)
        .bind(job.id)
        .bind(me)
        .execute(&self.pool)
        .await?;
        Ok((r.rows_affected() > 0).then_some(status))
    }

    /// Outbox rows per status.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query("SELECT status, CAST(COUNT(*) AS BIGINT) FROM refund_outbox GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}
