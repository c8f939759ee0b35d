#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Peer benchmarks over real processes on loopback: durable acknowledgement beside the raw
//! fsync of the same disk, propagation from a sale on A to B's live stream with 4 and 10
//! terminals under 200 sales/s, and memory of a peer holding a 100k-sale stand.
//!
//! `cargo bench -p halftime-peer --bench peer`

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use futures::StreamExt;
use halftime_ledger::*;
use halftime_peer::store::{StandSettings, Store};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn report(what: &str, v: &mut [f64]) {
    println!(
        "{what:<58} n={:<6} p50 {:>8.2} ms   p99 {:>8.2} ms",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99)
    );
}

async fn ready(procs: &[Proc], n: usize, stock: i64) {
    for p in procs {
        wait_up(p).await;
        let api = p.api.clone();
        eventually(60, "mesh and stand", || {
            let api = api.clone();
            async move {
                (peers(&api).await.len() == n && available(&api, "hotdog").await == Some(stock))
                    .then_some(())
            }
        })
        .await;
    }
}

async fn durable_ack() {
    // Raw fsync on the same disk, measured in this run.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("probe.redb")).unwrap();
    let mut raw: Vec<f64> = (0..500)
        .map(|_| {
            let t = Instant::now();
            store.probe_fsync().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    report("raw redb commit, Durability::Immediate", &mut raw);
    // The store's own durable append of one real sale change (its row and its hash index),
    // what the node does for each group of sales.
    let (changes, _, _) = stand_changes(500);
    let mut store = Store::open(&dir.path().join("append.redb")).unwrap();
    let mut appends: Vec<f64> = changes[changes.len() - 500..]
        .iter()
        .map(|c| {
            let t = Instant::now();
            store.append(std::slice::from_ref(c), true).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    report("store append of one sale change, durable", &mut appends);

    let stand = make_stand(1, false, &["hotdog=Hot dog:400:1000000"]);
    let procs = start_chain(&stand, &pool_and_terminals(1));
    ready(&procs, 1, 1_000_000).await;
    let api = procs[1].api.clone();
    let before = node_times(&api).await;
    let mut acks = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let (code, _) = sell(&api, "hotdog", 1).await;
        assert_eq!(code, 201);
        acks.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report("durable sale ack over HTTP, one client", &mut acks);
    let after = node_times(&api).await;
    let per = |i: usize| (after[i] - before[i]) / (after[i + 1] - before[i + 1]).max(1.0) * 1e3;
    println!(
        "  inside the node, mean per sale: from arrival to acknowledgement {:.3} ms, of which the durable commit {:.3} ms",
        per(0),
        per(2)
    );
    // The same HTTP round trip through the node's task without a sale or a write: the floor
    // under every acknowledgement on this machine.
    let mut status = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let r = client()
            .get(format!("{api}/v1/status"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
        status.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(
        "GET /v1/status through the node task, one client",
        &mut status,
    );
    // Eight concurrent clients: group commit shares one fsync.
    let t = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut v = Vec::new();
                for _ in 0..100 {
                    let t = Instant::now();
                    assert_eq!(sell(&api, "hotdog", 1).await.0, 201);
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                }
                v
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    report(
        &format!(
            "durable sale ack, 8 clients ({:.0} sales/s)",
            all.len() as f64 / secs
        ),
        &mut all,
    );
}

/// The node's ack and commit sums and counts, from its `/metrics`.
async fn node_times(api: &str) -> [f64; 4] {
    let text = metrics(api).await;
    let read = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("halftime_{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    [
        read("ack_seconds_sum"),
        read("ack_seconds_count"),
        read("durable_commit_seconds_sum"),
        read("durable_commit_seconds_count"),
    ]
}

async fn propagation(n: usize) {
    let stand = make_stand(n, false, &["hotdog=Hot dog:400:1000000"]);
    let procs = start_chain(&stand, &pool_and_terminals(n));
    ready(&procs, n, 1_000_000).await;
    let (a, b) = (procs[1].api.clone(), procs[2].api.clone());
    let resp = client()
        .get(format!("{b}/v1/live"))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, Instant>::new()));
    let arr = arrivals.clone();
    let reader = tokio::spawn(async move {
        let mut s = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = s.next().await {
            let now = Instant::now();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find("\n\n") {
                let ev: String = buf.drain(..i + 2).collect();
                if let Some(id) = ev
                    .split("\"sale_id\":\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                {
                    arr.lock().unwrap().entry(id.to_owned()).or_insert(now);
                }
            }
        }
    });
    // 200 sales/s in total, spread over the terminals, for 10 s; sales on A are timed.
    let total_rate = 200.0;
    let per_terminal = total_rate / n as f64;
    let secs = 10.0;
    let mut tasks = Vec::new();
    for (i, p) in procs[1..].iter().enumerate() {
        let api = p.api.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let gap = Duration::from_secs_f64(1.0 / per_terminal);
            let start = Instant::now();
            let mut k = 0u32;
            while start.elapsed().as_secs_f64() < secs {
                let due = start + gap * k;
                tokio::time::sleep_until(due.into()).await;
                let t = Instant::now();
                let (code, body) = sell(&api, "hotdog", 1).await;
                if code == 201 && i == 0 {
                    sent.push((
                        body["sale_id"].as_str().unwrap().to_owned(),
                        t,
                        Instant::now(),
                    ));
                }
                k += 1;
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.abort();
    let arrivals = arrivals.lock().unwrap();
    let mut from_post: Vec<f64> = Vec::new();
    let mut from_ack: Vec<f64> = Vec::new();
    let mut missing = 0;
    for (id, t0, t_ack) in &sent {
        match arrivals.get(id) {
            Some(at) => {
                from_post.push(at.saturating_duration_since(*t0).as_secs_f64() * 1e3);
                from_ack.push(at.saturating_duration_since(*t_ack).as_secs_f64() * 1e3);
            }
            None => missing += 1,
        }
    }
    report(
        &format!("propagation A→B live, {n} terminals, 200 sales/s: from POST"),
        &mut from_post,
    );
    report(
        &format!("propagation A→B live, {n} terminals, 200 sales/s: from 201"),
        &mut from_ack,
    );
    if missing > 0 {
        println!(
            "  {missing} of {} sales on A did not arrive at B within 3 s of the load's end",
            sent.len()
        );
    }
    let _ = a;
}

/// Rights-request round trip: two terminals hold 100 rights each; one sells until its rights
/// fall below a quarter of its target (target = what the stand has left / 2), then asks the
/// terminal holding the most, which answers with a signed give. Measured from the 201 of the sale
/// that crossed the threshold to the moment the seller's own API shows the larger rights (this
/// includes up to one 200 ms timer tick before the request leaves).
/// From the 201 of the sale after which the terminal asked for rights (its
/// `rights_requests_sent_total` moved) until its API shows the larger rights.
async fn rights_request(rounds: usize) {
    let mut rtt = Vec::new();
    for _ in 0..rounds {
        let stand = make_stand(2, false, &["hotdog=Hot dog:400:200"]);
        let procs = start_chain(&stand, &pool_and_terminals(2));
        ready(&procs, 2, 200).await;
        let api = procs[1].api.clone();
        let rights = |api: String| async move {
            get(&api, "/v1/stock").await[0]["rights"]
                .as_i64()
                .unwrap_or(0)
        };
        let asked = |api: String| async move {
            metrics(&api)
                .await
                .lines()
                .find_map(|l| l.strip_prefix("halftime_rights_requests_sent_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let start = asked(api.clone()).await;
        let mut crossed = None;
        for _ in 0..100 {
            let held = rights(api.clone()).await;
            if sell(&api, "hotdog", 1).await.0 != 201 {
                break;
            }
            let t = Instant::now();
            if asked(api.clone()).await > start {
                // Without an answer the sale left it one right fewer.
                crossed = Some((t, held - 1));
                break;
            }
        }
        let Some((t0, before)) = crossed else {
            println!("  the terminal never asked for rights");
            continue;
        };
        loop {
            if rights(api.clone()).await > before {
                rtt.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                println!("  a rights request got no answer within 10 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    if !rtt.is_empty() {
        report(
            "rights request: asked after a sale → rights arrive",
            &mut rtt,
        );
    }
}

/// A stand's set-up and `sales` one-line sales of its one terminal (rights topped up by a
/// give), signed in process.
fn stand_changes(sales: usize) -> (Vec<SignedChange>, ReplicaKey, ReplicaKey) {
    let key = ReplicaKey::from_seed([42; 32]);
    let pool_key = ReplicaKey::from_seed([43; 32]);
    let info = StandInfo {
        event: EventId::new("big").unwrap(),
        venue: String::new(),
        stand: StandId::new("big").unwrap(),
        policy: Policy::Strict,
        allocation: Allocation::Proportional,
        low_stock_pct: 10,
    };
    let (mut pool, g) = Ledger::create_stand(pool_key.clone(), info, "pool", 1).unwrap();
    let sku = Sku::new("hotdog").unwrap();
    let mut changes = vec![g];
    changes.push(
        pool.set_catalog(
            vec![CatalogItem {
                sku: sku.clone(),
                name: "Hot dog".into(),
                price_cents: 400,
                low_stock_at: 1,
            }],
            1,
        )
        .unwrap(),
    );
    changes.push(pool.enrol(key.public(), "t", Role::Terminal, 1).unwrap());
    changes.push(
        pool.restock(BTreeMap::from([(sku.clone(), 1u64 << 30)]), "", 1)
            .unwrap(),
    );
    changes.push(
        pool.give(
            key.replica_id(),
            BTreeMap::from([(sku.clone(), 1u64 << 29)]),
            1,
        )
        .unwrap(),
    );
    let mut t = Ledger::join(key.clone(), StandId::new("big").unwrap(), pool_key.public());
    t.apply_remote(changes.clone(), 1);
    for i in 0..sales {
        let r = SaleRequest {
            lines: vec![SaleLine {
                sku: sku.clone(),
                qty: 1,
                unit_price_cents: 400,
            }],
            payment: Payment {
                method: PaymentMethod::Cash,
                reference: String::new(),
            },
            pool_reachable: true,
        };
        match t.sell(r, 10 + i as u64) {
            SaleOutcome::Committed { change, .. } => changes.push(change),
            SaleOutcome::Refused { reason } => panic!("{reason}"),
        }
    }
    (changes, key, pool_key)
}

async fn memory(sales: usize) {
    let stand = make_stand(1, false, &["hotdog=Hot dog:400:100"]);
    // Build a big event in process: the terminal's own 100k sales (rights topped up by gives).
    let dir = stand.dir.path().join("big");
    let (changes, _, pool_key) = stand_changes(sales);
    std::fs::create_dir_all(&dir).unwrap();
    {
        let mut store = Store::open(&dir.join("replica.redb")).unwrap();
        store.key_or_init(|| [42; 32]).unwrap();
        store
            .set_settings(&StandSettings {
                stand: StandId::new("big").unwrap(),
                pool: pool_key.public(),
                psk: "00".repeat(32),
            })
            .unwrap();
        for c in changes.chunks(1000) {
            store.append(c, true).unwrap();
        }
    }
    // The first start replays every stored change (no snapshot yet); a clean stop writes the
    // snapshot; the second start loads it.
    let mut p = start_measured(&dir, sales, "no snapshot: every stored change replayed").await;
    let t = Instant::now();
    let pid = p.child.id().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(p.child.wait().unwrap().success());
    println!(
        "  clean stop (SIGTERM), writing the snapshot: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let p = start_measured(&dir, sales, "from its snapshot").await;
    assert!(p.log_text().contains("loaded from the snapshot"));
}

/// Start the peer in `dir`, wait for its API and print how long that took and its memory.
async fn start_measured(dir: &std::path::Path, sales: usize, how: &str) -> Proc {
    let start = Instant::now();
    let p = spawn(
        "big",
        dir,
        "/ip4/127.0.0.1/tcp/0",
        free_port(),
        &[],
        false,
        None,
    );
    let api = p.api.clone();
    eventually(300, "the big peer up", || {
        let api = api.clone();
        async move {
            client()
                .get(format!("{api}/v1/status"))
                .send()
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    let up = start.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let field = |f: &str| {
        status
            .lines()
            .find(|l| l.starts_with(f))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024)
            .unwrap()
    };
    println!(
        "peer holding a {sales}-sale stand, {how}: API up after {:.2} s; resident {} MB, peak {} MB",
        up.as_secs_f64(),
        field("VmRSS:"),
        field("VmHWM:")
    );
    // The replica's own account of its load (`restore_ms`: reading the store and rebuilding).
    for l in p.log_text().lines().filter(|l| l.contains("loaded ")) {
        println!("  {}", l.trim());
    }
    p
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only = |name: &str| {
        !args.iter().any(|a| a.starts_with("--only"))
            || args.iter().any(|a| a == &format!("--only={name}"))
    };
    println!("halftime-peer benchmarks (real processes on loopback)");
    if only("ack") {
        durable_ack().await;
    }
    if only("propagation") {
        propagation(4).await;
        propagation(10).await;
    }
    if only("rights") {
        rights_request(10).await;
    }
    if only("memory") {
        memory(100_000).await;
    }
}
