#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Real-process fixtures: a stand of `halftime-peer` processes on loopback or in network
//! namespaces, killed when the fixture drops.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_halftime-peer");

#[path = "ports.rs"]
mod ports;
pub use ports::free_port;

pub fn cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run `init` and return the public key.
pub fn init(dir: &Path) -> String {
    let out = cli(&["init", "--data", dir.to_str().unwrap()]);
    out.lines()
        .find(|l| l.starts_with("public key:"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned()
}

pub struct Proc {
    pub name: String,
    pub child: Child,
    pub api: String,
    pub mesh: String,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How long a test replica's sale may wait for rights.
pub const TEST_SALE_WAIT_MS: u64 = 5_000;

/// Spawn `halftime-peer run`, optionally inside a network namespace.
pub fn spawn(
    name: &str,
    data: &Path,
    mesh: &str,
    api_port: u16,
    peers: &[String],
    mdns: bool,
    netns: Option<&str>,
) -> Proc {
    spawn_with(name, data, mesh, api_port, peers, mdns, netns, &[])
}

/// [`spawn`] with more arguments for `run`.
#[allow(clippy::too_many_arguments)]
pub fn spawn_with(
    name: &str,
    data: &Path,
    mesh: &str,
    api_port: u16,
    peers: &[String],
    mdns: bool,
    netns: Option<&str>,
    extra: &[&str],
) -> Proc {
    let log = data.join("peer.log");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--listen".into(),
        mesh.into(),
        "--api".into(),
        format!("127.0.0.1:{api_port}"),
        "--sync-interval-ms".into(),
        "500".into(),
        // A loaded test machine must not turn a sale that waits for a give into a refusal.
        "--sale-wait-ms".into(),
        TEST_SALE_WAIT_MS.to_string(),
    ];
    if !mdns {
        args.push("--no-mdns".into());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    for p in peers {
        args.push("--peer".into());
        args.push(p.clone());
    }
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    let child = cmd
        .args(&args)
        .env("RUST_LOG", "info,libp2p=warn,automerge=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc {
        name: name.into(),
        child,
        api: format!("http://127.0.0.1:{api_port}"),
        mesh: mesh.into(),
        data: data.into(),
        log,
    }
}

pub struct Stand {
    pub dir: tempfile::TempDir,
    pub pool_key: String,
    pub psk: String,
    pub keys: Vec<String>,
    pub join: Vec<String>,
}

/// Create a stand: a pool and `n` terminals (and a kitchen when asked), all joined.
pub fn make_stand(n: usize, kitchen: bool, items: &[&str]) -> Stand {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let pool_key = init(&pool);
    let mut keys = Vec::new();
    let mut args: Vec<String> = vec![
        "create-stand".into(),
        "--data".into(),
        pool.to_str().unwrap().into(),
    ];
    args.extend(
        [
            "--stand",
            "north",
            "--event",
            "game",
            "--venue",
            "Test Field",
        ]
        .map(String::from),
    );
    for it in items {
        args.push("--item".into());
        args.push(it.to_string());
    }
    for i in 0..n {
        let k = init(&dir.path().join(format!("t{i}")));
        args.push("--terminal".into());
        args.push(format!("{k}=till{i}"));
        keys.push(k);
    }
    if kitchen {
        let k = init(&dir.path().join("kitchen"));
        args.push("--kitchen".into());
        args.push(format!("{k}=kitchen"));
        keys.push(k);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli(&argv);
    let line = out
        .lines()
        .find(|l| l.contains("halftime-peer join"))
        .unwrap();
    let join: Vec<String> = line
        .split_whitespace()
        .skip_while(|w| *w != "--stand")
        .map(String::from)
        .collect();
    let psk = join[join.iter().position(|w| w == "--psk").unwrap() + 1].clone();
    let names: Vec<String> = (0..n)
        .map(|i| format!("t{i}"))
        .chain(kitchen.then(|| "kitchen".to_string()))
        .collect();
    for name in names {
        let d = dir.path().join(&name);
        let mut a = vec![
            "join".to_string(),
            "--data".into(),
            d.to_str().unwrap().into(),
        ];
        a.extend(join.iter().cloned());
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        cli(&argv);
    }
    Stand {
        dir,
        pool_key,
        psk,
        keys,
        join,
    }
}

/// One shared HTTP client (keeps connections alive between requests).
pub fn client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap()
        })
        .clone()
}

pub async fn get(api: &str, path: &str) -> Value {
    client()
        .get(format!("{api}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn sell(api: &str, sku: &str, qty: u64) -> (u16, Value) {
    let r = client()
        .post(format!("{api}/v1/sales"))
        .json(&serde_json::json!({"lines":[{"sku":sku,"qty":qty}],"payment":{"method":"card","reference":"pi_t"}}))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `p`'s API answers; on timeout, fail with its log (the folder it was in is gone
/// once the test has failed).
pub async fn wait_up(p: &Proc) {
    let start = Instant::now();
    loop {
        let up = client()
            .get(format!("{}/v1/status", p.api))
            .send()
            .await
            .is_ok();
        if up {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!(
                "timed out after 20s waiting for {}'s API at {}; its log:\n{}",
                p.name,
                p.api,
                p.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn available(api: &str, sku: &str) -> Option<i64> {
    let v = client()
        .get(format!("{api}/v1/stock"))
        .send()
        .await
        .ok()?
        .json::<Value>()
        .await
        .ok()?;
    v.as_array()?
        .iter()
        .find(|r| r["sku"] == sku)
        .and_then(|r| r["available"].as_i64())
}

pub async fn peers(api: &str) -> Vec<String> {
    let v = get(api, "/v1/status").await;
    v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The pool followed by `n` terminals' names, as `make_stand` lays out their folders.
pub fn pool_and_terminals(n: usize) -> Vec<String> {
    std::iter::once("pool".to_string())
        .chain((0..n).map(|i| format!("t{i}")))
        .collect()
}

/// Start the named replicas of `stand` on loopback with static peers, each dialling the ones
/// started before it.
pub fn start_chain<S: AsRef<str>>(stand: &Stand, names: &[S]) -> Vec<Proc> {
    let mut procs: Vec<Proc> = Vec::new();
    for name in names {
        let name = name.as_ref();
        let peers: Vec<String> = procs.iter().map(|p| p.mesh.clone()).collect();
        let mesh = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        procs.push(spawn(
            name,
            &stand.dir.path().join(name),
            &mesh,
            free_port(),
            &peers,
            false,
            None,
        ));
    }
    procs
}

/// Wait until `api` shows `value` units of `sku` available.
pub async fn wait_available(secs: u64, api: &str, sku: &str, value: i64) {
    let api = api.to_owned();
    let sku = sku.to_owned();
    eventually(secs, &format!("{sku} = {value} at {api}"), || {
        let (api, sku) = (api.clone(), sku.clone());
        async move { (available(&api, &sku).await == Some(value)).then_some(()) }
    })
    .await
}

/// The Prometheus text of a replica's `/metrics`.
pub async fn metrics(api: &str) -> String {
    client()
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
