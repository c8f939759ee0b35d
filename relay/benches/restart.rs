//! Restart of a relay holding many large stands: how long until `halftime-relay serve` answers
//! its admin API, how long until a stand asked for is served (a stand loads at its first
//! uplink or admin call), and what the relay holds in memory. First with no snapshot (every
//! stored change replayed; this start writes each stand's snapshot, `--snapshot-every
//! 1000`), then from the snapshots: one stand asked for alone, then every stand at once.
//!
//! `cargo bench -p halftime-relay --bench restart` (Postgres at 127.0.0.1:5432 with trust auth,
//! or HALFTIME_TEST_POSTGRES=postgres://…/postgres; `-- --sqlite` for a SQLite file;
//! `-- --stands N --sales M`, default 10 stands of 100,000 sales; `-- --logs DIR` keeps the
//! relay's logs, which with `RUST_LOG=info` time each stand's load).

mod common;

use halftime_ledger::*;
use halftime_relay::store::{Batch, ChangeRow, Placement, StandRow, Store};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PER_COMMIT: usize = 256;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Stand `name`'s changes with what the store keeps beside each (hash, deps, time), in the
/// order a replica accepts them.
fn stand_rows(name: &str, sales: usize, relay: &ReplicaKey) -> Vec<ChangeRow> {
    let all = common::stand_changes(name, sales, relay.public()).unwrap_or_else(|e| panic!("{e}"));
    let stand = StandId::new(name).unwrap_or_else(|e| panic!("{e}"));
    let mut l = Ledger::join(relay.clone(), stand, common::key(1).public());
    let report = l.apply_remote(all, 1_700_000_000_000);
    assert!(report.rejected.is_empty() && report.pending == 0);
    report
        .accepted
        .into_iter()
        .zip(report.accepted_ids)
        .map(|(change, (actor, seq))| ChangeRow {
            actor,
            seq,
            info: l
                .change_info(actor, seq)
                .unwrap_or_else(|| panic!("{actor}/{seq} not held")),
            change,
        })
        .collect()
}

/// kB from a `/proc/<pid>/status` line.
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Started {
    child: Child,
    port: u16,
    at: Instant,
    /// From the start until the admin API answered (`GET /v1/relay`).
    up: Duration,
}

/// Start the relay and wait until its admin API answers.
async fn start(db: &str, token: &str, log: &std::path::Path) -> Started {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let at = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_halftime-relay"))
        .args([
            "--database",
            db,
            "serve",
            "--snapshot-every",
            "1000",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}")))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/relay");
    loop {
        let answered = client.get(&url).bearer_auth(token).send().await;
        if answered.is_ok_and(|r| r.status().is_success()) {
            return Started {
                child,
                port,
                at,
                up: at.elapsed(),
            };
        }
        assert!(
            at.elapsed() < Duration::from_secs(300),
            "the relay did not come up; see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// From the relay's start until `GET /v1/stands` listed `stands` stands (loaded or not).
async fn listed(s: &Started, token: &str, stands: usize) -> Duration {
    let url = format!("http://127.0.0.1:{}/v1/stands", s.port);
    let v: serde_json::Value = reqwest::Client::new()
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(v.as_array().map(Vec::len), Some(stands), "{v}");
    s.at.elapsed()
}

/// Ask for each named stand's stock at once; for each, the time from the relay's start until
/// it answered (the stand loaded and served).
async fn ask(s: &Started, token: &str, names: &[String]) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let asks = names.iter().map(|n| {
        let url = format!("http://127.0.0.1:{}/v1/stands/{n}/stock", s.port);
        let (client, at) = (client.clone(), s.at);
        async move {
            let r = client
                .get(&url)
                .bearer_auth(token)
                .timeout(Duration::from_secs(600))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(r.status().is_success(), "{url}: {}", r.status());
            at.elapsed()
        }
    });
    let mut took = futures::future::join_all(asks).await;
    took.sort();
    took
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// First, median and last of sorted times.
fn spread(t: &[Duration]) -> String {
    match (t.first(), t.last()) {
        (Some(first), Some(last)) => format!(
            "first {}, median {}, last {}",
            secs(*first),
            secs(t[t.len() / 2]),
            secs(*last)
        ),
        _ => "none".into(),
    }
}

fn memory(s: &Started) -> String {
    let pid = s.child.id();
    format!(
        "resident {} MB, peak {} MB",
        status_kb(pid, "VmRSS:") / 1024,
        status_kb(pid, "VmHWM:") / 1024
    )
}

fn stop(mut s: Started) {
    let _ = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status();
    let _ = s.child.wait();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sqlite = args.iter().any(|a| a == "--sqlite");
    let stands = arg(&args, "--stands", 10);
    let sales = arg(&args, "--sales", 100_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // `--logs DIR` keeps the relay's logs (with RUST_LOG=info: each stand's load, timed).
    let logs = args
        .iter()
        .position(|a| a == "--logs")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| dir.path().to_path_buf(), std::path::PathBuf::from);
    let db = common::database(sqlite, dir.path(), "restart").await;
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    let relay = store.relay_key().await.unwrap_or_else(|e| panic!("{e}"));

    // Two stands at a time are signed and checked (one per core), then stored.
    let t = Instant::now();
    let names: Vec<String> = (0..stands).map(|i| format!("s{i}")).collect();
    let mut total = 0;
    for pair in names.chunks(2) {
        let made: Vec<(String, Vec<ChangeRow>)> = std::thread::scope(|s| {
            let handles: Vec<_> = pair
                .iter()
                .map(|n| {
                    let relay = relay.clone();
                    s.spawn(move || (n.clone(), stand_rows(n, sales, &relay)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panic!("a generator failed")))
                .collect()
        });
        for (name, rows) in made {
            let stand = StandId::new(&name).unwrap_or_else(|e| panic!("{e}"));
            let row = StandRow {
                stand: stand.clone(),
                pool_key: common::key(1).public(),
                placement: Placement::Device,
                pool_secret: None,
                psk: None,
            };
            store
                .add_stand(&row, 0)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            total += rows.len();
            for chunk in rows.chunks(PER_COMMIT) {
                let batch = Batch {
                    changes: chunk.to_vec(),
                    ..Batch::default()
                };
                store
                    .commit(&stand, &batch, 0)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            eprintln!(
                "stored stand {name}: {} changes ({:.0} s so far)",
                rows.len(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    let token = store
        .create_token("bench", halftime_relay::store::AdminRole::Viewer, 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store_kind = if sqlite { "SQLite file" } else { "Postgres" };
    println!("{stands} stands × {sales} sales ({total} stored changes) on {store_kind}");

    // First start: no snapshots; every stand asked for at once replays its changes and then
    // writes its snapshot.
    let first = start(&db.url, &token, &logs.join("first.log")).await;
    let list = listed(&first, &token, stands).await;
    println!(
        "start with no snapshot: API answering in {}, every stand listed (none loaded) in {}, {}",
        secs(first.up),
        secs(list),
        memory(&first)
    );
    let took = ask(&first, &token, &names).await;
    println!(
        "  every stand asked for at once, each replaying every change: served {}; {}",
        spread(&took),
        memory(&first)
    );
    let t = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stand_snapshots")
            .fetch_one(store.pool())
            .await
            .unwrap_or(0);
        if n as usize == stands {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the snapshots were not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(first);

    // From the snapshots: one stand asked for alone, as soon as the API answers.
    let second = start(&db.url, &token, &logs.join("second.log")).await;
    let took = ask(&second, &token, &names[..1]).await;
    println!(
        "start from the snapshots: API answering in {}; one stand asked for alone: served {} after the start; {}",
        secs(second.up),
        spread(&took),
        memory(&second)
    );
    stop(second);

    // From the snapshots: every stand listed, then every stand asked for at once.
    let third = start(&db.url, &token, &logs.join("third.log")).await;
    let list = listed(&third, &token, stands).await;
    let took = ask(&third, &token, &names).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "start from the snapshots: API answering in {}, every stand listed in {}; then every stand asked for at once: served {}; {}",
        secs(third.up),
        secs(list),
        spread(&took),
        memory(&third)
    );
    stop(third);
    store.pool().close().await;
    common::drop_database(&db).await;
}
