//! Helpers of the operations tests (the `ops_*` modules): inspect backup directories, fabricate
//! dumps with given name-times, manage helper processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use chrono::{DateTime, Utc};

use super::{run_bin, settings, Output, TestApp, TestDatabase};

/// A fresh database with `root`, `stats`, `endpoints` accesses counted, backed up into a temp dir:
/// the database, the dir (removed on drop) and the dump.
pub async fn database_with_dump(
    root: usize,
    stats: usize,
    endpoints: usize,
) -> (TestDatabase, tempfile::TempDir, PathBuf) {
    let db = TestDatabase::create().await;
    count_accesses(&db, root, stats, endpoints).await;
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&db.url, dir.path()).await.assert_success("backup");
    let dump = single_dump(dir.path());
    (db, dir, dump)
}

/// `backup --dir DIR` of the database at `url`.
pub async fn backup(url: &str, dir: &Path) -> Output {
    run_bin(&["backup", "--dir", path_str(dir)], &[("DATABASE_URL", url)]).await
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// File names in `dir`, sorted (empty when the directory does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Names that look like a backup or a piece of one: a dump, its companions or a temp file.
pub fn backup_like(dir: &Path) -> Vec<String> {
    files_in(dir).into_iter().filter(|n| n.contains("endpoint-stats-") || n.ends_with(".partial")).collect()
}

/// The dumps (not companions) in `dir`.
pub fn dumps_in(dir: &Path) -> Vec<String> {
    files_in(dir).into_iter().filter(|n| n.starts_with("endpoint-stats-") && n.ends_with(".dump")).collect()
}

/// A fabricated dump named for `time`; `good` adds its checksum and manifest files.
pub fn fake_dump(dir: &Path, time: DateTime<Utc>, good: bool) -> String {
    let name = endpoint_stats::ops::dump_file_name(time);
    std::fs::write(dir.join(&name), b"not a real dump").expect("write fake dump");
    if good {
        std::fs::write(dir.join(format!("{name}.sha256")), format!("{}  {name}\n", "0".repeat(64))).expect("write");
        std::fs::write(dir.join(format!("{name}.manifest.json")), b"{}").expect("write");
    }
    name
}

/// [`seed_via_api`] on an application of its own over `db`, shut down afterwards.
pub async fn count_accesses(db: &TestDatabase, root: usize, stats: usize, endpoints: usize) {
    let app = TestApp::spawn(settings(db.settings(), None)).await;
    seed_via_api(&app, root, stats, endpoints).await;
    app.shutdown().await;
}

/// Counts some accesses through the HTTP API: `root` × `/`, `stats` × `/stats`,
/// `endpoints` × `/api/v1/endpoints`.
pub async fn seed_via_api(app: &TestApp, root: usize, stats: usize, endpoints: usize) {
    for (path, n) in [("/", root), ("/stats", stats), ("/api/v1/endpoints", endpoints)] {
        for _ in 0..n {
            let response = app.get(path).await;
            assert_eq!(response.status().as_u16(), 200, "GET {path}");
        }
    }
}

/// Adds `rows` synthetic rows straight into endpoint_access (for sizes and timings).
pub async fn insert_synthetic_rows(url: &str, rows: u64) {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    sqlx::query(
        "INSERT INTO endpoint_access (endpoint, access_count, first_accessed, last_accessed) \
         SELECT '/synthetic/' || g, g, now(), now() FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(rows).expect("rows"))
    .execute(&pool)
    .await
    .expect("insert synthetic rows");
    pool.close().await;
}

pub async fn database_exists(name: &str) -> bool {
    let pool = sqlx::PgPool::connect(&super::postgres_admin_url()).await.expect("connect admin");
    let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&pool)
        .await
        .expect("pg_database");
    pool.close().await;
    exists
}

/// The scratch database named in a verify-backup output (`endpoint_stats_verify_<16 hex>`).
pub fn scratch_name(output: &Output) -> Option<String> {
    let text = format!("{}{}", output.stdout, output.stderr);
    let start = text.find("endpoint_stats_verify_")?;
    let name: String = text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    Some(name)
}

/// Rewrites a dump's checksum file and the manifest's sha256/bytes to match the dump as it now is
/// (as if the dump had been damaged before it was checksummed).
pub fn recompute_checksum_and_manifest(dump: &Path) {
    use sha2::Digest;
    let bytes = std::fs::read(dump).expect("read dump");
    let hex = hex::encode(sha2::Sha256::digest(&bytes));
    let name = dump.file_name().and_then(|n| n.to_str()).expect("dump name").to_owned();
    std::fs::write(dump.with_file_name(format!("{name}.sha256")), format!("{hex}  {name}\n")).expect("write sha256");
    let manifest_path = dump.with_file_name(format!("{name}.manifest.json"));
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("read manifest")).expect("manifest JSON");
    manifest["sha256"] = serde_json::Value::from(hex);
    manifest["bytes"] = serde_json::Value::from(bytes.len() as u64);
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).expect("JSON")).expect("write manifest");
}

/// The only dump in `dir`, as a path.
pub fn single_dump(dir: &Path) -> PathBuf {
    let dumps = dumps_in(dir);
    assert_eq!(dumps.len(), 1, "expected one dump in {}: {dumps:?}", dir.display());
    dir.join(&dumps[0])
}

/// A helper process (Prometheus, Alertmanager) killed on drop.
pub struct ChildProcess {
    child: Option<std::process::Child>,
    pub port: u16,
}

impl ChildProcess {
    pub fn spawn(mut command: std::process::Command, port: u16) -> Self {
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn helper process");
        Self { child: Some(child), port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
