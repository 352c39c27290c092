//! HTTP routes. Counted API routes live in `counting`, the probes in `probes`, and the
//! Prometheus and OpenAPI documents in `metrics` and `openapi`.

mod counting;
mod errors;
mod metrics;
mod openapi;
mod probes;
pub mod request_checks;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::get;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

pub use errors::{ApiError, ErrorKind};
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
    let metrics = state.metrics.clone();
    let routes = Router::new()
        // A HEAD is answered like a GET but counts nothing: it has no body to carry a count.
        .route("/", get(counting::root).head(counting::head))
        .route("/stats", get(counting::stats).head(counting::head))
        .route("/api/v1/endpoints", get(counting::endpoints).head(counting::head))
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document));
    with_request_layers(routes, metrics).with_state(Arc::new(state))
}

/// Request metrics and panic handling around `routes`. On matched routes the metrics middleware
/// sees the route template; the fallbacks carry the same middleware and record the constant
/// `unmatched`, so no request path becomes a label. The panic handler sits inside the metrics, so
/// that a handler's panic is counted as the 500 it is answered with. Before routing, the server
/// gives every request its id and the checks that need no route (`request_checks`).
fn with_request_layers<S: Clone + Send + Sync + 'static>(routes: Router<S>, metrics: Metrics) -> Router<S> {
    let track = || axum::middleware::from_fn_with_state(metrics.clone(), track_http);
    routes
        .route_layer(CatchPanicLayer::custom(errors::panic_response))
        .route_layer(track())
        .method_not_allowed_fallback(errors::method_not_allowed.layer(track()))
        .fallback(errors::not_found.layer(track()))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_is_counted() {
        let metrics = Metrics::new().expect("metrics");
        async fn boom() -> &'static str {
            panic!("handler bug")
        }
        let routes: Router = Router::new().route("/boom", get(boom));
        let app = with_request_layers(routes, metrics.clone());
        let response = app
            .oneshot(Request::get("/boom").header("host", "x").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = metrics.render().expect("render");
        assert!(
            text.contains(r#"http_requests_total{method="GET",route="/boom",status="500"} 1"#),
            "panic not counted:\n{text}"
        );
    }
}
