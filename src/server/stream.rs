//! The TCP stream as hyper sees it: it records when bytes move (for the timeouts), ends a
//! connection the server decided to close, and gives hyper's own error answers the JSON shape.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{parser_rejection, CloseReason, ConnectionState, Shared};
use crate::routes::ErrorKind;
use crate::telemetry::request_id::RequestId;
use crate::telemetry::UNMATCHED_ROUTE;

pub(super) struct TrackedStream {
    stream: TcpStream,
    connection: Arc<ConnectionState>,
    shared: Arc<Shared>,
    /// A replacement answer still being written, and how much of it went out.
    replacement: Option<(Vec<u8>, usize)>,
}

impl TrackedStream {
    pub(super) fn new(stream: TcpStream, connection: Arc<ConnectionState>, shared: Arc<Shared>) -> Self {
        Self { stream, connection, shared, replacement: None }
    }

    /// Writes what is left of a replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written >= bytes.len() {
                self.replacement = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// A closed connection stops writing, except to finish the answer of a request in flight at
    /// shutdown: idle and evicted connections may be stuck on a client that stopped reading.
    fn write_refused(&self) -> bool {
        matches!(self.connection.closing(), Some(CloseReason::IdleTimeout | CloseReason::Evicted))
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(reason) = self.connection.closing() {
            if !self.connection.has_request_in_flight() {
                if reason == CloseReason::HeaderTimeout {
                    let id = parser_rejection(ErrorKind::RequestTimeout);
                    record_rejection(&self.shared, ErrorKind::RequestTimeout);
                    // Best effort: nothing else is being written on a connection reading a head.
                    let _ = self.stream.try_write(&error_answer(ErrorKind::RequestTimeout, &id));
                }
                return Poll::Ready(Ok(())); // end of file: hyper closes the connection
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.connection.bytes_read(self.shared.now_ms());
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.write_refused() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        ready!(self.poll_replacement(cx))?;
        // hyper writes the head of an answer as the first buffer; its own error answers have no
        // other.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(head), None) = (filled.next(), filled.next()) {
            if let Some(kind) = hyper_error_answer(head) {
                let id = parser_rejection(kind);
                record_rejection(&self.shared, kind);
                self.replacement = Some((error_answer(kind, &id), 0));
                // The replacement stands for all of hyper's bytes; what is left of it goes out on
                // the flush that follows.
                let _ = self.poll_replacement(cx)?;
                return Poll::Ready(Ok(head.len()));
            }
        }
        let n = ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, bufs))?;
        self.connection.bytes_written(self.shared.now_ms());
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_refused() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_refused() {
            ready!(self.poll_replacement(cx))?;
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The error kind of an answer hyper wrote by itself for a request it could not parse: a status
/// line of 400, 414 or 431 with an empty body. The service's own errors always carry a JSON body,
/// so they never match.
fn hyper_error_answer(buf: &[u8]) -> Option<ErrorKind> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..head_end + 2];
    let status = head.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    let status: u16 = std::str::from_utf8(status).ok()?.parse().ok()?;
    let empty_body = head.windows(19).any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0"));
    if !empty_body || buf.len() != head_end + 4 {
        return None;
    }
    ErrorKind::from_parser_status(status).filter(|kind| *kind != ErrorKind::RequestTimeout)
}

/// A complete HTTP/1.1 answer for an error on a connection that is closed after it.
fn error_answer(kind: ErrorKind, id: &RequestId) -> Vec<u8> {
    let body = kind.body(id);
    let status = kind.status();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\n\
         connection: close\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

fn record_rejection(shared: &Shared, kind: ErrorKind) {
    // The method is not known when the request could not be parsed.
    shared.metrics.record_request("_OTHER", UNMATCHED_ROUTE, kind.status(), std::time::Duration::ZERO);
}

/// Answers a connection that cannot be admitted, then closes it, without holding up the accept
/// loop.
pub(super) fn reject(stream: TcpStream, kind: ErrorKind) {
    let id = RequestId::generate();
    let answer = error_answer(kind, &id);
    // The socket's send buffer is empty: one non-blocking write sends it all, or it is dropped.
    let _ = stream.try_write(&answer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_parse_error_answers_are_recognised() {
        let answer = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 16:00:00 GMT\r\n\r\n";
        assert_eq!(hyper_error_answer(answer), Some(ErrorKind::UriTooLong));
        let answer = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_answer(answer), Some(ErrorKind::HeadersTooLarge));
        let answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_answer(answer), Some(ErrorKind::BadRequest));
    }

    #[test]
    fn the_services_own_answers_are_left_alone() {
        let body = br#"{"error":"bad request","code":"bad_request","request_id":"x"}"#;
        let mut ours =
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 62\r\n\r\n".to_vec();
        ours.extend_from_slice(body);
        assert_eq!(hyper_error_answer(&ours), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_answer(ok), None);
        assert_eq!(hyper_error_answer(b"{\"partial\":"), None);
    }

    #[test]
    fn error_answers_are_complete_http() {
        let id = RequestId::generate();
        let answer = String::from_utf8(error_answer(ErrorKind::UriTooLong, &id)).expect("utf-8");
        let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(json["code"], "uri_too_long");
        assert_eq!(json["request_id"], id.as_str());
    }
}
