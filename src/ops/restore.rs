//! `restore`: disaster recovery into the database of `DATABASE_URL`.
//!
//! Refused without `--yes` (nothing is touched, not even a connection). Then: checksum and
//! manifest; refused, nothing changed, into a database of another name than the dump's without
//! `--into-other-database`, or one whose tables of the dump's names have other columns;
//! `pg_restore --clean --if-exists --no-owner --single-transaction --exit-on-error` (all or
//! nothing: a failed restore leaves the database as it was), ANALYZE, and row counts compared
//! with the manifest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use sqlx::Connection;

use super::dumps::{check_dump, list_dumps, newest_good, DumpFile, Manifest};
use super::pg::{compare, find_tool, inventory, quote_table, run_tool, table_columns, user_tables, PgTarget};
use super::{seconds, sql_failed};
use crate::config::DatabaseArgs;
use crate::telemetry;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "latest"])))]
pub struct RestoreArgs {
    /// The database to restore into (its tables are replaced by those of the dump).
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The dump to restore (its .sha256 and .manifest.json must sit beside it).
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,

    /// Restore the newest dump of --dir.
    #[arg(long, requires = "dir")]
    pub latest: bool,

    /// Directory of the dumps, with --latest.
    #[arg(long, env = "BACKUP_DIR")]
    pub dir: Option<PathBuf>,

    /// Really replace the data of DATABASE_URL.
    #[arg(long)]
    pub yes: bool,

    /// Allow a target database whose name differs from the one the dump was taken of (a new
    /// database after a disaster, a copy for an investigation).
    #[arg(long)]
    pub into_other_database: bool,

    /// Directory holding pg_restore (default: found on PATH).
    #[arg(long, env = "PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
}

pub async fn run(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let target = PgTarget::from_args(&args.database)?;
    telemetry::init_logging(args.database.log_format, &args.database.log_level)?;
    let (dump, rerun) = match (&args.from, &args.dir) {
        (Some(file), _) => {
            if !file.is_file() {
                anyhow::bail!("--from {}: no such file", file.display());
            }
            (DumpFile::from_path(file)?, format!("endpoint-stats restore --from {} --yes", file.display()))
        }
        (None, Some(dir)) => {
            (newest_good_dump(dir)?, format!("endpoint-stats restore --latest --dir {} --yes", dir.display()))
        }
        (None, None) => anyhow::bail!("give --from FILE or --latest --dir DIR"),
    };
    if !args.yes {
        anyhow::bail!(
            "refusing to restore {} into {target} without --yes: it replaces the data there (nothing was changed); \
             scale the service to 0, then run: {rerun}",
            dump.path.display()
        );
    }

    let started = Instant::now();
    let manifest = check_dump(&dump).await.with_context(|| format!("restore: {} not restored", dump.name))?;
    let pg_restore = find_tool("pg_restore", args.pg_bin_dir.as_deref())?;

    let mut connection = target.connect().await.context("DATABASE_URL")?;
    let refused = refuse_foreign_target(&mut connection, &manifest, args.into_other_database).await;
    if let Err(error) = refused {
        let _ = connection.close().await;
        return Err(
            error.context(format!("refusing to restore {} into {target} (nothing was changed)", dump.path.display()))
        );
    }
    let (others,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND application_name = 'endpoint-stats'",
    )
    .fetch_one(&mut connection)
    .await
    .map_err(sql_failed("DATABASE_URL"))?;
    if others > 0 {
        eprintln!(
            "endpoint-stats: warning: {others} connection(s) of the service are open to {target}: accesses counted during \
             the restore will be lost and the check against the manifest may fail; scale the Deployment to 0 first"
        );
    }
    let _ = connection.close().await;

    tracing::info!(dump = %dump.path.display(), target = %target, "restore started");
    let mut tool = target.tool_command(&pg_restore)?;
    tool.command
        .args(["--clean", "--if-exists", "--no-owner", "--single-transaction", "--exit-on-error"])
        .arg(&dump.path);
    run_tool(tool, "pg_restore")
        .await
        .with_context(|| format!("restore of {} into {target} failed; the database is unchanged", dump.name))?;
    let restored_in = started.elapsed();

    let mut connection = target.connect().await.context("DATABASE_URL (after the restore)")?;
    // pg_restore does not restore planner statistics.
    for (schema, table) in user_tables(&mut connection).await? {
        sqlx::raw_sql(&format!("ANALYZE {}", quote_table(&schema, &table)))
            .execute(&mut connection)
            .await
            .map_err(sql_failed(format_args!("ANALYZE {schema}.{table}")))?;
    }
    let restored = inventory(&mut connection).await;
    let _ = connection.close().await;
    let faults = compare(&manifest.tables, &manifest.migrations, &restored?, false);
    if !faults.is_empty() {
        anyhow::bail!(
            "restore of {} into {target} completed but does not match the manifest: {}",
            dump.name,
            faults.join("; ")
        );
    }
    println!(
        "restore: {} restored into {target} in {} s (verified in {} s total): {} tables, {} rows match the manifest \
         (taken {} from database {})",
        dump.path.display(),
        seconds(restored_in),
        seconds(started.elapsed()),
        manifest.tables.len(),
        manifest.total_rows(),
        manifest.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
        manifest.database
    );
    Ok(ExitCode::SUCCESS)
}

/// The safety checks of a restore into an existing database, read-only; each refusal names its
/// check. `pg_restore --clean` replaces every table of the dump that exists in the target: a
/// mistyped DATABASE_URL would replace another application's table of the same name.
/// - database name: the target's name is the dump's, unless `--into-other-database`;
/// - table columns: every table of the dump that exists in the target has the dump's columns
///   (an `endpoint_access` of other columns is not this service's table).
async fn refuse_foreign_target(
    connection: &mut sqlx::PgConnection,
    manifest: &Manifest,
    into_other_database: bool,
) -> anyhow::Result<()> {
    let sql_error = sql_failed("inspecting DATABASE_URL");
    let (current,): (String,) =
        sqlx::query_as("SELECT current_database()").fetch_one(&mut *connection).await.map_err(&sql_error)?;
    if current != manifest.database && !into_other_database {
        anyhow::bail!(
            "check `database name`: the dump is of database {}, DATABASE_URL is database {current}; \
             if {current} is really to receive that data, add --into-other-database",
            manifest.database
        );
    }
    for (name, expected) in &manifest.tables {
        let Some((schema, table)) = name.split_once('.') else { continue };
        let quoted = quote_table(schema, table);
        let (exists,): (bool,) = sqlx::query_as("SELECT to_regclass($1) IS NOT NULL")
            .bind(&quoted)
            .fetch_one(&mut *connection)
            .await
            .map_err(&sql_error)?;
        if !exists {
            continue;
        }
        let found = table_columns(connection, &quoted).await.map_err(&sql_error)?;
        if found != expected.columns {
            anyhow::bail!(
                "check `table columns`: {name} in database {current} is not this service's table: its columns are \
                 [{}], the dump's are [{}]; rename or drop it by hand if it really is to be replaced",
                found.join(", "),
                expected.columns.join(", ")
            );
        }
    }
    Ok(())
}

/// `--latest`: the newest dump with its checksum and manifest. Newer ones without them (a backup
/// still running, or one that died half-way) are skipped, and named, rather than failing a
/// disaster recovery that has a good dump to restore.
fn newest_good_dump(dir: &Path) -> anyhow::Result<DumpFile> {
    let dumps = list_dumps(dir)?;
    let (newest, newer_incomplete) = newest_good(&dumps, dir).map_err(anyhow::Error::msg)?;
    for skipped in newer_incomplete {
        println!("restore: skipping newer {}: no checksum or manifest beside it", skipped.name);
    }
    Ok(newest.clone())
}
