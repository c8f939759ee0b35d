//! Which sales are refunded when a stand sold more of an item than it had.
//!
//! The rule (also in `docs/ARCHITECTURE.md`): when an item's `available` is below zero by `d`
//! units and decisions already cover `k` of them, the `d − k` units still owed are taken from
//! the latest sale lines of that item, by the time the sale was made, then by sale id, both
//! descending, skipping voided sales and lines already decided. A line is decided at most once;
//! when it holds more units than are owed, only the owed part is refunded. The latest sales are
//! the ones that could not be served: every unit sold before them was still in stock.

/// A sale line of the item that may be refunded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sale_id: String,
    pub at_ms: i64,
    pub units: u64,
    pub unit_price_cents: u64,
    /// `card` or `cash`.
    pub method: String,
    /// The card payment's reference (a payment intent), empty for cash.
    pub reference: String,
}

/// A line chosen, and how many of its units are refunded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub line: Line,
    pub units: u64,
}

impl Choice {
    /// What is paid back.
    pub fn amount_cents(&self) -> u64 {
        self.units.saturating_mul(self.line.unit_price_cents)
    }
}

/// Choose the lines that pay back `owed` units (fewer when the lines run out).
pub fn choose(owed: u64, mut lines: Vec<Line>) -> Vec<Choice> {
    lines.sort_by(|a, b| {
        b.at_ms
            .cmp(&a.at_ms)
            .then_with(|| b.sale_id.cmp(&a.sale_id))
    });
    let mut left = owed;
    let mut out = Vec::new();
    for line in lines {
        if left == 0 {
            break;
        }
        if line.units == 0 {
            continue;
        }
        let units = line.units.min(left);
        left -= units;
        out.push(Choice { line, units });
    }
    out
}

/// The Stripe idempotency key of a decision: derived from what makes it unique, so every
/// attempt by any reconciler, before or after a crash, sends the same key.
pub fn idempotency_key(stand: &str, sale_id: &str, sku: &str) -> String {
    format!("halftime-refund:{stand}:{sale_id}:{sku}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, at: i64, units: u64) -> Line {
        Line {
            sale_id: id.into(),
            at_ms: at,
            units,
            unit_price_cents: 400,
            method: "card".into(),
            reference: format!("pi_{id}"),
        }
    }

    #[test]
    fn the_latest_lines_pay_back_what_is_owed() {
        let lines = vec![line("a-1", 10, 2), line("b-1", 30, 1), line("a-2", 20, 3)];
        let c = choose(3, lines.clone());
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].line.sale_id.as_str(), c[0].units), ("b-1", 1));
        assert_eq!((c[1].line.sale_id.as_str(), c[1].units), ("a-2", 2));
        assert_eq!(c[1].amount_cents(), 800);
        // Nothing owed, nothing chosen; more owed than sold, everything.
        assert!(choose(0, lines.clone()).is_empty());
        assert_eq!(choose(99, lines).iter().map(|c| c.units).sum::<u64>(), 6);
    }

    #[test]
    fn ties_in_time_go_by_sale_id_whatever_the_order_given() {
        let a = vec![line("a-1", 10, 1), line("b-1", 10, 1), line("c-1", 10, 1)];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(choose(2, a), choose(2, b.clone()));
        assert_eq!(choose(2, b)[0].line.sale_id, "c-1");
    }
}
