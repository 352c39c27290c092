//! Test harness: a database per test, the application on port 0, real processes where a test
//! needs to kill one. Nothing is left behind: databases are dropped, Redis keys deleted, child
//! processes killed.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use endpoint_stats::config::{ConnectionLimits, DatabaseSettings, DatabaseUrl, RedisSettings, Settings};
use endpoint_stats::startup::Application;
use tokio::sync::oneshot;

/// The server that tests make their databases in. Trust auth on loopback, as scripts/test.sh sets up.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn unique_name(kind: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("es_{kind}_{}_{:x}", std::process::id(), nanos ^ u128::from(rand::random::<u64>()))
}

/// A fresh PostgreSQL database, dropped (with its connections) when this value drops.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let name = unique_name("db");
        admin_sql(&format!("CREATE DATABASE \"{name}\"")).await;
        let mut url = url::Url::parse(&postgres_admin_url()).expect("TEST_POSTGRES_URL");
        url.set_path(&name);
        Self { name, url: url.to_string() }
    }

    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings { url: DatabaseUrl::parse(&self.url).expect("test database URL"), pool_size: 10 }
    }

    /// Rows of `endpoint_access`, straight from the database.
    pub async fn stored_counts(&self) -> std::collections::BTreeMap<String, i64> {
        let pool = sqlx::PgPool::connect(&self.url).await.expect("connect to test database");
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT endpoint, access_count FROM endpoint_access")
            .fetch_all(&pool)
            .await
            .expect("select");
        pool.close().await;
        rows.into_iter().collect()
    }

    /// Refuse new connections and end the existing ones: the database is "down" for the service.
    pub async fn refuse_connections(&self) {
        admin_sql(&format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false", self.name)).await;
        admin_sql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ))
        .await;
    }

    pub async fn allow_connections(&self) {
        admin_sql(&format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", self.name)).await;
    }

    /// Another session locks the row of `endpoint` (which must exist) until the lock is released:
    /// a commit of the service on that row waits, as behind a long transaction in production.
    pub async fn lock_row(&self, endpoint: &str) -> RowLock {
        use sqlx::Connection;
        let mut holder = sqlx::PgConnection::connect(&self.url).await.expect("connect");
        sqlx::query("BEGIN").execute(&mut holder).await.expect("begin");
        sqlx::query("SELECT access_count FROM endpoint_access WHERE endpoint = $1 FOR UPDATE")
            .bind(endpoint)
            .fetch_one(&mut holder)
            .await
            .expect("lock the row");
        RowLock(holder)
    }
}

/// See [`TestDatabase::lock_row`].
pub struct RowLock(sqlx::PgConnection);

impl RowLock {
    pub async fn release(mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.0).await.expect("release the row lock");
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context; a private runtime on its own thread does the cleanup.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                runtime.block_on(async {
                    let _ = try_admin_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                });
            }
        })
        .join();
    }
}

pub async fn admin_sql(sql: &str) {
    try_admin_sql(sql).await.unwrap_or_else(|e| panic!("admin SQL `{sql}` failed: {e}"));
}

async fn try_admin_sql(sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(&postgres_admin_url()).await?;
    sqlx::query(sql).execute(&mut connection).await?;
    connection.close().await
}

/// A key prefix of its own in the shared Redis; its keys are deleted on drop.
pub struct TestRedisPrefix {
    pub url: String,
    pub prefix: String,
}

impl TestRedisPrefix {
    pub fn new(url: &str) -> Self {
        Self { url: url.to_owned(), prefix: format!("{}:", unique_name("redis")) }
    }

    pub fn settings(&self) -> RedisSettings {
        RedisSettings { url: self.url.clone(), key_prefix: self.prefix.clone() }
    }
}

impl Drop for TestRedisPrefix {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(self.url.as_str()) {
            if let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(1)) {
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{}*", self.prefix)).query(&mut connection).unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut connection);
                }
            }
        }
    }
}

/// A redis-server of the test's own on a free port, for tests that stop Redis.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    pub fn start() -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        let redis = Self { port, child: Some(child), dir };
        wait_for_port(port, Duration::from_secs(10));
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub fn wait_for_port(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {limit:?}");
}

pub fn settings(database: DatabaseSettings, redis: Option<RedisSettings>) -> Settings {
    Settings {
        database,
        redis,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        request_timeout: Duration::from_secs(3),
        shutdown_grace: Duration::from_secs(10),
        connections: ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 1024,
        },
    }
}

/// The application in this process, on a free port.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> Self {
        let application = Application::build(settings).await.expect("application builds");
        let address = format!("http://127.0.0.1:{}", application.port());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(application.run_until(async move {
            let _ = stopped.await;
        }));
        Self { address, client: client(), stop: Some(stop), task: Some(task) }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.address)).send().await.expect("request")
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// Graceful shutdown, as on SIGTERM; returns once it completed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("clean shutdown");
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(256)
        .build()
        .expect("HTTP client")
}

/// The real binary as a child process (for SIGKILL and SIGTERM tests, and several replicas).
pub struct Replica {
    pub port: u16,
    pub address: String,
    child: Option<tokio::process::Child>,
}

/// How a [`Replica`] is started beyond its environment.
#[derive(Default)]
pub struct Launch {
    /// Run under `prlimit --nofile=N:N`.
    pub open_file_limit: Option<u64>,
    /// Where stderr (the log) goes; inherited when unset.
    pub log_file: Option<std::path::PathBuf>,
    /// Working directory (where the SQLite default lives).
    pub current_dir: Option<std::path::PathBuf>,
}

impl Replica {
    pub async fn start(database_url: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_with(database_url, extra_env, Launch::default()).await
    }

    pub async fn start_with(database_url: &str, extra_env: &[(&str, &str)], launch: Launch) -> Self {
        let port = free_port();
        let binary = env!("CARGO_BIN_EXE_endpoint-stats");
        let mut command = match launch.open_file_limit {
            Some(limit) => {
                let mut command = tokio::process::Command::new("prlimit");
                command.arg(format!("--nofile={limit}:{limit}")).arg("--").arg(binary);
                command
            }
            None => tokio::process::Command::new(binary),
        };
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("PORT", port.to_string())
            .env("BIND", "127.0.0.1")
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        match launch.log_file {
            Some(path) => command.stderr(std::fs::File::create(path).expect("log file")),
            None => command.stderr(Stdio::inherit()),
        };
        if let Some(dir) = launch.current_dir {
            command.current_dir(dir);
        }
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn endpoint-stats");
        let replica = Self { port, address: format!("http://127.0.0.1:{port}"), child: Some(child) };
        replica.wait_ready(Duration::from_secs(20)).await;
        replica
    }

    pub async fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let client = client();
        while Instant::now() < deadline {
            if let Ok(response) = client.get(format!("{}/ready", self.address)).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("replica on port {} not ready after {limit:?}", self.port);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).and_then(|id| i32::try_from(id).ok()).expect("running child")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        self.wait_at_most(Duration::from_secs(30)).await
    }

    /// The exit code, or `None` when the process is still running after `limit`.
    pub async fn wait_at_most(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let status = tokio::time::timeout(limit, child.wait()).await.ok()?.ok()?;
        status.code()
    }
}

/// Extracts `access_count` from a counted response, asserting a 200.
pub async fn access_count(response: reqwest::Response) -> i64 {
    assert_eq!(response.status().as_u16(), 200, "counted route answered non-200");
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["access_count"].as_i64().expect("access_count")
}
