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
use crate::store::batcher::AccessCounter;
use crate::store::Database;
use crate::telemetry::Metrics;
use crate::windows::Windows;

/// The most the batcher gets, after the last request, to finish its last commit.
const BATCHER_DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// What the window flush (one Redis operation, at most 1 s) and the pool close get at the end.
const FLUSH_AND_CLOSE_LIMIT: Duration = Duration::from_millis(1500);

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    database: Database,
    windows: Windows,
    batcher: JoinHandle<()>,
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
            Some(redis) => Windows::redis(redis, metrics.clone()).context("REDIS_URL")?,
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
            metrics,
            shutting_down: shutting_down.clone(),
        };
        tracing::info!(
            address = %local_addr,
            database = database.backend_name(),
            windows = ?windows.source(),
            version = env!("CARGO_PKG_VERSION"),
            "endpoint-stats ready to serve"
        );
        Ok(Self {
            listener,
            local_addr,
            router: router(state),
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
    /// requests finish (their accesses commit), flushes the window counters and closes the pool,
    /// all within the grace period.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self {
            listener, router, database, windows, batcher, window_flusher, shutting_down, shutdown_grace, ..
        } = self;
        let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(None::<Instant>);
        let flag = shutting_down.clone();
        let graceful = async move {
            shutdown.await;
            flag.store(true, Ordering::Relaxed);
            tracing::info!("shutdown requested: draining in-flight requests");
            let _ = signalled_tx.send(Some(Instant::now()));
        };
        let server = axum::serve(listener, router).with_graceful_shutdown(graceful);
        // Boxed (not pinned on the stack) so that it can be dropped below, and the router with it.
        let mut server = Box::pin(std::future::IntoFuture::into_future(server));

        // The whole shutdown fits in the grace period: requests drain for what is left once the
        // batcher's share and the flush's are set aside.
        let batcher_share = BATCHER_DRAIN_LIMIT.min(shutdown_grace / 4);
        let drain_limit = shutdown_grace.saturating_sub(batcher_share + FLUSH_AND_CLOSE_LIMIT);
        let mut signalled = signalled_rx.clone();
        let drained = tokio::select! {
            result = &mut server => { result.context("server")?; true }
            _ = async { let _ = signalled.wait_for(Option::is_some).await; tokio::time::sleep(drain_limit).await } => false,
        };
        if !drained {
            tracing::warn!(drain = ?drain_limit, "drain time over with requests still in flight");
        }
        let signalled_at = *signalled_rx.borrow();
        let deadline = signalled_at.unwrap_or_else(Instant::now) + shutdown_grace;
        // Dropping the server dropped the router and with it every handle to the batcher: it
        // commits what is queued, answers it and ends.
        drop(server);
        let batcher_limit = deadline.saturating_duration_since(Instant::now()).saturating_sub(FLUSH_AND_CLOSE_LIMIT);
        let batcher_finished = tokio::time::timeout(batcher_limit, batcher).await.is_ok();
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
            // Its clients went with the server. A commit cut off like this is the one case whose
            // outcome is unknown (docs/operations/tuning.md).
            tracing::error!(limit = ?batcher_limit, "shutdown: the last commit did not finish within the grace period");
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
