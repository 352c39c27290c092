//! PostgreSQL backend: one statement per batch.
//!
//! A batch is a single `INSERT … ON CONFLICT DO UPDATE … RETURNING` over all endpoints it touches,
//! run in autocommit mode: one round trip, one transaction, one WAL flush, whatever the batch size.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::{CommittedBatch, CountedEndpoint, EndpointRecord, EndpointRow, PerEndpoint, COUNTED_ENDPOINTS};
use crate::config::DatabaseSettings;

/// Keeps a hung query from holding the batcher; well above a healthy commit (< 10 ms).
const STATEMENT_TIMEOUT: &str = "5s";
const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) async fn connect(settings: &DatabaseSettings, connect_timeout: Duration) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(settings.url.expose())?
        .application_name("endpoint-stats")
        .options([("statement_timeout", STATEMENT_TIMEOUT)]);
    // One direct connection first: a pool would retry until its timeout and report only "pool
    // timed out", where the operator needs "connection refused" or "password authentication failed".
    let probe = tokio::time::timeout(connect_timeout, PgConnection::connect_with(&options))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    probe.close().await?;
    PgPoolOptions::new()
        .max_connections(settings.pool_size)
        // Short, so that a counted request answers 503 about a second into an outage instead of
        // holding the client; the batcher needs at most a few connections of the pool.
        .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
        // A ping before every acquire would double the round trips of the hot path; a dead
        // connection instead fails one batch (answered 503, nothing counted) and is replaced.
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

const COMMIT_BATCH: &str = r#"
WITH increments AS (
    SELECT endpoint, n FROM UNNEST($1::text[], $2::bigint[]) AS t(endpoint, n)
), updated AS (
    INSERT INTO endpoint_access AS e (endpoint, access_count, first_accessed, last_accessed)
    SELECT endpoint, n, now(), now() FROM increments
    ON CONFLICT (endpoint) DO UPDATE
        SET access_count = e.access_count + EXCLUDED.access_count,
            last_accessed = EXCLUDED.last_accessed
    RETURNING e.endpoint, e.access_count, e.first_accessed, e.last_accessed
)
SELECT endpoint, access_count, first_accessed, last_accessed, TRUE AS updated FROM updated
UNION ALL
SELECT endpoint, access_count, first_accessed, last_accessed, FALSE FROM endpoint_access
WHERE $3 AND endpoint <> ALL($1::text[])
"#;

pub(super) async fn commit_batch(
    pool: &PgPool,
    increments: &PerEndpoint<i64>,
    with_snapshot: bool,
) -> Result<CommittedBatch, sqlx::Error> {
    let mut paths = Vec::with_capacity(COUNTED_ENDPOINTS);
    let mut amounts = Vec::with_capacity(COUNTED_ENDPOINTS);
    for endpoint in CountedEndpoint::ALL {
        let n = increments[endpoint.index()];
        if n > 0 {
            paths.push(endpoint.path());
            amounts.push(n);
        }
    }
    let rows = sqlx::query(COMMIT_BATCH).bind(&paths).bind(&amounts).bind(with_snapshot).fetch_all(pool).await?;

    let mut counts_after = [0; COUNTED_ENDPOINTS];
    let mut snapshot = with_snapshot.then(|| Vec::with_capacity(rows.len()));
    for row in rows {
        let record = EndpointRecord {
            endpoint: row.try_get("endpoint")?,
            access_count: row.try_get("access_count")?,
            first_accessed: row.try_get::<DateTime<Utc>, _>("first_accessed")?,
            last_accessed: row.try_get::<DateTime<Utc>, _>("last_accessed")?,
        };
        if row.try_get::<bool, _>("updated")? {
            if let Some(endpoint) = CountedEndpoint::from_path(&record.endpoint) {
                counts_after[endpoint.index()] = record.access_count;
            }
        }
        if let Some(snapshot) = snapshot.as_mut() {
            snapshot.push(record);
        }
    }
    if let Some(snapshot) = snapshot.as_mut() {
        snapshot.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    }
    Ok(CommittedBatch { counts_after, snapshot })
}

pub(super) async fn all_endpoints(pool: &PgPool) -> Result<Vec<EndpointRecord>, sqlx::Error> {
    let rows: Vec<EndpointRow> = sqlx::query_as(
        "SELECT endpoint, access_count, first_accessed, last_accessed FROM endpoint_access ORDER BY endpoint",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(EndpointRecord::from).collect())
}
