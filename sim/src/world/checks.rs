//! The invariants: safety after every step, liveness after the final heal.

use super::*;
use halftime_ledger::ChangeHash;
use halftime_ledger::layout::SkuCounters;
use halftime_ledger::state::ReplicaInfo;

impl World {
    /// The cached state of one replica (round robin; on a large stand over the pool and the
    /// first `LARGE_STAND_DOC_CHECKED` terminals) against a read of its document: the counters
    /// the ledger keeps must be what the document says.
    pub(super) fn check_document(&mut self) -> Result<(), Violation> {
        let checked = if self.nodes.len() > LARGE_STAND_TERMINALS + 1 {
            LARGE_STAND_DOC_CHECKED + 1
        } else {
            self.nodes.len()
        };
        let n = self.next_doc_check % checked;
        self.next_doc_check = self.next_doc_check.wrapping_add(1);
        if !self.nodes[n].alive {
            return Ok(());
        }
        let from_doc = self.nodes[n].engine.counters_in_document();
        self.state_matches(n, &from_doc)
    }

    fn state_matches(
        &self,
        n: usize,
        from_doc: &BTreeMap<Sku, SkuCounters>,
    ) -> Result<(), Violation> {
        if self.nodes[n].engine.ledger().counters_from_state() != *from_doc {
            return Err(violation(
                "state-matches-document",
                format!("node {n}: the cached counters differ from a read of the document"),
            ));
        }
        Ok(())
    }

    /// Every live replica's cached state against a read of the document of the changes it
    /// holds. Replicas with the same heads hold the same changes, and Automerge builds the
    /// same document from them, so one document is read per set of heads: after the final
    /// heal, one for the whole stand.
    fn every_document_matches(&mut self) -> Result<(), Violation> {
        let mut by_heads: BTreeMap<Vec<ChangeHash>, Vec<usize>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.alive && !n.dead {
                by_heads
                    .entry(n.engine.ledger().heads())
                    .or_default()
                    .push(i);
            }
        }
        for members in by_heads.values() {
            let from_doc = self.nodes[members[0]].engine.counters_in_document();
            for &i in members {
                self.state_matches(i, &from_doc)?;
            }
        }
        Ok(())
    }

    /// The safety invariants of every replica whose state changed. On a stand of more than
    /// `LARGE_STAND_TERMINALS` terminals a replica is checked at most every
    /// `LARGE_STAND_CHECK_MS × (terminals / LARGE_STAND_TERMINALS)²` of virtual time (at most
    /// `LARGE_STAND_CHECK_MAX_MS`), unless `all`: each check reads every replica's counters of
    /// every item, so checking every replica at every step costs N² per step.
    pub(super) fn check_safety(&mut self, all: bool) -> Result<(), Violation> {
        if let Some((invariant, detail)) = self.bug_seen.take() {
            return Err(violation(invariant, detail));
        }
        let spaced = !all && self.nodes.len() > LARGE_STAND_TERMINALS + 1;
        if spaced && self.now < self.checks_due {
            return Ok(());
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut due = u64::MAX;
        let terminals = self.nodes.len().saturating_sub(1) as u64;
        let base = LARGE_STAND_TERMINALS as u64;
        let spacing = (LARGE_STAND_CHECK_MS * terminals * terminals / (base * base))
            .clamp(1, LARGE_STAND_CHECK_MAX_MS);
        // Spaced checks fall on a grid of `spacing`, so the replicas due are checked together,
        // side by side.
        let next_check = (self.now / spacing + 1) * spacing;
        let v = CheckView {
            skus: &self.skus,
            sku_order: &self.sku_order,
            served: &self.served,
            returned: &self.returned,
            asked: &self.asked,
            adjusts: &self.adjusts,
            reclaim_allowance: &self.reclaim_allowance,
            policy: self.cfg.checked_policy(),
            pool_id: self.nodes[0].id,
        };
        let mut work: Vec<(usize, &mut Node)> = Vec::with_capacity(dirty.len());
        for (n, node) in self.nodes.iter_mut().enumerate() {
            if !node.alive || !dirty.contains(&n) {
                continue;
            }
            if spaced && node.next_check > self.now {
                self.dirty.insert(n);
                due = due.min(node.next_check);
                continue;
            }
            node.next_check = next_check;
            work.push((n, node));
        }
        self.checks_due = due;
        let check_all = |work: Vec<(usize, &mut Node)>| {
            for (n, node) in work {
                check_node(&v, n, node)?;
            }
            Ok(())
        };
        if !spaced || work.len() < PARALLEL_MIN_CHECKS {
            return check_all(work);
        }
        // The first violation in replica order, as one after another would find it.
        let later = work.split_off(work.len() / 2);
        std::thread::scope(|sc| {
            let later = sc.spawn(|| check_all(later));
            let first = check_all(work);
            let later = later
                .join()
                .unwrap_or_else(|_| Err(violation("internal-fault", "a check panicked".into())));
            first.and(later)
        })
    }

    pub(super) fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.dead)
    }

    pub(super) fn converged(&self) -> bool {
        if self.live().any(|n| !n.alive) {
            return false;
        }
        let mut it = self.live();
        let Some(first) = it.next() else { return true };
        let v = first.engine.ledger().version_vector();
        it.all(|n| n.engine.ledger().version_vector() == v)
            && self
                .live()
                .all(|n| n.engine.ledger().heads() == first.engine.ledger().heads())
    }

    pub(super) fn vectors_summary(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.dead)
            .map(|(i, n)| {
                format!(
                    "node {i}: {} changes",
                    n.engine.ledger().version_vector().values().sum::<u64>()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// After convergence: every acknowledged sale of a live terminal is at the pool, and the
    /// pool's stock equals the ground truth less what died unsynced with a lost terminal.
    pub(super) fn check_liveness(&mut self) -> Result<(), Violation> {
        // Every live replica's cached state is what its document says.
        self.every_document_matches()?;
        let pool = self.nodes[0].engine.ledger();
        let mut missing_dead: BTreeMap<Sku, i64> = BTreeMap::new();
        for (id, t) in &self.acked {
            if pool.sale(*id).is_none() {
                if self.nodes[*t].dead {
                    let Some(e) = self.nodes[*t].engine.ledger().sale(*id) else {
                        continue;
                    };
                    for (s, u) in e.record.units() {
                        *missing_dead.entry(s).or_insert(0) += u as i64;
                    }
                } else {
                    return Err(violation(
                        "sale-at-pool",
                        format!("acknowledged sale {id:?} of terminal {t} never reached the pool"),
                    ));
                }
            }
        }
        for (id, t, s, u) in &self.acked_voids {
            if pool.sale(*id).is_some_and(|e| e.voided) {
                continue;
            }
            if !self.nodes[*t].dead {
                return Err(violation(
                    "void-at-pool",
                    format!("the void of sale {id:?} at terminal {t} never reached the pool"),
                ));
            }
            *missing_dead.entry(s.clone()).or_insert(0) -= *u as i64;
        }
        for s in &self.skus {
            let truth = self.truth.get(s).copied().unwrap_or(0);
            let lost_with_dead = missing_dead.get(s).copied().unwrap_or(0);
            let avail = pool.available(s);
            if avail != truth + lost_with_dead {
                return Err(violation(
                    "pool-matches-truth",
                    format!(
                        "pool available {s} = {avail}, ground truth {truth} + {lost_with_dead} sold by a lost terminal"
                    ),
                ));
            }
        }
        // Every live replica agrees with the pool on every replica's rights and on stock.
        for (i, n) in self.nodes.iter().enumerate() {
            if n.dead {
                continue;
            }
            let l = n.engine.ledger();
            for s in &self.skus {
                if l.available(s) != pool.available(s) {
                    return Err(violation(
                        "replicas-agree",
                        format!(
                            "node {i} sees {} of {s} available, the pool {}",
                            l.available(s),
                            pool.available(s)
                        ),
                    ));
                }
                for r in pool.replicas().keys() {
                    if l.rights(*r, s) != pool.rights(*r, s) {
                        return Err(violation(
                            "replicas-agree",
                            format!(
                                "node {i} sees {r} with {} rights to {s}, the pool {}",
                                l.rights(*r, s),
                                pool.rights(*r, s)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What every replica's safety check reads besides the replica itself.
struct CheckView<'a> {
    skus: &'a [Sku],
    sku_order: &'a [(Sku, usize)],
    served: &'a BTreeMap<Sku, BTreeMap<ReplicaId, u64>>,
    returned: &'a BTreeMap<Sku, BTreeMap<ReplicaId, u64>>,
    asked: &'a BTreeMap<Sku, BTreeMap<(ReplicaId, ReplicaId), u64>>,
    adjusts: &'a [(u64, BTreeMap<Sku, u64>)],
    reclaim_allowance: &'a BTreeMap<Sku, u64>,
    policy: Policy,
    pool_id: ReplicaId,
}

/// Replicas due together on a large stand before their checks are split over two threads
/// (each check reads its own replica's state; a thread costs about as much as a few checks).
const PARALLEL_MIN_CHECKS: usize = 8;

/// The safety invariants of replica `n`, folding what it newly knows into its running sums.
fn check_node(v: &CheckView<'_>, n: usize, node: &mut Node) -> Result<(), Violation> {
    // Fold newly known sales into the caps in force and the units sold of this view.
    let sales = node.engine.ledger().sales();
    for e in &sales[node.overdraft_scanned..] {
        let seller = e.record.id.replica;
        for (s, cap) in &e.record.overdraft {
            let m = node.max_cap.entry((seller, s.clone())).or_insert(0);
            if *cap > *m {
                *node.cap_sum.entry(s.clone()).or_insert(0) += cap - *m;
                *m = *cap;
            }
        }
        for (s, u) in e.record.units() {
            *node.sold.entry(s).or_insert(0) += u;
        }
    }
    node.overdraft_scanned = sales.len();
    let l = node.engine.ledger();
    // Shrink this view knows of: the adjustments up to the pool's last change it holds
    // (the pool writes them in order, so they are a prefix).
    if node.adjusts_known < v.adjusts.len() {
        let pool_seen = l.version_vector().get(&v.pool_id).copied().unwrap_or(0);
        node.adjusts_known = v
            .adjusts
            .iter()
            .take_while(|(seq, _)| *seq <= pool_seen)
            .count();
    }
    let known = &v.adjusts[..node.adjusts_known];
    for s in v.skus {
        // Every unit that came in (opening, restocks) either went out with a sale or a
        // shrink adjustment this view knows of, or is still available.
        let shrunk: u64 = known.iter().filter_map(|(_, u)| u.get(s)).sum();
        let sold = node.sold.get(s).copied().unwrap_or(0);
        let came_in = l.total_in(s);
        if came_in as i128 - sold as i128 - shrunk as i128 != l.available(s) as i128 {
            return Err(violation(
                "units-conserved",
                format!(
                    "node {n}: {s} came in {came_in}, sold {sold}, shrunk {shrunk}, but available = {}",
                    l.available(s)
                ),
            ));
        }
    }
    // One pass over the cells this view holds, in replica order: a replica with no
    // cell of an item holds nothing of it, and the checks below hold for zeros, but
    // for this replica's exact view of itself, checked after the pass.
    let replicas = l.replicas();
    let empty = BTreeMap::new();
    let no_asks = BTreeMap::new();
    let mut sums = vec![0i64; v.skus.len()];
    let mut own_cells = vec![false; v.skus.len()];
    // Cursors into the oracle's per-item maps, which are in replica order too.
    let mut served_k: Vec<_> = (v.skus.iter())
        .map(|s| v.served.get(s).unwrap_or(&empty).iter().peekable())
        .collect();
    let mut returned_k: Vec<_> = (v.skus.iter())
        .map(|s| v.returned.get(s).unwrap_or(&empty).iter().peekable())
        .collect();
    let mut sku_at = 0;
    let mut last: Option<(ReplicaId, &ReplicaInfo)> = None;
    for ((rid, s), cell) in l.cells() {
        if last.is_none_or(|(r, _)| r != *rid) {
            sku_at = 0;
        }
        // A replica's cells are in item order: walk the items alongside.
        while v.sku_order.get(sku_at).is_some_and(|(x, _)| x < s) {
            sku_at += 1;
        }
        let k = match v.sku_order.get(sku_at) {
            Some((x, k)) if x == s => *k,
            _ => continue,
        };
        let info = match last {
            Some((r, info)) if r == *rid => info,
            _ => match replicas.get(rid) {
                Some(info) => {
                    last = Some((*rid, info));
                    info
                }
                None => continue,
            },
        };
        let own = *rid == node.id;
        own_cells[k] |= own;
        // The oracle: what this view says a replica sold never exceeds what it
        // served, and a replica's view of itself is exact.
        let out = cell.get(Field::Out);
        let served = at(&mut served_k[k], rid);
        if out > served || (own && out != served) {
            return Err(violation(
                "oracle-units-served",
                format!(
                    "node {n} sees replica {rid} with {out} of {s} out, but it served {served}"
                ),
            ));
        }
        if info.role == Role::Terminal {
            // Refunds: a terminal's `in` counts only the units its voids took back.
            let back = cell.get(Field::In);
            let returned = at(&mut returned_k[k], rid);
            if back > returned || (own && back != returned) {
                return Err(violation(
                    "oracle-units-returned",
                    format!(
                        "node {n} sees replica {rid} take back {back} of {s}, but its customers returned {returned}"
                    ),
                ));
            }
        }
        // A terminal gives another terminal only what it was asked for.
        if own && n != 0 {
            let asked_of = v.asked.get(s).unwrap_or(&no_asks);
            for (f, gave) in &cell.values {
                let Field::Give(to) = f else { continue };
                let to_terminal = replicas.get(to).is_some_and(|i| i.role == Role::Terminal);
                if !to_terminal || *to == node.id {
                    continue;
                }
                let asked = asked_of.get(&(node.id, *to)).copied().unwrap_or(0);
                if *gave > asked {
                    return Err(violation(
                        "gives-answer-asks",
                        format!("node {n} gave {to} {gave} of {s}, but was asked for {asked}"),
                    ));
                }
            }
        }
        let r = cell.rights();
        sums[k] += r;
        let retired = info.retired_at_pool_seq.is_some();
        if v.policy == Policy::Strict && r < 0 && !retired {
            return Err(violation(
                "rights-non-negative",
                format!("node {n} sees replica {rid} with rights {r} for {s} under strict"),
            ));
        }
    }
    for (k, s) in v.skus.iter().enumerate() {
        if !own_cells[k] {
            if let Some(me) = replicas.get(&node.id) {
                let served = (v.served.get(s).and_then(|m| m.get(&node.id)))
                    .copied()
                    .unwrap_or(0);
                let returned = (v.returned.get(s).and_then(|m| m.get(&node.id)))
                    .copied()
                    .unwrap_or(0);
                if served > 0 || (me.role == Role::Terminal && returned > 0) {
                    return Err(violation(
                        "oracle-units-served",
                        format!(
                            "node {n} has no counters of its own for {s}, but served {served} and took back {returned}"
                        ),
                    ));
                }
            }
        }
        let avail = l.available(s);
        let sum = sums[k];
        // Gives a reclaimed replica made out of the pool's sight are nobody's rights.
        let unbacked = l.unbacked(s) as i64;
        if sum + unbacked != avail {
            return Err(violation(
                "units-conserved",
                format!(
                    "node {n}: Σ rights of {s} = {sum} (+{unbacked} unbacked) but available = {avail}"
                ),
            ));
        }
        let oversell = (-avail).max(0) as u64;
        let reclaimed = v.reclaim_allowance.get(s).copied().unwrap_or(0);
        let allowed = match v.policy {
            Policy::Strict => reclaimed,
            // Each seller's rights stay above minus the largest cap it was ever allowed.
            Policy::Optimistic => reclaimed + node.cap_sum.get(s).copied().unwrap_or(0),
        };
        if oversell > allowed {
            return Err(violation(
                if v.policy == Policy::Strict {
                    "no-oversell"
                } else {
                    "oversell-bounded"
                },
                format!(
                    "node {n}: available {s} = {avail}, oversell {oversell} > allowed {allowed}"
                ),
            ));
        }
    }
    Ok(())
}

/// The value at `rid` of a map read in replica order through `cursor`, for replicas asked in
/// ascending order (0 where the map has none).
fn at<'a>(
    cursor: &mut std::iter::Peekable<impl Iterator<Item = (&'a ReplicaId, &'a u64)>>,
    rid: &ReplicaId,
) -> u64 {
    while cursor.next_if(|(r, _)| *r < rid).is_some() {}
    match cursor.peek() {
        Some((r, v)) if *r == rid => **v,
        _ => 0,
    }
}
