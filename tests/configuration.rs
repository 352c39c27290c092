//! Bad configuration ends the process with one clear line naming the variable, and never panics.

use std::process::Command;

fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_endpoint-stats"));
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("LOG_FORMAT", "text");
    let dir = tempfile::tempdir().expect("tempdir");
    command.current_dir(dir.path());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.args(args).output().expect("run endpoint-stats");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_clear_failure(env: &[(&str, &str)], must_name: &str) {
    let (code, _, stderr) = run(env, &[]);
    assert_ne!(code, 0, "{env:?} should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {env:?}, got:\n{stderr}");
    assert!(lines[0].contains(must_name), "`{}` does not name {must_name}", lines[0]);
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn unparsable_database_url() {
    assert_clear_failure(&[("DATABASE_URL", "postgres//broken")], "DATABASE_URL");
    assert_clear_failure(&[("DATABASE_URL", "mysql://db/stats")], "DATABASE_URL");
}

#[test]
fn unreachable_database_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(1);
    // Nothing listens on a port we just released.
    assert_clear_failure(&[("DATABASE_URL", &format!("postgres://u:hunter2@127.0.0.1:{port}/x"))], "DATABASE_URL");
    let (_, _, stderr) = run(&[("DATABASE_URL", &format!("postgres://u:hunter2@127.0.0.1:{port}/x"))], &[]);
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[test]
fn unreachable_redis_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(1);
    let url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    assert_clear_failure(&[("REDIS_URL", &url)], "REDIS_URL");
    let (_, _, stderr) = run(&[("REDIS_URL", &url)], &[]);
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[test]
fn unparsable_redis_url() {
    assert_clear_failure(&[("REDIS_URL", "http://cache:6379")], "REDIS_URL");
    assert_clear_failure(&[("REDIS_URL", "::nonsense")], "REDIS_URL");
}

#[test]
fn bad_port_values() {
    assert_clear_failure(&[("PORT", "not-a-port")], "PORT");
    assert_clear_failure(&[("PORT", "70000")], "PORT");
    assert_clear_failure(&[("LOG_FORMAT", "xml")], "LOG_FORMAT");
}

#[test]
fn port_in_use() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port().to_string();
    assert_clear_failure(&[("PORT", &port), ("BIND", "127.0.0.1")], "PORT");
}

#[test]
fn help_lists_variables_with_defaults_and_hides_secrets() {
    let secret = "postgres://app:topsecret@db/stats";
    let (code, stdout, _) = run(&[("DATABASE_URL", secret), ("REDIS_URL", "redis://:alsosecret@cache")], &["--help"]);
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

#[test]
fn empty_redis_key_prefix_is_refused_by_every_command_that_takes_it() {
    // An unreachable database: without the check, the commands fail on it instead (and quickly).
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(1);
    let database_url = format!("postgres://u@127.0.0.1:{port}/x");
    for command in [&[][..], &["serve"], &["maintain"]] {
        for empty in ["", "  "] {
            let (code, stdout, stderr) = run(&[("REDIS_KEY_PREFIX", empty), ("DATABASE_URL", &database_url)], command);
            assert_eq!(code, 2, "{command:?} with REDIS_KEY_PREFIX={empty:?}: {stdout}{stderr}");
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{command:?}: one line:\n{stderr}");
            assert!(lines[0].contains("REDIS_KEY_PREFIX") && lines[0].contains("empty"), "{command:?}: {}", lines[0]);
        }
    }
}
