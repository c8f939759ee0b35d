//! A change of this replica's own, written without the document: its ops are built from what
//! the state records of the document (the op that made each object, the op holding each key),
//! so a write never waits for received changes to be applied to Automerge first. The change
//! then passes the validation every received change passes, which checks each object id and
//! each `pred` against the same state, and joins the document with the next batch.

use super::*;
use automerge::legacy::{Op, OpId, SortedVec};

/// This replica's own map of an item and its current epoch map.
#[derive(Debug, Clone, Copy)]
pub(super) struct OwnMaps {
    epoch: u32,
    sku_map: OpAddr,
    epoch_map: OpAddr,
}

/// The ops of one change being written by this replica.
pub(super) struct Draft<'a> {
    state: &'a State,
    me: ReplicaId,
    actor: ActorId,
    /// The change's time.
    pub at: Hlc,
    start: u64,
    ops: Vec<Op>,
    /// Keys written earlier in this change and the op that wrote each: a second write names
    /// it as `pred`.
    written: HashMap<(ObjAddr, String), u64>,
    own: &'a mut HashMap<Sku, OwnMaps>,
    /// Planted bug: roll over without carrying the other counters forward.
    drop_carry: bool,
}

impl<'a> Draft<'a> {
    pub(super) fn new(
        state: &'a State,
        me: ReplicaId,
        actor: ActorId,
        at: Hlc,
        start: u64,
        own: &'a mut HashMap<Sku, OwnMaps>,
        drop_carry: bool,
    ) -> Self {
        Self {
            state,
            me,
            actor,
            at,
            start,
            ops: Vec::new(),
            written: HashMap::new(),
            own,
            drop_carry,
        }
    }

    pub(super) fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    fn actor_of(&self, r: ReplicaId) -> Result<ActorId, OpError> {
        if r == self.me {
            return Ok(self.actor.clone());
        }
        self.state
            .replicas
            .get(&r)
            .map(|i| i.key.actor())
            .ok_or_else(|| internal(format!("no key known for replica {r}")))
    }

    /// The op that made `obj`, as the state records it (a scan: kept for rare writes and for
    /// the first write of an item after a start).
    pub(super) fn find(&self, obj: &Obj) -> Result<OpAddr, OpError> {
        self.state
            .objects
            .iter()
            .find(|(_, o)| *o == obj)
            .map(|(addr, _)| *addr)
            .ok_or_else(|| internal(format!("the document has no {obj:?}")))
    }

    /// The op holding `key` of `obj` as the state records it, outside the epoch maps.
    pub(super) fn current(&self, obj: ObjAddr, key: &str) -> Option<OpAddr> {
        self.state.current_ops.get(&(obj, key.to_owned())).copied()
    }

    fn push(
        &mut self,
        obj: ObjAddr,
        key: &str,
        action: OpType,
        current: Option<OpAddr>,
    ) -> Result<OpAddr, OpError> {
        let id = self.start + self.ops.len() as u64;
        let slot = (obj, key.to_owned());
        let holder = match self.written.get(&slot) {
            Some(c) => Some((*c, self.me)),
            None => current,
        };
        let pred: Vec<OpId> = match holder {
            Some((c, r)) => vec![OpId(c, self.actor_of(r)?)],
            None => Vec::new(),
        };
        let obj_id = match obj {
            None => ObjectId::Root,
            Some((c, r)) => ObjectId::Id(OpId(c, self.actor_of(r)?)),
        };
        self.ops.push(Op {
            action,
            obj: obj_id,
            key: Key::Map(key.into()),
            pred: SortedVec::from(pred),
            insert: false,
        });
        self.written.insert(slot, id);
        Ok((id, self.me))
    }

    /// Put a value at `key` of `obj`, replacing `current` (the op holding it now, if any).
    pub(super) fn put(
        &mut self,
        obj: ObjAddr,
        key: &str,
        value: impl Into<ScalarValue>,
        current: Option<OpAddr>,
    ) -> Result<(), OpError> {
        self.push(obj, key, OpType::Put(value.into()), current)
            .map(|_| ())
    }

    /// Make a map at `key` of `obj` (`None`: the root); returns it.
    pub(super) fn make_map(
        &mut self,
        obj: ObjAddr,
        key: &str,
        current: Option<OpAddr>,
    ) -> Result<OpAddr, OpError> {
        self.push(obj, key, OpType::Make(ObjType::Map), current)
    }

    /// The entry of a replica in the registry.
    pub(super) fn replica_entry(
        &mut self,
        replicas: OpAddr,
        rid: ReplicaId,
        key: &PublicKey,
        name: &str,
        role: Role,
    ) -> Result<(), OpError> {
        let e = Some(self.make_map(Some(replicas), &rid.to_string(), None)?);
        self.put(e, "name", name, None)?;
        self.put(e, "role", role.as_str(), None)?;
        self.put(e, "key", key.to_string(), None)?;
        self.put(e, "retired", false, None)
    }

    /// Mark a registered replica retired.
    pub(super) fn retire(&mut self, replica: ReplicaId) -> Result<(), OpError> {
        let entry = Some(self.find(&Obj::ReplicaEntry(replica))?);
        let current = self.current(entry, "retired");
        self.put(entry, "retired", true, current)
    }

    /// This replica's map of `sku` and its epoch map `epoch`.
    fn own_maps(&mut self, sku: &Sku, epoch: u32) -> Result<OwnMaps, OpError> {
        if let Some(m) = self.own.get(sku).filter(|m| m.epoch == epoch) {
            return Ok(*m);
        }
        let m = OwnMaps {
            epoch,
            sku_map: self.find(&Obj::SkuStock(self.me, sku.clone()))?,
            epoch_map: self.find(&Obj::Epoch(self.me, sku.clone(), epoch))?,
        };
        self.own.insert(sku.clone(), m);
        Ok(m)
    }

    /// Write this replica's counters (new absolute values) into its epoch maps, starting the
    /// next epoch map of an item, with its current values carried forward, once the current
    /// one has taken [`ROLLOVER_WRITES`] writes.
    pub(super) fn counters(&mut self, writes: &BTreeMap<(Sku, Field), u64>) -> Result<(), OpError> {
        let mut by_sku: BTreeMap<&Sku, Vec<(Field, u64)>> = BTreeMap::new();
        for ((sku, f), v) in writes {
            by_sku.entry(sku).or_default().push((*f, *v));
        }
        let empty = Cell::default();
        for (sku, fields) in by_sku {
            let state = self.state;
            let cell = state.cells.get(&(self.me, sku.clone())).unwrap_or(&empty);
            let Some(epoch) = cell.epoch.filter(|_| cell.has_map) else {
                let mine = Some(self.find(&Obj::ReplicaStock(self.me))?);
                let current = self.current(mine, sku.as_str());
                let sku_map = self.make_map(mine, sku.as_str(), current)?;
                let epoch_map = self.make_map(Some(sku_map), &epoch_key(0), None)?;
                for (f, v) in &fields {
                    self.put(Some(epoch_map), &f.key(), *v, None)?;
                }
                self.remember(sku, 0, sku_map, epoch_map);
                continue;
            };
            let maps = self.own_maps(sku, epoch)?;
            if cell.epoch_writes as usize + fields.len() > ROLLOVER_WRITES as usize {
                let next = epoch + 1;
                let sku_map = maps.sku_map;
                let epoch_map = self.make_map(Some(sku_map), &epoch_key(next), None)?;
                let mut values = if self.drop_carry {
                    BTreeMap::new()
                } else {
                    cell.values.clone()
                };
                values.extend(fields.iter().copied());
                for (f, v) in values {
                    if v > 0 {
                        self.put(Some(epoch_map), &f.key(), v, None)?;
                    }
                }
                self.remember(sku, next, sku_map, epoch_map);
            } else {
                for (f, v) in &fields {
                    let current = cell.ops.get(f).map(|c| (*c, self.me));
                    self.put(Some(maps.epoch_map), &f.key(), *v, current)?;
                }
            }
        }
        Ok(())
    }

    fn remember(&mut self, sku: &Sku, epoch: u32, sku_map: OpAddr, epoch_map: OpAddr) {
        let m = OwnMaps {
            epoch,
            sku_map,
            epoch_map,
        };
        self.own.insert(sku.clone(), m);
    }
}
