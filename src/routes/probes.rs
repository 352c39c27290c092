//! Liveness and readiness.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::SharedState;
use crate::store::StoreError;
use crate::telemetry::request_id::RequestId;

/// A readiness probe must answer before the kubelet's own timeout (1 s by default).
const READY_CHECK_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthResponse {
    pub status: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadyResponse {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    /// What is down, when not ready, e.g. `database: unavailable; server: shutting_down`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub checks: ReadyChecks,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadyChecks {
    /// `ok`, `unavailable`, `timeout` or `migrations_pending` (the cause is in the service's log).
    pub database: &'static str,
    /// `ok`, `not_configured` or `degraded` (Redis never fails readiness).
    pub redis: &'static str,
    /// `ok` or `shutting_down`.
    pub server: &'static str,
}

/// Liveness: the process serves. Never touches the database, so a database outage does not make
/// Kubernetes restart healthy pods.
#[utoipa::path(get, path = "/health", tag = "probes", responses((status = 200, body = HealthResponse)))]
pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok" })
}

/// Readiness: database answers and migrations are applied, and the replica is not shutting down.
#[utoipa::path(get, path = "/ready", tag = "probes",
    responses((status = 200, body = ReadyResponse), (status = 503, body = ReadyResponse)))]
pub async fn ready(State(state): State<SharedState>) -> Response {
    let database = async {
        let result = match tokio::time::timeout(READY_CHECK_TIMEOUT, state.database.check_ready()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(READY_CHECK_TIMEOUT)),
        };
        if result.is_err() {
            state.metrics.db_errors.with_label_values(&["read"]).inc();
        }
        result
    };
    let (database, redis) = tokio::join!(database, state.windows.redis_health());
    let shutting_down = state.shutting_down.load(Ordering::Relaxed);

    let request_id = RequestId::current();
    let request_id = request_id.as_ref().map_or("", RequestId::as_str);
    let database = match database {
        Ok(()) => "ok",
        Err(error) => {
            tracing::warn!(request_id, %error, "readiness: database check failed");
            match error {
                StoreError::Timeout(_) => "timeout",
                StoreError::MigrationsPending(_) => "migrations_pending",
                _ => "unavailable",
            }
        }
    };
    let redis = match redis {
        None => "not_configured",
        Some(Ok(())) => "ok",
        Some(Err(error)) => {
            tracing::warn!(request_id, %error, "readiness: Redis degraded (the recent-window figures are missing)");
            "degraded"
        }
    };
    let server = if shutting_down { "shutting_down" } else { "ok" };
    let problems: Vec<String> = [("database", database), ("server", server)]
        .into_iter()
        .filter(|(_, status)| *status != "ok")
        .map(|(what, status)| format!("{what}: {status}"))
        .collect();
    let checks = ReadyChecks { database, redis, server };
    if problems.is_empty() {
        (StatusCode::OK, Json(ReadyResponse { status: "ready", error: None, checks })).into_response()
    } else {
        let body = ReadyResponse { status: "unavailable", error: Some(problems.join("; ")), checks };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}
