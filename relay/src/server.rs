//! The relay's HTTP side: the uplink, the admin API (a token with a role on every call) and
//! `/metrics`.
//!
//! | route | role | what |
//! | --- | --- | --- |
//! | `GET /v1/stands/{stand}/uplink` | replica key | WebSocket uplink of a stand replica |
//! | `GET /v1/relay` | viewer | the relay's public key (enrol it on a stand's pool as `relay`) |
//! | `GET /v1/stands` | viewer | every stand served: placement, changes held, connected replicas |
//! | `POST /v1/stands` | admin | `{stand, pool_key}`: serve a stand whose pool is a stand device |
//! | `GET /v1/stands/{stand}/stock` | viewer | per item: available, total in, marked off; rights per replica |
//! | `GET /v1/stands/{stand}/sales` | viewer | the latest sales (`?limit=`, at most 1000) |
//! | `GET /v1/stands/{stand}/rejections` | viewer | rejected changes per replica and rule |
//! | `GET /metrics` | none | Prometheus text |
//!
//! Without a valid `Authorization: Bearer …` token an admin call is 401; with too weak a
//! role, 403. Tokens are made with `halftime-relay token create` and stored hashed.

use crate::stand::{self, StandCmd, StandHandle, StandView};
use crate::store::{AdminRole, Placement, StandRow, Store, StoreError};
use crate::uplink;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use halftime_ledger::{PublicKey, ReplicaKey, StandId};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a request waits for a stand's task before giving up.
pub const STAND_TIMEOUT_MS: u64 = 10_000;
pub const MAX_SALES_LISTED: u32 = 1_000;

#[derive(Debug, Default)]
pub struct Metrics {
    pub uplinks_open: AtomicU64,
    pub uplinks_refused: AtomicU64,
    pub admin_unauthorized: AtomicU64,
    pub admin_forbidden: AtomicU64,
}

/// A stand served here: its task, and the key the relay speaks for it with (the relay's own,
/// or the pool's when the pool is at the relay).
#[derive(Debug, Clone)]
pub struct Served {
    pub handle: StandHandle,
    pub key: ReplicaKey,
    pub placement: Placement,
}

#[derive(Debug)]
pub struct Inner {
    pub store: Store,
    pub relay_key: ReplicaKey,
    stands: RwLock<BTreeMap<StandId, Served>>,
    pub next_conn: AtomicU64,
    pub metrics: Metrics,
}

#[derive(Debug, Clone)]
pub struct App(Arc<Inner>);

impl std::ops::Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    /// Open the relay over `store`: its key, and every stand it serves, loaded.
    pub async fn new(store: Store) -> Result<Self, StoreError> {
        let relay_key = store.relay_key().await?;
        let app = App(Arc::new(Inner {
            store: store.clone(),
            relay_key,
            stands: RwLock::new(BTreeMap::new()),
            next_conn: AtomicU64::new(1),
            metrics: Metrics::default(),
        }));
        for row in store.stands().await? {
            app.start_stand(row).await?;
        }
        Ok(app)
    }

    async fn start_stand(&self, row: StandRow) -> Result<Served, StoreError> {
        let key = match (row.placement, row.pool_secret) {
            (Placement::Relay, Some(s)) => ReplicaKey::from_seed(s),
            _ => self.relay_key.clone(),
        };
        let placement = row.placement;
        let handle = stand::start(self.store.clone(), self.relay_key.clone(), row).await?;
        let served = Served {
            handle,
            key,
            placement,
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
        if let Some(s) = self.stand(&stand) {
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
        };
        self.store.add_stand(&row, now_ms).await?;
        self.start_stand(row).await
    }
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.error, "message": self.message});
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

fn known(app: &App, s: &str) -> Result<Served, ApiError> {
    let id = stand_id(s)?;
    app.stand(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_stand",
            format!("this relay does not serve stand {s}"),
        )
    })
}

async fn view(s: &Served) -> Result<StandView, ApiError> {
    let (reply, rx) = oneshot::channel();
    let busy = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the stand is not answering",
        )
    };
    s.handle
        .tx
        .send(StandCmd::View { reply })
        .await
        .map_err(|_| busy())?;
    tokio::time::timeout(Duration::from_millis(STAND_TIMEOUT_MS), rx)
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())
}

async fn relay_info(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    Ok(Json(serde_json::json!({
        "public_key": app.relay_key.public().to_string(),
        "replica": app.relay_key.replica_id().to_string(),
        "database": format!("{:?}", app.store.backend()).to_lowercase(),
    }))
    .into_response())
}

async fn list_stands(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let mut out = Vec::new();
    for s in app.served() {
        out.push(view(&s).await?);
    }
    Ok(Json(out).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachInput {
    stand: String,
    pool_key: String,
}

async fn attach(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Json<AttachInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Admin).await?;
    let Json(input) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let stand = stand_id(&input.stand)?;
    let pool_key: PublicKey = input
        .pool_key
        .parse()
        .map_err(|e: halftime_ledger::KeyError| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("pool_key: {e}"),
            )
        })?;
    let served = app.attach_stand(stand, pool_key, stand::now_ms()).await?;
    let v = view(&served).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn stock(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let served = known(&app, &s)?;
    let (items, rights) = app.store.stock(&served.handle.stand).await?;
    let mut by_sku: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (sku, replica, units) in rights {
        by_sku.entry(sku).or_default().insert(replica, units);
    }
    let items: Vec<serde_json::Value> = items
        .into_iter()
        .map(|it| {
            let rights = by_sku.remove(it.sku.as_str()).unwrap_or_default();
            serde_json::json!({
                "sku": it.sku, "name": it.name, "price_cents": it.price_cents,
                "total_in": it.total_in, "available": it.available,
                "oversold": (-it.available).max(0), "marked_off": it.marked_off,
                "rights": rights,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"stand": s, "items": items})).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SalesQuery {
    limit: Option<u32>,
}

async fn sales(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
    q: Result<Query<SalesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let served = known(&app, &s)?;
    let limit = q.limit.unwrap_or(100).min(MAX_SALES_LISTED);
    Ok(Json(app.store.sales(&served.handle.stand, limit).await?).into_response())
}

async fn rejections(
    State(app): State<App>,
    headers: HeaderMap,
    Path(s): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, AdminRole::Viewer).await?;
    let served = known(&app, &s)?;
    let rows = app.store.rejections(&served.handle.stand).await?;
    let out: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(replica, rule, count)| serde_json::json!({"replica": replica, "rule": rule, "count": count}))
        .collect();
    Ok(Json(out).into_response())
}

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
        }
    }
    t.push_str(&per_stand);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        t,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/stands/{stand}/uplink", get(uplink::upgrade))
        .route("/v1/relay", get(relay_info))
        .route("/v1/stands", get(list_stands).post(attach))
        .route("/v1/stands/{stand}/stock", get(stock))
        .route("/v1/stands/{stand}/sales", get(sales))
        .route("/v1/stands/{stand}/rejections", get(rejections))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}
