//! Bad configuration ends the process with one clear line naming the variable, and never panics.

use crate::helpers::{free_port, Bin};

/// The binary in an empty directory (where the SQLite default lives), at its default log level:
/// no `RUST_LOG`, so that a line at any level it logs by default counts against the one line.
async fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Bin::new(args).env_remove("RUST_LOG").current_dir(dir.path()).envs(env).output().await;
    (output.code, output.stdout, output.stderr)
}

async fn assert_clear_failure(env: &[(&str, &str)], must_name: &str) {
    let (code, _, stderr) = run(env, &[]).await;
    assert_ne!(code, 0, "{env:?} should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {env:?}, got:\n{stderr}");
    assert!(lines[0].contains(must_name), "`{}` does not name {must_name}", lines[0]);
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[tokio::test]
async fn unparsable_database_url() {
    assert_clear_failure(&[("DATABASE_URL", "postgres//broken")], "DATABASE_URL").await;
    assert_clear_failure(&[("DATABASE_URL", "mysql://db/stats")], "DATABASE_URL").await;
}

#[tokio::test]
async fn unreachable_database_at_start() {
    let port = free_port();
    // Nothing listens on a port we just released.
    assert_clear_failure(&[("DATABASE_URL", &format!("postgres://u:hunter2@127.0.0.1:{port}/x"))], "DATABASE_URL")
        .await;
    let (_, _, stderr) = run(&[("DATABASE_URL", &format!("postgres://u:hunter2@127.0.0.1:{port}/x"))], &[]).await;
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[tokio::test]
async fn unreachable_redis_at_start() {
    let port = free_port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    assert_clear_failure(&[("REDIS_URL", &url)], "REDIS_URL").await;
    let (_, _, stderr) = run(&[("REDIS_URL", &url)], &[]).await;
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[tokio::test]
async fn unparsable_redis_url() {
    assert_clear_failure(&[("REDIS_URL", "http://cache:6379")], "REDIS_URL").await;
    assert_clear_failure(&[("REDIS_URL", "::nonsense")], "REDIS_URL").await;
}

#[tokio::test]
async fn bad_port_values() {
    assert_clear_failure(&[("PORT", "not-a-port")], "PORT").await;
    assert_clear_failure(&[("PORT", "70000")], "PORT").await;
    assert_clear_failure(&[("LOG_FORMAT", "xml")], "LOG_FORMAT").await;
}

#[tokio::test]
async fn port_in_use() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port().to_string();
    assert_clear_failure(&[("PORT", &port), ("BIND", "127.0.0.1")], "PORT").await;
}

#[tokio::test]
async fn help_lists_variables_with_defaults_and_hides_secrets() {
    let secret = "postgres://app:topsecret@db/stats";
    let (code, stdout, _) =
        run(&[("DATABASE_URL", secret), ("REDIS_URL", "redis://:alsosecret@cache")], &["--help"]).await;
    assert_eq!(code, 0);
    for variable in [
        "DATABASE_URL",
        "REDIS_URL",
        "PORT",
        "BIND",
        "LOG_FORMAT",
        "RUST_LOG",
        "DB_POOL_SIZE",
        "REQUEST_TIMEOUT_SECS",
        "SHUTDOWN_GRACE_SECS",
    ] {
        assert!(stdout.contains(&format!("env: {variable}")), "--help lacks {variable}:\n{stdout}");
    }
    assert!(stdout.contains("[default: 9999]"));
    assert!(!stdout.contains("topsecret") && !stdout.contains("alsosecret"), "--help shows a secret:\n{stdout}");
}

#[tokio::test]
async fn empty_redis_key_prefix_is_refused_by_every_command_that_takes_it() {
    // An unreachable database: without the check, the commands fail on it instead (and quickly).
    let port = free_port();
    let database_url = format!("postgres://u@127.0.0.1:{port}/x");
    for command in [&[][..], &["serve"], &["maintain"]] {
        for empty in ["", "  "] {
            let (code, stdout, stderr) =
                run(&[("REDIS_KEY_PREFIX", empty), ("DATABASE_URL", &database_url)], command).await;
            assert_eq!(code, 2, "{command:?} with REDIS_KEY_PREFIX={empty:?}: {stdout}{stderr}");
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{command:?}: one line:\n{stderr}");
            assert!(lines[0].contains("REDIS_KEY_PREFIX") && lines[0].contains("empty"), "{command:?}: {}", lines[0]);
        }
    }
}
