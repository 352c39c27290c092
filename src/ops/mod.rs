//! Operations commands: the CronJobs and the operator run the same binary as the service.
//!
//! - [`backup`]: consistent `pg_dump` with checksum and manifest, retention
//! - [`verify`]: real restore of the newest dump into a scratch database, compared with its manifest
//! - [`restore`]: disaster recovery into the database of `DATABASE_URL`
//! - [`maintain`]: VACUUM (ANALYZE), bloat and index report, Redis housekeeping
//! - [`check`]: health of the whole system, as a table or JSON, with an exit code for scripts

pub mod backup;
pub mod check;
mod dumps;
pub mod maintain;
mod pg;
pub mod restore;
pub mod verify;

use std::path::PathBuf;

/// Files that a command is writing and that must not survive a failure (or an interruption):
/// removed on drop unless [`PendingFiles::keep`] was called.
pub(crate) struct PendingFiles {
    paths: Vec<PathBuf>,
}

impl PendingFiles {
    pub(crate) fn new() -> Self {
        Self { paths: Vec::new() }
    }

    pub(crate) fn track(&mut self, path: PathBuf) {
        self.paths.push(path);
    }

    /// The work succeeded: leave the files in place.
    pub(crate) fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for PendingFiles {
    fn drop(&mut self) {
        for path in &self.paths {
            match std::fs::remove_file(path) {
                Ok(()) => tracing::info!(file = %path.display(), "removed unfinished file"),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => eprintln!("endpoint-stats: warning: cannot remove {}: {error}", path.display()),
            }
        }
    }
}

/// How dumps are named, for whoever makes or reads a backup folder (the tests do).
pub use dumps::{dump_file_name, parse_dump_name};

/// `map_err` for a failed SQL step: what was being done, and the database's words without secrets.
/// (`&sql_failed(…)` serves several steps.)
pub(crate) fn sql_failed(what: impl std::fmt::Display) -> impl Fn(sqlx::Error) -> anyhow::Error {
    move |error| anyhow::anyhow!("{what}: {}", crate::store::describe_sqlx_error(&error))
}

/// How a part of a report fared, in the words of the JSON reports of `check` and `maintain`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Failed,
    /// Not configured, so not looked at (the state of a report part before its work).
    #[default]
    Skipped,
}

/// Seconds with millisecond precision, for summaries.
pub(crate) fn seconds(duration: std::time::Duration) -> String {
    format!("{:.2}", duration.as_secs_f64())
}
