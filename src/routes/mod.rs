//! HTTP routes. Counted API routes live in `counting`, the probes in `probes`, and the
//! Prometheus and OpenAPI documents in `metrics` and `openapi`.

mod counting;
mod errors;
mod metrics;
mod openapi;
mod probes;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::get;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

pub use errors::ApiError;
pub use openapi::ApiDoc;

use crate::store::batcher::AccessCounter;
use crate::store::Database;
use crate::telemetry::{track_http, Metrics};
use crate::windows::Windows;

/// Shared by every request through one `Arc`, so a request costs one reference count, not one per
/// field.
pub type SharedState = Arc<AppState>;

pub struct AppState {
    pub counter: AccessCounter,
    pub database: Database,
    pub windows: Windows,
    pub metrics: Metrics,
    /// Set on SIGTERM so that readiness fails while in-flight requests drain.
    pub shutting_down: Arc<AtomicBool>,
}

pub fn router(state: AppState) -> Router {
    let track = || axum::middleware::from_fn_with_state(state.metrics.clone(), track_http);
    Router::new()
        .route("/", get(counting::root))
        .route("/stats", get(counting::stats))
        .route("/api/v1/endpoints", get(counting::endpoints))
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        // On matched routes the middleware sees the route template; the fallbacks carry the same
        // middleware and record the constant `unmatched`, so no request path becomes a label.
        .route_layer(track())
        .method_not_allowed_fallback(errors::method_not_allowed.layer(track()))
        .fallback(errors::not_found.layer(track()))
        .layer(CatchPanicLayer::custom(errors::panic_response))
        .with_state(Arc::new(state))
}
