//! Version vectors: per replica, the highest contiguous change sequence number held.
//!
//! A stand of N replicas sends about N × 16 of them a second, each with N entries, so they are
//! kept as one sorted run rather than a tree: one allocation to build, read or drop, and a
//! merge with the ledger's own per-replica index instead of a lookup per entry. On the wire a
//! vector is a map, byte for byte what a `BTreeMap<ReplicaId, u64>` would be.

use crate::ids::ReplicaId;
use crate::sync::MAX_VECTOR_LEN;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Per replica, the highest contiguous sequence held; sorted by replica, one entry each.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct VersionVector(Vec<(ReplicaId, u64)>);

impl VersionVector {
    /// The empty vector (holds nothing).
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// From entries already in replica order with no replica twice.
    pub(crate) fn from_sorted(entries: Vec<(ReplicaId, u64)>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        Self(entries)
    }

    /// The sequence held from `replica`, if it is named.
    pub fn get(&self, replica: &ReplicaId) -> Option<&u64> {
        self.0
            .binary_search_by(|(r, _)| r.cmp(replica))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Set the sequence held from `replica`.
    pub fn insert(&mut self, replica: ReplicaId, seq: u64) {
        match self.0.binary_search_by(|(r, _)| r.cmp(&replica)) {
            Ok(i) => self.0[i].1 = seq,
            Err(i) => self.0.insert(i, (replica, seq)),
        }
    }

    /// Entries in replica order.
    pub fn iter(&self) -> impl Iterator<Item = (&ReplicaId, &u64)> {
        self.0.iter().map(|(r, s)| (r, s))
    }

    /// Sequences in replica order.
    pub fn values(&self) -> impl Iterator<Item = &u64> {
        self.0.iter().map(|(_, s)| s)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Σ of the entries: how many changes the vector covers (saturating).
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |t, (_, s)| t.saturating_add(*s))
    }

    /// The entries of this vector above `old` (a replica `old` does not name counts as 0).
    pub fn newer_than(&self, old: &VersionVector) -> VersionVector {
        if self.0.len() == old.0.len() {
            // Most often the same replicas (a vector and an earlier copy of it): in step.
            let mut out = Vec::new();
            let same = self.0.iter().zip(&old.0).all(|(a, b)| {
                if a.1 > b.1 {
                    out.push(*a);
                }
                a.0 == b.0
            });
            if same {
                return VersionVector(out);
            }
        }
        let mut theirs = old.0.iter().peekable();
        let mut out = Vec::new();
        for &(r, seq) in &self.0 {
            while theirs.next_if(|(t, _)| *t < r).is_some() {}
            let held = match theirs.peek() {
                Some((t, s)) if *t == r => *s,
                _ => 0,
            };
            if seq > held {
                out.push((r, seq));
            }
        }
        VersionVector(out)
    }

    /// Raise each entry to `other`'s where that is higher, adding the replicas only `other`
    /// names; false (those not added) when the result would name more than `max`.
    pub fn merge_max(&mut self, other: &VersionVector, max: usize) -> bool {
        // Most merges name no new replica: raise in place.
        let mut i = 0;
        let mut all_known = true;
        for &(r, seq) in &other.0 {
            while i < self.0.len() && self.0[i].0 < r {
                i += 1;
            }
            match self.0.get_mut(i) {
                Some(e) if e.0 == r => e.1 = e.1.max(seq),
                _ => all_known = false,
            }
        }
        if all_known {
            return true;
        }
        let mut out = Vec::with_capacity(self.0.len() + other.0.len());
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if j == b.len() || (i < a.len() && a[i].0 < b[j].0) {
                out.push(a[i]);
                i += 1;
            } else if i == a.len() || b[j].0 < a[i].0 {
                out.push(b[j]);
                j += 1;
            } else {
                out.push((a[i].0, a[i].1.max(b[j].1)));
                i += 1;
                j += 1;
            }
        }
        if out.len() > max {
            return false;
        }
        self.0 = out;
        true
    }

    /// Entries sorted, a replica named twice keeping its last value (what a map would do).
    fn normalise(&mut self) {
        if self.0.windows(2).all(|w| w[0].0 < w[1].0) {
            return;
        }
        self.0.sort_by_key(|(r, _)| *r); // stable: a repeated replica keeps its order
        let mut out: Vec<(ReplicaId, u64)> = Vec::with_capacity(self.0.len());
        for (r, s) in self.0.drain(..) {
            match out.last_mut() {
                Some(last) if last.0 == r => last.1 = s,
                _ => out.push((r, s)),
            }
        }
        self.0 = out;
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (ReplicaId, u64)>>(iter: I) -> Self {
        let mut v = Self(iter.into_iter().collect());
        v.normalise();
        v
    }
}

impl<const N: usize> From<[(ReplicaId, u64); N]> for VersionVector {
    fn from(entries: [(ReplicaId, u64); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for VersionVector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (r, seq) in &self.0 {
            m.serialize_entry(r, seq)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for VersionVector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VersionVector;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a version vector of at most {MAX_VECTOR_LEN} replicas")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // The announced length is the sender's word: bound it before reserving.
                let hint = map.size_hint().unwrap_or(0);
                if hint > MAX_VECTOR_LEN {
                    return Err(serde::de::Error::invalid_length(hint, &self));
                }
                let mut entries = Vec::with_capacity(hint);
                while let Some(entry) = map.next_entry::<ReplicaId, u64>()? {
                    if entries.len() == MAX_VECTOR_LEN {
                        return Err(serde::de::Error::invalid_length(MAX_VECTOR_LEN + 1, &self));
                    }
                    entries.push(entry);
                }
                let mut v = VersionVector(entries);
                v.normalise();
                Ok(v)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(n: u8) -> ReplicaId {
        ReplicaId::from_public(&[n; 32])
    }

    #[test]
    fn entries_stay_sorted_and_a_repeated_replica_keeps_its_last_value() {
        let v: VersionVector = [(rid(3), 1), (rid(1), 7), (rid(3), 9), (rid(2), 4)].into();
        let got: Vec<(ReplicaId, u64)> = v.iter().map(|(r, s)| (*r, *s)).collect();
        assert_eq!(got, vec![(rid(1), 7), (rid(2), 4), (rid(3), 9)]);
        assert_eq!(v.get(&rid(2)), Some(&4));
        assert_eq!(v.get(&rid(4)), None);
    }

    #[test]
    fn what_changed_since_a_vector_merges_back_into_it() {
        let old: VersionVector = [(rid(1), 5), (rid(3), 2)].into();
        let now: VersionVector = [(rid(1), 5), (rid(2), 1), (rid(3), 4)].into();
        let changed = now.newer_than(&old);
        assert_eq!(changed, VersionVector::from([(rid(2), 1), (rid(3), 4)]));
        let mut view = old.clone();
        assert!(view.merge_max(&changed, 8));
        assert_eq!(view, now);
        // A stale one (lower, late) lowers nothing.
        assert!(view.merge_max(&VersionVector::from([(rid(1), 2), (rid(3), 1)]), 8));
        assert_eq!(view, now);
        // Raising known replicas in place, and the bound on replicas named.
        assert!(view.merge_max(&VersionVector::from([(rid(1), 9)]), 3));
        assert_eq!(view.get(&rid(1)), Some(&9));
        assert!(!view.merge_max(&VersionVector::from([(rid(4), 1)]), 3));
        assert_eq!(view.len(), 3, "no replica added past the bound");
    }

    #[test]
    fn on_the_wire_a_vector_is_the_map_it_stands_for() {
        let v: VersionVector = [(rid(1), 5), (rid(2), 300)].into();
        let as_map: std::collections::BTreeMap<ReplicaId, u64> =
            v.iter().map(|(r, s)| (*r, *s)).collect();
        let bytes = postcard::to_stdvec(&v).unwrap();
        assert_eq!(bytes, postcard::to_stdvec(&as_map).unwrap());
        assert_eq!(postcard::from_bytes::<VersionVector>(&bytes).unwrap(), v);
        // Out of order and repeated on the wire: read as the map would read it.
        let mut hostile = vec![3u8];
        for (r, s) in [(rid(2), 1u8), (rid(1), 2), (rid(2), 3)] {
            hostile.extend_from_slice(&r.bytes());
            hostile.push(s);
        }
        let back = postcard::from_bytes::<VersionVector>(&hostile).unwrap();
        assert_eq!(back, VersionVector::from([(rid(1), 2), (rid(2), 3)]));
    }

    #[test]
    fn an_announced_length_over_the_limit_is_refused_before_anything_is_reserved() {
        // Length varint 2^32 with no entries behind it.
        let hostile = [0x80, 0x80, 0x80, 0x80, 0x10];
        assert!(postcard::from_bytes::<VersionVector>(&hostile).is_err());
        // Exactly over the limit, entries present.
        let mut bytes = Vec::new();
        let n = MAX_VECTOR_LEN + 1;
        let mut len = n;
        while len >= 0x80 {
            bytes.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        bytes.push(len as u8);
        for i in 0..n as u64 {
            bytes.extend_from_slice(&i.to_be_bytes());
            bytes.push(1);
        }
        assert!(postcard::from_bytes::<VersionVector>(&bytes).is_err());
    }
}
