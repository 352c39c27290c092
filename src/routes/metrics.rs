//! Prometheus text exposition.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ErrorKind, SharedState};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[utoipa::path(get, path = "/metrics", tag = "probes", responses((status = 200, content_type = "text/plain")))]
pub async fn render(State(state): State<SharedState>) -> Response {
    // Pool gauges are sampled at scrape time rather than on every acquire.
    let (in_use, idle, max) = state.database.pool_usage();
    state.metrics.db_connections.with_label_values(&["in_use"]).set(i64::from(in_use));
    state.metrics.db_connections.with_label_values(&["idle"]).set(i64::from(idle));
    state.metrics.db_pool_max.set(i64::from(max));
    match state.metrics.render() {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(error) => {
            tracing::error!(%error, "metrics could not be rendered");
            ErrorKind::Internal.response()
        }
    }
}
