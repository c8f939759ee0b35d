//! Newtype identifiers: one name per concept, validated at the edge.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted identifier (sku, stand, event, venue) in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Error for an identifier that does not fit the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {why}")]
pub struct InvalidId {
    /// Which kind of identifier.
    pub kind: &'static str,
    /// The offending text (truncated).
    pub value: String,
    /// What rule it broke.
    pub why: &'static str,
}

fn check(kind: &'static str, s: &str) -> Result<(), InvalidId> {
    let bad = |why| InvalidId {
        kind,
        value: s.chars().take(MAX_ID_BYTES).collect(),
        why,
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_ID_BYTES {
        return Err(bad("longer than 64 bytes"));
    }
    // '/' and '>' separate path segments in the document layout; keep ids plain.
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        // Shared text: identifiers are cloned into many map keys, and a clone is a count.
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Validate and wrap.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                check($kind, &s)?;
                Ok(Self(s.into()))
            }
            /// The text form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.to_string()
            }
        }
        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

text_id!(
    /// A stock-keeping unit: one item on the stand's menu (`hotdog`, `soda-l`).
    Sku,
    "sku"
);
text_id!(
    /// The stand this document belongs to (one document per stand per event).
    StandId,
    "stand id"
);
text_id!(
    /// The event (game, concert) the stand serves.
    EventId,
    "event id"
);

/// A replica of the stand document: the first 8 bytes of its ed25519 public key, in hex.
///
/// Short enough to appear in document keys; the full key in `/replicas/<rid>` is what
/// signatures are checked against, and enrolment refuses a second key with the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplicaId([u8; 8]);

/// The bytes' order, compared as one big-endian integer: the maps keyed by replica are the
/// hottest lookups of the engine and the simulator, and a byte-slice compare calls `memcmp`.
impl Ord for ReplicaId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        u64::from_be_bytes(self.0).cmp(&u64::from_be_bytes(other.0))
    }
}
impl PartialOrd for ReplicaId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Hex in human-readable formats (JSON: the API, change messages), the 8 raw bytes in binary
/// ones (the wire frames), so the hot path never formats or parses hex.
impl Serialize for ReplicaId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ReplicaId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 8]>::deserialize(d).map(Self)
        }
    }
}

impl ReplicaId {
    /// Derive from a public key.
    pub fn from_public(public: &[u8; 32]) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(&public[..8]);
        Self(b)
    }
    /// Raw bytes.
    pub fn bytes(&self) -> [u8; 8] {
        self.0
    }
}

impl TryFrom<String> for ReplicaId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        s.parse()
    }
}
impl From<ReplicaId> for String {
    fn from(v: ReplicaId) -> String {
        v.to_string()
    }
}
impl std::str::FromStr for ReplicaId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s, &mut b).map_err(|_| InvalidId {
            kind: "replica id",
            value: s.chars().take(MAX_ID_BYTES).collect(),
            why: "must be 16 lowercase hex digits",
        })?;
        Ok(Self(b))
    }
}
impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaId({self})")
    }
}

/// A sale: the selling replica and the sequence number of the change that recorded it.
/// Unique because a replica never reuses a sequence number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SaleId {
    /// Who sold.
    pub replica: ReplicaId,
    /// The seller's change sequence number.
    pub seq: u64,
}

impl TryFrom<String> for SaleId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        s.parse()
    }
}
impl From<SaleId> for String {
    fn from(v: SaleId) -> String {
        v.to_string()
    }
}
impl std::str::FromStr for SaleId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        let bad = || InvalidId {
            kind: "sale id",
            value: s.chars().take(MAX_ID_BYTES).collect(),
            why: "must look like <replica>-<seq>",
        };
        let (r, q) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            replica: r.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}
impl fmt::Display for SaleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.replica, self.seq)
    }
}
impl fmt::Debug for SaleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaleId({self})")
    }
}

/// What a replica is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The stand's pool: creates the document, holds unallocated stock, restocks, enrols.
    Pool,
    /// A point-of-sale terminal.
    Terminal,
    /// A kitchen display: replicates, never writes stock.
    Kitchen,
    /// A relay: replicates, validates, stores and passes changes on; writes nothing itself.
    Relay,
}

impl Role {
    /// The lowercase name used in the document and the APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Pool => "pool",
            Role::Terminal => "terminal",
            Role::Kitchen => "kitchen",
            Role::Relay => "relay",
        }
    }
    /// Parse the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pool" => Some(Role::Pool),
            "terminal" => Some(Role::Terminal),
            "kitchen" => Some(Role::Kitchen),
            "relay" => Some(Role::Relay),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_separators() {
        assert!(Sku::new("hot-dog_1.L").is_ok());
        assert!(Sku::new("a/b").is_err());
        assert!(Sku::new("a>b").is_err());
        assert!(Sku::new("").is_err());
        assert!(Sku::new("x".repeat(65)).is_err());
        let r = ReplicaId::from_public(&[7u8; 32]);
        assert_eq!(r.to_string().parse::<ReplicaId>(), Ok(r));
        let s = SaleId {
            replica: r,
            seq: 42,
        };
        assert_eq!(s.to_string().parse::<SaleId>(), Ok(s));
        assert!("zz-1".parse::<SaleId>().is_err());
        assert!(serde_json::from_str::<Sku>("\"a b\"").is_err());
    }

    #[test]
    fn replica_ids_order_as_their_hex_does() {
        let ids: Vec<ReplicaId> = [
            [0u8; 8],
            [0, 0, 0, 0, 0, 0, 0, 1],
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0x80, 0, 0, 0, 0, 0, 0, 0],
            [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            [0xff; 8],
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0],
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xef],
        ]
        .into_iter()
        .map(ReplicaId)
        .collect();
        for a in &ids {
            for b in &ids {
                assert_eq!(
                    a.cmp(b),
                    a.to_string().cmp(&b.to_string()),
                    "{a} against {b}"
                );
                assert_eq!(a.cmp(b), a.0.cmp(&b.0));
            }
        }
    }
}
