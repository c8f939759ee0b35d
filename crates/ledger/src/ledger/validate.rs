//! The rules a change must keep before it touches the document: who may write which section,
//! which counters may move and by how much, and the policy floor. Each rule returns a typed
//! [`Rejection`]; nothing here changes the ledger.

use super::*;

impl Ledger {
    pub(super) fn validate(
        &self,
        change: &Change,
        ex: &ExpandedChange,
        msg: &ChangeMessage,
        actor: ReplicaId,
        causal: &Causal,
    ) -> Result<Effects, Rejection> {
        let pool_seq_seen = causal.pool_seq_seen;
        let is_pool = actor == self.pool();
        let role = if is_pool {
            Role::Pool
        } else {
            self.state
                .replicas
                .get(&actor)
                .map(|i| i.role)
                .ok_or_else(|| Rejection::UnregisteredActor {
                    actor: actor.to_string(),
                })?
        };
        if let Some(info) = self.state.replicas.get(&actor) {
            if let Some(k) = info.retired_at_pool_seq {
                if pool_seq_seen >= k {
                    return Err(Rejection::Retired { replica: actor });
                }
            }
        }
        let op_kind = msg.op.kind();
        let invalid = |why: String| Rejection::InvalidOperation { op: op_kind, why };
        if let Some(id) = msg.req {
            if !is_pool {
                return Err(invalid("only the pool carries out admin requests".into()));
            }
            if self.state.requests.contains_key(&id) {
                return Err(invalid(format!(
                    "admin request {id} was already carried out"
                )));
            }
        }
        if i64::try_from(msg.at.packed()).ok() != Some(change.timestamp()) {
            return Err(invalid("message time differs from the change time".into()));
        }
        // Stand-level preconditions per operation.
        match &msg.op {
            Operation::Genesis { stand, pool, .. } => {
                if !is_pool || self.state.stand.is_some() {
                    return Err(invalid("only the pool creates the stand, once".into()));
                }
                if stand.stand != self.stand_id || *pool != self.pool_key {
                    return Err(Rejection::WrongStand(format!(
                        "genesis of stand {}",
                        stand.stand
                    )));
                }
            }
            _ if self.state.stand.is_none() => {
                return Err(Rejection::WrongStand(
                    "the stand's genesis has not been applied".into(),
                ));
            }
            Operation::Catalog { .. } => {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section: "catalog",
                    });
                }
            }
            Operation::Enrol { key, role: r, .. } => {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section: "replicas",
                    });
                }
                if *r == Role::Pool || self.state.replicas.contains_key(&key.replica_id()) {
                    return Err(invalid(format!(
                        "cannot enrol {} as {:?}",
                        key.replica_id(),
                        r
                    )));
                }
            }
            Operation::Retire { replica } | Operation::Reclaim { replica, .. } => {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section: "replicas",
                    });
                }
                match self.state.replicas.get(replica) {
                    Some(i) if i.role != Role::Pool && i.retired_at_pool_seq.is_none() => {}
                    _ => return Err(invalid(format!("{replica} cannot be retired"))),
                }
                if let Operation::Reclaim { gives, .. } = &msg.op {
                    // The pool saw these gives in the reclaim's causal past, so this replica
                    // holds at least as much of each.
                    for (sku, to) in gives {
                        for (r, cap) in to {
                            if *cap > self.state.value(*replica, sku, Field::Give(*r)) {
                                return Err(invalid(format!(
                                    "caps a give of {sku} to {r} above what it holds"
                                )));
                            }
                        }
                    }
                }
            }
            Operation::Restock { .. } if !is_pool => {
                return Err(Rejection::PoolOnly {
                    replica: actor,
                    role,
                    section: "restock",
                });
            }
            Operation::Sale(rec) => {
                if role != Role::Terminal {
                    return Err(invalid(format!("a {} does not sell", role.as_str())));
                }
                if rec.id
                    != (SaleId {
                        replica: actor,
                        seq: change.seq(),
                    })
                    || rec.at != msg.at
                {
                    return Err(invalid("sale id or time does not match the change".into()));
                }
                for l in &rec.lines {
                    if !self.state.catalog.contains_key(&l.sku) {
                        return Err(invalid(format!("bad line for {}", l.sku)));
                    }
                }
            }
            Operation::Void { sale, units } => {
                if sale.replica != actor {
                    return Err(invalid("only the seller voids a sale".into()));
                }
                match self.sale(*sale) {
                    Some(e) if !e.voided && e.record.units() == *units => {}
                    _ => return Err(invalid(format!("sale {sale} cannot be voided"))),
                }
            }
            Operation::Give { to, .. } => match self.state.replicas.get(to) {
                Some(i) if matches!(i.role, Role::Pool | Role::Terminal) && *to != actor => {}
                _ => return Err(invalid(format!("cannot give to {to}"))),
            },
            Operation::Mark { sku, .. } if !self.state.catalog.contains_key(sku) => {
                return Err(invalid(format!("unknown sku {sku}")));
            }
            // The sale need not be known here: whether it is depends on arrival order, and
            // every replica must reach the same verdict. Pages show at most what was sold.
            Operation::Refund { .. } if !matches!(role, Role::Pool | Role::Relay) => {
                return Err(invalid(format!(
                    "a {} does not record refunds",
                    role.as_str()
                )));
            }
            Operation::Refund { sku, .. } if !self.state.catalog.contains_key(sku) => {
                return Err(invalid(format!("unknown sku {sku}")));
            }
            _ => {}
        }
        if role == Role::Kitchen && !matches!(msg.op, Operation::Mark { .. }) {
            return Err(invalid(
                "a kitchen display only marks items unavailable".into(),
            ));
        }
        if role == Role::Relay && !matches!(msg.op, Operation::Refund { .. }) {
            return Err(invalid("a relay writes only refunds".into()));
        }

        let mut fx = Effects::default();
        let actor_bytes = ActorId::from(*self.replica_key_bytes(actor)?);
        let mut new_objs: HashMap<u64, Obj> = HashMap::new();
        // Ops of this change by (object, key): a second write to a key in one change names
        // the first as its pred.
        let mut written: HashMap<(ObjAddr, &str), u64> = HashMap::new();
        let mut epoch_written: BTreeMap<Sku, HashSet<Field>> = BTreeMap::new();
        let start = change.start_op().get();
        for (i, op) in ex.operations.iter().enumerate() {
            let opid = start + i as u64;
            let Key::Map(k) = &op.key else {
                return Err(Rejection::ForbiddenOp("list insert".into()));
            };
            if op.insert {
                return Err(Rejection::ForbiddenOp("insert".into()));
            }
            let mut obj_addr: ObjAddr = None;
            let target = match &op.obj {
                ObjectId::Root => None,
                ObjectId::Id(id) => {
                    let creator =
                        self.rid_of_actor(id.actor())
                            .ok_or_else(|| Rejection::NotOwner {
                                replica: actor,
                                target: "an unknown object".into(),
                            })?;
                    obj_addr = Some((id.counter(), creator));
                    let o = if creator == actor {
                        new_objs.get(&id.counter()).cloned()
                    } else {
                        None
                    };
                    Some(
                        o.or_else(|| self.state.objects.get(&(id.counter(), creator)).cloned())
                            .ok_or_else(|| Rejection::NotOwner {
                                replica: actor,
                                target: "an unknown object".into(),
                            })?,
                    )
                }
            };
            let where_ = || format!("{}/{}", describe(target.as_ref()), k);
            for p in op.pred.iter() {
                if *p.actor() != actor_bytes {
                    return Err(Rejection::ForeignPred {
                        replica: actor,
                        target: where_(),
                    });
                }
            }
            // `pred` must be exactly the op holding the current value: an empty pred beside a
            // value makes a conflict the state does not see, and a stale one forks the key.
            let current = match written.get(&(obj_addr, k.as_str())) {
                Some(c) => Some(*c),
                None => match &target {
                    Some(Obj::Epoch(owner, sku, e)) => Field::parse(k).and_then(|f| {
                        self.state
                            .cells
                            .get(&(*owner, sku.clone()))
                            .filter(|c| c.epoch == Some(*e))
                            .and_then(|c| c.ops.get(&f))
                            .copied()
                    }),
                    _ => match self.state.current_ops.get(&(obj_addr, k.to_string())) {
                        Some((c, w)) if *w == actor => Some(*c),
                        Some(_) => {
                            return Err(Rejection::BadPred {
                                replica: actor,
                                target: where_(),
                            });
                        }
                        None => None,
                    },
                },
            };
            if !op.pred.iter().map(|p| p.counter()).eq(current) {
                return Err(Rejection::BadPred {
                    replica: actor,
                    target: where_(),
                });
            }
            written.insert((obj_addr, k.as_str()), opid);
            if !matches!(target, Some(Obj::Epoch(..))) {
                fx.ops.push(((obj_addr, k.to_string()), (opid, actor)));
            }
            let make_map = matches!(op.action, OpType::Make(ObjType::Map));
            let scalar = match &op.action {
                OpType::Put(v) => Some(v),
                OpType::Make(ObjType::Map) => None,
                other => return Err(Rejection::ForbiddenOp(format!("{other:?} at {}", where_()))),
            };
            let pool_section = |section: &'static str, allowed: bool| -> Result<(), Rejection> {
                if !is_pool {
                    return Err(Rejection::PoolOnly {
                        replica: actor,
                        role,
                        section,
                    });
                }
                if !allowed {
                    return Err(invalid(format!("writes {section} section")));
                }
                Ok(())
            };
            let genesis = matches!(msg.op, Operation::Genesis { .. });
            let mut created: Option<Obj> = None;
            match target.clone() {
                None => {
                    pool_section("root", genesis)?;
                    if !make_map || !op.pred.is_empty() {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    created = Some(match k.as_str() {
                        EVENT => Obj::Event,
                        CATALOG => Obj::Catalog,
                        REPLICAS => Obj::Replicas,
                        STOCK => Obj::Stock,
                        _ => return Err(invalid(format!("unknown root key {k}"))),
                    });
                }
                Some(Obj::Event) => {
                    pool_section("event", genesis)?;
                    if make_map {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                }
                Some(Obj::Catalog) => {
                    pool_section(
                        "catalog",
                        genesis || matches!(msg.op, Operation::Catalog { .. }),
                    )?;
                    let sku = Sku::new(k.to_string()).map_err(|e| invalid(e.to_string()))?;
                    if !make_map || self.state.catalog.contains_key(&sku) {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    created = Some(Obj::CatalogItem(sku));
                }
                Some(Obj::CatalogItem(_)) => {
                    pool_section(
                        "catalog",
                        genesis || matches!(msg.op, Operation::Catalog { .. }),
                    )?;
                    if make_map {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                }
                Some(Obj::Replicas) => {
                    pool_section(
                        "replicas",
                        genesis || matches!(msg.op, Operation::Enrol { .. }),
                    )?;
                    let rid: ReplicaId = k
                        .parse()
                        .map_err(|e: crate::ids::InvalidId| invalid(e.to_string()))?;
                    if !make_map || !op.pred.is_empty() || self.state.replicas.contains_key(&rid) {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    created = Some(Obj::ReplicaEntry(rid));
                }
                Some(Obj::ReplicaEntry(_)) => {
                    pool_section(
                        "replicas",
                        matches!(
                            msg.op,
                            Operation::Genesis { .. }
                                | Operation::Enrol { .. }
                                | Operation::Retire { .. }
                                | Operation::Reclaim { .. }
                        ),
                    )?;
                    if make_map {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                }
                Some(Obj::Stock) => {
                    pool_section(
                        "stock",
                        genesis || matches!(msg.op, Operation::Enrol { .. }),
                    )?;
                    let rid: ReplicaId = k
                        .parse()
                        .map_err(|e: crate::ids::InvalidId| invalid(e.to_string()))?;
                    if !make_map || !op.pred.is_empty() || self.state.stock_maps.contains_key(&rid)
                    {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    fx.new_stock_maps.push(rid);
                    created = Some(Obj::ReplicaStock(rid));
                }
                Some(Obj::ReplicaStock(owner)) => {
                    if owner != actor {
                        return Err(Rejection::NotOwner {
                            replica: actor,
                            target: where_(),
                        });
                    }
                    let sku = Sku::new(k.to_string()).map_err(|e| invalid(e.to_string()))?;
                    let exists = self
                        .state
                        .cells
                        .get(&(actor, sku.clone()))
                        .is_some_and(|c| c.has_map)
                        || fx.new_sku_maps.contains(&sku);
                    if !make_map
                        || !op.pred.is_empty()
                        || exists
                        || !self.state.catalog.contains_key(&sku)
                    {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    fx.new_sku_maps.push(sku.clone());
                    created = Some(Obj::SkuStock(actor, sku));
                }
                Some(Obj::SkuStock(owner, sku)) => {
                    if owner != actor {
                        return Err(Rejection::NotOwner {
                            replica: actor,
                            target: where_(),
                        });
                    }
                    let current = fx.epochs.get(&sku).and_then(|e| e.0).or_else(|| {
                        self.state
                            .cells
                            .get(&(actor, sku.clone()))
                            .and_then(|c| c.epoch)
                    });
                    let next = current.map_or(0, |e| e + 1);
                    if !make_map || !op.pred.is_empty() || parse_epoch(k) != Some(next) {
                        return Err(Rejection::ForbiddenOp(where_()));
                    }
                    fx.epochs.insert(sku.clone(), (Some(next), 0));
                    epoch_written.insert(sku.clone(), HashSet::new());
                    created = Some(Obj::Epoch(actor, sku, next));
                }
                Some(Obj::Epoch(owner, sku, e)) => {
                    if owner != actor {
                        return Err(Rejection::NotOwner {
                            replica: actor,
                            target: where_(),
                        });
                    }
                    let cell = self.state.cells.get(&(actor, sku.clone()));
                    let (cur_epoch, writes) = match fx.epochs.get(&sku) {
                        Some((Some(ep), w)) => (Some(*ep), *w),
                        _ => (
                            cell.and_then(|c| c.epoch),
                            cell.map_or(0, |c| c.epoch_writes),
                        ),
                    };
                    if cur_epoch != Some(e) {
                        return Err(Rejection::ForbiddenOp(format!(
                            "write to an old epoch at {}",
                            where_()
                        )));
                    }
                    let field =
                        Field::parse(k).ok_or_else(|| invalid(format!("unknown counter {k}")))?;
                    match field {
                        Field::Give(to)
                            if to == actor || !self.state.replicas.contains_key(&to) =>
                        {
                            return Err(invalid(format!("give to {to}")));
                        }
                        Field::Reclaim(_) if !is_pool => {
                            return Err(Rejection::PoolOnly {
                                replica: actor,
                                role,
                                section: "reclaim",
                            });
                        }
                        _ => {}
                    }
                    let v = match scalar {
                        Some(ScalarValue::Uint(v)) => *v,
                        _ => {
                            return Err(invalid(format!(
                                "counter {k} must be an unsigned integer"
                            )));
                        }
                    };
                    // A mark holds the time of the change that set it, never a later one.
                    let limit = if field.is_mark() {
                        msg.at.packed()
                    } else {
                        MAX_UNITS
                    };
                    if v > limit {
                        return Err(invalid(format!("counter {k} above {limit}")));
                    }
                    let old = fx
                        .counters
                        .get(&(sku.clone(), field))
                        .map(|(v, _)| *v)
                        .unwrap_or_else(|| cell.map_or(0, |c| c.get(field)));
                    if v < old {
                        return Err(Rejection::Shrinking {
                            replica: actor,
                            sku: sku.clone(),
                            field: field.key(),
                            from: old,
                            to: v,
                        });
                    }
                    if writes + 1 > MAX_EPOCH_WRITES {
                        return Err(invalid("epoch map over its write limit".into()));
                    }
                    fx.epochs.insert(sku.clone(), (Some(e), writes + 1));
                    fx.counters.insert((sku.clone(), field), (v, opid));
                    if let Some(w) = epoch_written.get_mut(&sku) {
                        w.insert(field);
                    }
                }
            }
            if let Some(o) = created {
                new_objs.insert(opid, o.clone());
                fx.objects.push(((opid, actor), o));
            }
        }
        // A new epoch must carry every non-zero counter forward.
        for (sku, written) in &epoch_written {
            if let Some(cell) = self.state.cells.get(&(actor, sku.clone())) {
                for (f, v) in &cell.values {
                    if *v > 0 && !written.contains(f) {
                        return Err(invalid(format!("new epoch of {sku} drops {}", f.key())));
                    }
                }
            }
        }
        msg.op.check_limits().map_err(invalid)?;
        // The counter moves must be exactly what the message says.
        let expected: BTreeMap<(Sku, Field), u64> = match &msg.op {
            Operation::Sale(rec) => keyed(&rec.units(), Field::Out),
            Operation::Void { units, .. } | Operation::Restock { units, .. } => {
                keyed(units, Field::In)
            }
            Operation::Reclaim { replica, units, .. } => keyed(units, Field::Reclaim(*replica)),
            Operation::Adjust { units, .. } => keyed(units, Field::Out),
            Operation::Refund { sku, units, .. } => {
                BTreeMap::from([((sku.clone(), Field::Refunded), *units)])
            }
            Operation::Give { to, units } => keyed(units, Field::Give(*to)),
            Operation::Mark { sku, available } => {
                let field = if *available {
                    Field::OnAt
                } else {
                    Field::OffAt
                };
                let old = self.state.value(actor, sku, field);
                let moved = msg.at.packed().checked_sub(old).filter(|d| *d > 0);
                let moved = moved.ok_or_else(|| invalid(format!("mark of {sku} is not newer")))?;
                BTreeMap::from([((sku.clone(), field), moved)])
            }
            _ => BTreeMap::new(),
        };
        let mut actual: BTreeMap<(Sku, Field), u64> = BTreeMap::new();
        for ((sku, f), (v, _)) in &fx.counters {
            let old = self.state.value(actor, sku, *f);
            if *v > old {
                actual.insert((sku.clone(), *f), v - old);
            }
        }
        if expected != actual {
            let sku = expected
                .keys()
                .chain(actual.keys())
                .find(|k| expected.get(k) != actual.get(k))
                .map(|(s, _)| s.to_string())
                .unwrap_or_default();
            return Err(Rejection::MessageMismatch { op: op_kind, sku });
        }
        if !(actor != self.me && self.planted(LedgerBug::SkipFloorOnReceive)) {
            self.check_floor(msg, change.deps(), actor, is_pool, causal, &fx)?;
        }
        Ok(fx)
    }

    /// No minting by non-pool writers, and the policy floor for every writer (the pool too:
    /// its gives and write-offs may not exceed what it holds).
    ///
    /// Rights are judged as the writer could see them: a reclaim is the one thing that lowers
    /// a replica's rights without its own change, so a reclaim the change does not have in its
    /// causal past is added back — for the reclaimed replica's own late changes (made before it
    /// learned of its retirement: accepted as oversell, never more than it held) and for the
    /// recipients of its capped gives. Every replica so reaches the same verdict whatever order
    /// the reclaim and the change arrive in.
    fn check_floor(
        &self,
        msg: &ChangeMessage,
        deps: &[ChangeHash],
        actor: ReplicaId,
        is_pool: bool,
        causal: &Causal,
        fx: &Effects,
    ) -> Result<(), Rejection> {
        let skus: BTreeSet<&Sku> = fx.counters.keys().map(|(s, _)| s).collect();
        for sku in skus {
            let get = |f: Field| {
                fx.counters
                    .get(&(sku.clone(), f))
                    .map(|(v, _)| *v)
                    .unwrap_or_else(|| self.state.value(actor, sku, f))
            };
            let (i, o) = (get(Field::In), get(Field::Out));
            if !is_pool && i > o {
                return Err(Rejection::Minting {
                    replica: actor,
                    sku: sku.clone(),
                    in_units: i,
                    out_units: o,
                });
            }
            let mut lowered: i128 = 0;
            for ((s, f), (v, _)) in &fx.counters {
                if s == sku && matches!(f, Field::Give(_) | Field::In | Field::Out) {
                    let d = i128::from(*v) - i128::from(self.state.value(actor, sku, *f));
                    lowered += if *f == Field::In { -d } else { d };
                }
            }
            let unseen = self.unseen_reclaims(actor, sku, causal.pool_seq_seen);
            let before = i128::from(self.state.rights(actor, sku)) + unseen;
            let after = before - lowered;
            let floor = match &msg.op {
                Operation::Sale(rec) if self.policy() == Policy::Optimistic => {
                    let od = rec.overdraft.get(sku).copied().unwrap_or(0);
                    if od > 0 {
                        let cap = self.offline_cap_seen(sku, deps, causal.pool_seq_seen);
                        if od > cap {
                            return Err(Rejection::InvalidOperation {
                                op: "sale",
                                why: format!(
                                    "claims an overdraft of {od} {sku}, its view allowed {cap}"
                                ),
                            });
                        }
                    }
                    -i128::from(od)
                }
                _ => 0,
            };
            // Only a change that lowers rights is held to the floor: a void that returns
            // units to an overdrawn terminal raises its rights and is always allowed.
            if after < floor && lowered > 0 {
                return Err(Rejection::BelowFloor {
                    replica: actor,
                    sku: sku.clone(),
                    rights: clamp_i64(after),
                    floor: clamp_i64(floor),
                });
            }
        }
        Ok(())
    }

    /// Rights of `r` in `sku` taken by reclaims after pool change `pool_seq`: its own rights
    /// reclaimed, and the capped part of gives a reclaimed replica made it.
    fn unseen_reclaims(&self, r: ReplicaId, sku: &Sku, pool_seq: u64) -> i128 {
        let mut n: i128 = 0;
        for (seq, giver) in &self.state.reclaims {
            if *seq <= pool_seq {
                continue;
            }
            if *giver == r {
                n += i128::from(self.state.value(self.pool(), sku, Field::Reclaim(r)));
            }
            n += i128::from(self.state.give_excess(*giver, sku, r));
        }
        n
    }

    /// The offline overdraft a seller could compute for `sku` from what it held when it sold:
    /// floor(available / active terminals), both as of the sale's dependencies. Reads the
    /// document at those heads: only offline sales that claim an overdraft pay for it.
    fn offline_cap_seen(&self, sku: &Sku, deps: &[ChangeHash], pool_seq: u64) -> u64 {
        let terminals = self.state.terminals_as_of(pool_seq).max(1);
        let available = layout::read_counters(&self.doc, deps)
            .get(sku)
            .map_or(0, |c| c.available());
        u64::try_from(available.max(0)).unwrap_or(0) / terminals
    }

    fn replica_key_bytes(&self, r: ReplicaId) -> Result<&[u8; 32], Rejection> {
        if r == self.pool() {
            return Ok(self.pool_key.bytes());
        }
        self.state
            .replicas
            .get(&r)
            .map(|i| i.key.bytes())
            .ok_or_else(|| Rejection::UnregisteredActor {
                actor: r.to_string(),
            })
    }

    fn rid_of_actor(&self, a: &ActorId) -> Option<ReplicaId> {
        let b: [u8; 32] = a.to_bytes().try_into().ok()?;
        if b == *self.pool_key.bytes() {
            return Some(self.pool());
        }
        self.state.by_key.get(&b).copied()
    }
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn keyed(units: &BTreeMap<Sku, u64>, f: Field) -> BTreeMap<(Sku, Field), u64> {
    units
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| ((s.clone(), f), *n))
        .collect()
}

fn describe(o: Option<&Obj>) -> String {
    match o {
        None => String::new(),
        Some(Obj::Event) => "/event".into(),
        Some(Obj::Catalog) => "/catalog".into(),
        Some(Obj::CatalogItem(s)) => format!("/catalog/{s}"),
        Some(Obj::Replicas) => "/replicas".into(),
        Some(Obj::ReplicaEntry(r)) => format!("/replicas/{r}"),
        Some(Obj::Stock) => "/stock".into(),
        Some(Obj::ReplicaStock(r)) => format!("/stock/{r}"),
        Some(Obj::SkuStock(r, s)) => format!("/stock/{r}/{s}"),
        Some(Obj::Epoch(r, s, e)) => format!("/stock/{r}/{s}/{}", epoch_key(*e)),
    }
}

/// Decode a change's ops. Automerge validates op encodings when a change is parsed; the guard
/// keeps a decoding fault in the library from taking the replica down.
pub(super) fn expand(c: &Change) -> Result<ExpandedChange, Rejection> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.decode()))
        .map_err(|_| Rejection::Malformed("ops do not decode".into()))
}
