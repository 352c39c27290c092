//! Logging and metrics.
//!
//! One Prometheus registry per process (not per worker thread), so process metrics and request
//! metrics are consistent whatever the runtime's thread count. Label values are bounded by
//! construction: `route` is a route template or `unmatched`, `method` a standard method or
//! `_OTHER`, `status` a numeric code.

pub mod request_id;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Latency buckets of the metrics contract; 1 s is an edge because SlowResponseTime reads p95 > 1 s.
pub const HTTP_DURATION_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Route label for requests that matched no route; never the raw path.
pub const UNMATCHED_ROUTE: &str = "unmatched";

pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("RUST_LOG: invalid filter `{filter}`: {e}"))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests build several applications in one process) keeps the first subscriber.
    let _ = result;
    Ok(())
}

/// A cheap handle (one `Arc`) to the process's metrics.
#[derive(Clone)]
pub struct Metrics(Arc<MetricsInner>);

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;

    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

pub struct MetricsInner {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    pub db_connections: IntGaugeVec,
    pub db_pool_max: IntGauge,
    pub db_commit_duration: Histogram,
    pub db_batch_size: Histogram,
    pub db_errors: IntCounterVec,
    pub db_commits_in_flight_limit: IntGauge,
    pub redis_operations: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub redis_available: IntGauge,
    pub http_connections: IntGauge,
    pub http_connections_max: IntGauge,
    pub http_connections_closed: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by method, route template and status code"),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(HTTP_DURATION_BUCKETS.to_vec()),
            &["method", "route", "status"],
        )?;
        let http_in_flight = IntGauge::new("http_requests_in_flight", "HTTP requests being served")?;
        let build_info = IntGaugeVec::new(
            Opts::new("endpoint_stats_build_info", "Build of the running binary (always 1)"),
            &["version", "revision"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), build_revision()]).set(1);
        let db_connections = IntGaugeVec::new(
            Opts::new("endpoint_stats_db_connections", "Database pool connections by state"),
            &["state"],
        )?;
        let db_pool_max = IntGauge::new("endpoint_stats_db_pool_max_connections", "Size limit of the database pool")?;
        let db_commit_duration = Histogram::with_opts(
            HistogramOpts::new("endpoint_stats_db_commit_duration_seconds", "Duration of one group commit")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )?;
        let db_batch_size = Histogram::with_opts(
            HistogramOpts::new("endpoint_stats_db_batch_size", "Accesses committed by one group commit")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
        )?;
        let db_errors = IntCounterVec::new(
            Opts::new("endpoint_stats_db_errors_total", "Database operations that failed"),
            &["operation"],
        )?;
        let db_commits_in_flight_limit = IntGauge::new(
            "endpoint_stats_db_commits_in_flight_limit",
            "Group commits the batcher lets overlap, chosen from the commit times it measures",
        )?;
        db_commits_in_flight_limit.set(1);
        let redis_operations = IntCounterVec::new(
            Opts::new("endpoint_stats_redis_operations_total", "Redis operations attempted"),
            &["operation"],
        )?;
        let redis_errors = IntCounterVec::new(
            Opts::new("endpoint_stats_redis_errors_total", "Redis operations that failed"),
            &["operation"],
        )?;
        let redis_available =
            IntGauge::new("endpoint_stats_redis_available", "1 when the last Redis operation succeeded")?;
        let http_connections = IntGauge::new("endpoint_stats_http_connections", "Open client connections")?;
        let http_connections_max =
            IntGauge::new("endpoint_stats_http_connections_max", "Cap on open client connections (MAX_CONNECTIONS)")?;
        let http_connections_closed = IntCounterVec::new(
            Opts::new(
                "endpoint_stats_http_connections_closed_total",
                "Client connections the server closed or refused, by reason",
            ),
            &["reason"],
        )?;

        // Series that alerts and panels read exist from the start, at zero, instead of appearing
        // with the first failure (a rate over a missing series is no data, not zero).
        for operation in ["commit", "read"] {
            db_errors.with_label_values(&[operation]);
        }
        for operation in ["ping", "flush_windows", "read_windows"] {
            redis_operations.with_label_values(&[operation]);
            redis_errors.with_label_values(&[operation]);
        }
        for reason in ["header_timeout", "idle_timeout", "evicted", "rejected"] {
            http_connections_closed.with_label_values(&[reason]);
        }
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(http_in_flight.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(db_connections.clone()))?;
        registry.register(Box::new(db_pool_max.clone()))?;
        registry.register(Box::new(db_commit_duration.clone()))?;
        registry.register(Box::new(db_batch_size.clone()))?;
        registry.register(Box::new(db_errors.clone()))?;
        registry.register(Box::new(db_commits_in_flight_limit.clone()))?;
        registry.register(Box::new(redis_operations.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        registry.register(Box::new(redis_available.clone()))?;
        registry.register(Box::new(http_connections.clone()))?;
        registry.register(Box::new(http_connections_max.clone()))?;
        registry.register(Box::new(http_connections_closed.clone()))?;
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        Ok(Self(Arc::new(MetricsInner {
            registry,
            http_requests,
            http_duration,
            http_in_flight,
            db_connections,
            db_pool_max,
            db_commit_duration,
            db_batch_size,
            db_errors,
            db_commits_in_flight_limit,
            redis_operations,
            redis_errors,
            redis_available,
            http_connections,
            http_connections_max,
            http_connections_closed,
        })))
    }

    /// The text exposition of every registered series.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let families = self.registry.gather();
        let mut buffer = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&families, &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    /// One served request in `http_requests_total` and `http_request_duration_seconds`.
    pub fn record_request(&self, method: &str, route: &str, status: StatusCode, duration: Duration) {
        let labels = [method, route, status.as_str()];
        self.http_requests.with_label_values(&labels).inc();
        self.http_duration.with_label_values(&labels).observe(duration.as_secs_f64());
    }

    pub fn redis_result<T, E>(&self, operation: &str, result: &Result<T, E>) {
        self.redis_operations.with_label_values(&[operation]).inc();
        match result {
            Ok(_) => self.redis_available.set(1),
            Err(_) => {
                self.redis_errors.with_label_values(&[operation]).inc();
                self.redis_available.set(0);
            }
        }
    }
}

/// Whole milliseconds, for reports and JSON (saturating: no duration here comes near the bound).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The git revision baked in at build time (`ENDPOINT_STATS_REVISION`), or `unknown`.
pub fn build_revision() -> &'static str {
    option_env!("ENDPOINT_STATS_REVISION").unwrap_or("unknown")
}

pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// Records the request metrics. Installed as a route layer, where the request carries its route
/// template, and on the 404/405 fallbacks, where it has none and the label is `unmatched`.
pub async fn track_http(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request.extensions().get::<MatchedPath>().cloned();
    let in_flight = InFlight::enter(&metrics.http_in_flight);
    let response = next.run(request).await;
    drop(in_flight);
    let route = route.as_ref().map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    metrics.record_request(method, route, response.status(), started.elapsed());
    response
}

/// Keeps `http_requests_in_flight` right even when a client disconnects and the request future is
/// dropped before it completes.
struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
