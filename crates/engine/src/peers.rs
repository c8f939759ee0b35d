//! The connected peers, and which of them may have frames waiting to go out.
//!
//! A large stand drains each replica's frames many times a second, and most drains find
//! frames for a few peers only. Every mutable borrow of a peer files it as queued (a broadcast,
//! which borrows them all, files every peer), so a drain visits the queued peers only: a peer
//! never borrowed mutably since the last drain has an empty outbox. Frames still leave in
//! peer order, as a walk over every peer would give them.

use crate::PEER_SILENCE_TIMEOUT_MS;
use halftime_ledger::sync::PeerSync;
use halftime_ledger::{ReplicaId, WireMessage};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) sync: PeerSync,
    last_heard_ms: u64,
    /// When this peer's vector timer is next due: its key in `Engine::due`.
    pub(crate) due_ms: u64,
}

impl Peer {
    pub(crate) fn new(sync: PeerSync, now_ms: u64) -> Self {
        let mut p = Self {
            sync,
            last_heard_ms: now_ms,
            due_ms: 0,
        };
        p.due_ms = p.next_due();
        p
    }

    pub(crate) fn next_due(&self) -> u64 {
        self.sync.poll_timeout()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Peers {
    map: BTreeMap<ReplicaId, Peer>,
    /// Peers borrowed mutably since their outbox was last emptied: only these may hold frames.
    queued: BTreeSet<ReplicaId>,
    /// Every peer was borrowed mutably (a broadcast): all may hold frames.
    all_queued: bool,
    /// The last time the driver heard from every peer at once (`Engine::heard_all`): a peer's
    /// last sign of life is the later of this and its own. Stamping one time here rather than
    /// every peer keeps a keepalive on a large stand from walking all peers.
    heard_all_ms: u64,
}

impl Peers {
    pub(crate) fn get(&self, r: &ReplicaId) -> Option<&Peer> {
        self.map.get(r)
    }

    /// The peer, filed as queued: whatever the caller does may put a frame in its outbox.
    pub(crate) fn get_mut(&mut self, r: &ReplicaId) -> Option<&mut Peer> {
        let p = self.map.get_mut(r)?;
        self.queued.insert(*r);
        Some(p)
    }

    pub(crate) fn contains_key(&self, r: &ReplicaId) -> bool {
        self.map.contains_key(r)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &ReplicaId> {
        self.map.keys()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Peer> {
        self.map.values()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ReplicaId, &Peer)> {
        self.map.iter()
    }

    /// Every peer, each filed as queued.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&ReplicaId, &mut Peer)> {
        self.all_queued = true;
        self.map.iter_mut()
    }

    pub(crate) fn insert(&mut self, r: ReplicaId, p: Peer) {
        self.queued.insert(r);
        self.map.insert(r, p);
    }

    pub(crate) fn remove(&mut self, r: &ReplicaId) -> Option<Peer> {
        self.queued.remove(r);
        self.map.remove(r)
    }

    /// Heard from `r` (a frame or the transport): it is alive as of `now_ms`. False if `r` is
    /// not connected.
    pub(crate) fn heard(&mut self, r: &ReplicaId, now_ms: u64) -> bool {
        let Some(p) = self.map.get_mut(r) else {
            return false;
        };
        p.last_heard_ms = p.last_heard_ms.max(now_ms);
        true
    }

    /// Heard from every peer connected now. A peer connected later was heard when it
    /// connected, no earlier than this on the driver's clock.
    pub(crate) fn heard_all(&mut self, now_ms: u64) {
        self.heard_all_ms = self.heard_all_ms.max(now_ms);
    }

    /// When `p` counts as gone if nothing is heard from it before.
    pub(crate) fn silent_from(&self, p: &Peer) -> u64 {
        p.last_heard_ms
            .max(self.heard_all_ms)
            .saturating_add(PEER_SILENCE_TIMEOUT_MS + 1)
    }

    /// The next frame to send, to the first peer in order that has one.
    pub(crate) fn poll_transmit(&mut self) -> Option<(ReplicaId, WireMessage)> {
        if std::mem::take(&mut self.all_queued) {
            self.queued.extend(self.map.keys().copied());
        }
        while let Some(&r) = self.queued.first() {
            if let Some(m) = self.map.get_mut(&r).and_then(|p| p.sync.poll_transmit()) {
                return Some((r, m));
            }
            self.queued.pop_first();
        }
        None
    }

    /// Every frame to send, peer by peer in order.
    pub(crate) fn drain_transmit(&mut self, out: &mut Vec<(ReplicaId, WireMessage)>) {
        if std::mem::take(&mut self.all_queued) {
            self.queued.clear();
            for (r, p) in self.map.iter_mut() {
                while let Some(m) = p.sync.poll_transmit() {
                    out.push((*r, m));
                }
            }
        } else {
            for r in std::mem::take(&mut self.queued) {
                if let Some(p) = self.map.get_mut(&r) {
                    while let Some(m) = p.sync.poll_transmit() {
                        out.push((r, m));
                    }
                }
            }
        }
        debug_assert!(
            self.map.values().all(|p| p.sync.backlog() == 0),
            "a peer with frames queued was not filed as queued"
        );
    }

    /// Whether every peer with frames waiting is filed as queued.
    pub(crate) fn queued_complete(&self) -> bool {
        self.all_queued
            || self
                .map
                .iter()
                .all(|(r, p)| p.sync.backlog() == 0 || self.queued.contains(r))
    }
}
