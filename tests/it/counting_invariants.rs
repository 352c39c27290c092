//! The counting invariants of SPEC §3 against real PostgreSQL and Redis, with real processes where
//! a test kills one.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::helpers::delay_proxy::DelayProxy;
use crate::helpers::{
    self, access_count, client, heavy, sample, settings, Bin, OwnRedis, Replica, TestApp, TestDatabase, TestRedisPrefix,
};
use futures_util::stream::{self, StreamExt};

/// Sends `total` GETs of `path` spread over `addresses`, `concurrency` at a time; returns the
/// status and `access_count` (if any) of every answer, in completion order.
async fn burst(addresses: &[String], path: &str, total: usize, concurrency: usize) -> Vec<(u16, Option<i64>)> {
    let client = client();
    stream::iter(0..total)
        .map(|i| {
            let url = format!("{}{path}", addresses[i % addresses.len()]);
            let client = client.clone();
            async move { counted_get(&client, &url, path).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// One GET of a counted `path`: its status and own `access_count` (status 0 when the request failed).
async fn counted_get(client: &reqwest::Client, url: &str, path: &str) -> (u16, Option<i64>) {
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Option<serde_json::Value> = response.json().await.ok();
            (status, body.and_then(|b| own_access_count(path, &b)))
        }
        Err(_) => (0, None),
    }
}

/// The `access_count` an answer gives for its own access: top level for `/` and `/stats`, in its own
/// entry of the listing for `/api/v1/endpoints`.
fn own_access_count(path: &str, body: &serde_json::Value) -> Option<i64> {
    body["access_count"].as_i64().or_else(|| {
        let entries = body["endpoints"].as_array()?;
        entries.iter().find(|e| e["endpoint"] == path)?["access_count"].as_i64()
    })
}

/// Every answer is a 200 and the values handed out are exactly 1..=`total`: none lost, none repeated.
fn assert_exactly_one_to(answers: &[(u16, Option<i64>)], total: usize, path: &str) {
    let failures: Vec<_> = answers.iter().filter(|(status, _)| *status != 200).collect();
    assert!(failures.is_empty(), "{path}: {} non-200 answers, e.g. {:?}", failures.len(), failures.first());
    let mut counts: Vec<i64> = answers.iter().filter_map(|(_, count)| *count).collect();
    counts.sort_unstable();
    let expected: Vec<i64> = (1..=i64::try_from(total).unwrap_or(i64::MAX)).collect();
    assert!(counts == expected, "{path}: access_count values are not exactly 1..{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_across_two_replicas_sharing_postgres() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let replicas = [Replica::start(&database.url, &[]).await, Replica::start(&database.url, &[]).await];
    let addresses: Vec<String> = replicas.iter().map(|r| r.address.clone()).collect();
    let total = 6000;

    let answers = burst(&addresses, "/", total, 64).await;

    assert_exactly_one_to(&answers, total, "/");
    assert_eq!(database.stored_counts().await.get("/").copied(), Some(6000));
}

/// Across a round trip the batcher overlaps commits on the same row (several in flight, from each
/// of two replicas). Values must stay exact and unique: each commit takes the range that ends at
/// the count it returned, whatever order the commits reach the row in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_with_commits_overlapping_across_a_round_trip() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let direct = url::Url::parse(&database.url).expect("test database URL");
    let upstream = format!("{}:{}", direct.host_str().unwrap_or("127.0.0.1"), direct.port().unwrap_or(5432));
    let mut proxy = DelayProxy::start(&upstream).await;
    // 1 ms each way: a database 2 ms away, where the batcher allows several commits in flight.
    proxy.command("delay 1000").await;
    let mut proxied = direct.clone();
    proxied.set_port(Some(proxy.port)).expect("a port on a postgres URL");
    let replicas = [Replica::start(proxied.as_str(), &[]).await, Replica::start(proxied.as_str(), &[]).await];
    let addresses: Vec<String> = replicas.iter().map(|r| r.address.clone()).collect();
    let total = 4000;

    let answers = burst(&addresses, "/", total, 64).await;

    assert_exactly_one_to(&answers, total, "/");
    assert_eq!(database.stored_counts().await.get("/").copied(), Some(4000));
    for address in &addresses {
        let metrics =
            client().get(format!("{address}/metrics")).send().await.expect("metrics").text().await.expect("text");
        let limit = sample(&metrics, "endpoint_stats_db_commits_in_flight_limit");
        assert!(limit.is_some_and(|limit| limit >= 2.0), "{address}: commits did not overlap (limit {limit:?})");
    }
}

/// Mixed traffic makes batches that span endpoints (the general statement, rows created on first
/// access) beside single-endpoint batches (the plain UPDATE), on two replicas locking the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_per_endpoint_under_mixed_traffic_on_two_replicas() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let replicas = [Replica::start(&database.url, &[]).await, Replica::start(&database.url, &[]).await];
    let addresses: Vec<String> = replicas.iter().map(|r| r.address.clone()).collect();
    let paths = ["/", "/stats", "/api/v1/endpoints"];
    let per_path = 1500;

    let bursts = paths.map(|path| burst(&addresses, path, per_path, 32));
    let answers = futures_util::future::join_all(bursts).await;

    let stored = database.stored_counts().await;
    for (path, answers) in paths.iter().zip(answers) {
        assert_exactly_one_to(&answers, per_path, path);
        assert_eq!(stored.get(*path).copied(), Some(1500), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stats_answers_are_unique_and_include_themselves() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let app = TestApp::spawn(settings(database.settings(), None)).await;
    let client = client();
    let bodies: Vec<serde_json::Value> = stream::iter(0..1000)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{}/stats", app.address));
            async move { client.get(url).send().await.expect("GET").json::<serde_json::Value>().await.expect("JSON") }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut seen = BTreeSet::new();
    for body in &bodies {
        let own = body["access_count"].as_i64().expect("access_count");
        assert_eq!(body["stats"]["/stats"].as_i64(), Some(own), "{body}");
        assert!(seen.insert(own), "duplicate access_count {own}");
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), (1..=1000).collect::<Vec<i64>>());
    app.shutdown().await;
}

/// One replica under a burst of `GET /`, sent `signal` once the burst has got going (without
/// warning, for KILL); its exit status and every answer of the burst.
async fn signal_under_load(database: &TestDatabase, signal: &str) -> (Option<i32>, Vec<(u16, Option<i64>)>) {
    let mut replica = Replica::start(&database.url, &[]).await;
    let address = replica.address.clone();
    let load = tokio::spawn(async move { burst(&[address], "/", 20_000, 32).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    replica.signal(signal);
    let exit = replica.wait().await;
    (exit, load.await.expect("load task"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_count_a_client_saw() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let (_, answers) = signal_under_load(&database, "KILL").await;

    let seen: Vec<i64> = answers.iter().filter(|(status, _)| *status == 200).filter_map(|(_, c)| *c).collect();
    assert!(seen.len() > 100, "the burst was too short to test anything ({} answers)", seen.len());
    let stored = database.stored_counts().await.get("/").copied().unwrap_or(0);
    let highest_seen = seen.iter().copied().max().unwrap_or(0);
    assert!(highest_seen <= stored, "a client saw {highest_seen} but only {stored} is stored");
    // Every value handed out is unique, and none is missing from the stored range.
    let distinct: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "duplicate access_count values");
    println!("SIGKILL after {} answers; highest seen {highest_seen}, stored {stored}", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let (exit, answers) = signal_under_load(&database, "TERM").await;

    assert_eq!(exit, Some(0), "SIGTERM must end the process with status 0");
    let ok: Vec<i64> = answers.iter().filter(|(status, _)| *status == 200).filter_map(|(_, c)| *c).collect();
    // After the listener closed, new connections are refused (status 0 here); every request that
    // was accepted got its answer: no 5xx, and the stored count equals the 200s handed out.
    let server_errors = answers.iter().filter(|(status, _)| *status >= 500).count();
    assert_eq!(server_errors, 0, "in-flight requests failed during the drain");
    let stored = database.stored_counts().await.get("/").copied().unwrap_or(0);
    assert_eq!(i64::try_from(ok.len()).unwrap_or(-1), stored, "200 answers vs stored count");
    let mut sorted = ok.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=stored).collect::<Vec<_>>());
}

/// SIGTERM ends the process with 0 within the grace period, even when a commit cannot finish (its
/// row locked by another session) and the request timeout is longer than the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_within_the_grace_period_even_with_a_stuck_commit() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let env = [("SHUTDOWN_GRACE_SECS", "2"), ("REQUEST_TIMEOUT_SECS", "30")];
    let mut replica = Replica::start(&database.url, &env).await;
    assert_eq!(access_count(client().get(format!("{}/", replica.address)).send().await.expect("GET /")).await, 1);

    let row_lock = database.lock_row("/").await;
    let address = replica.address.clone();
    let stuck = tokio::spawn(async move { burst(&[address], "/", 8, 8).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let signalled = Instant::now();
    replica.signal("TERM");
    let exit = replica.wait().await;
    let took = signalled.elapsed();
    // PostgreSQL notices within its client_connection_check_interval that the commit's client is
    // gone, and aborts the commit instead of running it once the lock is free.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    row_lock.release().await;
    let answers = stuck.await.expect("load task");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(exit, Some(0), "SIGTERM must end the process with status 0");
    assert!(took < Duration::from_millis(2800), "exit {took:?} after SIGTERM, grace period 2 s");
    assert!(answers.iter().all(|(status, _)| *status != 200), "a stuck access was answered 200: {answers:?}");
    assert_eq!(database.stored_counts().await.get("/"), Some(&1), "the abandoned commit ran after all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_answers_503_quickly_and_recovers_by_itself() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let app = TestApp::spawn(settings(database.settings(), None)).await;
    for expected in 1..=5 {
        assert_eq!(app.get_json("/").await.1["access_count"], expected);
    }

    database.refuse_connections().await;
    for path in ["/", "/stats", "/api/v1/endpoints"] {
        let started = Instant::now();
        let (status, body) = app.get_json(path).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{path} during outage: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
        // Bounded by the request timeout of the test settings (3 s) plus slack.
        assert!(took < Duration::from_secs(5), "{path} took {took:?} to fail");
    }
    let (status, ready) = app.get_json("/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready["error"].as_str().unwrap_or("").contains("database"), "{ready}");
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    for operation in ["commit", "read"] {
        let series = format!("endpoint_stats_db_errors_total{{operation=\"{operation}\"}}");
        let value = sample(&metrics, &series);
        assert!(value.is_some_and(|v| v >= 1.0), "{series} is {value:?} after failures of the outage");
    }
    assert_eq!(app.get_json("/health").await.0, 200);

    database.allow_connections().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let resumed = loop {
        let (status, body) = app.get_json("/").await;
        if status == 200 {
            break body["access_count"].as_i64();
        }
        assert!(Instant::now() < deadline, "service did not recover after the database returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Nothing counted during the outage; counting goes on from the right number.
    assert_eq!(resumed, Some(6));
    assert_eq!(app.get_json("/ready").await.0, 200);
    app.shutdown().await;
    assert_eq!(database.stored_counts().await.get("/"), Some(&6));
}

/// A slow database (here: another session holding the row's lock for longer than the request
/// timeout) gets 503s, and a 503 always means "not counted": neither an access that waited in the
/// queue behind a slow commit nor a commit the batcher gave up on may be stored afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_503s_are_never_counted() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let app = TestApp::spawn(settings(database.settings(), None)).await; // request timeout 3 s
    assert_eq!(app.get_json("/").await.1["access_count"], 1);

    let row_lock = database.lock_row("/").await;
    let lock_held = Duration::from_secs(5);
    let load_until = Instant::now() + lock_held + Duration::from_secs(2);
    let address = app.address.clone();
    let load = tokio::spawn(async move {
        let client = client();
        let clients = (0..16).map(|_| {
            let (client, url) = (client.clone(), format!("{address}/"));
            async move {
                let mut answers = Vec::new();
                while Instant::now() < load_until {
                    let started = Instant::now();
                    let answer = counted_get(&client, &url, "/").await;
                    answers.push((answer, started.elapsed()));
                }
                answers
            }
        });
        futures_util::future::join_all(clients).await.into_iter().flatten().collect::<Vec<_>>()
    });
    tokio::time::sleep(lock_held).await;
    row_lock.release().await;
    let answers = load.await.expect("load task");
    // Let anything the database might still be doing on the service's behalf finish.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let unavailable = answers.iter().filter(|((status, _), _)| *status == 503).count();
    let mut counted: Vec<i64> =
        answers.iter().filter(|((status, _), _)| *status == 200).filter_map(|((_, c), _)| *c).collect();
    let other: Vec<_> = answers.iter().filter(|((status, _), _)| *status != 200 && *status != 503).collect();
    assert!(other.is_empty(), "answers other than 200 and 503: {other:?}");
    assert!(unavailable > 0, "the lock did not slow anything down: no 503");
    assert!(counted.len() > 16, "counting did not resume after the lock ({} answers of 200)", counted.len());
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap_or_default();
    assert!(slowest < Duration::from_secs(4), "an answer took {slowest:?} (request timeout 3 s)");
    let stored = database.stored_counts().await.get("/").copied().unwrap_or(0);
    counted.push(1);
    counted.sort_unstable();
    let never_answered: Vec<i64> =
        (1..=stored).filter(|value| counted.binary_search(value).is_err()).take(10).collect();
    assert!(
        counted.len() == usize::try_from(stored).unwrap_or(0) && never_answered.is_empty(),
        "stored count {stored} against {} answers of 200 ({unavailable} answers of 503); stored but never \
         answered with 200, e.g. {never_answered:?}",
        counted.len()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_counting_exact_and_flags_the_windows() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let mut redis = OwnRedis::start();
    let prefix = TestRedisPrefix::new(&redis.url());
    let app = TestApp::spawn(settings(database.settings(), Some(prefix.settings()))).await;
    let address = app.address.clone();

    let (_, body) = app.get_json("/api/v1/endpoints").await;
    assert_eq!(body["windows"], serde_json::json!({"source": "redis", "available": true}));

    let load = {
        let address = address.clone();
        tokio::spawn(async move { burst(&[address], "/", 4000, 16).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.stop();
    let answers = load.await.expect("load");

    assert!(answers.iter().all(|(status, _)| *status == 200), "counting failed while Redis was down");
    let mut counts: Vec<i64> = answers.iter().filter_map(|(_, c)| *c).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=4000).collect::<Vec<_>>());
    assert_eq!(database.stored_counts().await.get("/"), Some(&4000));

    let (status, body) = app.get_json("/api/v1/endpoints").await;
    assert_eq!(status, 200);
    assert_eq!(body["windows"]["available"], false, "{body}");
    assert!(body["windows"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    assert!(body["endpoints"][0]["requests_last_minute"].is_null(), "{body}");
    let (status, ready) = app.get_json("/ready").await;
    assert_eq!(status, 200, "Redis must not fail readiness: {ready}");
    assert!(ready["checks"]["redis"].as_str().unwrap_or("").starts_with("degraded"), "{ready}");
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(metrics.contains("endpoint_stats_redis_available 0"), "redis gauge not 0");
    app.shutdown().await;
}

/// A Redis that accepts connections and never answers (hung, or its packets dropped) must not hold
/// up readiness or the listing: with many probes at once, while every one of them needs a new
/// connection, each still answers promptly, ready, with Redis reported degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_promptly_while_redis_hangs() {
    let _heavy = heavy().await;
    let mut redis = OwnRedis::start();
    let database = TestDatabase::create().await;
    let prefix = TestRedisPrefix::new(&redis.url());
    let app = TestApp::spawn(settings(database.settings(), Some(prefix.settings()))).await;
    assert_eq!(app.get_json("/ready").await.1["checks"]["redis"], "ok");
    // Redis goes away, and in its place something accepts connections and never answers.
    redis.stop();
    let hung_redis = tokio::net::TcpListener::bind(("127.0.0.1", redis.port)).await.expect("bind Redis's port");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = hung_redis.accept().await {
            held.push(connection);
        }
    });

    let probes = (0..12).map(|i| {
        let (client, address) = (app.client.clone(), app.address.clone());
        async move {
            let path = if i % 2 == 0 { "/ready" } else { "/api/v1/endpoints" };
            let started = Instant::now();
            let response = client.get(format!("{address}{path}")).send().await.expect("request");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.expect("JSON body");
            (path, status, body, started.elapsed())
        }
    });
    for (path, status, body, took) in futures_util::future::join_all(probes).await {
        assert_eq!(status, 200, "{path} while Redis hangs: {body}");
        assert!(
            took < Duration::from_millis(2500),
            "{path} took {took:?} while Redis hangs (limit 1 s per Redis operation)"
        );
        if path == "/ready" {
            assert!(body["checks"]["redis"].as_str().unwrap_or("").starts_with("degraded"), "{body}");
        } else {
            assert_eq!(body["windows"]["available"], false, "{body}");
        }
    }
    holder.abort();
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_windows_are_shared_through_redis() {
    let database = TestDatabase::create().await;
    let prefix = TestRedisPrefix::new(&helpers::redis_url());
    let first = TestApp::spawn(settings(database.settings(), Some(prefix.settings()))).await;
    let second = TestApp::spawn(settings(database.settings(), Some(prefix.settings()))).await;
    for _ in 0..7 {
        assert_eq!(first.get("/").await.status(), 200);
    }
    for _ in 0..5 {
        assert_eq!(second.get("/").await.status(), 200);
    }
    // Replicas flush to Redis once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = first.get_json("/api/v1/endpoints").await;
        let root = &body["endpoints"][0];
        if root["requests_last_minute"] == 12 && root["requests_last_hour"] == 12 {
            assert_eq!(root["access_count"], 12);
            break;
        }
        assert!(Instant::now() < deadline, "windows never showed both replicas' accesses: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_on_a_fresh_database_all_migrate() {
    let _heavy = heavy().await;
    let database = TestDatabase::create().await;
    let runs = (0..6).map(|_| Bin::new(&["migrate"]).env("DATABASE_URL", &database.url).output());
    for output in futures_util::future::join_all(runs).await {
        assert!(output.code == 0, "migrate failed: {}", output.stderr);
    }
    // And replicas starting together on the migrated database serve at once.
    let replicas = futures_util::future::join_all((0..3).map(|_| Replica::start(&database.url, &[]))).await;
    let answers = burst(&replicas.iter().map(|r| r.address.clone()).collect::<Vec<_>>(), "/", 30, 6).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
}

/// The SQLite twin of the test above: sqlx takes no lock for SQLite migrators, so without one of
/// our own two of them both see an empty `_sqlx_migrations` and the second fails on its key.
#[tokio::test]
async fn concurrent_migrations_on_a_fresh_sqlite_file_all_succeed() {
    let _heavy = heavy().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("fresh.db").display());
    let runs = (0..20).map(|_| Bin::new(&["migrate"]).env("DATABASE_URL", &url).output());
    let outputs = futures_util::future::join_all(runs).await;
    let failures: Vec<String> =
        outputs.iter().filter(|output| output.code != 0).map(|output| output.stderr.trim().to_owned()).collect();
    assert!(failures.is_empty(), "{} of 20 concurrent migrate runs failed: {failures:#?}", failures.len());
    // And the file serves: a replica on it is ready at once and counts.
    let replica = Replica::start(&url, &[]).await;
    let answers = burst(std::slice::from_ref(&replica.address), "/", 5, 5).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
}
