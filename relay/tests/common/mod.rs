#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Test databases (a SQLite file, or a database of its own on the machine's Postgres),
//! polling, and the programs under test as processes.

use serde_json::Value;
use sqlx::Connection;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the tests find Postgres (trust auth on loopback); override with HALFTIME_TEST_POSTGRES.
pub fn postgres_admin_url() -> String {
    std::env::var("HALFTIME_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("relay.db").display());
        Self {
            url,
            _dir: Some(dir),
            pg_name: None,
        }
    }

    /// A fresh database on the machine's Postgres, dropped afterwards.
    pub async fn postgres() -> Self {
        sqlx::any::install_default_drivers();
        let admin = postgres_admin_url();
        let mut c = sqlx::AnyConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("Postgres is needed at {admin} ({e}); ./scripts/test.sh starts it")
            });
        let name = format!(
            "halftime_test_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Self {
            url: format!("{base}/{name}"),
            _dir: None,
            pg_name: Some(name),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Best effort, on a thread of its own (no runtime may be left here).
            let admin = postgres_admin_url();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::AnyConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Poll `f` until it returns Some or `secs` pass.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run a program to completion; its standard output (it must succeed).
pub fn run(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The last word of `out`'s line starting with `prefix`.
pub fn field(out: &str, prefix: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned()
}

/// A program under test, killed when dropped; its standard error goes to `log`.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Self {
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info,libp2p=warn,sqlx=warn,automerge=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[path = "../../../peer/tests/common/ports.rs"]
mod ports;
#[allow(unused_imports)]
pub use ports::free_port;

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

pub async fn get(url: &str, token: Option<&str>) -> Option<Value> {
    let mut r = http().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.ok()?.json().await.ok()
}

/// (status, body); (0, null) when the server cannot be reached.
pub async fn call(method: reqwest::Method, url: &str, token: &str, body: Value) -> (u16, Value) {
    let Ok(r) = http()
        .request(method, url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
    else {
        return (0, Value::Null);
    };
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// A program built beside `bin` (the one under test) by `cargo test --workspace`.
pub fn sibling(bin: &str, name: &str) -> PathBuf {
    let p = Path::new(bin).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run the workspace's tests (./scripts/test.sh) or `cargo build -p {name}`",
        p.display()
    );
    p
}

/// `halftime-relay serve` on `db`, listening on 127.0.0.1:`port`.
pub fn spawn_relay(relay: &Path, db: &str, port: u16, log: PathBuf) -> Proc {
    let args: Vec<String> = ["--database", db, "serve", "--listen"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("127.0.0.1:{port}")])
        .collect();
    Proc::spawn(relay, &args, log)
}

/// `halftime-peer run` on `data`: its API on `api`, no mesh discovery, an uplink to the relay at
/// each of `relays`; `relay_key` pins the relay's key (a stand whose pool is a device).
pub fn spawn_till(
    peer: &Path,
    data: &Path,
    api: u16,
    relays: &[u16],
    relay_key: Option<&str>,
    sale_wait_ms: Option<u64>,
) -> Proc {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--listen".into(),
        "/ip4/127.0.0.1/tcp/0".into(),
        "--api".into(),
        format!("127.0.0.1:{api}"),
        "--no-mdns".into(),
    ];
    if let Some(k) = relay_key {
        args.extend(["--relay-key".into(), k.into()]);
    }
    if let Some(ms) = sale_wait_ms {
        args.extend(["--sale-wait-ms".into(), ms.to_string()]);
    }
    for r in relays {
        args.extend(["--relay".into(), format!("ws://127.0.0.1:{r}")]);
    }
    Proc::spawn(peer, &args, data.join("peer.log"))
}

/// Make a device in `data`, enrol it as terminal `name` of `stand` (its pool at the relay at
/// `relay_url`) through the admin API, and join it to the stand.
pub async fn enrol_till(
    peer: &Path,
    relay_url: &str,
    admin: &str,
    stand: &str,
    data: &Path,
    name: &str,
) {
    let key = field(
        &run(peer, &["init", "--data", data.to_str().unwrap()]),
        "public key:",
    );
    let enrol = serde_json::json!({"public_key": key, "name": name, "role": "terminal"});
    let (code, joined) = call(
        reqwest::Method::POST,
        &format!("{relay_url}/v1/stands/{stand}/replicas"),
        admin,
        enrol,
    )
    .await;
    assert_eq!(code, 201, "{joined}");
    run(
        peer,
        &[
            "join",
            "--data",
            data.to_str().unwrap(),
            "--stand",
            stand,
            "--pool-key",
            joined["pool_key"].as_str().unwrap(),
            "--psk",
            joined["psk"].as_str().unwrap(),
        ],
    );
}
