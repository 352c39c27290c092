//! `backup`: a consistent, checksummed dump with a manifest, and retention.
//!
//! Consistency: the command opens a REPEATABLE READ transaction, exports its snapshot, counts the
//! rows of every table in it and runs `pg_dump --snapshot` on the same snapshot, so the manifest
//! describes exactly what the dump holds even while replicas keep counting.
//!
//! Atomicity: everything is written under hidden `.….partial` names, fsynced, then renamed —
//! checksum and manifest first, the dump last — and the directory fsynced. A dump therefore
//! appears only complete and with its companions; any failure or interruption removes what this
//! run wrote.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::Connection;

use super::dumps::{
    checksum_line, dump_file_name, list_dumps, list_leftovers, newest_good, partial_name, sha256_file, Manifest,
    ToolInfo, MANIFEST_FORMAT,
};
use super::pg::{find_tool, inventory, run_tool, tool_version, PgTarget};
use super::{seconds, sql_failed, PendingFiles};
use crate::config::DatabaseArgs;
use crate::signals::stop_requested;
use crate::telemetry;

/// Unfinished files of a crashed run are removed by the next run once they are this old.
const STALE_PARTIAL_HOURS: i64 = 24;

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Directory of the dumps (created when missing).
    #[arg(long, env = "BACKUP_DIR")]
    pub dir: PathBuf,

    /// Dumps whose name-time is older than this are pruned, except the newest good one.
    #[arg(long, env = "BACKUP_RETENTION_DAYS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub retention_days: u32,

    /// Directory holding pg_dump (default: found on PATH). Use the server's major version.
    #[arg(long, env = "PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// Only apply the retention to the directory; write no dump (needs no database).
    #[arg(long)]
    pub prune_only: bool,
}

pub async fn run(args: BackupArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_logging(args.database.log_format, &args.database.log_level)?;
    let retention = chrono::Duration::days(i64::from(args.retention_days));
    if args.prune_only {
        let pruned = prune(&args.dir, retention, Utc::now())?;
        println!(
            "backup --prune-only: {} removed from {} (retention {} days)",
            describe_pruned(&pruned),
            args.dir.display(),
            args.retention_days
        );
        return Ok(ExitCode::SUCCESS);
    }

    let target = PgTarget::from_args(&args.database)?;
    let pg_dump = find_tool("pg_dump", args.pg_bin_dir.as_deref())?;
    prepare_backup_dir(&args.dir)?;

    let started = Instant::now();
    let now = Utc::now();
    let name = dump_file_name(now);
    let final_path = args.dir.join(&name);
    if final_path.exists() {
        anyhow::bail!("{} already exists: another backup ran this second", final_path.display());
    }

    let mut pending = PendingFiles::new();
    let outcome = tokio::select! {
        result = write_backup(&target, &pg_dump, &args.dir, &name, now, started, &mut pending) => result,
        signal = stop_requested() => Err(anyhow::anyhow!("interrupted by {signal}; unfinished files removed")),
    };
    let manifest = match outcome {
        Ok(manifest) => {
            pending.keep();
            manifest
        }
        Err(error) => {
            drop(pending); // removes this run's files before the error is reported
            return Err(error.context(format!("backup of {target} failed")));
        }
    };

    let pruned = prune(&args.dir, retention, now);
    let rows: Vec<String> = manifest.tables.iter().map(|(t, info)| format!("{t}={}", info.rows)).collect();
    tracing::info!(file = %final_path.display(), bytes = manifest.bytes, rows = manifest.total_rows(), "backup written");
    println!(
        "backup: {} {} bytes in {} s, {} rows ({}); {}",
        final_path.display(),
        manifest.bytes,
        seconds(started.elapsed()),
        manifest.total_rows(),
        rows.join(", "),
        match &pruned {
            Ok(pruned) => format!("{} pruned (retention {} days)", describe_pruned(pruned), args.retention_days),
            Err(_) => "pruning failed".to_owned(),
        }
    );
    pruned.context("the backup was written, but pruning old dumps failed")?;
    Ok(ExitCode::SUCCESS)
}

async fn write_backup(
    target: &PgTarget,
    pg_dump: &Path,
    dir: &Path,
    name: &str,
    now: DateTime<Utc>,
    started: Instant,
    pending: &mut PendingFiles,
) -> anyhow::Result<Manifest> {
    let pg_dump_version = tool_version(pg_dump).await?;
    let mut connection = target.connect().await.context("DATABASE_URL")?;

    // The snapshot is taken by the first statement of the transaction: the export itself.
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut connection)
        .await
        .map_err(sql_failed("starting the snapshot transaction"))?;
    let (snapshot,): (String,) = sqlx::query_as("SELECT pg_export_snapshot()")
        .fetch_one(&mut connection)
        .await
        .map_err(sql_failed("exporting the snapshot"))?;
    let (database, server_version, server_version_num, database_bytes): (String, String, String, i64) = sqlx::query_as(
        "SELECT current_database(), current_setting('server_version'), current_setting('server_version_num'), \
         pg_database_size(current_database())",
    )
    .fetch_one(&mut connection)
    .await
    .map_err(sql_failed("reading the server version"))?;
    let contents = inventory(&mut connection).await?;

    let temp_dump = dir.join(partial_name(name));
    pending.track(temp_dump.clone());
    // pg_dump creates its file 0666 minus the umask; it keeps the mode of one that exists.
    create_private(&temp_dump).await?;
    let mut tool = target.tool_command(pg_dump)?;
    tool.command.arg("--format=custom").arg(format!("--snapshot={snapshot}")).arg("--file").arg(&temp_dump);
    tracing::info!(database = %database, snapshot = %snapshot, "pg_dump started");
    run_tool(tool, "pg_dump").await?;
    // pg_dump has imported the snapshot and finished: the transaction may end.
    sqlx::raw_sql("COMMIT").execute(&mut connection).await.map_err(sql_failed("ending the snapshot transaction"))?;
    let _ = connection.close().await;

    sync_file(&temp_dump).await?;
    let (sha256, bytes) = sha256_file(&temp_dump).await?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        file: name.to_owned(),
        created_at: now,
        tool: ToolInfo {
            name: "endpoint-stats".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: telemetry::build_revision().to_owned(),
        },
        pg_dump_version,
        database,
        server_version,
        server_version_num: server_version_num.parse().unwrap_or_default(),
        snapshot,
        database_bytes,
        bytes,
        sha256: sha256.clone(),
        duration_seconds: started.elapsed().as_secs_f64(),
        tables: contents.tables,
        migrations: contents.migrations,
    };
    let manifest_json = serde_json::to_string_pretty(&manifest).context("serializing the manifest")?;

    let checksum_name = format!("{name}{}", super::dumps::CHECKSUM_SUFFIX);
    let manifest_name = format!("{name}{}", super::dumps::MANIFEST_SUFFIX);
    let temp_checksum = dir.join(partial_name(&checksum_name));
    let temp_manifest = dir.join(partial_name(&manifest_name));
    pending.track(temp_checksum.clone());
    pending.track(temp_manifest.clone());
    write_synced(&temp_checksum, checksum_line(&sha256, name).as_bytes()).await?;
    write_synced(&temp_manifest, format!("{manifest_json}\n").as_bytes()).await?;

    // Companions first, the dump last: the dump's appearance is the commit point.
    for (from, to) in [(temp_checksum, dir.join(&checksum_name)), (temp_manifest, dir.join(&manifest_name))] {
        pending.track(to.clone());
        rename(&from, &to).await?;
    }
    let final_dump = dir.join(name);
    pending.track(final_dump.clone());
    rename(&temp_dump, &final_dump).await?;
    sync_dir(dir).await?;
    Ok(manifest)
}

async fn sync_file(path: &Path) -> anyhow::Result<()> {
    let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
    file.sync_all().await.with_context(|| format!("cannot fsync {}", path.display()))
}

/// Creates the backup directory and missing parents 0700, and tightens an existing one to 0700: a
/// dump holds the whole database. A directory this user may not change (a volume's root owned by
/// root) stays as it is, with a warning; the files in it are 0600 whatever happens.
fn prepare_backup_dir(dir: &Path) -> anyhow::Result<()> {
    let cannot_create = || format!("--dir {}: cannot create the backup directory", dir.display());
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir).with_context(cannot_create)?;
        let mode = std::fs::metadata(dir).with_context(cannot_create)?.permissions().mode() & 0o7777;
        if mode != 0o700 {
            if let Err(error) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
                let mode = format!("{mode:o}");
                tracing::warn!(dir = %dir.display(), mode, %error, "backup directory left as it is, not 0700");
            }
        }
    }
    #[cfg(not(unix))]
    builder.create(dir).with_context(cannot_create)?;
    Ok(())
}

/// Opens `path` empty for writing, mode 0600 whatever the umask (or an earlier file's mode).
async fn create_private(path: &Path) -> anyhow::Result<tokio::fs::File> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let file = options.open(path).await.with_context(|| format!("cannot create {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .await
            .with_context(|| format!("cannot make {} private", path.display()))?;
    }
    Ok(file)
}

async fn write_synced(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = create_private(path).await?;
    file.write_all(contents).await.with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all().await.with_context(|| format!("cannot fsync {}", path.display()))
}

async fn rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    tokio::fs::rename(from, to).await.with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
}

async fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    let handle = tokio::fs::File::open(dir).await.with_context(|| format!("cannot open {}", dir.display()))?;
    handle.sync_all().await.with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Applies the retention: removes dumps (with their companions) whose name-time is older than
/// `retention`, except the newest good dump, which is kept whatever its age so that a directory
/// never loses its last restorable backup. Also removes companions whose dump is gone and
/// unfinished files of crashed runs, once old enough. Returns the dumps removed.
pub fn prune(dir: &Path, retention: chrono::Duration, now: DateTime<Utc>) -> anyhow::Result<Vec<String>> {
    let dumps = list_dumps(dir)?;
    let newest_good = newest_good(&dumps, dir).ok().map(|(dump, _)| dump.name.clone());
    let cutoff = now - retention;
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    for dump in &dumps {
        let too_old = dump.time.is_some_and(|t| t < cutoff);
        if !too_old || newest_good.as_deref() == Some(dump.name.as_str()) {
            continue;
        }
        for path in [dump.path.clone(), dump.checksum_path(), dump.manifest_path()] {
            if let Err(error) = remove_if_present(&path) {
                failures.push(format!("{}: {error}", path.display()));
            }
        }
        tracing::info!(file = %dump.path.display(), "pruned old dump");
        removed.push(dump.name.clone());
    }
    let partial_cutoff = now - chrono::Duration::hours(STALE_PARTIAL_HOURS);
    for (path, time) in list_leftovers(dir)? {
        let is_partial = path.extension().is_some_and(|e| e == "partial");
        let orphan = !is_partial && time < cutoff && !dump_of(&path).is_some_and(|d| d.exists());
        if (is_partial && time < partial_cutoff) || orphan {
            if let Err(error) = remove_if_present(&path) {
                failures.push(format!("{}: {error}", path.display()));
            }
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("cannot remove {}", failures.join("; "));
    }
    Ok(removed)
}

/// The dump a companion file belongs to.
fn dump_of(companion: &Path) -> Option<PathBuf> {
    let name = companion.file_name()?.to_str()?;
    let dump = name
        .strip_suffix(super::dumps::CHECKSUM_SUFFIX)
        .or_else(|| name.strip_suffix(super::dumps::MANIFEST_SUFFIX))?;
    Some(companion.with_file_name(dump))
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

fn describe_pruned(pruned: &[String]) -> String {
    match pruned.len() {
        0 => "no old dump".to_owned(),
        1 => format!("1 old dump ({})", pruned[0]),
        n => format!("{n} old dumps ({})", pruned.join(", ")),
    }
}
