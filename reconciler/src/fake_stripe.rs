//! A stand-in for Stripe's API, for the tests and the demo: the payment-intent and refund
//! endpoints the reconciler uses, with Stripe's rules, and faults on demand.
//!
//! Rules kept (as Stripe documents them):
//! - a request with an `Idempotency-Key` it has seen with the same parameters gets the first
//!   response again, status and body, and changes nothing; the same key with other parameters
//!   is a 400 `idempotency_error`; a 5xx is not remembered (the key may be retried);
//! - a refund never takes a payment intent past what was charged (400 `amount_too_large`, or
//!   `charge_already_refunded` when nothing is left);
//! - an unknown payment intent is a 404 `resource_missing` naming the parameter;
//! - request bodies are form-encoded; errors have Stripe's `{"error": {...}}` shape.
//!
//! Faults (`POST /_faults`, JSON): `error` answers 500 without doing anything, `hang` never
//! answers, `hang_after` does the work and then never answers (the caller cannot know it
//! happened), `slow` answers after `delay_ms`; each for a `fraction` of requests, for `for_ms`
//! from now or until `DELETE /_faults`. `GET /_stats` counts what was done.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest form body taken, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Idempotency keys longer than this are refused, as Stripe does.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// What goes wrong, on purpose.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fault {
    /// `error`, `hang`, `hang_after` or `slow`.
    pub mode: String,
    /// Share of requests hit, 0.0–1.0.
    #[serde(default = "one")]
    pub fraction: f64,
    /// For how long from now (none: until cleared).
    #[serde(default)]
    pub for_ms: Option<u64>,
    /// `slow`: the delay.
    #[serde(default)]
    pub delay_ms: u64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone)]
struct PaymentIntent {
    amount: i64,
    currency: String,
    refunded: i64,
    created: i64,
}

#[derive(Debug, Clone, Serialize)]
struct Refund {
    id: String,
    payment_intent: String,
    amount: i64,
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Inner {
    intents: BTreeMap<String, PaymentIntent>,
    refunds: Vec<Refund>,
    /// Idempotency key → (the parameters it was first used with, the answer given).
    idempotent: HashMap<String, (Vec<(String, String)>, u16, Value)>,
    fault: Option<(Fault, Option<Instant>)>,
    requests: u64,
    replays: u64,
    faults_served: u64,
    next_id: u64,
}

/// The fake's state, shared by its handlers.
#[derive(Debug, Clone, Default)]
pub struct FakeStripe(Arc<Mutex<Inner>>);

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    msg: &str,
) -> (u16, Value) {
    let mut e = json!({ "type": kind, "message": msg });
    if let Some(c) = code {
        e["code"] = json!(c);
    }
    if let Some(p) = param {
        e["param"] = json!(p);
    }
    (status.as_u16(), json!({ "error": e }))
}

fn reply((status, body): (u16, Value)) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

/// What the current fault does to this request.
enum Hit {
    None,
    Error,
    Hang,
    HangAfter,
    Slow(u64),
}

impl FakeStripe {
    /// The routes, Stripe's under `/v1`, the fake's own under `/_`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/payment_intents", post(create_intent))
            .route("/v1/payment_intents/{id}", get(get_intent))
            .route("/v1/refunds", post(create_refund).get(list_refunds))
            .route("/_faults", post(set_fault).delete(clear_fault))
            .route("/_stats", get(stats))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hit(&self) -> Hit {
        let mut g = self.lock();
        g.requests += 1;
        let Some((f, until)) = g.fault.clone() else {
            return Hit::None;
        };
        if until.is_some_and(|u| Instant::now() >= u) {
            g.fault = None;
            return Hit::None;
        }
        if !rand::rng().random_bool(f.fraction.clamp(0.0, 1.0)) {
            return Hit::None;
        }
        g.faults_served += 1;
        match f.mode.as_str() {
            "error" => Hit::Error,
            "hang" => Hit::Hang,
            "hang_after" => Hit::HangAfter,
            "slow" => Hit::Slow(f.delay_ms),
            _ => Hit::None,
        }
    }
}

impl Inner {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_fake{:010}", self.next_id)
    }
}

/// Run `work` on the request's form fields under the current fault and the idempotency rules.
async fn guarded(
    s: &FakeStripe,
    headers: &HeaderMap,
    params: Vec<(String, String)>,
    work: impl FnOnce(&mut Inner, &[(String, String)]) -> (u16, Value),
) -> Response {
    let hit = s.hit();
    match hit {
        Hit::Error => {
            return reply(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                None,
                None,
                "An unknown error occurred (injected)",
            ));
        }
        Hit::Hang => std::future::pending::<()>().await,
        Hit::Slow(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Hit::None | Hit::HangAfter => {}
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut sorted = params;
    sorted.sort();
    // One lock over the check and the work: two requests with one key never both do it.
    let answer = {
        let mut g = s.lock();
        match &key {
            Some(k) if k.len() > MAX_IDEMPOTENCY_KEY => error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                None,
                "Idempotency-Key is too long",
            ),
            Some(k) => match g.idempotent.get(k).cloned() {
                Some((p, status, body)) if p == sorted => {
                    g.replays += 1;
                    (status, body)
                }
                Some(_) => error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    None,
                    None,
                    &format!(
                        "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{k}' if you meant to execute a different request."
                    ),
                ),
                None => {
                    let (status, body) = work(&mut g, &sorted);
                    if status < 500 {
                        g.idempotent
                            .insert(k.clone(), (sorted, status, body.clone()));
                    }
                    (status, body)
                }
            },
            None => work(&mut g, &sorted),
        }
    };
    if matches!(hit, Hit::HangAfter) {
        std::future::pending::<()>().await;
    }
    reply(answer)
}

fn field<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn intent_json(id: &str, pi: &PaymentIntent) -> Value {
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": pi.amount,
        "amount_received": pi.amount,
        "currency": pi.currency,
        "status": "succeeded",
        "created": pi.created,
        "livemode": false,
        "metadata": {},
    })
}

fn refund_json(r: &Refund, currency: &str) -> Value {
    json!({
        "id": r.id,
        "object": "refund",
        "amount": r.amount,
        "currency": currency,
        "payment_intent": r.payment_intent,
        "status": "succeeded",
        "created": now_s(),
        "metadata": r.metadata,
    })
}

async fn create_intent(
    State(s): State<FakeStripe>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> Response {
    guarded(&s, &headers, params, |g, p| {
        let Some(amount) = field(p, "amount").and_then(|a| a.parse::<i64>().ok()) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_missing"),
                Some("amount"),
                "Missing required param: amount.",
            );
        };
        if amount < 1 {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("amount_too_small"),
                Some("amount"),
                "Amount must be at least 1 cent",
            );
        }
        let currency = field(p, "currency").unwrap_or("usd").to_owned();
        let id = g.id("pi");
        let pi = PaymentIntent {
            amount,
            currency,
            refunded: 0,
            created: now_s(),
        };
        let body = intent_json(&id, &pi);
        g.intents.insert(id, pi);
        (200, body)
    })
    .await
}

async fn get_intent(State(s): State<FakeStripe>, Path(id): Path<String>) -> Response {
    let g = s.lock();
    match g.intents.get(&id) {
        Some(pi) => reply((200, intent_json(&id, pi))),
        None => reply(missing_intent(&id, "intent")),
    }
}

fn missing_intent(id: &str, param: &str) -> (u16, Value) {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        Some(param),
        &format!("No such payment_intent: '{id}'"),
    )
}

async fn create_refund(
    State(s): State<FakeStripe>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> Response {
    guarded(&s, &headers, params, |g, p| {
        let Some(pi_id) = field(p, "payment_intent") else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_missing"),
                Some("payment_intent"),
                "One of the following params should be provided for this request: payment_intent or charge.",
            );
        };
        let Some(pi) = g.intents.get(pi_id).cloned() else {
            return missing_intent(pi_id, "payment_intent");
        };
        let left = pi.amount - pi.refunded;
        let amount = match field(p, "amount") {
            None => left,
            Some(a) => match a.parse::<i64>() {
                Ok(a) if a >= 1 => a,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        Some("parameter_invalid_integer"),
                        Some("amount"),
                        "Invalid positive integer",
                    );
                }
            },
        };
        if left <= 0 {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("charge_already_refunded"),
                None,
                &format!("Charge for payment_intent {pi_id} has already been refunded."),
            );
        }
        if amount > left {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("amount_too_large"),
                Some("amount"),
                &format!(
                    "Refund amount ({amount}) is greater than unrefunded amount on charge ({left})"
                ),
            );
        }
        let metadata: BTreeMap<String, String> = p
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("metadata[")?.strip_suffix(']')?;
                Some((name.to_owned(), v.clone()))
            })
            .collect();
        let id = g.id("re");
        let r = Refund {
            id,
            payment_intent: pi_id.to_owned(),
            amount,
            metadata,
        };
        if let Some(pi) = g.intents.get_mut(pi_id) {
            pi.refunded += amount;
        }
        let body = refund_json(&r, &pi.currency);
        g.refunds.push(r);
        (200, body)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    payment_intent: Option<String>,
}

async fn list_refunds(State(s): State<FakeStripe>, Query(q): Query<ListQuery>) -> Response {
    let g = s.lock();
    let data: Vec<Value> = g
        .refunds
        .iter()
        .filter(|r| {
            q.payment_intent
                .as_ref()
                .is_none_or(|p| *p == r.payment_intent)
        })
        .map(|r| {
            let cur = g
                .intents
                .get(&r.payment_intent)
                .map_or("usd", |p| p.currency.as_str());
            refund_json(r, cur)
        })
        .collect();
    reply((
        200,
        json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/refunds" }),
    ))
}

async fn set_fault(State(s): State<FakeStripe>, Json(f): Json<Fault>) -> Response {
    if !["error", "hang", "hang_after", "slow"].contains(&f.mode.as_str()) {
        return reply((
            400,
            json!({ "error": format!("unknown fault mode {:?} (error | hang | hang_after | slow)", f.mode) }),
        ));
    }
    // A window too long to represent lasts until cleared.
    let until = f
        .for_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    s.lock().fault = Some((f.clone(), until));
    reply((200, json!({ "fault": f })))
}

async fn clear_fault(State(s): State<FakeStripe>) -> Response {
    s.lock().fault = None;
    reply((200, json!({ "fault": null })))
}

async fn stats(State(s): State<FakeStripe>) -> Response {
    let g = s.lock();
    let mut per_intent: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for r in &g.refunds {
        let e = per_intent.entry(r.payment_intent.as_str()).or_default();
        e.0 += 1;
        e.1 += r.amount;
    }
    let per_intent: BTreeMap<&str, Value> = per_intent
        .into_iter()
        .map(|(k, (n, a))| (k, json!({ "refunds": n, "amount": a })))
        .collect();
    reply((
        200,
        json!({
            "requests": g.requests,
            "replays": g.replays,
            "faults_served": g.faults_served,
            "payment_intents": g.intents.len(),
            "refunds": g.refunds.len(),
            "refunded_amount": g.refunds.iter().map(|r| r.amount).sum::<i64>(),
            "by_payment_intent": per_intent,
        }),
    ))
}
