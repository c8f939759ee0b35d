//! The node's side of the relay uplink: the relay is one more peer of the engine, admitted by
//! the ledger's rule like any mesh peer, its frames carried by the uplink task.

use super::*;
use crate::uplink::UplinkEvent;

/// The open uplink.
pub(super) struct RelayConn {
    pub(super) conn: u64,
    pub(super) replica: ReplicaId,
    pub(super) out: mpsc::Sender<Vec<u8>>,
}

impl Node {
    pub(super) fn handle_uplink(&mut self, ev: UplinkEvent) {
        let now = now_ms();
        match ev {
            UplinkEvent::Up {
                conn,
                key,
                out,
                reply,
            } => {
                let admitted = self
                    .engine
                    .ledger()
                    .admits_pinned(&key, self.relay_key.as_ref());
                match &admitted {
                    Ok(replica) if self.engine.is_connected(*replica) => {
                        // Already reached over the stand mesh: one link is enough.
                        tracing::info!(%replica, "the relay is already a mesh peer");
                        let _ = reply.send(Err(halftime_ledger::NotAdmitted::NotEnrolled {
                            replica: *replica,
                            stand: self.engine.ledger().stand_id().to_string(),
                        }));
                        return;
                    }
                    Ok(replica) => {
                        self.relay = Some(RelayConn {
                            conn,
                            replica: *replica,
                            out,
                        });
                        self.engine.peer_up(*replica, now);
                        self.publish_peers();
                    }
                    Err(e) => {
                        self.metrics.connections_refused += 1;
                        tracing::warn!(
                            error = %e,
                            "refused the relay; if the pool enrolled it but this device has not \
                             heard yet, pass its key with --relay-key (halftime-relay key)"
                        );
                    }
                }
                let _ = reply.send(admitted);
            }
            UplinkEvent::Frame { conn, bytes } => {
                let Some(r) = self.relay.as_ref().filter(|r| r.conn == conn) else {
                    return;
                };
                let replica = r.replica;
                if let Err(e) = self.engine.handle_frame(replica, &bytes, now) {
                    tracing::warn!(%replica, error = %e, "rejected a frame from the relay");
                }
            }
            UplinkEvent::Heard { conn } => {
                if let Some(r) = self.relay.as_ref().filter(|r| r.conn == conn) {
                    self.engine.heard(r.replica, now);
                }
            }
            UplinkEvent::Down { conn } => {
                if let Some(r) = self.relay.take_if(|r| r.conn == conn) {
                    self.engine.peer_down(r.replica, now);
                    self.publish_peers();
                }
            }
        }
    }

    /// Hand the uplink what the engine has for the relay, within its queue.
    pub(super) fn flush_relay(&mut self) {
        let Some(r) = &self.relay else {
            return;
        };
        let stand = self.engine.ledger().stand_id().clone();
        while r.out.capacity() > 0 {
            let Some(m) = self.engine.poll_transmit_to(r.replica) else {
                break;
            };
            self.metrics.frames_sent += 1;
            if r.out.try_send(m.encode(&stand)).is_err() {
                break;
            }
        }
    }
}
