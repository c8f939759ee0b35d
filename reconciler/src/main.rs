//! `halftime-reconciler`: refunds every unit a stand sold beyond its stock, exactly once.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use halftime_reconciler::db::Db;
use halftime_reconciler::fake_stripe::FakeStripe;
use halftime_reconciler::pay::Payer;
use halftime_reconciler::worker::{self, Config, Metrics};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "halftime-reconciler",
    version,
    about = "Refunds every unit a stand sold beyond its stock, exactly once, through Stripe",
    long_about = "Reads the relay's store of record. Whenever an item's stock at a stand is below \
zero it decides which sales are refunded (the latest ones; see docs/ARCHITECTURE.md), writes \
each decision with an outbox row, and pays card sales back through Stripe's refund API with an \
idempotency key derived from the decision. Cash sales go to the stand manager's manual list. \
Several reconcilers may run on one Postgres database."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Decide and pay refunds until stopped (SIGTERM or Ctrl-C finish the pass under way).
    Run {
        /// The relay's database: postgres://… or sqlite:PATH.
        #[arg(long, default_value = "sqlite:halftime-relay.db")]
        database: String,
        /// Stripe's API base URL (the fake's, for tests and demos).
        #[arg(long, default_value = "https://api.stripe.com/")]
        stripe_url: String,
        /// Stripe secret key.
        #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
        stripe_key: String,
        /// Where `/metrics` is served.
        #[arg(long, default_value = "127.0.0.1:9190")]
        listen: SocketAddr,
        /// This reconciler's name in leases and logs (default: host and process id).
        #[arg(long)]
        id: Option<String>,
        /// Longest a Stripe call may take before it counts as failed and is retried.
        #[arg(long, default_value_t = 10_000)]
        stripe_timeout_ms: u64,
        /// How long a leased refund stays with this reconciler (must exceed the timeout).
        #[arg(long, default_value_t = 15_000)]
        lease_ms: u64,
        /// Attempts before a refund becomes a dead letter.
        #[arg(long, default_value_t = 12)]
        max_attempts: i64,
        /// First retry delay; doubles per attempt up to --backoff-max-ms, ±50 % jitter.
        #[arg(long, default_value_t = 500)]
        backoff_base_ms: u64,
        /// Longest retry delay.
        #[arg(long, default_value_t = 30_000)]
        backoff_max_ms: u64,
        /// Pause between passes when nothing is due.
        #[arg(long, default_value_t = 500)]
        tick_ms: u64,
        /// Refunds paid per pass (concurrently).
        #[arg(long, default_value_t = 32)]
        batch: i64,
    },
    /// Serve a stand-in for Stripe's payment-intent and refund API (tests and demos).
    FakeStripe {
        #[arg(long, default_value = "127.0.0.1:12111")]
        listen: SocketAddr,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::FakeStripe { listen } => {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!(addr = %l.local_addr()?, "fake Stripe up");
                axum::serve(l, FakeStripe::default().router())
                    .with_graceful_shutdown(stop_signal())
                    .await?;
                Ok(())
            }
            Cmd::Run {
                database,
                stripe_url,
                stripe_key,
                listen,
                id,
                stripe_timeout_ms,
                lease_ms,
                max_attempts,
                backoff_base_ms,
                backoff_max_ms,
                tick_ms,
                batch,
            } => {
                if lease_ms <= stripe_timeout_ms {
                    bail!("--lease-ms ({lease_ms}) must exceed --stripe-timeout-ms ({stripe_timeout_ms}): a lease must outlive the call it covers");
                }
                if max_attempts < 1 || batch < 1 {
                    bail!("--max-attempts and --batch must be at least 1");
                }
                stripe_url
                    .parse::<axum::http::Uri>()
                    .ok()
                    .filter(|u| u.scheme().is_some() && u.host().is_some())
                    .with_context(|| format!("--stripe-url {stripe_url:?} is not a URL"))?;
                let db = Db::open(&database)
                    .await
                    .with_context(|| format!("cannot open the database {database}"))?;
                let id = id.unwrap_or_else(|| {
                    format!(
                        "{}-{}",
                        std::env::var("HOSTNAME").unwrap_or_else(|_| "reconciler".into()),
                        std::process::id()
                    )
                });
                let cfg = Config {
                    id: id.clone(),
                    tick: Duration::from_millis(tick_ms),
                    lease: Duration::from_millis(lease_ms),
                    batch,
                    max_attempts,
                    backoff_base: Duration::from_millis(backoff_base_ms),
                    backoff_max: Duration::from_millis(backoff_max_ms),
                };
                let payer = Payer::new(
                    &stripe_url,
                    &stripe_key,
                    Duration::from_millis(stripe_timeout_ms),
                );
                let metrics = Arc::new(Metrics::default());
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                let app = metrics_router(db.clone(), metrics.clone());
                tokio::spawn(async move { axum::serve(l, app).await });
                let (stop_tx, stop_rx) = watch::channel(false);
                tokio::spawn(async move {
                    stop_signal().await;
                    let _ = stop_tx.send(true);
                });
                tracing::info!(%id, %database, %stripe_url, metrics = %listen, "reconciler up");
                let wake = Arc::new(tokio::sync::Notify::new());
                if database.starts_with("postgres://") || database.starts_with("postgresql://") {
                    tokio::spawn(worker::listen_changes(database.clone(), wake.clone()));
                }
                worker::run(db, payer, cfg, metrics, wake, stop_rx).await;
                tracing::info!("stopped");
                Ok(())
            }
        }
    })
}

fn metrics_router(db: Db, metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (db, metrics) = (db.clone(), metrics.clone());
            async move {
                let counts = db.counts().await.unwrap_or_default();
                metrics.text(&counts)
            }
        }),
    )
}

async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = term => "SIGTERM",
    };
    tracing::info!(signal, "stopping");
}
