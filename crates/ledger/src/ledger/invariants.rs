//! The core invariants, checked after every change in debug builds (and optimised ones built
//! with `--features check-invariants`): the materialised state is what a read of the document
//! says, and every unit that came in is either out, someone's rights, or a give a reclaim
//! left unbacked. A failure is a bug of this crate, so it panics with what differs.

use super::*;

impl Ledger {
    pub(super) fn check_invariants(&mut self) {
        // A planted bug is there for the simulator's own checks to find, not these.
        #[cfg(feature = "planted-bugs")]
        if self.planted.is_some() {
            return;
        }
        // The document is brought up to date (it otherwise lags by a batch) and compared;
        // one built only when read is compared when it is (bringing it up to date here would
        // hide a rule that reads it without doing so).
        let lazy = self.deferred && self.doc_upto < self.log.len();
        if !lazy {
            self.settle_doc();
        }
        if self.poisoned.is_none() && !lazy {
            let mut doc_heads = self.doc.get_heads();
            doc_heads.sort_unstable();
            assert_eq!(
                doc_heads,
                self.heads(),
                "replica {}: the heads kept and the document's disagree",
                self.me
            );
            let heads = self.heads();
            let from_doc = self.counters_at(&heads);
            let from_state = self.counters_from_state();
            assert_eq!(
                from_state, from_doc,
                "replica {}: state and document disagree",
                self.me
            );
        }
        for sku in self.state.totals.keys() {
            let rights: i128 = self
                .state
                .replicas
                .keys()
                .map(|r| i128::from(self.state.rights(*r, sku)))
                .sum();
            let unbacked = i128::from(self.state.unbacked(sku));
            let available = i128::from(self.state.available(sku));
            assert_eq!(
                rights + unbacked,
                available,
                "replica {}: units of {sku} not conserved",
                self.me
            );
        }
        let counted = self.state.count_positive_rights();
        for sku in self.state.totals.keys().chain(counted.keys()) {
            assert_eq!(
                i128::from(self.state.positive_rights(sku)),
                counted.get(sku).copied().unwrap_or(0),
                "replica {}: the positive rights of {sku} kept in step disagree with the cells",
                self.me
            );
        }
        assert!(
            self.vector == self.count_vector(),
            "replica {}: the version vector kept disagrees with the per-author index",
            self.me
        );
        assert_eq!(
            self.by_actor.values().map(Vec::len).sum::<usize>(),
            self.log.len(),
            "replica {}: log and per-actor index disagree",
            self.me
        );
    }
}
