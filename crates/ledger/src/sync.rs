//! Anti-entropy between two replicas, sans I/O: feed it what arrived and the time; ask it what
//! to send and when to wake. The same messages travel over the stand LAN (libp2p) and over the
//! relay's WebSocket.
//!
//! Fast path: every new change is pushed at once ([`PeerSync::push`]). Repair: the replicas
//! exchange version vectors (per replica, the highest contiguous sequence held) on connect,
//! periodically, and whenever a gap shows; the answer is `changes_since(vector)`. Between
//! whole vectors (on connect, on request and every [`FULL_VECTOR_MS`]) a vector names only
//! the replicas whose entry rose since the last one sent on the connection. Every
//! handler is idempotent, so loss, duplication, reordering and stale messages minutes late are
//! all harmless. Automerge's own sync protocol is never used for received data: it would apply
//! changes with no validation hook.

use crate::ids::{ReplicaId, Sku, StandId};
use crate::ledger::{ApplyReport, Ledger, VersionVector};
use crate::message::AdminOp;
use crate::signed::SignedChange;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Wire format version.
pub const WIRE_VERSION: u8 = 4;
/// Largest frame accepted, in bytes.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// Most changes sent in one message.
pub const MAX_CHANGES_PER_MESSAGE: usize = 256;
/// Most replicas in a version vector (refused while it is read).
pub const MAX_VECTOR_LEN: usize = 4096;
/// Default interval between version-vector checks: a vector goes out at this pace while this
/// replica holds changes it has not announced.
pub const ANTI_ENTROPY_INTERVAL_MS: u64 = 1_000;
/// A vector goes out at least this often even when nothing changed, so that a lost vector or
/// a lost push is repaired on a quiet stand too.
pub const VECTOR_REFRESH_MS: u64 = 10_000;
/// A whole vector goes out at least this often on a connection. The ones between name only
/// what changed, so a lost one leaves the peer's view of us low (it resends what we hold, and
/// nothing worse) until the next whole one.
pub const FULL_VECTOR_MS: u64 = 60_000;
/// Messages queued for one peer before older pushes are dropped (repair resends them).
pub const PEER_OUTBOX_LEN: usize = 1_024;

/// Longest refusal an admin answer carries.
pub const MAX_ANSWER_BYTES: usize = 1_024;

/// A message between two replicas of one stand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMessage {
    /// What I hold.
    Vector {
        /// Per replica, highest contiguous sequence.
        vector: VersionVector,
    },
    /// Changes (pushed or in answer to a vector).
    Changes {
        /// Signed changes.
        changes: Vec<SignedChange>,
    },
    /// Please give me up to `want` of `sku`. `urgent`: a customer is waiting for them now;
    /// otherwise a top-up ahead of demand.
    RightsRequest {
        /// Item.
        sku: Sku,
        /// Units wanted.
        want: u64,
        /// A sale waits on the answer.
        urgent: bool,
    },
    /// Answer to a rights request; the give change (if any) comes along.
    RightsAnswer {
        /// Item.
        sku: Sku,
        /// Units given (0: none to spare).
        granted: u64,
        /// The give change.
        change: Option<SignedChange>,
    },
    /// Relay to pool: an admin asks for this (`id`: the relay's number for the request). The
    /// pool carries it out once, whatever is resent, and answers.
    AdminRequest { id: u64, op: AdminOp },
    /// Pool to relay: request `id` was carried out by the pool's change `Ok(seq)`, or refused.
    AdminAnswer {
        id: u64,
        outcome: Result<u64, String>,
    },
    /// Relay to a holder: `beneficiary`, a replica that reaches this holder only through the
    /// relay, asks for up to `want` of `sku`. The holder gives to `beneficiary` and answers
    /// the relay with [`WireMessage::RightsAnswerFor`].
    RightsRequestFor {
        beneficiary: ReplicaId,
        sku: Sku,
        want: u64,
        urgent: bool,
    },
    /// Holder to relay: the answer to a [`WireMessage::RightsRequestFor`], which the relay
    /// passes on to `beneficiary` as a [`WireMessage::RightsAnswer`].
    RightsAnswerFor {
        beneficiary: ReplicaId,
        sku: Sku,
        granted: u64,
        change: Option<SignedChange>,
    },
    /// What I hold, where it rose since the last vector I sent on this connection: the
    /// replicas whose highest contiguous sequence changed, with the new value. `total`: the
    /// sum of my whole vector, by which the peer sees that one of these went missing.
    VectorChanged { changed: VersionVector, total: u64 },
    /// What I hold, whole, from a connection that has no whole vector of yours yet (it is
    /// new, or the one you sent was lost): answer with yours whole.
    VectorHello { vector: VersionVector },
}

#[derive(Deserialize)]
struct Frame {
    v: u8,
    stand: StandId,
    msg: WireMessage,
}

/// [`Frame`] as it is written: the same fields, borrowed.
#[derive(Serialize)]
struct FrameOut<'a> {
    v: u8,
    stand: &'a StandId,
    msg: &'a WireMessage,
}

/// A frame that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Over the size limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not a frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Another version.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// Another stand.
    #[error("frame for stand {0}, not ours")]
    WrongStand(String),
    /// Limits inside the message exceeded.
    #[error("message over limits: {0}")]
    OverLimit(&'static str),
}

impl WireMessage {
    /// A vector, whole or what changed.
    pub fn is_vector(&self) -> bool {
        matches!(
            self,
            WireMessage::Vector { .. }
                | WireMessage::VectorChanged { .. }
                | WireMessage::VectorHello { .. }
        )
    }

    /// Encode as one frame for `stand`.
    pub fn encode(&self, stand: &StandId) -> Vec<u8> {
        let f = FrameOut {
            v: WIRE_VERSION,
            stand,
            msg: self,
        };
        postcard::to_stdvec(&f).unwrap_or_default()
    }
    /// Decode one frame and check it is for `stand` and within limits.
    pub fn decode(bytes: &[u8], stand: &StandId) -> Result<Self, WireError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let f: Frame =
            postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if f.v != WIRE_VERSION {
            return Err(WireError::Version(f.v));
        }
        if &f.stand != stand {
            return Err(WireError::WrongStand(f.stand.to_string()));
        }
        match &f.msg {
            WireMessage::Changes { changes } if changes.len() > MAX_CHANGES_PER_MESSAGE => {
                Err(WireError::OverLimit("changes per message"))
            }
            WireMessage::AdminRequest { op, .. } if op.check_limits().is_err() => {
                Err(WireError::OverLimit("admin request"))
            }
            WireMessage::AdminAnswer {
                outcome: Err(why), ..
            } if why.len() > MAX_ANSWER_BYTES => Err(WireError::OverLimit("admin answer")),
            _ => Ok(f.msg),
        }
    }
}

/// Something the driver must act on after [`PeerSync::handle`].
#[derive(Debug, Clone)]
pub enum SyncEvent {
    /// Received changes were applied: persist `accepted` and push them on to other peers.
    Applied(ApplyReport),
    /// The peer asks for rights.
    RightsRequested {
        /// Item.
        sku: Sku,
        /// Units wanted.
        want: u64,
        /// A sale waits on the answer.
        urgent: bool,
    },
    /// The peer asks the pool for an admin operation.
    AdminRequested { id: u64, op: AdminOp },
    /// The pool answered an admin request.
    AdminAnswered {
        id: u64,
        outcome: Result<u64, String>,
    },
    /// The peer answered our rights request.
    RightsAnswered {
        /// Item.
        sku: Sku,
        /// Units given.
        granted: u64,
    },
    /// The peer (a relay) asks for rights on behalf of `beneficiary`.
    RightsRequestedFor {
        beneficiary: ReplicaId,
        sku: Sku,
        want: u64,
        urgent: bool,
    },
    /// The peer answered a request made on behalf of `beneficiary` (its give, if any, is
    /// already applied: an `Applied` event comes before this one).
    RightsAnsweredFor {
        beneficiary: ReplicaId,
        sku: Sku,
        granted: u64,
        change: Option<SignedChange>,
    },
}

/// Sync state with one connected peer.
#[derive(Debug, Clone)]
pub struct PeerSync {
    their_vector: VersionVector,
    /// Our vector as the vectors sent on this connection told it.
    announced: VersionVector,
    next_full_ms: u64,
    /// A whole vector of the peer's arrived on this connection: `their_vector` is its view,
    /// not a sum of changes over nothing.
    heard_whole: bool,
    outbox: VecDeque<WireMessage>,
    next_vector_ms: u64,
    interval_ms: u64,
    /// Set: each gap between periodic vectors is drawn from this seed and the time, between
    /// half and one and a half intervals (see [`PeerSync::set_interval`]).
    stagger: Option<u64>,
    /// Changes held when the last vector went out, and when one must go out regardless.
    announced_len: usize,
    next_refresh_ms: u64,
    dropped: u64,
    /// A replica that only hands over (see `Ledger::admission`): it is sent our vectors, so it
    /// knows what we lack, and never a change or a rights message.
    hand_over: bool,
}

impl PeerSync {
    /// A fresh connection at `now_ms`: the first thing sent is our vector.
    pub fn new(ledger: &Ledger, now_ms: u64, interval_ms: u64) -> Self {
        let mut s = Self {
            their_vector: VersionVector::new(),
            announced: VersionVector::new(),
            next_full_ms: 0,
            heard_whole: false,
            outbox: VecDeque::new(),
            next_vector_ms: now_ms + interval_ms,
            interval_ms: interval_ms.max(1),
            stagger: None,
            announced_len: 0,
            next_refresh_ms: 0,
            dropped: 0,
            hand_over: false,
        };
        s.send_vector(ledger, now_ms);
        s
    }

    /// A connection to a replica that may only hand over what it wrote: it is sent vectors
    /// and nothing else.
    pub fn hand_over(ledger: &Ledger, now_ms: u64, interval_ms: u64) -> Self {
        let mut s = Self::new(ledger, now_ms, interval_ms);
        s.hand_over = true;
        s
    }

    /// Change the interval of the periodic vector (from the next one on). With `stagger`, each
    /// gap is drawn between half and one and a half intervals from the seed and the time, so
    /// that a replica's peers, which all connected at once, do not all send theirs at once:
    /// on a long interval, a replica that missed a change then hears of it from the first of
    /// its peers to speak, not after a whole interval of silence.
    pub fn set_interval(&mut self, interval_ms: u64, stagger: Option<u64>) {
        self.interval_ms = interval_ms.max(1);
        self.stagger = stagger;
    }

    /// The time from now to the next periodic vector.
    fn gap(&self, now_ms: u64) -> u64 {
        match self.stagger {
            None => self.interval_ms,
            Some(seed) => {
                // splitmix64's finaliser: deterministic, so a simulated run replays.
                let mut z = (seed ^ now_ms).wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                (self.interval_ms / 2 + z % self.interval_ms).max(1)
            }
        }
    }

    /// Whether the peer only hands over.
    pub fn is_hand_over(&self) -> bool {
        self.hand_over
    }

    /// What the peer last said it holds.
    pub fn their_vector(&self) -> &VersionVector {
        &self.their_vector
    }

    /// Messages dropped because the outbox was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Messages waiting to be sent.
    pub fn backlog(&self) -> usize {
        self.outbox.len()
    }

    /// Push a new change (local, or accepted from another peer) unless the peer already has it.
    pub fn push(&mut self, replica: ReplicaId, seq: u64, change: &SignedChange) {
        if self.their_vector.get(&replica).copied().unwrap_or(0) >= seq {
            return;
        }
        if let Some(WireMessage::Changes { changes }) = self.outbox.back_mut() {
            if changes.len() < MAX_CHANGES_PER_MESSAGE {
                changes.push(change.clone());
                return;
            }
        }
        self.enqueue(WireMessage::Changes {
            changes: vec![change.clone()],
        });
    }

    /// Ask the peer for rights.
    pub fn request_rights(&mut self, sku: Sku, want: u64, urgent: bool) {
        self.enqueue(WireMessage::RightsRequest { sku, want, urgent });
    }

    /// Queue an admin request (relay) or its answer (pool).
    pub fn send_admin(&mut self, m: WireMessage) {
        if matches!(
            m,
            WireMessage::AdminRequest { .. } | WireMessage::AdminAnswer { .. }
        ) {
            self.enqueue(m);
        }
    }

    /// Answer a rights request.
    pub fn answer_rights(&mut self, sku: Sku, granted: u64, change: Option<SignedChange>) {
        self.enqueue(WireMessage::RightsAnswer {
            sku,
            granted,
            change,
        });
    }

    /// Relay: ask the peer for rights on behalf of `beneficiary`.
    pub fn request_rights_for(
        &mut self,
        beneficiary: ReplicaId,
        sku: Sku,
        want: u64,
        urgent: bool,
    ) {
        self.enqueue(WireMessage::RightsRequestFor {
            beneficiary,
            sku,
            want,
            urgent,
        });
    }

    /// Answer, through the relay that asked, a request made on behalf of `beneficiary`.
    pub fn answer_rights_for(
        &mut self,
        beneficiary: ReplicaId,
        sku: Sku,
        granted: u64,
        change: Option<SignedChange>,
    ) {
        self.enqueue(WireMessage::RightsAnswerFor {
            beneficiary,
            sku,
            granted,
            change,
        });
    }

    fn enqueue(&mut self, m: WireMessage) {
        if self.hand_over && !m.is_vector() {
            return;
        }
        if self.outbox.len() >= PEER_OUTBOX_LEN {
            // Drop the oldest push; the vector exchange repairs whatever it carried.
            self.outbox.pop_front();
            self.dropped += 1;
        }
        self.outbox.push_back(m);
    }

    /// Queue our vector behind everything queued: whole when one is due, else what rose
    /// since the last one (and whatever a vector still queued would have said).
    fn send_vector(&mut self, ledger: &Ledger, now_ms: u64) {
        let mut whole = now_ms >= self.next_full_ms || !self.heard_whole;
        let mut queued = None;
        if let Some(i) = self.outbox.iter().position(WireMessage::is_vector) {
            match self.outbox.remove(i) {
                Some(WireMessage::VectorChanged { changed, .. }) => queued = Some(changed),
                _ => whole = true,
            }
        }
        let m = if whole {
            self.announced.clone_from(ledger.vector());
            self.next_full_ms = now_ms.saturating_add(FULL_VECTOR_MS);
            let vector = self.announced.clone();
            if self.heard_whole {
                WireMessage::Vector { vector }
            } else {
                WireMessage::VectorHello { vector }
            }
        } else {
            let mut changed = ledger.vector().newer_than(&self.announced);
            if let Some(q) = queued {
                // No bound: both name only replicas the ledger holds changes of.
                changed.merge_max(&q, usize::MAX);
            }
            // What was announced only ever trails the ledger's vector.
            self.announced.clone_from(ledger.vector());
            WireMessage::VectorChanged {
                changed,
                total: self.announced.total(),
            }
        };
        self.enqueue(m);
        self.next_vector_ms = now_ms.saturating_add(self.gap(now_ms));
        self.announced_len = ledger.len();
        self.next_refresh_ms = now_ms.saturating_add(VECTOR_REFRESH_MS.max(self.interval_ms));
    }

    /// Handle one message from the peer.
    pub fn handle(&mut self, ledger: &mut Ledger, msg: WireMessage, now_ms: u64) -> Vec<SyncEvent> {
        let mut events = Vec::new();
        match msg {
            WireMessage::Vector { .. }
            | WireMessage::VectorChanged { .. }
            | WireMessage::VectorHello { .. } => {
                let mut hello = false;
                match msg {
                    WireMessage::Vector { vector } => {
                        // What a replica holds only grows: a vector that arrives late (or
                        // twice) lowers nothing.
                        if self.heard_whole {
                            if !self.their_vector.merge_max(&vector, MAX_VECTOR_LEN) {
                                return events;
                            }
                        } else {
                            self.their_vector = vector;
                        }
                        self.heard_whole = true;
                    }
                    WireMessage::VectorHello { vector } => {
                        // The peer knows nothing of ours: our next vector is whole.
                        self.their_vector = vector;
                        self.heard_whole = true;
                        self.next_full_ms = 0;
                        hello = true;
                    }
                    WireMessage::VectorChanged { changed, total } => {
                        // A vector that would make the view name too many replicas is dropped.
                        if !self.their_vector.merge_max(&changed, MAX_VECTOR_LEN) {
                            return events;
                        }
                        // Below the peer's word, the view missed an earlier change of it
                        // (above it, it holds a later one that overtook this).
                        if self.their_vector.total() < total {
                            self.heard_whole = false;
                        }
                        if !self.heard_whole {
                            // Changes over a view we do not have: answering would resend
                            // what the peer holds. Ask for its whole vector instead.
                            self.send_vector(ledger, now_ms);
                            return events;
                        }
                    }
                    _ => {}
                }
                let missing = ledger.changes_since(&self.their_vector, MAX_CHANGES_PER_MESSAGE);
                if !missing.is_empty() {
                    self.enqueue(WireMessage::Changes { changes: missing });
                }
                if hello || self.they_have_more(ledger) {
                    self.send_vector(ledger, now_ms);
                }
            }
            WireMessage::Changes { changes } => {
                let report = ledger.apply_remote(changes, now_ms);
                if report.pending > 0 || self.they_have_more(ledger) {
                    self.send_vector(ledger, now_ms);
                }
                events.push(SyncEvent::Applied(report));
            }
            // A replica that only hands over asks for nothing.
            WireMessage::RightsRequest { .. }
            | WireMessage::RightsRequestFor { .. }
            | WireMessage::AdminRequest { .. }
                if self.hand_over => {}
            WireMessage::AdminRequest { id, op } => {
                events.push(SyncEvent::AdminRequested { id, op })
            }
            WireMessage::AdminAnswer { id, outcome } => {
                events.push(SyncEvent::AdminAnswered { id, outcome })
            }
            WireMessage::RightsRequest { sku, want, urgent } => {
                events.push(SyncEvent::RightsRequested { sku, want, urgent })
            }
            WireMessage::RightsAnswer {
                sku,
                granted,
                change,
            } => {
                if let Some(c) = change {
                    events.push(SyncEvent::Applied(ledger.apply_remote(vec![c], now_ms)));
                }
                events.push(SyncEvent::RightsAnswered { sku, granted });
            }
            WireMessage::RightsRequestFor {
                beneficiary,
                sku,
                want,
                urgent,
            } => events.push(SyncEvent::RightsRequestedFor {
                beneficiary,
                sku,
                want,
                urgent,
            }),
            WireMessage::RightsAnswerFor {
                beneficiary,
                sku,
                granted,
                change,
            } => {
                if let Some(c) = &change {
                    events.push(SyncEvent::Applied(
                        ledger.apply_remote(vec![c.clone()], now_ms),
                    ));
                }
                events.push(SyncEvent::RightsAnsweredFor {
                    beneficiary,
                    sku,
                    granted,
                    change,
                });
            }
        }
        events
    }

    /// After changes from this peer were applied (by the caller, in a batch with other
    /// peers'): ask for what is missing when something waits or the peer holds more.
    pub fn after_apply(&mut self, ledger: &Ledger, pending: bool, now_ms: u64) {
        if pending || self.they_have_more(ledger) {
            self.send_vector(ledger, now_ms);
        }
    }

    fn they_have_more(&self, ledger: &Ledger) -> bool {
        ledger.lacks_any_of(&self.their_vector)
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<WireMessage> {
        self.outbox.pop_front()
    }

    /// When to call [`PeerSync::handle_timeout`] next.
    pub fn poll_timeout(&self) -> u64 {
        self.next_vector_ms
    }

    /// Periodic repair: send our vector when we hold changes not yet announced to this peer,
    /// and at least every `VECTOR_REFRESH_MS`. On an idle stand most vectors would say nothing
    /// new (they were 96 % of all frames in a simulated game).
    pub fn handle_timeout(&mut self, ledger: &Ledger, now_ms: u64) {
        if now_ms < self.next_vector_ms {
            return;
        }
        if ledger.len() != self.announced_len || now_ms >= self.next_refresh_ms {
            self.send_vector(ledger, now_ms);
        } else {
            self.next_vector_ms = now_ms.saturating_add(self.gap(now_ms));
        }
    }
}
