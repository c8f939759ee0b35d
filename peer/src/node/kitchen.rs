//! What changes mean for the screens: the registry, the live feed and the kitchen queue.

use super::*;

impl Node {
    /// Registry, live feed and kitchen after changes were applied (what each did comes from
    /// the ledger, decoded once).
    pub(super) fn after_change(&mut self, applied: &[halftime_ledger::Applied]) {
        use halftime_ledger::Operation;
        let now = now_ms();
        let before = self.peer_of.len();
        self.refresh_allowlist();
        if self.peer_of.len() != before {
            self.publish_peers();
        }
        let mut skus = BTreeSet::new();
        let mut new_sales = Vec::new();
        for a in applied {
            match &a.op {
                Operation::Sale(rec) => {
                    skus.extend(rec.units().into_keys());
                    new_sales.push(rec.clone());
                }
                Operation::Void { sale, units } => {
                    skus.extend(units.keys().cloned());
                    if let Some(o) = self.orders.iter_mut().find(|o| o.sale_id == *sale) {
                        o.voided = true;
                        let _ = self.live.send(LiveEvent::Order { order: o.clone() });
                    }
                }
                Operation::Restock { units, .. }
                | Operation::Adjust { units, .. }
                | Operation::Give { units, .. }
                | Operation::Reclaim { units, .. } => skus.extend(units.keys().cloned()),
                Operation::Mark { sku, .. } => {
                    skus.insert(sku.clone());
                }
                Operation::Refund { sale, sku, .. } => self.note_refund(*sale, sku),
                Operation::Genesis { .. }
                | Operation::Catalog { .. }
                | Operation::Enrol { .. }
                | Operation::Retire { .. } => {
                    skus.extend(self.engine.ledger().catalog().keys().cloned())
                }
            }
        }
        for s in &new_sales {
            self.note_order(s, now, true);
        }
        if !skus.is_empty() {
            let rows = self.stock_rows(Some(&skus));
            let _ = self.live.send(LiveEvent::Stock { rows });
        }
    }

    /// Show a refund: on the order it belongs to, and as a notice for every page.
    fn note_refund(&mut self, sale: SaleId, sku: &Sku) {
        let l = self.engine.ledger();
        let units = l.refunded(sale, sku);
        if units == 0 {
            return;
        }
        let name = l
            .catalog()
            .get(sku)
            .map_or_else(|| sku.to_string(), |c| c.name.clone());
        let lines = l.refunded_lines(sale);
        let (order_no, _) = self.order_no(sale);
        if let Some(o) = self.orders.iter_mut().find(|o| o.sale_id == sale) {
            o.refunded = lines;
            let _ = self.live.send(LiveEvent::Order { order: o.clone() });
        }
        let _ = self.live.send(LiveEvent::Refund {
            sale_id: sale,
            order_no,
            sku: sku.clone(),
            name,
            units,
        });
    }

    pub(super) fn note_order(
        &mut self,
        rec: &halftime_ledger::SaleRecord,
        now: u64,
        publish: bool,
    ) {
        if self.orders.iter().any(|o| o.sale_id == rec.id) {
            return;
        }
        let (order_no, terminal) = self.order_no(rec.id);
        let catalog = self.engine.ledger().catalog();
        let items = rec
            .lines
            .iter()
            .map(|l| OrderItem {
                sku: l.sku.clone(),
                name: catalog
                    .get(&l.sku)
                    .map_or_else(|| l.sku.to_string(), |c| c.name.clone()),
                qty: l.qty,
            })
            .collect();
        let order = OrderView {
            sale_id: rec.id,
            order_no,
            terminal,
            items,
            lines: rec.lines.clone(),
            received_ms: now,
            done: false,
            voided: false,
            refunded: self.engine.ledger().refunded_lines(rec.id),
        };
        if self.orders.len() >= KITCHEN_QUEUE_LEN {
            self.orders.pop_front();
        }
        self.orders.push_back(order.clone());
        if publish {
            let _ = self.live.send(LiveEvent::Order { order });
        }
    }
}
