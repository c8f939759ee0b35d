//! Rejections of received changes and refusals of local operations, as values.

use crate::ids::{ReplicaId, Role, SaleId, Sku};
use crate::message::MessageError;

/// Why a received change was rejected. The document is unchanged by a rejected change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The bytes are not an Automerge change.
    #[error("malformed change: {0}")]
    Malformed(String),
    /// Over the size limit.
    #[error("change of {len} bytes exceeds the limit")]
    TooLarge {
        /// Size.
        len: usize,
    },
    /// The signature does not verify against the registered key.
    #[error("bad signature for replica {replica}")]
    BadSignature {
        /// Claimed author.
        replica: ReplicaId,
    },
    /// The actor is not in the registry (the change waited and the queue overflowed or it was
    /// checked after a full repair).
    #[error("actor {actor} is not an enrolled replica")]
    UnregisteredActor {
        /// Hex actor id (truncated).
        actor: String,
    },
    /// The change's message does not parse.
    #[error("bad message: {0}")]
    Message(#[from] MessageError),
    /// An op targets an object or key the actor does not own.
    #[error("replica {replica} wrote to {target}, which it does not own")]
    NotOwner {
        /// Writer.
        replica: ReplicaId,
        /// What it touched.
        target: String,
    },
    /// An op claims to overwrite another replica's op.
    #[error("replica {replica} overwrote an op of another replica at {target}")]
    ForeignPred {
        /// Writer.
        replica: ReplicaId,
        /// Where.
        target: String,
    },
    /// An op kind the layout never uses (delete, increment, list, text, mark, insert).
    #[error("op not allowed by the layout: {0}")]
    ForbiddenOp(String),
    /// A counter went down.
    #[error("replica {replica}: {field} of {sku} would shrink from {from} to {to}")]
    Shrinking {
        /// Writer.
        replica: ReplicaId,
        /// Item.
        sku: Sku,
        /// Which counter.
        field: String,
        /// Old value.
        from: u64,
        /// New value.
        to: u64,
    },
    /// A terminal's `in` would exceed its `out` (minting by void).
    #[error("replica {replica} would mint {sku}: in {in_units} above out {out_units}")]
    Minting {
        /// Writer.
        replica: ReplicaId,
        /// Item.
        sku: Sku,
        /// In.
        in_units: u64,
        /// Out.
        out_units: u64,
    },
    /// The counter moves do not match what the message says.
    #[error("ops do not match the {op} message for {sku}")]
    MessageMismatch {
        /// Operation kind.
        op: &'static str,
        /// Item.
        sku: String,
    },
    /// The message is inconsistent or not allowed for this writer.
    #[error("invalid {op}: {why}")]
    InvalidOperation {
        /// Operation kind.
        op: &'static str,
        /// Why.
        why: String,
    },
    /// A pool-only section written by someone else.
    #[error("replica {replica} ({role:?}) wrote the pool-only {section} section")]
    PoolOnly {
        /// Writer.
        replica: ReplicaId,
        /// Its role.
        role: Role,
        /// Section.
        section: &'static str,
    },
    /// Rights below what the policy allows.
    #[error("replica {replica}: rights for {sku} would be {rights}, below the floor {floor}")]
    BelowFloor {
        /// Writer.
        replica: ReplicaId,
        /// Item.
        sku: Sku,
        /// Resulting rights.
        rights: i64,
        /// Allowed floor.
        floor: i64,
    },
    /// A retired replica wrote after learning of its retirement.
    #[error("replica {replica} is retired")]
    Retired {
        /// Writer.
        replica: ReplicaId,
    },
    /// The change depends on a change that was rejected.
    #[error("depends on a rejected change")]
    DependsOnRejected,
    /// The change is for another stand, or there is no stand yet and it is not the genesis.
    #[error("not a change of this stand: {0}")]
    WrongStand(String),
    /// The author's changes are numbered 1, 2, 3…: this one skips a number its author has not
    /// written in its causal past.
    #[error("replica {replica}: change {seq} skips a sequence number (holds {held})")]
    SequenceGap {
        replica: ReplicaId,
        /// The change's sequence number.
        seq: u64,
        /// How many of its changes are held.
        held: u64,
    },
    /// A second, different change with a sequence number the author already used: the key
    /// signed two histories (a cloned or compromised device).
    #[error("replica {replica} signed a second change numbered {seq}")]
    Equivocation {
        replica: ReplicaId,
        /// The reused sequence number.
        seq: u64,
    },
    /// Op ids that are not the next ones after everything in the change's causal past.
    #[error("replica {replica}: {why}")]
    BadOpIds { replica: ReplicaId, why: String },
    /// An op's `pred` is not exactly the op holding the current value it overwrites.
    #[error("replica {replica}: pred at {target} is not the current value's op")]
    BadPred { replica: ReplicaId, target: String },
    /// The change is dated before a change it depends on.
    #[error("replica {replica}: change dated {at_ms} ms, before its dependency at {dep_ms} ms")]
    BeforeItsPast {
        replica: ReplicaId,
        /// Its wall time.
        at_ms: u64,
        /// The latest wall time among its dependencies.
        dep_ms: u64,
    },
    /// Dated further ahead of this replica's clock than any honest clock drifts. Not
    /// remembered: the same change is taken once the clock has caught up.
    #[error("replica {replica}: change dated {ahead_ms} ms ahead of this clock")]
    FromTheFuture {
        replica: ReplicaId,
        /// How far ahead.
        ahead_ms: u64,
    },
    /// Automerge refused a change every rule admitted (a fault of this code, not the peer's).
    #[error("internal fault: {0}")]
    Internal(String),
}

impl Rejection {
    /// A short stable name for the rule, for metrics.
    pub fn rule(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::BadSignature { .. } => "bad_signature",
            Rejection::UnregisteredActor { .. } => "unregistered_actor",
            Rejection::Message(_) => "bad_message",
            Rejection::NotOwner { .. } => "not_owner",
            Rejection::ForeignPred { .. } => "foreign_pred",
            Rejection::ForbiddenOp(_) => "forbidden_op",
            Rejection::Shrinking { .. } => "shrinking",
            Rejection::Minting { .. } => "minting",
            Rejection::MessageMismatch { .. } => "message_mismatch",
            Rejection::InvalidOperation { .. } => "invalid_operation",
            Rejection::PoolOnly { .. } => "pool_only",
            Rejection::BelowFloor { .. } => "below_floor",
            Rejection::Retired { .. } => "retired",
            Rejection::DependsOnRejected => "depends_on_rejected",
            Rejection::WrongStand(_) => "wrong_stand",
            Rejection::SequenceGap { .. } => "sequence_gap",
            Rejection::Equivocation { .. } => "equivocation",
            Rejection::BadOpIds { .. } => "bad_op_ids",
            Rejection::BadPred { .. } => "bad_pred",
            Rejection::BeforeItsPast { .. } => "before_its_past",
            Rejection::FromTheFuture { .. } => "from_the_future",
            Rejection::Internal(_) => "internal_fault",
        }
    }

    /// Whether the same change may be accepted later (so its hash is not remembered as bad).
    pub fn is_transient(&self) -> bool {
        matches!(self, Rejection::FromTheFuture { .. })
    }
}

/// Why a local operation was refused. A refusal writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// Not enough selling rights here.
    #[error("insufficient rights for {sku}: have {have}, want {want}")]
    InsufficientRights {
        /// Item.
        sku: Sku,
        /// What may be sold now.
        have: i64,
        /// What was asked.
        want: u64,
    },
    /// LOW_STOCK items are not sold offline under the optimistic policy.
    #[error("{sku} is low on stock and cannot be sold offline")]
    LockedLowStock {
        /// Item.
        sku: Sku,
    },
    /// The item is marked unavailable at the stand.
    #[error("{sku} is marked unavailable at this stand (86'd)")]
    MarkedOff { sku: Sku },
    /// Not in the catalog.
    #[error("unknown sku {sku}")]
    UnknownSku {
        /// Item.
        sku: Sku,
    },
    /// This replica is retired.
    #[error("this replica is retired")]
    Retired,
    /// This replica is not (yet) enrolled in the stand document.
    #[error("not a member of this stand yet: the pool has not enrolled this replica")]
    NotEnrolled,
    /// The operation is not for this role.
    #[error("a {role:?} replica cannot do this")]
    WrongRole {
        /// This replica's role.
        role: Role,
    },
    /// Request is malformed.
    #[error("invalid request: {why}")]
    Invalid {
        /// What is wrong.
        why: String,
    },
    /// No such sale.
    #[error("unknown sale {sale}")]
    UnknownSale {
        /// Sale.
        sale: SaleId,
    },
    /// Only the seller voids a sale.
    #[error("sale {sale} was not made here")]
    NotYourSale {
        /// Sale.
        sale: SaleId,
    },
    /// Already voided.
    #[error("sale {sale} is already voided")]
    AlreadyVoided {
        /// Sale.
        sale: SaleId,
    },
    /// The named replica is unknown.
    #[error("unknown replica {replica}")]
    UnknownReplica {
        /// Replica.
        replica: ReplicaId,
    },
    /// A reachable replica holds changes of the replica to reclaim that this pool does not:
    /// reclaiming now would move rights it no longer held.
    #[error(
        "the pool is behind on {replica}: it holds {have} of its changes, a reachable replica \
         holds {known}; wait for the stand to sync"
    )]
    PoolBehind {
        /// The replica to reclaim.
        replica: ReplicaId,
        /// Its changes held here.
        have: u64,
        /// Its changes held by the best-informed reachable replica.
        known: u64,
    },
    /// The stand document does not exist yet on this replica.
    #[error(
        "not a member of any stand yet: no replica of the stand has reached this one (check \
         the stand key and that the pool enrolled this replica)"
    )]
    NoStand,
}

/// Failure of a local operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Refused by the rules; nothing was written.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// An internal fault (a bug): the operation did not complete.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a replica may not connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAdmitted {
    /// Not the pool, and no enrolment of this key has been seen.
    #[error(
        "replica {replica} is not enrolled in stand {stand} (as far as this replica has heard \
         from the pool): enrol its public key on the pool"
    )]
    NotEnrolled { replica: ReplicaId, stand: String },
    /// The pool retired it.
    #[error("replica {replica} was retired from stand {stand}")]
    Retired { replica: ReplicaId, stand: String },
}
