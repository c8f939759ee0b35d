//! The node's side of the stand mesh: who may connect, connections and discovery, frames in
//! and out, redials and the warnings of a replica that reaches nobody.

use super::*;

impl Node {
    /// A replica that has not reached its stand says so, first after a few seconds, then every
    /// `DIAL_WARNING_INTERVAL_MS`, with what to check.
    pub(super) fn warn_if_outside_the_stand(&mut self) {
        let member =
            self.engine.ledger().stand().is_some() && self.engine.ledger().role().is_some();
        if member || self.started.elapsed() < Duration::from_millis(NOT_A_MEMBER_GRACE_MS) {
            return;
        }
        let quiet = self
            .last_dial_warning
            .is_some_and(|t| t.elapsed() < Duration::from_millis(DIAL_WARNING_INTERVAL_MS));
        if quiet {
            return;
        }
        self.last_dial_warning = Some(Instant::now());
        tracing::warn!(
            peers = self.peers.len(),
            has_stand_document = self.engine.ledger().stand().is_some(),
            "not a member of any stand yet, cannot reach the stand: check that this device has \
             the stand's key (`halftime-peer join --psk`, same stand_key_fingerprint as the \
             pool's log) and that the pool enrolled its public key"
        );
    }

    pub(super) fn refresh_allowlist(&mut self) {
        let pool_key = self.engine.ledger().pool_key();
        let mut allowed: BTreeMap<PeerId, ReplicaId> = BTreeMap::new();
        if let Ok(p) = pool_key.peer_id() {
            allowed.insert(p, pool_key.replica_id());
        }
        for (rid, info) in self.engine.ledger().replicas() {
            if info.retired_at_pool_seq.is_none() {
                if let Ok(p) = info.key.peer_id() {
                    allowed.insert(p, *rid);
                }
            }
        }
        let me = *self.swarm.local_peer_id();
        for p in allowed.keys() {
            if *p != me && !self.peer_of.contains_key(p) {
                self.swarm.behaviour_mut().allow.allow_peer(*p);
            }
        }
        let removed: Vec<PeerId> = self
            .peer_of
            .keys()
            .filter(|p| !allowed.contains_key(p))
            .copied()
            .collect();
        for p in removed {
            self.swarm.behaviour_mut().allow.disallow_peer(p);
            let _ = self.swarm.disconnect_peer_id(p);
        }
        self.peer_of = allowed;
    }

    pub(super) fn handle_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        let now = now_ms();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    if let Some(slot) = self.static_conn.get_mut(&addr) {
                        *slot = Some(peer_id);
                    }
                }
                // Only enrolled replicas pass the allowlist, so every connection has one.
                let replica = self.peer_of.get(&peer_id).copied();
                if let (false, Some(replica)) = (self.peers.contains_key(&peer_id), replica) {
                    tracing::info!(%peer_id, %replica, "peer connected");
                    self.engine.peer_up(replica, now);
                    self.peers.insert(peer_id, Conn::new(replica));
                    self.publish_peers();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                if num_established == 0 {
                    if let Some(c) = self.peers.remove(&peer_id) {
                        tracing::info!(%peer_id, ?cause, "peer disconnected");
                        self.engine.peer_down(c.replica, now);
                        self.publish_peers();
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                // Remember every address: a peer not yet known to be enrolled (before the
                // registry has synced) is dialled as soon as it is.
                for (peer, addr) in list {
                    self.known_addrs.entry(peer).or_default().insert(addr);
                    if self.peer_of.contains_key(&peer) && !self.peers.contains_key(&peer) {
                        self.dial_peer(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                for (peer, addr) in list {
                    if let Some(s) = self.known_addrs.get_mut(&peer) {
                        s.remove(&addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            })) => match result {
                Ok(_) => self.heard(&peer, now),
                Err(e) => {
                    tracing::info!(%peer, error = %e, "ping failed; closing the connection");
                    self.swarm.close_connection(connection);
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Streams(())) => {}
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                self.metrics.connections_refused += 1;
                tracing::warn!(
                    %send_back_addr,
                    %error,
                    "refused an incoming connection: not this stand's network key, or a key \
                     the stand has not enrolled"
                );
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.metrics.dials_failed += 1;
                // A replica that reaches no one says why, now and then: the usual cause is a
                // stand key that differs, or a key the pool has not enrolled yet.
                let quiet = self
                    .last_dial_warning
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(DIAL_WARNING_INTERVAL_MS));
                if self.peers.is_empty() && !quiet {
                    self.last_dial_warning = Some(Instant::now());
                    tracing::warn!(
                        ?peer_id,
                        %error,
                        member = self.engine.ledger().role().is_some(),
                        "cannot reach the stand: check that this device has the stand's key \
                         (`halftime-peer join --psk`) and that the pool enrolled it"
                    );
                } else {
                    tracing::debug!(?peer_id, %error, "dial failed");
                }
            }
            _ => {}
        }
    }

    /// Frames from peers' sync streams, handled together so that their changes are applied
    /// as one batch.
    pub(super) fn handle_inbound(&mut self, batch: Vec<Inbound>) {
        let now = now_ms();
        let mut frames = Vec::with_capacity(batch.len());
        for item in batch {
            match item {
                Inbound::Frame(peer, bytes) => {
                    self.heard(&peer, now);
                    // A frame that raced the close of its connection is dropped.
                    if let Some(c) = self.peers.get(&peer) {
                        frames.push((c.replica, bytes));
                    }
                }
                Inbound::Refused(peer, why) => {
                    self.metrics.streams_refused += 1;
                    tracing::warn!(%peer, %why, "closed a peer's sync stream that broke the framing");
                }
            }
        }
        for (replica, e) in self.engine.handle_frames(frames, now) {
            tracing::warn!(%replica, error = %e, "rejected a frame");
        }
    }

    pub(super) fn publish_peers(&self) {
        let _ = self.live.send(LiveEvent::Peers {
            peers: self.connected_replicas(),
            pool_reachable: self.pool_reachable(),
        });
    }

    pub(super) fn dial_peer(&mut self, peer: PeerId) {
        let key = peer.to_string();
        if self
            .last_dial
            .get(&key)
            .is_some_and(|t| t.elapsed() < Duration::from_millis(REDIAL_INTERVAL_MS))
        {
            return;
        }
        self.last_dial.insert(key, Instant::now());
        let addrs: Vec<Multiaddr> = self
            .known_addrs
            .get(&peer)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        if addrs.is_empty() {
            return;
        }
        let _ = self
            .swarm
            .dial(DialOpts::peer_id(peer).addresses(addrs).build());
    }

    pub(super) fn heard(&mut self, peer: &PeerId, now: u64) {
        if let Some(c) = self.peers.get(peer) {
            self.engine.heard(c.replica, now);
        }
    }

    pub(super) fn handle_tick(&mut self) {
        self.warn_if_outside_the_stand();
        // Redial static peers and discovered peers that are not connected.
        let statics: Vec<(Multiaddr, Option<PeerId>)> = self
            .static_conn
            .iter()
            .map(|(a, p)| (a.clone(), *p))
            .collect();
        for (addr, p) in statics {
            if p.is_some_and(|p| self.peers.contains_key(&p)) {
                continue;
            }
            let key = addr.to_string();
            if self
                .last_dial
                .get(&key)
                .is_some_and(|t| t.elapsed() < Duration::from_millis(REDIAL_INTERVAL_MS))
            {
                continue;
            }
            self.last_dial.insert(key, Instant::now());
            let _ = self.swarm.dial(addr);
        }
        let discovered: Vec<PeerId> = self
            .known_addrs
            .keys()
            .filter(|p| self.peer_of.contains_key(p) && !self.peers.contains_key(p))
            .copied()
            .collect();
        for p in discovered {
            self.dial_peer(p);
        }
    }

    /// Hand what the engine wants sent to each peer's stream, as far as its queue has room;
    /// a peer without a working stream gets a new one.
    pub(super) fn flush(&mut self) {
        let stand = self.engine.ledger().stand_id().clone();
        for (p, c) in self.peers.iter_mut() {
            if c.stream.as_ref().is_none_or(|s| s.is_closed()) {
                let reopen = Duration::from_millis(STREAM_REOPEN_MS);
                if c.opened.is_some_and(|t| t.elapsed() < reopen) {
                    continue;
                }
                let (tx, rx) = mpsc::channel(crate::net::STREAM_QUEUE_LEN);
                tokio::spawn(crate::net::write_stream(self.streams.clone(), *p, rx));
                c.stream = Some(tx);
                c.opened = Some(Instant::now());
            }
            let Some(stream) = c.stream.as_ref() else {
                continue;
            };
            while let Ok(room) = stream.try_reserve() {
                let Some(m) = self.engine.poll_transmit_to(c.replica) else {
                    break;
                };
                self.metrics.frames_sent += 1;
                room.send(m.encode(&stand));
            }
        }
        self.flush_relay();
    }
}
