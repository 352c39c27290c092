//! `maintain`: the daily housekeeping, and a report of what it found and did.
//!
//! PostgreSQL: `VACUUM (ANALYZE)` of every table of the service's database, dead/live tuples
//! before and after (bloat), invalid indexes (a failed `CREATE INDEX CONCURRENTLY` leaves one:
//! a fault, exit 1), unused indexes and sizes. SQLite: `VACUUM`, `ANALYZE`, integrity check.
//! Redis: the window keys of the prefix are scanned (SCAN, never KEYS); window keys of the
//! service's own naming scheme without a TTL or older than the longest window are deleted, other
//! keys are only counted; memory and key counts reported.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::pg::quote_table;
use super::{sql_failed, Status};
use crate::config::{DatabaseArgs, DatabaseSettings, RedisArgs, RedisSettings};
use crate::redis_conn::{self, MemoryInfo};
use crate::store::Database;
use crate::telemetry::{self, millis};
use crate::windows::{window_key_end, window_key_prefix, LONGEST_WINDOW_SECONDS};

const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
const SCAN_COUNT: usize = 500;

#[derive(Debug, clap::Args)]
pub struct MaintainArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Redis of the recent-window counters; skipped when unset.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Share of dead tuples above which a table is reported as bloated.
    #[arg(long, default_value_t = 0.2)]
    pub bloat_ratio: f64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub database: DatabaseReport,
    pub redis: RedisReport,
    /// Findings that need an operator but did not fail the run.
    pub warnings: Vec<String>,
    /// What failed (the exit code is 1 when not empty).
    pub failures: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct DatabaseReport {
    /// `ok` or `failed`.
    pub status: Status,
    pub backend: String,
    pub database: String,
    pub vacuumed: Vec<String>,
    pub vacuum_ms: u64,
    pub database_bytes: i64,
    pub tables: Vec<TableReport>,
    pub indexes: Vec<IndexReport>,
    pub invalid_indexes: Vec<String>,
    pub unused_indexes: Vec<String>,
    /// Since when index usage is counted (unused means unused since then).
    pub stats_reset: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TableReport {
    pub table: String,
    pub live_tuples_before: i64,
    pub dead_tuples_before: i64,
    pub live_tuples: i64,
    pub dead_tuples: i64,
    pub dead_ratio_before: f64,
    pub total_bytes: i64,
    pub last_autovacuum: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct IndexReport {
    pub index: String,
    pub table: String,
    pub bytes: i64,
    pub scans: i64,
    pub valid: bool,
    pub unique: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RedisReport {
    /// `skipped` when there is no REDIS_URL.
    pub status: Status,
    pub prefix: String,
    /// Keys under the prefix.
    pub keys: u64,
    pub window_keys: u64,
    pub deleted_without_ttl: u64,
    pub deleted_stale: u64,
    /// Keys under `{prefix}window:` whose name is not a known bucket (never deleted).
    pub unknown_window_keys: u64,
    pub used_memory_bytes: Option<u64>,
    pub used_memory_human: Option<String>,
    pub maxmemory_bytes: Option<u64>,
    pub maxmemory_policy: Option<String>,
    /// Keys in the Redis database (all owners).
    pub db_keys: Option<u64>,
    pub error: Option<String>,
}

pub async fn run(args: MaintainArgs) -> anyhow::Result<ExitCode> {
    let mut database_settings = args.database.settings()?;
    database_settings.pool_size = 2;
    let redis_settings = args.redis.settings()?;
    telemetry::init_logging(args.database.log_format, &args.database.log_level)?;
    let started = Instant::now();
    let started_at = Utc::now();
    let mut warnings = Vec::new();
    let mut failures = Vec::new();

    let database = match maintain_database(&database_settings, &mut warnings).await {
        Ok(report) => report,
        Err(error) => {
            DatabaseReport { status: Status::Failed, error: Some(format!("{error:#}")), ..Default::default() }
        }
    };
    if let Some(error) = &database.error {
        failures.push(format!("database: {error}"));
    }
    for index in &database.invalid_indexes {
        failures.push(format!(
            "invalid index {index} (a failed CREATE INDEX CONCURRENTLY?): REINDEX INDEX CONCURRENTLY {index}, or drop it"
        ));
    }

    let redis = match &redis_settings {
        None => {
            RedisReport { status: Status::Skipped, prefix: args.redis.redis_key_prefix.clone(), ..Default::default() }
        }
        Some(settings) => match maintain_redis(settings).await {
            Ok(report) => report,
            Err(error) => {
                failures.push(format!("redis: {error:#}"));
                RedisReport {
                    status: Status::Failed,
                    prefix: settings.key_prefix.clone(),
                    error: Some(format!("{error:#}")),
                    ..Default::default()
                }
            }
        },
    };

    for table in &database.tables {
        if table.dead_ratio_before > args.bloat_ratio && table.dead_tuples_before > 1000 {
            warnings.push(format!(
                "{} had {} dead tuples ({:.0}% of the table) before VACUUM: autovacuum is not keeping up \
                 (lower autovacuum_vacuum_scale_factor for it)",
                table.table,
                table.dead_tuples_before,
                table.dead_ratio_before * 100.0
            ));
        }
    }
    for index in &database.unused_indexes {
        warnings.push(format!("index {index} was never used since the statistics reset: a candidate to drop"));
    }

    let report = Report {
        ok: failures.is_empty(),
        started_at,
        duration_ms: millis(started.elapsed()),
        database,
        redis,
        warnings,
        failures,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("serializing the report")?);
    } else {
        print_text(&report);
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn maintain_database(settings: &DatabaseSettings, warnings: &mut Vec<String>) -> anyhow::Result<DatabaseReport> {
    let database =
        Database::connect(settings).await.with_context(|| format!("DATABASE_URL: cannot use {}", settings.url))?;
    let result = match &database {
        Database::Postgres(pool) => maintain_postgres(pool).await,
        Database::Sqlite(pool) => maintain_sqlite(pool, warnings).await,
    };
    database.close().await;
    result
}

async fn maintain_postgres(pool: &sqlx::PgPool) -> anyhow::Result<DatabaseReport> {
    let (name, database_bytes): (String, i64) =
        sqlx::query_as("SELECT current_database(), pg_database_size(current_database())")
            .fetch_one(pool)
            .await
            .map_err(sql_failed("reading the database"))?;
    let before = table_stats(pool).await?;

    let vacuum_started = Instant::now();
    let mut vacuumed = Vec::new();
    for stats in &before {
        sqlx::raw_sql(&format!("VACUUM (ANALYZE) {}", quote_table(&stats.schema, &stats.table)))
            .execute(pool)
            .await
            .map_err(sql_failed(format_args!("VACUUM (ANALYZE) {}.{}", stats.schema, stats.table)))?;
        vacuumed.push(format!("{}.{}", stats.schema, stats.table));
    }
    let vacuum_ms = millis(vacuum_started.elapsed());
    let _ = sqlx::raw_sql("SELECT pg_stat_clear_snapshot()").execute(pool).await;
    let after = table_stats(pool).await?;

    let tables = after
        .iter()
        .map(|now| {
            let old = before.iter().find(|b| b.schema == now.schema && b.table == now.table);
            let (live_before, dead_before) = old.map_or((now.live, now.dead), |b| (b.live, b.dead));
            let total = live_before + dead_before;
            TableReport {
                table: format!("{}.{}", now.schema, now.table),
                live_tuples_before: live_before,
                dead_tuples_before: dead_before,
                live_tuples: now.live,
                dead_tuples: now.dead,
                dead_ratio_before: if total > 0 { dead_before as f64 / total as f64 } else { 0.0 },
                total_bytes: now.bytes,
                last_autovacuum: now.last_autovacuum,
            }
        })
        .collect();

    let index_rows = sqlx::query(
        "SELECT s.schemaname || '.' || s.indexrelname AS index, s.schemaname || '.' || s.relname AS table, \
         pg_relation_size(s.indexrelid) AS bytes, s.idx_scan AS scans, i.indisvalid AS valid, \
         (i.indisunique OR i.indisprimary) AS unique \
         FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(sql_failed("reading index statistics"))?;
    let mut indexes = Vec::new();
    for row in index_rows {
        indexes.push(IndexReport {
            index: row.try_get("index")?,
            table: row.try_get("table")?,
            bytes: row.try_get("bytes")?,
            scans: row.try_get("scans")?,
            valid: row.try_get("valid")?,
            unique: row.try_get("unique")?,
        });
    }
    let invalid_indexes = indexes.iter().filter(|i| !i.valid).map(|i| i.index.clone()).collect();
    let unused_indexes =
        indexes.iter().filter(|i| i.valid && !i.unique && i.scans == 0).map(|i| i.index.clone()).collect();
    let (stats_reset,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(pool)
            .await
            .map_err(sql_failed("reading pg_stat_database"))?;

    Ok(DatabaseReport {
        status: Status::Ok,
        backend: "postgres".to_owned(),
        database: name,
        vacuumed,
        vacuum_ms,
        database_bytes,
        tables,
        indexes,
        invalid_indexes,
        unused_indexes,
        stats_reset,
        error: None,
    })
}

struct TableStats {
    schema: String,
    table: String,
    live: i64,
    dead: i64,
    bytes: i64,
    last_autovacuum: Option<DateTime<Utc>>,
}

async fn table_stats(pool: &sqlx::PgPool) -> anyhow::Result<Vec<TableStats>> {
    let rows = sqlx::query(
        "SELECT schemaname, relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid) AS bytes, last_autovacuum \
         FROM pg_stat_user_tables ORDER BY schemaname, relname",
    )
    .fetch_all(pool)
    .await
    .map_err(sql_failed("reading pg_stat_user_tables"))?;
    rows.iter()
        .map(|row| {
            Ok(TableStats {
                schema: row.try_get("schemaname")?,
                table: row.try_get("relname")?,
                live: row.try_get("n_live_tup")?,
                dead: row.try_get("n_dead_tup")?,
                bytes: row.try_get("bytes")?,
                last_autovacuum: row.try_get("last_autovacuum")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| anyhow::anyhow!("reading pg_stat_user_tables: {e}"))
}

async fn maintain_sqlite(pool: &sqlx::SqlitePool, warnings: &mut Vec<String>) -> anyhow::Result<DatabaseReport> {
    let (check,): (String,) =
        sqlx::query_as("PRAGMA integrity_check").fetch_one(pool).await.map_err(sql_failed("PRAGMA integrity_check"))?;
    if check != "ok" {
        anyhow::bail!("SQLite integrity check failed: {check}");
    }
    let started = Instant::now();
    sqlx::raw_sql("VACUUM").execute(pool).await.map_err(sql_failed("VACUUM"))?;
    sqlx::raw_sql("ANALYZE").execute(pool).await.map_err(sql_failed("ANALYZE"))?;
    let vacuum_ms = millis(started.elapsed());
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM endpoint_access")
        .fetch_one(pool)
        .await
        .map_err(sql_failed("counting rows"))?;
    let (pages, page_size): (i64, i64) =
        sqlx::query_as("SELECT (SELECT page_count FROM pragma_page_count), (SELECT page_size FROM pragma_page_size)")
            .fetch_one(pool)
            .await
            .map_err(sql_failed("reading the database size"))?;
    warnings.push("SQLite backend: for development only; production runs PostgreSQL".to_owned());
    Ok(DatabaseReport {
        status: Status::Ok,
        backend: "sqlite".to_owned(),
        database: "sqlite".to_owned(),
        vacuumed: vec!["(whole database)".to_owned()],
        vacuum_ms,
        database_bytes: pages * page_size,
        tables: vec![TableReport {
            table: "endpoint_access".to_owned(),
            live_tuples_before: rows,
            dead_tuples_before: 0,
            live_tuples: rows,
            dead_tuples: 0,
            dead_ratio_before: 0.0,
            total_bytes: 0,
            last_autovacuum: None,
        }],
        ..Default::default()
    })
}

/// Escapes glob characters so that a prefix matches literally in SCAN MATCH.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

async fn maintain_redis(settings: &RedisSettings) -> anyhow::Result<RedisReport> {
    let client = redis_conn::open(&settings.url).map_err(anyhow::Error::msg)?;
    let mut connection = redis_conn::connect(client, REDIS_TIMEOUT).await.map_err(anyhow::Error::msg)?;

    let prefix = settings.key_prefix.as_str();
    let window_prefix = window_key_prefix(prefix);
    let now = Utc::now().timestamp();
    let mut report = RedisReport { status: Status::Ok, prefix: prefix.to_owned(), ..Default::default() };
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", glob_escape(prefix)))
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut connection)
            .await
            .context("SCAN")?;
        report.keys += keys.len() as u64;
        let windows: Vec<&String> = keys.iter().filter(|k| k.starts_with(&window_prefix)).collect();
        if !windows.is_empty() {
            let mut pipeline = redis::pipe();
            for key in &windows {
                pipeline.cmd("TTL").arg(key.as_str());
            }
            let ttls: Vec<i64> = pipeline.query_async(&mut connection).await.context("TTL")?;
            let mut doomed = Vec::new();
            for (key, ttl) in windows.iter().zip(ttls) {
                if ttl == -2 {
                    continue; // expired meanwhile
                }
                report.window_keys += 1;
                // Only names of this service's own scheme are deleted: anything else under the
                // prefix may belong to another application sharing it, and is only reported.
                let Some(end) = window_key_end(&key[window_prefix.len()..]) else {
                    report.unknown_window_keys += 1;
                    continue;
                };
                if ttl == -1 {
                    report.deleted_without_ttl += 1;
                    doomed.push(key.as_str());
                } else if end < now - LONGEST_WINDOW_SECONDS {
                    report.deleted_stale += 1;
                    doomed.push(key.as_str());
                }
            }
            if !doomed.is_empty() {
                let _: () = redis::cmd("DEL").arg(&doomed).query_async(&mut connection).await.context("DEL")?;
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }

    let memory = MemoryInfo::read(&mut connection).await.context("INFO memory")?;
    report.used_memory_bytes = memory.used_bytes;
    report.used_memory_human = memory.used_human;
    report.maxmemory_bytes = memory.max_bytes;
    report.maxmemory_policy = memory.max_policy;
    report.db_keys = redis::cmd("DBSIZE").query_async(&mut connection).await.ok();
    Ok(report)
}

fn print_text(report: &Report) {
    let db = &report.database;
    println!("maintain: {} in {} ms", if report.ok { "ok" } else { "FAILED" }, report.duration_ms);
    match db.status {
        Status::Ok => {
            println!(
                "database ({} {}, {} bytes): VACUUM (ANALYZE) of {} table(s) in {} ms",
                db.backend,
                db.database,
                db.database_bytes,
                db.vacuumed.len(),
                db.vacuum_ms
            );
            for t in &db.tables {
                println!(
                    "  {}: {} live / {} dead tuples before ({:.1}% dead), {} / {} after, {} bytes",
                    t.table,
                    t.live_tuples_before,
                    t.dead_tuples_before,
                    t.dead_ratio_before * 100.0,
                    t.live_tuples,
                    t.dead_tuples,
                    t.total_bytes
                );
            }
            for i in &db.indexes {
                println!(
                    "  index {} on {}: {} bytes, {} scans{}",
                    i.index,
                    i.table,
                    i.bytes,
                    i.scans,
                    if i.valid { "" } else { ", INVALID" }
                );
            }
        }
        _ => println!("database: FAILED: {}", db.error.as_deref().unwrap_or("unknown error")),
    }
    let r = &report.redis;
    match r.status {
        Status::Skipped => println!("redis: skipped (no REDIS_URL)"),
        Status::Ok => println!(
            "redis (prefix {}): {} keys, {} window keys, deleted {} without TTL and {} stale, {} unknown; \
             used memory {} (maxmemory {} bytes, policy {}), {} keys in the database",
            r.prefix,
            r.keys,
            r.window_keys,
            r.deleted_without_ttl,
            r.deleted_stale,
            r.unknown_window_keys,
            r.used_memory_human.as_deref().unwrap_or("?"),
            r.maxmemory_bytes.map_or_else(|| "?".to_owned(), |m| m.to_string()),
            r.maxmemory_policy.as_deref().unwrap_or("?"),
            r.db_keys.map_or_else(|| "?".to_owned(), |k| k.to_string())
        ),
        _ => println!("redis: FAILED: {}", r.error.as_deref().unwrap_or("unknown error")),
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for failure in &report.failures {
        println!("failure: {failure}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_literally() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
