//! The handshake that opens a relay uplink, before any ledger frame: each side proves it holds
//! the key it names by signing a fresh challenge of the other's, bound to the stand, to its
//! side of the exchange and to both keys (so a signature cannot be replayed to another stand,
//! reflected back at its sender or relayed to a third party). Then both sides decide whether
//! the other may connect with [`Ledger::admits`](crate::Ledger::admits), the rule the stand
//! mesh uses too, and exchange the ledger's wire frames, one WebSocket binary message each.
//!
//! ```text
//! relay  → replica   Hello   { version, stand, relay key, relay challenge }
//! replica → relay    Auth    { replica key, replica challenge, sig(replica, relay challenge) }
//! relay  → replica   Welcome { sig(relay, replica challenge) }   or   Refused { reason }
//! ```

use crate::identity::{PublicKey, ReplicaKey};
use crate::ids::StandId;
use serde::{Deserialize, Serialize};

/// The handshake's version; a relay refuses any other.
pub const UPLINK_VERSION: u8 = 1;
/// A handshake message longer than this is refused unread.
pub const MAX_HANDSHAKE_BYTES: usize = 1_024;
/// Longest reason a refusal carries.
pub const MAX_REASON_BYTES: usize = 512;

/// One message of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handshake {
    Hello {
        version: u8,
        stand: StandId,
        key: PublicKey,
        challenge: [u8; 32],
    },
    Auth {
        key: PublicKey,
        challenge: [u8; 32],
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    Welcome {
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    Refused {
        reason: String,
    },
}

/// A handshake message that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake message of {0} bytes is over the {MAX_HANDSHAKE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed handshake message: {0}")]
    Malformed(String),
}

/// Which side signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Replica,
    Relay,
}

impl Handshake {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decode, bounding the size before parsing.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        if bytes.len() > MAX_HANDSHAKE_BYTES {
            return Err(HandshakeError::TooLarge(bytes.len()));
        }
        let (msg, rest) = postcard::take_from_bytes::<Self>(bytes)
            .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(HandshakeError::Malformed("trailing bytes".into()));
        }
        Ok(msg)
    }

    /// A refusal, its reason cut to [`MAX_REASON_BYTES`].
    pub fn refused(reason: impl Into<String>) -> Self {
        let mut reason: String = reason.into();
        if reason.len() > MAX_REASON_BYTES {
            let mut cut = MAX_REASON_BYTES;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Handshake::Refused { reason }
    }
}

/// What `signer` signs to answer `challenge`, sent by `other`.
fn transcript(
    side: Side,
    stand: &StandId,
    challenge: &[u8; 32],
    signer: &PublicKey,
    other: &PublicKey,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(160);
    t.extend_from_slice(b"halftime uplink 1\0");
    t.extend_from_slice(match side {
        Side::Replica => b"replica\0",
        Side::Relay => b"relay\0\0\0",
    });
    let s = stand.as_str().as_bytes();
    t.extend_from_slice(&(s.len() as u32).to_be_bytes());
    t.extend_from_slice(s);
    t.extend_from_slice(challenge);
    t.extend_from_slice(signer.bytes());
    t.extend_from_slice(other.bytes());
    t
}

/// Sign `challenge` (sent by the holder of `other`) as `side`.
pub fn sign(
    key: &ReplicaKey,
    side: Side,
    stand: &StandId,
    challenge: &[u8; 32],
    other: &PublicKey,
) -> Vec<u8> {
    key.sign(&transcript(side, stand, challenge, &key.public(), other))
        .to_vec()
}

/// Whether `signature` is `signer`'s answer, as `side`, to the `challenge` that `other` sent.
pub fn verify(
    signer: &PublicKey,
    side: Side,
    stand: &StandId,
    challenge: &[u8; 32],
    other: &PublicKey,
    signature: &[u8],
) -> bool {
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    signer.verify(&transcript(side, stand, challenge, signer, other), &sig)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stand(s: &str) -> StandId {
        StandId::new(s).unwrap()
    }

    #[test]
    fn a_signature_answers_only_its_own_challenge_stand_side_and_keys() {
        let (a, b, c) = (
            ReplicaKey::from_seed([1; 32]),
            ReplicaKey::from_seed([2; 32]),
            ReplicaKey::from_seed([3; 32]),
        );
        let ch = [9u8; 32];
        let sig = sign(&a, Side::Replica, &stand("north"), &ch, &b.public());
        let ok = |signer: &PublicKey, side, st: &str, ch: &[u8; 32], other: &PublicKey| {
            verify(signer, side, &stand(st), ch, other, &sig)
        };
        assert!(ok(&a.public(), Side::Replica, "north", &ch, &b.public()));
        assert!(!ok(&a.public(), Side::Relay, "north", &ch, &b.public()));
        assert!(!ok(&a.public(), Side::Replica, "south", &ch, &b.public()));
        assert!(!ok(
            &a.public(),
            Side::Replica,
            "north",
            &[8; 32],
            &b.public()
        ));
        assert!(!ok(&a.public(), Side::Replica, "north", &ch, &c.public()));
        assert!(!ok(&c.public(), Side::Replica, "north", &ch, &b.public()));
        assert!(!verify(
            &a.public(),
            Side::Replica,
            &stand("north"),
            &ch,
            &b.public(),
            &sig[..63]
        ));
    }

    #[test]
    fn hostile_handshake_bytes_are_refused_without_panic() {
        assert_eq!(
            Handshake::decode(&vec![0u8; MAX_HANDSHAKE_BYTES + 1]),
            Err(HandshakeError::TooLarge(MAX_HANDSHAKE_BYTES + 1))
        );
        assert!(Handshake::decode(&[]).is_err());
        assert!(Handshake::decode(&[0xff; 40]).is_err());
        // A refusal whose reason claims a huge length.
        assert!(Handshake::decode(&[3, 0xff, 0xff, 0xff, 0x0f, b'x']).is_err());
        // A valid message with a byte after it.
        let mut b = Handshake::refused("no").encode();
        assert_eq!(Handshake::decode(&b), Ok(Handshake::refused("no")));
        b.push(0);
        assert!(Handshake::decode(&b).is_err());
        // An Auth whose key is not a point on the curve.
        let mut auth = Handshake::Auth {
            key: ReplicaKey::from_seed([1; 32]).public(),
            challenge: [0; 32],
            signature: vec![0; 64],
        }
        .encode();
        assert!(Handshake::decode(&auth).is_ok());
        let at = auth.iter().position(|&x| x == 64).unwrap(); // the key's hex string length
        auth[at + 1] = b'z';
        assert!(Handshake::decode(&auth).is_err());
        // Long reasons are cut at a character boundary.
        let Handshake::Refused { reason } = Handshake::refused("é".repeat(400)) else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_REASON_BYTES);
    }
}
