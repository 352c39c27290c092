//! The command line: one binary, a subcommand per job, each subcommand owning its options (the
//! `ops` commands declare theirs beside their code). `serve` is the default.

use clap::{Parser, Subcommand};

use crate::config::{DatabaseArgs, ServeArgs};
use crate::ops;

#[derive(Debug, Parser)]
#[command(
    name = "endpoint-stats",
    version,
    about = "Counts accesses to its API endpoints: exactly, durably and fast, across replicas",
    propagate_version = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options of `serve`, also accepted without the subcommand (serve is the default).
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve(ServeArgs),
    /// Apply the database migrations and exit (for an init container).
    Migrate(DatabaseArgs),
    /// Write a consistent, checksummed dump of the database and prune old ones.
    Backup(ops::backup::BackupArgs),
    /// Restore the newest dump into a scratch database and compare it with its manifest.
    VerifyBackup(ops::verify::VerifyArgs),
    /// Disaster recovery: restore a dump into the database of DATABASE_URL.
    Restore(ops::restore::RestoreArgs),
    /// VACUUM ANALYZE, index and bloat report, Redis housekeeping.
    Maintain(ops::maintain::MaintainArgs),
    /// Health of the whole system: replicas, PostgreSQL, Redis, Prometheus, Alertmanager, backups.
    Check(ops::check::CheckArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_DATABASE_URL;

    #[test]
    fn rust_log_flag_matches_its_variable() {
        for flag in ["--rust-log", "--log-level"] {
            let cli = Cli::try_parse_from(["endpoint-stats", flag, "debug"]).expect(flag);
            assert_eq!(cli.serve.database.log_level, "debug", "{flag}");
        }
    }

    #[test]
    fn empty_database_url_means_the_sqlite_default() {
        for empty in ["", "  "] {
            let cli = Cli::try_parse_from(["endpoint-stats", "--database-url", empty]).expect("parses");
            let settings = cli.serve.database.settings().expect("empty counts as unset");
            assert_eq!(settings.url.expose(), DEFAULT_DATABASE_URL, "{empty:?}");
        }
    }
}
