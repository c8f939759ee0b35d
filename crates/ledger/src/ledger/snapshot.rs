//! A replica's snapshot of itself, so a restart loads its state instead of re-deriving it from
//! every stored change.
//!
//! A snapshot holds the saved Automerge document, the materialised state, the clock, and per
//! held change what the receive path derived from it (author, hash, time, causal summary,
//! deps). It does not hold the signed bytes: those stay in the replica's store, which serves
//! them (see [`ChangeBytes`]); given every stored change instead, loading matches them to the
//! snapshot by hash. Stored changes the snapshot does not cover (the tail written after it)
//! are replayed as [`Ledger::restore`] would.
//!
//! A snapshot is only ever read from the replica's own disk, but disks fail: it carries a
//! SHA-256 of its body, checked before anything is decoded; the loaded document's heads must
//! be the ones recorded; and every change it covers must be in the store. Any failure is an
//! error, and the caller falls back to a full replay, which needs nothing but the store.

use super::{ApplyReport, ChangeBytes, Entry, InMemory, Ledger};
use crate::hlc::Hlc;
use crate::identity::{PublicKey, ReplicaKey};
use crate::ids::{ReplicaId, StandId};
use crate::signed::SignedChange;
use crate::state::State;
use automerge::{Automerge, ChangeHash, LoadOptions, VerificationMode};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The first bytes of a snapshot; the last two digits are its format version. A snapshot is
/// `MAGIC | SHA-256 of the rest | document length (u64, little-endian) | the saved document |
/// the postcard of everything else`: the document is loaded straight from the snapshot's
/// bytes, never copied out of a decoded body first (version 01 held it inside the body; 02 kept
/// the rights others handed a replica in maps beside its counters).
const MAGIC: &[u8; 8] = b"HTSNAP03";
const HEADER_LEN: usize = MAGIC.len() + 32;

/// Why a snapshot cannot be used (the replica then replays its whole store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Too short, or not a snapshot of this format.
    #[error("not a snapshot of this format")]
    NotASnapshot,
    /// The body's SHA-256 differs from the one recorded: the bytes changed on disk.
    #[error("checksum mismatch: the snapshot was damaged")]
    Checksum,
    /// The body does not decode.
    #[error("the snapshot does not decode: {0}")]
    Decode(String),
    /// Written by another replica or for another stand.
    #[error("the snapshot belongs to replica {replica} of stand {stand}")]
    Foreign { replica: ReplicaId, stand: StandId },
    /// The saved document does not load, or loads with other heads than recorded.
    #[error("the snapshot's document: {0}")]
    Document(String),
    /// A change the snapshot covers is not in the store.
    #[error("{missing} changes the snapshot covers are not in the store")]
    Missing { missing: usize },
}

/// How a ledger was loaded from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLoad {
    /// Changes the snapshot covered.
    pub covered: usize,
    /// Stored changes after it, replayed.
    pub replayed: usize,
}

/// What a snapshot holds besides the document, as written.
#[derive(Serialize)]
struct BodyOut<'a> {
    stand: &'a StandId,
    me: ReplicaId,
    clock: Hlc,
    heads: Vec<[u8; 32]>,
    entries: Vec<EntryMeta>,
    state: &'a State,
}

/// The same, as read: the per-change summaries go straight into the ledger's log and indexes
/// as they are decoded, never into a list of their own that a start would allocate (10 MB at
/// 100k changes) only to free it.
#[derive(Deserialize)]
struct Body {
    stand: StandId,
    me: ReplicaId,
    clock: Hlc,
    heads: Vec<[u8; 32]>,
    entries: Index,
    state: State,
}

/// The ledger's log and its two indexes, decoded from the summaries.
#[derive(Default)]
struct Index {
    log: Vec<Entry>,
    by_hash: HashMap<ChangeHash, usize>,
    by_actor: BTreeMap<ReplicaId, Vec<usize>>,
}

/// Most summaries room is made for ahead of decoding them: the count is read from the
/// snapshot, which is checked but still bytes from a disk.
const MAX_PREALLOCATED_ENTRIES: usize = 1 << 20;

impl<'de> Deserialize<'de> for Index {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Index;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of change summaries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Index, A::Error> {
                let n = seq.size_hint().unwrap_or(0).min(MAX_PREALLOCATED_ENTRIES);
                let mut ix = Index {
                    log: Vec::with_capacity(n),
                    by_hash: HashMap::with_capacity(n),
                    by_actor: BTreeMap::new(),
                };
                while let Some(e) = seq.next_element::<EntryMeta>()? {
                    let i = ix.log.len();
                    let hash = ChangeHash(e.hash);
                    ix.log.push(Entry {
                        hash,
                        at: e.at,
                        pool_seq_seen: e.pool_seq_seen,
                        max_op: e.max_op,
                        own_max_op: e.own_max_op,
                        deps: e.deps.into_iter().map(ChangeHash).collect(),
                    });
                    ix.by_hash.insert(hash, i);
                    ix.by_actor.entry(e.author).or_default().push(i);
                }
                Ok(ix)
            }
        }
        d.deserialize_seq(Entries)
    }
}

/// The hashes of the changes a snapshot covers.
struct Covered<'a>(&'a HashMap<ChangeHash, usize>);

impl Covered<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn contains(&self, h: &[u8; 32]) -> bool {
        self.0.contains_key(&ChangeHash(*h))
    }
}

#[derive(Serialize, Deserialize)]
struct EntryMeta {
    author: ReplicaId,
    hash: [u8; 32],
    at: Hlc,
    pool_seq_seen: u64,
    max_op: u64,
    own_max_op: u64,
    deps: Vec<[u8; 32]>,
}

/// The Automerge hash of an uncompressed change chunk, from its bytes: SHA-256 over everything
/// after the magic and the checksum (Automerge's own definition). `None` when the bytes are
/// too short to be a chunk.
pub fn change_hash(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes
        .get(8..)
        .filter(|b| !b.is_empty())
        .map(|b| sha2::Sha256::digest(b).into())
}

impl Ledger {
    /// This replica as it is now, for [`Ledger::from_snapshot`]. Changes waiting for a
    /// dependency are not part of it (a restart fetches them again), nor are the counters of
    /// what was received.
    pub fn snapshot(&mut self) -> Vec<u8> {
        let now = self.clock.last().wall_ms();
        self.flush_doc(now);
        let author_of: HashMap<usize, ReplicaId> = self
            .by_actor
            .iter()
            .flat_map(|(r, v)| v.iter().map(move |i| (*i, *r)))
            .collect();
        let entries = self
            .log
            .iter()
            .enumerate()
            .map(|(i, e)| EntryMeta {
                author: author_of.get(&i).copied().unwrap_or(self.me),
                hash: e.hash.0,
                at: e.at,
                pool_seq_seen: e.pool_seq_seen,
                max_op: e.max_op,
                own_max_op: e.own_max_op,
                deps: e.deps.iter().map(|d| d.0).collect(),
            })
            .collect();
        let body = BodyOut {
            stand: &self.stand_id,
            me: self.me,
            clock: self.clock.last(),
            heads: self.doc.get_heads().iter().map(|h| h.0).collect(),
            entries,
            state: &self.state,
        };
        let doc = self.doc.save_nocompress();
        let body = postcard::to_stdvec(&body).unwrap_or_default();
        let mut rest = Vec::with_capacity(8 + doc.len() + body.len());
        rest.extend_from_slice(&(doc.len() as u64).to_le_bytes());
        rest.extend_from_slice(&doc);
        rest.extend_from_slice(&body);
        let mut out = Vec::with_capacity(HEADER_LEN + rest.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&sha2::Sha256::digest(&rest));
        out.extend_from_slice(&rest);
        out
    }

    /// Rebuild this replica from a snapshot it wrote and its own stored changes (any order),
    /// keeping their bytes in memory. The changes the snapshot covers are taken as they are;
    /// the others are replayed as [`Ledger::restore`] does. An error leaves nothing behind:
    /// the caller calls [`Ledger::restore`] with the same changes.
    pub fn from_snapshot(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        snapshot: &[u8],
        stored: Vec<SignedChange>,
        now_ms: u64,
    ) -> Result<(Self, ApplyReport, SnapshotLoad), SnapshotError> {
        Self::load_snapshot(key, stand_id, pool_key, snapshot, now_ms, |covered| {
            let mut held = InMemory::default();
            let mut tail = Vec::new();
            let mut found = 0;
            for c in stored {
                match change_hash(&c.bytes) {
                    Some(h) if covered.contains(&h) => {
                        if held.get(&ChangeHash(h)).is_none() {
                            found += 1;
                        }
                        held.keep(ChangeHash(h), &c);
                    }
                    _ => tail.push(c),
                }
            }
            match covered.len() - found {
                0 => Ok((tail, Box::new(held) as Box<dyn ChangeBytes>)),
                missing => Err(SnapshotError::Missing { missing }),
            }
        })
    }

    /// Rebuild this replica from a snapshot it wrote, the changes it stored after it (`tail`,
    /// any order; changes the snapshot covers are skipped) and `bytes`, which already holds
    /// the signed bytes of every change the snapshot covers: the store they were read from at
    /// the last start, so they are not read again. When `bytes` can count what it holds, fewer
    /// than the snapshot covers is an error; the caller then replays its whole store.
    pub fn from_snapshot_with(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        snapshot: &[u8],
        tail: Vec<SignedChange>,
        bytes: Box<dyn ChangeBytes>,
        now_ms: u64,
    ) -> Result<(Self, ApplyReport, SnapshotLoad), SnapshotError> {
        Self::load_snapshot(key, stand_id, pool_key, snapshot, now_ms, |covered| {
            if let Some(n) = bytes.count() {
                if n < covered.len() {
                    return Err(SnapshotError::Missing {
                        missing: covered.len() - n,
                    });
                }
            }
            let tail = tail
                .into_iter()
                .filter(|c| change_hash(&c.bytes).is_none_or(|h| !covered.contains(&h)))
                .collect();
            Ok((tail, bytes))
        })
    }

    /// What both loads share: `split` is given the hashes the snapshot covers and returns the
    /// changes to replay after it and where the covered changes' bytes are.
    fn load_snapshot(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        snapshot: &[u8],
        now_ms: u64,
        split: impl FnOnce(
            &Covered<'_>,
        ) -> Result<(Vec<SignedChange>, Box<dyn ChangeBytes>), SnapshotError>,
    ) -> Result<(Self, ApplyReport, SnapshotLoad), SnapshotError> {
        let (doc_bytes, body_bytes) = split_checked(snapshot)?;
        // The document first: what its load allocates and frees on the way is then reused by
        // the state and indexes decoded next. (Loading it on a second thread beside the rest
        // started 0.1 s sooner at 100k sales but left about 20 MB more resident: that thread's
        // allocator arena keeps what the load freed.)
        let doc = load_doc(doc_bytes);
        let rest = Self::from_body(key.clone(), stand_id, pool_key, body_bytes, split);
        let (doc, mut l, tail) = rest
            .and_then(|(l, tail, heads)| Ok((doc?, l, tail, heads)))
            .and_then(|(doc, l, tail, recorded)| {
                let mut heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
                heads.sort_unstable();
                if heads != recorded {
                    return Err(SnapshotError::Document(
                        "its heads differ from the recorded ones".into(),
                    ));
                }
                Ok((doc, l, tail))
            })?;
        l.doc = doc.with_actor(key.public().actor());
        let load = SnapshotLoad {
            covered: l.log.len(),
            replayed: tail.len(),
        };
        let latest = Hlc::from_packed(u64::MAX).wall_ms();
        l.pending.trusted = true;
        let report = l.apply_remote(tail, latest.max(now_ms));
        l.pending.trusted = false;
        #[cfg(any(debug_assertions, feature = "check-invariants"))]
        l.check_invariants();
        Ok((l, report, load))
    }

    /// Everything of a snapshot but its document: the replica with its state, log and
    /// indexes (and an empty document), the changes to replay after it, and the recorded
    /// heads, sorted.
    #[allow(clippy::type_complexity)]
    fn from_body(
        key: ReplicaKey,
        stand_id: StandId,
        pool_key: PublicKey,
        body: &[u8],
        split: impl FnOnce(
            &Covered<'_>,
        ) -> Result<(Vec<SignedChange>, Box<dyn ChangeBytes>), SnapshotError>,
    ) -> Result<(Self, Vec<SignedChange>, Vec<[u8; 32]>), SnapshotError> {
        let body: Body =
            postcard::from_bytes(body).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if body.stand != stand_id || body.me != key.replica_id() {
            return Err(SnapshotError::Foreign {
                replica: body.me,
                stand: body.stand,
            });
        }
        let (tail, bytes) = split(&Covered(&body.entries.by_hash))?;
        let mut recorded = body.heads;
        recorded.sort_unstable();

        let mut l = Self::join(key, stand_id, pool_key);
        l.state = body.state;
        l.state.after_load();
        l.bytes = bytes;
        l.log = body.entries.log;
        l.by_hash = body.entries.by_hash;
        l.by_actor = body.entries.by_actor;
        l.heads = recorded.iter().map(|h| ChangeHash(*h)).collect();
        l.doc_upto = l.log.len();
        l.vector = l.count_vector();
        l.clock
            .observe(body.clock, Hlc::from_packed(u64::MAX).wall_ms());
        Ok((l, tail, recorded))
    }
}

/// The saved document and the rest of a snapshot, once its checksum holds.
fn split_checked(snapshot: &[u8]) -> Result<(&[u8], &[u8]), SnapshotError> {
    if snapshot.len() < HEADER_LEN || &snapshot[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let (sum, rest) = snapshot[MAGIC.len()..].split_at(32);
    if sha2::Sha256::digest(rest).as_slice() != sum {
        return Err(SnapshotError::Checksum);
    }
    let (len, rest) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| SnapshotError::Decode("no document length".into()))?;
    let len = usize::try_from(u64::from_le_bytes(*len))
        .ok()
        .filter(|n| *n <= rest.len())
        .ok_or_else(|| SnapshotError::Decode("the document length exceeds the snapshot".into()))?;
    Ok(rest.split_at(len))
}

fn load_doc(bytes: &[u8]) -> Result<Automerge, SnapshotError> {
    let opts = LoadOptions::new().verification_mode(VerificationMode::Check);
    match catch_unwind(AssertUnwindSafe(|| {
        Automerge::load_with_options(bytes, opts)
    })) {
        Ok(Ok(doc)) => Ok(doc),
        Ok(Err(e)) => Err(SnapshotError::Document(e.to_string())),
        Err(_) => Err(SnapshotError::Document(
            "Automerge panicked loading it".into(),
        )),
    }
}
