//! Local operations: what this replica writes. Each builds one change with its typed message
//! (its ops from the state, see `draft`), signs it, and runs it through the same validation as
//! a received change, so the state is updated by one code path.

use super::draft::Draft;
use super::receive::DOC_BATCH_MAX;
use super::*;

impl Ledger {
    /// Create a new stand document as its pool. Returns the genesis change.
    pub fn create_stand(
        key: ReplicaKey,
        stand: StandInfo,
        pool_name: &str,
        now_ms: u64,
    ) -> Result<(Self, SignedChange), OpError> {
        let pool_key = key.public();
        let mut l = Self::join(key, stand.stand.clone(), pool_key);
        let me = l.me;
        let op = Operation::Genesis {
            stand: stand.clone(),
            pool: pool_key,
            name: pool_name.to_owned(),
        };
        let name = pool_name.to_owned();
        let change = l.commit_local(op, now_ms, move |d| {
            let event = Some(d.make_map(None, EVENT, None)?);
            d.put(event, "event", stand.event.as_str(), None)?;
            d.put(event, "venue", stand.venue.as_str(), None)?;
            d.put(event, "stand", stand.stand.as_str(), None)?;
            d.put(event, "policy", policy_str(stand.policy), None)?;
            d.put(event, "allocation", allocation_str(stand.allocation), None)?;
            d.put(event, "low_stock_pct", u64::from(stand.low_stock_pct), None)?;
            d.make_map(None, CATALOG, None)?;
            let replicas = d.make_map(None, REPLICAS, None)?;
            d.replica_entry(replicas, me, &pool_key, &name, Role::Pool)?;
            let stock = d.make_map(None, STOCK, None)?;
            d.make_map(Some(stock), &me.to_string(), None)?;
            Ok(())
        })?;
        Ok((l, change))
    }

    /// Sell. Refusals are values; a committed sale must be persisted before it is acknowledged.
    pub fn sell(&mut self, req: SaleRequest, now_ms: u64) -> SaleOutcome {
        match self.try_sell(req, now_ms) {
            Ok((sale_id, change)) => SaleOutcome::Committed { sale_id, change },
            Err(OpError::Refused(reason)) => SaleOutcome::Refused { reason },
            Err(OpError::Internal(e)) => SaleOutcome::Refused {
                reason: Refusal::Invalid { why: e },
            },
        }
    }

    fn try_sell(
        &mut self,
        req: SaleRequest,
        now_ms: u64,
    ) -> Result<(SaleId, SignedChange), OpError> {
        self.require_role(&[Role::Terminal])?;
        if req.lines.is_empty() {
            return Err(Refusal::Invalid {
                why: "a sale needs at least one line".into(),
            }
            .into());
        }
        if req.lines.len() > MAX_LINES {
            return Err(Refusal::Invalid {
                why: format!("at most {MAX_LINES} lines"),
            }
            .into());
        }
        let mut units: BTreeMap<Sku, u64> = BTreeMap::new();
        for l in &req.lines {
            if !self.state.catalog.contains_key(&l.sku) {
                return Err(Refusal::UnknownSku { sku: l.sku.clone() }.into());
            }
            if l.qty == 0 || l.qty > MAX_UNITS {
                return Err(Refusal::Invalid {
                    why: format!("quantity of {} must be 1..{MAX_UNITS}", l.sku),
                }
                .into());
            }
            *units.entry(l.sku.clone()).or_insert(0) += l.qty;
        }
        let offline = !req.pool_reachable;
        let optimistic_offline = self.policy() == Policy::Optimistic && offline;
        let mut overdraft = BTreeMap::new();
        for (sku, want) in &units {
            let rights = self.rights(self.me, sku);
            if optimistic_offline && rights < *want as i64 {
                // Within its own rights a terminal always sells; only an overdraft is barred
                // on a LOW_STOCK item.
                if self.status(sku) == StockStatus::Low || self.status(sku) == StockStatus::Out {
                    return Err(Refusal::LockedLowStock { sku: sku.clone() }.into());
                }
                let cap = self.offline_cap(sku);
                let have = rights + cap as i64;
                if have < *want as i64 {
                    return Err(Refusal::InsufficientRights {
                        sku: sku.clone(),
                        have,
                        want: *want,
                    }
                    .into());
                }
                overdraft.insert(sku.clone(), cap);
            } else if rights < *want as i64 {
                return Err(Refusal::InsufficientRights {
                    sku: sku.clone(),
                    have: rights,
                    want: *want,
                }
                .into());
            }
        }
        let seq = self.next_seq();
        let sale_id = SaleId {
            replica: self.me,
            seq,
        };
        let at = self.clock.last(); // replaced by the tick inside commit_local
        let record = SaleRecord {
            id: sale_id,
            at,
            lines: req.lines,
            payment: req.payment,
            offline,
            overdraft,
        };
        let writes = self.bump(&units, Field::Out);
        let change = self.commit_local_stock(Operation::Sale(record), now_ms, writes)?;
        Ok((sale_id, change))
    }

    /// Void a sale made here: its units come back.
    pub fn void(&mut self, sale: SaleId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Terminal])?;
        let entry = self.sale(sale).ok_or(Refusal::UnknownSale { sale })?;
        if sale.replica != self.me {
            return Err(Refusal::NotYourSale { sale }.into());
        }
        if entry.voided {
            return Err(Refusal::AlreadyVoided { sale }.into());
        }
        let units = entry.record.units();
        let writes = self.bump(&units, Field::In);
        self.commit_local_stock(Operation::Void { sale, units }, now_ms, writes)
    }

    /// Record that the store of record refunded `units` of `sale`'s `sku` line (pool or
    /// relay). Refused beyond what the line sold less what this writer has recorded.
    pub fn refund(
        &mut self,
        sale: SaleId,
        sku: &Sku,
        units: u64,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool, Role::Relay])?;
        let entry = self.sale(sale).ok_or(Refusal::UnknownSale { sale })?;
        let sold = entry.record.units().get(sku).copied().unwrap_or(0);
        let mine = self
            .state
            .refunds
            .get(&(sale, sku.clone(), self.me))
            .copied()
            .unwrap_or(0);
        if units == 0 || mine.saturating_add(units) > sold {
            return Err(Refusal::Invalid {
                why: format!(
                    "refund of {units} {sku} on sale {sale}: it sold {sold}, {mine} already refunded"
                ),
            }
            .into());
        }
        let writes = self.bump(&BTreeMap::from([(sku.clone(), units)]), Field::Refunded);
        self.commit_local_stock(
            Operation::Refund {
                sale,
                sku: sku.clone(),
                units,
            },
            now_ms,
            writes,
        )
    }

    /// Units arrive at the pool.
    pub fn restock(
        &mut self,
        units: BTreeMap<Sku, u64>,
        note: &str,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool])?;
        self.check_units(&units)?;
        let writes = self.bump(&units, Field::In);
        self.commit_local_stock(
            Operation::Restock {
                units,
                note: note.to_owned(),
            },
            now_ms,
            writes,
        )
    }

    /// Shrink: units lost here.
    pub fn adjust(
        &mut self,
        units: BTreeMap<Sku, u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool, Role::Terminal])?;
        self.check_units(&units)?;
        // Shrink is written where the units are held: the pool can only write off what it has
        // not allocated (more would leave terminals with rights to units that no longer exist),
        // a terminal only its own rights.
        self.check_own_rights(&units)?;
        let writes = self.bump(&units, Field::Out);
        self.commit_local_stock(
            Operation::Adjust {
                units,
                reason: reason.to_owned(),
            },
            now_ms,
            writes,
        )
    }

    /// Mark an item unavailable at the stand ("86" it) or available again. Any member may;
    /// the latest mark of any replica wins. Returns the change (also written when the item is
    /// already in that state: a later mark settles a concurrent opposite one).
    pub fn mark(
        &mut self,
        sku: &Sku,
        available: bool,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool, Role::Terminal, Role::Kitchen])?;
        if !self.state.catalog.contains_key(sku) {
            return Err(Refusal::UnknownSku { sku: sku.clone() }.into());
        }
        let field = if available { Field::OnAt } else { Field::OffAt };
        let op = Operation::Mark {
            sku: sku.clone(),
            available,
        };
        let sku = sku.clone();
        self.commit_local(op, now_ms, move |d| {
            let at = d.at.packed();
            d.counters(&BTreeMap::from([((sku, field), at)]))
        })
    }

    /// Give selling rights to another replica.
    pub fn give(
        &mut self,
        to: ReplicaId,
        units: BTreeMap<Sku, u64>,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool, Role::Terminal])?;
        self.check_units(&units)?;
        match self.state.replicas.get(&to) {
            None => return Err(Refusal::UnknownReplica { replica: to }.into()),
            Some(i)
                if !matches!(i.role, Role::Pool | Role::Terminal)
                    || i.retired_at_pool_seq.is_some()
                    || to == self.me =>
            {
                return Err(Refusal::Invalid {
                    why: format!("cannot give to {to}"),
                }
                .into());
            }
            Some(_) => {}
        }
        self.check_own_rights(&units)?;
        let writes = self.bump(&units, Field::Give(to));
        self.commit_local_stock(Operation::Give { to, units }, now_ms, writes)
    }

    /// Add or edit catalog entries (pool).
    pub fn set_catalog(
        &mut self,
        items: Vec<CatalogItem>,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool])?;
        if items.is_empty() || items.len() > MAX_CATALOG_ITEMS {
            return Err(Refusal::Invalid {
                why: format!("1 to {MAX_CATALOG_ITEMS} catalog items per change"),
            }
            .into());
        }
        let existing: BTreeMap<Sku, ()> =
            self.state.catalog.keys().map(|k| (k.clone(), ())).collect();
        let op = Operation::Catalog {
            items: items.clone(),
        };
        self.commit_local(op, now_ms, move |d| {
            let catalog = Some(d.find(&Obj::Catalog)?);
            for it in &items {
                let obj = Some(if existing.contains_key(&it.sku) {
                    d.find(&Obj::CatalogItem(it.sku.clone()))?
                } else {
                    let current = d.current(catalog, it.sku.as_str());
                    d.make_map(catalog, it.sku.as_str(), current)?
                });
                let name = d.current(obj, "name");
                d.put(obj, "name", it.name.as_str(), name)?;
                let price = d.current(obj, "price_cents");
                d.put(obj, "price_cents", it.price_cents, price)?;
                let low = d.current(obj, "low_stock_at");
                d.put(obj, "low_stock_at", it.low_stock_at, low)?;
            }
            Ok(())
        })
    }

    /// Enrol a replica (pool).
    pub fn enrol(
        &mut self,
        key: PublicKey,
        name: &str,
        role: Role,
        now_ms: u64,
    ) -> Result<SignedChange, OpError> {
        self.require_role(&[Role::Pool])?;
        let rid = key.replica_id();
        if role == Role::Pool {
            return Err(Refusal::Invalid {
                why: "a stand has one pool".into(),
            }
            .into());
        }
        if self.state.replicas.contains_key(&rid) {
            return Err(Refusal::Invalid {
                why: format!("replica {rid} is already enrolled"),
            }
            .into());
        }
        let name = name.to_owned();
        let op = Operation::Enrol {
            key,
            name: name.clone(),
            role,
        };
        self.commit_local(op, now_ms, move |d| {
            let replicas = d.find(&Obj::Replicas)?;
            d.replica_entry(replicas, rid, &key, &name, role)?;
            let stock = d.find(&Obj::Stock)?;
            d.make_map(Some(stock), &rid.to_string(), None)?;
            Ok(())
        })
    }

    /// Retire a replica (pool).
    pub fn retire(&mut self, replica: ReplicaId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.check_retirable(replica)?;
        self.commit_local(Operation::Retire { replica }, now_ms, move |d| {
            d.retire(replica)
        })
    }

    /// Reclaim `replica` on a live pool, only if this pool holds the latest of its changes that
    /// any reachable replica knows of (`known`: their version vectors): the rights moved are
    /// then what it held at its last change anyone has seen, and the view says how old that is.
    /// Refused with [`Refusal::PoolBehind`] while a reachable replica holds more of its changes.
    pub fn reclaim_checked(
        &mut self,
        replica: ReplicaId,
        known: &[VersionVector],
        now_ms: u64,
    ) -> Result<(SignedChange, ReclaimView), OpError> {
        self.check_retirable(replica)?;
        let have = self.by_actor.get(&replica).map_or(0, |v| v.len() as u64);
        let best = known
            .iter()
            .filter_map(|v| v.get(&replica).copied())
            .max()
            .unwrap_or(0);
        if best > have {
            return Err(Refusal::PoolBehind {
                replica,
                have,
                known: best,
            }
            .into());
        }
        let last_change_at = self
            .by_actor
            .get(&replica)
            .and_then(|v| v.last())
            .map(|&i| self.log[i].at);
        let rights: BTreeMap<Sku, i64> = self
            .state
            .catalog
            .keys()
            .map(|s| (s.clone(), self.rights(replica, s)))
            .collect();
        let change = self.reclaim(replica, now_ms)?;
        let view = ReclaimView {
            replica,
            last_seq: have,
            last_change_at,
            peers_consulted: known.len(),
            rights,
        };
        Ok((change, view))
    }

    /// Retire a lost replica and re-mint its last known rights at the pool (pool). If it was in
    /// fact still selling offline, the difference shows as oversell for the reconciler.
    pub fn reclaim(&mut self, replica: ReplicaId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.check_retirable(replica)?;
        let units: BTreeMap<Sku, u64> = self
            .state
            .catalog
            .keys()
            .filter_map(|s| {
                let r = self.rights(replica, s);
                (r > 0).then(|| (s.clone(), r as u64))
            })
            .collect();
        let writes = self.bump(&units, Field::Reclaim(replica));
        let mut gives: BTreeMap<Sku, BTreeMap<ReplicaId, u64>> = BTreeMap::new();
        for ((r, sku), cell) in &self.state.cells {
            if *r != replica {
                continue;
            }
            for (f, v) in &cell.values {
                if let (Field::Give(to), true) = (f, *v > 0) {
                    gives.entry(sku.clone()).or_default().insert(*to, *v);
                }
            }
        }
        let op = Operation::Reclaim {
            replica,
            units,
            gives,
        };
        self.commit_local(op, now_ms, move |d| {
            d.retire(replica)?;
            d.counters(&writes)
        })
    }

    fn require_role(&self, roles: &[Role]) -> Result<(), OpError> {
        if self.state.stand.is_none() {
            return Err(Refusal::NoStand.into());
        }
        let info = self
            .state
            .replicas
            .get(&self.me)
            .ok_or(Refusal::NotEnrolled)?;
        if info.retired_at_pool_seq.is_some() {
            return Err(Refusal::Retired.into());
        }
        if !roles.contains(&info.role) {
            return Err(Refusal::WrongRole { role: info.role }.into());
        }
        Ok(())
    }

    fn check_units(&self, units: &BTreeMap<Sku, u64>) -> Result<(), OpError> {
        if units.is_empty() || units.len() > MAX_LINES {
            return Err(Refusal::Invalid {
                why: format!("1 to {MAX_LINES} items"),
            }
            .into());
        }
        for (sku, n) in units {
            if !self.state.catalog.contains_key(sku) {
                return Err(Refusal::UnknownSku { sku: sku.clone() }.into());
            }
            if *n == 0 || *n > MAX_UNITS {
                return Err(Refusal::Invalid {
                    why: format!("quantity of {sku} must be 1..{MAX_UNITS}"),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Refuse unless this replica holds at least `units` of rights for every sku.
    fn check_own_rights(&self, units: &BTreeMap<Sku, u64>) -> Result<(), OpError> {
        for (sku, n) in units {
            let have = self.rights(self.me, sku);
            if have < *n as i64 {
                return Err(Refusal::InsufficientRights {
                    sku: sku.clone(),
                    have,
                    want: *n,
                }
                .into());
            }
        }
        Ok(())
    }

    fn check_retirable(&self, replica: ReplicaId) -> Result<(), OpError> {
        self.require_role(&[Role::Pool])?;
        match self.state.replicas.get(&replica) {
            None => Err(Refusal::UnknownReplica { replica }.into()),
            Some(i) if i.role == Role::Pool => Err(Refusal::Invalid {
                why: "the pool cannot be retired".into(),
            }
            .into()),
            Some(i) if i.retired_at_pool_seq.is_some() => Err(Refusal::Invalid {
                why: format!("{replica} is already retired"),
            }
            .into()),
            Some(_) => Ok(()),
        }
    }

    fn next_seq(&self) -> u64 {
        self.by_actor.get(&self.me).map_or(0, |v| v.len() as u64) + 1
    }

    /// New absolute values of this replica's counters after adding `units` to `field`.
    fn bump(&self, units: &BTreeMap<Sku, u64>, field: Field) -> BTreeMap<(Sku, Field), u64> {
        units
            .iter()
            .map(|(s, n)| ((s.clone(), field), self.state.value(self.me, s, field) + n))
            .collect()
    }

    fn commit_local_stock(
        &mut self,
        op: Operation,
        now_ms: u64,
        writes: BTreeMap<(Sku, Field), u64>,
    ) -> Result<SignedChange, OpError> {
        self.commit_local(op, now_ms, move |d| d.counters(&writes))
    }

    /// Write one change with `f`, with the typed message, sign it, and run it through the same
    /// validation as a received change so the state is updated by one code path. The change
    /// is built from the state (see `draft`): the document takes it with the next batch.
    fn commit_local<F>(
        &mut self,
        mut op: Operation,
        now_ms: u64,
        f: F,
    ) -> Result<SignedChange, OpError>
    where
        F: FnOnce(&mut Draft<'_>) -> Result<(), OpError>,
    {
        op.check_limits()
            .map_err(|why| OpError::Refused(Refusal::Invalid { why }))?;
        let at = self.clock.tick(now_ms);
        if let Operation::Sale(rec) = &mut op {
            rec.at = at;
        }
        let msg = ChangeMessage {
            v: MESSAGE_VERSION,
            at,
            op,
            req: self.request.take(),
        };
        let text = msg.encode();
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(Refusal::Invalid {
                why: format!(
                    "the change would carry {} bytes, over {MAX_MESSAGE_BYTES}",
                    text.len()
                ),
            }
            .into());
        }
        // The change depends on everything held, so its ops follow every op of its past.
        let deps = self.heads();
        let past = self.causal_of(&deps, self.me, 0);
        let start = past
            .max_op
            .checked_add(1)
            .and_then(std::num::NonZeroU64::new)
            .ok_or_else(|| internal("op counter overflows"))?;
        let actor = self.key.public().actor();
        let drop_carry = self.planted(LedgerBug::DropCarryForward);
        let mut draft = Draft::new(
            &self.state,
            self.me,
            actor.clone(),
            at,
            start.get(),
            &mut self.own_objs,
            drop_carry,
        );
        if let Err(e) = f(&mut draft) {
            self.own_objs.clear();
            return Err(e);
        }
        let operations = draft.into_ops();
        if operations.is_empty() {
            return Err(internal("the change writes nothing"));
        }
        let change = Change::from(ExpandedChange {
            operations,
            actor_id: actor,
            hash: None,
            seq: self.next_seq(),
            start_op: start,
            time: at.packed() as i64,
            message: Some(text),
            deps,
            extra_bytes: Vec::new(),
            author: None,
        });
        let signed = SignedChange {
            signature: self.key.sign(change.raw_bytes()).to_vec(),
            bytes: change.raw_bytes().to_vec(),
        };
        // Validated as read back from its bytes, as a receiver will read it.
        let expanded = expand(&change).map_err(internal)?;
        if matches!(&msg.op, Operation::Sale(r) if !r.overdraft.is_empty()) {
            // The overdraft claim is checked against the document at the change's
            // dependencies, which may still wait for the document's next batch.
            self.flush_doc(now_ms);
        }
        let causal = self.causal(&change, self.me);
        let checked = self
            .check_history(&change, self.me, at, &causal, now_ms)
            .and_then(|()| self.validate(&change, &expanded, &msg, self.me, &causal));
        match checked {
            Ok(fx) => {
                self.apply_effects(self.me, &msg, fx, &change);
                self.record(&signed, &change, self.me, at, &causal);
                self.queue_for_doc(change);
                if self.unapplied.len() >= DOC_BATCH_MAX {
                    self.flush_doc(now_ms);
                }
                #[cfg(any(debug_assertions, feature = "check-invariants"))]
                self.check_invariants();
                Ok(signed)
            }
            Err(r) => {
                // Our own change broke a rule the pre-checks should have caught: a bug. Nothing
                // was kept of it.
                self.own_objs.clear();
                Err(OpError::Internal(format!(
                    "own {} change fails validation: {r}",
                    msg.op.kind()
                )))
            }
        }
    }
}

pub(super) fn policy_str(p: Policy) -> &'static str {
    match p {
        Policy::Strict => "strict",
        Policy::Optimistic => "optimistic",
    }
}

pub(super) fn allocation_str(a: crate::message::Allocation) -> &'static str {
    match a {
        crate::message::Allocation::Proportional => "proportional",
        crate::message::Allocation::Velocity => "velocity",
    }
}
