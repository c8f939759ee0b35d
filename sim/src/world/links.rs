//! The world's network side: which links are up, frames delivered to engines and sent from
//! them, and the transport's keepalive.

use super::*;

impl World {
    pub(super) fn connected(&self, a: usize, b: usize) -> bool {
        let (a, b) = (a.min(b), a.max(b));
        if a == b
            || !self.nodes[a].alive
            || !self.nodes[b].alive
            || !self.lan_up
            || self.cut.contains(&(a, b))
        {
            return false;
        }
        if a == 0 {
            self.wan_up && self.wifi_up[b]
        } else {
            self.wifi_up[a] && self.wifi_up[b]
        }
    }

    pub(super) fn link_up(&self, a: usize, b: usize) -> bool {
        self.up.contains(&(a.min(b), a.max(b)))
    }

    /// Tell both engines of every link whose state changed.
    pub(super) fn update_links(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                let now_up = self.connected(a, b);
                let was_up = self.up.contains(&(a, b));
                if now_up && !was_up {
                    self.up.insert((a, b));
                    self.link_event(a, b, true);
                    self.log(|| format!("link {a}<->{b} up"));
                } else if !now_up && was_up {
                    self.up.remove(&(a, b));
                    self.link_event(a, b, false);
                    self.log(|| format!("link {a}<->{b} down"));
                }
            }
        }
    }

    pub(super) fn link_event(&mut self, a: usize, b: usize, up: bool) {
        for (x, y) in [(a, b), (b, a)] {
            if !self.nodes[x].alive {
                continue;
            }
            let (wall, peer) = (self.wall(x), self.nodes[y].id);
            let e = &mut self.nodes[x].engine;
            if up {
                e.peer_up(peer, wall);
            } else {
                e.peer_down(peer, wall);
            }
            self.drain(x);
        }
    }

    /// Deliver every message due; what reaches one replica in this tick is handed to its
    /// engine together, so the changes in it are applied as one batch.
    pub(super) fn deliver(&mut self) {
        let due = self.net.due(self.now);
        if due.is_empty() {
            return;
        }
        let mut by_to: BTreeMap<usize, Vec<(ReplicaId, WireMessage)>> = BTreeMap::new();
        for m in due {
            if !self.link_up(m.from, m.to) {
                self.net.stats.messages_dropped_link_down += 1;
                continue;
            }
            match WireMessage::decode(&m.bytes, &self.stand_id) {
                Ok(msg) => {
                    self.net.stats.messages_delivered += 1;
                    if let WireMessage::RightsRequest { sku, want, .. } = &msg {
                        let key = (self.nodes[m.to].id, self.nodes[m.from].id);
                        let n = self
                            .asked
                            .entry(sku.clone())
                            .or_default()
                            .entry(key)
                            .or_insert(0);
                        *n = n.saturating_add(*want);
                    }
                    if self.tracing() {
                        let (from, to) = (m.from, m.to);
                        let kind = match &msg {
                            WireMessage::Vector { .. } => "vector".to_owned(),
                            WireMessage::VectorChanged { changed, .. } => {
                                format!("vector-changed ({} replicas)", changed.len())
                            }
                            WireMessage::VectorHello { .. } => "vector-hello".to_owned(),
                            WireMessage::AdminRequest { id, op } => {
                                format!("admin-request {id} {}", op.kind())
                            }
                            WireMessage::AdminAnswer { id, .. } => format!("admin-answer {id}"),
                            WireMessage::RightsRequest { sku, want, urgent } => {
                                format!("rights-request {sku} x{want} urgent={urgent}")
                            }
                            WireMessage::RightsAnswer { sku, granted, .. } => {
                                format!("rights-answer {sku} x{granted}")
                            }
                            WireMessage::Changes { changes } => {
                                format!("changes x{}", changes.len())
                            }
                            WireMessage::RightsRequestFor {
                                beneficiary,
                                sku,
                                want,
                                urgent,
                            } => format!(
                                "rights-request for {beneficiary} {sku} x{want} urgent={urgent}"
                            ),
                            WireMessage::RightsAnswerFor {
                                beneficiary,
                                sku,
                                granted,
                                ..
                            } => format!("rights-answer for {beneficiary} {sku} x{granted}"),
                        };
                        self.log(|| format!("deliver {from}->{to} {kind}"));
                    }
                    by_to
                        .entry(m.to)
                        .or_default()
                        .push((self.nodes[m.from].id, msg));
                }
                Err(_) => self.counters.decode_errors += 1,
            }
        }
        for (to, msgs) in by_to {
            let wall = self.wall(to);
            self.nodes[to].engine.handle_messages(msgs, wall);
            self.drain(to);
            if to == 0 {
                self.arrived_at_pool();
            }
        }
    }

    /// Propagation: committed sales the pool now holds.
    pub(super) fn arrived_at_pool(&mut self) {
        let now = self.now;
        let vv = self.nodes[0].engine.ledger().version_vector();
        for (rid, waiting) in self.in_transit.iter_mut() {
            let held = vv.get(rid).copied().unwrap_or(0);
            let later = waiting.split_off(&(held + 1));
            for at in waiting.values() {
                self.latencies.push(now - at);
            }
            *waiting = later;
        }
    }

    pub(super) fn timers(&mut self) {
        if self.now >= self.next_ping {
            self.next_ping = self.now + TRANSPORT_PING_MS;
            // An engine's peers are the replicas it has a live link to.
            for a in 0..self.nodes.len() {
                if self.nodes[a].alive {
                    let wall = self.wall(a);
                    self.nodes[a].engine.heard_all(wall);
                }
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            if self.nodes[i].wake > self.now {
                continue;
            }
            let wall = self.wall(i);
            if self.nodes[i].engine.poll_timeout() <= wall {
                self.nodes[i].engine.handle_timeout(wall);
            }
            self.drain(i);
        }
    }

    /// Put every frame the engines want sent on the network.
    pub(super) fn flush(&mut self) {
        let now = self.now;
        for a in std::mem::take(&mut self.outgoing) {
            if !self.nodes[a].alive {
                continue;
            }
            for (to, msg) in self.nodes[a].engine.drain_transmit() {
                let Some(&b) = self.by_replica.get(&to) else {
                    continue;
                };
                let model = if a == 0 || b == 0 { &WAN } else { &LAN };
                let bytes = msg.encode(&self.stand_id);
                self.net.send(&mut self.rng, model, now, a, b, bytes);
            }
        }
    }
}
