//! `halftime-sim venue`: a whole venue as real processes on this machine — the relay on a
//! SQLite file, the reconciler on the same file, the fake Stripe, and a stand (its pool, its
//! terminals and a kitchen display, each a `halftime-peer`) meshed over loopback with static
//! peers. A seeded rush goes through the terminals' POS APIs, the internet drops and comes
//! back, and the report checks every acknowledged sale against the relay's store of record.
//!
//! Nothing here links the peer, relay or reconciler: they are found beside this program,
//! started as processes and spoken to over HTTP only, so the run exercises the same wire a
//! real venue does.
//!
//! Two ways to lay out the network, said in the output:
//! - namespaces (as root): every device in a network namespace of its own on one bridge,
//!   finding the others by mDNS, and the relay in one more namespace on the same bridge; the
//!   internet cut takes the relay's bridge port down, and the heal brings it back up.
//! - loopback (otherwise): every device on 127.0.0.1 with static peers (libp2p's mDNS ignores
//!   loopback); the cut kills the relay (SIGKILL, as a cut line looks to the stand) and the
//!   heal restarts it on the same port and database.
//!
//! Either way the stand keeps selling over its mesh meanwhile, its pool included.

mod procs;
mod rush;
mod south;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use procs::{Children, Lan, Programs, field, free_port};
use rush::{Acked, CATALOG, Pace, Phase, Seller, SharedPhase, SharedTally, lock};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STAND: &str = "north";
/// Largest stand this command builds (one process per terminal).
pub const MAX_TERMINALS: usize = 32;
pub const MAX_RUSH_SECS: u64 = 24 * 3600;
/// How long the venue may take to come up, and to settle after the rush.
const START_TIMEOUT_MS: u64 = 90_000;
const SETTLE_TIMEOUT_MS: u64 = 90_000;
/// The relay's largest page of sales.
const RELAY_MAX_LISTED: usize = 1_000;
/// How often the run looks for new sales in the relay's store, for propagation times.
const RELAY_POLL_MS: u64 = 500;
const HTTP_TIMEOUT_MS: u64 = 15_000;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum VenuePolicy {
    /// Sell only against own rights: never oversell.
    Strict,
    /// Terminals cut off from the relay may sell a bounded overdraft; the reconciler refunds it.
    Optimistic,
}

impl VenuePolicy {
    fn name(self) -> &'static str {
        match self {
            VenuePolicy::Strict => "strict",
            VenuePolicy::Optimistic => "optimistic",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum NetworkChoice {
    /// Namespaces when run as root, loopback otherwise.
    Auto,
    /// Network namespaces on a bridge, mDNS (needs root and iproute2).
    Namespaces,
    /// 127.0.0.1 with static peers.
    Loopback,
}

#[derive(Args, Debug)]
pub struct VenueArgs {
    /// Seed of the rush: which items each customer buys, how, and when.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Length of the rush in seconds.
    #[arg(long, default_value_t = 60)]
    rush_secs: u64,
    /// How long the internet is down, in the middle of the rush, in seconds [default: a third
    /// of the rush].
    #[arg(long)]
    outage_secs: Option<u64>,
    /// Terminals in the stand.
    #[arg(long, default_value_t = 6)]
    terminals: usize,
    /// Terminals of a second stand, `south`: optimistic, its pool at the relay and no stand
    /// network, so it can oversell while the internet is down and the reconciler refunds it.
    /// 0: no second stand.
    #[arg(long, default_value_t = 3)]
    south_terminals: usize,
    /// The stand's selling policy.
    #[arg(long, value_enum, default_value_t = VenuePolicy::Strict)]
    policy: VenuePolicy,
    /// How the stand's network is laid out.
    #[arg(long, value_enum, default_value_t = NetworkChoice::Auto)]
    network: NetworkChoice,
    /// Leave the venue running after the report, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Where the databases and logs go (kept afterwards). Default: a temporary folder, removed
    /// at the end unless the run failed.
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl VenueArgs {
    fn outage_secs(&self) -> u64 {
        self.outage_secs.unwrap_or(self.rush_secs / 3)
    }

    fn check(&self) -> Result<()> {
        if self.terminals == 0 || self.terminals > MAX_TERMINALS {
            bail!(
                "--terminals must be 1 to {MAX_TERMINALS}, not {}",
                self.terminals
            );
        }
        if self.south_terminals > MAX_TERMINALS {
            bail!(
                "--south-terminals must be 0 to {MAX_TERMINALS}, not {}",
                self.south_terminals
            );
        }
        if !(6..=MAX_RUSH_SECS).contains(&self.rush_secs) {
            bail!(
                "--rush-secs must be 6 to {MAX_RUSH_SECS}, not {}",
                self.rush_secs
            );
        }
        let outage = self.outage_secs();
        if outage == 0 || outage.saturating_mul(3) > self.rush_secs * 2 {
            bail!(
                "--outage-secs must be at least 1 and leave a third of the {} s rush with the internet up",
                self.rush_secs
            );
        }
        Ok(())
    }
}

/// The folder the venue lives in; a temporary one is removed on drop unless kept.
#[derive(Debug)]
struct Workdir {
    path: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl Workdir {
    fn new(dir: Option<&Path>) -> Result<Self> {
        match dir {
            Some(d) => {
                if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                    bail!(
                        "{} is not empty: give --dir a new or empty folder",
                        d.display()
                    );
                }
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                Ok(Self {
                    path: d.to_path_buf(),
                    temp: None,
                })
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("halftime-venue-")
                    .tempdir()
                    .context("cannot make a temporary folder")?;
                Ok(Self {
                    path: t.path().to_path_buf(),
                    temp: Some(t),
                })
            }
        }
    }
    fn keep(&mut self) {
        if let Some(t) = self.temp.take() {
            let _ = t.keep();
        }
    }
}

pub fn cmd_venue(a: &VenueArgs) -> Result<ExitCode> {
    a.check()?;
    let programs = Programs::beside_this_one()?;
    let mut work = Workdir::new(a.dir.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Caught from here on, so a Ctrl-C while the namespaces are made still cleans up.
    let (mut int, mut term) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _in_rt = rt.enter();
        (
            signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
            signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
        )
    };
    // Pool, terminals, kitchen display, and the second stand's terminals.
    let devices = a.terminals + 2 + a.south_terminals;
    let lan = match a.network {
        NetworkChoice::Loopback => None,
        NetworkChoice::Namespaces => Some(Arc::new(Lan::new(devices)?)),
        NetworkChoice::Auto if procs::can_make_namespaces() => match Lan::new(devices) {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                eprintln!("network namespaces could not be made ({e:#}); using loopback");
                None
            }
        },
        NetworkChoice::Auto => None,
    };
    // Declared after the namespaces, so dropped (every child stopped) before them.
    let children = Children::default();
    let outcome = rt.block_on(async {
        tokio::select! {
            biased;
            _ = int.recv() => Ok(Outcome::Stopped),
            _ = term.recv() => Ok(Outcome::Stopped),
            r = venue(a, &programs, &work.path, children.clone(), lan.clone()) => r,
        }
    });
    // The runtime goes first so no task holds a child or the folder.
    drop(rt);
    children.stop_all();
    let code = match outcome {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Stopped) => {
            eprintln!("\nstopped: every process of the venue is stopped");
            ExitCode::from(130)
        }
        Ok(Outcome::Failed) => {
            work.keep();
            eprintln!(
                "the venue's databases and logs are kept in {}",
                work.path.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            work.keep();
            eprintln!(
                "the venue's databases and logs are kept in {}",
                work.path.display()
            );
            return Err(e);
        }
    };
    if work.temp.is_some() {
        eprintln!("removed {}", work.path.display());
    }
    Ok(code)
}

#[derive(Debug)]
enum Outcome {
    Passed,
    Failed,
    Stopped,
}

/// A device of the stand: its name, data folder, address, namespace and ports.
#[derive(Debug, Clone)]
struct Device {
    name: String,
    data: PathBuf,
    host: String,
    ns: Option<String>,
    mesh: u16,
    api: u16,
    key: String,
}

impl Device {
    fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.api)
    }
}

/// The namespaces' fixed ports (each device has an address of its own there).
const NS_API_PORT: u16 = 8080;
const NS_RELAY_PORT: u16 = 8090;

async fn run_cmd(bin: &Path, args: Vec<String>) -> Result<String> {
    let bin = bin.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        procs::run(&bin, &a)
    })
    .await?
}

fn s(x: &str) -> String {
    x.to_owned()
}

/// Start `bin args`, inside network namespace `ns` when given.
fn spawn_in(
    children: &Children,
    name: &str,
    ns: Option<&str>,
    bin: &Path,
    args: Vec<String>,
    log: &Path,
) -> Result<()> {
    match ns {
        Some(ns) => {
            let mut a = vec![s("netns"), s("exec"), s(ns), bin.display().to_string()];
            a.extend(args);
            children.spawn(name, Path::new("ip"), &a, log)?;
        }
        None => {
            children.spawn(name, bin, &args, log)?;
        }
    }
    Ok(())
}

struct Venue {
    programs: Programs,
    children: Children,
    dir: PathBuf,
    db: String,
    lan: Option<Arc<Lan>>,
    relay_host: String,
    relay_ns: Option<String>,
    relay_port: u16,
    stripe_port: u16,
    viewer: String,
    admin: String,
    pool: Device,
    tills: Vec<Device>,
    kitchen: Device,
    stock: Vec<i64>,
    http: reqwest::Client,
}

impl Venue {
    fn relay_url(&self) -> String {
        format!("http://{}:{}", self.relay_host, self.relay_port)
    }
    fn mode(&self) -> String {
        match &self.lan {
            Some(l) => format!(
                "namespaces — {}; devices find each other by mDNS; the internet cut takes the relay's bridge port down",
                l.describe()
            ),
            None => s(
                "loopback — every device on 127.0.0.1 with static peers (no mDNS); the internet cut kills the relay and restarts it",
            ),
        }
    }

    /// The internet goes.
    fn cut(&self) -> Result<()> {
        match &self.lan {
            Some(l) => l.cut(),
            None => {
                self.children.kill_now("relay");
                Ok(())
            }
        }
    }
    fn heal(&self) -> Result<()> {
        match &self.lan {
            Some(l) => l.heal(),
            None => self.spawn_relay("logs/relay-after-the-cut.log"),
        }
    }
    fn stripe_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.stripe_port)
    }
    fn devices(&self) -> Vec<&Device> {
        std::iter::once(&self.pool)
            .chain(&self.tills)
            .chain(std::iter::once(&self.kitchen))
            .collect()
    }

    fn spawn_relay(&self, log: &str) -> Result<()> {
        let args = vec![
            s("--database"),
            self.db.clone(),
            s("serve"),
            s("--listen"),
            format!("{}:{}", self.relay_host, self.relay_port),
        ];
        spawn_in(
            &self.children,
            "relay",
            self.relay_ns.as_deref(),
            &self.programs.relay,
            args,
            &self.dir.join(log),
        )
    }

    async fn get(&self, url: &str, token: Option<&str>) -> Option<Value> {
        let mut r = self.http.get(url);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    async fn relay_get(&self, path: &str) -> Option<Value> {
        self.get(&format!("{}{path}", self.relay_url()), Some(&self.viewer))
            .await
    }

    /// Every sale of `stand` in the relay's store, page after page (latest first).
    async fn relay_sales(&self, stand: &str) -> Option<Vec<Value>> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let cursor = match all.last() {
                None => String::new(),
                Some(r) => format!(
                    "&before_ms={}&before_sale={}",
                    r["at_ms"].as_i64()?,
                    r["sale_id"].as_str()?
                ),
            };
            let page = self
                .relay_get(&format!(
                    "/v1/stands/{stand}/sales?limit={RELAY_MAX_LISTED}{cursor}"
                ))
                .await?;
            let rows = page.as_array()?;
            let last = rows.len() < RELAY_MAX_LISTED;
            all.extend(rows.iter().cloned());
            if last {
                return Some(all);
            }
        }
    }

    /// Poll `f` every 200 ms until it gives Some; an error naming `what` after `ms`, or when a
    /// child has died.
    async fn until<T, F, Fut>(&self, ms: u64, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return Ok(v);
            }
            let dead = self.children.exited();
            if !dead.is_empty() {
                bail!(
                    "waiting for {what}: {} stopped on its own (logs in {})",
                    dead.join(", "),
                    self.dir.join("logs").display()
                );
            }
            if start.elapsed() > Duration::from_millis(ms) {
                bail!(
                    "timed out after {} s waiting for {what} (logs in {})",
                    ms / 1000,
                    self.dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Keys, stand, enrolments and joins, all through the programs' own commands.
async fn set_up(
    a: &VenueArgs,
    programs: &Programs,
    dir: &Path,
    children: Children,
    lan: Option<Arc<Lan>>,
) -> Result<Venue> {
    let db = format!("sqlite:{}", dir.join("relay.db").display());
    let relay = &programs.relay;
    let peer = &programs.peer;
    std::fs::create_dir_all(dir.join("logs"))?;
    let relay_key = field(
        &run_cmd(relay, vec![s("--database"), db.clone(), s("key")]).await?,
        "public key:",
    )?;
    let token = |role: &str| {
        run_cmd(
            relay,
            vec![
                s("--database"),
                db.clone(),
                s("token"),
                s("create"),
                s("--role"),
                s(role),
            ],
        )
    };
    let admin = token("admin").await?.trim().to_owned();
    let viewer = token("viewer").await?.trim().to_owned();

    let device = |i: usize, name: String| -> Result<Device> {
        let (host, ns, mesh, api) = match &lan {
            Some(l) => (l.addr(i), Some(l.ns(i)), 0, NS_API_PORT),
            None => (s("127.0.0.1"), None, free_port()?, free_port()?),
        };
        Ok(Device {
            data: dir.join(&name),
            name,
            host,
            ns,
            mesh,
            api,
            key: String::new(),
        })
    };
    let mut pool = device(0, s("pool"))?;
    let mut tills = (1..=a.terminals)
        .map(|i| device(i, format!("till{i}")))
        .collect::<Result<Vec<_>>>()?;
    let mut kitchen = device(a.terminals + 1, s("kitchen"))?;
    for d in std::iter::once(&mut pool)
        .chain(tills.iter_mut())
        .chain(std::iter::once(&mut kitchen))
    {
        let out = run_cmd(
            peer,
            vec![s("init"), s("--data"), d.data.display().to_string()],
        )
        .await?;
        d.key = field(&out, "public key:")?;
    }

    let pace = Pace::new(a.terminals, a.rush_secs * 1000);
    let stock = pace.stock();
    let mut create = vec![
        s("create-stand"),
        s("--data"),
        pool.data.display().to_string(),
        s("--stand"),
        s(STAND),
        s("--event"),
        format!("rush-seed-{}", a.seed),
        s("--venue"),
        s("Halftime demo venue"),
        s("--policy"),
        s(a.policy.name()),
    ];
    for (c, n) in CATALOG.iter().zip(&stock) {
        create.extend([s("--item"), format!("{}={}:{}:{}", c.0, c.1, c.2, n)]);
    }
    for t in &tills {
        create.extend([s("--terminal"), format!("{}={}", t.key, t.name)]);
    }
    create.extend([s("--kitchen"), format!("{}={}", kitchen.key, kitchen.name)]);
    let out = run_cmd(peer, create).await?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |flag: &str| -> Result<String> {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|w| w.to_string())
            .with_context(|| format!("create-stand printed no {flag}: {out}"))
    };
    let (pool_key, psk) = (after("--pool-key")?, after("--psk")?);
    run_cmd(
        peer,
        vec![
            s("enrol"),
            s("--data"),
            pool.data.display().to_string(),
            s("--replica"),
            format!("{relay_key}=relay"),
            s("--role"),
            s("relay"),
        ],
    )
    .await?;
    for d in tills.iter().chain(std::iter::once(&kitchen)) {
        run_cmd(
            peer,
            vec![
                s("join"),
                s("--data"),
                d.data.display().to_string(),
                s("--stand"),
                s(STAND),
                s("--pool-key"),
                pool_key.clone(),
                s("--psk"),
                psk.clone(),
            ],
        )
        .await?;
    }
    run_cmd(
        relay,
        vec![
            s("--database"),
            db.clone(),
            s("stand"),
            s("add"),
            s("--stand"),
            s(STAND),
            s("--pool-key"),
            pool_key,
        ],
    )
    .await?;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(HTTP_TIMEOUT_MS))
        .build()
        .context("cannot make an HTTP client")?;
    let v = Venue {
        programs: programs.clone(),
        children,
        dir: dir.to_path_buf(),
        db,
        relay_host: lan
            .as_ref()
            .map_or_else(|| s("127.0.0.1"), |l| l.addr(l.relay_index())),
        relay_ns: lan.as_ref().map(|l| l.ns(l.relay_index())),
        relay_port: if lan.is_some() {
            NS_RELAY_PORT
        } else {
            free_port()?
        },
        lan,
        stripe_port: free_port()?,
        viewer,
        admin,
        pool,
        tills,
        kitchen,
        stock,
        http,
    };

    // The processes.
    let logs = dir.join("logs");
    v.children.spawn(
        "fake-stripe",
        &programs.reconciler,
        &[
            s("fake-stripe"),
            s("--listen"),
            format!("127.0.0.1:{}", v.stripe_port),
        ],
        &logs.join("fake-stripe.log"),
    )?;
    v.spawn_relay("logs/relay.log")?;
    v.children.spawn(
        "reconciler",
        &programs.reconciler,
        &[
            s("run"),
            s("--database"),
            v.db.clone(),
            s("--stripe-url"),
            format!("{}/", v.stripe_url()),
            s("--stripe-key"),
            s("sk_test_venue"),
            s("--listen"),
            format!("127.0.0.1:{}", free_port()?),
            s("--id"),
            s("venue-reconciler"),
        ],
        &logs.join("reconciler.log"),
    )?;
    let all = v.devices();
    for d in &all {
        let mut args = vec![
            s("run"),
            s("--data"),
            d.data.display().to_string(),
            s("--api"),
            format!("{}:{}", d.host, d.api),
            s("--relay"),
            format!("ws://{}:{}", v.relay_host, v.relay_port),
            s("--relay-key"),
            relay_key.clone(),
        ];
        if v.lan.is_none() {
            args.extend([
                s("--no-mdns"),
                s("--listen"),
                format!("/ip4/127.0.0.1/tcp/{}", d.mesh),
            ]);
            for o in all.iter().filter(|o| o.name != d.name) {
                args.extend([s("--peer"), format!("/ip4/127.0.0.1/tcp/{}", o.mesh)]);
            }
        }
        spawn_in(
            &v.children,
            &d.name,
            d.ns.as_deref(),
            &programs.peer,
            args,
            &logs.join(format!("{}.log", d.name)),
        )?;
    }
    Ok(v)
}

async fn wait_ready(v: &Venue) -> Result<()> {
    let mesh = v.devices().len();
    let stats = format!("{}/_stats", v.stripe_url());
    v.until(START_TIMEOUT_MS, "the fake Stripe", || v.get(&stats, None))
        .await?;
    v.until(START_TIMEOUT_MS, "the relay", || v.relay_get("/v1/relay"))
        .await?;
    for d in v.devices() {
        let url = d.url();
        let want: BTreeMap<&str, i64> = CATALOG
            .iter()
            .map(|c| c.0)
            .zip(v.stock.iter().copied())
            .collect();
        v.until(
            START_TIMEOUT_MS,
            &format!(
                "{} to hold the stand and be connected to the stand's {} other devices",
                d.name,
                mesh - 1
            ),
            || async {
                let st = v.get(&format!("{url}/v1/status"), None).await?;
                if st["role"].is_null() || st["pool_reachable"] != true {
                    return None;
                }
                // The relay counts among the peers too.
                if st["peers"].as_array()?.len() < mesh - 1 {
                    return None;
                }
                let stock = v.get(&format!("{url}/v1/stock"), None).await?;
                let have: BTreeMap<&str, i64> = stock
                    .as_array()?
                    .iter()
                    .filter_map(|i| Some((i["sku"].as_str()?, i["available"].as_i64()?)))
                    .collect();
                (have == want).then_some(())
            },
        )
        .await?;
    }
    // The relay holds the stand as the pool does before anything is sold.
    let pool = v.pool.url();
    v.until(START_TIMEOUT_MS, "the relay to hold the stand", || async {
        let held = v.get(&format!("{pool}/v1/status"), None).await?["changes"].as_u64()?;
        let stands = v.relay_get("/v1/stands").await?;
        let at_relay =
            stands.as_array()?.iter().find(|x| x["stand"] == STAND)?["changes"].as_u64()?;
        (at_relay == held).then_some(())
    })
    .await?;
    Ok(())
}

/// What the run watched from outside: when each sale showed on the kitchen display and in the
/// relay's store.
#[derive(Debug, Default)]
struct Seen {
    kitchen: BTreeMap<String, Instant>,
    relay: BTreeMap<String, Instant>,
}

type SharedSeen = Arc<Mutex<Seen>>;

fn seen_lock(s: &SharedSeen) -> std::sync::MutexGuard<'_, Seen> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follow the kitchen display's live feed; note when each order arrives.
async fn watch_kitchen(http: reqwest::Client, url: String, seen: SharedSeen) {
    loop {
        // The feed is long-lived: no overall timeout on this request.
        let r = http
            .get(format!("{url}/v1/live"))
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await;
        if let Ok(mut r) = r {
            let mut buf = String::new();
            while let Ok(Some(chunk)) = r.chunk().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    for line in event.lines() {
                        let Some(data) = line.strip_prefix("data:") else {
                            continue;
                        };
                        let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                            continue;
                        };
                        if v["type"] == "order"
                            && let Some(id) = v["order"]["sale_id"].as_str()
                        {
                            seen_lock(&seen)
                                .kitchen
                                .entry(id.to_owned())
                                .or_insert_with(Instant::now);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Look for new sales in the relay's store; note when each first shows.
async fn watch_relay(http: reqwest::Client, url: String, viewer: String, seen: SharedSeen) {
    loop {
        let r = http
            .get(format!(
                "{url}/v1/stands/{STAND}/sales?limit={RELAY_MAX_LISTED}"
            ))
            .bearer_auth(&viewer)
            .send()
            .await;
        if let Ok(r) = r
            && let Ok(v) = r.json::<Value>().await
            && let Some(rows) = v.as_array()
        {
            let now = Instant::now();
            let mut s = seen_lock(&seen);
            for row in rows {
                if let Some(id) = row["sale_id"].as_str() {
                    s.relay.entry(id.to_owned()).or_insert(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(RELAY_POLL_MS)).await;
    }
}

/// One progress line a second: phase, sales/s, stock left (as the pool sees it).
async fn progress(
    http: reqwest::Client,
    pool: String,
    start: Instant,
    phase: Arc<SharedPhase>,
    tally: SharedTally,
) {
    let tty = std::io::stdout().is_terminal();
    let mut last = 0usize;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let left = match http.get(format!("{pool}/v1/stock")).send().await {
            Ok(r) => match r.json::<Value>().await {
                Ok(Value::Array(rows)) => rows
                    .iter()
                    .map(|i| format!("{} {}", i["sku"].as_str().unwrap_or("?"), i["available"]))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => s("?"),
            },
            Err(_) => s("pool unreachable"),
        };
        let (sold, refused) = {
            let t = lock(&tally);
            (t.acked.len(), t.refused.values().sum::<u64>())
        };
        let line = format!(
            "[{:>4} s] {:<20} | {:>3} sales/s | sold {sold}, refused {refused} | left: {left}",
            start.elapsed().as_secs(),
            phase.get().name(),
            sold - last,
        );
        last = sold;
        let mut out = std::io::stdout().lock();
        if tty {
            let _ = write!(out, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

fn print_urls(v: &Venue, south: Option<&south::South>) {
    println!(
        "venue up: stand {STAND}, {} terminals, a kitchen display, the pool, the relay, the reconciler and a fake Stripe",
        v.tills.len()
    );
    println!("  mode: {}", v.mode());
    println!("  data and logs: {}", v.dir.display());
    for t in &v.tills {
        println!("  POS page     {}: {}/", t.name, t.url());
    }
    println!("  kitchen      {}/kitchen", v.kitchen.url());
    println!("  pool         {}/v1/status", v.pool.url());
    println!(
        "  admin page   {}/admin  (token: {})",
        v.relay_url(),
        v.admin
    );
    println!("  fake Stripe  {}/_stats", v.stripe_url());
    for t in south.iter().flat_map(|so| &so.tills) {
        println!("  POS page     {} (stand south): {}/", t.name, t.url());
    }
}

async fn venue(
    a: &VenueArgs,
    programs: &Programs,
    dir: &Path,
    children: Children,
    lan: Option<Arc<Lan>>,
) -> Result<Outcome> {
    let started = Instant::now();
    println!(
        "starting a venue in {} ({} terminals, policy {}, seed {})",
        dir.display(),
        a.terminals,
        a.policy.name(),
        a.seed
    );
    let v = set_up(a, programs, dir, children, lan).await?;
    wait_ready(&v).await?;
    let south = if a.south_terminals > 0 {
        Some(south::start(&v, a, a.terminals + 2).await?)
    } else {
        None
    };
    print_urls(&v, south.as_ref());
    println!("  up in {:.1} s", started.elapsed().as_secs_f64());

    let seen: SharedSeen = Arc::default();
    let tally: SharedTally = Arc::default();
    let south_tally: SharedTally = Arc::default();
    let phase = Arc::new(SharedPhase::default());
    let mut watchers = tokio::task::JoinSet::new();
    watchers.spawn(watch_kitchen(v.http.clone(), v.kitchen.url(), seen.clone()));
    watchers.spawn(watch_relay(
        v.http.clone(),
        v.relay_url(),
        v.viewer.clone(),
        seen.clone(),
    ));

    let rush_ms = a.rush_secs * 1000;
    let pace = Pace::new(a.terminals, rush_ms);
    let start = Instant::now();
    let end = start + Duration::from_millis(rush_ms);
    watchers.spawn(progress(
        v.http.clone(),
        v.pool.url(),
        start,
        phase.clone(),
        tally.clone(),
    ));
    let mut sellers = tokio::task::JoinSet::new();
    for (i, t) in v.tills.iter().enumerate() {
        sellers.spawn(
            Seller {
                terminal: i,
                api: t.url(),
                stripe: v.stripe_url(),
                rng: Seller::new(a.seed, i),
                think_ms: pace.think_ms,
                end,
                phase: phase.clone(),
                tally: tally.clone(),
                http: v.http.clone(),
            }
            .run(),
        );
    }
    if let Some(so) = &south {
        let pace = Pace::new(so.tills.len(), rush_ms);
        for (i, t) in so.tills.iter().enumerate() {
            sellers.spawn(
                Seller {
                    terminal: i,
                    api: t.url(),
                    stripe: v.stripe_url(),
                    // Streams of their own, apart from the first stand's.
                    rng: Seller::new(a.seed, MAX_TERMINALS + i),
                    think_ms: pace.think_ms,
                    end,
                    phase: phase.clone(),
                    tally: south_tally.clone(),
                    http: v.http.clone(),
                }
                .run(),
            );
        }
    }
    let cut_at = start + Duration::from_millis((rush_ms - a.outage_secs() * 1000) / 2);
    let heal_at = cut_at + Duration::from_secs(a.outage_secs());
    tokio::time::sleep_until(cut_at.into()).await;
    v.cut()?;
    phase.set(Phase::InternetDown);
    tokio::time::sleep_until(heal_at.into()).await;
    v.heal()?;
    let healed = Instant::now();
    phase.set(Phase::Healed);
    while sellers.join_next().await.is_some() {}
    phase.set(Phase::Settling);
    let rush_took = start.elapsed();

    // Settle: every acknowledged sale reaches the store of record, the relay holds every
    // change the pool holds, and every oversold unit is refunded or listed for a cash refund.
    let acked: Vec<String> = lock(&tally).acked.keys().cloned().collect();
    let settle = v
        .until(
            SETTLE_TIMEOUT_MS,
            "every acknowledged sale in the relay's store",
            || async {
                let s = seen_lock(&seen);
                acked
                    .iter()
                    .all(|id| s.relay.contains_key(id))
                    .then_some(())
            },
        )
        .await;
    let pool_url = v.pool.url();
    let changes = match &settle {
        Ok(()) => v
            .until(
                SETTLE_TIMEOUT_MS,
                "the relay to hold every change the pool holds",
                || async {
                    let held =
                        v.get(&format!("{pool_url}/v1/status"), None).await?["changes"].as_u64()?;
                    let stands = v.relay_get("/v1/stands").await?;
                    let at = stands.as_array()?.iter().find(|x| x["stand"] == STAND)?["changes"]
                        .as_u64()?;
                    (at == held).then_some((held, at))
                },
            )
            .await
            .ok(),
        Err(_) => None,
    };
    let refunds_settled = v
        .until(
            SETTLE_TIMEOUT_MS,
            "the reconciler to settle every oversold unit",
            || all_refunds_settled(&v, STAND),
        )
        .await
        .is_ok();
    let south_acked: Vec<String> = lock(&south_tally).acked.keys().cloned().collect();
    let south_settled = match &south {
        None => true,
        Some(_) => {
            v.until(
                SETTLE_TIMEOUT_MS,
                "every sale of south in the relay's store",
                || async {
                    let rows = v.relay_sales(south::SOUTH).await?;
                    let ids: std::collections::BTreeSet<&str> =
                        rows.iter().filter_map(|r| r["sale_id"].as_str()).collect();
                    south_acked
                        .iter()
                        .all(|id| ids.contains(id.as_str()))
                        .then_some(())
                },
            )
            .await
            .is_ok()
                && v.until(
                    SETTLE_TIMEOUT_MS,
                    "the reconciler to settle south's oversold units",
                    || all_refunds_settled(&v, south::SOUTH),
                )
                .await
                .is_ok()
        }
    };
    if std::io::stdout().is_terminal() {
        println!();
    }
    watchers.abort_all();

    let report = Report::gather(
        &v,
        a,
        &tally,
        &seen,
        start,
        cut_at,
        heal_at,
        healed,
        rush_took,
        changes,
        refunds_settled,
    )
    .await?;
    let mut south_lines = Vec::new();
    let south_pass = match &south {
        Some(so) => south::report(&v, so, &south_tally, &mut south_lines).await? && south_settled,
        None => true,
    };
    let pass = report.print(&south_lines) && south_pass;
    println!("verdict: {}", if pass { "PASS" } else { "FAIL" });
    if let Err(e) = settle {
        println!("settling failed: {e:#}");
    }
    if a.keep {
        println!();
        print_urls(&v, south.as_ref());
        println!(
            "the venue keeps running (--keep); Ctrl-C stops every process and removes what it made"
        );
        std::future::pending::<()>().await;
    }
    Ok(if pass {
        Outcome::Passed
    } else {
        Outcome::Failed
    })
}

/// Milliseconds between two instants (0 when `b` came first).
fn ms(a: Instant, b: Instant) -> u64 {
    b.saturating_duration_since(a).as_millis() as u64
}

/// "p50 X ms, p99 Y ms, max Z ms over N", or "none".
fn spread(mut xs: Vec<u64>) -> String {
    if xs.is_empty() {
        return s("none");
    }
    xs.sort_unstable();
    let q = |p: usize| xs[(xs.len() - 1) * p / 100];
    format!(
        "p50 {} ms, p99 {} ms, max {} ms over {}",
        q(50),
        q(99),
        xs[xs.len() - 1],
        xs.len()
    )
}

/// Whether every unit stand `stand` oversold at the relay has a settled refund decision.
async fn all_refunds_settled(v: &Venue, stand: &str) -> Option<()> {
    let stock = v.relay_get(&format!("/v1/stands/{stand}/stock")).await?;
    let oversold: i64 = stock["items"]
        .as_array()?
        .iter()
        .map(|i| (-i["available"].as_i64().unwrap_or(0)).max(0))
        .sum();
    let refunds = v
        .relay_get(&format!("/v1/stands/{stand}/refunds?limit=1000"))
        .await?;
    let rows = refunds.as_array()?;
    let units: i64 = rows.iter().map(|r| r["units"].as_i64().unwrap_or(0)).sum();
    let open = rows.iter().any(|r| r["status"] == "pending");
    (units >= oversold && !open).then_some(())
}

/// Stand `stand`'s stock at the relay beside its opening stock: the units oversold in all,
/// and "sku opening→now" per item.
async fn relay_stock(v: &Venue, stand: &str, opening: &[i64]) -> Result<(i64, Vec<String>)> {
    let stock = v
        .relay_get(&format!("/v1/stands/{stand}/stock"))
        .await
        .with_context(|| format!("the relay does not give {stand}'s stock"))?;
    let items = stock["items"]
        .as_array()
        .with_context(|| format!("{stand}'s stock at the relay has no items"))?;
    let mut oversold = 0i64;
    let mut left = Vec::new();
    for (c, start_n) in CATALOG.iter().zip(opening) {
        let avail = items
            .iter()
            .find(|i| i["sku"] == c.0)
            .and_then(|i| i["available"].as_i64())
            .with_context(|| format!("{stand}'s stock at the relay has no {}", c.0))?;
        oversold += (-avail).max(0);
        left.push(format!("{} {start_n}→{avail}", c.0));
    }
    Ok((oversold, left))
}

/// The exactly-once line for `stand`: every sale its terminals acknowledged is in the relay's
/// store once, with the same units; whether it holds.
async fn check_exactly_once(
    v: &Venue,
    stand: &str,
    t: &rush::Tally,
    failed: u64,
) -> Result<(String, bool)> {
    let rows = v
        .relay_sales(stand)
        .await
        .context("the relay does not list the stand's sales")?;
    let mut in_store: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for r in &rows {
        let id = r["sale_id"]
            .as_str()
            .context("a stored sale without an id")?;
        let e = in_store
            .entry(id)
            .or_insert((0, r["units"].as_i64().unwrap_or(-1)));
        e.0 += 1;
    }
    let missing: Vec<&String> = t
        .acked
        .keys()
        .filter(|id| !in_store.contains_key(id.as_str()))
        .collect();
    let twice: Vec<&&str> = in_store
        .iter()
        .filter(|(_, (n, _))| *n > 1)
        .map(|(k, _)| k)
        .collect();
    let wrong_units: Vec<&String> = t
        .acked
        .iter()
        .filter(|(id, x)| {
            in_store
                .get(id.as_str())
                .is_some_and(|(_, u)| *u != x.units)
        })
        .map(|(id, _)| id)
        .collect();
    let unacked = in_store
        .keys()
        .filter(|id| !t.acked.contains_key(**id))
        .count();
    let exactly_once = !t.acked.is_empty()
        && missing.is_empty()
        && twice.is_empty()
        && wrong_units.is_empty()
        && t.acked_twice.is_empty()
        && (unacked as u64) <= failed;
    let mut line = format!(
        "exactly once: {} — {} acknowledged sales, {} sales in the relay's store; {} missing, {} stored twice, {} with other units, {} stored but never acknowledged (requests unanswered: {failed})",
        if exactly_once { "ok" } else { "FAILED" },
        t.acked.len(),
        rows.len(),
        missing.len(),
        twice.len(),
        wrong_units.len(),
        unacked,
    );
    if !missing.is_empty() {
        let first: Vec<&str> = missing.iter().take(5).map(|x| x.as_str()).collect();
        line.push_str(&format!("; missing, first: {}", first.join(", ")));
    }
    Ok((line, exactly_once))
}

struct Report {
    lines: Vec<String>,
    exactly_once: bool,
    strict_ok: Option<bool>,
    settled: bool,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    async fn gather(
        v: &Venue,
        a: &VenueArgs,
        tally: &SharedTally,
        seen: &SharedSeen,
        start: Instant,
        cut_at: Instant,
        heal_at: Instant,
        healed: Instant,
        rush_took: Duration,
        changes: Option<(u64, u64)>,
        refunds_settled: bool,
    ) -> Result<Self> {
        let mut l = Vec::new();
        let t = lock(tally);
        let seen = seen_lock(seen);
        l.push(format!(
            "policy {}, seed {}, {} terminals, rush {} s with the internet down from {} s to {} s",
            a.policy.name(),
            a.seed,
            a.terminals,
            a.rush_secs,
            ms(start, cut_at) / 1000,
            ms(start, heal_at) / 1000,
        ));
        l.push(format!("mode: {}", v.mode()));
        let down: Vec<&Acked> = t
            .acked
            .values()
            .filter(|x| x.phase == Phase::InternetDown)
            .collect();
        let offline = t.acked.values().filter(|x| x.offline).count();
        let card = t.acked.values().filter(|x| x.card).count();
        l.push(format!(
            "sales: {} acknowledged ({} units, {} by card, {} cash), {:.1} sales/s; {} while the internet was down, {} marked offline",
            t.acked.len(),
            t.units_sold,
            card,
            t.acked.len() - card,
            t.acked.len() as f64 / rush_took.as_secs_f64().max(0.001),
            down.len(),
            offline,
        ));
        let refused: u64 = t.refused.values().sum();
        let why: Vec<String> = t.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        l.push(format!(
            "refusals: {refused}{}",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join(", "))
            }
        ));
        let failed: u64 = t.failed.values().sum();
        let fw: Vec<String> = t.failed.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        l.push(format!(
            "unanswered requests: {failed}{}",
            if fw.is_empty() {
                String::new()
            } else {
                format!(" ({})", fw.join(", "))
            }
        ));
        for (i, till) in v.tills.iter().enumerate() {
            let n = t.acked.values().filter(|x| x.terminal == i).count();
            let d = down.iter().filter(|x| x.terminal == i).count();
            l.push(format!(
                "  {}: {n} sales, {d} with the internet down",
                till.name
            ));
        }

        // Propagation, as seen from outside.
        l.push(format!(
            "answer time (POST to 201): {}",
            spread(t.acked.values().map(|x| ms(x.sent, x.acked)).collect())
        ));
        l.push(format!(
            "to the kitchen display over the mesh (201 to its live feed): {}",
            spread(
                t.acked
                    .iter()
                    .filter_map(|(id, x)| seen.kitchen.get(id).map(|k| ms(x.acked, *k)))
                    .collect()
            )
        ));
        let missing_kitchen = t
            .acked
            .keys()
            .filter(|id| !seen.kitchen.contains_key(*id))
            .count();
        if missing_kitchen > 0 {
            l.push(format!(
                "  {missing_kitchen} acknowledged sales never showed on the kitchen feed"
            ));
        }
        // A sale reached the store while the internet was up, or it was caught by the cut (made
        // during it, or made before it and not yet stored when the relay went).
        let caught = |id: &String, x: &Acked| {
            x.phase == Phase::InternetDown
                || (x.phase == Phase::Online && seen.relay.get(id).is_none_or(|at| *at >= cut_at))
        };
        l.push(format!(
            "to the relay's store with the internet up (201 to listed; polled every {RELAY_POLL_MS} ms): {}",
            spread(
                t.acked
                    .iter()
                    .filter(|(id, x)| !caught(id, x))
                    .filter_map(|(id, x)| seen.relay.get(id).map(|r| ms(x.acked, *r)))
                    .collect()
            )
        ));
        let held_back: Vec<Option<&Instant>> = t
            .acked
            .iter()
            .filter(|(id, x)| caught(id, x))
            .map(|(id, _)| seen.relay.get(id))
            .collect();
        match held_back.iter().copied().collect::<Option<Vec<_>>>() {
            Some(at) if !at.is_empty() => l.push(format!(
                "the {} sales the cut held back were all in the relay's store {:.1} s after the relay came back",
                at.len(),
                at.iter().map(|x| ms(healed, **x)).max().unwrap_or(0) as f64 / 1000.0
            )),
            Some(_) => l.push(s("the cut held back no sale")),
            None => l.push(format!(
                "{} of the {} sales the cut held back never reached the relay's store",
                held_back.iter().filter(|x| x.is_none()).count(),
                held_back.len()
            )),
        }
        match changes {
            Some((held, at)) => l.push(format!(
                "changes: the pool holds {held}, the relay's store {at}"
            )),
            None => l.push(s("changes: the relay did not catch up with the pool")),
        }

        // The store of record, read through the relay's admin API.
        let (line, exactly_once) = check_exactly_once(v, STAND, &t, failed).await?;
        l.push(line);

        let (oversold, left) = relay_stock(v, STAND, &v.stock).await?;
        l.push(format!(
            "stock at the relay (start→now): {}",
            left.join(", ")
        ));
        let refunds = v
            .relay_get(&format!("/v1/stands/{STAND}/refunds?limit=1000"))
            .await
            .context("the relay does not list the stand's refunds")?;
        let refunds = refunds.as_array().cloned().unwrap_or_default();
        let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
        for r in &refunds {
            *by_status
                .entry(r["status"].as_str().unwrap_or("?").to_owned())
                .or_default() += r["units"].as_i64().unwrap_or(0);
        }
        let refunded: i64 = by_status.values().sum();
        l.push(format!(
            "oversell: {oversold} units; refunds decided: {refunded} units{}{}",
            if by_status.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    by_status
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            if refunds_settled {
                ""
            } else {
                " (not settled in time)"
            },
        ));
        let strict_ok =
            (a.policy == VenuePolicy::Strict).then_some(oversold == 0 && refunds.is_empty());
        l.push(match strict_ok {
            Some(true) => s("no oversell under strict: ok — every item's available is at least 0 in the relay's store and nothing was refunded"),
            Some(false) => format!("no oversell under strict: FAILED — {oversold} units oversold, {} refunds decided", refunds.len()),
            None => s("no oversell under strict: not applicable (policy optimistic)"),
        });
        match v
            .relay_get(&format!("/v1/stands/{STAND}/audit/verify"))
            .await
        {
            Some(x) => l.push(format!("audit trail at the relay: {x}")),
            None => l.push(s("audit trail at the relay: could not be read")),
        }
        let settled = changes.is_some() && refunds_settled;
        Ok(Self {
            lines: l,
            exactly_once,
            strict_ok,
            settled,
        })
    }

    /// Print it, then `more`; whether the first stand passed.
    fn print(&self, more: &[String]) -> bool {
        println!("== venue report");
        for l in self.lines.iter().chain(more) {
            println!("{l}");
        }
        self.exactly_once && self.strict_ok != Some(false) && self.settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        venue: VenueArgs,
    }

    fn args(a: &[&str]) -> VenueArgs {
        Cli::parse_from(std::iter::once("venue").chain(a.iter().copied())).venue
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        assert!(args(&[]).check().is_ok());
        let short = args(&["--rush-secs", "20"]);
        assert!(short.check().is_ok());
        assert_eq!(short.outage_secs(), 6, "a third of the rush");
        for (bad, says) in [
            (&["--terminals", "0"][..], "--terminals"),
            (&["--terminals", "33"][..], "--terminals"),
            (&["--south-terminals", "40"][..], "--south-terminals"),
            (&["--rush-secs", "5"][..], "--rush-secs"),
            (&["--rush-secs", "18446744073709551615"][..], "--rush-secs"),
            (
                &["--outage-secs", "18446744073709551615"][..],
                "--outage-secs",
            ),
            (&["--outage-secs", "0"][..], "--outage-secs"),
            (
                &["--rush-secs", "30", "--outage-secs", "21"][..],
                "--outage-secs",
            ),
        ] {
            let e = args(bad).check().expect_err("refused");
            assert!(e.to_string().contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_rush_is_stocked_for_the_sales_its_length_brings() {
        for terminals in [1, 6, MAX_TERMINALS] {
            let mut last = 0;
            for rush_ms in [6_000, 60_000, 3_600_000] {
                let p = rush::Pace::new(terminals, rush_ms);
                assert!(
                    p.expected_sales > last,
                    "{terminals} terminals over {rush_ms} ms: {p:?}"
                );
                last = p.expected_sales;
                assert!(p.stock().iter().all(|n| *n >= 5), "{p:?}");
            }
        }
    }

    #[test]
    fn spread_reads_percentiles_of_what_it_is_given() {
        assert_eq!(spread(vec![]), "none");
        let xs: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(spread(xs), "p50 50 ms, p99 99 ms, max 100 ms over 100");
    }
}
