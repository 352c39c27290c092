//! Request ids: one per request, in the `x-request-id` response header, in the JSON body of every
//! error and in the log lines about the request, so that a client's report can be found in the log.
//!
//! A client's (or a proxy's) own id is kept when it is short and plain; anything else is replaced,
//! so that no client can write newlines, quotes or megabytes into a log line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied id that is kept (a UUID is 36 characters, a W3C trace id 32).
const MAX_CLIENT_ID_LEN: usize = 64;

tokio::task_local! {
    /// The id of the request being served on this task; set by the request-id middleware.
    static CURRENT: RequestId;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's id when it is acceptable, else a new one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers
            .get(&REQUEST_ID_HEADER)
            .filter(|value| is_acceptable(value.as_bytes()))
            .map_or_else(Self::generate, |value| Self(value.clone()))
    }

    /// A new id, unique within this process and, with its random start, across replicas.
    pub fn generate() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(random_seed);
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        // splitmix64 is a bijection: distinct sequence numbers give distinct ids.
        let id = format!("{:016x}", splitmix64(seed.wrapping_add(n)));
        // Hex digits are always a valid header value.
        Self(HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("0")))
    }

    pub fn as_str(&self) -> &str {
        // Only ids of visible ASCII get here (checked or generated).
        self.0.to_str().unwrap_or("invalid")
    }

    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }

    /// Runs `future` with this id as the current one.
    pub async fn scope<F: std::future::Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// The id of the request served on this task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_acceptable(id: &[u8]) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library seeds RandomState from the operating system's random source.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&REQUEST_ID_HEADER, HeaderValue::from_bytes(value).expect("header value"));
        headers
    }

    #[test]
    fn a_plain_client_id_is_kept() {
        for id in ["abc-123", "4bf92f3577b34da6a3ce929d0e0e4736", "req_1.2:3"] {
            assert_eq!(RequestId::from_headers(&with_header(id.as_bytes())).as_str(), id);
        }
    }

    #[test]
    fn an_id_that_could_forge_log_lines_is_replaced() {
        let long = "a".repeat(MAX_CLIENT_ID_LEN + 1);
        for id in [&b"x\" level=ERROR msg=forged"[..], b"a b", b"", long.as_bytes(), b"caf\xc3\xa9", b"{\"json\":1}"] {
            let kept = RequestId::from_headers(&with_header(id));
            assert_ne!(kept.as_str().as_bytes(), id, "{:?}", String::from_utf8_lossy(id));
            assert_eq!(kept.as_str().len(), 16);
        }
    }

    #[test]
    fn generated_ids_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| RequestId::generate().to_string()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
