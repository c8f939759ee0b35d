//! The scenario's faults and the admin's operations: outages, crashes and restarts from durable
//! state, lost devices, reclaims, restocks, shrink and replacement terminals.

use super::*;

impl World {
    pub(super) fn run_faults(&mut self) -> Result<(), Violation> {
        let mut changed = false;
        while let Some(&(t, f)) = self.faults.get(self.next_fault) {
            if t > self.now {
                break;
            }
            self.next_fault += 1;
            changed = true;
            self.log(|| format!("fault {f:?}"));
            match f {
                Fault::WanDown => self.wan_up = false,
                Fault::WanUp => self.wan_up = true,
                Fault::LanDown => self.lan_up = false,
                Fault::LanUp => self.lan_up = true,
                Fault::WifiDown(i) => self.wifi_up[i] = false,
                Fault::WifiUp(i) => self.wifi_up[i] = true,
                Fault::LinkDown(a, b) => {
                    self.cut.insert((a.min(b), a.max(b)));
                }
                Fault::LinkUp(a, b) => {
                    self.cut.remove(&(a.min(b), a.max(b)));
                }
                Fault::Crash(i) => self.crash(i),
                Fault::Restart(i) => self.restart(i)?,
                Fault::Die(i) => {
                    let n = &mut self.nodes[i];
                    if n.alive {
                        n.alive = false;
                        n.dead = true;
                        self.counters.deaths += 1;
                    }
                }
                Fault::Reclaim(i) => self.reclaim(i)?,
                Fault::Restock(pct) => self.restock(pct)?,
                Fault::Adjust(pct) => self.adjust(pct)?,
                Fault::Replace(i) => self.replace(i)?,
                Fault::Heal => {
                    self.wan_up = true;
                    self.lan_up = true;
                    self.wifi_up.iter_mut().for_each(|w| *w = true);
                    self.cut.clear();
                    for i in 1..self.nodes.len() {
                        if self.nodes[i].crashed {
                            self.restart(i)?;
                        }
                    }
                    self.healed_at = Some(self.now);
                }
            }
        }
        if changed {
            self.update_links();
        }
        Ok(())
    }

    pub(super) fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.alive {
            return;
        }
        // Everything applied was persisted before it was acknowledged.
        n.durable = n.engine.ledger().all_changes().collect();
        n.alive = false;
        n.crashed = true;
        self.counters.crashes += 1;
        // Customers waiting at the crashed terminal leave unserved.
        let waiting: Vec<Ticket> = self
            .tickets
            .iter()
            .filter(|(_, (t, _, _))| *t == i)
            .map(|(k, _)| *k)
            .collect();
        for k in waiting {
            if let Some((t, sku, qty)) = self.tickets.remove(&k) {
                self.refused(t, &sku, qty, "terminal crashed");
            }
        }
    }

    pub(super) fn restart(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.now;
        let wall = self.wall(i);
        let pool_key = self.nodes[0].key.public();
        let n = &mut self.nodes[i];
        if !n.crashed {
            return Ok(());
        }
        let durable = std::mem::take(&mut n.durable);
        let held = durable.len();
        let (mut ledger, report) = Ledger::restore_with(
            n.key.clone(),
            self.stand_id.clone(),
            pool_key,
            durable,
            Box::new(self.bytes.clone()),
            wall,
        );
        if !report.rejected.is_empty() || report.accepted.len() != held {
            return Err(violation(
                "restore",
                format!(
                    "terminal {i} restored {} of {held} durable changes, rejected {:?}",
                    report.accepted.len(),
                    report.rejected
                ),
            ));
        }
        add_stats(&mut self.counters.engines_before_restart, n.engine.stats());
        ledger.share_signature_memo(self.memo.clone());
        ledger.share_sale_records(self.records.clone());
        ledger.defer_document();
        n.engine = Engine::new(ledger, self.engine_cfg.clone(), wall);
        n.wake = 0;
        n.alive = true;
        n.crashed = false;
        n.overdraft_scanned = 0;
        n.max_cap.clear();
        n.cap_sum.clear();
        n.sold.clear();
        n.adjusts_known = 0;
        if n.next_arrival < now {
            self.schedule_arrival(i);
        }
        self.counters.restarts += 1;
        self.mark_dirty(i);
        Ok(())
    }

    pub(super) fn reclaim(&mut self, i: usize) -> Result<(), Violation> {
        let rid = self.nodes[i].id;
        for s in &self.skus {
            let r = self.nodes[0].engine.ledger().rights(rid, s).max(0) as u64;
            *self.reclaim_allowance.entry(s.clone()).or_insert(0) += r;
            self.counters.reclaimed_units += r;
        }
        let wall = self.wall(0);
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| Ok((l.reclaim(rid, now)?, ())))
            .map_err(|e| violation("reclaim", e.to_string()))?;
        self.drain(0);
        Ok(())
    }

    pub(super) fn restock(&mut self, pct: u64) -> Result<(), Violation> {
        let units: BTreeMap<Sku, u64> = self
            .expected_demand
            .iter()
            .map(|(s, d)| (s.clone(), ((d * pct as f64) / 100.0).ceil() as u64))
            .filter(|(_, u)| *u > 0)
            .collect();
        if units.is_empty() {
            return Ok(());
        }
        for (s, u) in &units {
            *self.truth.entry(s.clone()).or_insert(0) += *u as i64;
            *self.restocked.entry(s.clone()).or_insert(0) += u;
            self.counters.restocked_units += u;
        }
        let wall = self.wall(0);
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| Ok((l.restock(units, "delivery", now)?, ())))
            .map_err(|e| violation("restock", e.to_string()))?;
        self.drain(0);
        Ok(())
    }

    /// Shrink at the pool: for one or two items the pool holds (drawn from the seed), `pct` of
    /// their opening stock is written off, never more than the pool holds (the spoiled units are
    /// in its store room, not in a terminal's hands) nor than the stand really has. The ledger
    /// lets the pool write off more than it holds; that would leave terminals holding rights to
    /// units that no longer exist (oversell under strict), so the admin here does not.
    pub(super) fn adjust(&mut self, pct: u64) -> Result<(), Violation> {
        let pool = &self.nodes[0];
        let mut held: Vec<(i64, Sku)> = self
            .skus
            .iter()
            .map(|s| (pool.engine.ledger().rights(pool.id, s), s.clone()))
            .filter(|(r, _)| *r > 0)
            .collect();
        let how_many = self.rng.random_range(1..=2usize).min(held.len());
        let mut picked = Vec::with_capacity(how_many);
        for _ in 0..how_many {
            let i = self.rng.random_range(0..held.len());
            picked.push(held.remove(i));
        }
        let mut units = BTreeMap::new();
        for (r, s) in picked {
            let want = (self.opening.get(&s).copied().unwrap_or(0) * pct).div_ceil(100);
            let left = self.truth.get(&s).copied().unwrap_or(0).max(0) as u64;
            let u = want.min(r as u64).min(left);
            if u > 0 {
                units.insert(s, u);
            }
        }
        if units.is_empty() {
            return Ok(());
        }
        let wall = self.wall(0);
        let shrink = units.clone();
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| Ok((l.adjust(shrink, "spoiled", now)?, ())))
            .map_err(|e| violation("adjust", e.to_string()))?;
        for (s, u) in &units {
            *self.truth.entry(s.clone()).or_insert(0) -= *u as i64;
            *self.shrunk.entry(s.clone()).or_insert(0) += u;
            *self
                .served
                .entry(s.clone())
                .or_default()
                .entry(self.nodes[0].id)
                .or_insert(0) += u;
            self.counters.shrunk_units += u;
        }
        self.adjusts
            .push((self.nodes[0].engine.ledger().local_seq(), units));
        self.drain(0);
        Ok(())
    }

    /// The admin enrols a replacement for lost terminal `lost`: a new device with a new key
    /// (from the seed), a fresh `Ledger::join` that holds nothing, links to every replica (opened
    /// by `update_links`), and its own customers from now on.
    pub(super) fn replace(&mut self, lost: usize) -> Result<(), Violation> {
        let key = ReplicaKey::from_seed(self.rng.random());
        let new = self.nodes.len();
        let wall = self.wall(0);
        let name = format!("till {new} (replaces till {lost})");
        let public = key.public();
        self.nodes[0]
            .engine
            .local_op(wall, |l, now| {
                Ok((l.enrol(public, &name, Role::Terminal, now)?, ()))
            })
            .map_err(|e| violation("enrol", e.to_string()))?;
        self.drain(0);
        let pool_key = self.nodes[0].key.public();
        let mut ledger = Ledger::join(key.clone(), self.stand_id.clone(), pool_key);
        ledger.share_signature_memo(self.memo.clone());
        ledger.share_change_bytes(self.bytes.clone());
        ledger.share_sale_records(self.records.clone());
        ledger.defer_document();
        let customers = ChaCha8Rng::seed_from_u64(self.rng.random());
        let skew = draw_skew(&mut self.skew_rng, self.cfg.clock_skew_ms);
        let now_wall = GAME_START_WALL_MS
            .saturating_add(self.now)
            .saturating_add_signed(skew);
        let engine = Engine::new(ledger, self.engine_cfg.clone(), now_wall);
        let node = Node::new(key, engine, customers, skew);
        self.by_replica.insert(node.id, new);
        self.nodes.push(node);
        self.wifi_up.push(true);
        self.mark_dirty(new);
        self.counters.replacements += 1;
        self.schedule_arrival(new);
        Ok(())
    }
}
