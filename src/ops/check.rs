//! `check`: the health of the whole system in one command, for people (a table), machines
//! (`--json`) and scripts (exit 0 only when nothing failed).
//!
//! Every probe runs concurrently under its own timeout. A component that is not configured is
//! reported as `skipped`, never as failed, so the same command serves a laptop and a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures_util::future::{join_all, BoxFuture, FutureExt};
use serde::Serialize;
use serde_json::Value;

use super::dumps::{list_dumps, newest_good};
use super::{sql_failed, Status};
use crate::config::{non_empty, DatabaseSettings, DatabaseUrl, DatabaseUrlArg, RedisUrlArg};
use crate::redis_conn::{self, MemoryInfo};
use crate::store::Database;

#[derive(Debug, clap::Args)]
#[command(
    mut_arg("database_url", |arg| arg.help("Database of the service; PostgreSQL or SQLite. Skipped when unset or empty.")),
    mut_arg("redis_url", |arg| arg.help("Redis of the service. Skipped when unset or empty."))
)]
pub struct CheckArgs {
    /// Base URL of a replica (repeat once per replica), e.g. http://10.0.0.7:9999.
    #[arg(long = "url", value_name = "URL", env = "CHECK_URLS", value_delimiter = ',')]
    pub urls: Vec<String>,

    /// Base URL whose host name resolves to every replica, e.g. a headless Service
    /// (http://endpoint-stats-pods:9999): each address is checked as a replica of its own.
    #[arg(long = "replicas-dns", value_name = "URL", env = "CHECK_REPLICAS_DNS")]
    pub replicas_dns: Option<String>,

    #[command(flatten)]
    pub database: DatabaseUrlArg,

    #[command(flatten)]
    pub redis: RedisUrlArg,

    /// Prometheus base URL: all active targets up, no firing alert but Watchdog.
    #[arg(long, env = "PROMETHEUS_URL")]
    pub prometheus: Option<String>,

    /// Alertmanager base URL.
    #[arg(long, env = "ALERTMANAGER_URL")]
    pub alertmanager: Option<String>,

    /// Directory of the backups: the newest good dump must be recent.
    #[arg(long, env = "BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,

    /// Age above which the newest backup counts as failed.
    #[arg(long, default_value_t = 26)]
    pub max_backup_age_hours: u32,

    /// Timeout of each probe.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout_secs: u64,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct ComponentResult {
    pub component: String,
    pub status: Status,
    pub detail: String,
    pub latency_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub checked_at: chrono::DateTime<Utc>,
    pub failed: Vec<String>,
    pub components: Vec<ComponentResult>,
}

type Probe = BoxFuture<'static, Result<String, String>>;

pub async fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let database = args.database.configured()?;
    let redis = args.redis.configured()?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .context("cannot build the HTTP client")?;
    let mut probes: Vec<(String, Option<Probe>)> = Vec::new();

    let mut urls: Vec<String> =
        args.urls.iter().filter_map(|u| non_empty(u.trim().trim_end_matches('/'))).map(str::to_owned).collect();
    if let Some(name_url) = configured(args.replicas_dns.as_deref()) {
        match replica_urls_of(&name_url).await {
            Ok(resolved) => urls.extend(resolved),
            Err(error) => {
                probes.push((format!("replicas of {name_url}"), Some(futures_util::future::err(error).boxed())));
            }
        }
    }
    if urls.is_empty() && probes.is_empty() {
        probes.push(("replicas".to_owned(), None));
    }
    for url in urls {
        probes.push((format!("replica {url}"), Some(probe_replica(http.clone(), url).boxed())));
    }
    // Named by what DATABASE_URL holds: production's PostgreSQL when nothing is configured.
    let database_name = match &database {
        Some(DatabaseUrl::Sqlite(_)) => "sqlite",
        Some(DatabaseUrl::Postgres(_)) | None => "postgres",
    };
    probes.push((database_name.to_owned(), database.map(|url| probe_database(url).boxed())));
    probes.push(("redis".to_owned(), redis.map(|url| probe_redis(url, timeout).boxed())));
    match configured(args.prometheus.as_deref()) {
        Some(base) => {
            let base = base.trim_end_matches('/').to_owned();
            probes.push(("prometheus targets".to_owned(), Some(probe_targets(http.clone(), base.clone()).boxed())));
            probes.push(("prometheus alerts".to_owned(), Some(probe_alerts(http.clone(), base).boxed())));
        }
        None => {
            probes.push(("prometheus targets".to_owned(), None));
            probes.push(("prometheus alerts".to_owned(), None));
        }
    }
    probes.push((
        "alertmanager".to_owned(),
        configured(args.alertmanager.as_deref()).map(|base| probe_alertmanager(http.clone(), base).boxed()),
    ));
    let max_age = chrono::Duration::hours(i64::from(args.max_backup_age_hours));
    probes.push(("backup".to_owned(), args.backup_dir.clone().map(|dir| probe_backup(dir, max_age).boxed())));

    let components = join_all(probes.into_iter().map(|(component, probe)| async move {
        let Some(probe) = probe else {
            return ComponentResult {
                component,
                status: Status::Skipped,
                detail: "not configured".to_owned(),
                latency_ms: 0,
            };
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, probe).await;
        let latency_ms = crate::telemetry::millis(started.elapsed());
        let (status, detail) = match outcome {
            Ok(Ok(detail)) => (Status::Ok, detail),
            Ok(Err(detail)) => (Status::Failed, detail),
            Err(_) => (Status::Failed, format!("no answer within {timeout:?}")),
        };
        ComponentResult { component, status, detail, latency_ms }
    }))
    .await;

    let failed: Vec<String> =
        components.iter().filter(|c| c.status == Status::Failed).map(|c| c.component.clone()).collect();
    let report = CheckReport { ok: failed.is_empty(), checked_at: Utc::now(), failed, components };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("serializing the report")?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One base URL per address that the host of `name_url` resolves to: behind a headless Service,
/// one per pod (a plain Service would pick one pod per request and hide the others).
async fn replica_urls_of(name_url: &str) -> Result<Vec<String>, String> {
    let url = url::Url::parse(name_url).map_err(|e| format!("--replicas-dns {name_url}: {e}"))?;
    let host = url.host_str().ok_or_else(|| format!("--replicas-dns {name_url}: no host"))?;
    let port = url.port_or_known_default().ok_or_else(|| format!("--replicas-dns {name_url}: no port"))?;
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("--replicas-dns: cannot resolve {host}: {e}"))?
        .collect();
    if addresses.is_empty() {
        return Err(format!("--replicas-dns: {host} resolves to no address: no replica"));
    }
    Ok(replica_urls(url.scheme(), addresses))
}

fn replica_urls(scheme: &str, mut addresses: Vec<SocketAddr>) -> Vec<String> {
    addresses.sort();
    addresses.dedup();
    // SocketAddr displays IPv6 in brackets, as a URL needs it.
    addresses.into_iter().map(|address| format!("{scheme}://{address}")).collect()
}

fn configured(value: Option<&str>) -> Option<String> {
    value.and_then(non_empty).map(str::to_owned)
}

/// `/health` must answer 200; `/ready` must answer 200 (its body says what is down otherwise).
async fn probe_replica(http: reqwest::Client, base: String) -> Result<String, String> {
    let (health_url, ready_url) = (format!("{base}/health"), format!("{base}/ready"));
    let (health, ready) = tokio::join!(get(&http, &health_url), get(&http, &ready_url));
    let (health_status, _) = health.map_err(|e| format!("/health: {e}"))?;
    let (ready_status, ready_body) = ready.map_err(|e| format!("/ready: {e}"))?;
    let redis = serde_json::from_str::<Value>(&ready_body)
        .ok()
        .and_then(|v| v["checks"]["redis"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    if health_status != 200 {
        return Err(format!("/health answered {health_status}"));
    }
    if ready_status != 200 {
        return Err(format!("/ready answered {ready_status}: {}", shorten(&ready_body)));
    }
    Ok(format!("/health 200, /ready 200 (redis: {})", shorten(&redis)))
}

async fn get(http: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let response = http.get(url).send().await.map_err(|e| describe_reqwest(&e))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| describe_reqwest(&e))?;
    Ok((status, body))
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let (status, body) = get(http, url).await?;
    if status != 200 {
        return Err(format!("{url} answered {status}: {}", shorten(&body)));
    }
    serde_json::from_str(&body).map_err(|e| format!("{url}: not JSON: {e}"))
}

fn describe_reqwest(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The innermost cause says why (connection refused, …); URLs carry no secrets here.
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    format!("{kind}: {cause}")
}

fn shorten(text: &str) -> String {
    let single: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if single.chars().count() > 200 {
        format!("{}…", single.chars().take(200).collect::<String>())
    } else {
        single
    }
}

/// `SELECT 1`, then every migration of this binary applied.
async fn probe_database(url: DatabaseUrl) -> Result<String, String> {
    let settings = DatabaseSettings { url, pool_size: 2 };
    let database = Database::connect(&settings).await.map_err(|e| format!("{}: {e}", settings.url))?;
    let result = async {
        database.check_ready().await?;
        let detail = match &database {
            Database::Postgres(pool) => {
                let (version, migrations): (String, i64) = sqlx::query_as(
                    "SELECT current_setting('server_version'), (SELECT count(*) FROM _sqlx_migrations WHERE success)",
                )
                .fetch_one(pool)
                .await
                .map_err(sql_failed("reading the version and migrations"))?;
                format!("PostgreSQL {version}, SELECT 1 ok, {migrations} migration(s) applied")
            }
            Database::Sqlite(_) => "SQLite, SELECT 1 ok, migrations applied".to_owned(),
        };
        Ok::<_, anyhow::Error>(detail)
    }
    .await;
    database.close().await;
    result.map_err(|e| format!("{e:#}"))
}

async fn probe_redis(url: String, timeout: Duration) -> Result<String, String> {
    let mut connection = redis_conn::connect(redis_conn::open(&url)?, timeout).await?;
    let pong: String = redis::cmd("PING").query_async(&mut connection).await.map_err(|e| format!("PING: {e}"))?;
    // The memory figure is a courtesy: a Redis that answers PING is up.
    let memory = MemoryInfo::read(&mut connection).await.ok().and_then(|m| m.used_human);
    Ok(format!("PING {pong}{}", memory.map(|m| format!(", used memory {m}")).unwrap_or_default()))
}

/// Every active target up; `unknown` (not scraped yet) is reported but not failed.
async fn probe_targets(http: reqwest::Client, base: String) -> Result<String, String> {
    let body = get_json(&http, &format!("{base}/api/v1/targets?state=active")).await?;
    summarize_targets(&body)
}

fn summarize_targets(body: &Value) -> Result<String, String> {
    let targets = body["data"]["activeTargets"].as_array().ok_or("no data.activeTargets in the answer")?;
    let mut down = Vec::new();
    let mut unknown = Vec::new();
    for target in targets {
        let job = target["labels"]["job"].as_str().unwrap_or("?");
        let instance = target["labels"]["instance"].as_str().unwrap_or("?");
        let name = format!("{job}/{instance}");
        match target["health"].as_str() {
            Some("up") => {}
            Some("down") => {
                let error = target["lastError"].as_str().unwrap_or("");
                down.push(if error.is_empty() { name } else { format!("{name} ({})", shorten(error)) });
            }
            _ => unknown.push(name),
        }
    }
    let pending = if unknown.is_empty() { String::new() } else { format!("; not scraped yet: {}", unknown.join(", ")) };
    if down.is_empty() {
        Ok(format!("{} active target(s), none down{pending}", targets.len()))
    } else {
        Err(format!("{} of {} target(s) down: {}{pending}", down.len(), targets.len(), down.join(", ")))
    }
}

async fn probe_alerts(http: reqwest::Client, base: String) -> Result<String, String> {
    let body = get_json(&http, &format!("{base}/api/v1/alerts")).await?;
    summarize_alerts(&body)
}

/// Firing alerts other than Watchdog fail the check, and so does a missing Watchdog: it always
/// fires while the rules are loaded and evaluated, so without it no other alert could fire either.
fn summarize_alerts(body: &Value) -> Result<String, String> {
    let alerts = body["data"]["alerts"].as_array().ok_or("no data.alerts in the answer")?;
    let mut firing = Vec::new();
    let mut watchdog = false;
    let mut pending = 0;
    for alert in alerts {
        let name = alert["labels"]["alertname"].as_str().unwrap_or("?");
        match alert["state"].as_str() {
            Some("firing") if name == "Watchdog" => watchdog = true,
            Some("firing") => {
                let severity = alert["labels"]["severity"].as_str().unwrap_or("none");
                let mut label = format!("{name} ({severity}");
                if let Some(instance) = alert["labels"]["instance"].as_str() {
                    label.push_str(&format!(", {instance}"));
                }
                label.push(')');
                firing.push(label);
            }
            _ => pending += 1,
        }
    }
    firing.sort();
    firing.dedup();
    let watchdog_note = if watchdog { "Watchdog firing" } else { "Watchdog NOT firing (alert rules loaded?)" };
    if firing.is_empty() && watchdog {
        Ok(format!("no firing alert; {watchdog_note}; {pending} pending"))
    } else if firing.is_empty() {
        Err(format!("no firing alert, but {watchdog_note}: no alert could fire; {pending} pending"))
    } else {
        Err(format!("{} firing: {}; {watchdog_note}", firing.len(), firing.join(", ")))
    }
}

async fn probe_alertmanager(http: reqwest::Client, base: String) -> Result<String, String> {
    let base = base.trim_end_matches('/');
    let (status, body) = get(&http, &format!("{base}/-/healthy")).await?;
    if status == 200 {
        Ok("/-/healthy 200".to_owned())
    } else {
        Err(format!("/-/healthy answered {status}: {}", shorten(&body)))
    }
}

async fn probe_backup(dir: PathBuf, max_age: chrono::Duration) -> Result<String, String> {
    tokio::task::spawn_blocking(move || newest_backup_age(&dir, max_age, Utc::now()))
        .await
        .map_err(|e| format!("backup check: {e}"))?
}

fn newest_backup_age(dir: &Path, max_age: chrono::Duration, now: chrono::DateTime<Utc>) -> Result<String, String> {
    let dumps = list_dumps(dir).map_err(|e| format!("{e:#}"))?;
    let (newest, newer_incomplete) = newest_good(&dumps, dir)?;
    let time = newest.time.ok_or("dump without a time in its name")?;
    let age = now - time;
    let hours = age.num_minutes() as f64 / 60.0;
    let incomplete_newer =
        newer_incomplete.last().map_or(String::new(), |d| format!("; newer {} is incomplete", d.name));
    if age > max_age {
        Err(format!(
            "newest backup {} is {hours:.1} h old (limit {} h){incomplete_newer}",
            newest.name,
            max_age.num_hours()
        ))
    } else {
        Ok(format!("newest backup {} is {hours:.1} h old, {} in total{incomplete_newer}", newest.name, dumps.len()))
    }
}

fn render_table(report: &CheckReport) -> String {
    let rows: Vec<[String; 4]> = report
        .components
        .iter()
        .map(|c| {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Failed => "FAILED",
                Status::Skipped => "skipped",
            };
            let latency = if c.status == Status::Skipped { "-".to_owned() } else { format!("{} ms", c.latency_ms) };
            [c.component.clone(), status.to_owned(), latency, c.detail.clone()]
        })
        .collect();
    let header = ["COMPONENT", "STATUS", "LATENCY", "DETAIL"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&if report.ok {
        "check: ok\n".to_owned()
    } else {
        format!("check: FAILED: {}\n", report.failed.join(", "))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn down_targets_are_named() {
        let body = json!({"status": "success", "data": {"activeTargets": [
            {"labels": {"job": "endpoint-stats", "instance": "a:9999"}, "health": "up", "lastError": ""},
            {"labels": {"job": "redis-exporter", "instance": "b:9121"}, "health": "down", "lastError": "connection refused"},
            {"labels": {"job": "postgres-exporter", "instance": "c:9187"}, "health": "unknown", "lastError": ""}
        ]}});
        let error = summarize_targets(&body).expect_err("one target down");
        assert!(error.contains("redis-exporter/b:9121 (connection refused)"), "{error}");
        assert!(error.contains("not scraped yet: postgres-exporter/c:9187"), "{error}");
    }

    #[test]
    fn watchdog_alone_is_healthy_and_other_firing_alerts_fail() {
        let watchdog = json!({"labels": {"alertname": "Watchdog", "severity": "none"}, "state": "firing"});
        let ok = summarize_alerts(&json!({"data": {"alerts": [watchdog.clone()]}})).expect("only Watchdog");
        assert!(ok.contains("Watchdog firing"), "{ok}");
        let firing = json!({"labels": {"alertname": "HighErrorRate", "severity": "critical"}, "state": "firing"});
        let pending = json!({"labels": {"alertname": "SlowResponseTime"}, "state": "pending"});
        let error = summarize_alerts(&json!({"data": {"alerts": [watchdog, firing, pending]}})).expect_err("firing");
        assert!(error.contains("HighErrorRate (critical)"), "{error}");
        assert!(!error.contains("SlowResponseTime"), "{error}");
    }

    #[test]
    fn every_address_of_a_name_is_a_replica() {
        let addresses: Vec<SocketAddr> = ["10.0.0.8:9999", "[fd00::7]:9999", "10.0.0.7:9999", "10.0.0.8:9999"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect();
        assert_eq!(
            replica_urls("http", addresses),
            ["http://10.0.0.7:9999", "http://10.0.0.8:9999", "http://[fd00::7]:9999"]
        );
    }

    #[test]
    fn no_watchdog_fails_the_check() {
        let pending = json!({"labels": {"alertname": "SlowResponseTime"}, "state": "pending"});
        let error = summarize_alerts(&json!({"data": {"alerts": [pending]}})).expect_err("no Watchdog");
        assert!(error.contains("Watchdog NOT firing"), "{error}");
        assert!(summarize_alerts(&json!({"data": {"alerts": []}})).is_err());
    }

    #[test]
    fn backup_age_comes_from_the_newest_good_dump_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Utc::now();
        let old = super::super::dumps::dump_file_name(now - chrono::Duration::hours(30));
        for name in [old.clone(), format!("{old}.sha256"), format!("{old}.manifest.json")] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        let limit = chrono::Duration::hours(26);
        let error = newest_backup_age(dir.path(), limit, now).expect_err("too old");
        assert!(error.contains("30.0 h old"), "{error}");
        assert!(newest_backup_age(dir.path(), chrono::Duration::hours(31), now).is_ok());
        let fresh = super::super::dumps::dump_file_name(now - chrono::Duration::hours(1));
        std::fs::write(dir.path().join(&fresh), b"x").expect("write");
        let error = newest_backup_age(dir.path(), limit, now).expect_err("fresh one incomplete");
        assert!(error.contains("is incomplete"), "{error}");
    }
}
