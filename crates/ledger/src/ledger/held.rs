//! Where the signed bytes of the changes a replica holds are kept.
//!
//! The ledger keeps, per held change, only what its rules and queries need (hash, author,
//! time, causal summary). The signed bytes are needed again only to serve them to a peer that
//! lacks them, or to rebuild after a fault, so they live behind [`ChangeBytes`]: in memory by
//! default, or in the replica's own store, which already holds them, so a replica does not
//! carry its whole history in memory twice.

use crate::signed::SignedChange;
use automerge::ChangeHash;
use std::collections::{HashMap, VecDeque};

/// The signed bytes of held changes, by hash.
pub trait ChangeBytes: Send + Sync + std::fmt::Debug {
    /// A change the ledger accepted (local or received); the same change may come twice.
    fn keep(&mut self, hash: ChangeHash, change: &SignedChange);
    /// The bytes of a held change; `None` when they cannot be found (the change is then not
    /// served, and a peer gets it from another replica).
    fn get(&self, hash: &ChangeHash) -> Option<SignedChange>;
    /// [`ChangeBytes::get`] of several at once, in the same order (a store answers them with
    /// one read).
    fn get_many(&self, hashes: &[ChangeHash]) -> Vec<Option<SignedChange>> {
        hashes.iter().map(|h| self.get(h)).collect()
    }
    /// How many distinct changes it holds, or `None` when that is not known cheaply.
    fn count(&self) -> Option<usize>;
    /// Whether every change kept can always be read back (nothing is read from a store).
    fn always_readable(&self) -> bool {
        false
    }
}

/// Every change's bytes in memory (the default).
#[derive(Debug, Default)]
pub struct InMemory(HashMap<ChangeHash, SignedChange>);

impl ChangeBytes for InMemory {
    fn keep(&mut self, hash: ChangeHash, change: &SignedChange) {
        self.0.entry(hash).or_insert_with(|| change.clone());
    }
    fn get(&self, hash: &ChangeHash) -> Option<SignedChange> {
        self.0.get(hash).cloned()
    }
    fn count(&self) -> Option<usize> {
        Some(self.0.len())
    }
    fn always_readable(&self) -> bool {
        true
    }
}

/// The signed bytes of every change in memory, kept once for all the replicas of one process
/// that share it (the simulator's stand, where a hundred replicas hold the same changes). A
/// replica reads only the hashes it holds itself, so what another replica added changes none
/// of its answers. Only replicas that keep nothing but changes they verified may share one.
#[derive(Debug, Clone, Default)]
pub struct Shared(std::sync::Arc<std::sync::Mutex<HashMap<ChangeHash, SignedChange>>>);

impl ChangeBytes for Shared {
    fn keep(&mut self, hash: ChangeHash, change: &SignedChange) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(hash).or_insert_with(|| change.clone());
        }
    }
    fn get(&self, hash: &ChangeHash) -> Option<SignedChange> {
        self.0.lock().ok()?.get(hash).cloned()
    }
    fn count(&self) -> Option<usize> {
        None
    }
    fn always_readable(&self) -> bool {
        true
    }
}

/// The latest `cap` changes kept, for a [`ChangeBytes`] that reads older ones from a store:
/// the ones peers ask for most, and any the store has not been given yet.
#[derive(Debug)]
pub struct Recent {
    cap: usize,
    held: HashMap<ChangeHash, SignedChange>,
    order: VecDeque<ChangeHash>,
}

impl Recent {
    /// Keeping at most `cap` changes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            held: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keep `change`, forgetting the oldest beyond the cap.
    pub fn keep(&mut self, hash: ChangeHash, change: &SignedChange) {
        if self.held.insert(hash, change.clone()).is_none() {
            self.order.push_back(hash);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.held.remove(&old);
            }
        }
    }

    /// A change kept here.
    pub fn get(&self, hash: &ChangeHash) -> Option<&SignedChange> {
        self.held.get(hash)
    }
}
