//! What every request goes through first: it gets its request id (kept in the task for the error
//! responses and log lines of the request, and returned in `x-request-id`), and requests that no
//! route could serve are refused before routing: an HTTP/1.1 request without `Host` (RFC 9112
//! requires the 400), a body larger than any route takes, or a URI longer than any route has.

use std::time::Instant;

use axum::http::{header, Version};
use axum::response::Response;
use axum::Router;
use tower::ServiceExt;

use super::errors::ErrorKind;
use crate::telemetry::request_id::{RequestId, REQUEST_ID_HEADER};
use crate::telemetry::{method_label, Metrics, UNMATCHED_ROUTE};

/// No route takes a request body; a declared body above this is refused rather than ignored.
pub const MAX_REQUEST_BODY: u64 = 64 * 1024;
/// No route has a URI anywhere near this long. (Above 64 KiB hyper answers 414 by itself.)
pub const MAX_URI_LENGTH: usize = 8 * 1024;

/// Serves one request through `router`: its id is set for the whole request (task-local, for the
/// error bodies and log lines) and returned in `x-request-id`, and a request no route could serve
/// is refused before routing. Called by the server for every request, in place of a middleware
/// layer: a layer costs a boxed future per request on the hot path.
pub async fn identify_and_serve<B>(router: Router, metrics: &Metrics, request: hyper::Request<B>) -> Response
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let id = RequestId::from_headers(request.headers());
    let header_value = id.header_value();
    let mut response = match refusal(&request) {
        Some(kind) => {
            let started = Instant::now();
            let method = method_label(request.method());
            let response = id.scope(async { kind.response() }).await;
            metrics.record_request(method, UNMATCHED_ROUTE, response.status(), started.elapsed());
            response
        }
        None => match id.scope(router.oneshot(request)).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        },
    };
    response.headers_mut().insert(&REQUEST_ID_HEADER, header_value);
    response
}

fn refusal<B>(request: &hyper::Request<B>) -> Option<ErrorKind> {
    if request.version() == Version::HTTP_11 && !request.headers().contains_key(header::HOST) {
        return Some(ErrorKind::BadRequest);
    }
    let declared_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if declared_body > MAX_REQUEST_BODY {
        return Some(ErrorKind::PayloadTooLarge);
    }
    if request.uri().path_and_query().is_some_and(|pq| pq.as_str().len() > MAX_URI_LENGTH) {
        return Some(ErrorKind::UriTooLong);
    }
    None
}
