//! What every request goes through first: it gets its request id (kept in the task for the error
//! responses and log lines of the request, and returned in `x-request-id`), and requests that no
//! route could serve are refused before routing: an HTTP/1.1 request without `Host` (RFC 9112
//! requires the 400), a body larger than any route takes, or a URI longer than any route has.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, Version};
use axum::middleware::Next;
use axum::response::Response;

use super::errors::ErrorKind;
use crate::telemetry::request_id::{RequestId, REQUEST_ID_HEADER};
use crate::telemetry::{method_label, Metrics, UNMATCHED_ROUTE};

/// No route takes a request body; a declared body above this is refused rather than ignored.
pub const MAX_REQUEST_BODY: u64 = 64 * 1024;
/// No route has a URI anywhere near this long. (Above 64 KiB hyper answers 414 by itself.)
pub const MAX_URI_LENGTH: usize = 8 * 1024;

pub async fn identify_and_check(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
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
        None => id.scope(next.run(request)).await,
    };
    response.headers_mut().insert(&REQUEST_ID_HEADER, header_value);
    response
}

fn refusal(request: &Request) -> Option<ErrorKind> {
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
