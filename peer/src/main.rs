//! `halftime-peer`: see the library documentation for the flow.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use halftime_ledger::allocation::plan_allocation;
use halftime_ledger::{
    Allocation, CatalogItem, EventId, Ledger, Policy, PublicKey, Role, SignedChange, Sku, StandId,
    StandInfo,
};
use halftime_peer::store::{Loaded, StandSettings, Store, load_ledger};
use halftime_peer::{api, net, node};
use libp2p::Multiaddr;
use rand::RngCore;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::{broadcast, mpsc, oneshot};

#[derive(Parser, Debug)]
#[command(
    name = "halftime-peer",
    version,
    about = "A Halftime stand replica: terminal, kitchen display or stand pool.",
    long_about = "A Halftime stand replica: terminal, kitchen display or stand pool.\n\nSet up a stand without the relay:\n  1. on every device: halftime-peer init --data DIR            (prints its public key)\n  2. on the pool:     halftime-peer create-stand --data DIR ... --terminal KEY=name ...\n  3. on each device:  halftime-peer join --data DIR --stand S --pool-key K --psk P\n  4. everywhere:      halftime-peer run --data DIR\nSee docs/OPERATING.md."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create this replica's key in DIR (once) and print its public key and PeerId.
    Init {
        /// Data folder (holds replica.redb).
        #[arg(long)]
        data: PathBuf,
    },
    /// Create a stand as its pool: catalog, starting stock, policy and enrolled replicas.
    CreateStand {
        /// Data folder of the pool replica (after `init`).
        #[arg(long)]
        data: PathBuf,
        /// Stand id (letters, digits, '-', '_', '.').
        #[arg(long)]
        stand: String,
        /// Event id.
        #[arg(long)]
        event: String,
        /// Venue name.
        #[arg(long, default_value = "")]
        venue: String,
        /// strict (never oversell) or optimistic (bounded offline overdraft).
        #[arg(long, default_value = "strict")]
        policy: String,
        /// proportional or velocity.
        #[arg(long, default_value = "proportional")]
        allocation: String,
        /// LOW_STOCK threshold, percent of each item's starting stock.
        #[arg(long, default_value_t = 10)]
        low_stock_pct: u8,
        /// An item: SKU=NAME:PRICE_CENTS:STARTING_STOCK (repeat).
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// A terminal to enrol: PUBLIC_KEY=NAME (repeat).
        #[arg(long = "terminal")]
        terminals: Vec<String>,
        /// A kitchen display to enrol: PUBLIC_KEY=NAME (repeat).
        #[arg(long = "kitchen")]
        kitchens: Vec<String>,
        /// The stand's private-network key (64 hex digits); generated when absent.
        #[arg(long)]
        psk: Option<String>,
    },
    /// Enrol one more replica into a stand this pool created.
    Enrol {
        /// Data folder of the pool.
        #[arg(long)]
        data: PathBuf,
        /// PUBLIC_KEY=NAME.
        #[arg(long)]
        replica: String,
        /// terminal, kitchen or relay (a relay replicates and stores, writes nothing).
        #[arg(long, default_value = "terminal")]
        role: String,
    },
    /// Retire a lost terminal and take its last known rights back to the pool, on the pool's
    /// data folder while the pool is stopped. A running pool does the same, checked against
    /// every connected replica's view, at `POST /v1/replicas/{id}/reclaim`: prefer that. If
    /// the terminal was in fact still selling offline, those sales show up as oversell.
    Reclaim {
        /// Data folder of the pool.
        #[arg(long)]
        data: PathBuf,
        /// The replica id of the lost terminal (16 hex digits, see `/v1/status`).
        #[arg(long)]
        replica: String,
    },
    /// Make this replica a member of a stand (it learns the rest from the pool).
    Join {
        /// Data folder (after `init`).
        #[arg(long)]
        data: PathBuf,
        /// Stand id.
        #[arg(long)]
        stand: String,
        /// The pool's public key.
        #[arg(long)]
        pool_key: String,
        /// The stand's private-network key.
        #[arg(long)]
        psk: String,
    },
    /// Run the replica: mesh, storage and the local API.
    Run {
        /// Data folder.
        #[arg(long)]
        data: PathBuf,
        /// Mesh listen address.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
        listen: Multiaddr,
        /// Local API address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        api: SocketAddr,
        /// A peer to dial directly (repeat), for networks that block multicast.
        #[arg(long = "peer")]
        peers: Vec<Multiaddr>,
        /// Do not use mDNS discovery.
        #[arg(long)]
        no_mdns: bool,
        /// Version-vector exchange interval.
        #[arg(long, default_value_t = node::DEFAULT_SYNC_INTERVAL_MS)]
        sync_interval_ms: u64,
        /// Longest a sale waits while this terminal asks other replicas for rights, before it
        /// is refused (the POS shows "checking stand stock" meanwhile).
        #[arg(long, default_value_t = halftime_engine::SALE_WAIT_MS)]
        sale_wait_ms: u64,
        /// Write a snapshot of the replica after this many new changes (and on every clean
        /// stop), so a restart loads it and replays only what came after. 0: only on stop.
        #[arg(long, default_value_t = node::SNAPSHOT_EVERY)]
        snapshot_every: u64,
        /// The relay (wss://HOST or ws://HOST:PORT): keep an uplink to it whenever it can be
        /// reached, so that replicas on different networks converge through it while the
        /// internet is up. Repeat for several instances of one relay: they are tried in turn.
        #[arg(long = "relay")]
        relay: Vec<String>,
        /// A PEM file of CA certificates to trust for wss:// relays besides the system's (a
        /// venue's own CA, or the relay's self-signed certificate).
        #[arg(long, requires = "relay")]
        relay_ca: Option<PathBuf>,
        /// The relay's public key (`halftime-relay key`), trusted before the pool's enrolment
        /// of it reaches this device (a device that never met the pool on the stand network).
        #[arg(long, requires = "relay")]
        relay_key: Option<PublicKey>,
    },
}

fn store_at(data: &std::path::Path) -> Result<Store> {
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    Store::open(&data.join("replica.redb"))
        .with_context(|| format!("cannot open the store in {}", data.display()))
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b
}

fn parse_member(s: &str) -> Result<(PublicKey, String)> {
    let (k, name) = s.split_once('=').context("expected PUBLIC_KEY=NAME")?;
    let key: PublicKey = k.parse().with_context(|| format!("bad public key {k:?}"))?;
    Ok((key, name.to_owned()))
}

fn parse_item(s: &str, pct: u8) -> Result<(CatalogItem, u64)> {
    let (sku, rest) = s
        .split_once('=')
        .context("expected SKU=NAME:PRICE_CENTS:STOCK")?;
    let parts: Vec<&str> = rest.rsplitn(3, ':').collect();
    if parts.len() != 3 {
        bail!("expected SKU=NAME:PRICE_CENTS:STOCK, got {s:?}");
    }
    let stock: u64 = parts[0].parse().context("stock must be a whole number")?;
    let price: u64 = parts[1].parse().context("price must be whole cents")?;
    let low = (stock * u64::from(pct)).div_ceil(100);
    Ok((
        CatalogItem {
            sku: Sku::new(sku)?,
            name: parts[2].to_owned(),
            price_cents: price,
            low_stock_at: low,
        },
        stock,
    ))
}

fn now() -> u64 {
    node::now_ms()
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn,automerge=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init { data } => {
            let store = store_at(&data)?;
            let key = store.key_or_init(random32)?;
            println!("replica id: {}", key.replica_id());
            println!("public key: {}", key.public());
            println!("peer id:    {}", key.public().peer_id()?);
            Ok(())
        }
        Cmd::CreateStand {
            data,
            stand,
            event,
            venue,
            policy,
            allocation,
            low_stock_pct,
            items,
            terminals,
            kitchens,
            psk,
        } => {
            let mut store = store_at(&data)?;
            let key = store
                .key()?
                .context("run `halftime-peer init --data DIR` first")?;
            if store.len() > 0 {
                bail!("this replica already holds a stand document");
            }
            let policy = match policy.as_str() {
                "strict" => Policy::Strict,
                "optimistic" => Policy::Optimistic,
                p => bail!("unknown policy {p:?} (strict | optimistic)"),
            };
            let allocation = match allocation.as_str() {
                "proportional" => Allocation::Proportional,
                "velocity" => Allocation::Velocity,
                a => bail!("unknown allocation {a:?} (proportional | velocity)"),
            };
            let psk = psk.unwrap_or_else(|| hex::encode(random32()));
            net::parse_psk(&psk).map_err(anyhow::Error::msg)?;
            let info = StandInfo {
                event: EventId::new(event)?,
                venue,
                stand: StandId::new(stand.clone())?,
                policy,
                allocation,
                low_stock_pct,
            };
            let t = now();
            let (mut pool, genesis) = Ledger::create_stand(key.clone(), info, "pool", t)?;
            let mut changes: Vec<SignedChange> = vec![genesis];
            let mut catalog = Vec::new();
            let mut stock = BTreeMap::new();
            for it in &items {
                let (item, n) = parse_item(it, low_stock_pct)?;
                stock.insert(item.sku.clone(), n);
                catalog.push(item);
            }
            changes.push(pool.set_catalog(catalog, t)?);
            for (list, role) in [(&terminals, Role::Terminal), (&kitchens, Role::Kitchen)] {
                for m in list {
                    let (k, name) = parse_member(m)?;
                    changes.push(pool.enrol(k, &name, role, t)?);
                }
            }
            stock.retain(|_, n| *n > 0);
            if !stock.is_empty() {
                changes.push(pool.restock(stock, "starting stock", t)?);
            }
            let plans = plan_allocation(&pool, allocation, t);
            for c in pool.execute_plans(&plans, t) {
                changes.push(c?);
            }
            store.append(&changes, true)?;
            store.set_settings(&StandSettings {
                stand: StandId::new(stand.clone())?,
                pool: key.public(),
                psk: psk.clone(),
            })?;
            println!("stand {stand} created with {} changes.", changes.len());
            println!("give every enrolled device these to join:");
            println!(
                "  halftime-peer join --data DIR --stand {stand} --pool-key {} --psk {psk}",
                key.public()
            );
            Ok(())
        }
        Cmd::Enrol {
            data,
            replica,
            role,
        } => {
            let mut store = store_at(&data)?;
            let key = store.key()?.context("no key in this data folder")?;
            let s = store.settings()?;
            let (mut pool, _) = load_ledger(&store, key, &s, now())?;
            let role = match role.as_str() {
                "terminal" => Role::Terminal,
                "kitchen" => Role::Kitchen,
                "relay" => Role::Relay,
                r => bail!("unknown role {r:?} (terminal | kitchen | relay)"),
            };
            let (k, name) = parse_member(&replica)?;
            let c = pool.enrol(k, &name, role, now())?;
            store.append(&[c], true)?;
            println!(
                "enrolled {} as {}; it syncs at the next connection",
                k.replica_id(),
                role.as_str()
            );
            Ok(())
        }
        Cmd::Reclaim { data, replica } => {
            let mut store = store_at(&data)?;
            let key = store.key()?.context("no key in this data folder")?;
            let s = store.settings()?;
            let (mut pool, _) = load_ledger(&store, key, &s, now())?;
            let rid: halftime_ledger::ReplicaId = replica.parse()?;
            let c = pool.reclaim(rid, now())?;
            store.append(&[c], true)?;
            for (sku, _) in pool.catalog() {
                println!("{sku}: pool rights now {}", pool.rights(pool.me(), sku));
            }
            println!("retired {rid}; its rights are back at the pool");
            Ok(())
        }
        Cmd::Join {
            data,
            stand,
            pool_key,
            psk,
        } => {
            let store = store_at(&data)?;
            store
                .key()?
                .context("run `halftime-peer init --data DIR` first")?;
            net::parse_psk(&psk).map_err(anyhow::Error::msg)?;
            let pool: PublicKey = pool_key.parse().context("bad pool key")?;
            store.set_settings(&StandSettings {
                stand: StandId::new(stand.clone())?,
                pool,
                psk,
            })?;
            println!(
                "joined stand {stand}; now run: halftime-peer run --data {}",
                data.display()
            );
            Ok(())
        }
        Cmd::Run {
            data,
            listen,
            api,
            peers,
            no_mdns,
            sync_interval_ms,
            sale_wait_ms,
            snapshot_every,
            relay,
            relay_key,
            relay_ca,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let cfg = node::NodeConfig {
                static_peers: peers,
                sync_interval_ms,
                sale_wait_ms,
                snapshot_every,
            };
            let uplink = Uplink {
                urls: relay,
                key: relay_key,
                ca: relay_ca,
            };
            rt.block_on(run(data, listen, api, cfg, !no_mdns, uplink))
        }
    }
}

/// Where the relay uplink goes and whom it trusts.
struct Uplink {
    urls: Vec<String>,
    key: Option<PublicKey>,
    ca: Option<PathBuf>,
}

async fn run(
    data: PathBuf,
    listen: Multiaddr,
    api_addr: SocketAddr,
    cfg: node::NodeConfig,
    mdns: bool,
    uplink: Uplink,
) -> Result<()> {
    let store = store_at(&data)?;
    let key = store
        .key()?
        .context("run `halftime-peer init --data DIR` first")?;
    let s = store.settings()?;
    let psk = net::parse_psk(&s.psk).map_err(anyhow::Error::msg)?;
    let t0 = std::time::Instant::now();
    let (ledger, loaded) = load_ledger(&store, key.clone(), &s, now())?;
    let restore_ms = t0.elapsed().as_millis() as u64;
    match &loaded {
        Loaded::Snapshot { covered, replayed } => tracing::info!(
            covered,
            replayed,
            restore_ms,
            "loaded from the snapshot and the changes stored after it"
        ),
        Loaded::Replay { changes, why } => tracing::info!(
            changes,
            restore_ms,
            snapshot = why.as_deref().unwrap_or("none"),
            "loaded by replaying every stored change"
        ),
    }
    tracing::info!(
        replica = %key.replica_id(),
        peer_id = %key.public().peer_id()?,
        stand = %s.stand,
        stand_key_fingerprint = %psk.fingerprint(),
        changes = ledger.len(),
        restore_ms,
        "starting"
    );
    let mut swarm =
        net::build_swarm(key.to_libp2p(), psk, mdns).map_err(|e| anyhow::anyhow!("{e}"))?;
    swarm
        .listen_on(listen.clone())
        .with_context(|| format!("cannot listen on {listen}"))?;
    let (live, _) = broadcast::channel(node::LIVE_QUEUE_LEN);
    let (cmd_tx, cmd_rx) = mpsc::channel(node::COMMAND_QUEUE_LEN);
    let mut node =
        node::Node::new(ledger, store, swarm, cfg, live.clone()).snapshot_covers(loaded.covered());
    if !uplink.urls.is_empty() {
        let urls = uplink
            .urls
            .iter()
            .map(|r| halftime_peer::uplink::uplink_url(r, &s.stand))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let tls = if urls.iter().any(|u| u.starts_with("wss://")) {
            Some(
                halftime_peer::uplink::tls_config(uplink.ca.as_deref())
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(node::COMMAND_QUEUE_LEN);
        node = node.with_uplink(rx, uplink.key);
        tokio::spawn(halftime_peer::uplink::run(
            urls,
            key.clone(),
            s.stand.clone(),
            tls,
            tx,
        ));
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut node_task = tokio::spawn(node.run(cmd_rx, stop_rx));
    let app = api::router(api::AppState { cmds: cmd_tx, live });
    let listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .with_context(|| format!("cannot bind the API on {api_addr}"))?;
    tracing::info!(api = %listener.local_addr()?, "local API up");
    let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    let mut server = tokio::spawn(async move { serve.await });
    tokio::select! {
        r = &mut server => {
            let _ = stop_tx.send(());
            let node = node_task.await;
            r??;
            match node {
                Ok(Err(e)) => bail!(e),
                _ => Ok(()),
            }
        }
        r = &mut node_task => {
            // Let the server finish writing the answers already given (a refusal that says why)
            // before the process stops.
            tokio::time::sleep(std::time::Duration::from_millis(FATAL_GRACE_MS)).await;
            match r {
                Ok(Err(e)) => bail!(e),
                Ok(Ok(())) => Ok(()),
                Err(e) => bail!("the node task failed: {e}"),
            }
        }
    }
}

/// SIGINT (Ctrl-C) or SIGTERM (`kill`, a service manager): both stop the node the same way —
/// the API stops taking requests, the node drains what it was given and makes every change it
/// holds durable.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still stops");
                std::future::pending::<()>().await;
            }
        }
    };
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = term => "SIGTERM",
    };
    tracing::info!(signal, "stopping");
}

/// Time the API gets to deliver its last answers after the node stopped on a storage fault.
const FATAL_GRACE_MS: u64 = 500;
