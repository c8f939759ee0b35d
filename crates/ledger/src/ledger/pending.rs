//! Received changes that cannot be applied yet: they wait for a dependency or for their
//! author's enrolment. The queue is bounded by bytes, per author, and the authors the stand has
//! not enrolled share a small quota of their own, so a flood from unknown keys can never push
//! out an enrolled replica's out-of-order change. Each change is indexed by what it waits for,
//! so applying one change wakes exactly its waiters, however long the queue is.

use super::Candidate;
use automerge::ChangeHash;
use std::collections::HashMap;

/// Bytes held for enrolled authors, all together.
pub const MAX_PENDING_BYTES: usize = 64 << 20;
/// Bytes held for one enrolled author.
pub const MAX_PENDING_BYTES_PER_AUTHOR: usize = 8 << 20;
/// Bytes held for authors not (yet) enrolled, all together.
pub const MAX_UNKNOWN_PENDING_BYTES: usize = 2 << 20;
/// Bytes held for one author not (yet) enrolled.
pub const MAX_UNKNOWN_PENDING_BYTES_PER_AUTHOR: usize = 256 << 10;
/// What one waiting change costs beyond twice its bytes (the signed copy and the parsed one).
const ENTRY_OVERHEAD_BYTES: usize = 512;

/// Why a change was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The author's own quota is used up.
    Author,
    /// The quota of its class (enrolled or not) is used up.
    Class,
}

#[derive(Debug)]
struct Waiting {
    cand: Candidate,
    missing: usize,
    cost: usize,
    known: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: HashMap<ChangeHash, Waiting>,
    /// Missing dependency → the changes waiting for it.
    on_dep: HashMap<ChangeHash, Vec<ChangeHash>>,
    /// Author not enrolled yet → its changes whose dependencies are all held.
    on_author: HashMap<[u8; 32], Vec<ChangeHash>>,
    bytes_by_author: HashMap<[u8; 32], usize>,
    known_bytes: usize,
    unknown_bytes: usize,
    /// Replaying this replica's own store: every change was checked when it was taken, so
    /// its signature is not checked again and none is turned away for room, whatever order
    /// the store gives them in.
    pub(crate) trusted: bool,
}

impl Pending {
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn contains(&self, h: &ChangeHash) -> bool {
        self.waiting.contains_key(h)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.known_bytes + self.unknown_bytes
    }

    /// Queue `cand` until every hash of `missing` is applied (or, with none missing, until its
    /// author is enrolled). `known`: its author is enrolled.
    pub(crate) fn insert(
        &mut self,
        cand: Candidate,
        missing: Vec<ChangeHash>,
        known: bool,
    ) -> Result<(), (Full, Candidate)> {
        let cost = 2 * cand.signed.bytes.len() + cand.signed.signature.len() + ENTRY_OVERHEAD_BYTES;
        let (author_max, class_max, class_used) = if known {
            (
                MAX_PENDING_BYTES_PER_AUTHOR,
                MAX_PENDING_BYTES,
                self.known_bytes,
            )
        } else {
            (
                MAX_UNKNOWN_PENDING_BYTES_PER_AUTHOR,
                MAX_UNKNOWN_PENDING_BYTES,
                self.unknown_bytes,
            )
        };
        let author_used = self.bytes_by_author.get(&cand.actor).copied().unwrap_or(0);
        if author_used + cost > author_max && !self.trusted {
            return Err((Full::Author, cand));
        }
        if class_used + cost > class_max && !self.trusted {
            return Err((Full::Class, cand));
        }
        *self.bytes_by_author.entry(cand.actor).or_insert(0) += cost;
        if known {
            self.known_bytes += cost;
        } else {
            self.unknown_bytes += cost;
        }
        let h = cand.hash;
        if missing.is_empty() {
            self.on_author.entry(cand.actor).or_default().push(h);
        }
        for d in &missing {
            self.on_dep.entry(*d).or_default().push(h);
        }
        self.waiting.insert(
            h,
            Waiting {
                cand,
                missing: missing.len(),
                cost,
                known,
            },
        );
        Ok(())
    }

    fn remove(&mut self, h: &ChangeHash) -> Option<Candidate> {
        let w = self.waiting.remove(h)?;
        if let Some(b) = self.bytes_by_author.get_mut(&w.cand.actor) {
            *b = b.saturating_sub(w.cost);
            if *b == 0 {
                self.bytes_by_author.remove(&w.cand.actor);
            }
        }
        if w.known {
            self.known_bytes = self.known_bytes.saturating_sub(w.cost);
        } else {
            self.unknown_bytes = self.unknown_bytes.saturating_sub(w.cost);
        }
        Some(w.cand)
    }

    /// `h` was applied: the changes that no longer miss anything.
    pub(crate) fn applied(&mut self, h: &ChangeHash) -> Vec<Candidate> {
        let mut out = Vec::new();
        for w in self.on_dep.remove(h).unwrap_or_default() {
            let Some(entry) = self.waiting.get_mut(&w) else {
                continue;
            };
            entry.missing = entry.missing.saturating_sub(1);
            if entry.missing == 0 {
                out.extend(self.remove(&w));
            }
        }
        out
    }

    /// The author with this key was enrolled: its changes that waited only for that.
    pub(crate) fn enrolled(&mut self, key: &[u8; 32]) -> Vec<Candidate> {
        let mut out = Vec::new();
        for w in self.on_author.remove(key).unwrap_or_default() {
            out.extend(self.remove(&w));
        }
        out
    }

    /// `h` was rejected: the changes that waited for it, which can never apply now.
    pub(crate) fn rejected(&mut self, h: &ChangeHash) -> Vec<Candidate> {
        let mut out = Vec::new();
        for w in self.on_dep.remove(h).unwrap_or_default() {
            out.extend(self.remove(&w));
        }
        out
    }

    /// The signed changes waiting (for a rebuild).
    pub(crate) fn signed(&self) -> impl Iterator<Item = &crate::SignedChange> {
        self.waiting.values().map(|w| &w.cand.signed)
    }
}
