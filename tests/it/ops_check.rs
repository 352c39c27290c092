//! `check`: replicas, PostgreSQL, Redis, Prometheus, Alertmanager and backups, for real.

use std::time::{Duration, Instant};

use crate::helpers::ops::*;
use crate::helpers::{self, free_port, run_bin, OwnRedis, Replica, TestDatabase};
use serde_json::Value;

/// The component object named `name` in a `check --json` report.
fn component<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["components"]
        .as_array()
        .expect("components")
        .iter()
        .find(|c| c["component"] == name)
        .unwrap_or_else(|| panic!("no component {name} in {report:#}"))
}

fn assert_status(report: &Value, name: &str, status: &str) {
    let c = component(report, name);
    assert_eq!(c["status"], status, "{name}: {c:#}");
    assert!(c["detail"].is_string() && c["latency_ms"].is_u64(), "{c:#}");
}

#[tokio::test]
async fn healthy_system_passes_then_redis_and_a_replica_are_named_when_down() {
    let db = TestDatabase::create().await;
    let mut redis = OwnRedis::start();
    let redis_url = redis.url();
    let first = Replica::start(&db.url, &[("REDIS_URL", &redis_url)]).await;
    let mut second = Replica::start(&db.url, &[("REDIS_URL", &redis_url)]).await;
    let backups = tempfile::tempdir().expect("tempdir");
    fake_dump(backups.path(), chrono::Utc::now() - chrono::Duration::hours(2), true);
    let (first_address, second_address) = (first.address.clone(), second.address.clone());
    let (first_name, second_name) = (format!("replica {first_address}"), format!("replica {second_address}"));

    let args = [
        "check",
        "--json",
        "--url",
        &first_address,
        "--url",
        &second_address,
        "--backup-dir",
        path_str(backups.path()),
    ];
    let env = [("DATABASE_URL", db.url.as_str()), ("REDIS_URL", redis_url.as_str())];

    let output = run_bin(&args, &env).await;
    output.assert_success("check of a healthy system");
    let report = output.json();
    assert_eq!(report["ok"], true);
    for name in [first_name.as_str(), second_name.as_str(), "postgres", "redis", "backup"] {
        assert_status(&report, name, "ok");
    }
    for name in ["prometheus targets", "prometheus alerts", "alertmanager"] {
        assert_status(&report, name, "skipped");
    }
    assert!(component(&report, "postgres")["detail"].as_str().is_some_and(|d| d.contains("migration")));

    // Redis down: counting goes on (replicas stay ready) but check fails and names Redis.
    redis.stop();
    let output = run_bin(&args, &env).await;
    output.assert_failure("check with Redis down");
    let report = output.json();
    assert_eq!(report["ok"], false);
    assert_status(&report, "redis", "failed");
    assert_eq!(report["failed"], serde_json::json!(["redis"]));
    assert_status(&report, &first_name, "ok");

    // A replica down as well: named.
    second.signal("KILL");
    second.wait().await;
    let output = run_bin(&args, &env).await;
    output.assert_failure("check with a replica down");
    let report = output.json();
    assert_status(&report, &second_name, "failed");
    assert_status(&report, &first_name, "ok");
    let failed: Vec<&str> = report["failed"].as_array().expect("failed").iter().filter_map(Value::as_str).collect();
    assert!(failed.contains(&second_name.as_str()) && failed.contains(&"redis"), "{failed:?}");

    // The table for people says the same.
    let without_json: Vec<&str> = args.iter().filter(|a| **a != "--json").copied().collect();
    let output = run_bin(&without_json, &env).await;
    assert_ne!(output.code, 0);
    let table = output.stdout;
    assert!(table.starts_with("COMPONENT"), "{table}");
    let row = table.lines().find(|l| l.starts_with(&second_name)).unwrap_or_default();
    assert!(row.contains("FAILED"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("prometheus alerts") && l.contains("skipped")), "{table}");
    assert!(table.contains("check: FAILED: "), "{table}");
    drop(first);
}

/// `--replicas-dns`: every address of the name is checked as a replica (here `localhost`, one
/// address; a headless Service in Kubernetes gives one per pod), and a name that does not resolve
/// fails the check instead of checking nothing.
#[tokio::test]
async fn replicas_are_found_through_dns() {
    let db = TestDatabase::create().await;
    let replica = Replica::start(&db.url, &[]).await;
    let by_name = format!("http://localhost:{}", replica.port);
    let output = run_bin(&["check", "--json", "--replicas-dns", &by_name], &[]).await;
    output.assert_success("check of the replicas behind a name");
    assert_status(&output.json(), &format!("replica http://127.0.0.1:{}", replica.port), "ok");

    let output = run_bin(&["check", "--json", "--replicas-dns", "http://no-such-host.invalid:9999"], &[]).await;
    output.assert_failure("check of a name that does not resolve");
    let report = output.json();
    assert_status(&report, "replicas of http://no-such-host.invalid:9999", "failed");
    drop(replica);
}

#[tokio::test]
async fn unconfigured_components_are_skipped() {
    let output = run_bin(&["check", "--json"], &[]).await;
    output.assert_success("check with nothing configured");
    let report = output.json();
    for c in report["components"].as_array().expect("components") {
        assert_eq!(c["status"], "skipped", "{c:#}");
    }
    assert_eq!(report["ok"], true);
}

#[tokio::test]
async fn database_down_and_old_backups_fail() {
    let closed = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let backups = tempfile::tempdir().expect("tempdir");
    fake_dump(backups.path(), chrono::Utc::now() - chrono::Duration::hours(30), true);
    let output =
        run_bin(&["check", "--json", "--backup-dir", path_str(backups.path())], &[("DATABASE_URL", &closed)]).await;
    output.assert_failure("check with the database down");
    let report = output.json();
    assert_status(&report, "postgres", "failed");
    assert_status(&report, "backup", "failed");
    let detail = component(&report, "backup")["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains("30.0 h old") && detail.contains("limit 26 h"), "{detail}");

    // The limit is a flag.
    let output =
        run_bin(&["check", "--json", "--backup-dir", path_str(backups.path()), "--max-backup-age-hours", "48"], &[])
            .await;
    output.assert_success("check with a 48 h limit");
}

/// A probe that hangs is cut by its own timeout and does not hold the others.
#[tokio::test]
async fn a_hanging_component_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Accepts connections (kernel backlog) but never answers.
    let started = Instant::now();
    let output =
        run_bin(&["check", "--json", "--timeout-secs", "1", "--url", &format!("http://127.0.0.1:{port}")], &[]).await;
    output.assert_failure("check of a hanging replica");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let report = output.json();
    assert_status(&report, &format!("replica http://127.0.0.1:{port}"), "failed");
    drop(listener);
}

fn prometheus(dir: &std::path::Path, targets: &[(&str, String)], firing_rule: bool) -> ChildProcess {
    let port = free_port();
    let mut scrape = String::new();
    for (job, target) in targets {
        scrape.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"));
    }
    let mut rules = String::from(
        "groups:\n  - name: test\n    rules:\n      - alert: Watchdog\n        expr: vector(1)\n        labels:\n          severity: none\n",
    );
    if firing_rule {
        rules.push_str(
            "      - alert: TestFiring\n        expr: vector(1)\n        labels:\n          severity: warning\n",
        );
    }
    std::fs::write(dir.join("rules.yml"), rules).expect("rules");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\nscrape_configs:\n{scrape}",
            dir.join("rules.yml").display()
        ),
    )
    .expect("config");
    let mut command = std::process::Command::new("prometheus");
    command
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=error");
    ChildProcess::spawn(command, port)
}

/// Waits until every target has been scraped and Watchdog fires.
async fn wait_settled(prometheus: &ChildProcess) {
    let client = helpers::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let targets: Option<Value> = match client.get(format!("{}/api/v1/targets", prometheus.url())).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let alerts: Option<Value> = match client.get(format!("{}/api/v1/alerts", prometheus.url())).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        if let (Some(targets), Some(alerts)) = (targets, alerts) {
            let scraped = targets["data"]["activeTargets"]
                .as_array()
                .is_some_and(|t| !t.is_empty() && t.iter().all(|t| t["health"] != "unknown"));
            let watchdog = alerts["data"]["alerts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["labels"]["alertname"] == "Watchdog" && a["state"] == "firing"));
            if scraped && watchdog {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("Prometheus on {} did not settle", prometheus.url());
}

#[tokio::test]
async fn prometheus_targets_and_alerts_and_alertmanager() {
    let db = TestDatabase::create().await;
    let replica = Replica::start(&db.url, &[]).await;
    let replica_target = format!("127.0.0.1:{}", replica.port);
    let dead_target = format!("127.0.0.1:{}", free_port());
    let (healthy_dir, failing_dir, am_dir) =
        (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let healthy = prometheus(healthy_dir.path(), &[("endpoint-stats", replica_target.clone())], false);
    let failing =
        prometheus(failing_dir.path(), &[("endpoint-stats", replica_target), ("dead", dead_target.clone())], true);

    let am_port = free_port();
    std::fs::write(am_dir.path().join("am.yml"), "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n")
        .expect("am config");
    let mut command = std::process::Command::new("prometheus-alertmanager");
    command
        .arg(format!("--config.file={}", am_dir.path().join("am.yml").display()))
        .arg(format!("--storage.path={}", am_dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=");
    let alertmanager = ChildProcess::spawn(command, am_port);
    helpers::wait_for_port(am_port, Duration::from_secs(30));
    wait_settled(&healthy).await;
    wait_settled(&failing).await;

    let output =
        run_bin(&["check", "--json", "--prometheus", &healthy.url(), "--alertmanager", &alertmanager.url()], &[]).await;
    output.assert_success("check against a healthy Prometheus");
    let report = output.json();
    assert_status(&report, "prometheus targets", "ok");
    assert_status(&report, "prometheus alerts", "ok");
    assert_status(&report, "alertmanager", "ok");
    assert!(component(&report, "prometheus alerts")["detail"].as_str().is_some_and(|d| d.contains("Watchdog firing")));

    let output = run_bin(&["check", "--json", "--prometheus", &failing.url()], &[]).await;
    output.assert_failure("check against a Prometheus with a down target and a firing alert");
    let report = output.json();
    assert_status(&report, "prometheus targets", "failed");
    assert_status(&report, "prometheus alerts", "failed");
    let targets = component(&report, "prometheus targets")["detail"].as_str().unwrap_or_default().to_owned();
    assert!(targets.contains(&format!("dead/{dead_target}")) && !targets.contains("endpoint-stats/"), "{targets}");
    let alerts = component(&report, "prometheus alerts")["detail"].as_str().unwrap_or_default().to_owned();
    assert!(alerts.contains("TestFiring (warning)") && alerts.starts_with("1 firing"), "{alerts}");

    let am_url = alertmanager.url();
    drop(alertmanager);
    let output = run_bin(&["check", "--json", "--alertmanager", &am_url], &[]).await;
    output.assert_failure("check with Alertmanager down");
    assert_status(&output.json(), "alertmanager", "failed");
    drop(replica);
}
