//! The local POS API (JSON over HTTP on 127.0.0.1 by default) and the pages it serves.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/sales` | `{lines:[{sku,qty}], payment:{method,reference}}` → 201 sale, 409 refusal |
//! | `GET /v1/sales` | this terminal's latest 20 sales, newest first, with order numbers |
//! | `POST /v1/sales/{id}/void` | void a sale made here |
//! | `GET /v1/stock` | per item: name, price, available, rights, status, sellable now, marked off |
//! | `PUT /v1/items/{sku}/availability` | `{available: false}` marks an item off for the stand ("86"), `true` brings it back |
//! | `GET /v1/live` | server-sent events: stock, order and peer changes |
//! | `GET /v1/status` | replica, role, policy, peers, pool reachable, repair backlog |
//! | `GET /v1/orders`, `POST /v1/orders/{id}/done`, `.../recall` | the kitchen queue: bump, recall |
//! | `POST /v1/replicas/{id}/reclaim` | pool: retire a lost replica and take its rights back |
//! | `GET /metrics` | Prometheus text |
//! | `GET /`, `GET /kitchen` | the POS page and the kitchen page |

use crate::node::{ApiError, AvailabilityInput, Command, LiveEvent, SaleInput};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::Stream;
use halftime_ledger::{ReplicaId, SaleId};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a request waits for the node before giving up.
pub const NODE_TIMEOUT_MS: u64 = 10_000;

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Commands to the node.
    pub cmds: mpsc::Sender<Command>,
    /// Live events.
    pub live: broadcast::Sender<LiveEvent>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, Json(self)).into_response()
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError {
        status: 400,
        error: "bad_request",
        message,
        refusal: None,
        asked: None,
        waited_ms: None,
    }
}

async fn ask<T>(
    st: &AppState,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let busy = || ApiError {
        status: 503,
        error: "busy",
        message: "the node is not answering".into(),
        refusal: None,
        asked: None,
        waited_ms: None,
    };
    tokio::time::timeout(
        Duration::from_millis(NODE_TIMEOUT_MS),
        st.cmds.send(make(tx)),
    )
    .await
    .map_err(|_| busy())?
    .map_err(|_| busy())?;
    tokio::time::timeout(Duration::from_millis(NODE_TIMEOUT_MS), rx)
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(pos_page))
        .route("/kitchen", get(kitchen_page))
        .route("/v1/sales", post(sell).get(recent_sales))
        .route("/v1/sales/{id}/void", post(void))
        .route("/v1/stock", get(stock))
        .route("/v1/items/{sku}/availability", put(availability))
        .route("/v1/status", get(status))
        .route("/v1/live", get(live))
        .route("/v1/orders", get(orders))
        .route("/v1/orders/{id}/done", post(order_done))
        .route("/v1/orders/{id}/recall", post(order_recall))
        .route("/v1/replicas/{id}/reclaim", post(reclaim))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError {
                status: 404,
                error: "not_found",
                message: "no such route".into(),
                refusal: None,
                asked: None,
                waited_ms: None,
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: 405,
                error: "method_not_allowed",
                message: "this route does not take that method (sales are POSTed to /v1/sales)"
                    .into(),
                refusal: None,
                asked: None,
                waited_ms: None,
            }
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn pos_page() -> Html<&'static str> {
    Html(include_str!("../assets/pos.html"))
}

async fn kitchen_page() -> Html<&'static str> {
    Html(include_str!("../assets/kitchen.html"))
}

async fn sell(
    State(st): State<AppState>,
    body: Result<Json<SaleInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(input) = body.map_err(json_error)?;
    if input.lines.is_empty() {
        return Err(bad_request("a sale needs at least one line".into()));
    }
    let sale = ask(&st, |tx| Command::Sell(input, tx)).await??;
    Ok((StatusCode::CREATED, Json(sale)).into_response())
}

fn json_error(e: JsonRejection) -> ApiError {
    ApiError {
        status: e.status().as_u16(),
        error: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        },
        message: e.body_text(),
        refusal: None,
        asked: None,
        waited_ms: None,
    }
}

async fn availability(
    State(st): State<AppState>,
    Path(sku): Path<String>,
    body: Result<Json<AvailabilityInput>, JsonRejection>,
) -> Result<Response, ApiError> {
    let sku = halftime_ledger::Sku::new(sku).map_err(|e| bad_request(e.to_string()))?;
    let Json(input) = body.map_err(json_error)?;
    let row = ask(&st, |tx| Command::Mark(sku, input.available, tx)).await??;
    Ok(Json(row).into_response())
}

fn parse_sale(id: &str) -> Result<SaleId, ApiError> {
    id.parse()
        .map_err(|e: halftime_ledger::InvalidId| bad_request(e.to_string()))
}

async fn void(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let sale = parse_sale(&id)?;
    let v = ask(&st, |tx| Command::Void(sale, tx)).await??;
    Ok(Json(v).into_response())
}

async fn stock(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(ask(&st, Command::Stock).await?).into_response())
}

async fn status(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(ask(&st, Command::Status).await?).into_response())
}

async fn orders(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(ask(&st, Command::Orders).await?).into_response())
}

async fn order_done(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sale = parse_sale(&id)?;
    ask(&st, |tx| Command::OrderDone(sale, tx)).await??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn recent_sales(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(ask(&st, Command::RecentSales).await?).into_response())
}

async fn order_recall(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sale = parse_sale(&id)?;
    ask(&st, |tx| Command::OrderRecall(sale, tx)).await??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reclaim(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let replica: ReplicaId = id
        .parse()
        .map_err(|e: halftime_ledger::InvalidId| bad_request(e.to_string()))?;
    let r = ask(&st, |tx| Command::Reclaim(replica, tx)).await??;
    Ok(Json(r).into_response())
}

async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let text = ask(&st, Command::Metrics).await?;
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

async fn live(State(st): State<AppState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = st.live.subscribe();
    let stream = BroadcastStream::new(rx).filter_map(|ev| {
        // A lagging subscriber skips what it missed; the page refetches /v1/stock on `lagged`.
        let ev = match ev {
            Ok(ev) => Event::default().json_data(ev).ok()?,
            Err(_) => Event::default().event("lagged").data("{}"),
        };
        Some(Ok(ev))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
