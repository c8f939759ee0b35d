//! A hybrid logical clock: wall-clock milliseconds plus a logical counter, so that a change is
//! always later than everything it depends on even when device clocks disagree.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Bits of the packed form that hold the logical counter.
const LOGICAL_BITS: u32 = 16;
/// A remote time further than this ahead of our wall clock is not adopted (a broken or hostile
/// clock must not drag every replica into the future).
pub const MAX_CLOCK_AHEAD_MS: u64 = 10 * 60 * 1000;

/// A hybrid-logical-clock timestamp, packed as `wall_ms << 16 | logical`.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Hlc(u64);

impl Hlc {
    /// The zero time.
    pub const ZERO: Hlc = Hlc(0);

    /// Build from parts.
    pub fn new(wall_ms: u64, logical: u16) -> Self {
        Self((wall_ms << LOGICAL_BITS) | u64::from(logical))
    }
    /// Wall-clock milliseconds.
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    /// Logical counter.
    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
    /// Packed form (what goes into an Automerge change's time field).
    pub fn packed(self) -> u64 {
        self.0
    }
    /// From the packed form.
    pub fn from_packed(v: u64) -> Self {
        Self(v)
    }
    /// The first timestamp at or after `wall_ms`.
    pub fn at_wall(wall_ms: u64) -> Self {
        Self::new(wall_ms, 0)
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.wall_ms(), self.logical())
    }
}

/// The clock state of one replica.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    /// A new clock that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }
    /// The latest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
    /// Timestamp for a local event at wall time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let next = if now_ms > self.last.wall_ms() {
            Hlc::new(now_ms, 0)
        } else if self.last.logical() < u16::MAX {
            Hlc::new(self.last.wall_ms(), self.last.logical() + 1)
        } else {
            Hlc::new(self.last.wall_ms() + 1, 0)
        };
        self.last = next;
        next
    }
    /// Take in a remote timestamp so later local events order after it. Remote times too far
    /// ahead of `now_ms` are ignored.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) {
        if remote > self.last && remote.wall_ms() <= now_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_monotonic_and_follow_remote() {
        let mut c = Clock::new();
        let a = c.tick(100);
        let b = c.tick(100);
        assert!(b > a);
        assert_eq!(b.wall_ms(), 100);
        c.observe(Hlc::new(500, 3), 100);
        let d = c.tick(120);
        assert!(d > Hlc::new(500, 3));
        // A wildly future remote clock is not adopted.
        c.observe(Hlc::new(u64::MAX >> 17, 0), 120);
        assert!(c.tick(121).wall_ms() < 1_000_000);
        assert_eq!(Hlc::from_packed(d.packed()), d);
    }
}
