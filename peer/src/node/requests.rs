//! What the API asks of the node, and the views it answers with.

use halftime_engine::SaleRefusal;
use halftime_ledger::{Policy, Refusal, ReplicaId, Role, SaleId, Sku, StockStatus};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio::sync::oneshot;

/// A request from the API to the node.
#[derive(Debug)]
pub enum Command {
    Sell(SaleInput, oneshot::Sender<Result<SaleView, ApiError>>),
    /// Void a sale.
    Void(SaleId, oneshot::Sender<Result<SaleView, ApiError>>),
    Stock(oneshot::Sender<Vec<StockRow>>),
    Status(oneshot::Sender<StatusView>),
    Orders(oneshot::Sender<Vec<OrderView>>),
    /// Mark an order done.
    OrderDone(SaleId, oneshot::Sender<Result<(), ApiError>>),
    Metrics(oneshot::Sender<String>),
    /// Pool: retire a lost replica and take its rights back, on the stand's latest view of it.
    Reclaim(ReplicaId, oneshot::Sender<Result<ReclaimResult, ApiError>>),
    /// Mark an item unavailable at the stand ("86" it) or available again.
    Mark(Sku, bool, oneshot::Sender<Result<StockRow, ApiError>>),
    /// This terminal's latest sales, newest first.
    RecentSales(oneshot::Sender<Vec<SaleView>>),
    /// Bring a bumped order back to the kitchen queue.
    OrderRecall(SaleId, oneshot::Sender<Result<(), ApiError>>),
}

/// The body of `PUT /v1/items/{sku}/availability`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityInput {
    pub available: bool,
}

/// What a reclaim did, and what it was based on.
#[derive(Debug, Clone, Serialize)]
pub struct ReclaimResult {
    #[serde(flatten)]
    pub view: halftime_ledger::ReclaimView,
    /// How long before the reclaim the replica made its last change (`None`: never wrote).
    pub last_change_age_ms: Option<u64>,
}

/// A sale as the API takes it. Unknown fields are refused: a field this version does not know
/// (`"discount": 100`) must not be silently ignored.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleInput {
    pub lines: Vec<LineInput>,
    pub payment: PaymentInput,
}

/// How a sale is paid, as the API takes it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentInput {
    pub method: halftime_ledger::PaymentMethod,
    /// The processor's reference (a payment intent id); empty for cash. At most
    /// `MAX_TEXT_BYTES`, like every text a change carries.
    #[serde(default)]
    pub reference: String,
}

/// One line as the API takes it: the price comes from the catalog.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineInput {
    pub sku: Sku,
    pub qty: u64,
}

/// A sale as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct SaleView {
    pub sale_id: SaleId,
    /// Short order number for screens and tickets: the terminal's name and its sale count
    /// (`till1-017`), the same on every replica.
    pub order_no: String,
    /// The selling terminal's name.
    pub terminal: String,
    pub sale: halftime_ledger::SaleRecord,
    pub total_cents: u64,
    pub voided: bool,
    /// Units refunded per sku by the store of record.
    pub refunded: BTreeMap<Sku, u64>,
    /// How long the sale waited for rights from other replicas before it committed (0: it
    /// committed at once).
    pub waited_ms: u64,
}

/// An API error: status code and body.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// Short error code.
    pub error: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// The structured refusal, when the ledger refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// For a refused sale: the replicas asked for rights before giving up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked: Option<Vec<ReplicaId>>,
    /// For a refused sale: how long it waited for rights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

impl ApiError {
    pub(super) fn refused(r: Refusal) -> Self {
        let (status, error) = match r {
            Refusal::UnknownSale { .. } => (404, "refused"),
            Refusal::Invalid { .. } | Refusal::UnknownSku { .. } => (422, "refused"),
            Refusal::NoStand | Refusal::NotEnrolled => (409, "not_a_member"),
            Refusal::UnknownReplica { .. } => (404, "refused"),
            _ => (409, "refused"),
        };
        Self {
            status,
            error,
            message: r.to_string(),
            refusal: Some(r),
            asked: None,
            waited_ms: None,
        }
    }
    pub(super) fn sale_refused(r: SaleRefusal) -> Self {
        let message = r.to_string();
        Self {
            message,
            asked: Some(r.asked),
            waited_ms: Some(r.waited_ms),
            ..Self::refused(r.reason)
        }
    }
    pub(super) fn internal(m: impl std::fmt::Display) -> Self {
        Self {
            status: 500,
            error: "internal",
            message: m.to_string(),
            refusal: None,
            asked: None,
            waited_ms: None,
        }
    }
    pub(super) fn unavailable(m: impl std::fmt::Display) -> Self {
        Self {
            status: 503,
            error: "storage_unavailable",
            message: m.to_string(),
            refusal: None,
            asked: None,
            waited_ms: None,
        }
    }
}

/// One row of the stock view.
#[derive(Debug, Clone, Serialize)]
pub struct StockRow {
    pub sku: Sku,
    pub name: String,
    pub price_cents: u64,
    /// What the stand has left.
    pub available: i64,
    /// This replica's rights.
    pub rights: i64,
    /// ok | low | out.
    pub status: StockStatus,
    /// Units this replica may sell right now.
    pub sellable_now: u64,
    /// Marked unavailable at the stand ("86'd"): not sold until marked available again.
    pub marked_off: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub replica: ReplicaId,
    /// This replica's name in the stand's registry ("till1"), once enrolled.
    pub name: Option<String>,
    /// Its libp2p identity.
    pub peer_id: String,
    /// Role, once enrolled.
    pub role: Option<Role>,
    pub stand: String,
    pub policy: Policy,
    /// Connected peers (replica ids).
    pub peers: Vec<ReplicaId>,
    /// Whether the pool is connected (on the pool: whether any replica is connected to it).
    pub pool_reachable: bool,
    /// Sync messages waiting to go out.
    pub repair_backlog: usize,
    /// Received changes waiting for dependencies.
    pub pending: usize,
    pub changes: usize,
    pub listen: Vec<String>,
}

/// A kitchen order.
#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    pub sale_id: SaleId,
    pub order_no: String,
    pub terminal: String,
    /// What to make, by item name.
    pub items: Vec<OrderItem>,
    pub lines: Vec<halftime_ledger::SaleLine>,
    /// When it reached this replica (ms).
    pub received_ms: u64,
    /// Marked done here.
    pub done: bool,
    /// Voided by the seller.
    pub voided: bool,
    /// Units refunded per sku by the store of record (the customer has their money back).
    pub refunded: BTreeMap<Sku, u64>,
}

/// One line of a kitchen ticket.
#[derive(Debug, Clone, Serialize)]
pub struct OrderItem {
    pub sku: Sku,
    pub name: String,
    pub qty: u64,
}

/// A live event.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// Stock of these items changed.
    Stock { rows: Vec<StockRow> },
    /// A new order (kitchen).
    Order { order: OrderView },
    Peers {
        peers: Vec<ReplicaId>,
        pool_reachable: bool,
    },
    /// The store of record refunded units of a sale: `units` of `sku` in all so far.
    Refund {
        sale_id: SaleId,
        order_no: String,
        sku: Sku,
        name: String,
        units: u64,
    },
}
