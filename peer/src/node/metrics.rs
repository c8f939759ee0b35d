//! Prometheus text of the node's figures and the engine's.

use super::*;

#[derive(Debug, Default)]
pub(super) struct Metrics {
    pub(super) voids: u64,
    pub(super) connections_refused: u64,
    pub(super) dials_failed: u64,
    pub(super) frames_sent: u64,
    pub(super) streams_refused: u64,
    pub(super) ack_us_sum: u64,
    pub(super) ack_count: u64,
    pub(super) commit_us_sum: u64,
    pub(super) commit_count: u64,
    pub(super) store_errors: u64,
    pub(super) snapshots: u64,
    pub(super) snapshot_ms: u64,
}

impl Node {
    pub(super) fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let e = self.engine.stats();
        let s = self.engine.ledger().stats();
        let mut out = String::new();
        let mut line = |name: &str, help: &str, kind: &str, v: String| {
            out.push_str(&format!("# HELP halftime_{name} {help}\n# TYPE halftime_{name} {kind}\nhalftime_{name} {v}\n"));
        };
        line(
            "sales_committed_total",
            "Sales committed and acknowledged here.",
            "counter",
            e.sales_committed.to_string(),
        );
        line(
            "sales_refused_total",
            "Sales refused here.",
            "counter",
            e.sales_refused.to_string(),
        );
        line(
            "sales_held_total",
            "Sales that waited for rights from other replicas before their outcome.",
            "counter",
            e.sales_held.to_string(),
        );
        line(
            "rights_requests_sent_total",
            "Requests for rights sent to other replicas.",
            "counter",
            e.rights_requests_sent.to_string(),
        );
        line(
            "rights_relays_refused_total",
            "Rights requests or answers on behalf of another replica from a peer not allowed to send them, dropped.",
            "counter",
            e.rights_relays_refused.to_string(),
        );
        line(
            "gives_total",
            "Gives of rights made here (answers and allocation plans).",
            "counter",
            (e.gives_answered + e.gives_planned).to_string(),
        );
        line(
            "voids_total",
            "Sales voided here.",
            "counter",
            m.voids.to_string(),
        );
        line(
            "changes_received_total",
            "Received changes accepted.",
            "counter",
            e.changes_received.to_string(),
        );
        line(
            "changes_duplicate_total",
            "Received duplicates dropped.",
            "counter",
            e.changes_duplicate.to_string(),
        );
        line(
            "frames_rejected_total",
            "Frames from peers that did not decode.",
            "counter",
            e.frames_rejected.to_string(),
        );
        line(
            "connections_refused_total",
            "Incoming connections refused (wrong stand key or not enrolled).",
            "counter",
            m.connections_refused.to_string(),
        );
        line(
            "dials_failed_total",
            "Outgoing connections that failed.",
            "counter",
            m.dials_failed.to_string(),
        );
        line(
            "streams_refused_total",
            "Peers' sync streams closed for a frame over the size limit.",
            "counter",
            m.streams_refused.to_string(),
        );
        line(
            "frames_sent_total",
            "Sync frames sent.",
            "counter",
            m.frames_sent.to_string(),
        );
        line(
            "store_errors_total",
            "Failed durable writes.",
            "counter",
            m.store_errors.to_string(),
        );
        line(
            "snapshots_total",
            "Snapshots of the replica written.",
            "counter",
            m.snapshots.to_string(),
        );
        line(
            "snapshot_last_ms",
            "Time the latest snapshot took to make and write.",
            "gauge",
            m.snapshot_ms.to_string(),
        );
        line(
            "snapshot_covers",
            "Changes the latest snapshot (written or loaded) covers.",
            "gauge",
            self.snapshot_len.to_string(),
        );
        line(
            "ack_seconds_sum",
            "Time from a sale's arrival to its durable acknowledgement (a sale that waits for rights included).",
            "counter",
            format!("{}", m.ack_us_sum as f64 / 1e6),
        );
        line(
            "ack_seconds_count",
            "Acknowledged sales.",
            "counter",
            m.ack_count.to_string(),
        );
        line(
            "durable_commit_seconds_sum",
            "Time in the store's durable commits of this replica's own changes (each covers the sales of one group).",
            "counter",
            format!("{}", m.commit_us_sum as f64 / 1e6),
        );
        line(
            "durable_commit_seconds_count",
            "Durable commits of this replica's own changes.",
            "counter",
            m.commit_count.to_string(),
        );
        line(
            "peers_connected",
            "Connected stand replicas.",
            "gauge",
            self.peers.len().to_string(),
        );
        line(
            "pool_reachable",
            "1 when the pool is connected.",
            "gauge",
            (self.pool_reachable() as u8).to_string(),
        );
        line(
            "changes_stored",
            "Changes in the document.",
            "gauge",
            self.engine.ledger().len().to_string(),
        );
        line(
            "changes_pending",
            "Received changes waiting for dependencies.",
            "gauge",
            self.engine.ledger().pending_len().to_string(),
        );
        line(
            "changes_pending_bytes",
            "Bytes held by received changes that wait.",
            "gauge",
            self.engine.ledger().pending_bytes().to_string(),
        );
        out.push_str("# HELP halftime_changes_rejected_total Received changes rejected, by rule.\n# TYPE halftime_changes_rejected_total counter\n");
        for (rule, n) in &s.rejected {
            out.push_str(&format!(
                "halftime_changes_rejected_total{{rule=\"{rule}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP halftime_changes_rejected_by_replica_total Received changes rejected, by the replica whose key signed them and rule.\n# TYPE halftime_changes_rejected_by_replica_total counter\n");
        for (replica, rules) in &s.by_replica {
            for (rule, n) in rules {
                out.push_str(&format!(
                    "halftime_changes_rejected_by_replica_total{{replica=\"{replica}\",rule=\"{rule}\"}} {n}\n"
                ));
            }
        }
        out
    }
}
