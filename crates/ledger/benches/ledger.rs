#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Ledger benchmarks: prints medians and p99s.
//!
//! `cargo bench -p halftime-ledger --bench ledger` (add `-- --sales 1000000` for the stress
//! size). Figures and their commands are kept in docs/BENCHMARKS.md.

use halftime_ledger::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const TERMINALS: usize = 10;
const SKUS: usize = 8;

fn sku(i: usize) -> Sku {
    Sku::new(format!("item{i}")).unwrap()
}

fn key(n: u8) -> ReplicaKey {
    ReplicaKey::from_seed([n; 32])
}

fn stand() -> (Ledger, Vec<Ledger>, Vec<SignedChange>) {
    let info = StandInfo {
        event: EventId::new("bench").unwrap(),
        venue: "Stadium".into(),
        stand: StandId::new("s1").unwrap(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    };
    let (mut pool, g) = Ledger::create_stand(key(1), info, "pool", 1).unwrap();
    let mut setup = vec![g];
    let items = (0..SKUS)
        .map(|i| CatalogItem {
            sku: sku(i),
            name: format!("Item {i}"),
            price_cents: 100,
            low_stock_at: 10,
        })
        .collect();
    setup.push(pool.set_catalog(items, 1).unwrap());
    for t in 0..TERMINALS {
        setup.push(
            pool.enrol(key(10 + t as u8).public(), "t", Role::Terminal, 1)
                .unwrap(),
        );
    }
    setup.push(
        pool.restock((0..SKUS).map(|i| (sku(i), 1u64 << 36)).collect(), "", 1)
            .unwrap(),
    );
    for t in 0..TERMINALS {
        setup.push(
            pool.give(
                key(10 + t as u8).replica_id(),
                (0..SKUS).map(|i| (sku(i), 1u64 << 32)).collect(),
                1,
            )
            .unwrap(),
        );
    }
    let terms = (0..TERMINALS)
        .map(|t| {
            let mut l = Ledger::join(
                key(10 + t as u8),
                StandId::new("s1").unwrap(),
                key(1).public(),
            );
            l.apply_remote(setup.clone(), 1);
            l
        })
        .collect();
    (pool, terms, setup)
}

fn req(i: usize) -> SaleRequest {
    SaleRequest {
        lines: vec![SaleLine {
            sku: sku(i % SKUS),
            qty: 1,
            unit_price_cents: 100,
        }],
        payment: Payment {
            method: PaymentMethod::Card,
            reference: "pi_x".into(),
        },
        pool_reachable: true,
    }
}

fn sell(t: &mut Ledger, i: usize, now: u64) -> SignedChange {
    match t.sell(req(i), now) {
        SaleOutcome::Committed { change, .. } => change,
        SaleOutcome::Refused { reason } => panic!("{reason}"),
    }
}

struct Stats(Vec<Duration>);
impl Stats {
    fn show(mut self, what: &str) {
        self.0.sort();
        let n = self.0.len();
        let p = |q: f64| self.0[((n as f64 * q) as usize).min(n - 1)];
        let total: Duration = self.0.iter().sum();
        println!(
            "{what:<52} n={n:<7} median {:>9.1} µs   p99 {:>9.1} µs   {:>9.0} ops/s",
            p(0.5).as_secs_f64() * 1e6,
            p(0.99).as_secs_f64() * 1e6,
            n as f64 / total.as_secs_f64()
        );
    }
}

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

fn read_changes(path: &str) -> Vec<SignedChange> {
    let bytes = std::fs::read(path).unwrap();
    let mut changes = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        changes.push(SignedChange::from_slice(&rest[4..4 + len]).unwrap());
        rest = &rest[4 + len..];
    }
    changes
}

/// Load the stand from its snapshot (`path`.snap) and its stored changes, in a fresh process.
fn snapshot_child(path: &str) {
    let changes = read_changes(path);
    let snap = std::fs::read(format!("{path}.snap")).unwrap();
    let before = rss_kb("VmRSS:");
    let t = Instant::now();
    let (l, _, load) = Ledger::from_snapshot(
        key(99),
        StandId::new("s1").unwrap(),
        key(1).public(),
        &snap,
        changes,
        10,
    )
    .unwrap();
    let dt = t.elapsed();
    println!(
        "load of the same stand from its snapshot ({} changes covered, {} replayed): {:.2} s; resident {} MB after load, peak {} MB (before load {} MB incl. the stored changes and the snapshot)",
        load.covered,
        load.replayed,
        dt.as_secs_f64(),
        rss_kb("VmRSS:") / 1024,
        rss_kb("VmHWM:") / 1024,
        before / 1024
    );
    drop(l);
}

fn load_child(path: &str) {
    let changes = read_changes(path);
    let before = rss_kb("VmRSS:");
    let n = changes.len();
    let t = Instant::now();
    let (mut l, rep) = Ledger::restore(
        key(99),
        StandId::new("s1").unwrap(),
        key(1).public(),
        changes,
        10,
    );
    let dt = t.elapsed();
    assert!(rep.rejected.is_empty());
    println!(
        "load of {n} changes from the own store (validate + apply; signatures trusted): {:.2} s; resident {} MB after load, peak {} MB (before load {} MB incl. the stored changes)",
        dt.as_secs_f64(),
        rss_kb("VmRSS:") / 1024,
        rss_kb("VmHWM:") / 1024,
        before / 1024
    );
    let t = Instant::now();
    let snap = l.snapshot();
    println!(
        "snapshot of that stand: {} KB, made in {:.2} s",
        snap.len() / 1024,
        t.elapsed().as_secs_f64()
    );
    std::fs::write(format!("{path}.snap"), &snap).unwrap();
    let saved = l.doc().save();
    let before_doc = rss_kb("VmRSS:");
    let t = Instant::now();
    let doc = automerge::Automerge::load(&saved).unwrap();
    println!(
        "automerge document: {} KB saved, Automerge::load {:.2} s, {} MB resident once loaded",
        saved.len() / 1024,
        t.elapsed().as_secs_f64(),
        rss_kb("VmRSS:").saturating_sub(before_doc) / 1024
    );
    drop(doc);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--load-child") {
        load_child(&args[i + 1]);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--snapshot-child") {
        snapshot_child(&args[i + 1]);
        return;
    }
    let sales: usize = args
        .iter()
        .position(|a| a == "--sales")
        .map(|i| args[i + 1].parse().unwrap())
        .unwrap_or(100_000);
    println!("halftime-ledger benchmarks: {TERMINALS} terminals, {SKUS} skus, {sales} sales");

    // 1. Sales committed and signed in memory, one core.
    let (_pool, mut terms, setup) = stand();
    let mut st = Vec::new();
    for i in 0..20_000 {
        let t = Instant::now();
        sell(&mut terms[0], i, 10 + i as u64);
        st.push(t.elapsed());
    }
    Stats(st).show("sale committed + signed (in memory)");

    // 1b. The floors under a sale and a single receive, measured alone on the same bytes: the
    //     ed25519 signature of a sale change, its verification, and an Automerge transaction
    //     of the same shape (two counters put, a message, commit, the change taken out).
    let change = sell(&mut terms[0], 20_000, 30_000);
    let k = key(10);
    let (mut sign, mut verify, mut am) = (Vec::new(), Vec::new(), Vec::new());
    let sig = k.sign(&change.bytes);
    for _ in 0..5_000 {
        let t = Instant::now();
        std::hint::black_box(k.sign(std::hint::black_box(&change.bytes)));
        sign.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(k.public().verify(std::hint::black_box(&change.bytes), &sig));
        verify.push(t.elapsed());
    }
    {
        use automerge::transaction::{CommitOptions, Transactable};
        let mut doc = automerge::Automerge::new();
        let msg = String::from_utf8_lossy(&change.bytes[..200.min(change.bytes.len())]).to_string();
        for i in 0..5_000i64 {
            let t = Instant::now();
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "out", i).unwrap();
            tx.put(automerge::ROOT, "at", i).unwrap();
            tx.commit_with(
                CommitOptions::default()
                    .with_message(msg.clone())
                    .with_time(i),
            );
            std::hint::black_box(doc.get_last_local_change());
            am.push(t.elapsed());
        }
    }
    Stats(sign).show("  of which: ed25519 signature of a sale change");
    Stats(verify).show("  ed25519 verification of one change, alone");
    Stats(am).show("  Automerge transaction of a sale's shape + commit");

    // 2. Build the event: `sales` sales spread over the terminals, everything applied at a
    //    fresh replica in batches of 100 (as a sync round delivers them).
    let (_pool, mut terms, _) = stand();
    let mut all: Vec<SignedChange> = setup.clone();
    let mut pool = Ledger::join(key(98), StandId::new("s1").unwrap(), key(1).public());
    pool.apply_remote(setup.clone(), 1);
    let mut batch_stats = Vec::new();
    let mut pending = Vec::new();
    let mut single_at: BTreeMap<usize, (Stats, Stats)> = BTreeMap::new();
    let checkpoints = [10_000usize, 100_000, 1_000_000];
    for i in 0..sales {
        let c = sell(&mut terms[i % TERMINALS], i, 100 + i as u64);
        all.push(c.clone());
        pending.push(c);
        if pending.len() == 100 {
            let t = Instant::now();
            let r = pool.apply_remote(std::mem::take(&mut pending), 100 + i as u64);
            batch_stats.push(t.elapsed() / 100);
            assert_eq!(r.accepted.len(), 100);
        }
        if checkpoints.contains(&(i + 1)) {
            // Apply cost of a single received change at this size, and beside it Automerge's
            // own apply of the same change, already decoded, to a copy of the same document.
            let mut s = Vec::new();
            let mut alone = Vec::new();
            let mut copy = pool.doc().clone();
            for j in 0..300 {
                let c = sell(&mut terms[j % TERMINALS], j, 100 + i as u64 + j as u64);
                all.push(c.clone());
                let decoded = automerge::Change::from_bytes(c.bytes.clone()).unwrap();
                let t = Instant::now();
                copy.apply_changes([decoded]).unwrap();
                alone.push(t.elapsed());
                let t = Instant::now();
                let r = pool.apply_remote(vec![c], 100 + i as u64 + j as u64);
                s.push(t.elapsed());
                assert_eq!(r.accepted.len(), 1);
            }
            single_at.insert(i + 1, (Stats(s), Stats(alone)));
        }
        if (i + 1) % 100_000 == 0 {
            eprintln!("  built {} sales", i + 1);
        }
    }
    Stats(batch_stats).show("received change verified + applied (batches of 100)");
    for (n, (s, alone)) in single_at {
        s.show(&format!(
            "one received change verified + applied at {n} sales"
        ));
        alone.show("  of which: Automerge's apply of it alone (decoded)");
    }

    // 3. Ten replicas merging: one replica receives every other terminal's sales in one go.
    let t = Instant::now();
    let mut fresh = Ledger::join(key(97), StandId::new("s1").unwrap(), key(1).public());
    for chunk in all.chunks(256) {
        fresh.apply_remote(chunk.to_vec(), 100 + all.len() as u64);
    }
    let dt = t.elapsed();
    println!(
        "merge of {} changes from {TERMINALS} terminals into a fresh replica: {:.2} s ({:.0} changes/s)",
        all.len(),
        dt.as_secs_f64(),
        all.len() as f64 / dt.as_secs_f64()
    );
    assert_eq!(fresh.heads().len(), pool.heads().len());

    // 4. Load time and peak memory of the stand, in a fresh process.
    let path = std::env::temp_dir().join(format!("halftime-bench-{}.bin", std::process::id()));
    let mut buf = Vec::new();
    for c in &all {
        let b = c.to_vec();
        buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        buf.extend_from_slice(&b);
    }
    std::fs::write(&path, &buf).unwrap();
    drop((all, fresh, pool, terms));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--load-child", path.to_str().unwrap()])
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--snapshot-child", path.to_str().unwrap()])
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{}.snap", path.display()));
}
