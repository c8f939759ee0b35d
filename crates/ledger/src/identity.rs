//! Replica identity: one ed25519 key is the replica's signing key, its Automerge actor id and
//! (in the peer) its libp2p identity, so "who wrote this" and "who is connected" are the same.

use crate::ids::ReplicaId;
use automerge::ActorId;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Error for key material that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The bytes are not a valid ed25519 public key.
    #[error("not a valid ed25519 public key")]
    BadPublicKey,
    /// Wrong length or encoding.
    #[error("key material must be 32 bytes (64 hex digits)")]
    BadLength,
    /// The libp2p key is not ed25519.
    #[error("the libp2p key is not an ed25519 key")]
    NotEd25519,
}

/// A replica's public key: what the document registers and what signatures are checked against.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Validate 32 bytes as an ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::BadPublicKey)?;
        Ok(Self(bytes))
    }
    /// The key of a verifying key, which is a valid point already.
    pub fn from_verifying_key(k: &VerifyingKey) -> Self {
        Self(k.to_bytes())
    }
    /// Raw bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// The replica id (first 8 bytes).
    pub fn replica_id(&self) -> ReplicaId {
        ReplicaId::from_public(&self.0)
    }
    /// The Automerge actor id: the whole public key.
    pub fn actor(&self) -> ActorId {
        ActorId::from(&self.0)
    }
    /// The verifying key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::BadPublicKey)
    }
    /// Check a signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        match self.verifying_key() {
            Ok(k) => k.verify(msg, &Signature::from_bytes(sig)).is_ok(),
            Err(_) => false,
        }
    }
    /// The libp2p public key for the same identity.
    pub fn to_libp2p(&self) -> Result<libp2p_identity::PublicKey, KeyError> {
        let k = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(|_| KeyError::BadPublicKey)?;
        Ok(libp2p_identity::PublicKey::from(k))
    }
    /// The libp2p PeerId of this replica.
    pub fn peer_id(&self) -> Result<libp2p_identity::PeerId, KeyError> {
        Ok(self.to_libp2p()?.to_peer_id())
    }
    /// From a libp2p public key (must be ed25519).
    pub fn from_libp2p(k: &libp2p_identity::PublicKey) -> Result<Self, KeyError> {
        let ed = k
            .clone()
            .try_into_ed25519()
            .map_err(|_| KeyError::NotEd25519)?;
        Self::from_bytes(ed.to_bytes())
    }
    /// A short fingerprint for logs.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl TryFrom<String> for PublicKey {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        s.parse()
    }
}
impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_string()
    }
}
impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| KeyError::BadLength)?;
        Self::from_bytes(b)
    }
}
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// A replica's secret key. The ledger never draws randomness: the driver supplies the seed.
#[derive(Clone)]
pub struct ReplicaKey {
    signing: SigningKey,
}

impl ReplicaKey {
    /// Build from 32 secret bytes (from the OS RNG in a driver, from a seeded RNG in tests).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }
    /// The secret bytes, for storage.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }
    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }
    /// This replica's id.
    pub fn replica_id(&self) -> ReplicaId {
        self.public().replica_id()
    }
    /// Sign bytes.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }
    /// The same identity as a libp2p keypair.
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        let mut secret = self.signing.to_bytes();
        // `try_from_bytes` only fails on a wrong length, and this is always 32 bytes.
        match libp2p_identity::ed25519::SecretKey::try_from_bytes(&mut secret) {
            Ok(sk) => libp2p_identity::Keypair::from(libp2p_identity::ed25519::Keypair::from(sk)),
            Err(_) => unreachable!("an ed25519 secret key is 32 bytes"),
        }
    }
    /// From a libp2p keypair (must be ed25519).
    pub fn from_libp2p(k: &libp2p_identity::Keypair) -> Result<Self, KeyError> {
        let ed = k
            .clone()
            .try_into_ed25519()
            .map_err(|_| KeyError::NotEd25519)?;
        let b = ed.secret();
        let mut seed = [0u8; 32];
        seed.copy_from_slice(b.as_ref());
        Ok(Self::from_seed(seed))
    }
}

impl fmt::Debug for ReplicaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaKey({})", self.public().fingerprint())
    }
}

/// A batch of at least this many signatures is verified on two threads, in halves: a relay
/// verifies a frame of a few hundred at a time, and a terminal a catch-up after an outage.
pub const PARALLEL_VERIFY_MIN: usize = 128;

/// Verify many `(key, message, signature)` triples at once; on failure, the indices that fail.
pub fn verify_many(items: &[(VerifyingKey, &[u8], [u8; 64])]) -> Vec<usize> {
    if items.len() < PARALLEL_VERIFY_MIN {
        return verify_batch(items);
    }
    let (a, b) = items.split_at(items.len() / 2);
    let (bad_a, bad_b) = std::thread::scope(|s| {
        let other = s.spawn(|| verify_batch(b));
        let bad_a = verify_batch(a);
        // A panic on the other thread is a bug of the curve library: check that half here.
        (bad_a, other.join().unwrap_or_else(|_| verify_batch(b)))
    });
    let mut bad = bad_a;
    bad.extend(bad_b.into_iter().map(|i| i + a.len()));
    bad
}

fn verify_batch(items: &[(VerifyingKey, &[u8], [u8; 64])]) -> Vec<usize> {
    if items.is_empty() {
        return Vec::new();
    }
    let keys: Vec<VerifyingKey> = items.iter().map(|(k, _, _)| *k).collect();
    let msgs: Vec<&[u8]> = items.iter().map(|(_, m, _)| *m).collect();
    let sigs: Vec<Signature> = items
        .iter()
        .map(|(_, _, s)| Signature::from_bytes(s))
        .collect();
    if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
        return Vec::new();
    }
    // Some signature is bad: find which, one by one.
    items
        .iter()
        .enumerate()
        .filter(|(_, (k, m, s))| k.verify(m, &Signature::from_bytes(s)).is_err())
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libp2p_identity_round_trips() {
        let k = ReplicaKey::from_seed([9u8; 32]);
        let kp = k.to_libp2p();
        assert_eq!(kp.public().to_peer_id(), k.public().peer_id().unwrap());
        let back = ReplicaKey::from_libp2p(&kp).unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(PublicKey::from_libp2p(&kp.public()).unwrap(), k.public());
        assert_eq!(k.public().actor().to_bytes(), k.public().bytes());
    }

    #[test]
    fn signatures_verify_and_batch_finds_the_bad_one() {
        let a = ReplicaKey::from_seed([1u8; 32]);
        let b = ReplicaKey::from_seed([2u8; 32]);
        let sa = a.sign(b"x");
        let sb = b.sign(b"y");
        assert!(a.public().verify(b"x", &sa));
        assert!(!a.public().verify(b"y", &sa));
        let (ka, kb) = (
            a.public().verifying_key().unwrap(),
            b.public().verifying_key().unwrap(),
        );
        assert_eq!(PublicKey::from_verifying_key(&ka), a.public());
        assert!(verify_many(&[(ka, b"x", sa), (kb, b"y", sb)]).is_empty());
        assert_eq!(verify_many(&[(ka, b"x", sa), (kb, b"x", sb)]), vec![1]);
        // A batch large enough to be split: a bad one in each half is found where it is.
        let msgs: Vec<Vec<u8>> = (0..PARALLEL_VERIFY_MIN as u32 + 3)
            .map(|i| i.to_le_bytes().to_vec())
            .collect();
        let mut items: Vec<(VerifyingKey, &[u8], [u8; 64])> =
            msgs.iter().map(|m| (ka, &m[..], a.sign(m))).collect();
        assert!(verify_many(&items).is_empty());
        let last = items.len() - 1;
        items[3].2 = sb;
        items[last].0 = kb;
        assert_eq!(verify_many(&items), vec![3, last]);
        assert!("00".parse::<PublicKey>().is_err());
    }
}
