//! The HTTP contract of SPEC §2, on both backends.

use crate::helpers::{heavy, settings, TestApp, TestDatabase};
use endpoint_stats::config::{DatabaseSettings, DatabaseUrl};
use futures_util::stream::{self, StreamExt};

async fn assert_contract(app: &TestApp) {
    // First access to `/` is 1; the first `/stats` after it sees both, including itself.
    let (status, body) = app.get_json("/").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"message": "Hello, World!", "access_count": 1}));
    let (status, body) = app.get_json("/stats").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"stats": {"/": 1, "/stats": 1}, "access_count": 1}));

    // Probes and documents are not counted.
    assert_eq!(app.get_json("/health").await, (200, serde_json::json!({"status": "ok"})));
    let (status, ready) = app.get_json("/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["database"], "ok");
    let openapi = app.get_json("/openapi.json").await;
    assert_eq!(openapi.0, 200);
    for path in ["/", "/stats", "/api/v1/endpoints", "/health", "/ready"] {
        assert!(openapi.1["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
    let metrics = app.get("/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert!(metrics.headers()["content-type"].to_str().unwrap_or("").starts_with("text/plain"));

    // Unknown paths: JSON 404, wrong methods: JSON 405; neither counted. Every error has one
    // shape: a stable message and code, and the request id the response header carries.
    let response = app.get("/no/such/path").await;
    let id = response.headers()["x-request-id"].to_str().expect("request id").to_owned();
    assert_eq!(response.status().as_u16(), 404);
    let body: serde_json::Value = response.json().await.expect("JSON 404");
    assert_eq!(body, serde_json::json!({"error": "not found", "code": "not_found", "request_id": id}));
    let response = app.client.post(format!("{}/", app.address)).send().await.expect("POST");
    assert_eq!(response.status().as_u16(), 405);
    let id = response.headers()["x-request-id"].to_str().expect("request id").to_owned();
    let body: serde_json::Value = response.json().await.expect("JSON 405");
    assert_eq!(
        body,
        serde_json::json!({"error": "method not allowed", "code": "method_not_allowed", "request_id": id})
    );

    let (status, body) = app.get_json("/stats").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"stats": {"/": 1, "/stats": 2}, "access_count": 2}));

    // The endpoint listing: counts, RFC 3339 UTC times, recent windows.
    let (status, body) = app.get_json("/api/v1/endpoints").await;
    assert_eq!(status, 200);
    let endpoints = body["endpoints"].as_array().expect("endpoints array");
    let names: Vec<&str> = endpoints.iter().filter_map(|e| e["endpoint"].as_str()).collect();
    assert_eq!(names, ["/", "/api/v1/endpoints", "/stats"]);
    for entry in endpoints {
        for field in ["first_accessed", "last_accessed"] {
            let text = entry[field].as_str().expect("timestamp string");
            let parsed = chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339");
            assert_eq!(parsed.offset().local_minus_utc(), 0, "{text} is not UTC");
            assert!(text.ends_with('Z'), "{text}");
        }
        assert!(entry["requests_last_minute"].is_u64(), "{entry}");
        assert!(entry["requests_last_hour"].is_u64(), "{entry}");
    }
    assert_eq!(endpoints[0]["access_count"], 1);
    assert_eq!(endpoints[1]["access_count"], 1);
    assert_eq!(endpoints[2]["access_count"], 2);
    assert_eq!(endpoints[2]["requests_last_minute"], 2);
    assert_eq!(body["windows"]["available"], true);

    // The metrics contract.
    let text = app.get("/metrics").await.text().await.expect("metrics text");
    for series in [
        r#"http_requests_total{method="GET",route="/",status="200"} 1"#,
        r#"http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"http_request_duration_seconds_bucket{method="GET",route="/stats",status="200",le="1"}"#,
        "http_requests_in_flight ",
        r#"endpoint_stats_build_info{revision="#,
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
        r#"endpoint_stats_db_connections{state="in_use"}"#,
        r#"endpoint_stats_db_connections{state="idle"}"#,
        "endpoint_stats_db_commit_duration_seconds_bucket",
        "endpoint_stats_db_batch_size_bucket",
        "# TYPE endpoint_stats_db_errors_total counter",
        "# TYPE endpoint_stats_redis_operations_total counter",
        "# TYPE endpoint_stats_redis_errors_total counter",
    ] {
        assert!(text.contains(series), "/metrics lacks `{series}`\n{text}");
    }
    let buckets: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(r#"http_request_duration_seconds_bucket{method="GET",route="/",status="200""#))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        buckets,
        ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1", "2.5", "5", "7.5", "10", "+Inf"]
    );
}

#[tokio::test]
async fn contract_on_postgres() {
    let database = TestDatabase::create().await;
    let app = TestApp::spawn(settings(database.settings(), None)).await;
    assert_contract(&app).await;
    app.shutdown().await;
    assert_eq!(database.stored_counts().await.get("/"), Some(&1));
}

// Two workers, as the service runs: shutdown races only there (a connection on its way back to
// the pool while the pool closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("stats.db").display());
    let database = DatabaseSettings { url: DatabaseUrl::parse(&url).expect("sqlite URL"), pool_size: 4 };
    let app = TestApp::spawn(settings(database.clone(), None)).await;
    assert_contract(&app).await;
    app.shutdown().await;
    // SQLite checkpoints and removes the WAL when its last connection closes: a WAL left behind
    // means that shutdown left a connection open (the batcher's, once).
    let wal = dir.path().join("stats.db-wal");
    assert!(!wal.exists(), "{} left after shutdown: a database connection was not closed", wal.display());

    // Durable across restarts.
    let app = TestApp::spawn(settings(database, None)).await;
    let (_, body) = app.get_json("/").await;
    assert_eq!(body["access_count"], 2);
    app.shutdown().await;
}

/// SPEC §4: a scan of 100,000 random paths, with standard, non-standard and wrong methods, adds
/// not a single series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_paths_add_no_metric_series() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let app = TestApp::spawn(settings(database.settings(), None)).await;
    let purge = reqwest::Method::from_bytes(b"PURGE").expect("extension method");
    let methods = [reqwest::Method::GET, reqwest::Method::DELETE, purge, reqwest::Method::POST];
    // Every kind of request once first (404 per method, 405 per method and route template): their
    // series exist from then on.
    for method in &methods {
        let _ = app.client.request(method.clone(), format!("{}/warm-up", app.address)).send().await;
        if method != reqwest::Method::GET {
            for route in ["/", "/stats"] {
                let _ = app.client.request(method.clone(), format!("{}{route}", app.address)).send().await;
            }
        }
    }
    // A series is a sample line without its value.
    let series = |text: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(s, _)| s.to_owned())
            .collect()
    };
    // The first scrape records its own series after rendering; count from the second one.
    let _ = app.get("/metrics").await;
    let before = series(&app.get("/metrics").await.text().await.expect("metrics"));

    let unexpected: Vec<String> = stream::iter(0..100_000u32)
        .map(|i| {
            // A wrong method on a real route every fifth request; any method on a random path
            // otherwise.
            let (method, path, expected) = if i % 5 == 4 {
                let path = if i % 2 == 0 { "/" } else { "/stats" };
                (methods[1 + i as usize % 3].clone(), path.to_owned(), 405)
            } else {
                (methods[i as usize % methods.len()].clone(), format!("/{:x}/{i}", rand::random::<u64>()), 404)
            };
            let (client, url) = (app.client.clone(), format!("{}{path}", app.address));
            async move {
                match client.request(method.clone(), url).send().await {
                    Ok(response) if response.status().as_u16() == expected => None,
                    Ok(response) => Some(format!("{method} {path}: {}", response.status())),
                    Err(error) => Some(format!("{method} {path}: {error}")),
                }
            }
        })
        .buffer_unordered(32)
        .filter_map(|unexpected| async move { unexpected })
        .collect()
        .await;
    assert!(unexpected.is_empty(), "{} unexpected answers, e.g. {:?}", unexpected.len(), unexpected.first());
    let text = app.get("/metrics").await.text().await.expect("metrics");
    let added: Vec<String> = series(&text).difference(&before).cloned().collect();
    assert!(added.is_empty(), "{} series added by random paths and methods, e.g. {:?}", added.len(), added.first());
    assert!(!text.contains("/warm-up"));
    assert!(text.contains(r#"method="_OTHER""#), "a non-standard method is recorded as _OTHER");
    assert!(database.stored_counts().await.is_empty(), "unknown paths or wrong methods were stored");
    app.shutdown().await;
}
