//! The typed, versioned message every change carries. The change's ops move the counters; the
//! message says why, and receivers check that the two agree (see `validate`).

use crate::hlc::Hlc;
use crate::identity::PublicKey;
use crate::ids::{EventId, ReplicaId, Role, SaleId, Sku, StandId};
use crate::layout::MAX_UNITS;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the message schema written by this code.
pub const MESSAGE_VERSION: u16 = 1;
/// Longest change message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Most lines in one sale, restock or adjustment.
pub const MAX_LINES: usize = 64;
/// Most catalog items set by one change.
pub const MAX_CATALOG_ITEMS: usize = 512;
/// Highest unit price, in cents.
pub const MAX_PRICE_CENTS: u64 = 100_000_000;
/// Longest free-text field (names, notes, reasons, payment references), in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// Selling policy of a stand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Sell only against own rights: zero oversell by construction.
    #[default]
    Strict,
    /// Offline terminals may overdraw a bounded amount; the reconciler refunds oversell.
    Optimistic,
}

/// How rights are spread ahead of a disconnect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Each terminal gets 1/N of what is left.
    #[default]
    Proportional,
    /// Weighted by each terminal's recent sales rate.
    Velocity,
}

/// Who, what and where: the `/event` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandInfo {
    /// The event.
    pub event: EventId,
    /// Venue name (free text).
    pub venue: String,
    /// The stand.
    pub stand: StandId,
    /// Selling policy.
    pub policy: Policy,
    /// Allocation planner.
    pub allocation: Allocation,
    /// Default LOW_STOCK threshold in percent of an item's starting stock.
    pub low_stock_pct: u8,
}

/// One catalog entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    /// The item.
    pub sku: Sku,
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: u64,
    /// LOW_STOCK when available falls below this.
    pub low_stock_at: u64,
}

/// One line of a sale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLine {
    /// Item sold.
    pub sku: Sku,
    /// Units.
    pub qty: u64,
    /// Unit price charged, in cents.
    pub unit_price_cents: u64,
}

/// How a sale was paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentMethod {
    /// Card (refundable through the payment processor).
    Card,
    /// Cash (refunds go to a manual list).
    Cash,
}

impl PaymentMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentMethod::Card => "card",
            PaymentMethod::Cash => "cash",
        }
    }
}

/// Payment details.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Card or cash.
    pub method: PaymentMethod,
    /// Processor reference (e.g. a payment intent id); empty for cash.
    pub reference: String,
}

/// The sale record carried by a sale change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleRecord {
    /// Unique id.
    pub id: SaleId,
    /// When (hybrid logical clock).
    pub at: Hlc,
    /// What.
    pub lines: Vec<SaleLine>,
    /// How it was paid.
    pub payment: Payment,
    /// Sold while the pool was unreachable.
    pub offline: bool,
    /// Optimistic policy only: per sku, how far below zero rights this sale was allowed to go.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overdraft: BTreeMap<Sku, u64>,
}

impl SaleRecord {
    /// Total units per sku (saturating; a record that passed [`Operation::check_limits`]
    /// never comes near).
    pub fn units(&self) -> BTreeMap<Sku, u64> {
        let mut m: BTreeMap<Sku, u64> = BTreeMap::new();
        for l in &self.lines {
            let n = m.entry(l.sku.clone()).or_insert(0);
            *n = n.saturating_add(l.qty);
        }
        m
    }
    /// Total charged in cents.
    pub fn total_cents(&self) -> u64 {
        self.lines
            .iter()
            .map(|l| l.qty.saturating_mul(l.unit_price_cents))
            .fold(0, u64::saturating_add)
    }
}

/// Why a change was made: one variant per operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// The pool creates the stand document.
    Genesis {
        /// The stand.
        stand: StandInfo,
        /// The pool's own registration.
        pool: PublicKey,
        /// The pool's display name.
        name: String,
    },
    /// Add or edit catalog entries (pool only).
    Catalog {
        /// Entries set by this change.
        items: Vec<CatalogItem>,
    },
    /// Register a replica (pool only).
    Enrol {
        /// Its public key (its id derives from it).
        key: PublicKey,
        /// Display name.
        name: String,
        /// Role.
        role: Role,
    },
    /// Mark a replica retired (pool only).
    Retire {
        /// Which.
        replica: ReplicaId,
    },
    /// Retire a lost replica and take its last known rights back to the pool.
    Reclaim {
        /// Which.
        replica: ReplicaId,
        /// Rights taken back per sku.
        units: BTreeMap<Sku, u64>,
        /// Its gives as the pool saw them (sku → recipient → units): any more it gave out of
        /// the pool's sight gives its recipient no rights.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        gives: BTreeMap<Sku, BTreeMap<ReplicaId, u64>>,
    },
    /// Units came into being at the writer (pool only).
    Restock {
        /// Units per sku.
        units: BTreeMap<Sku, u64>,
        /// Free-text note.
        note: String,
    },
    /// Shrink: units lost (spoiled, dropped), consumed at the writer.
    Adjust {
        /// Units per sku.
        units: BTreeMap<Sku, u64>,
        /// Why.
        reason: String,
    },
    /// Selling rights moved from the writer to `to`.
    Give {
        /// Recipient.
        to: ReplicaId,
        /// Units per sku.
        units: BTreeMap<Sku, u64>,
    },
    /// A sale.
    Sale(SaleRecord),
    /// The item is marked unavailable at the stand ("86'd": the fryer is down) or available
    /// again. Each replica writes its own mark; the latest by hybrid logical clock wins.
    Mark {
        sku: Sku,
        /// `false` to mark it unavailable, `true` to bring it back.
        available: bool,
    },
    /// A sale undone by its seller: its units return.
    Void {
        /// The sale.
        sale: SaleId,
        /// Units returned per sku (must equal the sale's).
        units: BTreeMap<Sku, u64>,
    },
    /// The store of record refunded `units` of a sale's line (written by the pool or the
    /// relay, so every page of the stand can show it). Moves no stock: the units were sold.
    Refund { sale: SaleId, sku: Sku, units: u64 },
}

fn check_units(units: &BTreeMap<Sku, u64>, what: &str) -> Result<(), String> {
    if units.is_empty() || units.len() > MAX_LINES {
        return Err(format!("{what}: 1 to {MAX_LINES} items"));
    }
    for (sku, n) in units {
        if *n == 0 || *n > MAX_UNITS {
            return Err(format!("{what}: quantity of {sku} must be 1..={MAX_UNITS}"));
        }
    }
    Ok(())
}

fn check_text(s: &str, what: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "{what} is {} bytes, over {MAX_TEXT_BYTES}",
            s.len()
        ));
    }
    Ok(())
}

impl Operation {
    /// Every number and string within its bound, and every sum computable without overflow:
    /// the same check for an operation made here and one received from a peer.
    pub fn check_limits(&self) -> Result<(), String> {
        match self {
            Operation::Genesis { stand, name, .. } => {
                check_text(&stand.venue, "venue")?;
                check_text(name, "name")?;
                if stand.low_stock_pct > 100 {
                    return Err("low_stock_pct above 100".into());
                }
            }
            Operation::Catalog { items } => {
                if items.is_empty() || items.len() > MAX_CATALOG_ITEMS {
                    return Err(format!("1 to {MAX_CATALOG_ITEMS} catalog items"));
                }
                for it in items {
                    check_text(&it.name, "item name")?;
                    if it.price_cents > MAX_PRICE_CENTS || it.low_stock_at > MAX_UNITS {
                        return Err(format!("price or low-stock mark of {} too high", it.sku));
                    }
                }
            }
            Operation::Enrol { name, .. } => check_text(name, "name")?,
            Operation::Retire { .. } | Operation::Mark { .. } => {}
            Operation::Refund { units, .. } => {
                if *units == 0 || *units > MAX_UNITS {
                    return Err(format!("refund: quantity must be 1..={MAX_UNITS}"));
                }
            }
            Operation::Reclaim { units, gives, .. } => {
                if units.len() > MAX_CATALOG_ITEMS || gives.len() > MAX_CATALOG_ITEMS {
                    return Err("reclaim names too many items".into());
                }
                for (sku, n) in units {
                    if *n == 0 || *n > MAX_UNITS {
                        return Err(format!(
                            "reclaim: quantity of {sku} must be 1..={MAX_UNITS}"
                        ));
                    }
                }
                for to in gives.values() {
                    if to.values().any(|n| *n > MAX_UNITS) {
                        return Err("reclaim: a give cap is too high".into());
                    }
                }
            }
            Operation::Restock { units, note } => {
                check_units(units, "restock")?;
                check_text(note, "note")?;
            }
            Operation::Adjust { units, reason } => {
                check_units(units, "adjustment")?;
                check_text(reason, "reason")?;
            }
            Operation::Give { units, .. } => check_units(units, "give")?,
            Operation::Void { units, .. } => check_units(units, "void")?,
            Operation::Sale(rec) => {
                if rec.lines.is_empty() || rec.lines.len() > MAX_LINES {
                    return Err(format!("a sale has 1 to {MAX_LINES} lines"));
                }
                check_text(&rec.payment.reference, "payment reference")?;
                let mut total: u64 = 0;
                let mut units: BTreeMap<&Sku, u64> = BTreeMap::new();
                for l in &rec.lines {
                    if l.qty == 0 || l.qty > MAX_UNITS {
                        return Err(format!("quantity of {} must be 1..={MAX_UNITS}", l.sku));
                    }
                    if l.unit_price_cents > MAX_PRICE_CENTS {
                        return Err(format!("price of {} above {MAX_PRICE_CENTS}", l.sku));
                    }
                    let n = units.entry(&l.sku).or_insert(0);
                    *n = n
                        .checked_add(l.qty)
                        .filter(|n| *n <= MAX_UNITS)
                        .ok_or_else(|| format!("units of {} above {MAX_UNITS}", l.sku))?;
                    total = l
                        .qty
                        .checked_mul(l.unit_price_cents)
                        .and_then(|c| total.checked_add(c))
                        .ok_or("the sale's total overflows")?;
                }
                for (sku, od) in &rec.overdraft {
                    if !units.contains_key(sku) || *od > MAX_UNITS {
                        return Err(format!("overdraft of {sku} out of bounds"));
                    }
                }
                if !rec.overdraft.is_empty() && !rec.offline {
                    return Err("an overdraft is only claimed offline".into());
                }
            }
        }
        Ok(())
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::Genesis { .. } => "genesis",
            Operation::Catalog { .. } => "catalog",
            Operation::Enrol { .. } => "enrol",
            Operation::Retire { .. } => "retire",
            Operation::Reclaim { .. } => "reclaim",
            Operation::Restock { .. } => "restock",
            Operation::Adjust { .. } => "adjust",
            Operation::Give { .. } => "give",
            Operation::Sale(_) => "sale",
            Operation::Void { .. } => "void",
            Operation::Mark { .. } => "mark",
            Operation::Refund { .. } => "refund",
        }
    }
}

/// What an admin asks of a stand's pool: made at once when the pool is at the relay, else
/// carried to the pool device over the uplink as [`crate::WireMessage::AdminRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminOp {
    Restock {
        units: BTreeMap<Sku, u64>,
        note: String,
    },
    Adjust {
        units: BTreeMap<Sku, u64>,
        reason: String,
    },
    Mark {
        sku: Sku,
        available: bool,
    },
    Catalog {
        items: Vec<CatalogItem>,
    },
    Enrol {
        key: PublicKey,
        name: String,
        role: Role,
    },
    Retire {
        replica: ReplicaId,
    },
    Reclaim {
        replica: ReplicaId,
    },
}

impl AdminOp {
    /// The bounds of the change it would make, checked before it travels or is made.
    pub fn check_limits(&self) -> Result<(), String> {
        match self {
            AdminOp::Restock { units, note } => {
                check_units(units, "restock")?;
                check_text(note, "note")
            }
            AdminOp::Adjust { units, reason } => {
                check_units(units, "adjustment")?;
                check_text(reason, "reason")
            }
            AdminOp::Catalog { items } => Operation::Catalog {
                items: items.clone(),
            }
            .check_limits(),
            AdminOp::Enrol { name, .. } => check_text(name, "name"),
            AdminOp::Mark { .. } | AdminOp::Retire { .. } | AdminOp::Reclaim { .. } => Ok(()),
        }
    }

    /// Short name for logs and listings.
    pub fn kind(&self) -> &'static str {
        match self {
            AdminOp::Restock { .. } => "restock",
            AdminOp::Adjust { .. } => "adjust",
            AdminOp::Mark { .. } => "mark",
            AdminOp::Catalog { .. } => "catalog",
            AdminOp::Enrol { .. } => "enrol",
            AdminOp::Retire { .. } => "retire",
            AdminOp::Reclaim { .. } => "reclaim",
        }
    }
}

/// The envelope stored as the Automerge change message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeMessage {
    /// Schema version.
    pub v: u16,
    /// Hybrid-logical-clock time of the change (also the change's time field).
    #[serde(rename = "hlc")]
    pub at: Hlc,
    /// The operation.
    #[serde(flatten)]
    pub op: Operation,
    /// The admin request (its id at the relay) this pool change carries out: each is carried
    /// out once, whatever is resent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
}

/// A change message that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// No message at all.
    #[error("change has no message")]
    Missing,
    /// Too long.
    #[error("change message is {len} bytes, over the {max}-byte limit")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the expected shape.
    #[error("change message does not parse: {0}")]
    Malformed(String),
    /// Written by a newer schema.
    #[error("change message version {0} is not supported")]
    Version(u16),
}

impl ChangeMessage {
    /// Encode for the change.
    pub fn encode(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
    /// Decode and check the version.
    pub fn decode(s: Option<&str>) -> Result<Self, MessageError> {
        let s = s.ok_or(MessageError::Missing)?;
        if s.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLong {
                len: s.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let m: ChangeMessage =
            serde_json::from_str(s).map_err(|e| MessageError::Malformed(e.to_string()))?;
        if m.v != MESSAGE_VERSION {
            return Err(MessageError::Version(m.v));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let r = ReplicaId::from_public(&[1; 32]);
        let m = ChangeMessage {
            v: MESSAGE_VERSION,
            req: None,
            at: Hlc::new(5, 1),
            op: Operation::Sale(SaleRecord {
                id: SaleId { replica: r, seq: 3 },
                at: Hlc::new(5, 1),
                lines: vec![SaleLine {
                    sku: Sku::new("hotdog").unwrap(),
                    qty: 2,
                    unit_price_cents: 450,
                }],
                payment: Payment {
                    method: PaymentMethod::Card,
                    reference: "pi_1".into(),
                },
                offline: true,
                overdraft: BTreeMap::new(),
            }),
        };
        let s = m.encode();
        assert!(s.contains("\"op\":\"sale\""), "{s}");
        assert_eq!(ChangeMessage::decode(Some(&s)), Ok(m));
        assert_eq!(ChangeMessage::decode(None), Err(MessageError::Missing));
        assert!(matches!(
            ChangeMessage::decode(Some("{")),
            Err(MessageError::Malformed(_))
        ));
        let v2 = s.replace("\"v\":1", "\"v\":2");
        assert_eq!(
            ChangeMessage::decode(Some(&v2)),
            Err(MessageError::Version(2))
        );
    }
}
