//! A hostile member of the stand: an enrolled terminal whose key is in the wrong hands. It
//! serves no customers; a third into the game it sends every replica a signed sale far past any
//! rights it could hold, built by hand as an attacker would. Honest replicas must reject it, and
//! the oracle (which counts the rogue as serving nobody) catches any replica that believes it.

use super::*;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ObjType, ROOT, ReadDoc};
use halftime_ledger::layout::{STOCK, epoch_key};
use halftime_ledger::message::MESSAGE_VERSION;
use halftime_ledger::{ChangeMessage, Hlc, Operation, SaleRecord};

/// The rogue terminal.
#[derive(Debug)]
pub(super) struct Rogue {
    pub key: ReplicaKey,
    /// Its copy of the stand: the set-up changes.
    pub ledger: Ledger,
    /// Virtual time of the attack; `u64::MAX` once made.
    pub at: u64,
}

impl Rogue {
    pub fn id(&self) -> ReplicaId {
        self.key.replica_id()
    }

    /// A sale of `qty` units of `sku` by the rogue, signed with its key, on top of what it
    /// holds: the first write of its cell, an `out` counter of `qty`.
    fn forge(&mut self, sku: &Sku, qty: u64, wall: u64) -> Result<SignedChange, String> {
        let me = self.id();
        let mut doc = self.ledger.doc().fork();
        doc.set_actor(self.key.public().actor());
        let hlc = Hlc::at_wall(wall);
        let record = SaleRecord {
            id: SaleId {
                replica: me,
                seq: 1,
            },
            at: hlc,
            lines: vec![SaleLine {
                sku: sku.clone(),
                qty,
                unit_price_cents: PRICE_CENTS,
            }],
            payment: Payment {
                method: PaymentMethod::Cash,
                reference: String::new(),
            },
            offline: false,
            overdraft: BTreeMap::new(),
        };
        let msg = ChangeMessage {
            v: MESSAGE_VERSION,
            at: hlc,
            op: Operation::Sale(record),
            req: None,
        };
        let mut tx = doc.transaction();
        let write = |tx: &mut automerge::transaction::Transaction<'_>| {
            let (_, stock) = tx
                .get(ROOT, STOCK)?
                .ok_or(automerge::AutomergeError::Fail)?;
            let (_, mine) = tx
                .get(&stock, me.to_string())?
                .ok_or(automerge::AutomergeError::Fail)?;
            let cell = tx.put_object(&mine, sku.as_str(), ObjType::Map)?;
            let epoch = tx.put_object(&cell, epoch_key(0), ObjType::Map)?;
            tx.put(&epoch, "out", qty)
        };
        write(&mut tx).map_err(|e| e.to_string())?;
        tx.commit_with(
            CommitOptions::default()
                .with_message(msg.encode())
                .with_time(hlc.packed() as i64),
        );
        let c = doc
            .get_last_local_change()
            .ok_or("the forged change is missing")?;
        Ok(SignedChange {
            signature: self.key.sign(c.raw_bytes()).to_vec(),
            bytes: c.raw_bytes().to_vec(),
        })
    }
}

impl World {
    /// The attack, when due: the forged sale goes to every live replica over a link of its own.
    pub(super) fn rogue(&mut self) {
        let Some(r) = &mut self.rogue else { return };
        if r.at > self.now {
            return;
        }
        r.at = u64::MAX;
        let sku = self.skus[0].clone();
        let qty = self.opening.get(&sku).copied().unwrap_or(0) * 2 + 1;
        let rid = r.id();
        let forged = match r.forge(&sku, qty, GAME_START_WALL_MS + self.now) {
            Ok(c) => c,
            Err(e) => {
                self.bug_seen
                    .get_or_insert_with(|| ("setup", format!("cannot forge: {e}")));
                return;
            }
        };
        self.log(|| format!("rogue {rid} sends a forged sale of {sku} x{qty}"));
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive || self.nodes[i].dead {
                continue;
            }
            let wall = self.wall(i);
            let e = &mut self.nodes[i].engine;
            e.peer_up(rid, wall);
            let changes = vec![forged.clone()];
            e.handle_message(rid, WireMessage::Changes { changes }, wall);
            e.peer_down(rid, wall);
            self.drain(i);
        }
    }
}
