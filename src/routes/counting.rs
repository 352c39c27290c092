//! The counted API routes. Each handler waits until its access is committed, then answers with
//! the committed count.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{ApiError, SharedState};
use crate::store::{CountedEndpoint, EndpointRecord};
use crate::telemetry::request_id::RequestId;
use crate::windows::{WindowSource, WindowsReport};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RootResponse {
    /// Always "Hello, World!".
    pub message: &'static str,
    /// Accesses to `/` including this one.
    pub access_count: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsResponse {
    /// Access count per endpoint, including this access to `/stats`.
    pub stats: BTreeMap<String, i64>,
    /// Accesses to `/stats` including this one.
    pub access_count: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointsResponse {
    pub endpoints: Vec<EndpointSummary>,
    pub windows: WindowsStatus,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointSummary {
    pub endpoint: String,
    pub access_count: i64,
    /// RFC 3339, UTC.
    pub first_accessed: DateTime<Utc>,
    /// RFC 3339, UTC.
    pub last_accessed: DateTime<Utc>,
    /// Accesses in the last minute (10 s resolution); null when the window store is unavailable.
    pub requests_last_minute: Option<u64>,
    /// Accesses in the last hour; null when the window store is unavailable.
    pub requests_last_hour: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WindowsStatus {
    /// `redis` (shared by all replicas) or `process` (this replica only).
    pub source: WindowSource,
    /// False when the window figures are missing (Redis down).
    pub available: bool,
    /// `redis_unavailable` when the figures are missing (the cause is in the service's log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

/// `HEAD` on a counted route: the status and content type of a `GET`, no body, and nothing
/// counted. There is no `content-length`: the body a `GET` would return holds a count that exists
/// only once an access is counted (RFC 9110 forbids a length other than the `GET`'s), so the body
/// is a stream of unknown length, which no framework layer turns into `content-length: 0`.
pub async fn head() -> (StatusCode, [(header::HeaderName, HeaderValue); 1], Body) {
    let no_length = futures_util::stream::empty::<Result<Bytes, Infallible>>();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        Body::from_stream(no_length),
    )
}

/// Counts this access and returns the count of `/` including it. A `HEAD` answers 200 with no
/// body and counts nothing.
#[utoipa::path(get, path = "/", tag = "counting",
    responses((status = 200, body = RootResponse), (status = 503, body = super::errors::ErrorBody)))]
pub async fn root(State(state): State<SharedState>) -> Result<Json<RootResponse>, ApiError> {
    let access = state.counter.record(CountedEndpoint::Root, false).await?;
    Ok(Json(RootResponse { message: "Hello, World!", access_count: access.access_count }))
}

/// Counts this access and returns every endpoint's count, this access included. A `HEAD` answers
/// 200 with no body and counts nothing.
#[utoipa::path(get, path = "/stats", tag = "counting",
    responses((status = 200, body = StatsResponse), (status = 503, body = super::errors::ErrorBody)))]
pub async fn stats(State(state): State<SharedState>) -> Result<Json<StatsResponse>, ApiError> {
    let access = state.counter.record(CountedEndpoint::Stats, true).await?;
    let mut stats: BTreeMap<String, i64> = access
        .snapshot
        .iter()
        .flat_map(|rows| rows.iter())
        .map(|row| (row.endpoint.clone(), row.access_count))
        .collect();
    // The snapshot holds the count after the whole batch; this access reports its own value.
    stats.insert(CountedEndpoint::Stats.path().to_owned(), access.access_count);
    Ok(Json(StatsResponse { stats, access_count: access.access_count }))
}

/// Counts this access and lists every endpoint with its recent windows. A `HEAD` answers 200 with
/// no body and counts nothing.
#[utoipa::path(get, path = "/api/v1/endpoints", tag = "counting",
    responses((status = 200, body = EndpointsResponse), (status = 503, body = super::errors::ErrorBody)))]
pub async fn endpoints(State(state): State<SharedState>) -> Result<Json<EndpointsResponse>, ApiError> {
    let own = CountedEndpoint::Endpoints;
    // Windows are read while the access commits; neither waits for the other.
    let (access, windows) = tokio::join!(state.counter.record(own, true), state.windows.report());
    let access = access?;
    let rows: &[EndpointRecord] = access.snapshot.as_deref().map_or(&[], Vec::as_slice);
    let (counts, error) = match windows {
        WindowsReport::Available(counts) => (Some(counts), None),
        WindowsReport::Unavailable(detail) => {
            // Debug only: during an outage every request would log it, and the outage itself is
            // already in the readiness log line and endpoint_stats_redis_errors_total.
            let request_id = RequestId::current();
            let request_id = request_id.as_ref().map_or("", RequestId::as_str);
            tracing::debug!(request_id, %detail, "recent-window figures unavailable");
            (None, Some("redis_unavailable"))
        }
    };
    let endpoints = rows
        .iter()
        .map(|row| {
            let endpoint = CountedEndpoint::from_path(&row.endpoint);
            let window = counts.zip(endpoint).map(|(counts, endpoint)| counts[endpoint.index()]);
            EndpointSummary {
                endpoint: row.endpoint.clone(),
                access_count: if endpoint == Some(own) { access.access_count } else { row.access_count },
                first_accessed: row.first_accessed,
                last_accessed: row.last_accessed,
                requests_last_minute: window.map(|w| w.last_minute),
                requests_last_hour: window.map(|w| w.last_hour),
            }
        })
        .collect();
    let windows = WindowsStatus { source: state.windows.source(), available: error.is_none(), error };
    Ok(Json(EndpointsResponse { endpoints, windows }))
}
