//! Embedded SQLite backend: the zero-configuration default for `cargo run`.
//!
//! WAL with `synchronous = FULL`, so an access handed to a client survives a crash of the
//! process and of the machine. One writer (the batcher) per process.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};

use super::{CommittedBatch, CountedEndpoint, EndpointRecord, EndpointRow, PerEndpoint, COUNTED_ENDPOINTS};
use crate::config::DatabaseSettings;

pub(super) async fn connect(settings: &DatabaseSettings, connect_timeout: Duration) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(settings.url.expose())?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(settings.pool_size)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
}

/// Runs `migrator` inside one `BEGIN IMMEDIATE` transaction on one connection (see
/// [`super::Database::migrate`]); each migration becomes a savepoint in it.
pub(super) async fn migrate(pool: &SqlitePool, migrator: &Migrator) -> Result<(), MigrateError> {
    let mut connection = pool.acquire().await?;
    let mut transaction = connection.begin_with("BEGIN IMMEDIATE").await?;
    migrator.run_direct(&mut *transaction).await?;
    transaction.commit().await?;
    Ok(())
}

const UPSERT: &str = "INSERT INTO endpoint_access (endpoint, access_count, first_accessed, last_accessed) \
     VALUES (?1, ?2, ?3, ?3) \
     ON CONFLICT (endpoint) DO UPDATE \
     SET access_count = access_count + excluded.access_count, last_accessed = excluded.last_accessed \
     RETURNING access_count";

const SELECT_ALL: &str =
    "SELECT endpoint, access_count, first_accessed, last_accessed FROM endpoint_access ORDER BY endpoint";

pub(super) async fn commit_batch(
    connection: &mut SqliteConnection,
    increments: &PerEndpoint<i64>,
    with_snapshot: bool,
    now: DateTime<Utc>,
) -> Result<CommittedBatch, sqlx::Error> {
    let mut transaction = connection.begin().await?;
    let mut counts_after = [0; COUNTED_ENDPOINTS];
    for endpoint in CountedEndpoint::ALL {
        let n = increments[endpoint.index()];
        if n > 0 {
            counts_after[endpoint.index()] = sqlx::query_scalar::<_, i64>(UPSERT)
                .bind(endpoint.path())
                .bind(n)
                .bind(now)
                .fetch_one(&mut *transaction)
                .await?;
        }
    }
    let snapshot = if with_snapshot {
        Some(records(sqlx::query_as(SELECT_ALL).fetch_all(&mut *transaction).await?))
    } else {
        None
    };
    transaction.commit().await?;
    Ok(CommittedBatch { counts_after, snapshot })
}

fn records(rows: Vec<EndpointRow>) -> Vec<EndpointRecord> {
    rows.into_iter().map(EndpointRecord::from).collect()
}
