//! Re-checking the store of record: every stored change is verified again from its bytes as
//! if it arrived from a stranger (signature, author, sequence, the hash links to what it
//! depends on, every rule of the stand), and the columns stored beside it must agree with
//! what its bytes say. The first break is reported.

use crate::store::StoredRow;
use halftime_ledger::{Ledger, PublicKey, ReplicaKey, StandId};

/// Rows verified per call into the ledger.
pub const VERIFY_CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct AuditReport {
    pub stand: String,
    pub changes: usize,
    pub ok: bool,
    /// The first row that does not check out, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_break: Option<Break>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Break {
    pub id: i64,
    pub actor: String,
    pub seq: i64,
    pub why: String,
}

/// Verify `rows` (in stored order) with a ledger that trusts nothing but the pool's key.
/// CPU-bound: run it off the async workers.
pub fn verify(
    stand: &StandId,
    pool_key: PublicKey,
    rows: &[StoredRow],
    now_ms: u64,
) -> AuditReport {
    let mut ledger = Ledger::join(ReplicaKey::from_seed([0; 32]), stand.clone(), pool_key);
    let mut report = AuditReport {
        stand: stand.to_string(),
        changes: rows.len(),
        ok: true,
        first_break: None,
    };
    let brk = |r: &StoredRow, why: String| Break {
        id: r.id,
        actor: r.actor.clone(),
        seq: r.seq,
        why,
    };
    // Far ahead of any change: a record's age is no reason to doubt it.
    let later = now_ms.saturating_add(365 * 24 * 3_600_000);
    for chunk in rows.chunks(VERIFY_CHUNK) {
        let applied = ledger.apply_remote(chunk.iter().map(|r| r.change.clone()).collect(), later);
        if let Some(rej) = applied.rejected.first() {
            let at = chunk
                .iter()
                .find(|r| !applied.accepted.contains(&r.change))
                .unwrap_or(&chunk[0]);
            report.first_break = Some(brk(at, rej.to_string()));
            break;
        }
        if applied.pending > 0 {
            let at = chunk
                .iter()
                .find(|r| !applied.accepted.contains(&r.change))
                .unwrap_or(&chunk[0]);
            report.first_break = Some(brk(
                at,
                "depends on a change that is not stored before it".into(),
            ));
            break;
        }
        for r in chunk {
            let Ok(actor) = r.actor.parse() else {
                report.first_break = Some(brk(r, "the actor column is not a replica id".into()));
                break;
            };
            let info = u64::try_from(r.seq)
                .ok()
                .and_then(|seq| ledger.change_info(actor, seq));
            let Some(info) = info else {
                report.first_break = Some(brk(
                    r,
                    "the actor and seq columns name no change of these bytes".into(),
                ));
                break;
            };
            if info.hash.as_slice() != r.hash.as_slice() {
                report.first_break = Some(brk(
                    r,
                    "the hash column differs from the change's hash".into(),
                ));
                break;
            }
            if info.deps.concat() != r.deps {
                report.first_break = Some(brk(
                    r,
                    "the deps column differs from the change's dependencies".into(),
                ));
                break;
            }
        }
        if report.first_break.is_some() {
            break;
        }
    }
    report.ok = report.first_break.is_none();
    report
}
