//! Databases for tests: a fresh SQLite file or a fresh PostgreSQL database per
//! test, so runs never collide; dropped (file deleted, database dropped) on drop.

use std::time::Duration;

use store::{Backend, Store};
use tempfile::TempDir;

/// The PostgreSQL server tests use: `DATABASE_URL` (set by
/// `tests/setup/ensure-tools.sh`), default `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of its own for one test.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    backend: Backend,
    /// Holds the SQLite file's directory.
    _dir: Option<TempDir>,
    /// The PostgreSQL database to drop.
    pg_name: Option<String>,
}

impl TestDb {
    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::Builder::new()
            .prefix("hookbus-db-")
            .tempdir()
            .expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("pagoda.db").display());
        TestDb {
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
            pg_name: None,
        }
    }

    /// A fresh PostgreSQL database on the test server.
    ///
    /// # Panics
    ///
    /// When the server does not answer (the test command starts one).
    pub async fn postgres() -> TestDb {
        let admin = postgres_admin_url();
        let name = format!("hookbus_t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = connect_admin(&admin).await;
        sqlx::Executor::execute(
            &mut conn,
            sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name} at {admin}: {e}"));
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        TestDb {
            url: format!("{base}/{name}"),
            backend: Backend::Postgres,
            _dir: None,
            pg_name: Some(name),
        }
    }

    /// A fresh database of the given kind.
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its kind.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A store on it, migrated.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url));
        store.migrate().await.expect("migrations");
        store
    }
}

async fn connect_admin(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("PostgreSQL is not reachable at {url} (set DATABASE_URL): {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let admin = postgres_admin_url();
        // Drop runs outside any runtime guarantee: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut conn = connect_admin(&admin).await;
                let _ = sqlx::Executor::execute(
                    &mut conn,
                    sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")),
                )
                .await;
            });
        })
        .join();
    }
}
