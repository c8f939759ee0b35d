#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Test databases (a SQLite file, or a database of its own on the machine's Postgres) and
//! polling.

use sqlx::Connection;
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
