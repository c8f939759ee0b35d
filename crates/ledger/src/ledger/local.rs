//! Local operations: what this replica writes. Each builds one change, commits it with its typed
//! message, signs it, and runs it through the same validation as a received change, so the
//! state is updated by one code path.

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
        let change = l.commit_local(op, now_ms, move |tx, _| {
            let event = tx.put_object(ROOT, EVENT, ObjType::Map)?;
            tx.put(&event, "event", stand.event.as_str())?;
            tx.put(&event, "venue", stand.venue.as_str())?;
            tx.put(&event, "stand", stand.stand.as_str())?;
            tx.put(&event, "policy", policy_str(stand.policy))?;
            tx.put(&event, "allocation", allocation_str(stand.allocation))?;
            tx.put(&event, "low_stock_pct", u64::from(stand.low_stock_pct))?;
            tx.put_object(ROOT, CATALOG, ObjType::Map)?;
            let replicas = tx.put_object(ROOT, REPLICAS, ObjType::Map)?;
            write_replica_entry(tx, &replicas, me, &pool_key, &name, Role::Pool)?;
            let stock = tx.put_object(ROOT, STOCK, ObjType::Map)?;
            tx.put_object(&stock, me.to_string(), ObjType::Map)?;
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
        self.commit_local(op, now_ms, move |tx, w| {
            let at = w.at.packed();
            w.write(tx, &BTreeMap::from([((sku, field), at)]))
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
        self.commit_local(op, now_ms, move |tx, _| {
            let (_, catalog) = get_obj(tx, &ROOT, CATALOG)?;
            for it in &items {
                let obj = if existing.contains_key(&it.sku) {
                    get_obj(tx, &catalog, it.sku.as_str())?.1
                } else {
                    tx.put_object(&catalog, it.sku.as_str(), ObjType::Map)?
                };
                tx.put(&obj, "name", it.name.as_str())?;
                tx.put(&obj, "price_cents", it.price_cents)?;
                tx.put(&obj, "low_stock_at", it.low_stock_at)?;
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
        self.commit_local(op, now_ms, move |tx, _| {
            let (_, replicas) = get_obj(tx, &ROOT, REPLICAS)?;
            write_replica_entry(tx, &replicas, rid, &key, &name, role)?;
            let (_, stock) = get_obj(tx, &ROOT, STOCK)?;
            tx.put_object(&stock, rid.to_string(), ObjType::Map)?;
            Ok(())
        })
    }

    /// Retire a replica (pool).
    pub fn retire(&mut self, replica: ReplicaId, now_ms: u64) -> Result<SignedChange, OpError> {
        self.check_retirable(replica)?;
        self.commit_local(Operation::Retire { replica }, now_ms, move |tx, _| {
            mark_retired(tx, replica)
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
        self.commit_local(op, now_ms, move |tx, w| {
            mark_retired(tx, replica)?;
            w.write(tx, &writes)
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
        self.commit_local(op, now_ms, move |tx, w| w.write(tx, &writes))
    }

    /// Write one change with `f`, commit it with the typed message, sign it, and run it through
    /// the same validation as a received change so the state is updated by one code path.
    fn commit_local<F>(
        &mut self,
        mut op: Operation,
        now_ms: u64,
        f: F,
    ) -> Result<SignedChange, OpError>
    where
        F: FnOnce(&mut Transaction<'_>, &mut Writer<'_>) -> Result<(), automerge::AutomergeError>,
    {
        op.check_limits()
            .map_err(|why| OpError::Refused(Refusal::Invalid { why }))?;
        // The change is written on the document and depends on its heads.
        self.flush_doc(now_ms);
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
        let drop_carry = self.planted(LedgerBug::DropCarryForward);
        let mut tx = self.doc.transaction();
        let mut writer = Writer {
            me: self.me,
            at,
            state: &self.state,
            objs: &mut self.own_objs,
            drop_carry,
        };
        if let Err(e) = f(&mut tx, &mut writer) {
            tx.rollback();
            self.own_objs.clear();
            return Err(internal(e));
        }
        tx.commit_with(
            CommitOptions::default()
                .with_message(text)
                .with_time(at.packed() as i64),
        );
        let change = self
            .doc
            .get_last_local_change()
            .ok_or_else(|| internal("committed change not found"))?;
        let signed = SignedChange {
            signature: self.key.sign(change.raw_bytes()).to_vec(),
            bytes: change.raw_bytes().to_vec(),
        };
        let expanded = expand(&change).map_err(internal)?;
        let causal = self.causal(&change, self.me);
        let checked = self
            .check_history(&change, self.me, at, &causal, now_ms)
            .and_then(|()| self.validate(&change, &expanded, &msg, self.me, &causal));
        match checked {
            Ok(fx) => {
                self.apply_effects(self.me, &msg, fx, change.seq());
                self.record(&signed, &change, self.me, at, &causal);
                #[cfg(any(debug_assertions, feature = "check-invariants"))]
                self.check_invariants();
                Ok(signed)
            }
            Err(r) => {
                // Our own change broke a rule the pre-checks should have caught: a bug. The
                // document already holds it, so rebuild to keep state and document in step.
                let why = format!("own {} change fails validation: {r}", msg.op.kind());
                self.own_objs.clear();
                let now = self.clock.last().wall_ms();
                self.rebuild(now);
                Err(OpError::Internal(why))
            }
        }
    }
}

/// Writes this replica's counters into its epoch maps, rolling over when an epoch is full.
struct Writer<'a> {
    me: ReplicaId,
    /// The change's time.
    at: Hlc,
    state: &'a State,
    objs: &'a mut HashMap<Sku, (ObjId, ObjId)>,
    /// Planted bug: roll over without carrying the other counters forward.
    drop_carry: bool,
}

impl Writer<'_> {
    fn write(
        &mut self,
        tx: &mut Transaction<'_>,
        writes: &BTreeMap<(Sku, Field), u64>,
    ) -> Result<(), automerge::AutomergeError> {
        let mut by_sku: BTreeMap<&Sku, Vec<(Field, u64)>> = BTreeMap::new();
        for ((sku, f), v) in writes {
            by_sku.entry(sku).or_default().push((*f, *v));
        }
        for (sku, fields) in by_sku {
            let cell = self
                .state
                .cells
                .get(&(self.me, sku.clone()))
                .cloned()
                .unwrap_or_default();
            let (sku_map, epoch_map) = match (cell.has_map, cell.epoch) {
                (true, Some(e)) => match self.objs.get(sku) {
                    Some(o) => o.clone(),
                    None => {
                        let (_, stock) = get_obj(tx, &ROOT, STOCK)?;
                        let (_, mine) = get_obj(tx, &stock, &self.me.to_string())?;
                        let (_, sm) = get_obj(tx, &mine, sku.as_str())?;
                        let (_, em) = get_obj(tx, &sm, &epoch_key(e))?;
                        (sm, em)
                    }
                },
                _ => {
                    let (_, stock) = get_obj(tx, &ROOT, STOCK)?;
                    let (_, mine) = get_obj(tx, &stock, &self.me.to_string())?;
                    let sm = tx.put_object(&mine, sku.as_str(), ObjType::Map)?;
                    let em = tx.put_object(&sm, epoch_key(0), ObjType::Map)?;
                    self.objs.insert(sku.clone(), (sm.clone(), em.clone()));
                    for (f, v) in &fields {
                        tx.put(&em, f.key(), *v)?;
                    }
                    continue;
                }
            };
            if cell.epoch_writes as usize + fields.len() > ROLLOVER_WRITES as usize {
                let next = cell.epoch.map_or(0, |e| e + 1);
                let em = tx.put_object(&sku_map, epoch_key(next), ObjType::Map)?;
                let mut values: BTreeMap<Field, u64> = if self.drop_carry {
                    BTreeMap::new()
                } else {
                    cell.values.clone()
                };
                for (f, v) in &fields {
                    values.insert(*f, *v);
                }
                for (f, v) in values {
                    if v > 0 {
                        tx.put(&em, f.key(), v)?;
                    }
                }
                self.objs.insert(sku.clone(), (sku_map, em));
            } else {
                for (f, v) in &fields {
                    tx.put(&epoch_map, f.key(), *v)?;
                }
                self.objs.insert(sku.clone(), (sku_map, epoch_map));
            }
        }
        Ok(())
    }
}

pub(super) fn get_obj<D: ReadDoc>(
    d: &D,
    obj: &ObjId,
    key: &str,
) -> Result<(ObjType, ObjId), automerge::AutomergeError> {
    match d.get(obj, key)? {
        Some((automerge::Value::Object(t), id)) => Ok((t, id)),
        _ => Err(automerge::AutomergeError::InvalidObjId(format!(
            "no map at {key}"
        ))),
    }
}

pub(super) fn write_replica_entry(
    tx: &mut Transaction<'_>,
    replicas: &ObjId,
    rid: ReplicaId,
    key: &PublicKey,
    name: &str,
    role: Role,
) -> Result<(), automerge::AutomergeError> {
    let e = tx.put_object(replicas, rid.to_string(), ObjType::Map)?;
    tx.put(&e, "name", name)?;
    tx.put(&e, "role", role.as_str())?;
    tx.put(&e, "key", key.to_string())?;
    tx.put(&e, "retired", false)?;
    Ok(())
}

pub(super) fn mark_retired(
    tx: &mut Transaction<'_>,
    replica: ReplicaId,
) -> Result<(), automerge::AutomergeError> {
    let (_, replicas) = get_obj(tx, &ROOT, REPLICAS)?;
    let (_, e) = get_obj(tx, &replicas, &replica.to_string())?;
    tx.put(&e, "retired", true)
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
