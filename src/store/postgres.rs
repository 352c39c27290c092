//! PostgreSQL backend: one statement per batch.
//!
//! A batch is a single statement run in autocommit mode: one round trip, one transaction, one WAL
//! flush, whatever the batch size. Under load that is a plain `UPDATE … RETURNING` of one row; the
//! general `INSERT … ON CONFLICT DO UPDATE … RETURNING` covers several endpoints and first accesses.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};
use url::Url;

use super::{CommittedBatch, CountedEndpoint, EndpointRecord, PerEndpoint, COUNTED_ENDPOINTS};
use crate::config::{DatabaseSettings, DatabaseUrl};

/// Keeps a hung query from holding the batcher; well above a healthy commit (< 10 ms).
const STATEMENT_TIMEOUT: &str = "5s";
const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// Query parameters that sqlx reads from a PostgreSQL URL (sqlx-postgres 0.8 `options/parse.rs`).
const SQLX_PARAMS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// sqlx's options for `url`, without the parameters sqlx does not read: sqlx logs each of those
/// with its value ("ignoring unrecognized connect parameter"), and some are secrets that libpq
/// takes (`sslpassword`, …). Only their names are logged here.
pub fn connect_options(url: &Url) -> Result<PgConnectOptions, sqlx::Error> {
    let mut kept = url.clone();
    let (known, unused): (Vec<_>, Vec<_>) = url
        .query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .partition(|(key, _)| SQLX_PARAMS.contains(&key.as_str()) || key.starts_with("options["));
    if !unused.is_empty() {
        let names: Vec<&str> = unused.iter().map(|(key, _)| key.as_str()).collect();
        tracing::warn!(parameters = %names.join(","), "DATABASE_URL parameters not used by the service's driver");
        kept.set_query(None);
        if !known.is_empty() {
            kept.query_pairs_mut().extend_pairs(known);
        }
    }
    PgConnectOptions::from_str(kept.as_str())
}

pub(super) async fn connect(settings: &DatabaseSettings, connect_timeout: Duration) -> Result<PgPool, sqlx::Error> {
    let DatabaseUrl::Postgres(url) = &settings.url else {
        return Err(sqlx::Error::Configuration("not a PostgreSQL URL".into()));
    };
    check_tls_files(url)?;
    let options =
        connect_options(url)?.application_name("endpoint-stats").options([("statement_timeout", STATEMENT_TIMEOUT)]);
    // One direct connection first: a pool would retry until its timeout and report only "pool
    // timed out", where the operator needs "connection refused" or "password authentication failed".
    let probe = tokio::time::timeout(connect_timeout, PgConnection::connect_with(&options))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    probe.close().await?;
    PgPoolOptions::new()
        .max_connections(settings.pool_size)
        // Short, so that a counted request answers 503 about a second into an outage instead of
        // holding the client. The batcher keeps one connection of the pool; the rest serve reads.
        .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
        // The batcher keeps its connection instead of acquiring one per commit, so a ping before
        // every acquire costs the hot path nothing, and after a database restart readiness and
        // reads get a live connection instead of failing once on a stale one.
        .test_before_acquire(true)
        .connect_with(options)
        .await
}

/// sqlx opens `sslrootcert`, `sslcert` and `sslkey` only inside the TLS handshake, where a
/// missing file (a Secret not mounted) comes out as a bare "No such file or directory": each one
/// the URL names must be readable at start, and the message names the parameter and the path.
fn check_tls_files(url: &url::Url) -> Result<(), sqlx::Error> {
    for (key, value) in url.query_pairs() {
        let is_file = matches!(
            key.as_ref(),
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" | "sslcert" | "ssl-cert" | "sslkey" | "ssl-key"
        );
        // sqlx takes a value that starts like a PEM certificate as the certificate itself
        if is_file && !value.starts_with("-----BEGIN") {
            std::fs::File::open(value.as_ref()).map_err(|error| {
                sqlx::Error::Configuration(format!("{key}={value}: cannot read the file: {error}").into())
            })?;
        }
    }
    Ok(())
}

/// The general batch: any set of endpoints, rows created on their first access, and optionally
/// every other row as of the commit. Rows are locked in array order ([`CountedEndpoint::ALL`]),
/// so that concurrent replicas cannot deadlock.
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

/// The hot path under load: a batch of accesses to one endpoint whose row exists. A plain
/// single-row `UPDATE` costs PostgreSQL a good deal less per commit than the general statement's
/// arrays, speculative insert and union (docs/operations/tuning.md), and the commit's latency is
/// what bounds throughput.
const INCREMENT_ONE: &str =
    "UPDATE endpoint_access SET access_count = access_count + $2, last_accessed = now() WHERE endpoint = $1 \
     RETURNING access_count";

/// [`INCREMENT_ONE`] for a batch that also reports every row (`/stats`).
const INCREMENT_ONE_WITH_SNAPSHOT: &str = r#"
WITH updated AS (
    UPDATE endpoint_access SET access_count = access_count + $2, last_accessed = now() WHERE endpoint = $1
    RETURNING endpoint, access_count, first_accessed, last_accessed
)
SELECT endpoint, access_count, first_accessed, last_accessed, TRUE AS updated FROM updated
UNION ALL
SELECT endpoint, access_count, first_accessed, last_accessed, FALSE FROM endpoint_access
WHERE endpoint <> $1 AND EXISTS (SELECT 1 FROM updated)
"#;

pub(super) async fn commit_batch(
    connection: &mut PgConnection,
    increments: &PerEndpoint<i64>,
    with_snapshot: bool,
) -> Result<CommittedBatch, sqlx::Error> {
    let touched: Vec<(CountedEndpoint, i64)> =
        CountedEndpoint::ALL.into_iter().map(|e| (e, increments[e.index()])).filter(|&(_, n)| n > 0).collect();
    if let [(endpoint, n)] = touched[..] {
        if let Some(committed) = increment_one(connection, endpoint, n, with_snapshot).await? {
            return Ok(committed);
        }
    }
    let paths: Vec<&str> = touched.iter().map(|(endpoint, _)| endpoint.path()).collect();
    let amounts: Vec<i64> = touched.iter().map(|&(_, n)| n).collect();
    let rows =
        sqlx::query(COMMIT_BATCH).bind(&paths).bind(&amounts).bind(with_snapshot).fetch_all(&mut *connection).await?;
    committed_from_rows(rows, with_snapshot)
}

/// The fast path, or `None` when the endpoint's row does not exist yet (its first access ever):
/// the `UPDATE` then wrote nothing, so the general statement can create the row without counting
/// anything twice.
async fn increment_one(
    connection: &mut PgConnection,
    endpoint: CountedEndpoint,
    n: i64,
    with_snapshot: bool,
) -> Result<Option<CommittedBatch>, sqlx::Error> {
    if with_snapshot {
        let rows =
            sqlx::query(INCREMENT_ONE_WITH_SNAPSHOT).bind(endpoint.path()).bind(n).fetch_all(&mut *connection).await?;
        return (!rows.is_empty()).then(|| committed_from_rows(rows, true)).transpose();
    }
    let count: Option<i64> =
        sqlx::query_scalar(INCREMENT_ONE).bind(endpoint.path()).bind(n).fetch_optional(&mut *connection).await?;
    Ok(count.map(|count| {
        let mut counts_after = [0; COUNTED_ENDPOINTS];
        counts_after[endpoint.index()] = count;
        CommittedBatch { counts_after, snapshot: None }
    }))
}

/// Reads (endpoint, access_count, first_accessed, last_accessed, updated) rows.
fn committed_from_rows(rows: Vec<PgRow>, with_snapshot: bool) -> Result<CommittedBatch, sqlx::Error> {
    let mut counts_after = [0; COUNTED_ENDPOINTS];
    let mut snapshot = with_snapshot.then(|| Vec::with_capacity(rows.len()));
    for row in rows {
        let record = EndpointRecord {
            endpoint: row.try_get(0)?,
            access_count: row.try_get(1)?,
            first_accessed: row.try_get::<DateTime<Utc>, _>(2)?,
            last_accessed: row.try_get::<DateTime<Utc>, _>(3)?,
        };
        if row.try_get::<bool, _>(4)? {
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
