//! `halftime-relay`: see the library documentation.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use halftime_ledger::{PublicKey, StandId};
use halftime_relay::server::{App, router};
use halftime_relay::stand::now_ms;
use halftime_relay::store::{AdminRole, Store};
use std::net::SocketAddr;

/// The embedded default: a SQLite file in the working directory.
const DEFAULT_DATABASE: &str = "sqlite:halftime-relay.db";

#[derive(Parser, Debug)]
#[command(
    name = "halftime-relay",
    version,
    about = "The Halftime relay: the stands' store of record, their uplink and the admins' door.",
    long_about = "The Halftime relay: the stands' store of record, their uplink and the admins' door.\n\n\
Serve a stand whose pool is a stand device:\n  \
1. halftime-relay key                                   (prints the relay's public key)\n  \
2. on the pool: halftime-peer enrol --replica KEY=relay --role relay\n  \
3. halftime-relay stand add --stand S --pool-key POOL_KEY\n  \
4. halftime-relay serve --listen 0.0.0.0:8090\n  \
5. on each device: halftime-peer run ... --relay ws://RELAY:8090\n\n\
--database takes postgres://USER@HOST/DB (production) or sqlite:PATH (the default, \
sqlite:halftime-relay.db). Every instance on one database shares the relay's key."
)]
struct Cli {
    /// postgres://… or sqlite:PATH.
    #[arg(long, global = true, default_value = DEFAULT_DATABASE)]
    database: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the uplink and the admin API.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Rewrite a stand's snapshot after this many new changes, so a restart loads it and
        /// replays only what came after (0: never; every stored change is replayed).
        #[arg(long, default_value_t = halftime_relay::stand::SNAPSHOT_EVERY)]
        snapshot_every: usize,
    },
    /// Print the relay's public key (made on first use), to enrol it on a stand's pool.
    Key,
    /// Add a stand to serve, or list those served.
    Stand {
        #[command(subcommand)]
        cmd: StandCmd,
    },
    /// Make admin tokens (printed once, stored only as a hash).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand, Debug)]
enum StandCmd {
    /// Serve a stand whose pool is a stand device (enrol the relay's key on that pool first).
    Add {
        #[arg(long)]
        stand: String,
        /// The pool's public key (64 hex digits).
        #[arg(long)]
        pool_key: String,
    },
    /// List the stands served.
    List,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Make a token; it is printed once and stored only as a hash.
    Create {
        /// viewer (read), manager (stock operations) or admin (everything).
        #[arg(long)]
        role: String,
        /// Who or what it is for.
        #[arg(long, default_value = "")]
        name: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,automerge=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let store = Store::open(&cli.database)
        .await
        .with_context(|| format!("opening the database {}", cli.database))?;
    match cli.cmd {
        Cmd::Key => {
            let k = store.relay_key().await?;
            println!("public key: {}", k.public());
            println!("replica:    {}", k.replica_id());
            println!(
                "enrol it on a stand's pool: halftime-peer enrol --data POOL_DIR --replica {}=relay --role relay",
                k.public()
            );
        }
        Cmd::Stand {
            cmd: StandCmd::Add { stand, pool_key },
        } => {
            let stand = StandId::new(&stand).map_err(|e| anyhow::anyhow!("--stand: {e}"))?;
            let pool_key: PublicKey = pool_key
                .parse()
                .map_err(|e| anyhow::anyhow!("--pool-key: {e}"))?;
            let row = halftime_relay::store::StandRow {
                stand: stand.clone(),
                pool_key,
                placement: halftime_relay::store::Placement::Device,
                pool_secret: None,
                psk: None,
            };
            store.add_stand(&row, now_ms()).await?;
            println!("serving stand {stand} (pool {})", pool_key.replica_id());
        }
        Cmd::Stand {
            cmd: StandCmd::List,
        } => {
            for s in store.stands().await? {
                println!(
                    "{}\t{:?}\tpool {}\t{} changes",
                    s.stand,
                    s.placement,
                    s.pool_key.replica_id(),
                    store.change_count(&s.stand).await?
                );
            }
        }
        Cmd::Token {
            cmd: TokenCmd::Create { role, name },
        } => {
            let Some(role) = AdminRole::parse(&role) else {
                bail!("--role must be viewer, manager or admin, not {role:?}");
            };
            let token = store.create_token(&name, role, now_ms()).await?;
            println!("{token}");
            eprintln!("a {} token; it is shown only now", role.as_str());
        }
        Cmd::Serve {
            listen,
            snapshot_every,
        } => {
            let app = App::open(store, snapshot_every).await?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            tracing::info!(
                %listen,
                relay = %app.relay_key.replica_id(),
                public_key = %app.relay_key.public(),
                "relay serving"
            );
            axum::serve(listener, router(app))
                .with_graceful_shutdown(shutdown())
                .await?;
            tracing::info!("relay stopped");
        }
    }
    Ok(())
}

/// SIGINT or SIGTERM. Each stand commits before it acknowledges anything, so nothing
/// acknowledged is lost however the process stops.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("stopping");
}
