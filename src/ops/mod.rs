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

/// Resolves when the process is asked to stop (SIGTERM from Kubernetes, Ctrl-C), naming the
/// signal; never resolves if no handler can be installed.
pub(crate) async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }
}

/// Seconds with millisecond precision, for summaries.
pub(crate) fn seconds(duration: std::time::Duration) -> String {
    format!("{:.2}", duration.as_secs_f64())
}
