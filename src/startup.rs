//! `Application::build`: connect, migrate, wire the router, bind. `run_until_stopped`: serve with
//! graceful shutdown.
//!
//! Tests build the same application on port 0 with their own database, as production does.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::routes::{router, AppState};
use crate::server::Server;
use crate::store::batcher::{AccessCounter, Batcher};
use crate::store::Database;
use crate::telemetry::Metrics;
use crate::windows::Windows;

/// The most the batcher gets, after the last request, to finish its last commit.
const BATCHER_DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// What the window flush (one Redis operation, at most 1 s) and the pool close get at the end.
const FLUSH_AND_CLOSE_LIMIT: Duration = Duration::from_millis(1500);

pub struct Application {
    server: Server,
    local_addr: SocketAddr,
    database: Database,
    windows: Windows,
    batcher: Batcher,
    window_flusher: Option<JoinHandle<()>>,
    shutting_down: Arc<AtomicBool>,
    shutdown_grace: Duration,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Metrics::new().context("metrics registry")?;
        let database = Database::connect(&settings.database)
            .await
            .with_context(|| format!("DATABASE_URL: cannot use {}", settings.database.url))?;
        database.migrate_if_pending().await.context("DATABASE_URL: migrations")?;

        let windows = match &settings.redis {
            Some(redis) => Windows::redis(redis, metrics.clone()).map_err(anyhow::Error::msg)?,
            None => Windows::in_process(metrics.clone()),
        };
        if let (Some(redis), Some(Err(error))) = (&settings.redis, windows.redis_health().await) {
            // A Redis that cannot be reached at start is most often a wrong REDIS_URL, which would
            // otherwise go unnoticed behind degraded windows (SPEC §5). Once running, an outage
            // only degrades the windows (§3): counting never waits for Redis.
            anyhow::bail!("REDIS_URL: cannot use {}: {error}", redis.shown_url());
        }

        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("PORT/BIND: cannot listen on {}", settings.listen))?;
        let local_addr = listener.local_addr().context("listener address")?;

        let (counter, batcher) =
            AccessCounter::start(database.clone(), windows.clone(), metrics.clone(), settings.request_timeout);
        let window_flusher = windows.spawn_flusher();
        let shutting_down = Arc::new(AtomicBool::new(false));
        let state = AppState {
            counter,
            database: database.clone(),
            windows: windows.clone(),
            metrics: metrics.clone(),
            shutting_down: shutting_down.clone(),
        };
        let server =
            Server::new(listener, router(state), settings.connections, metrics, u64::from(settings.database.pool_size));
        tracing::info!(
            address = %local_addr,
            database = database.backend_name(),
            windows = ?windows.source(),
            max_connections = server.limits().max_connections,
            version = env!("CARGO_PKG_VERSION"),
            "endpoint-stats ready to serve"
        );
        Ok(Self {
            server,
            local_addr,
            database,
            windows,
            batcher,
            window_flusher,
            shutting_down,
            shutdown_grace: settings.shutdown_grace,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then: fails readiness, stops accepting, lets in-flight
    /// requests finish (their accesses commit), stops the batcher once it has committed what is
    /// queued, flushes the window counters and closes the pool, all within the grace period.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { server, database, windows, batcher, window_flusher, shutting_down, shutdown_grace, .. } = self;
        let stopped = server.serve_until(shutdown).await;
        let signalled_at = Instant::now();
        shutting_down.store(true, Ordering::Relaxed);
        tracing::info!("shutdown requested: draining in-flight requests");

        // The whole shutdown fits in the grace period: requests drain for what is left once the
        // batcher's share and the flush's are set aside.
        let batcher_share = BATCHER_DRAIN_LIMIT.min(shutdown_grace / 4);
        let drain_limit = shutdown_grace.saturating_sub(batcher_share + FLUSH_AND_CLOSE_LIMIT);
        if !stopped.drain(drain_limit).await {
            tracing::warn!(drain = ?drain_limit, "drain time over with requests still in flight");
        }
        let deadline = signalled_at + shutdown_grace;
        let batcher_limit = deadline.saturating_duration_since(Instant::now()).saturating_sub(FLUSH_AND_CLOSE_LIMIT);
        let batcher_finished = matches!(tokio::time::timeout(batcher_limit, batcher.finish()).await, Ok(Ok(())));
        if let Some(flusher) = window_flusher {
            flusher.abort();
        }
        let flush_and_close = async {
            windows.flush().await;
            database.close().await;
        };
        if tokio::time::timeout(FLUSH_AND_CLOSE_LIMIT, flush_and_close).await.is_err() {
            tracing::warn!(limit = ?FLUSH_AND_CLOSE_LIMIT, "window flush and pool close cut short");
        }
        if !batcher_finished {
            // A commit cut off like this is the one case whose outcome is unknown
            // (docs/operations/tuning.md).
            tracing::error!(limit = ?batcher_limit, "shutdown: the last commit did not finish within the grace period");
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

async fn shutdown_signal() {
    let signal = crate::signals::stop_requested().await;
    tracing::info!(signal, "stop requested");
}
