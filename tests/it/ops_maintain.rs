//! `maintain`: VACUUM (ANALYZE) and index report on a seeded database, Redis housekeeping.

use crate::helpers::ops::*;
use crate::helpers::{free_port, redis_url, run_bin, unique_name, TestDatabase, TestRedisPrefix};
use serde_json::Value;

async fn seeded() -> TestDatabase {
    let db = TestDatabase::create().await;
    count_accesses(&db, 30, 10, 5).await;
    db
}

fn redis_connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(std::time::Duration::from_secs(2)))
        .expect("Redis (scripts/test.sh starts it)")
}

#[tokio::test]
async fn maintain_vacuums_and_cleans_window_keys() {
    let db = seeded().await;
    let prefix = TestRedisPrefix::new(&redis_url());
    let p = prefix.prefix.clone();
    let mut redis = redis_connection(&prefix.url);
    let now = chrono::Utc::now().timestamp();
    let fresh_fine = format!("{p}window:10s:{}", now / 10);
    let fresh_coarse = format!("{p}window:1m:{}", now / 60);
    let without_ttl = format!("{p}window:1m:{}", now / 60 - 1);
    let stale = format!("{p}window:1m:{}", now / 60 - 200);
    let unknown = format!("{p}window:weird");
    let other = format!("{p}something-else");
    let _: () = redis::pipe()
        .hset(&fresh_fine, "/", 3)
        .expire(&fresh_fine, 180)
        .hset(&fresh_coarse, "/", 3)
        .expire(&fresh_coarse, 3900)
        .hset(&without_ttl, "/", 2)
        .hset(&stale, "/", 1)
        .expire(&stale, 3600)
        .set(&unknown, 1)
        .expire(&unknown, 600)
        .set(&other, 1)
        .query(&mut redis)
        .expect("seed Redis");

    let output = run_bin(
        &["maintain", "--json"],
        &[("DATABASE_URL", &db.url), ("REDIS_URL", &prefix.url), ("REDIS_KEY_PREFIX", &p)],
    )
    .await;
    output.assert_success("maintain");
    let report = output.json();
    assert_eq!(report["ok"], true, "{report:#}");

    let database = &report["database"];
    assert_eq!(database["status"], "ok");
    assert_eq!(database["backend"], "postgres");
    assert_eq!(database["database"], db.name.as_str());
    let vacuumed: Vec<&str> =
        database["vacuumed"].as_array().expect("vacuumed").iter().filter_map(Value::as_str).collect();
    assert!(
        vacuumed.contains(&"public.endpoint_access") && vacuumed.contains(&"public._sqlx_migrations"),
        "{vacuumed:?}"
    );
    let table = database["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["table"] == "public.endpoint_access")
        .expect("endpoint_access reported");
    for field in ["live_tuples_before", "dead_tuples_before", "live_tuples", "dead_tuples", "total_bytes"] {
        assert!(table[field].is_i64(), "{field}: {table:#}");
    }
    assert_eq!(table["live_tuples"], 3, "three endpoints counted: {table:#}");
    assert_eq!(table["dead_tuples"], 0, "VACUUM removed the dead tuples: {table:#}");
    assert!(database["indexes"]
        .as_array()
        .is_some_and(|i| i.iter().any(|i| i["index"] == "public.endpoint_access_pkey")));
    assert_eq!(database["invalid_indexes"], serde_json::json!([]));

    let r = &report["redis"];
    assert_eq!(r["status"], "ok", "{r:#}");
    assert_eq!(r["keys"], 6, "{r:#}");
    assert_eq!(r["window_keys"], 5, "{r:#}");
    assert_eq!(r["deleted_without_ttl"], 1, "{r:#}");
    assert_eq!(r["deleted_stale"], 1, "{r:#}");
    assert_eq!(r["unknown_window_keys"], 1, "{r:#}");
    assert!(r["used_memory_human"].as_str().is_some_and(|m| !m.is_empty()), "{r:#}");
    assert!(r["used_memory_bytes"].as_u64().is_some_and(|m| m > 0), "{r:#}");

    let exists = |key: &str, redis: &mut redis::Connection| -> bool {
        redis::cmd("EXISTS").arg(key).query::<i64>(redis).expect("EXISTS") == 1
    };
    for key in [&fresh_fine, &fresh_coarse, &unknown, &other] {
        assert!(exists(key, &mut redis), "{key} must be kept");
    }
    for key in [&without_ttl, &stale] {
        assert!(!exists(key, &mut redis), "{key} must be deleted");
    }

    // The text report for people.
    let output =
        run_bin(&["maintain"], &[("DATABASE_URL", &db.url), ("REDIS_URL", &prefix.url), ("REDIS_KEY_PREFIX", &p)])
            .await;
    output.assert_success("maintain (text)");
    assert!(output.stdout.starts_with("maintain: ok"), "{}", output.stdout);
    assert!(output.stdout.contains("VACUUM (ANALYZE) of 2 table(s)"), "{}", output.stdout);
    assert!(output.stdout.contains("deleted 0 without TTL and 0 stale"), "{}", output.stdout);
}

#[tokio::test]
async fn invalid_and_unused_indexes_are_reported() {
    let db = seeded().await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    for sql in [
        "CREATE INDEX es_broken_idx ON endpoint_access (last_accessed)",
        "CREATE INDEX es_unused_idx ON endpoint_access (first_accessed)",
        // What a failed CREATE INDEX CONCURRENTLY leaves behind.
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'es_broken_idx'::regclass",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    pool.close().await;

    let output = run_bin(&["maintain", "--json"], &[("DATABASE_URL", &db.url)]).await;
    output.assert_failure("maintain with an invalid index");
    let report = output.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["database"]["invalid_indexes"], serde_json::json!(["public.es_broken_idx"]));
    let unused: Vec<&str> =
        report["database"]["unused_indexes"].as_array().expect("unused").iter().filter_map(Value::as_str).collect();
    assert!(unused.contains(&"public.es_unused_idx") && !unused.contains(&"public.endpoint_access_pkey"), "{unused:?}");
    let failures = report["failures"].to_string();
    assert!(failures.contains("REINDEX INDEX CONCURRENTLY public.es_broken_idx"), "{failures}");
    assert!(report["warnings"].to_string().contains("es_unused_idx"), "{report:#}");
    assert_eq!(report["redis"]["status"], "skipped");
}

#[tokio::test]
async fn redis_down_fails_the_run_but_the_database_is_still_maintained() {
    let db = seeded().await;
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let output = run_bin(&["maintain", "--json"], &[("DATABASE_URL", &db.url), ("REDIS_URL", &closed)]).await;
    output.assert_failure("maintain with Redis down");
    let report = output.json();
    assert_eq!(report["database"]["status"], "ok");
    assert_eq!(report["redis"]["status"], "failed");
    assert!(report["failures"].to_string().contains("redis"), "{report:#}");
}

/// Another application's keys without a TTL survive, under the service's prefix (names outside
/// its key scheme) and beside it; and an empty prefix, which would put every key of the Redis
/// under it, is refused before anything is touched.
#[tokio::test]
async fn maintain_deletes_only_keys_of_its_own_scheme() {
    let db = TestDatabase::create().await;
    let prefix = TestRedisPrefix::new(&redis_url());
    let p = prefix.prefix.clone();
    // Keys of "another application" at the top level of the shared Redis, deleted by this guard.
    let other_app =
        TestRedisPrefix { url: prefix.url.clone(), prefix: format!("window:user-session:{}", unique_name("app")) };
    let mut redis = redis_connection(&prefix.url);
    let now = chrono::Utc::now().timestamp();
    let ours_without_ttl = format!("{p}window:1m:{}", now / 60 - 1);
    let under = [format!("{p}window:user-session:abc"), format!("{p}window:10s:{}:session", now / 10)];
    let beside = [format!("{}:abc", other_app.prefix), format!("{}window:1m:{}", other_app.prefix, now / 60 - 1)];
    let mut seed = redis::pipe();
    for key in std::iter::once(&ours_without_ttl).chain(&under).chain(&beside) {
        seed.set(key, 1);
    }
    let _: () = seed.query(&mut redis).expect("seed Redis");
    let exists = |key: &str, redis: &mut redis::Connection| -> bool {
        redis::cmd("EXISTS").arg(key).query::<i64>(redis).expect("EXISTS") == 1
    };

    let output = run_bin(
        &["maintain", "--json"],
        &[("DATABASE_URL", &db.url), ("REDIS_URL", &prefix.url), ("REDIS_KEY_PREFIX", &p)],
    )
    .await;
    output.assert_success("maintain");
    let r = &output.json()["redis"];
    assert_eq!(r["deleted_without_ttl"], 1, "{r:#}");
    assert_eq!(r["unknown_window_keys"], 2, "reported: {r:#}");
    assert!(!exists(&ours_without_ttl, &mut redis), "the service's own key without TTL is deleted");
    for key in under.iter().chain(&beside) {
        assert!(exists(key, &mut redis), "{key} belongs to another application and must survive");
    }

    for (empty_prefix, as_flag) in [("", false), ("", true), (" ", false)] {
        let (args, env): (Vec<&str>, Vec<(&str, &str)>) = if as_flag {
            (vec!["maintain", "--redis-key-prefix", empty_prefix], vec![])
        } else {
            (vec!["maintain"], vec![("REDIS_KEY_PREFIX", empty_prefix)])
        };
        let mut env = env;
        env.extend([("DATABASE_URL", db.url.as_str()), ("REDIS_URL", prefix.url.as_str())]);
        let output = run_bin(&args, &env).await;
        output.assert_failure("maintain with an empty REDIS_KEY_PREFIX");
        assert!(output.stderr.contains("REDIS_KEY_PREFIX"), "names the variable: {}", output.stderr);
        assert!(output.stdout.is_empty(), "nothing done: {}", output.stdout);
        for key in under.iter().chain(&beside) {
            assert!(exists(key, &mut redis), "{key} must survive maintain with prefix {empty_prefix:?}");
        }
    }
}
