//! # halftime-ledger
//!
//! The stand document of Halftime: one stand's stock at one event, replicated on every
//! terminal, kitchen display and the relay's pool replica, as an Automerge document whose every
//! change is signed by the replica that wrote it.
//!
//! Stock is an escrowed counter: each replica owns its `in`/`out` counters per sku and the
//! `give` entries it sends, so `rights(r, s) = in + Σ give[*>r] − Σ give[r>*] − out` can only be
//! lowered by `r` itself. Under the strict policy a sale commits only against own rights, so no
//! partition schedule can oversell.
//!
//! This crate is a pure state machine: no I/O, no clocks, no randomness. Time comes in as
//! milliseconds, keys come in as seeds, and results come back as values: a sale is
//! [`SaleOutcome::Committed`] with the [`SignedChange`] to persist and send, or
//! [`SaleOutcome::Refused`] with the reason.
//!
//! ```
//! use halftime_ledger::*;
//! use std::collections::BTreeMap;
//!
//! let pool_key = ReplicaKey::from_seed([1; 32]);
//! let till_key = ReplicaKey::from_seed([2; 32]);
//! let info = StandInfo {
//!     event: EventId::new("game-1").unwrap(),
//!     venue: "North High".into(),
//!     stand: StandId::new("north").unwrap(),
//!     policy: Policy::Strict,
//!     allocation: Allocation::Proportional,
//!     low_stock_pct: 10,
//! };
//! let hotdog = Sku::new("hotdog").unwrap();
//! let (mut pool, genesis) = Ledger::create_stand(pool_key.clone(), info, "pool", 1_000).unwrap();
//! let mut changes = vec![genesis];
//! changes.push(pool.set_catalog(vec![CatalogItem {
//!     sku: hotdog.clone(), name: "Hot dog".into(), price_cents: 400, low_stock_at: 5,
//! }], 1_001).unwrap());
//! changes.push(pool.enrol(till_key.public(), "till 1", Role::Terminal, 1_002).unwrap());
//! changes.push(pool.restock(BTreeMap::from([(hotdog.clone(), 50)]), "delivery", 1_003).unwrap());
//! changes.push(pool.give(till_key.replica_id(), BTreeMap::from([(hotdog.clone(), 20)]), 1_004).unwrap());
//!
//! let mut till = Ledger::join(till_key, StandId::new("north").unwrap(), pool_key.public());
//! let report = till.apply_remote(changes, 1_005);
//! assert_eq!(report.accepted.len(), 5);
//! let sale = till.sell(SaleRequest {
//!     lines: vec![SaleLine { sku: hotdog.clone(), qty: 2, unit_price_cents: 400 }],
//!     payment: Payment { method: PaymentMethod::Cash, reference: String::new() },
//!     pool_reachable: false,
//! }, 1_006);
//! assert!(matches!(sale, SaleOutcome::Committed { .. }));
//! assert_eq!(till.rights(till.me(), &hotdog), 18);
//! assert_eq!(till.available(&hotdog), 48);
//! ```

pub mod allocation;
pub mod chunk;
pub mod error;
pub mod hlc;
pub mod identity;
pub mod ids;
pub mod layout;
pub mod ledger;
pub mod message;
pub mod signed;
pub mod state;
pub mod sync;
pub mod uplink;

pub use allocation::{GivePlan, plan_allocation};
pub use automerge::ChangeHash;
pub use error::{NotAdmitted, OpError, Refusal, Rejection};
pub use hlc::{Clock, Hlc};
pub use identity::{KeyError, PublicKey, ReplicaKey};
pub use ids::{EventId, InvalidId, ReplicaId, Role, SaleId, Sku, StandId};
pub use ledger::{
    Admission, ApplyReport, ChangeBytes, ChangeInfo, InMemory, Ledger, LedgerStats,
    MAX_OPS_PER_CHANGE, MAX_PENDING_BYTES, MAX_PENDING_BYTES_PER_AUTHOR, MAX_TRACKED_KEYS,
    MAX_UNKNOWN_PENDING_BYTES, MAX_UNKNOWN_PENDING_BYTES_PER_AUTHOR, Recent, ReclaimView,
    SaleOutcome, SaleRequest, Shared, SnapshotError, SnapshotLoad, StockStatus, VersionVector,
    change_hash,
};
pub use ledger::{Applied, LedgerBug, RecordMemo, SignatureMemo};
pub use message::{
    AdminOp, Allocation, CatalogItem, ChangeMessage, Operation, Payment, PaymentMethod, Policy,
    SaleLine, SaleRecord, StandInfo,
};
pub use signed::SignedChange;
pub use sync::{PeerSync, WireError, WireMessage};
