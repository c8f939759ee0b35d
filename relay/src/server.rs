//! The relay's HTTP side: the uplink, the admin API (a token with a role on every call) and
//! `/metrics`.
//!
//! | route | role | what |
//! | --- | --- | --- |
//! | `GET /v1/stands/{stand}/uplink` | replica key | WebSocket uplink of a stand replica |
//! | `GET /v1/relay` | viewer | the relay's public key (enrol it on a stand's pool as `relay`) |
//! | `GET /v1/stands` | viewer | every stand served: placement, changes held, connected replicas (a stand not loaded since the start: from the store, without loading it) |
//! | `POST /v1/stands` | admin | `{stand, pool_key}`: serve a stand whose pool is a stand device; `{stand, event, venue, policy, allocation, low_stock_pct, items:[{sku,name,price_cents,stock}]}`: create one with its pool here |
//! | `POST /v1/stands/{stand}/restock`, `/adjust` | manager | `{units:{sku:n}, note}` signed by the pool (a stand device's pool: queued, carried over its uplink; 202 until it answers) |
//! | `PUT /v1/stands/{stand}/items/{sku}/availability` | manager | `{available}`: "86" an item or bring it back |
//! | `PUT /v1/stands/{stand}/catalog` | admin | `{items:[…]}` |
//! | `POST /v1/stands/{stand}/replicas` | admin | `{public_key, name, role}`: enrol a device; answers what it needs to join |
//! | `POST /v1/stands/{stand}/replicas/{id}/retire`, `/reclaim` | admin | retire a device; reclaim also takes its rights back |
//! | `GET /v1/stands/{stand}/stock` | viewer | per item: available, total in, marked off; rights per replica |
//! | `GET /v1/stands/{stand}/sales` | viewer | the latest sales (`?limit=`, at most 1000) |
//! | `GET /v1/stands/{stand}/rejections` | viewer | rejected changes per replica and rule |
//! | `GET /v1/stands/{stand}/refunds` | viewer | refunds the reconciler decided and where each payment stands |
//! | `POST /v1/stands/{stand}/refunds/{id}/paid-out` | manager | `{by}`: a cash refund handed back |
//! | `GET /v1/stands/{stand}/requests` | viewer | admin operations queued for a stand device's pool and what became of each |
//! | `GET /v1/stands/{stand}/live` | viewer | server-sent events: `stock`, the items each committed change moved |
//! | `GET /v1/stands/{stand}/stock/at?at=MS` | viewer | available per item as at a past time (ms since the epoch) |
//! | `GET /v1/stands/{stand}/audit/verify` | viewer | re-checks every stored change's signature, hash links and columns; reports the first break |
//! | `GET /metrics` | none | Prometheus text |
//! | `GET /openapi.json` | none | this API described (OpenAPI 3.1) |
//! | `GET /`, `GET /admin` | none (the calls it makes need a token) | the admin page |
//!
//! Without a valid `Authorization: Bearer …` token an admin call is 401; with too weak a
//! role, 403. Tokens are made with `halftime-relay token create` and stored hashed. Operations
//! on a stand are signed by its pool. Where the pool is at the relay an operation answers once
//! its change is committed; where it is a stand device the operation is queued, carried to the
//! pool over its uplink and made there once: the call answers when the pool has (201/200, or
//! 409 with the pool's reason), or after 3 s with `202` and the queued request.

use crate::audit::AuditReport;
use crate::openapi::{Bearer, Denied, OpAnswered, ReadFailed};
use crate::stand::{self, AdminOp, StandCmd, StandHandle, StandView, now_ms};
use crate::store::{
    AdminRequestRow, AdminRole, Backend, Batch, CHANGES_CHANNEL, ChangeRow, Lease, PaidOut,
    Placement, RefundRow, SaleRow, StandRow, Store, StoreError,
};
use crate::uplink;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use halftime_ledger::{
    Allocation, CatalogItem, EventId, Ledger, Policy, PublicKey, ReplicaId, ReplicaKey, Role, Sku,
    StandId, StandInfo,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a request waits for a stand's task before giving up.
pub const STAND_TIMEOUT_MS: u64 = 10_000;
pub const MAX_SALES_LISTED: u32 = 1_000;
/// An instance standing by for a stand's pool tries its lease this often.
pub const LEASE_RETRY_MS: u64 = 1_000;

#[derive(Debug, Default)]
pub struct Metrics {
    pub uplinks_open: AtomicU64,
    pub uplinks_refused: AtomicU64,
    /// Stands loaded from the store since the start (each once, at its first call).
    pub stands_loaded: AtomicU64,
    pub admin_unauthorized: AtomicU64,
    pub admin_forbidden: AtomicU64,
}

/// A stand served here: its task, and the key the relay speaks for it with (the relay's own,
/// or the pool's when the pool is at the relay).
#[derive(Debug, Clone)]
pub struct Served {
    pub handle: StandHandle,
    pub key: ReplicaKey,
    pub pool_key: PublicKey,
    pub placement: Placement,
    pub psk: Option<String>,
}

#[derive(Debug)]
pub struct Inner {
    pub store: Store,
    pub relay_key: ReplicaKey,
    stands: RwLock<BTreeMap<StandId, Served>>,
    standby: RwLock<std::collections::BTreeSet<StandId>>,
    pub next_conn: AtomicU64,
    pub metrics: Metrics,
    snapshot_every: usize,
    /// Stands being loaded, each once however many calls wait for it.
    loading: Mutex<BTreeMap<StandId, Loading>>,
    /// Loads run at most one per core, so the first stands asked for are served first.
    load_slots: tokio::sync::Semaphore,
    /// This instance among those on one Postgres, chosen at random when it starts.
    instance: u64,
}

type Loading = futures::future::Shared<futures::future::BoxFuture<'static, Result<(), String>>>;

#[derive(Debug, Clone)]
pub struct App(Arc<Inner>);

impl std::ops::Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    /// Open the relay over `store`. Its stands load at their first uplink or admin call
    /// ([`App::serve_stand`]), so a restart serves at once however large they are.
    pub async fn new(store: Store) -> Result<Self, StoreError> {
        Self::open(store, stand::SNAPSHOT_EVERY).await
    }

    /// [`App::new`], writing each stand's snapshot every `snapshot_every` changes (0: never).
    pub async fn open(store: Store, snapshot_every: usize) -> Result<Self, StoreError> {
        let relay_key = store.relay_key().await?;
        let width = std::thread::available_parallelism().map_or(2, |n| n.get());
        let app = App(Arc::new(Inner {
            snapshot_every,
            store: store.clone(),
            relay_key,
            stands: RwLock::new(BTreeMap::new()),
            standby: RwLock::new(Default::default()),
            next_conn: AtomicU64::new(1),
            metrics: Metrics::default(),
            loading: Mutex::new(BTreeMap::new()),
            load_slots: tokio::sync::Semaphore::new(width),
            instance: rand::random(),
        }));
        if store.backend() == Backend::Postgres {
            let listener = app.clone();
            tokio::spawn(async move { listener.listen().await });
        }
        Ok(app)
    }

    /// Postgres: hear other instances' commits and have each stand fetch what it lacks, and
    /// the rights requests and answers they hand on.
    async fn listen(&self) {
        loop {
            match sqlx::postgres::PgListener::connect(self.store.url()).await {
                Ok(mut l) => match l.listen_all([CHANGES_CHANNEL, stand::RIGHTS_CHANNEL]).await {
                    Ok(()) => {
                        // Whatever was committed while nobody listened.
                        for s in self.served() {
                            let _ = s.handle.tx.try_send(StandCmd::Poll);
                        }
                        while let Ok(n) = l.recv().await {
                            if n.channel() == stand::RIGHTS_CHANNEL {
                                self.handed(n.payload());
                                continue;
                            }
                            let stand = StandId::new(n.payload()).ok();
                            if let Some(s) = stand.and_then(|s| self.stand(&s)) {
                                let _ = s.handle.tx.try_send(StandCmd::Poll);
                            }
                        }
                        tracing::warn!("lost the change notifications; listening again");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for other instances' changes")
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot listen for other instances' changes"),
            }
            tokio::time::sleep(Duration::from_millis(LEASE_RETRY_MS)).await;
        }
    }

    /// A rights request or answer another instance handed on: to the stand's task, if the
    /// stand is served here (a replica of a stand not loaded here is not connected here).
    fn handed(&self, payload: &str) {
        let Some(h) = stand::Handed::decode(payload, self.instance) else {
            return;
        };
        if let Some(s) = self.stand(&h.stand) {
            let _ = s.handle.tx.try_send(StandCmd::Elsewhere(h.msg));
        }
    }

    /// The stand, loaded from the store now if this relay has not served it since it started
    /// (however many calls ask at once, it loads once). `None` when no such stand is stored or
    /// when another instance holds its pool's lease (see [`App::standing_by`]).
    pub async fn serve_stand(&self, s: &StandId) -> Result<Option<Served>, StoreError> {
        if let Some(served) = self.stand(s) {
            return Ok(Some(served));
        }
        if self.standing_by(s) {
            return Ok(None);
        }
        let load = {
            let mut loading = self
                .loading
                .lock()
                .map_err(|_| StoreError::Unavailable("the stand loads lock is poisoned".into()))?;
            match loading.get(s) {
                Some(l) => l.clone(),
                None => {
                    // Its own task: the load finishes even if every caller gives up waiting.
                    let (app, id) = (self.clone(), s.clone());
                    let task = tokio::spawn(async move {
                        let loaded = app.load_stand(&id).await.map_err(|e| e.to_string());
                        if let Ok(mut l) = app.loading.lock() {
                            l.remove(&id);
                        }
                        loaded
                    });
                    let l: Loading = futures::FutureExt::shared(Box::pin(async move {
                        task.await.map_err(|e| e.to_string())?
                    })
                        as futures::future::BoxFuture<'static, _>);
                    loading.insert(s.clone(), l.clone());
                    l
                }
            }
        };
        load.await
            .map_err(|e| StoreError::Unavailable(format!("stand {s} could not be loaded: {e}")))?;
        Ok(self.stand(s))
    }

    async fn load_stand(&self, s: &StandId) -> Result<(), StoreError> {
        if self.stand(s).is_some() || self.standing_by(s) {
            return Ok(());
        }
        let Some(row) = self.store.stand(s).await? else {
            return Ok(());
        };
        let _slot = self
            .load_slots
            .acquire()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.start_stand(row).await.map(|_| ())
    }

    /// Start serving a stand. A stand whose pool is here is served by the one instance that
    /// holds its lease; the others stand by and take over when the holder goes.
    async fn start_stand(&self, row: StandRow) -> Result<Option<Served>, StoreError> {
        let lease = match row.placement {
            Placement::Device => None,
            Placement::Relay => match self.store.try_lease(&row.stand).await? {
                Lease::Elsewhere => {
                    tracing::info!(stand = %row.stand, "another instance holds this stand's pool; standing by");
                    if let Ok(mut s) = self.standby.write() {
                        s.insert(row.stand.clone());
                    }
                    let app = self.clone();
                    tokio::spawn(async move { app.take_over(row).await });
                    return Ok(None);
                }
                held => Some(held),
            },
        };
        self.run_stand(row, lease).await.map(Some)
    }

    /// Wait for a stand's lease, then serve it.
    async fn take_over(&self, row: StandRow) {
        loop {
            tokio::time::sleep(Duration::from_millis(LEASE_RETRY_MS)).await;
            match self.store.try_lease(&row.stand).await {
                Ok(Lease::Elsewhere) => continue,
                Ok(lease) => {
                    tracing::info!(stand = %row.stand, "took over this stand's pool");
                    // Served first, then no longer standing by: a call in between must find
                    // the stand in one of the two, or it would load it again, miss the lease
                    // this instance now holds, and stand by for good.
                    if let Err(e) = self.run_stand(row.clone(), Some(lease)).await {
                        tracing::error!(stand = %row.stand, error = %e, "could not start the stand");
                        continue;
                    }
                    if let Ok(mut s) = self.standby.write() {
                        s.remove(&row.stand);
                    }
                    return;
                }
                Err(e) => tracing::warn!(stand = %row.stand, error = %e, "could not try the lease"),
            }
        }
    }

    /// A pool whose lease was lost stands by again and is taken over, from the store, by
    /// whichever instance gets the lease next (this one included). Boxed: it starts the stand
    /// again, which starts this again.
    fn stand_by_if_lost(
        &self,
        lost: tokio::sync::oneshot::Receiver<()>,
        row: StandRow,
    ) -> futures::future::BoxFuture<'static, ()> {
        let app = self.clone();
        Box::pin(async move {
            if lost.await.is_err() {
                return;
            }
            // Standing by first, then no longer served (see `take_over`).
            if let Ok(mut s) = app.standby.write() {
                s.insert(row.stand.clone());
            }
            if let Ok(mut m) = app.stands.write() {
                m.remove(&row.stand);
            }
            app.take_over(row).await;
        })
    }

    /// Whether another instance serves this stand (its pool's lease is elsewhere).
    pub fn standing_by(&self, s: &StandId) -> bool {
        self.standby.read().is_ok_and(|m| m.contains(s))
    }

    async fn run_stand(&self, row: StandRow, lease: Option<Lease>) -> Result<Served, StoreError> {
        let key = match (row.placement, row.pool_secret) {
            (Placement::Relay, Some(s)) => ReplicaKey::from_seed(s),
            _ => self.relay_key.clone(),
        };
        let placement = row.placement;
        let psk = row.psk.clone();
        let pool_key = row.pool_key;
        let again = row.clone();
        let (handle, lost) = stand::start(
            self.store.clone(),
            self.relay_key.clone(),
            row,
            lease,
            self.snapshot_every,
            self.instance,
        )
        .await?;
        self.metrics.stands_loaded.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(self.stand_by_if_lost(lost, again));
        let served = Served {
            handle,
            key,
            pool_key,
            placement,
            psk,
        };
        if let Ok(mut m) = self.stands.write() {
            m.insert(served.handle.stand.clone(), served.clone());
        }
        Ok(served)
    }

    pub fn stand(&self, s: &StandId) -> Option<Served> {
        self.stands.read().ok()?.get(s).cloned()
    }

    fn served(&self) -> Vec<Served> {
        self.stands
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Serve a stand whose pool is a stand device (the pool enrols this relay's key).
    pub async fn attach_stand(
        &self,
        stand: StandId,
        pool_key: PublicKey,
        now_ms: u64,
    ) -> Result<Served, StoreError> {
        if let Some(s) = self.serve_stand(&stand).await? {
            return match self.store.stand(&stand).await? {
                Some(r) if r.pool_key == pool_key => Ok(s),
                _ => Err(StoreError::Invalid(format!(
                    "stand {stand} is already served with another pool key"
                ))),
            };
        }
        let row = StandRow {
            stand,
            pool_key,
            placement: Placement::Device,
            pool_secret: None,
            psk: None,
        };
        self.store.add_stand(&row, now_ms).await?;
        self.run_stand(row, None).await
    }

    /// Create a stand with its pool here: the relay makes the pool's key and the stand's
    /// network key, and signs the genesis, catalog and opening stock as the pool.
    pub async fn create_stand(
        &self,
        info: StandInfo,
        items: Vec<(CatalogItem, u64)>,
        now_ms: u64,
    ) -> Result<Served, StoreError> {
        if self.store.stand(&info.stand).await?.is_some() {
            return Err(StoreError::Invalid(format!(
                "stand {} already exists",
                info.stand
            )));
        }
        let secret = random32();
        let key = ReplicaKey::from_seed(secret);
        let stand = info.stand.clone();
        let invalid = |e: halftime_ledger::OpError| StoreError::Invalid(e.to_string());
        let (mut pool, genesis) =
            Ledger::create_stand(key.clone(), info, "pool", now_ms).map_err(invalid)?;
        let mut changes = vec![genesis];
        let stock: BTreeMap<Sku, u64> = items
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(i, n)| (i.sku.clone(), *n))
            .collect();
        changes.push(
            pool.set_catalog(items.into_iter().map(|(i, _)| i).collect(), now_ms)
                .map_err(invalid)?,
        );
        if !stock.is_empty() {
            changes.push(
                pool.restock(stock, "opening stock", now_ms)
                    .map_err(invalid)?,
            );
        }
        let me = pool.me();
        let mut batch = Batch::default();
        for (change, seq) in changes.into_iter().zip(1..) {
            let info = pool
                .change_info(me, seq)
                .ok_or_else(|| StoreError::Invalid("a change just made is not held".into()))?;
            batch.changes.push(ChangeRow {
                actor: me,
                seq,
                info,
                change,
            });
        }
        let row = StandRow {
            stand,
            pool_key: key.public(),
            placement: Placement::Relay,
            pool_secret: Some(secret),
            psk: Some(hex::encode(random32())),
        };
        self.store.add_stand_with(&row, &batch, now_ms).await?;
        self.start_stand(row).await?.ok_or_else(|| {
            StoreError::Invalid("another relay instance took the new stand's pool".into())
        })
    }
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b
}

/// An error answer: `{error, message}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
        }
    }
}

/// What every error answers: a stable code, and what went wrong in words.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    error: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    other.to_string(),
                )
            }
        }
    }
}

/// The caller's role, or 401 (no valid token) / 403 (too weak).
async fn authorize(app: &App, headers: &HeaderMap, need: AdminRole) -> Result<AdminRole, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let role = match token {
        Some(t) if !t.is_empty() && t.len() <= 128 => app.store.token_role(t).await?,
        _ => None,
    };
    let Some(role) = role else {
        app.metrics
            .admin_unauthorized
            .fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an admin token is needed: Authorization: Bearer <token> (halftime-relay token create)",
        ));
    };
    if role < need {
        app.metrics.admin_forbidden.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this needs the {} role; the token has {}",
                need.as_str(),
                role.as_str()
            ),
        ));
    }
    Ok(role)
}

fn stand_id(s: &str) -> Result<StandId, ApiError> {
    StandId::new(s)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
}

async fn known(app: &App, s: &str) -> Result<Served, ApiError> {
    let id = stand_id(s)?;
    let served = app.serve_stand(&id).await?;
    if app.standing_by(&id) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "served_elsewhere",
            format!("another relay instance holds stand {s}'s pool; ask that one"),
        ));
    }
    served.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_stand",
            format!("this relay does not serve stand {s}"),
        )
    })
}

/// Ask a stand's task and wait for its answer (503 when it does not answer in time).
async fn ask<T>(
    s: &Served,
    make: impl FnOnce(oneshot::Sender<T>) -> StandCmd,
) -> Result<T, ApiError> {
    let (reply, rx) = oneshot::channel();
    let busy = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the stand is not answering",
        )
    };
    s.handle.tx.send(make(reply)).await.map_err(|_| busy())?;
    tokio::time::timeout(Duration::from_millis(STAND_TIMEOUT_MS), rx)
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())
}

async fn view(s: &Served) -> Result<StandView, ApiError> {
    ask(s, |reply| StandCmd::View { reply }).await
}

/// The relay's public key, to enrol it on a stand's pool as `relay`.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/relay", tag = "relay", security(("bearer" = [])),
    responses((status = 200, description = "The relay's key and store.", body = RelayInfo), Denied))]
async fn relay_info(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    Ok(Json(RelayInfo {
        public_key: app.relay_key.public().to_string(),
        replica: app.relay_key.replica_id().to_string(),
        database: format!("{:?}", app.store.backend()).to_lowercase(),
    })
    .into_response())
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RelayInfo {
    public_key: String,
    replica: String,
    /// `postgres` or `sqlite`.
    database: String,
}

/// Every stand served.
///
/// A stand not loaded since this relay started is listed from the store without loading it
/// (`loaded.from` is `not_yet`, `member` is null). Role: viewer.
#[utoipa::path(get, path = "/v1/stands", tag = "stands", security(("bearer" = [])),
    responses((status = 200, description = "One view per stand.", body = [StandView]), Denied))]
async fn list_stands(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let mut out = Vec::new();
    for row in app.store.stands().await? {
        if app.standing_by(&row.stand) {
            continue;
        }
        match app.stand(&row.stand) {
            Some(s) => out.push(view(&s).await?),
            // Not loaded since this relay started: what the store says, without loading it.
            None => out.push(StandView {
                stand: row.stand.to_string(),
                placement: row.placement,
                pool: row.pool_key.replica_id().to_string(),
                member: None,
                changes: app.store.change_count(&row.stand).await? as usize,
                connected: Vec::new(),
                frames_rejected: 0,
                changes_rejected: 0,
                commit_failures: 0,
                rights_forwarded: 0,
                rights_asked_elsewhere: 0,
                loaded: stand::Loaded::NotYet,
            }),
        }
    }
    Ok(Json(out).into_response())
}

/// `POST /v1/stands`: with `pool_key`, serve a stand a device created; without it, create a
/// stand whose pool is here (`event` and `items` needed).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StandInput {
    stand: String,
    pool_key: Option<String>,
    event: Option<String>,
    #[serde(default)]
    venue: String,
    /// `strict` (the default) or `optimistic`.
    #[schema(value_type = Option<String>)]
    policy: Option<Policy>,
    /// `proportional` (the default) or `velocity`.
    #[schema(value_type = Option<String>)]
    allocation: Option<Allocation>,
    low_stock_pct: Option<u8>,
    #[serde(default)]
    items: Vec<ItemInput>,
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemInput {
    sku: String,
    name: String,
    price_cents: u64,
    #[serde(default)]
    stock: u64,
    low_stock_at: Option<u64>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t).map_err(|e| bad(e.body_text()))
}

fn catalog_item(it: ItemInput, pct: u8) -> Result<(CatalogItem, u64), ApiError> {
    let sku = Sku::new(&it.sku).map_err(|e| bad(format!("sku {:?}: {e}", it.sku)))?;
    let low = it
        .low_stock_at
        .unwrap_or_else(|| it.stock.saturating_mul(u64::from(pct)).div_ceil(100));
    Ok((
        CatalogItem {
            sku,
            name: it.name,
            price_cents: it.price_cents,
            low_stock_at: low,
        },
        it.stock,
    ))
}

/// Serve a stand.
///
/// With `pool_key` only: serve a stand whose pool is a stand device (enrol the relay's key
/// there). With `event` and `items`: create the stand here, the relay holding its pool.
/// Role: admin.
#[utoipa::path(post, path = "/v1/stands", tag = "stands", security(("bearer" = [])), request_body = StandInput,
    responses((status = 201, description = "The stand, now served.", body = StandView), OpAnswered))]
async fn add_stand(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Json<StandInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Admin).await?;
    let input = json_body(body)?;
    let stand = stand_id(&input.stand)?;
    let now = stand::now_ms();
    let served = match input.pool_key {
        Some(k) => {
            if input.event.is_some() || !input.items.is_empty() {
                return Err(bad(
                    "give either pool_key (a stand made on a device) or event and items (a stand made here), not both",
                ));
            }
            let pool_key: PublicKey = k
                .parse()
                .map_err(|e: halftime_ledger::KeyError| bad(format!("pool_key: {e}")))?;
            app.attach_stand(stand, pool_key, now).await?
        }
        None => {
            let event = input
                .event
                .ok_or_else(|| bad("event is needed to create a stand"))?;
            if input.items.is_empty() {
                return Err(bad("items are needed to create a stand"));
            }
            let pct = input.low_stock_pct.unwrap_or(10);
            let info = StandInfo {
                event: EventId::new(&event).map_err(|e| bad(format!("event: {e}")))?,
                venue: input.venue,
                stand,
                policy: input.policy.unwrap_or_default(),
                allocation: input.allocation.unwrap_or_default(),
                low_stock_pct: pct,
            };
            let items = input
                .items
                .into_iter()
                .map(|i| catalog_item(i, pct))
                .collect::<Result<Vec<_>, _>>()?;
            app.create_stand(info, items, now).await?
        }
    };
    let v = view(&served).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Send an admin operation to a stand's pool and wait until its change is committed.
/// How long an admin call for a stand device's pool waits for the pool's answer before it
/// answers 202 with the queued request.
pub const ADMIN_WAIT_MS: u64 = 3_000;

/// What became of an admin operation.
enum Made {
    /// Made by the pool (here, or the stand device's within [`ADMIN_WAIT_MS`]).
    Done(serde_json::Value),
    /// Queued for the stand device's pool, which is not connected or has not answered yet.
    Queued(serde_json::Value),
}

impl Made {
    fn reply(self, done: StatusCode) -> Response {
        match self {
            Made::Done(v) => (done, Json(v)).into_response(),
            Made::Queued(v) => (StatusCode::ACCEPTED, Json(v)).into_response(),
        }
    }
}

/// Make an admin operation as the stand's pool: at once when the pool is here; else queued,
/// carried to the pool device over its uplink, and made there once.
async fn admin_op(app: &App, s: &str, op: AdminOp) -> Result<Made, ApiError> {
    let served = known(app, s).await?;
    if served.placement == Placement::Device {
        return queue_for_device(app, &served, op).await;
    }
    let answer = ask(&served, |reply| StandCmd::Admin { op, reply }).await?;
    answer.map(Made::Done).map_err(|e| {
        ApiError::new(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.error,
            e.message,
        )
    })
}

async fn queue_for_device(app: &App, served: &Served, op: AdminOp) -> Result<Made, ApiError> {
    op.check_limits().map_err(bad)?;
    let stand = served.handle.stand.clone();
    let id = app.store.queue_admin_request(&stand, &op, now_ms()).await?;
    let _ = served.handle.tx.try_send(StandCmd::AdminQueued);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ADMIN_WAIT_MS);
    loop {
        let row = app.store.admin_requests(&stand, Some(id), 1).await?.pop();
        match row.as_ref().map(|r| r.status.as_str()) {
            Some("done") => {
                return Ok(Made::Done(serde_json::json!({
                    "stand": stand.to_string(),
                    "request": id,
                    "pool_seq": row.and_then(|r| r.pool_seq),
                })));
            }
            Some("refused") => {
                let why = row.and_then(|r| r.detail).unwrap_or_default();
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "refused",
                    format!("the stand's pool refused request {id}: {why}"),
                ));
            }
            _ if std::time::Instant::now() >= deadline => {
                return Ok(Made::Queued(serde_json::json!({
                    "stand": stand.to_string(),
                    "request": id,
                    "status": "queued",
                    "message": "the stand's pool is a stand device that has not answered yet; \
                                it makes this once it is connected (see GET /v1/stands/{stand}/requests)",
                })));
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

fn units_of(units: BTreeMap<String, u64>) -> Result<BTreeMap<Sku, u64>, ApiError> {
    units
        .into_iter()
        .map(|(k, n)| Ok((Sku::new(&k).map_err(|e| bad(format!("sku {k:?}: {e}")))?, n)))
        .collect()
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockInput {
    units: BTreeMap<String, u64>,
    #[serde(default)]
    note: String,
}

/// A restock or a shrink adjustment, signed by the pool.
async fn stock_move(
    app: &App,
    headers: &HeaderMap,
    s: &str,
    body: Result<Json<StockInput>, JsonRejection>,
    make: fn(BTreeMap<Sku, u64>, String) -> AdminOp,
) -> Result<Response, ApiError> {
    authorize(app, headers, AdminRole::Manager).await?;
    let input = json_body(body)?;
    let op = make(units_of(input.units)?, input.note);
    Ok(admin_op(app, s, op).await?.reply(StatusCode::CREATED))
}

/// Restock, signed by the pool.
///
/// Answered once its change is committed. Role: manager.
#[utoipa::path(post, path = "/v1/stands/{stand}/restock", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id.")), request_body = StockInput,
    responses((status = 201, description = "The restock: `stand` and the pool's `pool_seq`.", body = Object), OpAnswered))]
async fn restock(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    body: Result<Json<StockInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    stock_move(&app, &headers, &s, body, |units, note| AdminOp::Restock {
        units,
        note,
    })
    .await
}

/// Adjust stock down (waste, a count), signed by the pool.
///
/// Answered once its change is committed. Role: manager.
#[utoipa::path(post, path = "/v1/stands/{stand}/adjust", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id.")), request_body = StockInput,
    responses((status = 201, description = "The adjustment: `stand` and the pool's `pool_seq`.", body = Object), OpAnswered))]
async fn adjust(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    body: Result<Json<StockInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    stock_move(&app, &headers, &s, body, |units, reason| AdminOp::Adjust {
        units,
        reason,
    })
    .await
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityInput {
    available: bool,
}

/// "86" an item, or bring it back.
///
/// Answered once its change is committed. Role: manager.
#[utoipa::path(put, path = "/v1/stands/{stand}/items/{sku}/availability", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id."), ("sku" = String, Path, description = "The item.")), request_body = AvailabilityInput,
    responses((status = 200, description = "The mark: `stand` and the pool's `pool_seq`.", body = Object), OpAnswered))]
async fn availability(
    State(app): State<App>,
    headers: HeaderMap,
    Path((s, sku)): Path<(String, String)>,
    body: Result<Json<AvailabilityInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Manager).await?;
    let input = json_body(body)?;
    let sku = Sku::new(&sku).map_err(|e| bad(format!("sku: {e}")))?;
    let op = AdminOp::Mark {
        sku,
        available: input.available,
    };
    Ok(admin_op(&app, &s, op).await?.reply(StatusCode::OK))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogInput {
    items: Vec<ItemInput>,
}

/// Replace the catalog.
///
/// Answered once its change is committed. Role: admin.
#[utoipa::path(put, path = "/v1/stands/{stand}/catalog", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id.")), request_body = CatalogInput,
    responses((status = 200, description = "The catalog: `stand` and the pool's `pool_seq`.", body = Object), OpAnswered))]
async fn catalog(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    body: Result<Json<CatalogInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Admin).await?;
    let input = json_body(body)?;
    let items = input
        .items
        .into_iter()
        .map(|i| catalog_item(i, 10).map(|(c, _)| c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(admin_op(&app, &s, AdminOp::Catalog { items })
        .await?
        .reply(StatusCode::OK))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrolInput {
    public_key: String,
    name: String,
    /// `terminal`, `kitchen` or `relay`.
    #[schema(value_type = String)]
    role: Role,
}

/// Enrol a device; the answer is what it needs to join.
///
/// Answered once its change is committed. Role: admin.
#[utoipa::path(post, path = "/v1/stands/{stand}/replicas", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id.")), request_body = EnrolInput,
    responses((status = 201, description = "What the device needs to join: `replica`, `stand`, `pool_key`, `psk` and the `join` command.", body = Object), OpAnswered))]
async fn enrol(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    body: Result<Json<EnrolInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Admin).await?;
    let input = json_body(body)?;
    let key: PublicKey = input
        .public_key
        .parse()
        .map_err(|e: halftime_ledger::KeyError| bad(format!("public_key: {e}")))?;
    let served = known(&app, &s).await?;
    let op = AdminOp::Enrol {
        key,
        name: input.name,
        role: input.role,
    };
    let made = admin_op(&app, &s, op).await?;
    let pool_key = served.pool_key.to_string();
    // A device stand's network key is its pool operator's, never the relay's.
    let psk = served.psk.clone().unwrap_or_else(|| "PSK".into());
    let join =
        format!("halftime-peer join --data DIR --stand {s} --pool-key {pool_key} --psk {psk}");
    let mut body = serde_json::json!({
        "replica": key.replica_id().to_string(),
        "stand": s,
        "pool_key": pool_key,
        "psk": served.psk,
        "join": join,
    });
    match made {
        Made::Done(_) => Ok((StatusCode::CREATED, Json(body)).into_response()),
        Made::Queued(q) => {
            body["request"] = q["request"].clone();
            body["status"] = q["status"].clone();
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

fn replica_id(id: &str) -> Result<ReplicaId, ApiError> {
    id.parse()
        .map_err(|_| bad(format!("{id:?} is not a replica id (16 hex digits)")))
}

/// Retire a device, or retire it and reclaim its rights.
///
/// Answered once its change is committed; a reclaim answers what it was based on. Role: admin.
#[utoipa::path(post, path = "/v1/stands/{stand}/replicas/{id}/{action}", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id."), ("id" = String, Path, description = "The replica id (16 hex digits)."),
        ("action" = String, Path, description = "`retire` or `reclaim`.")),
    responses((status = 200, description = "The retirement, or the reclaim and what it was based on.", body = Object), OpAnswered))]
async fn replica_action(
    State(app): State<App>,
    headers: HeaderMap,
    Path((s, id, action)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Admin).await?;
    let replica = replica_id(&id)?;
    let op = match action.as_str() {
        "retire" => AdminOp::Retire { replica },
        "reclaim" => AdminOp::Reclaim { replica },
        _ => return Err(not_found().await),
    };
    Ok(admin_op(&app, &s, op).await?.reply(StatusCode::OK))
}

/// Stock per item and rights per replica.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/stock", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id.")),
    responses((status = 200, description = "The stand's stock, from the store's projection.", body = StockView), ReadFailed))]
async fn stock(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let served = known(&app, &s).await?;
    let (items, rights) = app.store.stock(&served.handle.stand).await?;
    let mut by_sku: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (sku, replica, units) in rights {
        by_sku.entry(sku).or_default().insert(replica, units);
    }
    let items = items
        .into_iter()
        .map(|it| StockItem {
            rights: by_sku.remove(it.sku.as_str()).unwrap_or_default(),
            sku: it.sku.to_string(),
            name: it.name,
            price_cents: it.price_cents,
            total_in: it.total_in,
            available: it.available,
            oversold: (-it.available).max(0),
            marked_off: it.marked_off,
        })
        .collect();
    Ok(Json(StockView { stand: s, items }).into_response())
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StockView {
    stand: String,
    items: Vec<StockItem>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StockItem {
    sku: String,
    name: String,
    price_cents: i64,
    /// Every unit ever put in: opening stock and restocks.
    total_in: i64,
    /// Units left; below zero when optimistic sales oversold.
    available: i64,
    /// Units sold beyond the stock, owed back as refunds.
    oversold: i64,
    /// "86": marked unavailable for the stand.
    marked_off: bool,
    /// Replica id → units it may sell.
    rights: BTreeMap<String, i64>,
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Rows to list: 100 unless asked, at most 1,000.
    limit: Option<u32>,
}

/// A viewer's list of a stand's latest rows (`?limit=`, 100 unless asked, at most
/// `MAX_SALES_LISTED`): the stand asked for and the limit.
async fn list_args(
    app: &App,
    headers: &HeaderMap,
    s: &str,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StandId, u32), ApiError> {
    authorize(app, headers, AdminRole::Viewer).await?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let served = known(app, s).await?;
    Ok((
        served.handle.stand,
        q.limit.unwrap_or(100).min(MAX_SALES_LISTED),
    ))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SalesQuery {
    /// Rows to list: 100 unless asked, at most 1,000.
    limit: Option<u32>,
    /// With `before_sale`: list only sales after this row (its `at_ms`) in the listing's order.
    before_ms: Option<i64>,
    /// With `before_ms`: that row's `sale_id`.
    before_sale: Option<String>,
}

/// Longest `before_sale` accepted (a sale id is a replica id and a number).
const MAX_SALE_ID_LEN: usize = 64;

/// The sales, latest first, a page at a time.
///
/// For the next page, pass the last row's `at_ms` and `sale_id` as `before_ms` and
/// `before_sale`. Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/sales", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id."), SalesQuery),
    responses((status = 200, description = "Latest first.", body = [SaleRow]), ReadFailed))]
async fn sales(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    q: Result<Query<SalesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let bad = |why: &str| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", why);
    let before = match (q.before_ms, q.before_sale.as_deref()) {
        (None, None) => None,
        (Some(_), Some(id)) if id.len() > MAX_SALE_ID_LEN => {
            return Err(bad("before_sale is longer than a sale id"));
        }
        (Some(at), Some(id)) => Some((at, id)),
        _ => return Err(bad("before_ms and before_sale go together")),
    };
    let stand = known(&app, &s).await?.handle.stand;
    let limit = q.limit.unwrap_or(100).min(MAX_SALES_LISTED);
    Ok(Json(app.store.sales_before(&stand, limit, before).await?).into_response())
}

/// Admin operations queued for a stand device's pool, and what became of each.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/requests", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id."), ListQuery),
    responses((status = 200, description = "Latest request first: queued, done (with the pool change that made it) or refused (with why).", body = [AdminRequestRow]), ReadFailed))]
async fn admin_requests(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (stand, limit) = list_args(&app, &headers, &s, q).await?;
    Ok(Json(app.store.admin_requests(&stand, None, limit).await?).into_response())
}

/// Refunds the reconciler decided, with where each payment stands.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/refunds", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id."), ListQuery),
    responses((status = 200, description = "Latest decision first.", body = [RefundRow]), ReadFailed))]
async fn refunds(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (stand, limit) = list_args(&app, &headers, &s, q).await?;
    Ok(Json(app.store.refunds(&stand, limit).await?).into_response())
}

/// Longest name accepted for who paid a cash refund out.
pub const MAX_PAID_OUT_BY: usize = 100;

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaidOutInput {
    /// Who handed the cash back.
    by: String,
}

/// Mark a cash refund paid out by hand.
///
/// Role: manager.
#[utoipa::path(post, path = "/v1/stands/{stand}/refunds/{id}/paid-out", tag = "operations", security(("bearer" = [])),
    params(("stand" = String, Path, description = "The stand id."), ("id" = i64, Path, description = "The refund's id.")), request_body = PaidOutInput,
    responses((status = 200, description = "Marked.", body = PaidOutView),
        (status = 409, description = "`not_a_cash_refund`: the refund is not a cash refund waiting to be paid out.", body = ErrorBody),
        ReadFailed))]
async fn refund_paid_out(
    State(app): State<App>,
    headers: HeaderMap,
    Path((s, id)): Path<(String, String)>,
    body: Result<Json<PaidOutInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Manager).await?;
    let id: i64 = id
        .parse()
        .map_err(|_| bad(format!("refund id {id:?}: expected a number")))?;
    let input = json_body(body)?;
    let by = input.by.trim();
    if by.is_empty() || by.chars().count() > MAX_PAID_OUT_BY || by.chars().any(char::is_control) {
        return Err(bad(format!(
            "by: who paid it out, 1 to {MAX_PAID_OUT_BY} printable characters"
        )));
    }
    let served = known(&app, &s).await?;
    match app
        .store
        .mark_paid_out(&served.handle.stand, id, by, stand::now_ms() as i64)
        .await?
    {
        PaidOut::Marked => Ok(Json(PaidOutView {
            id,
            status: "paid_out",
            by: by.to_owned(),
        })
        .into_response()),
        PaidOut::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_refund",
            format!("no refund {id} at stand {s}"),
        )),
        PaidOut::NotManual(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_a_cash_refund",
            format!(
                "refund {id} is {status}; only a cash refund waiting to be paid out (manual) can be marked paid out"
            ),
        )),
    }
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PaidOutView {
    id: i64,
    /// `paid_out`.
    status: &'static str,
    by: String,
}

/// Rejected changes per replica and rule.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/rejections", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id.")),
    responses((status = 200, description = "Counts.", body = [Rejections]), ReadFailed))]
async fn rejections(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let served = known(&app, &s).await?;
    let rows = app.store.rejections(&served.handle.stand).await?;
    let out: Vec<Rejections> = rows
        .into_iter()
        .map(|(replica, rule, count)| Rejections {
            replica,
            rule,
            count,
        })
        .collect();
    Ok(Json(out).into_response())
}

/// Changes rejected from one replica under one rule.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Rejections {
    replica: String,
    rule: String,
    count: i64,
}

/// Re-check every stored change.
///
/// Signatures, hash links and the stored columns of every change, from its bytes; the first
/// break is reported. Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/audit/verify", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id.")),
    responses((status = 200, description = "`ok`, the number checked, and the first break if any.", body = AuditReport), ReadFailed))]
async fn audit_verify(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let served = known(&app, &s).await?;
    let stand = served.handle.stand.clone();
    let row = app
        .store
        .stand(&stand)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_stand", "not stored"))?;
    let rows = app.store.load_rows(&stand).await?;
    let now = stand::now_ms();
    let report =
        tokio::task::spawn_blocking(move || crate::audit::verify(&stand, row.pool_key, &rows, now))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
    Ok(Json(report).into_response())
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AtQuery {
    /// Milliseconds since the Unix epoch.
    at: u64,
}

/// Available per item as at a past time.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/stock/at", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id."), AtQuery),
    responses((status = 200, description = "sku → available at that time.", body = StockAtView), ReadFailed))]
async fn stock_at(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    q: Result<Query<AtQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let served = known(&app, &s).await?;
    let stock = ask(&served, |reply| StandCmd::StockAt { at_ms: q.at, reply }).await?;
    Ok(Json(StockAtView {
        stand: s,
        at: q.at,
        available: stock.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    })
    .into_response())
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StockAtView {
    stand: String,
    /// Milliseconds since the Unix epoch.
    at: u64,
    /// Sku → units available at that time.
    available: BTreeMap<String, i64>,
}

/// Live stock events.
///
/// Server-sent events: `stock`, the items each committed change moved. Role: viewer.
#[utoipa::path(get, path = "/v1/stands/{stand}/live", tag = "reads", security(("bearer" = [])), params(("stand" = String, Path, description = "The stand id.")),
    responses((status = 200, description = "An event stream.", content_type = "text/event-stream", body = String), ReadFailed))]
async fn live(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio_stream::StreamExt as _;
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let served = known(&app, &s).await?;
    let rx = served.handle.live.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|m| {
        // A subscriber that fell behind misses events, not the stream: say so.
        let data = m.unwrap_or_else(|_| r#"{"lagged":true}"#.to_owned());
        Some(Ok::<_, std::convert::Infallible>(
            Event::default().event("stock").data(data),
        ))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The admin API described as OpenAPI 3.1, made from these handlers.
#[utoipa::path(get, path = "/openapi.json", tag = "relay",
    responses((status = 200, description = "OpenAPI 3.1.", body = Object)))]
async fn openapi() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(crate::openapi::document).clone(),
    )
        .into_response()
}

/// Metrics in Prometheus text.
///
/// Uplinks, admin calls refused, stands loaded, and per stand its changes, connected replicas,
/// rejections and the rights requests it passed on.
#[utoipa::path(get, path = "/metrics", tag = "relay",
    responses((status = 200, description = "Prometheus text.", content_type = "text/plain", body = String)))]
async fn metrics(State(app): State<App>) -> Response {
    let m = &app.metrics;
    let mut t = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    gauge(
        "halftime_relay_uplinks_open",
        "Replicas connected over the uplink.",
        "gauge",
        m.uplinks_open.load(Ordering::Relaxed),
    );
    gauge(
        "halftime_relay_stands_loaded_total",
        "Stands loaded from the store since the start, each at its first uplink or admin call.",
        "counter",
        m.stands_loaded.load(Ordering::Relaxed),
    );
    gauge(
        "halftime_relay_uplinks_refused_total",
        "Uplinks refused (bad handshake, not a member).",
        "counter",
        m.uplinks_refused.load(Ordering::Relaxed),
    );
    gauge(
        "halftime_relay_admin_unauthorized_total",
        "Admin calls without a valid token.",
        "counter",
        m.admin_unauthorized.load(Ordering::Relaxed),
    );
    gauge(
        "halftime_relay_admin_forbidden_total",
        "Admin calls with too weak a role.",
        "counter",
        m.admin_forbidden.load(Ordering::Relaxed),
    );
    let mut per_stand = String::new();
    for s in app.served() {
        if let Ok(v) = view(&s).await {
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_changes{{stand=\"{}\"}} {}",
                v.stand, v.changes
            );
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_connected{{stand=\"{}\"}} {}",
                v.stand,
                v.connected.len()
            );
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_changes_rejected_total{{stand=\"{}\"}} {}",
                v.stand, v.changes_rejected
            );
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_frames_rejected_total{{stand=\"{}\"}} {}",
                v.stand, v.frames_rejected
            );
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_commit_failures_total{{stand=\"{}\"}} {}",
                v.stand, v.commit_failures
            );
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_rights_forwarded_total{{stand=\"{}\"}} {}",
                v.stand, v.rights_forwarded
            );
            let _ = writeln!(
                per_stand,
                "halftime_relay_stand_rights_asked_elsewhere_total{{stand=\"{}\"}} {}",
                v.stand, v.rights_asked_elsewhere
            );
        }
    }
    t.push_str(&per_stand);
    if let Ok(counts) = app.store.refund_counts().await {
        t.push_str("# HELP halftime_refunds Refunds decided by the reconciler, by status.\n# TYPE halftime_refunds gauge\n");
        for (status, n) in counts {
            let _ = writeln!(t, "halftime_refunds{{status=\"{status}\"}} {n}");
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        t,
    )
        .into_response()
}

/// The admin page.
///
/// The venue's stands at a glance, stock bars, restock, 86, reclaim. It holds nothing
/// itself; every call it makes carries the token typed into it.
#[utoipa::path(get, path = "/", tag = "relay",
    responses((status = 200, description = "HTML.", content_type = "text/html", body = String)))]
async fn admin_page() -> Response {
    axum::response::Html(include_str!("../assets/admin.html")).into_response()
}

/// The admin page, at `/admin` too.
#[utoipa::path(get, path = "/admin", tag = "relay",
    responses((status = 200, description = "HTML.", content_type = "text/html", body = String)))]
async fn admin_page_at_admin() -> Response {
    admin_page().await
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    info(
        title = "Halftime relay",
        description = "The stands' store of record, their uplink and the admins' door. Admin calls need `Authorization: Bearer <token>` (made with `halftime-relay token create`); each operation's description names the least role it needs (viewer < manager < admin)."
    ),
    paths(
        crate::uplink::upgrade,
        relay_info,
        list_stands,
        add_stand,
        restock,
        adjust,
        availability,
        catalog,
        enrol,
        replica_action,
        stock,
        sales,
        rejections,
        refunds,
        admin_requests,
        refund_paid_out,
        audit_verify,
        stock_at,
        live,
        metrics,
        openapi,
        admin_page,
        admin_page_at_admin,
    ),
    modifiers(&Bearer)
)]
/// The admin API's OpenAPI document, from the annotations on the handlers below and the
/// types they take and answer ([`crate::openapi::document`] serves it).
pub struct ApiDoc;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/stands/{stand}/uplink", get(uplink::upgrade))
        .route("/v1/relay", get(relay_info))
        .route("/v1/stands", get(list_stands).post(add_stand))
        .route("/v1/stands/{stand}/restock", post(restock))
        .route("/v1/stands/{stand}/adjust", post(adjust))
        .route(
            "/v1/stands/{stand}/items/{sku}/availability",
            put(availability),
        )
        .route("/v1/stands/{stand}/catalog", put(catalog))
        .route("/v1/stands/{stand}/replicas", post(enrol))
        .route(
            "/v1/stands/{stand}/replicas/{id}/{action}",
            post(replica_action),
        )
        .route("/v1/stands/{stand}/stock", get(stock))
        .route("/v1/stands/{stand}/sales", get(sales))
        .route("/v1/stands/{stand}/rejections", get(rejections))
        .route("/v1/stands/{stand}/refunds", get(refunds))
        .route("/v1/stands/{stand}/requests", get(admin_requests))
        .route(
            "/v1/stands/{stand}/refunds/{id}/paid-out",
            post(refund_paid_out),
        )
        .route("/v1/stands/{stand}/audit/verify", get(audit_verify))
        .route("/v1/stands/{stand}/stock/at", get(stock_at))
        .route("/v1/stands/{stand}/live", get(live))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(admin_page))
        .route("/admin", get(admin_page_at_admin))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}
