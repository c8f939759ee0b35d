//! The customers: arrivals per terminal, what they ask for, and what became of each (the
//! oracle of units served that the checks judge the stand by).

use super::*;

/// Sales, per thousand, whose customer comes back for a refund.
pub const VOID_PER_MILLE: u64 = 10;
/// A refund comes this long after the sale (uniform within).
pub const VOID_AFTER_MS: (u64, u64) = (5_000, 60_000);

/// A well-mixed hash of `x` (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl World {
    pub(super) fn committed(&mut self, ticket: Ticket, sale_id: SaleId, waited_ms: u64) {
        let Some((t, sku, qty)) = self.tickets.remove(&ticket) else {
            return;
        };
        let now = self.now;
        self.log(|| {
            format!("terminal {t} sells {sku} x{qty} ({sale_id:?}, waited {waited_ms} ms)")
        });
        if waited_ms > 0 {
            self.waits.push(waited_ms);
        }
        self.counters.sales += 1;
        self.counters.units_sold += qty;
        if t > self.base_terminals {
            self.counters.replacement_sales += 1;
        }
        *self.truth.entry(sku.clone()).or_insert(0) -= qty as i64;
        *self
            .served
            .entry(sku.clone())
            .or_default()
            .entry(sale_id.replica)
            .or_insert(0) += qty;
        *self.sold_units.entry(sku.clone()).or_insert(0) += qty;
        self.in_transit
            .entry(sale_id.replica)
            .or_default()
            .insert(sale_id.seq, now);
        self.acked.push((sale_id, t));
        // Some customers come back for a refund: decided by the sale itself, not by a random
        // stream, so that every policy sees the same customers.
        let h = mix(self.cfg.seed ^ ((t as u64) << 40) ^ sale_id.seq);
        if h % 1_000 < VOID_PER_MILLE {
            let after = VOID_AFTER_MS.0 + (h >> 10) % (VOID_AFTER_MS.1 - VOID_AFTER_MS.0);
            self.voids
                .entry(now + after)
                .or_default()
                .push((t, sale_id, sku, qty));
        }
    }

    /// Refunds due now, at the terminal that made the sale (a customer whose terminal is down
    /// or gone goes home).
    pub(super) fn voids(&mut self) {
        while let Some(entry) = self.voids.first_entry() {
            if *entry.key() > self.now {
                return;
            }
            for (t, sale, sku, qty) in entry.remove() {
                if !self.nodes[t].alive || self.nodes[t].dead {
                    continue;
                }
                let wall = self.wall(t);
                match self.nodes[t]
                    .engine
                    .local_op(wall, |l, now| Ok((l.void(sale, now)?, ())))
                {
                    Ok(()) => {
                        self.log(|| format!("terminal {t} voids {sale:?} ({sku} x{qty})"));
                        self.counters.voids += 1;
                        *self.truth.entry(sku.clone()).or_insert(0) += qty as i64;
                        *self
                            .returned
                            .entry(sku.clone())
                            .or_default()
                            .entry(sale.replica)
                            .or_insert(0) += qty;
                        self.acked_voids.push((sale, t, sku, qty));
                    }
                    Err(OpError::Refused(r)) => {
                        self.log(|| format!("terminal {t} cannot void {sale:?}: {r}"));
                    }
                    Err(OpError::Internal(why)) => {
                        self.bug_seen.get_or_insert_with(|| {
                            (
                                "internal-fault",
                                format!("node {t} failed its own void: {why}"),
                            )
                        });
                    }
                }
                self.drain(t);
            }
        }
    }

    pub(super) fn schedule_arrival(&mut self, t: usize) {
        let scenario = self.cfg.scenario;
        let game = self.game_ms as f64;
        let n = &mut self.nodes[t];
        let mut at = n.next_arrival.min(self.now) as f64;
        if n.next_arrival == u64::MAX {
            at = self.now as f64;
        }
        // Piecewise-constant Poisson process: draw with the current rate; if the draw crosses a
        // phase boundary, restart from the boundary (the process is memoryless).
        loop {
            let frac = at / game;
            if frac >= 1.0 {
                n.next_arrival = u64::MAX;
                return;
            }
            let rate_per_ms = scenario::rate_per_min(scenario, frac) / 60_000.0;
            let next = at + exp_sample(&mut n.customers, 1.0 / rate_per_ms);
            let boundary = scenario::next_phase_boundary(frac) * game;
            if next < boundary {
                n.next_arrival = (next.ceil() as u64).max(self.now + 1);
                return;
            }
            at = boundary;
        }
    }

    pub(super) fn customers(&mut self) {
        if self.now >= self.game_ms {
            return;
        }
        for t in 1..self.nodes.len() {
            while self.nodes[t].alive && self.nodes[t].next_arrival <= self.now {
                self.serve(t);
                self.schedule_arrival(t);
            }
        }
    }

    pub(super) fn pick_sku(&mut self, t: usize) -> (Sku, u64) {
        let n = &mut self.nodes[t];
        let u: f64 = n.customers.random();
        let i = self
            .zipf_cdf
            .iter()
            .position(|c| u < *c)
            .unwrap_or(self.zipf_cdf.len() - 1);
        let qty = n.customers.random_range(1..=3u64);
        (self.skus[i].clone(), qty)
    }

    /// One customer at terminal `t`.
    pub(super) fn serve(&mut self, t: usize) {
        let now = self.now;
        let (wall, pool_wall) = (self.wall(t), self.wall(0));
        let (sku, qty) = self.pick_sku(t);
        self.counters.customers += 1;
        let me = self.nodes[t].id;
        if self.cfg.baseline && self.link_up(0, t) {
            // The central design: an online sale is decided by the pool.
            let pool_has = self.nodes[0].engine.ledger().available(&sku);
            let have = self.nodes[t].engine.ledger().rights(me, &sku);
            let ok = if pool_has < qty as i64 {
                false
            } else if have < qty as i64 {
                let short = qty - have.max(0) as u64;
                let units = BTreeMap::from([(sku.clone(), short)]);
                let give = self.nodes[0].engine.local_op(pool_wall, |l, now| {
                    let c = l.give(me, units, now)?;
                    Ok((c.clone(), c))
                });
                match give {
                    Ok(change) => {
                        self.counters.baseline_gives += 1;
                        self.drain(0);
                        // The round trip to the relay is the sale's answer: the give is
                        // handed to the terminal at once.
                        let pool_id = self.nodes[0].id;
                        self.nodes[t].engine.handle_message(
                            pool_id,
                            WireMessage::Changes {
                                changes: vec![change],
                            },
                            wall,
                        );
                        self.drain(t);
                        true
                    }
                    Err(_) => false,
                }
            } else {
                true
            };
            if !ok {
                self.refused(t, &sku, qty, "pool says none left");
                return;
            }
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.tickets.insert(ticket, (t, sku.clone(), qty));
        let order = SaleOrder {
            lines: vec![SaleLine {
                sku,
                qty,
                unit_price_cents: PRICE_CENTS,
            }],
            payment: Payment {
                method: PaymentMethod::Card,
                reference: format!("pi_{t}_{now}"),
            },
        };
        self.nodes[t].engine.sell(ticket, order, wall);
        self.drain(t);
    }

    pub(super) fn refused(&mut self, t: usize, sku: &Sku, qty: u64, why: &str) {
        self.counters.refused += 1;
        let left = self.truth.get(sku).copied().unwrap_or(0);
        if left >= qty as i64 {
            self.counters.lost_sales += 1;
            self.lost_at.push(self.now);
            *self.lost_units.entry(sku.clone()).or_insert(0) += qty;
        }
        self.log(|| format!("terminal {t} refuses {sku} x{qty}: {why} (stand has {left})"));
    }
}
