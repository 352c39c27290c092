//! Test harness: a database per test, the application on port 0, the real binary where a test
//! needs a process ([`launch`]), the helpers of the operations tests ([`ops`]), a PostgreSQL
//! server of a test's own ([`postgres_server`]) and the delaying TCP proxy ([`delay_proxy`]).
//! Nothing is left behind: databases are dropped, Redis keys deleted, child processes killed.

pub mod delay_proxy;
pub mod launch;
pub mod ops;
pub mod postgres_server;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use endpoint_stats::config::{ConnectionLimits, DatabaseSettings, DatabaseUrl, RedisSettings, Settings};
use endpoint_stats::startup::Application;
use tokio::sync::{oneshot, Mutex, MutexGuard};

pub use launch::{run_bin, Bin, Output, Replica};

/// All tests of this crate run at once in one process (libtest's threads, `--test-threads`, as
/// many as cores by default). The load-heavy ones (thousands of requests, several replicas, many
/// processes or connections, a SIGKILL or SIGTERM under load) and those that bound an answer's or
/// an exit's time take this first: one at a time, so that they neither starve nor time out each
/// other. Lighter tests still run beside them, as they ran beside them in the one crate each
/// used to be. A tokio mutex: held across awaits, released when a failing test unwinds (no
/// poisoning), shared by the runtimes of all tests.
static HEAVY: Mutex<()> = Mutex::const_new(());

/// Waits for the other heavy tests; hold the guard for the whole test (`let _heavy = heavy().await;`).
pub async fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().await
}

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
    /// Its working directory, removed on drop.
    _dir: tempfile::TempDir,
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
        let redis = Self { port, child: Some(child), _dir: dir };
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

/// Extracts `access_count` from a counted response, asserting a 200.
pub async fn access_count(response: reqwest::Response) -> i64 {
    assert_eq!(response.status().as_u16(), 200, "counted route answered non-200");
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["access_count"].as_i64().expect("access_count")
}

/// The value of one sample in a `/metrics` scrape: `series` is the name with its labels as the
/// exposition writes them (`name{label="value"}`), `None` when the scrape has no such sample.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
