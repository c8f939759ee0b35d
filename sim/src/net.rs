//! The virtual network: per-link latency (base + exponential jitter), loss, duplication and
//! reordering (late stragglers), all drawn from the simulator's seeded RNG. Messages travel as
//! encoded bytes, so sizes are real and the codec is exercised on every delivery.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Deliveries are rounded up to this grid so that messages arriving close together are
/// handled (and applied) as one batch per replica.
pub const TICK_MS: u64 = 5;

/// Behaviour of one class of link.
#[derive(Clone, Copy, Debug)]
pub struct LinkModel {
    /// Fixed one-way latency.
    pub base_ms: f64,
    /// Mean of the exponential jitter added to it.
    pub jitter_ms: f64,
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Probability a message is held back and arrives late (out of order).
    pub straggle: f64,
    /// Most extra delay of a straggler.
    pub straggle_max_ms: u64,
}

/// The stand LAN (terminal to terminal).
pub const LAN: LinkModel = LinkModel {
    base_ms: 2.0,
    jitter_ms: 3.0,
    loss: 0.005,
    duplicate: 0.002,
    straggle: 0.002,
    straggle_max_ms: 2_000,
};

/// The uplink to the relay (terminal to pool).
pub const WAN: LinkModel = LinkModel {
    base_ms: 40.0,
    jitter_ms: 30.0,
    loss: 0.01,
    duplicate: 0.005,
    straggle: 0.005,
    straggle_max_ms: 5_000,
};

/// A message on its way.
#[derive(Debug)]
pub struct InFlight {
    /// Delivery time.
    pub at: u64,
    /// Order of sending, to break ties deterministically.
    pub seq: u64,
    /// Sender node.
    pub from: usize,
    /// Receiver node.
    pub to: usize,
    /// The encoded frame.
    pub bytes: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Counters of what the network did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NetStats {
    /// Messages handed to the network.
    pub messages_sent: u64,
    /// Bytes handed to the network.
    pub bytes_sent: u64,
    /// Lost by the link model.
    pub messages_lost: u64,
    /// Delivered twice.
    pub messages_duplicated: u64,
    /// Arrived on a link that was down by then.
    pub messages_dropped_link_down: u64,
    /// Delivered.
    pub messages_delivered: u64,
}

/// All messages in flight.
#[derive(Debug, Default)]
pub struct Network {
    queue: BinaryHeap<InFlight>,
    next_seq: u64,
    /// Counters.
    pub stats: NetStats,
}

fn exp_sample(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    let u: f64 = rng.random();
    -(1.0 - u).ln() * mean
}

impl Network {
    /// Send `bytes` from `from` to `to` over a link of `model` at `now`.
    pub fn send(
        &mut self,
        rng: &mut ChaCha8Rng,
        model: &LinkModel,
        now: u64,
        from: usize,
        to: usize,
        mut bytes: Vec<u8>,
    ) {
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        if rng.random_bool(model.loss) {
            self.stats.messages_lost += 1;
            return;
        }
        let copies = if rng.random_bool(model.duplicate) {
            self.stats.messages_duplicated += 1;
            2
        } else {
            1
        };
        for i in 0..copies {
            let mut delay = model.base_ms + exp_sample(rng, model.jitter_ms);
            if rng.random_bool(model.straggle) {
                delay += rng.random_range(100..=model.straggle_max_ms) as f64;
            }
            let at = (now + delay.ceil() as u64).div_ceil(TICK_MS) * TICK_MS;
            let bytes = if i + 1 == copies {
                std::mem::take(&mut bytes)
            } else {
                bytes.clone()
            };
            self.queue.push(InFlight {
                at,
                seq: self.next_seq,
                from,
                to,
                bytes,
            });
            self.next_seq += 1;
        }
    }

    /// When the next message arrives.
    pub fn next_delivery(&self) -> Option<u64> {
        self.queue.peek().map(|m| m.at)
    }

    /// Every message due at or before `now`, in delivery order.
    pub fn due(&mut self, now: u64) -> Vec<InFlight> {
        let mut out = Vec::new();
        while self.queue.peek().is_some_and(|m| m.at <= now) {
            if let Some(m) = self.queue.pop() {
                out.push(m);
            }
        }
        out
    }

    /// Messages still in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
