//! Every error response has one JSON shape, `{"error": message, "code": code, "request_id": id}`,
//! whichever layer produced it: a handler, the router's fallbacks, the request checks, a panic, or
//! the HTTP parser (see `crate::server::stream`). The message and code are stable texts for
//! clients; what went wrong inside (a database message, say) goes to the log line that carries the
//! same request id.

use std::any::Any;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;
use crate::telemetry::request_id::{RequestId, REQUEST_ID_HEADER};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words that do not change between releases.
    pub error: &'static str,
    /// A stable machine-readable code, e.g. `database_unavailable`.
    pub code: &'static str,
    /// The id of the request, also in the `x-request-id` header and the service's log.
    pub request_id: String,
}

/// The errors a client can get, each with its status, code and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    HeadersTooLarge,
    Internal,
    DatabaseUnavailable,
    DatabaseTimeout,
    Overloaded,
    ShuttingDown,
    ServerBusy,
}

impl ErrorKind {
    pub const fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::DatabaseUnavailable
            | Self::DatabaseTimeout
            | Self::Overloaded
            | Self::ShuttingDown
            | Self::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub const fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::Internal => "internal_error",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::DatabaseTimeout => "database_timeout",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::ServerBusy => "server_busy",
        }
    }

    pub const fn message(self) -> &'static str {
        match self {
            Self::BadRequest => "bad request",
            Self::NotFound => "not found",
            Self::MethodNotAllowed => "method not allowed",
            Self::RequestTimeout => "request headers not received in time",
            Self::PayloadTooLarge => "request body too large",
            Self::UriTooLong => "request URI too long",
            Self::HeadersTooLarge => "request headers too large",
            Self::Internal => "internal error",
            Self::DatabaseUnavailable => "database unavailable: the access was not counted",
            Self::DatabaseTimeout => "database did not answer in time: the access was not counted",
            Self::Overloaded => "too many accesses waiting to be counted: the access was not counted",
            Self::ShuttingDown => "the service is shutting down: the access was not counted",
            Self::ServerBusy => "too many open connections",
        }
    }

    /// The status an HTTP parser error maps to, for the statuses hyper answers by itself.
    pub fn from_parser_status(status: u16) -> Option<Self> {
        match status {
            400 => Some(Self::BadRequest),
            408 => Some(Self::RequestTimeout),
            414 => Some(Self::UriTooLong),
            431 => Some(Self::HeadersTooLarge),
            _ => None,
        }
    }

    /// The JSON body of this error for request `id`.
    pub fn body(self, id: &RequestId) -> String {
        let body = ErrorBody { error: self.message(), code: self.code(), request_id: id.to_string() };
        // Serialising static strings and a header-safe id cannot fail; the fallback keeps the shape.
        serde_json::to_string(&body)
            .unwrap_or_else(|_| format!(r#"{{"error":"{}","code":"{}"}}"#, self.message(), self.code()))
    }

    /// The response for this error, in the request served on this task.
    pub fn response(self) -> Response {
        let id = RequestId::current().unwrap_or_else(RequestId::generate);
        let mut response =
            (self.status(), [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], self.body(&id))
                .into_response();
        response.headers_mut().insert(&REQUEST_ID_HEADER, id.header_value());
        response
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::MethodNotAllowed => ErrorKind::MethodNotAllowed,
            Self::Store(StoreError::Unavailable(_) | StoreError::MigrationsPending(_)) => {
                ErrorKind::DatabaseUnavailable
            }
            Self::Store(StoreError::Timeout(_)) => ErrorKind::DatabaseTimeout,
            Self::Store(StoreError::Overloaded(_)) => ErrorKind::Overloaded,
            Self::Store(StoreError::ShuttingDown) => ErrorKind::ShuttingDown,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.kind();
        if kind.status().is_server_error() {
            let request_id = RequestId::current();
            let request_id = request_id.as_ref().map_or("", RequestId::as_str);
            tracing::warn!(request_id, code = kind.code(), detail = %self, "request failed");
        }
        kind.response()
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> Response {
    let mut response = ApiError::MethodNotAllowed.into_response();
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

pub fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    let request_id = RequestId::current();
    tracing::error!(request_id = request_id.as_ref().map_or("", RequestId::as_str), "request handler panicked");
    ErrorKind::Internal.response()
}
