//! The API's commands, handled in group-commit batches, and the views they read.

use super::*;

/// An answer sent once the batch's durable write is done (with its error, if it failed).
type Reply = Box<dyn FnOnce(&mut Node, Option<&str>)>;

/// Answer a local operation: a refusal or fault at once; a change only after the batch is
/// durable, with what `view` reads from the node then.
fn after_commit<R: 'static, T: 'static>(
    replies: &mut Vec<Reply>,
    done: Result<R, OpError>,
    reply: oneshot::Sender<Result<T, ApiError>>,
    view: impl FnOnce(&mut Node, R) -> Result<T, ApiError> + 'static,
) {
    match done {
        Ok(r) => replies.push(Box::new(move |n: &mut Node, err| {
            let _ = reply.send(match err {
                None => view(n, r),
                Some(e) => Err(ApiError::unavailable(e)),
            });
        })),
        Err(OpError::Refused(r)) => {
            let _ = reply.send(Err(ApiError::refused(r)));
        }
        Err(e) => {
            let _ = reply.send(Err(ApiError::internal(e)));
        }
    }
}

impl Node {
    pub(super) fn handle_commands(&mut self, batch: Vec<Command>) {
        let now = now_ms();
        let mut replies: Vec<Reply> = Vec::new();
        for cmd in batch {
            match cmd {
                Command::Sell(input, reply) => match self.sale_order(input) {
                    Ok(order) => {
                        let ticket = Ticket(self.next_ticket);
                        self.next_ticket += 1;
                        self.sales.insert(ticket, (reply, Instant::now()));
                        self.engine.sell(ticket, order, now);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Command::Void(sale, reply) => {
                    let done = self
                        .engine
                        .local_op(now, |l, now| Ok((l.void(sale, now)?, ())));
                    after_commit(&mut replies, done, reply, move |n, ()| {
                        n.metrics.voids += 1;
                        n.sale_view(sale)
                            .ok_or_else(|| ApiError::internal("void lost"))
                    });
                }
                Command::Stock(reply) => {
                    let _ = reply.send(self.stock_rows(None));
                }
                Command::Reclaim(replica, reply) => {
                    let done = self.engine.reclaim(replica, now).map(|view| {
                        let age = view.last_change_at.map(|t| now.saturating_sub(t.wall_ms()));
                        tracing::info!(
                            %replica,
                            last_seq = view.last_seq,
                            last_change_age_ms = age,
                            peers_consulted = view.peers_consulted,
                            "reclaimed"
                        );
                        ReclaimResult {
                            view,
                            last_change_age_ms: age,
                        }
                    });
                    after_commit(&mut replies, done, reply, |_, result| Ok(result));
                }
                Command::Mark(sku, available, reply) => {
                    let op = |l: &mut halftime_ledger::Ledger, now| {
                        Ok((l.mark(&sku, available, now)?, ()))
                    };
                    let done = self.engine.local_op(now, op);
                    if done.is_ok() {
                        tracing::info!(%sku, available, "item availability marked");
                    }
                    after_commit(&mut replies, done, reply, move |n, ()| {
                        n.stock_rows(Some(&BTreeSet::from([sku])))
                            .pop()
                            .ok_or_else(|| ApiError::internal("item lost"))
                    });
                }
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Command::Orders(reply) => {
                    let _ = reply.send(self.orders.iter().cloned().collect());
                }
                Command::OrderDone(sale, reply) => {
                    let _ = reply.send(self.set_done(sale, true));
                }
                Command::OrderRecall(sale, reply) => {
                    let _ = reply.send(self.set_done(sale, false));
                }
                Command::RecentSales(reply) => {
                    let me = self.engine.ledger().me();
                    let recent = self
                        .engine
                        .ledger()
                        .sales()
                        .iter()
                        .rev()
                        .filter(|e| e.record.id.replica == me)
                        .take(RECENT_SALES)
                        .filter_map(|e| self.sale_view(e.record.id))
                        .collect();
                    let _ = reply.send(recent);
                }
                Command::Metrics(reply) => {
                    let _ = reply.send(self.metrics_text());
                }
            }
        }
        // One durable write for the whole batch, then the acknowledgements.
        self.pump();
        let err = self.fatal.clone();
        for r in replies {
            r(self, err.as_deref());
        }
    }

    pub(super) fn sale_order(&self, input: SaleInput) -> Result<SaleOrder, ApiError> {
        // Membership first: a replica outside any stand has no catalog, and "unknown sku"
        // would send the operator looking in the wrong place.
        if self.engine.ledger().stand().is_none() {
            return Err(ApiError::refused(Refusal::NoStand));
        }
        if self.engine.ledger().role().is_none() {
            return Err(ApiError::refused(Refusal::NotEnrolled));
        }
        let mut lines = Vec::new();
        for l in input.lines {
            let item = self
                .engine
                .ledger()
                .catalog()
                .get(&l.sku)
                .ok_or_else(|| ApiError::refused(Refusal::UnknownSku { sku: l.sku.clone() }))?;
            lines.push(halftime_ledger::SaleLine {
                sku: l.sku,
                qty: l.qty,
                unit_price_cents: item.price_cents,
            });
        }
        Ok(SaleOrder {
            lines,
            payment: halftime_ledger::Payment {
                method: input.payment.method,
                reference: input.payment.reference,
            },
        })
    }

    fn set_done(&mut self, sale: SaleId, done: bool) -> Result<(), ApiError> {
        let o = self
            .orders
            .iter_mut()
            .find(|o| o.sale_id == sale)
            .ok_or_else(|| ApiError::refused(Refusal::UnknownSale { sale }))?;
        o.done = done;
        let order = o.clone();
        let _ = self.live.send(LiveEvent::Order { order });
        Ok(())
    }

    /// The seller's name and the sale's short order number (`till1-017`).
    pub(super) fn order_no(&self, id: SaleId) -> (String, String) {
        let l = self.engine.ledger();
        let name = l
            .replicas()
            .get(&id.replica)
            .map_or_else(|| id.replica.to_string(), |i| i.name.clone());
        let n = l.sale(id).map_or(0, |e| e.ordinal);
        (format!("{name}-{n:03}"), name)
    }

    pub(super) fn sale_view(&self, id: SaleId) -> Option<SaleView> {
        let (order_no, terminal) = self.order_no(id);
        self.engine.ledger().sale(id).map(|e| SaleView {
            sale_id: id,
            order_no,
            terminal,
            total_cents: e.record.total_cents(),
            sale: (*e.record).clone(),
            voided: e.voided,
            refunded: self.engine.ledger().refunded_lines(id),
            waited_ms: 0,
        })
    }

    /// Stock rows, for all items or only `only`.
    pub fn stock_rows(&self, only: Option<&BTreeSet<Sku>>) -> Vec<StockRow> {
        let me = self.engine.ledger().me();
        let online = self.pool_reachable();
        self.engine
            .ledger()
            .catalog()
            .values()
            .filter(|c| only.is_none_or(|o| o.contains(&c.sku)))
            .map(|c| StockRow {
                sku: c.sku.clone(),
                name: c.name.clone(),
                price_cents: c.price_cents,
                available: self.engine.ledger().available(&c.sku),
                rights: self.engine.ledger().rights(me, &c.sku),
                status: self.engine.ledger().status(&c.sku),
                sellable_now: self.engine.ledger().sellable_now(&c.sku, online),
                marked_off: self.engine.ledger().is_marked_off(&c.sku),
            })
            .collect()
    }

    pub(super) fn status(&self) -> StatusView {
        StatusView {
            replica: self.engine.ledger().me(),
            name: self
                .engine
                .ledger()
                .replicas()
                .get(&self.engine.ledger().me())
                .map(|i| i.name.clone()),
            peer_id: self.swarm.local_peer_id().to_string(),
            role: self.engine.ledger().role(),
            stand: self.engine.ledger().stand_id().to_string(),
            policy: self.engine.ledger().policy(),
            peers: self.connected_replicas(),
            // On the pool itself "reachable" means some replica of the stand is connected to
            // it: a pool alone must not look like a healthy stand.
            pool_reachable: self.pool_reachable(),
            repair_backlog: self
                .peers
                .values()
                .map(|c| self.engine.backlog(c.replica))
                .sum(),
            pending: self.engine.ledger().pending_len(),
            changes: self.engine.ledger().len(),
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
        }
    }

    pub(super) fn connected_replicas(&self) -> Vec<ReplicaId> {
        self.engine.peers().collect()
    }

    /// Whether this replica reaches the pool (on the pool: whether any replica reaches it).
    pub fn pool_reachable(&self) -> bool {
        self.engine.pool_reachable()
    }
}
