//! The store of record, one sqlx code path for Postgres (production) and a SQLite file (the
//! zero-setup default): the append-only `changes` table, the projections the admin API reads,
//! the stands served, the relay's key and the admin tokens. Every accepted change and the
//! projections it moves are written in one transaction; nothing is acknowledged to a replica
//! before that transaction has committed.

use halftime_ledger::{
    ChangeInfo, PublicKey, ReplicaId, ReplicaKey, SaleId, SaleRecord, SignedChange, Sku, StandId,
};
use sha2::Digest as _;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;
use std::time::Duration;

static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per INSERT statement when appending changes (10 values each).
pub const INSERT_CHUNK: usize = 50;
/// Connections to Postgres.
pub const PG_CONNECTIONS: u32 = 8;
/// Postgres connections for writing batches by `COPY` (each stand commits one batch at a time).
pub const COPY_CONNECTIONS: u32 = 4;
/// A connection not had within this is an error (a dead database is reported, not waited on).
pub const ACQUIRE_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    /// Something the relay needs is not there now (a stand that could not be loaded); it
    /// may be on a later call.
    #[error("{0}")]
    Unavailable(String),
    /// This instance no longer holds the stand's pool lease (its lock's connection was lost,
    /// and another instance may have taken it): nothing was written.
    #[error("stand {0}: the pool's lease was lost")]
    LeaseLost(String),
    /// Two different changes with one author and sequence number: never stored.
    #[error("stand {stand}: replica {actor} change {seq} differs from the one stored (a fork)")]
    Fork {
        stand: String,
        actor: ReplicaId,
        seq: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Where a stand's pool signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// At the relay, which holds the pool's key.
    Relay,
    /// On a stand device; the relay is an enrolled replica.
    Device,
}

impl Placement {
    fn as_str(self) -> &'static str {
        match self {
            Placement::Relay => "relay",
            Placement::Device => "device",
        }
    }
}

/// A stand the relay serves.
#[derive(Debug, Clone)]
pub struct StandRow {
    pub stand: StandId,
    pub pool_key: PublicKey,
    pub placement: Placement,
    /// The pool's secret key when the pool is at the relay.
    pub pool_secret: Option<[u8; 32]>,
    /// The stand's private-network key, when the relay made the stand.
    pub psk: Option<String>,
}

/// An accepted change as the store of record keeps it.
#[derive(Debug, Clone)]
pub struct ChangeRow {
    pub actor: ReplicaId,
    pub seq: u64,
    pub info: ChangeInfo,
    pub change: SignedChange,
}

/// A row of `changes` as stored.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub id: i64,
    pub actor: String,
    pub seq: i64,
    pub hash: Vec<u8>,
    pub deps: Vec<u8>,
    pub change: SignedChange,
}

/// An item's line in the stock projection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ItemRow {
    pub sku: Sku,
    pub name: String,
    pub price_cents: i64,
    pub total_in: i64,
    pub available: i64,
    pub marked_off: bool,
}

/// What one turn of a stand writes, in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub changes: Vec<ChangeRow>,
    pub items: Vec<ItemRow>,
    /// Rights per (sku, replica).
    pub rights: Vec<(Sku, ReplicaId, i64)>,
    pub sales: Vec<SaleRecord>,
    pub voids: Vec<SaleId>,
    /// Rejected changes per (signing replica or "unknown", rule).
    pub rejections: BTreeMap<(String, &'static str), u64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.items.is_empty()
            && self.rights.is_empty()
            && self.sales.is_empty()
            && self.voids.is_empty()
            && self.rejections.is_empty()
    }
}

/// An admin's role, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    Viewer,
    Manager,
    Admin,
}

impl AdminRole {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "manager" => Some(Self::Manager),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Manager => "manager",
            Self::Admin => "admin",
        }
    }
}

/// A sale as the projection holds it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SaleRow {
    pub sale_id: String,
    pub replica: String,
    pub at_ms: i64,
    /// The sale's lines: sku, units, price.
    #[schema(value_type = Object)]
    pub lines: serde_json::Value,
    pub units: i64,
    pub total_cents: i64,
    pub method: String,
    pub offline: bool,
    pub voided: bool,
}

/// An admin operation queued for a stand device's pool, and what became of it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AdminRequestRow {
    pub id: i64,
    pub kind: String,
    /// The operation as asked.
    #[schema(value_type = Object)]
    pub op: serde_json::Value,
    /// `queued`, `done` or `refused`.
    pub status: String,
    /// The pool's change that made it.
    pub pool_seq: Option<i64>,
    /// Why it was refused.
    pub detail: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A refund decided by the reconciler, with where its payment stands.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RefundRow {
    pub id: i64,
    pub sale_id: String,
    pub sku: String,
    pub units: i64,
    pub amount_cents: i64,
    pub method: String,
    /// `pending`, `done`, `dead`, `manual` (cash, to pay out by hand) or `paid_out`.
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub stripe_refund: Option<String>,
    pub paid_out_by: Option<String>,
    /// The item's `available` when it was decided.
    pub available_then: i64,
    pub decided_at: i64,
    pub updated_at: i64,
    /// Voided since (recorded beside the decision, which stands).
    pub sale_voided: bool,
}

/// What marking a refund paid out found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaidOut {
    Marked,
    /// No refund with that id at that stand.
    Unknown,
    /// Not a cash refund waiting to be paid out; its status.
    NotManual(String),
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Postgres: connections of the native driver, for writing a batch's rows by `COPY`.
    copy: Option<sqlx::PgPool>,
    backend: Backend,
    url: String,
    reader: crate::held::Reader,
}

/// What proves a lease still held, checked inside each commit: the advisory lock's key and
/// the server process of the connection holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    key: i64,
    pid: i32,
}

/// Who may sign as a stand's pool.
#[derive(Debug)]
pub enum Lease {
    /// The only instance (a SQLite file).
    Single,
    /// This instance, for as long as the connection holding the lock lives.
    Held {
        conn: sqlx::AnyConnection,
        fence: Fence,
    },
    /// Another instance holds it.
    Elsewhere,
}

impl Lease {
    /// What a commit checks to be sure this lease is still held (none on a SQLite file).
    pub fn fence(&self) -> Option<Fence> {
        match self {
            Lease::Held { fence, .. } => Some(*fence),
            _ => None,
        }
    }
}

/// The Postgres channel on which a commit of new changes names its stand.
pub const CHANGES_CHANNEL: &str = "halftime_changes";

fn hash_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn stand_row(row: &sqlx::any::AnyRow) -> Result<StandRow, StoreError> {
    let stand: String = row.try_get(0)?;
    let pool_key: String = row.try_get(1)?;
    let placement: String = row.try_get(2)?;
    let secret: Option<Vec<u8>> = row.try_get(3)?;
    let psk: Option<String> = row.try_get(4)?;
    let bad = |what: &str| StoreError::Invalid(format!("stand {stand}: bad {what}"));
    Ok(StandRow {
        stand: StandId::new(&stand).map_err(|_| bad("id"))?,
        pool_key: pool_key.parse().map_err(|_| bad("pool key"))?,
        placement: match placement.as_str() {
            "relay" => Placement::Relay,
            "device" => Placement::Device,
            _ => return Err(bad("placement")),
        },
        pool_secret: match secret {
            None => None,
            Some(v) => Some(v.try_into().map_err(|_| bad("pool secret"))?),
        },
        psk,
    })
}

fn i64_of(n: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Invalid(format!("{what} {n} out of range")))
}

impl Store {
    /// Connect (creating a SQLite file when missing) and bring the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        let (backend, url) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            let sep = if rest.contains('?') { '&' } else { '?' };
            let url = if rest.contains("mode=") {
                url.to_owned()
            } else {
                format!("{url}{sep}mode=rwc")
            };
            (Backend::Sqlite, url)
        } else {
            return Err(StoreError::Invalid(format!(
                "database URL {url:?}: expected postgres://… or sqlite:PATH"
            )));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Postgres => PG_CONNECTIONS,
                // One writer at a time is all SQLite does; a second connection only waits.
                Backend::Sqlite => 1,
            })
            .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
            .connect(&url)
            .await?;
        match backend {
            Backend::Postgres => POSTGRES.run(&pool).await?,
            Backend::Sqlite => SQLITE.run(&pool).await?,
        }
        let reader = crate::held::Reader::new(&url);
        let copy = match backend {
            Backend::Postgres => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(COPY_CONNECTIONS)
                    .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
                    .connect_lazy(&url)?,
            ),
            Backend::Sqlite => None,
        };
        Ok(Self {
            pool,
            copy,
            backend,
            url,
            reader,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection pool, for programs that share this store of record (the reconciler).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Per author, the highest sequence number stored for a stand.
    pub async fn actor_heads(
        &self,
        stand: &StandId,
    ) -> Result<BTreeMap<ReplicaId, u64>, StoreError> {
        let rows =
            sqlx::query("SELECT actor, MAX(seq) FROM changes WHERE stand = $1 GROUP BY actor")
                .bind(stand.as_str())
                .fetch_all(&self.pool)
                .await?;
        let mut out = BTreeMap::new();
        for r in rows {
            let actor: String = r.try_get(0)?;
            let seq: i64 = r.try_get(1)?;
            let actor = actor
                .parse()
                .map_err(|_| StoreError::Invalid(format!("stored actor {actor:?}")))?;
            out.insert(actor, u64::try_from(seq).unwrap_or(0));
        }
        Ok(out)
    }

    /// An author's stored changes after `after`, in sequence order, at most `limit`.
    pub async fn changes_of(
        &self,
        stand: &StandId,
        actor: ReplicaId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<SignedChange>, StoreError> {
        let rows = sqlx::query(
            "SELECT bytes, signature FROM changes WHERE stand = $1 AND actor = $2 AND seq > $3 \
             ORDER BY seq LIMIT $4",
        )
        .bind(stand.as_str())
        .bind(actor.to_string())
        .bind(i64_of(after, "seq")?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(SignedChange {
                    bytes: r.try_get(0)?,
                    signature: r.try_get(1)?,
                })
            })
            .collect()
    }

    /// Take the lease on a stand's pool: on Postgres a session advisory lock, held by a
    /// connection of its own for as long as the returned lease lives (and released by Postgres
    /// when this process dies); on a SQLite file there is one instance and the lease is its.
    pub async fn try_lease(&self, stand: &StandId) -> Result<Lease, StoreError> {
        self.try_lease_named(&format!("halftime pool {stand}"))
            .await
    }

    /// Take the lease on writing a device stand's refunds into its document as the relay.
    /// Every instance shares the relay's key, and two writers of one key fork its history.
    pub async fn try_refund_lease(&self, stand: &StandId) -> Result<Lease, StoreError> {
        self.try_lease_named(&format!("halftime refunds {stand}"))
            .await
    }

    async fn try_lease_named(&self, name: &str) -> Result<Lease, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(Lease::Single);
        }
        use sqlx::Connection as _;
        let mut c = sqlx::AnyConnection::connect(&self.url).await?;
        let digest = sha2::Sha256::digest(name.as_bytes());
        let mut k = [0u8; 8];
        k.copy_from_slice(&digest[..8]);
        let key = i64::from_be_bytes(k);
        let row = sqlx::query("SELECT pg_try_advisory_lock($1), pg_backend_pid()")
            .bind(key)
            .fetch_one(&mut c)
            .await?;
        let (got, pid): (bool, i32) = (row.try_get(0)?, row.try_get(1)?);
        Ok(if got {
            Lease::Held {
                conn: c,
                fence: Fence { key, pid },
            }
        } else {
            Lease::Elsewhere
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The relay's own key, made on first use and shared by every instance on this database.
    pub async fn relay_key(&self) -> Result<ReplicaKey, StoreError> {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('relay_key', $1) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(seed.to_vec())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = 'relay_key'")
            .fetch_one(&self.pool)
            .await?;
        let v: Vec<u8> = row.try_get(0)?;
        let seed: [u8; 32] = v
            .try_into()
            .map_err(|_| StoreError::Invalid("stored relay key is not 32 bytes".into()))?;
        Ok(ReplicaKey::from_seed(seed))
    }

    /// Serve a stand from now on (idempotent for the same pool key).
    pub async fn add_stand(&self, s: &StandRow, now_ms: u64) -> Result<(), StoreError> {
        self.add_stand_with(s, &Batch::default(), now_ms).await
    }

    /// Serve a stand, with the changes that make it (a stand created here), in one transaction.
    pub async fn add_stand_with(
        &self,
        s: &StandRow,
        b: &Batch,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let added = sqlx::query(
            "INSERT INTO stands (stand, pool_key, placement, pool_secret, psk, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (stand) DO NOTHING",
        )
        .bind(s.stand.as_str())
        .bind(s.pool_key.to_string())
        .bind(s.placement.as_str())
        .bind(s.pool_secret.map(|k| k.to_vec()))
        .bind(s.psk.clone())
        .bind(i64_of(now_ms, "time")?)
        .execute(&mut *tx)
        .await?;
        if added.rows_affected() == 1 {
            write_batch(&mut tx, &s.stand, b, now_ms).await?;
        }
        tx.commit().await?;
        let stored = self.stand(&s.stand).await?;
        match stored {
            Some(r) if r.pool_key == s.pool_key => Ok(()),
            Some(r) => Err(StoreError::Invalid(format!(
                "stand {} is already served with pool key {}",
                s.stand, r.pool_key
            ))),
            None => Err(StoreError::Invalid(format!("stand {} not stored", s.stand))),
        }
    }

    pub async fn stand(&self, stand: &StandId) -> Result<Option<StandRow>, StoreError> {
        let row = sqlx::query(
            "SELECT stand, pool_key, placement, pool_secret, psk FROM stands WHERE stand = $1",
        )
        .bind(stand.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| stand_row(&r)).transpose()
    }

    pub async fn stands(&self) -> Result<Vec<StandRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT stand, pool_key, placement, pool_secret, psk FROM stands ORDER BY stand",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stand_row).collect()
    }

    /// The latest snapshot of a stand's replica here, if one was written.
    pub async fn stand_snapshot(&self, stand: &StandId) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT bytes FROM stand_snapshots WHERE stand = $1")
            .bind(stand.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The highest change id of the stand when its snapshot was written (`None` for a
    /// snapshot written before that was recorded).
    pub async fn stand_snapshot_upto(&self, stand: &StandId) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT upto FROM stand_snapshots WHERE stand = $1")
            .bind(stand.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| r.try_get::<Option<i64>, _>(0))
            .transpose()?
            .flatten())
    }

    /// Replace a stand's snapshot, with the highest change id of the stand as it is written.
    pub async fn put_stand_snapshot(
        &self,
        stand: &StandId,
        covers: usize,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO stand_snapshots (stand, covers, bytes, written_at, upto) \
             VALUES ($1, $2, $3, $4, (SELECT COALESCE(MAX(id), 0) FROM changes WHERE stand = $1)) \
             ON CONFLICT (stand) DO UPDATE SET covers = $2, bytes = $3, written_at = $4, \
             upto = (SELECT COALESCE(MAX(id), 0) FROM changes WHERE stand = $1)",
        )
        .bind(stand.as_str())
        .bind(i64_of(covers as u64, "covers")?)
        .bind(bytes)
        .bind(i64_of(now_ms, "time")?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every stored change of a stand, in the order they were accepted (a causal order).
    pub async fn load_changes(&self, stand: &StandId) -> Result<Vec<SignedChange>, StoreError> {
        self.load_changes_after(stand, 0).await
    }

    /// The stored changes of a stand whose id is above `after`, as [`Store::load_changes`].
    pub async fn load_changes_after(
        &self,
        stand: &StandId,
        after: i64,
    ) -> Result<Vec<SignedChange>, StoreError> {
        let rows = sqlx::query(
            "SELECT bytes, signature FROM changes WHERE stand = $1 AND id > $2 ORDER BY id",
        )
        .bind(stand.as_str())
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(SignedChange {
                    bytes: r.try_get(0)?,
                    signature: r.try_get(1)?,
                })
            })
            .collect()
    }

    /// Write one batch in one transaction: all of it, or (on error) none of it.
    pub async fn commit(&self, stand: &StandId, b: &Batch, now_ms: u64) -> Result<(), StoreError> {
        self.commit_fenced(stand, b, now_ms, None).await
    }

    /// [`Store::commit`], only while `fence`'s lease is still held: a stand's pool signed by
    /// an instance that lost its lease (another may hold it now) is never stored.
    pub async fn commit_fenced(
        &self,
        stand: &StandId,
        b: &Batch,
        now_ms: u64,
        fence: Option<Fence>,
    ) -> Result<(), StoreError> {
        if b.is_empty() {
            return Ok(());
        }
        if let Some(pg) = &self.copy {
            if copy_batch(pg, stand, b, now_ms, fence).await? {
                return Ok(());
            }
            // Some row was stored already: INSERT tells a duplicate from a fork.
        }
        self.commit_by_insert(stand, b, now_ms, fence).await
    }

    /// [`Store::commit_fenced`] by batched INSERT … ON CONFLICT alone: a row stored already is
    /// fine when it is the same change, and a fork when it is not.
    pub async fn commit_by_insert(
        &self,
        stand: &StandId,
        b: &Batch,
        now_ms: u64,
        fence: Option<Fence>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(f) = fence {
            let held: i64 = sqlx::query(FENCE_HELD)
                .bind(f.pid)
                .bind(f.key)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if held == 0 {
                return Err(StoreError::LeaseLost(stand.to_string()));
            }
        }
        write_batch(&mut tx, stand, b, now_ms).await?;
        if self.backend == Backend::Postgres && !b.changes.is_empty() {
            // Delivered at commit to every instance listening: they fetch what they lack.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGES_CHANNEL)
                .bind(stand.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Postgres: notify every instance listening on `channel` (nothing on SQLite, which one
    /// instance serves).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every stored change of a stand with what was stored beside it, in order.
    pub async fn load_rows(&self, stand: &StandId) -> Result<Vec<StoredRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, actor, seq, hash, deps, bytes, signature FROM changes \
             WHERE stand = $1 ORDER BY id",
        )
        .bind(stand.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredRow {
                    id: r.try_get(0)?,
                    actor: r.try_get(1)?,
                    seq: r.try_get(2)?,
                    hash: r.try_get(3)?,
                    deps: r.try_get(4)?,
                    change: SignedChange {
                        bytes: r.try_get(5)?,
                        signature: r.try_get(6)?,
                    },
                })
            })
            .collect()
    }

    /// The signed bytes of a stand's stored changes, read by hash, for the stand's ledger.
    pub fn change_bytes(&self, stand: &StandId) -> crate::held::StandBytes {
        self.reader.stand(stand.clone())
    }

    /// Changes stored for a stand.
    pub async fn change_count(&self, stand: &StandId) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM changes WHERE stand = $1")
            .bind(stand.as_str())
            .fetch_one(&self.pool)
            .await?;
        let n: i64 = row.try_get(0)?;
        Ok(n.max(0) as u64)
    }

    /// The stock projection of a stand: items, and rights per replica.
    pub async fn stock(
        &self,
        stand: &StandId,
    ) -> Result<(Vec<ItemRow>, Vec<(String, String, i64)>), StoreError> {
        let rows = sqlx::query(
            "SELECT sku, name, price_cents, total_in, available, marked_off FROM items \
             WHERE stand = $1 ORDER BY sku",
        )
        .bind(stand.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for r in rows {
            let sku: String = r.try_get(0)?;
            items.push(ItemRow {
                sku: Sku::new(&sku)
                    .map_err(|_| StoreError::Invalid(format!("stored sku {sku:?}")))?,
                name: r.try_get(1)?,
                price_cents: r.try_get(2)?,
                total_in: r.try_get(3)?,
                available: r.try_get(4)?,
                marked_off: r.try_get::<i64, _>(5)? != 0,
            });
        }
        let rows = sqlx::query(
            "SELECT sku, replica, units FROM rights WHERE stand = $1 ORDER BY sku, replica",
        )
        .bind(stand.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut rights = Vec::with_capacity(rows.len());
        for r in rows {
            rights.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        Ok((items, rights))
    }

    /// The latest `limit` sales of a stand, newest first.
    pub async fn sales(&self, stand: &StandId, limit: u32) -> Result<Vec<SaleRow>, StoreError> {
        self.sales_before(stand, limit, None).await
    }

    /// [`Store::sales`], only those listed after the row `before` (its `at_ms` and `sale_id`)
    /// in that order: the next page of a listing.
    pub async fn sales_before(
        &self,
        stand: &StandId,
        limit: u32,
        before: Option<(i64, &str)>,
    ) -> Result<Vec<SaleRow>, StoreError> {
        let (at, id) = before.unwrap_or((i64::MAX, ""));
        let rows = sqlx::query(
            "SELECT sale_id, replica, at_ms, lines, units, total_cents, method, offline, voided \
             FROM sales WHERE stand = $1 AND ($2 = 0 OR at_ms < $3 OR (at_ms = $3 AND sale_id < $4)) \
             ORDER BY at_ms DESC, sale_id DESC LIMIT $5",
        )
        .bind(stand.as_str())
        .bind(i64::from(before.is_some()))
        .bind(at)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let lines: String = r.try_get(3)?;
            out.push(SaleRow {
                sale_id: r.try_get(0)?,
                replica: r.try_get(1)?,
                at_ms: r.try_get(2)?,
                lines: serde_json::from_str(&lines).unwrap_or(serde_json::Value::Null),
                units: r.try_get(4)?,
                total_cents: r.try_get(5)?,
                method: r.try_get(6)?,
                offline: r.try_get::<i64, _>(7)? != 0,
                voided: r.try_get::<i64, _>(8)? != 0,
            });
        }
        Ok(out)
    }

    /// A stand's refunds, latest decision first.
    pub async fn refunds(&self, stand: &StandId, limit: u32) -> Result<Vec<RefundRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, d.sale_id, d.sku, d.units, d.amount_cents, d.method, o.status, \
             o.attempts, o.last_error, o.stripe_refund, o.paid_out_by, d.available, d.decided_at, \
             o.updated_at, COALESCE(s.voided, 0) FROM refund_decisions d \
             JOIN refund_outbox o ON o.decision_id = d.id \
             LEFT JOIN sales s ON s.stand = d.stand AND s.sale_id = d.sale_id \
             WHERE d.stand = $1 ORDER BY d.id DESC LIMIT $2",
        )
        .bind(stand.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(RefundRow {
                    id: r.try_get(0)?,
                    sale_id: r.try_get(1)?,
                    sku: r.try_get(2)?,
                    units: r.try_get(3)?,
                    amount_cents: r.try_get(4)?,
                    method: r.try_get(5)?,
                    status: r.try_get(6)?,
                    attempts: r.try_get(7)?,
                    last_error: r.try_get(8)?,
                    stripe_refund: r.try_get(9)?,
                    paid_out_by: r.try_get(10)?,
                    available_then: r.try_get(11)?,
                    decided_at: r.try_get(12)?,
                    updated_at: r.try_get(13)?,
                    sale_voided: r.try_get::<i64, _>(14)? != 0,
                })
            })
            .collect()
    }

    /// Queue an admin operation for a stand device's pool; its id.
    pub async fn queue_admin_request(
        &self,
        stand: &StandId,
        op: &halftime_ledger::AdminOp,
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        let json = serde_json::to_string(op).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "INSERT INTO admin_requests (stand, kind, op, status, created_at, updated_at) \
             VALUES ($1, $2, $3, 'queued', $4, $4) RETURNING id",
        )
        .bind(stand.as_str())
        .bind(op.kind())
        .bind(json)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get(0)?)
    }

    /// A stand's admin requests, newest first (`id`: only that one).
    pub async fn admin_requests(
        &self,
        stand: &StandId,
        id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AdminRequestRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, op, status, pool_seq, detail, created_at, updated_at \
             FROM admin_requests WHERE stand = $1 AND ($2 < 0 OR id = $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(stand.as_str())
        .bind(id.unwrap_or(-1))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let op: String = r.try_get(2)?;
                Ok(AdminRequestRow {
                    id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    op: serde_json::from_str(&op).unwrap_or(serde_json::Value::Null),
                    status: r.try_get(3)?,
                    pool_seq: r.try_get(4)?,
                    detail: r.try_get(5)?,
                    created_at: r.try_get(6)?,
                    updated_at: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// A stand's requests still waiting for the pool, oldest first.
    pub async fn open_admin_requests(
        &self,
        stand: &StandId,
        limit: u32,
    ) -> Result<Vec<(i64, halftime_ledger::AdminOp)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, op FROM admin_requests WHERE stand = $1 AND status = 'queued' \
             ORDER BY id LIMIT $2",
        )
        .bind(stand.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let (id, op): (i64, String) = (r.try_get(0)?, r.try_get(1)?);
            match serde_json::from_str(&op) {
                Ok(op) => out.push((id, op)),
                Err(e) => {
                    tracing::error!(%stand, id, error = %e, "a queued admin request does not parse")
                }
            }
        }
        Ok(out)
    }

    /// Record the pool's answer to a queued request (a later answer changes nothing).
    pub async fn finish_admin_request(
        &self,
        stand: &StandId,
        id: i64,
        outcome: &Result<u64, String>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let (status, seq, detail) = match outcome {
            Ok(seq) => ("done", i64::try_from(*seq).ok(), None),
            Err(why) => ("refused", None, Some(why.clone())),
        };
        sqlx::query(
            "UPDATE admin_requests SET status = $1, pool_seq = $2, detail = $3, updated_at = $4 \
             WHERE stand = $5 AND id = $6 AND status = 'queued'",
        )
        .bind(status)
        .bind(seq)
        .bind(detail)
        .bind(i64::try_from(now_ms).unwrap_or(i64::MAX))
        .bind(stand.as_str())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A stand's refund decisions after decision `after`, oldest first: (id, sale, sku, units).
    pub async fn refund_decisions_after(
        &self,
        stand: &StandId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sale_id, sku, units FROM refund_decisions \
             WHERE stand = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(stand.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect()
    }

    /// Refunds per status, over every stand.
    pub async fn refund_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query(
            "SELECT status, CAST(COUNT(*) AS BIGINT) FROM refund_outbox GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }

    /// Mark a cash refund paid out by hand.
    pub async fn mark_paid_out(
        &self,
        stand: &StandId,
        id: i64,
        by: &str,
        now_ms: i64,
    ) -> Result<PaidOut, StoreError> {
        let r = sqlx::query(
            "UPDATE refund_outbox SET status = 'paid_out', paid_out_by = $1, updated_at = $2 \
             WHERE decision_id = $3 AND status = 'manual' AND decision_id IN \
             (SELECT id FROM refund_decisions WHERE stand = $4)",
        )
        .bind(by)
        .bind(now_ms)
        .bind(id)
        .bind(stand.as_str())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() > 0 {
            return Ok(PaidOut::Marked);
        }
        let status: Option<String> = sqlx::query(
            "SELECT o.status FROM refund_outbox o JOIN refund_decisions d ON d.id = o.decision_id \
             WHERE d.id = $1 AND d.stand = $2",
        )
        .bind(id)
        .bind(stand.as_str())
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
        Ok(status.map_or(PaidOut::Unknown, PaidOut::NotManual))
    }

    /// Rejected changes counted per (replica, rule).
    pub async fn rejections(
        &self,
        stand: &StandId,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT replica, rule, count FROM rejections WHERE stand = $1 ORDER BY replica, rule",
        )
        .bind(stand.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Make an admin token; only its hash is stored. Returns the token (shown once).
    pub async fn create_token(
        &self,
        name: &str,
        role: AdminRole,
        now_ms: u64,
    ) -> Result<String, StoreError> {
        let mut raw = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
        let token = format!("ht_{}", hex::encode(raw));
        sqlx::query("INSERT INTO tokens (hash, name, role, created_at) VALUES ($1, $2, $3, $4)")
            .bind(hash_token(&token))
            .bind(name)
            .bind(role.as_str())
            .bind(i64_of(now_ms, "time")?)
            .execute(&self.pool)
            .await?;
        Ok(token)
    }

    /// The role of a token, if it is one.
    pub async fn token_role(&self, token: &str) -> Result<Option<AdminRole>, StoreError> {
        let row = sqlx::query("SELECT role FROM tokens WHERE hash = $1")
            .bind(hash_token(token))
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => AdminRole::parse(&r.try_get::<String, _>(0)?),
            None => None,
        })
    }

    /// Run one statement (for tests and tools that prove what the schema refuses).
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(sql).execute(&self.pool).await?.rows_affected())
    }
}

/// The projections every batch writes beside its changes and sales, on either driver:
/// items, rights, voids (after the sales they mark) and rejection counts.
macro_rules! write_projections {
    ($tx:ident, $st:expr, $b:expr) => {{
        let (st, b) = ($st, $b);
        for it in &b.items {
            sqlx::query(
                "INSERT INTO items (stand, sku, name, price_cents, total_in, available, marked_off) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (stand, sku) DO UPDATE SET \
                 name = excluded.name, price_cents = excluded.price_cents, \
                 total_in = excluded.total_in, available = excluded.available, \
                 marked_off = excluded.marked_off",
            )
            .bind(st)
            .bind(it.sku.as_str())
            .bind(it.name.as_str())
            .bind(it.price_cents)
            .bind(it.total_in)
            .bind(it.available)
            .bind(i64::from(it.marked_off))
            .execute(&mut **$tx)
            .await?;
        }
        for (sku, replica, units) in &b.rights {
            sqlx::query(
                "INSERT INTO rights (stand, sku, replica, units) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (stand, sku, replica) DO UPDATE SET units = excluded.units",
            )
            .bind(st)
            .bind(sku.as_str())
            .bind(replica.to_string())
            .bind(*units)
            .execute(&mut **$tx)
            .await?;
        }
        for v in &b.voids {
            sqlx::query("UPDATE sales SET voided = 1 WHERE stand = $1 AND sale_id = $2")
                .bind(st)
                .bind(v.to_string())
                .execute(&mut **$tx)
                .await?;
        }
        for ((replica, rule), n) in &b.rejections {
            sqlx::query(
                "INSERT INTO rejections (stand, replica, rule, count) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (stand, replica, rule) DO UPDATE SET \
                 count = rejections.count + excluded.count",
            )
            .bind(st)
            .bind(replica.as_str())
            .bind(*rule)
            .bind(i64_of(*n, "count")?)
            .execute(&mut **$tx)
            .await?;
        }
    }};
}

/// Whether a lease's lock is still held by the connection that took it. A bigint advisory key
/// shows in pg_locks as its high and low 32 bits.
const FENCE_HELD: &str = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
     AND pid = $1 AND classid::bigint = (($2 >> 32) & 4294967295) \
     AND objid::bigint = ($2 & 4294967295) AND objsubid = 1";

/// A sale's row in the `sales` projection (its `voided` starts at 0).
struct NewSale {
    sale_id: String,
    replica: String,
    seq: i64,
    at_ms: i64,
    lines: String,
    units: i64,
    total_cents: i64,
    method: &'static str,
    reference: String,
    offline: i64,
}

impl NewSale {
    fn of(s: &SaleRecord) -> Result<Self, StoreError> {
        let units: u64 = s.lines.iter().map(|l| l.qty).fold(0, u64::saturating_add);
        let total: u64 = s
            .lines
            .iter()
            .map(|l| l.qty.saturating_mul(l.unit_price_cents))
            .fold(0, u64::saturating_add);
        Ok(Self {
            sale_id: s.id.to_string(),
            replica: s.id.replica.to_string(),
            seq: i64_of(s.id.seq, "seq")?,
            at_ms: i64_of(s.at.wall_ms(), "sale time")?,
            lines: serde_json::to_string(&s.lines).unwrap_or_default(),
            units: i64_of(units, "units")?,
            total_cents: i64_of(total, "total")?,
            method: s.payment.method.as_str(),
            reference: s.payment.reference.clone(),
            offline: i64::from(s.offline),
        })
    }
}

/// Rows in Postgres's binary `COPY` format: a header, then per row its field count and each
/// field as its length and its bytes, then a trailer.
struct CopyRows(Vec<u8>);

impl CopyRows {
    fn new() -> Self {
        let mut buf = b"PGCOPY\n\xff\r\n\0".to_vec();
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension
        Self(buf)
    }

    fn row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }

    /// A `bytea`, or a `text` as its UTF-8 bytes.
    fn bytes(&mut self, v: &[u8]) -> Result<(), StoreError> {
        let n = i32::try_from(v.len())
            .map_err(|_| StoreError::Invalid(format!("a field of {} bytes", v.len())))?;
        self.0.extend_from_slice(&n.to_be_bytes());
        self.0.extend_from_slice(v);
        Ok(())
    }

    fn int8(&mut self, v: i64) {
        self.0.extend_from_slice(&8i32.to_be_bytes());
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

/// Postgres: write a batch in one transaction with its changes and sales sent by binary
/// `COPY`, the cheapest way into a table (about a third less of the server's time than
/// INSERT here). `Ok(false)` when some row was stored already (a batch retried after its
/// commit went unconfirmed, a sale another instance projected): nothing is written, and the
/// caller writes the batch by INSERT … ON CONFLICT instead.
async fn copy_batch(
    pg: &sqlx::PgPool,
    stand: &StandId,
    b: &Batch,
    now_ms: u64,
    fence: Option<Fence>,
) -> Result<bool, StoreError> {
    let st = stand.as_str();
    let now = i64_of(now_ms, "time")?;
    let mut owned = pg.begin().await?;
    let tx = &mut owned;
    if let Some(f) = fence {
        let held: i64 = sqlx::query(FENCE_HELD)
            .bind(f.pid)
            .bind(f.key)
            .fetch_one(&mut **tx)
            .await?
            .try_get(0)?;
        if held == 0 {
            return Err(StoreError::LeaseLost(st.to_owned()));
        }
    }
    if !b.changes.is_empty() {
        let mut rows = CopyRows::new();
        for c in &b.changes {
            rows.row(9);
            rows.bytes(st.as_bytes())?;
            rows.bytes(c.actor.to_string().as_bytes())?;
            rows.int8(i64_of(c.seq, "seq")?);
            rows.bytes(&c.info.hash)?;
            rows.bytes(&c.info.deps.concat())?;
            rows.bytes(&c.change.bytes)?;
            rows.bytes(&c.change.signature)?;
            rows.int8(i64_of(c.info.at.wall_ms(), "change time")?);
            rows.int8(now);
        }
        let sql = "COPY changes (stand, actor, seq, hash, deps, bytes, signature, at_ms, \
                   received_at) FROM STDIN (FORMAT binary)";
        if !copy_in(tx, sql, rows.finish()).await? {
            return Ok(false);
        }
    }
    if !b.sales.is_empty() {
        let mut rows = CopyRows::new();
        for s in &b.sales {
            let r = NewSale::of(s)?;
            rows.row(12);
            rows.bytes(st.as_bytes())?;
            rows.bytes(r.sale_id.as_bytes())?;
            rows.bytes(r.replica.as_bytes())?;
            rows.int8(r.seq);
            rows.int8(r.at_ms);
            rows.bytes(r.lines.as_bytes())?;
            rows.int8(r.units);
            rows.int8(r.total_cents);
            rows.bytes(r.method.as_bytes())?;
            rows.bytes(r.reference.as_bytes())?;
            rows.int8(r.offline);
            rows.int8(0);
        }
        let sql = "COPY sales (stand, sale_id, replica, seq, at_ms, lines, units, total_cents, \
                   method, reference, offline, voided) FROM STDIN (FORMAT binary)";
        if !copy_in(tx, sql, rows.finish()).await? {
            return Ok(false);
        }
    }
    write_projections!(tx, st, b);
    if !b.changes.is_empty() {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(st)
            .execute(&mut **tx)
            .await?;
    }
    owned.commit().await?;
    Ok(true)
}

/// One `COPY … FROM STDIN` within `tx`; `Ok(false)` when a row breaks a unique key.
async fn copy_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &str,
    data: Vec<u8>,
) -> Result<bool, StoreError> {
    let sent = async {
        let mut c = tx.copy_in_raw(sql).await?;
        c.send(data).await?;
        c.finish().await
    }
    .await;
    match sent {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Append a batch's changes and write its projections within `tx`.
async fn write_batch(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    stand: &StandId,
    b: &Batch,
    now_ms: u64,
) -> Result<(), StoreError> {
    let st = stand.as_str();
    let now = i64_of(now_ms, "time")?;
    for chunk in b.changes.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO changes \
             (stand, actor, seq, hash, deps, bytes, signature, at_ms, received_at) VALUES ",
        );
        sql.push_str(&placeholders(chunk.len(), 9, ""));
        sql.push_str(" ON CONFLICT (stand, actor, seq) DO NOTHING");
        let mut q = sqlx::query(&sql);
        for c in chunk {
            q = q
                .bind(st)
                .bind(c.actor.to_string())
                .bind(i64_of(c.seq, "seq")?)
                .bind(c.info.hash.to_vec())
                .bind(c.info.deps.concat())
                .bind(c.change.bytes.clone())
                .bind(c.change.signature.clone())
                .bind(i64_of(c.info.at.wall_ms(), "change time")?)
                .bind(now);
        }
        let done = q.execute(&mut **tx).await?;
        if done.rows_affected() < chunk.len() as u64 {
            // Some were stored already (a batch retried after its commit was not
            // confirmed): the same change is fine, a different one is a fork.
            for c in chunk {
                let row = sqlx::query(
                    "SELECT hash FROM changes WHERE stand = $1 AND actor = $2 AND seq = $3",
                )
                .bind(st)
                .bind(c.actor.to_string())
                .bind(i64_of(c.seq, "seq")?)
                .fetch_one(&mut **tx)
                .await?;
                let hash: Vec<u8> = row.try_get(0)?;
                if hash != c.info.hash {
                    return Err(StoreError::Fork {
                        stand: st.to_owned(),
                        actor: c.actor,
                        seq: c.seq,
                    });
                }
            }
        }
    }
    for chunk in b.sales.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO sales (stand, sale_id, replica, seq, at_ms, lines, units, \
             total_cents, method, reference, offline, voided) VALUES ",
        );
        sql.push_str(&placeholders(chunk.len(), 11, ", 0"));
        sql.push_str(" ON CONFLICT (stand, sale_id) DO NOTHING");
        let mut q = sqlx::query(&sql);
        for s in chunk {
            let r = NewSale::of(s)?;
            q = q
                .bind(st)
                .bind(r.sale_id)
                .bind(r.replica)
                .bind(r.seq)
                .bind(r.at_ms)
                .bind(r.lines)
                .bind(r.units)
                .bind(r.total_cents)
                .bind(r.method)
                .bind(r.reference)
                .bind(r.offline);
        }
        q.execute(&mut **tx).await?;
    }
    write_projections!(tx, st, b);
    Ok(())
}

/// `($1,…,$k<tail>),($k+1,…)…` for `rows` rows of `cols` parameters each.
fn placeholders(rows: usize, cols: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&(r * cols + c + 1).to_string());
        }
        sql.push_str(tail);
        sql.push(')');
    }
    sql
}
