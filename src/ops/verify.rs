//! `verify-backup`: proves the newest dump restorable by restoring it.
//!
//! Checksum and manifest first, then `pg_restore` into a scratch database created for the purpose
//! (on the server of `DATABASE_URL`, or of `--scratch-url`), then tables, columns, indexes, row
//! counts and migrations compared with the manifest. The scratch database is dropped whatever
//! happened.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use sqlx::Connection;

use super::dumps::{check_dump, newest_dump, Manifest};
use super::pg::{compare, find_tool, inventory, quote_ident, run_tool, PgTarget};
use super::{seconds, sql_failed};
use crate::config::{non_empty, DatabaseArgs};
use crate::signals::stop_requested;
use crate::telemetry;

/// Scratch databases are named with this prefix, so that leftovers are recognisable.
pub const SCRATCH_PREFIX: &str = "endpoint_stats_verify_";

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The server to restore on: a scratch database is created there (the role needs CREATEDB).
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Directory of the dumps; the newest is verified.
    #[arg(long, env = "BACKUP_DIR")]
    pub dir: PathBuf,

    /// Create the scratch database on this server instead (postgres:// URL of any database there).
    #[arg(long, env = "VERIFY_SCRATCH_URL", hide_env_values = true)]
    pub scratch_url: Option<String>,

    /// Directory holding pg_restore (default: found on PATH).
    #[arg(long, env = "PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let server = match args.scratch_url.as_deref().and_then(non_empty) {
        Some(url) => PgTarget::parse(url, "--scratch-url")?,
        None => PgTarget::from_args(&args.database)
            .context("verify-backup restores on a PostgreSQL server: set DATABASE_URL or --scratch-url")?,
    };
    telemetry::init_logging(args.database.log_format, &args.database.log_level)?;
    let started = Instant::now();
    let dump = newest_dump(&args.dir)?;
    let manifest = check_dump(&dump).await.with_context(|| format!("verify-backup: {}", dump.name))?;
    let pg_restore = find_tool("pg_restore", args.pg_bin_dir.as_deref())?;

    let scratch_name = format!("{SCRATCH_PREFIX}{}", random_suffix());
    let mut admin = server.connect().await.context("cannot reach the server for the scratch database")?;
    let (server_version_num,): (String,) = sqlx::query_as("SELECT current_setting('server_version_num')")
        .fetch_one(&mut admin)
        .await
        .map_err(sql_failed("reading the server version"))?;
    sqlx::raw_sql(&format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(&scratch_name)))
        .execute(&mut admin)
        .await
        .map_err(sql_failed(format_args!(
            "cannot create scratch database {scratch_name} on {server} (the role needs CREATEDB, or pass --scratch-url)"
        )))?;
    // A fresh connection drops the scratch database later: this one could time out meanwhile.
    let _ = admin.close().await;
    tracing::info!(scratch = %scratch_name, dump = %dump.name, "scratch database created");

    let scratch = server.with_database(&scratch_name);
    let restore_started = Instant::now();
    let outcome = tokio::select! {
        result = restore_and_compare(&scratch, &pg_restore, &dump.path, &manifest) => result,
        signal = stop_requested() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    let restore_time = restore_started.elapsed();

    // Drop the scratch database whatever happened; FORCE ends sessions left by a killed tool.
    let force = server_version_num.parse::<i32>().unwrap_or(0) >= 130_000;
    let dropped = drop_scratch(&server, &scratch_name, force).await;

    match (outcome, dropped) {
        (Ok(()), Ok(())) => {
            println!(
                "verify-backup: ok: {} ({} bytes, sha256 ok) restored into scratch database {scratch_name} in {} s; \
                 {} tables, {} rows and migrations {:?} match the manifest; scratch dropped; total {} s",
                dump.path.display(),
                manifest.bytes,
                seconds(restore_time),
                manifest.tables.len(),
                manifest.total_rows(),
                manifest.migrations,
                seconds(started.elapsed())
            );
            Ok(ExitCode::SUCCESS)
        }
        (Err(error), dropped) => {
            let note = match dropped {
                Ok(()) => format!("scratch database {scratch_name} dropped"),
                Err(drop_error) => format!("{drop_error:#}"),
            };
            Err(error.context(format!("verify-backup: {} FAILED ({note})", dump.name)))
        }
        (Ok(()), Err(drop_error)) => Err(drop_error.context(format!("verify-backup: {} restored fine", dump.name))),
    }
}

async fn restore_and_compare(
    scratch: &PgTarget,
    pg_restore: &std::path::Path,
    dump: &std::path::Path,
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let mut tool = scratch.tool_command(pg_restore)?;
    // Neither owners nor privileges: the scratch database belongs to the verifying role, which
    // holds no other role (a dump's ALTER DEFAULT PRIVILEGES FOR ROLE <owner> needs membership in
    // that role), and the comparison covers tables, columns, indexes, rows and migrations only.
    tool.command.args(["--no-owner", "--no-privileges", "--exit-on-error"]).arg(dump);
    run_tool(tool, "pg_restore")
        .await
        .with_context(|| format!("restore into scratch database {} failed", scratch.database_name()))?;
    let mut connection = scratch.connect().await?;
    let restored = inventory(&mut connection).await;
    let _ = connection.close().await;
    let faults = compare(&manifest.tables, &manifest.migrations, &restored?, true);
    if !faults.is_empty() {
        anyhow::bail!("restored database differs from the manifest: {}", faults.join("; "));
    }
    Ok(())
}

async fn drop_scratch(server: &PgTarget, name: &str, force: bool) -> anyhow::Result<()> {
    let sql = format!("DROP DATABASE IF EXISTS {}{}", quote_ident(name), if force { " WITH (FORCE)" } else { "" });
    let mut last_error = None;
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        let result = async {
            let mut admin = server.connect().await?;
            let result = sqlx::raw_sql(&sql).execute(&mut admin).await;
            let _ = admin.close().await;
            result.map(|_| ()).map_err(sql_failed("DROP DATABASE"))
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(error) => last_error = Some(error),
        }
    }
    let error = last_error.unwrap_or_else(|| anyhow::anyhow!("unknown error"));
    Err(anyhow::anyhow!("cannot drop scratch database {name} (drop it by hand): {error:#}"))
}

/// 16 hex digits from the standard library's per-process random hash keys and the clock.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}
