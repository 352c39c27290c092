//! No secret of DATABASE_URL or REDIS_URL shows anywhere: not in any output or log line of the
//! service or of an operations command, not in `--help` or `check --json`, and not in the argument
//! list of a PostgreSQL client tool (which every user of the machine can read with `ps`).
//!
//! The client tools are observed through `--pg-bin-dir`: a folder of wrapper scripts that append
//! their arguments to a file, then `exec` the real tool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::helpers::ops::*;
use crate::helpers::{self, free_port, run_bin, unique_name, Bin, Output, OwnRedis, Replica, TestDatabase};

/// Every secret value starts with this; the test fails if it appears anywhere it looks.
const STEM: &str = "S3cr3tM4rk";
/// The secret parameters that the libpq of the local client tools (PostgreSQL 15) accepts.
const SECRETS_OF_THIS_LIBPQ: &[&str] = &["password", "sslpassword"];
/// Secret parameters of newer libpq versions (PostgreSQL 18): older tools reject them.
const NEWER_SECRETS: &[&str] = &["oauth_client_secret", "scram_client_key", "scram_server_key"];

fn marker(what: &str) -> String {
    format!("{STEM}{what}")
}

/// `base` (a trust-auth URL of the test server) with a password in its user part and `params` as
/// query parameters, each with its own marker.
fn secret_url(base: &str, params: &[&str]) -> String {
    let mut url = url::Url::parse(base).expect("test database URL");
    url.set_password(Some(&marker("userinfo"))).expect("password");
    for param in params {
        url.query_pairs_mut().append_pair(param, &marker(param));
    }
    url.to_string()
}

/// Everything the test saw, by where it saw it.
#[derive(Default)]
struct Observed(Vec<(String, String)>);

impl Observed {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    fn output(&mut self, what: &str, output: &Output) {
        self.add(format!("{what}: stdout"), output.stdout.clone());
        self.add(format!("{what}: stderr"), output.stderr.clone());
    }

    fn assert_no_secret(&self) {
        let leaks: Vec<String> = self
            .0
            .iter()
            .filter(|(_, text)| text.contains(STEM))
            .map(|(what, text)| {
                let line = text.lines().find(|l| l.contains(STEM)).unwrap_or_default();
                format!("{what}: {line}")
            })
            .collect();
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }
}

/// Where the real PostgreSQL client tools are.
fn real_pg_bin_dir() -> PathBuf {
    if let Ok(output) = std::process::Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("pg_dump").is_file() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries.flatten().map(|e| e.path().join("bin")).filter(|d| d.join("pg_dump").is_file()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect("PostgreSQL client tools (pg_config --bindir or /usr/lib/postgresql/*/bin)")
}

/// A folder of recording wrappers around the real tools: each appends its argument list to `log`.
fn recording_pg_bin_dir(dir: &Path, log: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let real = real_pg_bin_dir();
    for tool in ["pg_dump", "pg_restore"] {
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"{tool} $*\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            real.join(tool).display()
        );
        let path = dir.join(tool);
        std::fs::write(&path, script).expect("write wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    }
}

/// The service as a child process with its output in files, probed until SIGTERM; whether it
/// became ready.
async fn serve_and_probe(env: &[(&str, &str)], observed: &mut Observed, what: &str) -> bool {
    let logs = tempfile::tempdir().expect("tempdir");
    let (stdout_path, stderr_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    // No RUST_LOG but the one of `env`.
    let bin = Bin::new(&["serve"])
        .env_remove("RUST_LOG")
        .envs(env)
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .log_to(&stderr_path);
    let mut replica = Replica::spawn(bin);
    // False at once when it failed to start: its output says why.
    let ready = replica.ready_within(Duration::from_secs(20)).await;
    if ready {
        let client = helpers::client();
        for path in ["/", "/stats", "/api/v1/endpoints", "/ready", "/health", "/metrics", "/nope"] {
            let response = client.get(format!("{}{path}", replica.address)).send().await.expect("request");
            observed.add(format!("{what}: GET {path}"), response.text().await.unwrap_or_default());
        }
        replica.signal("TERM");
    }
    let exited = replica.exit_within(Duration::from_secs(30)).await;
    assert!(exited.is_some(), "{what}: serve did not exit");
    for path in [stdout_path, stderr_path] {
        observed.add(format!("{what}: {}", path.display()), std::fs::read_to_string(&path).unwrap_or_default());
    }
    ready
}

#[tokio::test]
async fn no_secret_reaches_any_output_log_help_check_or_tool_arguments() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = dir.path().join("bin");
    let backups = dir.path().join("backups");
    let plain_backups = dir.path().join("plain-backups");
    // The commands' TMPDIR: the service files for the tools go there and must be gone afterwards.
    let tmp = dir.path().join("tmp");
    for folder in [&bin_dir, &backups, &plain_backups, &tmp] {
        std::fs::create_dir(folder).expect("mkdir");
    }
    let tool_log = dir.path().join("tool-arguments.log");
    recording_pg_bin_dir(&bin_dir, &tool_log);

    // Redis with a password of its own.
    let redis = OwnRedis::start();
    let redis_password = marker("redis");
    let mut connection = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("own Redis");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(&redis_password)
        .query(&mut connection)
        .expect("CONFIG SET requirepass");
    let redis_url = format!("redis://:{redis_password}@127.0.0.1:{}/0", redis.port);
    let key_prefix = format!("{}:", unique_name("secrets"));

    // A dump made without secrets, for verify-backup and restore whatever backup does below.
    count_accesses(&db, 2, 1, 0).await;
    backup(&db.url, &plain_backups).await.assert_success("backup with a plain URL");
    let dump = single_dump(&plain_backups);

    let every_secret: Vec<&str> = SECRETS_OF_THIS_LIBPQ.iter().chain(NEWER_SECRETS).copied().collect();
    let closed = format!("postgres://postgres@127.0.0.1:{}/{}", free_port(), db.name);
    let variants = [
        // Secrets these tools know: every command works, so the secrets reach the tools.
        ("secrets of this libpq", secret_url(&db.url, SECRETS_OF_THIS_LIBPQ), true),
        // Every secret libpq accepts: the tools may refuse the newer ones.
        ("every secret", secret_url(&db.url, &every_secret), false),
        // And the error paths: the server is unreachable.
        ("unreachable", secret_url(&closed, &every_secret), false),
    ];

    let mut observed = Observed::default();
    let help_env = [("DATABASE_URL", variants[1].1.as_str()), ("REDIS_URL", redis_url.as_str())];
    for command in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["backup", "--help"],
        &["verify-backup", "--help"],
        &["restore", "--help"],
        &["maintain", "--help"],
        &["check", "--help"],
    ] {
        let output = run_bin(command, &help_env).await;
        output.assert_success(&format!("{command:?}"));
        observed.output(&format!("{command:?}"), &output);
    }

    for (variant, database_url, must_work) in &variants {
        let env = [
            ("DATABASE_URL", database_url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("REDIS_KEY_PREFIX", key_prefix.as_str()),
            ("PG_BIN_DIR", bin_dir.to_str().expect("UTF-8 path")),
            ("TMPDIR", tmp.to_str().expect("UTF-8 path")),
            // Everything any part of the binary logs.
            ("RUST_LOG", "debug"),
        ];
        let served = serve_and_probe(&env, &mut observed, &format!("{variant}: serve")).await;
        assert!(served || !must_work, "{variant}: serve did not become ready");
        let backups_arg = path_str(&backups);
        let dump_arg = path_str(&dump);
        let commands: [&[&str]; 8] = [
            &["migrate"],
            &["backup", "--dir", backups_arg],
            &["verify-backup", "--dir", backups_arg],
            &["restore", "--from", dump_arg, "--yes"],
            &["maintain"],
            &["maintain", "--json"],
            &["check", "--json"],
            &["check"],
        ];
        for command in commands {
            let output = run_bin(command, &env).await;
            if *must_work {
                output.assert_success(&format!("{variant}: {command:?}"));
            }
            observed.output(&format!("{variant}: {command:?}"), &output);
        }
        // A backup per second at most: the next variant's must not collide with this one's.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }

    let arguments = std::fs::read_to_string(&tool_log).unwrap_or_default();
    assert!(arguments.contains("pg_dump ") && arguments.contains("pg_restore "), "the tools ran: {arguments}");
    observed.add("argument lists of the PostgreSQL tools", arguments);
    observed.assert_no_secret();
    assert_eq!(files_in(&tmp), Vec::<String>::new(), "the service files of the tools are removed");
}
