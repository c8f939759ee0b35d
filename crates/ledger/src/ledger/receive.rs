//! The receive path: every byte another replica sends passes here, hostile until checked.
//!
//! In order, each check before anything costlier: size, chunk kind and op and pred counts read
//! from the header (only uncompressed change chunks, no run-length bombs: parsed size is
//! bounded by received size) → parse → duplicate
//! → signature against the actor's own key (a bad copy is dropped without tainting the change
//! it claims to be) → dependencies and enrolment (else the bounded pending queue) → sequence
//! number, op ids and time against the change's causal past → message → the layout and policy
//! rules of `validate` → Automerge. Accepted changes are applied to the document in batches
//! (see [`DOC_BATCH_MAX`]); a fault inside Automerge is caught, never propagated as a panic, and
//! the replica rebuilds from its log without recursion.

use super::pending::Full;
use super::*;
use crate::hlc::MAX_CLOCK_AHEAD_MS;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Most ops one change may carry (a sale of 64 lines with a rollover writes a few hundred).
pub const MAX_OPS_PER_CHANGE: usize = 4_096;
/// Keys whose misbehaviour is counted one by one; beyond this, only in the totals.
pub const MAX_TRACKED_KEYS: usize = 1_024;
/// Accepted changes wait for the Automerge document until this many have gathered or the
/// document is read or written (a change of our own, a snapshot, a read at some heads). The
/// cached state is updated at once; only the document lags. Automerge applies a batch of
/// hundreds several times faster per change than one change at a time.
pub const DOC_BATCH_MAX: usize = 512;

/// What a change's causal past says about it, folded from its dependencies' entries.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Causal {
    /// Highest pool sequence number in the causal past, the change itself included.
    pub pool_seq_seen: u64,
    /// Highest op counter in the causal past, excluding the change itself.
    pub max_op: u64,
    /// Latest time in the causal past, excluding the change itself.
    pub max_at: Hlc,
}

impl Ledger {
    /// Verify and apply received changes. Accepted changes are returned for persistence and
    /// forwarding; changes with missing dependencies or unknown authors wait (bounded).
    pub fn apply_remote(&mut self, changes: Vec<SignedChange>, now_ms: u64) -> ApplyReport {
        let mut report = ApplyReport::default();
        let cands = self.admit(changes, &mut report);
        // One at a time, in the order given: a batch in causal order (a repair, a restore)
        // never waits, and whatever comes before its dependencies waits in the queue and is
        // woken as they land.
        for c in cands {
            let mut ready = VecDeque::new();
            self.route(c, &mut ready, &mut report);
            self.drain_ready(ready, &mut report, now_ms);
            if self.poisoned.is_some() {
                break;
            }
        }
        if self.unapplied.len() >= DOC_BATCH_MAX {
            self.flush_doc(now_ms);
        }
        report.pending = self.pending.len();
        self.stats.accepted += report.accepted.len() as u64;
        #[cfg(any(debug_assertions, feature = "check-invariants"))]
        self.check_invariants();
        report
    }

    /// Size, chunk kind, parse, op count, duplicates and signatures.
    fn admit(&mut self, changes: Vec<SignedChange>, report: &mut ApplyReport) -> Vec<Candidate> {
        let mut cands: Vec<Candidate> = Vec::with_capacity(changes.len());
        let mut seen: HashSet<ChangeHash> = HashSet::new();
        for signed in changes {
            if signed.bytes.len() > MAX_CHANGE_BYTES {
                let len = signed.bytes.len();
                self.reject(report, None, None, Rejection::TooLarge { len });
                continue;
            }
            let memo_key = match (&self.memo, signed.signature_array()) {
                (Some(_), Some(sig)) => Some(SignatureMemo::key(&signed.bytes, sig)),
                _ => None,
            };
            // These exact bytes, so signed, were parsed and verified by a replica sharing the
            // memo: they parse to the same change.
            let known = (memo_key.as_ref()).and_then(|k| self.memo.as_ref().and_then(|m| m.get(k)));
            let verified = known.is_some();
            let change = match &known {
                Some(p) => p.change.clone(),
                None => {
                    let max_ops = MAX_OPS_PER_CHANGE as u64;
                    let header = crate::chunk::check_change_header(&signed.bytes, max_ops, max_ops);
                    if let Err(e) = header {
                        self.reject(report, None, None, Rejection::Malformed(e.to_string()));
                        continue;
                    }
                    match catch_unwind(|| Change::try_from(&signed.bytes[..])) {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            self.reject(report, None, None, Rejection::Malformed(e.to_string()));
                            continue;
                        }
                        Err(_) => {
                            let why = "the change does not parse".to_owned();
                            self.reject(report, None, None, Rejection::Malformed(why));
                            continue;
                        }
                    }
                }
            };
            if change.len() > MAX_OPS_PER_CHANGE {
                let why = format!("{} ops, over {MAX_OPS_PER_CHANGE}", change.len());
                self.reject(report, None, None, Rejection::Malformed(why));
                continue;
            }
            let h = change.hash();
            if self.by_hash.contains_key(&h)
                || self.pending.contains(&h)
                || self.rejected.contains(&h)
                || !seen.insert(h)
            {
                report.duplicates += 1;
                self.stats.duplicates += 1;
                continue;
            }
            let Ok(actor) = <[u8; 32]>::try_from(change.actor_id().to_bytes()) else {
                let actor = change.actor_id().to_hex_string();
                self.reject(report, None, None, Rejection::UnregisteredActor { actor });
                continue;
            };
            let Some(key) = self.verifying_key(&actor) else {
                let actor = change.actor_id().to_hex_string();
                self.reject(report, None, None, Rejection::UnregisteredActor { actor });
                continue;
            };
            let key = PublicKey::from_verifying_key(&key);
            cands.push(Candidate {
                signed,
                memo_key,
                verified,
                parsed: known,
                hash: h,
                actor,
                key,
                change,
            });
        }
        if self.pending.trusted {
            // Replaying this replica's own store (or its log, after a fault): every change
            // was verified when it was taken. Everything from outside is verified.
            return cands;
        }
        self.verify_signatures(cands, report)
    }

    /// Batch-verify every candidate against its actor's own key. A copy with a bad signature is
    /// dropped and counted, and nothing about its hash is remembered: the genuine copy of the
    /// same change must still get in.
    fn verify_signatures(
        &mut self,
        cands: Vec<Candidate>,
        report: &mut ApplyReport,
    ) -> Vec<Candidate> {
        let (signed, unsigned): (Vec<_>, Vec<_>) = cands
            .into_iter()
            .partition(|c| c.signed.signature_array().is_some());
        for c in unsigned {
            let replica = c.key.replica_id();
            self.reject(report, None, None, Rejection::BadSignature { replica });
        }
        let check: Vec<usize> = (0..signed.len()).filter(|i| !signed[*i].verified).collect();
        let mut bad: HashSet<usize> = HashSet::new();
        let mut items: Vec<(VerifyingKey, &[u8], [u8; 64])> = Vec::with_capacity(check.len());
        let mut at: Vec<usize> = Vec::with_capacity(check.len());
        for i in check {
            let c = &signed[i];
            match (
                self.verifying_key(c.key.bytes()),
                c.signed.signature_array(),
            ) {
                (Some(k), Some(sig)) => {
                    items.push((k, &c.signed.bytes[..], sig));
                    at.push(i);
                }
                _ => {
                    bad.insert(i);
                }
            }
        }
        bad.extend(
            verify_many(&items)
                .into_iter()
                .filter_map(|b| at.get(b).copied()),
        );
        drop(items);
        let mut kept = Vec::with_capacity(signed.len());
        for (i, mut c) in signed.into_iter().enumerate() {
            if bad.contains(&i) {
                let replica = c.key.replica_id();
                self.reject(report, None, None, Rejection::BadSignature { replica });
            } else {
                if let (Some(m), Some(k), false) = (&self.memo, &c.memo_key, c.verified) {
                    c.parsed = m.insert(*k, &c.change);
                }
                kept.push(c);
            }
        }
        kept
    }

    /// The decompressed key for `bytes`, `None` if they are not a valid point. An enrolled
    /// key's is kept, so it is decompressed once; anyone else's is not (a peer can make up as
    /// many keys as it likes).
    fn verifying_key(&mut self, bytes: &[u8; 32]) -> Option<VerifyingKey> {
        if let Some(k) = self.verifying.get(bytes) {
            return Some(*k);
        }
        let k = VerifyingKey::from_bytes(bytes).ok()?;
        if self.state.by_key.contains_key(bytes) {
            self.verifying.insert(*bytes, k);
        }
        Some(k)
    }

    /// Ready to validate, or wait for what it misses.
    fn route(&mut self, c: Candidate, ready: &mut VecDeque<Candidate>, report: &mut ApplyReport) {
        if self.by_hash.contains_key(&c.hash) {
            return;
        }
        let mut missing: Vec<ChangeHash> = Vec::new();
        for d in c.change.deps() {
            if self.by_hash.contains_key(d) {
                continue;
            }
            if self.rejected.contains(d) {
                let h = c.hash;
                let who = self.author_of(&c);
                self.reject(report, Some(h), who, Rejection::DependsOnRejected);
                self.cascade(h, report);
                return;
            }
            if !missing.contains(d) {
                missing.push(*d);
            }
        }
        let known = self.author_of(&c).is_some();
        if missing.is_empty() && known {
            ready.push_back(c);
            return;
        }
        if let Err((full, c)) = self.pending.insert(c, missing, known) {
            self.stats.pending_dropped += 1;
            if full == Full::Author {
                if let Some(r) = self.author_of(&c) {
                    self.count_misbehaviour(r, "pending_full");
                }
            }
        }
    }

    /// Validate and apply ready changes in dependency order, waking what each one unblocks.
    fn drain_ready(
        &mut self,
        mut ready: VecDeque<Candidate>,
        report: &mut ApplyReport,
        now_ms: u64,
    ) {
        while let Some(c) = ready.pop_front() {
            if self.by_hash.contains_key(&c.hash) {
                continue;
            }
            let h = c.hash;
            match self.accept_one(&c, now_ms) {
                Ok(actor) => {
                    report.accepted_ids.push((actor, c.change.seq()));
                    let enrolled = self.last_enrolled.take();
                    report.accepted.push(c.signed);
                    if self.careful {
                        self.doc_upto = self.log.len();
                    } else {
                        self.queue_for_doc(c.change);
                    }
                    for w in self.pending.applied(&h) {
                        self.route(w, &mut ready, report);
                    }
                    if let Some(k) = enrolled {
                        for w in self.pending.enrolled(&k) {
                            self.route(w, &mut ready, report);
                        }
                    }
                }
                Err(r) => {
                    if self.poisoned.is_some() {
                        return;
                    }
                    let remember = (!r.is_transient()).then_some(h);
                    let who = self.author_of(&c);
                    self.reject(report, remember, who, r);
                    if remember.is_some() {
                        self.cascade(h, report);
                    }
                }
            }
        }
    }

    /// Reject everything waiting on the rejected `h`, transitively (iteratively: a chain of
    /// waiting changes can be as long as the queue).
    fn cascade(&mut self, h: ChangeHash, report: &mut ApplyReport) {
        let mut stack = vec![h];
        while let Some(x) = stack.pop() {
            for w in self.pending.rejected(&x) {
                let wh = w.hash;
                let who = self.author_of(&w);
                self.reject(report, Some(wh), who, Rejection::DependsOnRejected);
                stack.push(wh);
            }
        }
    }

    fn author_of(&self, c: &Candidate) -> Option<ReplicaId> {
        if let Some(r) = self.state.by_key.get(&c.actor) {
            return Some(*r);
        }
        (c.actor == *self.pool_key.bytes() && self.state.stand.is_none())
            .then(|| self.pool_key.replica_id())
    }

    /// Count a rejection: by rule, by the key that signed it (when the signature held), and
    /// remember the hash (when the rejection is a property of the change itself).
    pub(super) fn reject(
        &mut self,
        report: &mut ApplyReport,
        hash: Option<ChangeHash>,
        signer: Option<ReplicaId>,
        r: Rejection,
    ) {
        *self.stats.rejected.entry(r.rule()).or_insert(0) += 1;
        if let Some(who) = signer {
            self.count_misbehaviour(who, r.rule());
        }
        if let Some(h) = hash {
            if self.rejected.insert(h) {
                self.rejected_order.push_back(h);
                if self.rejected_order.len() > MAX_REMEMBERED_REJECTIONS {
                    if let Some(old) = self.rejected_order.pop_front() {
                        self.rejected.remove(&old);
                    }
                }
            }
        }
        report.rejected.push(r);
    }

    fn count_misbehaviour(&mut self, who: ReplicaId, rule: &'static str) {
        if !self.stats.by_replica.contains_key(&who)
            && self.stats.by_replica.len() >= MAX_TRACKED_KEYS
        {
            return;
        }
        *self
            .stats
            .by_replica
            .entry(who)
            .or_default()
            .entry(rule)
            .or_insert(0) += 1;
    }

    /// The causal facts of a change whose dependencies are all held.
    pub(super) fn causal(&self, change: &Change, actor: ReplicaId) -> Causal {
        self.causal_of(change.deps(), actor, change.seq())
    }

    /// The causal facts of change `seq` of `actor` with dependencies `deps`, all held.
    pub(super) fn causal_of(&self, deps: &[ChangeHash], actor: ReplicaId, seq: u64) -> Causal {
        let mut c = Causal::default();
        for d in deps {
            if let Some(&i) = self.by_hash.get(d) {
                let e = &self.log[i];
                c.pool_seq_seen = c.pool_seq_seen.max(e.pool_seq_seen);
                c.max_op = c.max_op.max(e.max_op);
                c.max_at = c.max_at.max(e.at);
            }
        }
        if actor == self.pool() {
            c.pool_seq_seen = c.pool_seq_seen.max(seq);
        }
        c
    }

    /// Sequence number, op ids, time and the author's view of the pool, against the change's
    /// causal past and the author's previous change. Runs for local changes too.
    pub(super) fn check_history(
        &self,
        change: &Change,
        actor: ReplicaId,
        at: Hlc,
        causal: &Causal,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        let replica = actor;
        let own = self.by_actor.get(&actor);
        let held = own.map_or(0, |v| v.len() as u64);
        let seq = change.seq();
        if seq <= held {
            return Err(Rejection::Equivocation { replica, seq });
        }
        if seq != held + 1 {
            return Err(Rejection::SequenceGap { replica, seq, held });
        }
        let start = change.start_op().get();
        let expected = causal.max_op.checked_add(1);
        if expected != Some(start) {
            let why = format!(
                "ops start at {start}, not right after its causal past ({})",
                causal.max_op
            );
            return Err(Rejection::BadOpIds { replica, why });
        }
        let prev = own.and_then(|v| v.last()).map(|&i| &self.log[i]);
        if let Some(p) = prev {
            if start <= p.own_max_op {
                let why = format!("op {start} reuses an id of its own change {}", held);
                return Err(Rejection::BadOpIds { replica, why });
            }
            // A writer cannot forget a pool change it has already built on (a retirement, a
            // reclaim): its view of the pool only moves forward.
            if causal.pool_seq_seen < p.pool_seq_seen {
                let why = "its view of the pool goes back".to_owned();
                return Err(Rejection::BadOpIds { replica, why });
            }
        }
        if start.checked_add(change.len() as u64).is_none() {
            let why = "op counter overflows".to_owned();
            return Err(Rejection::BadOpIds { replica, why });
        }
        if at < causal.max_at {
            return Err(Rejection::BeforeItsPast {
                replica,
                at_ms: at.wall_ms(),
                dep_ms: causal.max_at.wall_ms(),
            });
        }
        let limit = now_ms.saturating_add(MAX_CLOCK_AHEAD_MS);
        if at.wall_ms() > limit {
            return Err(Rejection::FromTheFuture {
                replica,
                ahead_ms: at.wall_ms() - now_ms,
            });
        }
        Ok(())
    }

    /// Validate and apply one change whose dependencies are all held and whose author is
    /// enrolled; returns its author.
    fn accept_one(&mut self, c: &Candidate, now_ms: u64) -> Result<ReplicaId, Rejection> {
        let actor = c.key.replica_id();
        let (own_msg, own_expanded);
        let msg = match &c.parsed {
            Some(p) => p.message()?,
            None => {
                own_msg = ChangeMessage::decode(c.change.message())?;
                &own_msg
            }
        };
        let causal = self.causal(&c.change, actor);
        self.check_history(&c.change, actor, msg.at, &causal, now_ms)?;
        let expanded = match &c.parsed {
            Some(p) => p.expanded()?,
            None => {
                own_expanded = expand(&c.change)?;
                &own_expanded
            }
        };
        if matches!(&msg.op, Operation::Sale(r) if !r.overdraft.is_empty()) {
            // The overdraft claim is checked against the document as its seller saw it.
            self.flush_doc(now_ms);
        }
        let effects = self.validate(&c.change, expanded, msg, actor, &causal)?;
        if self.careful {
            self.apply_one_carefully(&c.change)?;
        }
        if let Operation::Enrol { key, .. } = &msg.op {
            self.last_enrolled = Some(*key.bytes());
        }
        self.apply_effects(actor, msg, effects, &c.change);
        self.record(&c.signed, &c.change, actor, msg.at, &causal);
        self.clock.observe(msg.at, now_ms);
        Ok(actor)
    }

    /// Rebuild mode: apply one change to the document now, so a fault is pinned to it.
    fn apply_one_carefully(&mut self, change: &Change) -> Result<(), Rejection> {
        let doc = &mut self.doc;
        match catch_unwind(AssertUnwindSafe(|| doc.apply_changes([change.clone()]))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Rejection::Internal(format!("automerge refused it: {e}"))),
            Err(_) => {
                self.poisoned = Some(change.hash());
                Err(Rejection::Internal("automerge panicked on it".into()))
            }
        }
    }

    /// Apply the accepted changes not yet in the document. A fault here means a rule let
    /// through something Automerge cannot take: rebuild from the log, leaving out whatever
    /// Automerge refuses.
    pub(super) fn flush_doc(&mut self, now_ms: u64) {
        if self.doc_upto >= self.log.len() {
            return;
        }
        let batch = if self.deferred {
            catch_unwind(AssertUnwindSafe(|| self.read_back()))
                .ok()
                .flatten()
        } else {
            Some(std::mem::take(&mut self.unapplied))
        };
        let doc = &mut self.doc;
        let ok = batch.is_some_and(|batch| {
            matches!(
                catch_unwind(AssertUnwindSafe(|| doc.apply_changes(batch))),
                Ok(Ok(()))
            )
        });
        if ok {
            self.doc_upto = self.log.len();
        } else {
            // A rebuild starts from a fresh replica: keep the request an operation of our own
            // is about to carry.
            let request = self.request.take();
            self.rebuild(now_ms);
            self.request = request;
        }
    }

    /// An accepted change, for the document's next batch (unless the document is deferred:
    /// its bytes are read back then).
    pub(super) fn queue_for_doc(&mut self, change: Change) {
        if !self.deferred {
            self.unapplied.push(change);
        }
    }

    /// The held changes the document lacks, parsed again from their bytes; `None` when one
    /// cannot be read back.
    fn read_back(&self) -> Option<Vec<Change>> {
        let hashes: Vec<ChangeHash> = self.log[self.doc_upto..].iter().map(|e| e.hash).collect();
        let mut out = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(ALL_CHANGES_CHUNK) {
            for signed in self.bytes.get_many(chunk) {
                out.push(Change::from_bytes(signed?.bytes).ok()?);
            }
        }
        Some(out)
    }

    pub(super) fn record(
        &mut self,
        signed: &SignedChange,
        change: &Change,
        actor: ReplicaId,
        at: Hlc,
        causal: &Causal,
    ) {
        let i = self.log.len();
        let hash = change.hash();
        let own_max_op = change.start_op().get() + (change.len() as u64).saturating_sub(1);
        self.bytes.keep(hash, signed);
        self.log.push(Entry {
            hash,
            at,
            pool_seq_seen: causal.pool_seq_seen,
            max_op: causal.max_op.max(own_max_op),
            own_max_op,
            deps: change.deps().to_vec(),
        });
        self.by_hash.insert(hash, i);
        let own = self.by_actor.entry(actor).or_default();
        own.push(i);
        self.vector.insert(actor, own.len() as u64);
        // Every dependency is held before a change is, so a held change never becomes a
        // dependency of one held earlier.
        for d in change.deps() {
            self.heads.remove(d);
        }
        self.heads.insert(hash);
    }

    /// Rebuild document and state from the held changes after an internal fault, one change
    /// at a time so a fault is pinned to the change that causes it; that change and what
    /// depends on it are left out. A loop, never a recursion: each round leaves out at least
    /// one more change. The stats carry over and count the fault.
    pub(super) fn rebuild(&mut self, now_ms: u64) {
        let mut changes: Vec<SignedChange> = self.all_changes().collect();
        changes.extend(self.pending.signed().cloned());
        let mut bytes = std::mem::replace(&mut self.bytes, Box::new(InMemory::default()));
        let mut stats = std::mem::take(&mut self.stats);
        *stats.rejected.entry("internal_fault").or_insert(0) += 1;
        let mut poisoned: Vec<ChangeHash> = Vec::new();
        let fresh = loop {
            let mut fresh = Self::join(self.key.clone(), self.stand_id.clone(), self.pool_key);
            fresh.careful = true;
            fresh.pending.trusted = true;
            fresh.bytes = bytes;
            for h in &poisoned {
                fresh.rejected.insert(*h);
            }
            // The log was checked when it was taken: replay it without the future-date bound.
            fresh.apply_remote(
                changes.clone(),
                Hlc::from_packed(u64::MAX).wall_ms().max(now_ms),
            );
            match fresh.poisoned.take() {
                Some(h) => {
                    poisoned.push(h);
                    bytes = std::mem::replace(&mut fresh.bytes, Box::new(InMemory::default()));
                }
                None => break fresh,
            }
        };
        let recording = self.applied.take();
        let memo = self.memo.take();
        let records = self.records.take();
        let deferred = self.deferred;
        *self = fresh;
        self.applied = recording;
        self.memo = memo;
        self.records = records;
        self.deferred = deferred;
        self.careful = false;
        self.pending.trusted = false;
        self.stats = stats;
    }

    pub(super) fn apply_effects(
        &mut self,
        actor: ReplicaId,
        msg: &ChangeMessage,
        fx: Effects,
        change: &Change,
    ) {
        let seq = change.seq();
        let double_count_void = self.planted(LedgerBug::DoubleCountVoid);
        if let Some(a) = &mut self.applied {
            a.push(Applied {
                author: actor,
                seq,
                op: msg.op.clone(),
                req: msg.req,
            });
        }
        let st = &mut self.state;
        if let Some(id) = msg.req {
            st.requests.insert(id, seq);
        }
        for (id, o) in fx.objects {
            st.objects.insert(id, o);
        }
        for (at, op) in fx.ops {
            st.current_ops.insert(at, op);
        }
        for r in fx.new_stock_maps {
            st.stock_maps.insert(r, ());
        }
        for sku in fx.new_sku_maps {
            st.cells.entry((actor, sku)).or_default().has_map = true;
        }
        for (sku, (epoch, writes)) in fx.epochs {
            let c = st.cells.entry((actor, sku)).or_default();
            if c.epoch != epoch {
                c.ops.clear();
            }
            c.epoch = epoch;
            c.epoch_writes = writes;
        }
        for ((sku, f), (v, op)) in fx.counters {
            st.set_value(actor, &sku, f, v);
            st.cells.entry((actor, sku)).or_default().ops.insert(f, op);
        }
        if actor == self.pool_key.replica_id() {
            st.pool_seq = seq;
        }
        match &msg.op {
            Operation::Genesis { stand, pool, name } => {
                st.stand = Some(stand.clone());
                st.pool = Some(pool.replica_id());
                st.by_key.insert(*pool.bytes(), pool.replica_id());
                st.replicas.insert(
                    pool.replica_id(),
                    ReplicaInfo {
                        name: name.clone(),
                        role: Role::Pool,
                        key: *pool,
                        retired_at_pool_seq: None,
                    },
                );
            }
            Operation::Catalog { items } => {
                for it in items {
                    st.catalog.insert(it.sku.clone(), it.clone());
                }
            }
            Operation::Enrol { key, name, role } => {
                st.by_key.insert(*key.bytes(), key.replica_id());
                st.replicas.insert(
                    key.replica_id(),
                    ReplicaInfo {
                        name: name.clone(),
                        role: *role,
                        key: *key,
                        retired_at_pool_seq: None,
                    },
                );
                let n = st.active_terminals().count() as u64;
                st.terminals_at.push((seq, n));
            }
            Operation::Retire { replica } => {
                if let Some(i) = st.replicas.get_mut(replica) {
                    i.retired_at_pool_seq = Some(seq);
                }
                let n = st.active_terminals().count() as u64;
                st.terminals_at.push((seq, n));
            }
            Operation::Reclaim { replica, gives, .. } => {
                if let Some(i) = st.replicas.get_mut(replica) {
                    i.retired_at_pool_seq = Some(seq);
                }
                st.cap_gives(*replica, seq, gives);
                let n = st.active_terminals().count() as u64;
                st.terminals_at.push((seq, n));
            }
            Operation::Sale(rec) => {
                st.sale_index.insert(rec.id, st.sales.len());
                let n = st.sales_by.entry(actor).or_insert(0);
                *n = n.saturating_add(1);
                let record = match &self.records {
                    Some(memo) => memo.intern(change.hash(), rec),
                    None => std::sync::Arc::new(rec.clone()),
                };
                st.sales.push(SaleEntry {
                    record,
                    voided: false,
                    ordinal: *n,
                });
                let q = st.recent.entry(actor).or_default();
                q.push_back((rec.at, rec.units().values().sum()));
                if q.len() > RATE_HISTORY_LEN {
                    q.pop_front();
                }
            }
            Operation::Void { sale, units } => {
                if let Some(&i) = st.sale_index.get(sale) {
                    st.sales[i].voided = true;
                }
                if double_count_void {
                    for (s, u) in units {
                        let t = st.totals.entry(s.clone()).or_insert((0, 0));
                        t.0 = t.0.saturating_add(*u);
                    }
                }
            }
            Operation::Refund { sale, sku, units } => {
                let n = st.refunds.entry((*sale, sku.clone(), actor)).or_insert(0);
                *n = n.saturating_add(*units);
            }
            Operation::Restock { .. }
            | Operation::Adjust { .. }
            | Operation::Give { .. }
            | Operation::Mark { .. } => {}
        }
    }
}
