//! Clients that are slow, idle, malformed or numerous: the service must shed them without losing
//! its probes, its scrape or a prompt shutdown, and answer every error in its JSON shape.
//! Everything here is bounded in count and time, and talks only to 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::{self, heavy, sample, settings, Bin, Replica, TestApp, TestDatabase};
use endpoint_stats::config::{ConnectionLimits, DatabaseSettings, DatabaseUrl, Settings};

fn limits(header_read_timeout: u64, idle_timeout: u64, max_connections: usize) -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: Duration::from_secs(header_read_timeout),
        idle_timeout: Duration::from_secs(idle_timeout),
        max_connections,
    }
}

fn sqlite_settings(dir: &tempfile::TempDir) -> DatabaseSettings {
    let url = format!("sqlite://{}", dir.path().join("stats.db").display());
    DatabaseSettings { url: DatabaseUrl::parse(&url).expect("sqlite URL"), pool_size: 4 }
}

async fn app_with(limits: ConnectionLimits) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings { connections: limits, ..settings(sqlite_settings(&dir), None) };
    (TestApp::spawn(settings).await, dir)
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in address")
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    stream
}

/// Reads until the server closes the connection (or `limit` passes); returns what was read and
/// whether the server closed it.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, false);
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (received, false)
            }
            // A reset also means the server closed it.
            Err(_) => return (received, true),
        }
    }
}

/// One request on a fresh connection; the whole answer, read until the server closes.
fn exchange(port: u16, request: &[u8]) -> String {
    let mut stream = connect(port);
    stream.write_all(request).expect("send");
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5));
    String::from_utf8_lossy(&answer).into_owned()
}

/// Status, headers (lower-case names) and JSON body of one raw HTTP answer.
fn parse_answer(answer: &str) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete head in {answer:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("body of {answer:?} is not JSON: {e}"));
    (status, headers, json)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The error shape every error shares: stable message and code, and the request id of the header.
fn assert_json_error(answer: &str, status: u16, code: &str) {
    let (got, headers, body) = parse_answer(answer);
    assert_eq!(got, status, "{answer}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"), "{answer}");
    assert_eq!(body["code"], code, "{answer}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
    let id = header(&headers, "x-request-id").unwrap_or_else(|| panic!("no x-request-id in {answer}"));
    assert_eq!(body["request_id"], id, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_gets_408_and_is_closed() {
    let _heavy = heavy().await;
    let (app, _dir) = app_with(limits(1, 60, 100)).await;
    let port = port_of(&app.address);
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = connect(port);
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").expect("send");
        let started = Instant::now();
        // One header byte every 200 ms, for up to 5 s: a slowloris.
        while started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(200));
            if stream.write_all(b"X").is_err() {
                break;
            }
            stream.set_read_timeout(Some(Duration::from_millis(1))).expect("read timeout");
            let mut probe = [0u8; 1];
            if stream.peek(&mut probe).is_ok() {
                break; // the server answered or closed
            }
        }
        let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(2));
        (String::from_utf8_lossy(&answer).into_owned(), closed, started.elapsed())
    })
    .await
    .expect("client");
    let (answer, closed, took) = answer;
    assert!(closed, "a client sending its headers at 5 bytes/s was not closed within {took:?}");
    assert!(took < Duration::from_secs(3), "closed only after {took:?} (header timeout 1 s)");
    assert_json_error(&answer, 408, "request_timeout");
    let (_, stats) = app.get_json("/stats").await;
    assert_eq!(stats["stats"].get("/"), None, "the half-sent request was counted: {stats}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_and_busy_ones_are_not() {
    let _heavy = heavy().await;
    let (app, _dir) = app_with(limits(30, 1, 100)).await;
    let port = port_of(&app.address);
    tokio::task::spawn_blocking(move || {
        // Never sends a byte.
        let mut silent = connect(port);
        // Sends one request, then keeps the connection open.
        let mut kept_alive = connect(port);
        kept_alive.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        // Asks every 300 ms: never idle for a whole second.
        let mut active = connect(port);
        let started = Instant::now();
        for _ in 0..10 {
            active.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("active client's request");
            let mut answer = [0u8; 512];
            let n = active.read(&mut answer).expect("active client's answer");
            assert!(
                n > 0 && answer.starts_with(b"HTTP/1.1 200"),
                "active client cut off after {:?}",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        for (name, stream) in [("silent", &mut silent), ("kept-alive", &mut kept_alive)] {
            let (_, closed) = read_until_closed(stream, Duration::from_millis(500));
            assert!(closed, "{name} connection still open after {:?} (idle timeout 1 s)", started.elapsed());
        }
    })
    .await
    .expect("clients");
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    let idle_closes = sample(&metrics, r#"endpoint_stats_http_connections_closed_total{reason="idle_timeout"}"#);
    assert!(idle_closes.is_some_and(|closes| closes > 0.0), "idle closes not counted:\n{metrics}");
    app.shutdown().await;
}

/// With the open-file limit at 160 and 180 idle and slow connections, more than the cap allows,
/// the probes and the scrape keep answering within a second: the longest-idle connections make
/// room. (Before the cap, `/health` timed out here and nothing was logged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_get_through_while_idle_and_slow_clients_exceed_the_cap() {
    let _heavy = heavy().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("service.log");
    let database_url = format!("sqlite://{}", dir.path().join("stats.db").display());
    // Timeouts far away: only the cap can save the probes here.
    let env = [("MAX_CONNECTIONS", "100"), ("HEADER_READ_TIMEOUT_SECS", "60"), ("IDLE_TIMEOUT_SECS", "600")];
    let bin = Bin::new(&[]).env("DATABASE_URL", &database_url).envs(&env).open_file_limit(160).log_to(&log);
    let replica = Replica::start_bin(bin).await;
    let port = replica.port;
    let mut hostile = Vec::new();
    for i in 0..180 {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { continue };
        if i % 2 == 0 {
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        }
        hostile.push(stream);
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().expect("client");
    for round in 0..10 {
        for path in ["/health", "/ready", "/metrics"] {
            let started = Instant::now();
            let response = client
                .get(format!("{}{path}", replica.address))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path} (round {round}) got no answer within 1 s: {e}"));
            assert_eq!(response.status().as_u16(), 200, "{path} round {round}");
            assert!(started.elapsed() < Duration::from_secs(1), "{path} took {:?}", started.elapsed());
        }
    }
    let metrics = client.get(format!("{}/metrics", replica.address)).send().await.expect("scrape");
    let metrics = metrics.text().await.expect("metrics");
    let evicted = sample(&metrics, r#"endpoint_stats_http_connections_closed_total{reason="evicted"}"#).unwrap_or(0.0);
    assert!(evicted >= 80.0, "expected the longest-idle connections to be evicted, metric says {evicted}");
    let open = sample(&metrics, "endpoint_stats_http_connections");
    assert!(open.is_some_and(|open| open <= 101.0), "more connections open than the cap: {open:?}");
    drop(hostile);
    drop(replica);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("connection limit reached"), "the limit was not logged:\n{logged}");
}

/// SIGTERM with 50 half-sent requests and nothing pending: exit 0 within 2 s, no ERROR line, and
/// SQLite's WAL checkpointed away. (Before: 18.6 s, a false ERROR and the WAL left behind.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_half_open_connections_exits_at_once_and_cleanly() {
    let _heavy = heavy().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("service.log");
    let database = dir.path().join("stats.db");
    let database_url = format!("sqlite://{}", database.display());
    let bin = Bin::new(&[]).env("DATABASE_URL", &database_url).env("RUST_LOG", "info").log_to(&log);
    let mut replica = Replica::start_bin(bin).await;
    let response = helpers::client().get(format!("{}/", replica.address)).send().await.expect("GET /");
    assert_eq!(helpers::access_count(response).await, 1);
    let mut half_open = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(("127.0.0.1", replica.port)).expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").expect("half a request");
        half_open.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    replica.signal("TERM");
    let code = replica.wait_at_most(Duration::from_secs(2)).await;
    let took = started.elapsed();
    let logged = std::fs::read_to_string(&log).expect("log");
    assert_eq!(code, Some(0), "not exited with 0 within 2 s of SIGTERM (after {took:?}):\n{logged}");
    assert!(!logged.contains("ERROR"), "an ERROR line at a clean shutdown:\n{logged}");
    assert!(logged.contains("shutdown complete"), "{logged}");
    let wal = dir.path().join("stats.db-wal");
    assert!(!wal.exists(), "SQLite's WAL left behind after shutdown");
    drop(half_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_changes_no_count() {
    let (app, _dir) = app_with(limits(10, 75, 100)).await;
    for path in ["/", "/stats", "/api/v1/endpoints", "/", "/"] {
        let response = app.client.head(format!("{}{path}", app.address)).send().await.expect("HEAD");
        assert_eq!(response.status().as_u16(), 200, "HEAD {path}");
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "HEAD {path}"
        );
        // RFC 9110: a HEAD may only announce the length the GET would have, which is not known.
        assert_eq!(response.headers().get("content-length"), None, "HEAD {path}");
    }
    let (_, root) = app.get_json("/").await;
    assert_eq!(root["access_count"], 1, "HEAD requests were counted: {root}");
    let (_, stats) = app.get_json("/stats").await;
    assert_eq!(stats["stats"], serde_json::json!({"/": 1, "/stats": 1}), "{stats}");
    app.shutdown().await;
}

/// Oversized and malformed requests get the JSON error shape, whichever layer refuses them: the
/// HTTP parser (400, 414, 431) or the request checks (400 without Host, 413, 414).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_json_errors() {
    let (app, _dir) = app_with(limits(10, 75, 100)).await;
    let port = port_of(&app.address);
    tokio::task::spawn_blocking(move || {
        let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
        let long_query = format!("GET /?q={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10_000));
        let huge_header = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(300_000));
        let cases: [(&[u8], u16, &str); 6] = [
            (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
            (long_path.as_bytes(), 414, "uri_too_long"),
            (long_query.as_bytes(), 414, "uri_too_long"),
            (huge_header.as_bytes(), 431, "headers_too_large"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", 413, "payload_too_large"),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 400, "bad_request"),
        ];
        for (request, status, code) in cases {
            let answer = exchange(port, request);
            assert_json_error(&answer, status, code);
        }
    })
    .await
    .expect("clients");
    // None of them was counted.
    let (_, stats) = app.get_json("/stats").await;
    assert_eq!(stats["stats"], serde_json::json!({"/stats": 1}), "{stats}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_when_plain_and_replaced_when_not() {
    let (app, _dir) = app_with(limits(10, 75, 100)).await;
    let port = port_of(&app.address);
    tokio::task::spawn_blocking(move || {
        let kept =
            exchange(port, b"GET /nope HTTP/1.1\r\nHost: x\r\nx-request-id: trace-42.a_b\r\nConnection: close\r\n\r\n");
        assert_json_error(&kept, 404, "not_found");
        assert!(kept.contains("x-request-id: trace-42.a_b\r\n"), "{kept}");
        let forged = exchange(
            port,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nx-request-id: a\" level=ERROR msg=\"forged\r\nConnection: close\r\n\r\n",
        );
        assert_json_error(&forged, 404, "not_found");
        assert!(!forged.contains("forged"), "a forged id came back: {forged}");
        let ok = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(ok.to_ascii_lowercase().contains("\r\nx-request-id: "), "a success carries its id too: {ok}");
    })
    .await
    .expect("clients");
    app.shutdown().await;
}

/// A database outage: the 503 says so in stable words with the request id; the database's own
/// message is only in the log line that carries the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_names_no_internal_error_and_its_log_line_carries_the_request_id() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("service.log");
    let replica = Replica::start_bin(Bin::new(&[]).env("DATABASE_URL", &database.url).log_to(&log)).await;
    database.refuse_connections().await;
    let response = helpers::client()
        .get(format!("{}/", replica.address))
        .header("x-request-id", "outage-probe-1")
        .send()
        .await
        .expect("GET /");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("outage-probe-1"));
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], "database_unavailable", "{body}");
    assert_eq!(body["request_id"], "outage-probe-1", "{body}");
    let text = body.to_string();
    assert!(!text.contains("terminating") && !text.contains("database unavailable: database"), "{text}");
    let ready = helpers::client().get(format!("{}/ready", replica.address)).send().await.expect("/ready");
    assert_eq!(ready.status().as_u16(), 503);
    let ready: serde_json::Value = ready.json().await.expect("JSON");
    assert!(["unavailable", "timeout"].contains(&ready["checks"]["database"].as_str().unwrap_or("")), "{ready}");
    database.allow_connections().await;
    drop(replica);
    let logged = std::fs::read_to_string(&log).expect("log");
    let line =
        logged.lines().find(|l| l.contains("outage-probe-1")).unwrap_or_else(|| panic!("no log line:\n{logged}"));
    // The database's own words are in the log (the text format colours the field names).
    assert!(line.contains("database_unavailable") && line.contains("not currently accepting connections"), "{line}");
}
