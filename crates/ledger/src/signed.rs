//! `SignedChange`: an Automerge change plus its author's ed25519 signature over the bytes.

use serde::{Deserialize, Serialize};

/// Largest accepted change, in bytes.
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;

/// One change of the stand document as it travels and as it is stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    /// The Automerge change, as encoded by Automerge.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// ed25519 signature by the change's actor over `bytes`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedChange {
    /// The signature as a fixed array, if it has the right length.
    pub fn signature_array(&self) -> Option<[u8; 64]> {
        self.signature.as_slice().try_into().ok()
    }
    /// Encode for storage (postcard).
    pub fn to_vec(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
    /// Decode from storage.
    pub fn from_slice(b: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(b)
    }
}

impl std::fmt::Debug for SignedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedChange({} bytes)", self.bytes.len())
    }
}
