//! The HTTP/1 server: what `axum::serve` does, plus the limits a public service needs.
//!
//! - **Header-read timeout.** A request's head must arrive within `header_read_timeout` of its
//!   first byte; a slow client gets a JSON 408 and is closed.
//! - **Idle timeout.** A connection with no request in flight and no byte moving for
//!   `idle_timeout` is closed (a keep-alive client that went quiet, or one that stopped reading).
//! - **Connection cap.** At `max_connections` (lowered to fit the open-file limit), a new
//!   connection is admitted by closing the longest-quiet connection that has no request in flight.
//!   Probes and scrapes open or reuse a connection and send their request at once, so they always
//!   find room while idle and slow clients are shed; only when every connection is busy is a new
//!   one answered 503 and closed.
//! - **Shutdown.** Accepting stops, connections without a request in flight are closed at once
//!   (a half-sent request has nothing to wait for), and the others finish their request first.
//!
//! hyper answers malformed requests (400, 414, 431) by itself with an empty body;
//! [`stream::TrackedStream`] replaces those answers with the service's JSON error shape.

mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::config::ConnectionLimits;
use crate::routes::{request_checks, ErrorKind};
use crate::telemetry::request_id::RequestId;
use crate::telemetry::{millis, Metrics};
use stream::TrackedStream;

/// The largest request head hyper buffers. Above hyper's own URI limit (64 KiB, answered 414), so
/// that a long URI gets its own status; a larger head is answered 431. It also bounds the memory a
/// slow client can pin: at most this much per connection.
const MAX_REQUEST_HEAD: usize = 80 * 1024;
/// File descriptors kept free for everything but client connections (the database pool is added).
const RESERVED_FDS: u64 = 32;
/// The most often the "connection limit reached" line is logged.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why the server closed a connection; also the `reason` label of
/// `endpoint_stats_http_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    HeaderTimeout = 1,
    IdleTimeout = 2,
    Evicted = 3,
    Shutdown = 4,
}

impl CloseReason {
    fn label(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Evicted => "evicted",
            Self::Shutdown => "shutdown",
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        [Self::HeaderTimeout, Self::IdleTimeout, Self::Evicted, Self::Shutdown].into_iter().find(|r| *r as u8 == value)
    }
}

/// What the server and every connection share.
struct Shared {
    metrics: Metrics,
    limits: ConnectionLimits,
    started: Instant,
    open: Mutex<HashMap<u64, Arc<ConnectionState>>>,
    last_limit_log: Mutex<Option<Instant>>,
}

impl Shared {
    /// Milliseconds since the server started, never 0 (0 means "not set" in the atomics).
    fn now_ms(&self) -> u64 {
        millis(self.started.elapsed()).saturating_add(1)
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnectionState>>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self, connection: &ConnectionState, reason: CloseReason) {
        if connection.request_close(reason) && reason != CloseReason::Shutdown {
            self.metrics.http_connections_closed.with_label_values(&[reason.label()]).inc();
        }
    }

    /// Closes the connections that have been quiet for too long.
    fn sweep(&self) {
        let now = self.now_ms();
        let header_ms = millis(self.limits.header_read_timeout);
        let idle_ms = millis(self.limits.idle_timeout);
        for connection in self.open().values() {
            match connection.quiet_since() {
                Quiet::ReadingHead(since) if now.saturating_sub(since) >= header_ms => {
                    self.close(connection, CloseReason::HeaderTimeout);
                }
                Quiet::Idle(since) if now.saturating_sub(since) >= idle_ms => {
                    self.close(connection, CloseReason::IdleTimeout);
                }
                _ => {}
            }
        }
    }

    /// Makes room for one more connection: closes the one quiet the longest (no request in
    /// flight). False when every connection is busy.
    fn evict_one(&self) -> bool {
        let victim = self
            .open()
            .values()
            .filter_map(|c| match c.quiet_since() {
                Quiet::Idle(since) | Quiet::ReadingHead(since) => Some((since, c.clone())),
                Quiet::Busy | Quiet::Closing => None,
            })
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, connection)) => {
                self.close(&connection, CloseReason::Evicted);
                true
            }
            None => false,
        }
    }

    fn log_limit(&self, what: &str) {
        let mut last = self.last_limit_log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= LIMIT_LOG_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(
                max_connections = self.limits.max_connections,
                "connection limit reached: {what} (logged at most every {LIMIT_LOG_INTERVAL:?}; \
                 endpoint_stats_http_connections_closed_total counts each)"
            );
        }
    }
}

/// One connection's state, shared by its task, its stream and its requests.
struct ConnectionState {
    id: u64,
    /// Requests whose response is not produced yet.
    in_flight: AtomicU32,
    /// When the first byte of a request head arrived (ms, 0 while none is being read).
    head_started: AtomicU64,
    /// When a byte last moved either way, or a request ended (ms).
    last_activity: AtomicU64,
    /// A [`CloseReason`] once the server decided to close the connection (0 before).
    closing: AtomicU8,
    close_requested: Notify,
}

enum Quiet {
    Busy,
    Closing,
    ReadingHead(u64),
    Idle(u64),
}

impl ConnectionState {
    fn new(id: u64, now: u64) -> Self {
        Self {
            id,
            in_flight: AtomicU32::new(0),
            head_started: AtomicU64::new(0),
            last_activity: AtomicU64::new(now),
            closing: AtomicU8::new(0),
            close_requested: Notify::new(),
        }
    }

    fn quiet_since(&self) -> Quiet {
        if self.closing.load(Ordering::Relaxed) != 0 {
            return Quiet::Closing;
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Quiet::Busy;
        }
        match self.head_started.load(Ordering::Relaxed) {
            0 => Quiet::Idle(self.last_activity.load(Ordering::Relaxed)),
            since => Quiet::ReadingHead(since),
        }
    }

    /// True for the first close request (the first reason wins).
    fn request_close(&self, reason: CloseReason) -> bool {
        let first = self.closing.compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if first {
            self.close_requested.notify_one();
        }
        first
    }

    fn closing(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.closing.load(Ordering::Acquire))
    }

    fn has_request_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    fn bytes_read(&self, now: u64) {
        self.last_activity.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == 0 {
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    fn bytes_written(&self, now: u64) {
        self.last_activity.store(now, Ordering::Relaxed);
    }
}

/// A request being served: counts in `in_flight` until its response is produced, even when its
/// future is dropped (the client went away).
struct RequestInFlight {
    connection: Arc<ConnectionState>,
    shared: Arc<Shared>,
}

impl RequestInFlight {
    fn enter(connection: Arc<ConnectionState>, shared: Arc<Shared>) -> Self {
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        // The head is complete: the header-read timeout no longer applies.
        connection.head_started.store(0, Ordering::Relaxed);
        Self { connection, shared }
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.connection.last_activity.store(self.shared.now_ms(), Ordering::Relaxed);
        self.connection.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes a connection from the open set when its task ends or is aborted.
struct Registration {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let open = {
            let mut open = self.shared.open();
            open.remove(&self.id);
            open.len()
        };
        self.shared.metrics.http_connections.set(i64::try_from(open).unwrap_or(i64::MAX));
    }
}

pub struct Server {
    listener: TcpListener,
    router: Router,
    shared: Arc<Shared>,
    http: hyper::server::conn::http1::Builder,
    tasks: JoinSet<()>,
    next_id: u64,
}

/// A server that stopped accepting: [`Stopped::drain`] finishes it.
pub struct Stopped {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Server {
    /// `reserved_fds`: descriptors the rest of the process needs (database pool, Redis, logs).
    pub fn new(
        listener: TcpListener,
        router: Router,
        limits: ConnectionLimits,
        metrics: Metrics,
        reserved_fds: u64,
    ) -> Self {
        let limits = fit_to_open_file_limit(limits, reserved_fds);
        metrics.http_connections_max.set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
        let mut http = hyper::server::conn::http1::Builder::new();
        // The header-read timeout is ours (it must not also end idle keep-alive connections, as
        // hyper's does), so hyper needs no timer.
        http.header_read_timeout(None).max_buf_size(MAX_REQUEST_HEAD).keep_alive(true);
        let shared = Arc::new(Shared {
            metrics,
            limits,
            started: Instant::now(),
            open: Mutex::new(HashMap::new()),
            last_limit_log: Mutex::new(None),
        });
        Self { listener, router, shared, http, tasks: JoinSet::new(), next_id: 0 }
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.shared.limits
    }

    /// Serves until `shutdown` completes, then stops accepting.
    pub async fn serve_until(mut self, shutdown: impl Future<Output = ()>) -> Stopped {
        let sweeper = tokio::spawn(sweep_periodically(Arc::downgrade(&self.shared)));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => self.admit(stream),
                    Err(error) => self.accept_failed(&error).await,
                },
                // Reap finished connection tasks so that their results do not pile up.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        sweeper.abort();
        Stopped { shared: self.shared, tasks: self.tasks }
    }

    fn admit(&mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        if self.shared.open().len() >= self.shared.limits.max_connections {
            if self.shared.evict_one() {
                self.shared.log_limit("closed the longest-idle connection to admit a new one");
            } else {
                self.shared.metrics.http_connections_closed.with_label_values(&["rejected"]).inc();
                self.shared.log_limit("every connection is busy; a new connection was answered 503");
                stream::reject(stream, ErrorKind::ServerBusy);
                return;
            }
        }
        self.next_id += 1;
        let connection = Arc::new(ConnectionState::new(self.next_id, self.shared.now_ms()));
        let open = {
            let mut open = self.shared.open();
            open.insert(connection.id, connection.clone());
            open.len()
        };
        self.shared.metrics.http_connections.set(i64::try_from(open).unwrap_or(i64::MAX));
        let registration = Registration { id: connection.id, shared: self.shared.clone() };
        let io = TokioIo::new(TrackedStream::new(stream, connection.clone(), self.shared.clone()));
        let (router, shared, state) = (self.router.clone(), self.shared.clone(), connection.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_flight = RequestInFlight::enter(state.clone(), shared.clone());
            let (router, shared) = (router.clone(), shared.clone());
            async move {
                let response = request_checks::identify_and_serve(router, &shared.metrics, request).await;
                drop(in_flight);
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let serving = self.http.serve_connection(io, service);
        self.tasks.spawn(async move {
            let _registration = registration;
            tokio::pin!(serving);
            let result = tokio::select! {
                result = serving.as_mut() => result,
                () = connection.close_requested.notified() => {
                    // A request in flight finishes, then keep-alive ends the connection; otherwise
                    // the stream answers hyper's next read with end-of-file (see TrackedStream).
                    if connection.has_request_in_flight() {
                        serving.as_mut().graceful_shutdown();
                    }
                    serving.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }

    /// Out of file descriptors (or another transient accept error): make room and retry shortly,
    /// instead of spinning or failing the server.
    async fn accept_failed(&self, error: &std::io::Error) {
        if self.shared.evict_one() {
            self.shared.log_limit(&format!("accept failed ({error}); closed the longest-idle connection"));
        } else {
            self.shared.log_limit(&format!("accept failed ({error})"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Stopped {
    /// Closes connections without a request in flight at once and lets the others finish theirs
    /// within `limit`. True when every request finished; the rest are cut off.
    pub async fn drain(mut self, limit: Duration) -> bool {
        for connection in self.shared.open().values() {
            self.shared.close(connection, CloseReason::Shutdown);
        }
        let finished = async { while self.tasks.join_next().await.is_some() {} };
        let drained = tokio::time::timeout(limit, finished).await.is_ok();
        self.tasks.shutdown().await;
        drained
    }
}

async fn sweep_periodically(shared: std::sync::Weak<Shared>) {
    let period = match shared.upgrade() {
        Some(shared) => (shared.limits.header_read_timeout.min(shared.limits.idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1)),
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match shared.upgrade() {
            Some(shared) => shared.sweep(),
            None => return,
        }
    }
}

/// The connection cap, lowered when the open-file limit would be reached first: past that,
/// `accept` fails and the probes with it.
fn fit_to_open_file_limit(mut limits: ConnectionLimits, reserved_fds: u64) -> ConnectionLimits {
    let Ok(rlimit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.ok_or(()) else {
        return limits; // unlimited
    };
    let reserve = RESERVED_FDS + reserved_fds;
    let fits = usize::try_from(rlimit.saturating_sub(reserve).max(1)).unwrap_or(usize::MAX);
    if fits < limits.max_connections {
        tracing::warn!(
            max_connections = limits.max_connections,
            open_file_limit = rlimit,
            lowered_to = fits,
            "MAX_CONNECTIONS lowered to fit the open-file limit (raise `ulimit -n` to allow more)"
        );
        limits.max_connections = fits;
    }
    limits
}

/// A request id and log line for a request hyper rejected before it reached the router.
fn parser_rejection(kind: ErrorKind) -> RequestId {
    let id = RequestId::generate();
    tracing::info!(request_id = %id, status = kind.status().as_u16(), code = kind.code(), "malformed request rejected");
    id
}
