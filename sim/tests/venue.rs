#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `halftime-sim venue` end to end, as a user runs it: the real relay, reconciler, fake Stripe,
//! pool, terminals and kitchen display as processes (built beside halftime-sim by
//! `cargo build --workspace --tests`), a short rush with an internet cut, the report, and
//! Ctrl-C. The report's claims are checked again against the relay's store through its admin
//! API while the venue is kept running; the browser test opens the pages the run prints.
//!
//! The smoke takes the default network (namespaces and mDNS as root, loopback otherwise); the
//! browser test takes loopback, so a root run covers both.
//!
//! The two tests take turns: each runs a whole venue, and two at once on a small machine only
//! make both slower.

#[path = "../../peer/tests/common/ports.rs"]
mod ports;

use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const SIM: &str = env!("CARGO_BIN_EXE_halftime-sim");
static ONE_VENUE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `halftime-sim venue ARGS`, its output read line by line; interrupted (then killed) on drop.
struct Venue {
    child: Child,
    lines: Receiver<String>,
    out: String,
}

impl Venue {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(SIM)
            .arg("venue")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        Self {
            child,
            lines,
            out: String::new(),
        }
    }

    /// Read until a line contains `want`; everything read so far.
    fn wait_for(&mut self, want: &str, secs: u64) -> &str {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(want);
                    self.out.push_str(&l);
                    self.out.push('\n');
                    if hit {
                        return &self.out;
                    }
                }
                Err(_) => panic!(
                    "no line with {want:?} within {secs} s (exit: {:?}); output:\n{}",
                    self.child.try_wait(),
                    self.out
                ),
            }
        }
    }

    /// Ctrl-C; how it ended, and the rest of its output.
    fn interrupt(&mut self) -> ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.out.push_str(&l);
                    self.out.push('\n');
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the venue did not stop within 30 s of Ctrl-C:\n{}",
                self.out
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Venue {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Ctrl-C first, so the venue stops its own children.
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The line of `out` that starts with `prefix`.
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

/// The number just before `after` in `l`.
fn number_before(l: &str, after: &str) -> i64 {
    let head = &l[..l
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {l:?}"))];
    head.split_whitespace().last().unwrap().parse().unwrap()
}

/// What the run printed up front: the POS pages, the kitchen page, the admin page and token,
/// and its folder.
struct Printed {
    pos: Vec<String>,
    kitchen: String,
    relay: String,
    token: String,
    dir: PathBuf,
}

fn printed(out: &str) -> Printed {
    let pos = out
        .lines()
        .take_while(|l| !l.starts_with("== venue report"))
        .filter(|l| l.trim_start().starts_with("POS page") && !l.contains("(stand south)"))
        .map(|l| {
            l.split_whitespace()
                .last()
                .unwrap()
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    let kitchen = line(out, "  kitchen").split_whitespace().last().unwrap();
    let admin = line(out, "  admin page");
    let words: Vec<&str> = admin.split_whitespace().collect();
    Printed {
        pos,
        kitchen: kitchen.trim_end_matches("/kitchen").to_owned(),
        relay: words[2].trim_end_matches("/admin").to_owned(),
        token: words.last().unwrap().trim_end_matches(')').to_owned(),
        dir: PathBuf::from(
            line(out, "  data and logs:")
                .split_whitespace()
                .last()
                .unwrap(),
        ),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn relay_get(p: &Printed, path: &str) -> Value {
    http()
        .get(format!("{}{path}", p.relay))
        .bearer_auth(&p.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_venue_accounts_for_every_acknowledged_sale_in_the_relays_store_once() {
    let _turn = ONE_VENUE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut v = Venue::start(&[
        "--rush-secs",
        "30",
        "--outage-secs",
        "10",
        "--seed",
        "3",
        "--keep",
    ]);
    let out = v.wait_for("keeps running", 240).to_owned();
    let p = printed(&out);
    assert_eq!(p.pos.len(), 6, "six POS pages:\n{out}");
    assert!(out.contains("verdict: PASS"), "{out}");

    // The report: every acknowledged sale in the relay's store once; nothing oversold.
    let once = line(&out, "exactly once:");
    assert!(once.starts_with("exactly once: ok"), "{once}");
    let acked = number_before(once, " acknowledged sales");
    let stored = number_before(once, " sales in the relay's store");
    assert!(acked > 0, "{once}");
    assert_eq!(acked, stored, "{once}");
    let strict = line(&out, "no oversell under strict:");
    assert!(
        strict.starts_with("no oversell under strict: ok"),
        "{strict}"
    );
    let sales = line(&out, "sales:");
    assert!(
        number_before(sales, " while the internet was down") > 0,
        "the stand kept selling with the internet down: {sales}"
    );
    assert_eq!(number_before(sales, " acknowledged"), acked, "{sales}");

    // The same, read from the relay's store by this test.
    let rows = relay_get(&p, "/v1/stands/north/sales?limit=1000").await;
    let rows = rows.as_array().unwrap();
    assert_eq!(
        rows.len() as i64,
        stored,
        "the report counts the store's sales"
    );
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|r| r["sale_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), rows.len(), "no sale stored twice");
    let stock = relay_get(&p, "/v1/stands/north/stock").await;
    for item in stock["items"].as_array().unwrap() {
        assert!(item["available"].as_i64().unwrap() >= 0, "{stock}");
    }
    let refunds = relay_get(&p, "/v1/stands/north/refunds").await;
    assert_eq!(refunds, serde_json::json!([]), "nothing refunded");

    // The second stand oversold what it oversold, and every such unit was refunded once.
    let south_once = line(&out, "  exactly once:");
    assert!(south_once.starts_with("  exactly once: ok"), "{south_once}");
    let refunded = line(&out, "  refunds exactly once:");
    assert!(
        refunded.starts_with("  refunds exactly once: ok"),
        "{refunded}"
    );
    let stock = relay_get(&p, "/v1/stands/south/stock").await;
    let oversold: i64 = stock["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (-i["available"].as_i64().unwrap()).max(0))
        .sum();
    let refunds = relay_get(&p, "/v1/stands/south/refunds?limit=1000").await;
    let units: i64 = refunds
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["units"].as_i64().unwrap())
        .sum();
    assert_eq!(
        units, oversold,
        "every oversold unit refunded once: {refunds}"
    );
    assert_eq!(
        number_before(refunded, " units refunded of"),
        units,
        "{refunded}"
    );
    let status: Value = http()
        .get(format!("{}/v1/status", p.pos[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["role"], "terminal", "{status}");

    // Ctrl-C stops every process and removes the folder.
    let st = v.interrupt();
    assert_eq!(st.code(), Some(130), "{}", v.out);
    assert!(!p.dir.exists(), "{} removed", p.dir.display());
    let left = processes_mentioning(&p.dir.display().to_string());
    assert!(left.is_empty(), "still running: {left:?}");
    let stripe = line(&out, "  fake Stripe")
        .split_whitespace()
        .last()
        .unwrap();
    assert!(
        http().get(stripe).send().await.is_err(),
        "the fake Stripe stopped"
    );
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        let tag = format!("hv{}", v.child.id() % 100_000);
        let list = String::from_utf8_lossy(&o.stdout);
        assert!(!list.contains(&tag), "namespaces removed: {list}");
    }
}

/// Command lines of running processes that contain `s` (every program of a venue names its
/// data folder or database in its arguments).
fn processes_mentioning(s: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(s) {
                found.push(cmd);
            }
        }
    }
    found
}

/// A binary named by `env`, else found on PATH.
fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH: the browser test needs Debian's chromium and \
                 chromium-driver (`apt-get install -y chromium chromium-driver`, as \
                 scripts/test.sh does), or set {env}"
            )
        })
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_browser(dir: &Path) -> (Driver, Client) {
    let chromium = binary("CHROMIUM", "chromium");
    let exe = binary("CHROMEDRIVER", "chromedriver");
    let port = ports::free_port();
    let child = Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let status = format!("{}/status", driver.url);
    eventually(20, "chromedriver ready", || async {
        let v: Value = http().get(&status).send().await.ok()?.json().await.ok()?;
        (v["value"]["ready"] == true).then_some(())
    })
    .await;
    let args = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-dev-shm-usage".into(),
        "--no-proxy-server".into(),
        "--window-size=1024,768".into(),
        format!("--user-data-dir={}", dir.display()),
    ];
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium.to_str().unwrap(), "args": args },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap();
    (driver, client)
}

async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn number(c: &Client, css: &str) -> Option<i64> {
    text(c, css).await?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_a_venue_prints_show_its_live_stand() {
    let _turn = ONE_VENUE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let profile = tempfile::tempdir().unwrap();
    let (_driver, c) = start_browser(profile.path()).await;
    let mut v = Venue::start(&[
        "--rush-secs",
        "12",
        "--outage-secs",
        "3",
        "--terminals",
        "2",
        "--seed",
        "5",
        "--network",
        "loopback",
        "--keep",
    ]);
    let out = v.wait_for("keeps running", 180).to_owned();
    let p = printed(&out);
    let stock = relay_get(&p, "/v1/stands/north/stock").await;
    let hotdogs = stock["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["sku"] == "hotdog")
        .unwrap()["available"]
        .as_i64()
        .unwrap();
    assert!(out.contains("verdict: PASS"), "{out}");

    // A POS page: the till's name, and the hot dogs the stand has left after the rush.
    c.goto(&format!("{}/", p.pos[1])).await.unwrap();
    const HOTDOG: &str = r#"button.item[data-sku="hotdog"] .available"#;
    eventually(15, "the POS page shows what the relay holds", || async {
        (number(&c, HOTDOG).await? == hotdogs).then_some(())
    })
    .await;
    eventually(15, "the till's name in the header", || async {
        text(&c, "#title").await?.contains("till2").then_some(())
    })
    .await;

    // The kitchen display: the rush's tickets.
    c.goto(&format!("{}/kitchen", p.kitchen)).await.unwrap();
    eventually(15, "tickets on the kitchen page", || async {
        let n = c.find_all(Locator::Css(".order")).await.ok()?.len();
        (n > 0).then_some(())
    })
    .await;
    let count = text(&c, "#count").await.unwrap();
    assert!(count.ends_with(" open"), "{count}");

    // The admin page, with the printed token: the stand and its hot dogs.
    c.goto(&format!("{}/admin", p.relay)).await.unwrap();
    let field = c.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(&p.token).await.unwrap();
    c.find(Locator::Css("#save-token"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    const ROW: &str = r#"section.stand[data-stand="north"] .item[data-sku="hotdog"] .available"#;
    eventually(15, "the admin page shows the stand's hot dogs", || async {
        (number(&c, ROW).await? == hotdogs).then_some(())
    })
    .await;
    let _ = c.close().await;
    assert_eq!(v.interrupt().code(), Some(130), "{}", v.out);
}
