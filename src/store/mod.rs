//! The counting store: which endpoints are counted, the database backends, and the group-commit
//! batcher that turns many concurrent accesses into one commit.

pub mod batcher;
mod postgres;
mod sqlite;

pub use crate::endpoints::{CountedEndpoint, PerEndpoint, COUNTED_ENDPOINTS};

pub use postgres::connect_options as pg_connect_options;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool};

use crate::config::{DatabaseSettings, DatabaseUrl};

/// One stored row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EndpointRecord {
    pub endpoint: String,
    pub access_count: i64,
    pub first_accessed: DateTime<Utc>,
    pub last_accessed: DateTime<Utc>,
}

/// A stored row as both backends select it: (endpoint, access_count, first, last).
pub(crate) type EndpointRow = (String, i64, DateTime<Utc>, DateTime<Utc>);

impl From<EndpointRow> for EndpointRecord {
    fn from((endpoint, access_count, first_accessed, last_accessed): EndpointRow) -> Self {
        Self { endpoint, access_count, first_accessed, last_accessed }
    }
}

/// What one committed batch returns.
#[derive(Debug)]
pub struct CommittedBatch {
    /// The stored count after the commit, for every endpoint the batch incremented.
    pub counts_after: PerEndpoint<i64>,
    /// All rows as of the commit, when the batch held an access that reports them.
    pub snapshot: Option<Vec<EndpointRecord>>,
}

/// Why an access was not counted, or the database is not ready. `Display` is for the log: it can
/// hold the database's own words, which clients never see (`routes::errors` maps each variant to a
/// stable message).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("migrations pending: {0}")]
    MigrationsPending(String),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("overloaded: {0} accesses already waiting to be counted")]
    Overloaded(usize),
    #[error("service is shutting down")]
    ShuttingDown,
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Unavailable(describe_sqlx_error(&error))
    }
}

/// A short, password-free description of a database error for logs and 503 bodies.
pub fn describe_sqlx_error(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::PoolTimedOut => "no database connection available (pool timed out)".to_owned(),
        sqlx::Error::Io(io) => format!("connection error: {io}"),
        // rustls says why (`invalid peer certificate: UnknownIssuer`, `NotValidForName`, `server
        // does not support TLS`); certificates and host names are no secrets.
        sqlx::Error::Tls(e) => format!("TLS error: {e}"),
        sqlx::Error::Configuration(e) => format!("configuration: {e}"),
        other => other.to_string(),
    }
}

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

const CHECK_CLIENT_CONNECTION: &str = "SET client_connection_check_interval = 500";

/// How long a new connection may take before the database counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Database {
    /// Connects and proves the connection with one round trip, so that an unreachable database
    /// fails the start instead of the first request.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let database = match &settings.url {
            DatabaseUrl::Postgres(_) => Self::Postgres(postgres::connect(settings, CONNECT_TIMEOUT).await?),
            DatabaseUrl::Sqlite(_) => Self::Sqlite(sqlite::connect(settings, CONNECT_TIMEOUT).await?),
        };
        database.ping().await?;
        Ok(database)
    }

    /// Applies pending migrations. Safe when several replicas start at once: sqlx serialises
    /// migrators with an advisory lock on PostgreSQL. On SQLite it takes no lock, and two migrators
    /// that both read "nothing applied" both apply, the second failing on `_sqlx_migrations`'
    /// primary key; so the whole run is one `BEGIN IMMEDIATE` transaction there: the write lock is
    /// taken before anything is read, a second migrator waits for it (busy timeout) and then finds
    /// everything applied.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let result = match self {
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
            Self::Sqlite(pool) => sqlite::migrate(pool, &SQLITE_MIGRATIONS).await,
        };
        result.map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
    }

    /// What `serve` runs at start: [`Self::migrate`], unless every migration of this binary is
    /// already applied with the same checksum and none is left failed, when the migrator would
    /// change nothing. The service's PostgreSQL role may not create tables (a separate role owns
    /// the schema and runs `migrate`), and sqlx's migrator begins with `CREATE TABLE IF NOT EXISTS
    /// _sqlx_migrations`, which PostgreSQL refuses without CREATE on the schema even when the
    /// table exists.
    pub async fn migrate_if_pending(&self) -> Result<(), StoreError> {
        if let Self::Postgres(pool) = self {
            let applied =
                sqlx::query_as::<_, (i64, Vec<u8>, bool)>("SELECT version, checksum, success FROM _sqlx_migrations")
                    .fetch_all(pool)
                    .await;
            if let Ok(applied) = applied {
                let expected: Vec<(i64, &[u8])> = POSTGRES_MIGRATIONS
                    .iter()
                    .filter(|m| !m.migration_type.is_down_migration())
                    .map(|m| (m.version, &*m.checksum))
                    .collect();
                let current = applied.len() == expected.len()
                    && applied.iter().all(|(version, checksum, success)| {
                        *success && expected.iter().any(|(v, c)| v == version && *c == checksum.as_slice())
                    });
                if current {
                    return Ok(());
                }
            }
        }
        self.migrate().await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Self::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
            Self::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
        }
        .map_err(StoreError::from)
    }

    /// Ready means: the database answers and every migration in this binary is applied.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        let (applied, expected) = match self {
            Self::Postgres(pool) => (
                sqlx::query_scalar::<_, i64>(APPLIED_MIGRATIONS).fetch_one(pool).await,
                POSTGRES_MIGRATIONS.iter().count(),
            ),
            Self::Sqlite(pool) => (
                sqlx::query_scalar::<_, i64>(APPLIED_MIGRATIONS).fetch_one(pool).await,
                SQLITE_MIGRATIONS.iter().count(),
            ),
        };
        let applied = applied.map_err(migrations_table_error)?;
        if usize::try_from(applied).unwrap_or(0) < expected {
            return Err(StoreError::MigrationsPending(format!("{applied} of {expected} applied")));
        }
        Ok(())
    }

    /// The pool connection the batcher keeps across commits, so that a commit is exactly one round
    /// trip: an sqlx pool pings every connection handed back to it, a second round trip per commit.
    /// The database gives up on any statement on it after `statement_timeout`, which rolls the
    /// statement back (PostgreSQL `statement_timeout`; SQLite `busy_timeout`, its only wait).
    pub async fn commit_connection(&self, statement_timeout: Duration) -> Result<CommitConnection, sqlx::Error> {
        let millis = crate::telemetry::millis(statement_timeout).max(1);
        Ok(match self {
            Self::Postgres(pool) => {
                let mut connection = pool.acquire().await?;
                sqlx::query(&format!("SET statement_timeout = {millis}")).execute(&mut *connection).await?;
                // PostgreSQL 14+ also aborts a statement whose client has gone (a commit given up
                // on, a replica shut down) instead of running it to the end unseen. Older servers
                // lack the setting: it is a safeguard, not a requirement.
                if let Err(error) = sqlx::query(CHECK_CLIENT_CONNECTION).execute(&mut *connection).await {
                    tracing::debug!(%error, "client_connection_check_interval not set");
                }
                CommitConnection::Postgres(connection)
            }
            Self::Sqlite(pool) => {
                let mut connection = pool.acquire().await?;
                sqlx::query(&format!("PRAGMA busy_timeout = {millis}")).execute(&mut *connection).await?;
                CommitConnection::Sqlite(connection)
            }
        })
    }

    /// (in use, idle, maximum) connections of the pool.
    pub fn pool_usage(&self) -> (u32, u32, u32) {
        let (size, idle, max) = match self {
            Self::Postgres(pool) => (pool.size(), pool.num_idle(), pool.options().get_max_connections()),
            Self::Sqlite(pool) => (pool.size(), pool.num_idle(), pool.options().get_max_connections()),
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX);
        (size.saturating_sub(idle), idle, max)
    }

    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }
}

/// The connection the batcher commits on; see [`Database::commit_connection`].
pub enum CommitConnection {
    Postgres(PoolConnection<Postgres>),
    Sqlite(PoolConnection<Sqlite>),
}

impl CommitConnection {
    /// Adds the increments in one transaction and returns the counts after it.
    pub async fn commit_batch(
        &mut self,
        increments: &PerEndpoint<i64>,
        with_snapshot: bool,
    ) -> Result<CommittedBatch, sqlx::Error> {
        match self {
            Self::Postgres(connection) => postgres::commit_batch(connection, increments, with_snapshot).await,
            Self::Sqlite(connection) => sqlite::commit_batch(connection, increments, with_snapshot, Utc::now()).await,
        }
    }

    /// Closes the connection when the batcher ends. Handed back to the pool instead, it would be
    /// pinged on its way and could miss the pool's close at shutdown and stay open; for SQLite
    /// that leaves the WAL file behind, un-checkpointed.
    pub async fn close(self) {
        let closed = match self {
            Self::Postgres(connection) => connection.close().await,
            Self::Sqlite(connection) => connection.close().await,
        };
        if let Err(error) = closed {
            tracing::debug!(%error, "commit connection did not close cleanly");
        }
    }

    /// Closes the connection instead of returning it to the pool: after a failed or abandoned
    /// commit its state is unknown.
    pub fn discard(self) {
        match self {
            Self::Postgres(mut connection) => connection.close_on_drop(),
            Self::Sqlite(mut connection) => connection.close_on_drop(),
        }
    }
}

const APPLIED_MIGRATIONS: &str = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";

fn migrations_table_error(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Database(ref db) if db.message().contains("_sqlx_migrations") => {
            StoreError::MigrationsPending("none applied".to_owned())
        }
        other => StoreError::from(other),
    }
}
