//! One configuration path: every subcommand gives `DATABASE_URL` and `REDIS_URL` the same meaning.
//!
//! An empty value means unset, as it does for `serve`: `DATABASE_URL` is then the SQLite file of
//! the working directory (which the PostgreSQL-only commands refuse in one line saying so, not with
//! a URL parse error) and Redis is not used (`check` skips what is not configured). A bad
//! `REDIS_URL` stops every command that uses Redis at once, in one line naming it, before anything
//! is done; the commands that do not use Redis never read it.

use std::path::Path;

use crate::helpers::ops::{dumps_in, files_in, path_str};
use crate::helpers::{Bin, Output, Replica, TestDatabase};

/// The subcommands covered here, as `--help` lists them: a new one must be added to both tests.
const SUBCOMMANDS: [&str; 7] = ["serve", "migrate", "backup", "verify-backup", "restore", "maintain", "check"];

/// The binary in `dir` with `env`, at its default log level (no `RUST_LOG`), so that any line it
/// logs by default counts against the one error line.
fn bin(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Bin {
    Bin::new(args).env_remove("RUST_LOG").current_dir(dir).envs(env)
}

/// A failure before any work: exit code not 0, nothing on stdout, one line on stderr naming
/// `variable`; returns that line.
fn assert_fails_fast(output: &Output, what: &str, variable: &str) -> String {
    output.assert_failure(what);
    assert!(output.stdout.is_empty(), "{what}: nothing done, yet stdout:\n{}", output.stdout);
    let lines: Vec<&str> = output.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line on stderr, got:\n{}", output.stderr);
    assert!(lines[0].contains(variable), "{what}: `{}` does not name {variable}", lines[0]);
    assert!(!output.stderr.contains("panicked"), "{what}: {}", output.stderr);
    lines[0].to_owned()
}

fn component<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let components = report["components"].as_array().expect("components");
    components.iter().find(|c| c["component"] == name).unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

#[tokio::test]
async fn help_lists_exactly_the_subcommands_covered_here() {
    let output = Bin::new(&["--help"]).output().await;
    output.assert_success("--help");
    let listed: Vec<&str> = output
        .stdout
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert_eq!(listed, SUBCOMMANDS, "{}", output.stdout);
}

#[tokio::test]
async fn empty_urls_mean_unset_for_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = tempfile::tempdir().expect("tempdir");
    let backups_arg = path_str(backups.path());
    let empty = [("DATABASE_URL", ""), ("REDIS_URL", "")];

    // The SQLite default, in the working directory.
    bin(dir.path(), &["migrate"], &empty).output().await.assert_success("migrate with DATABASE_URL empty");
    assert!(dir.path().join("endpoint-stats.db").is_file(), "the default database: {:?}", files_in(dir.path()));

    let mut replica = Replica::start_bin(bin(dir.path(), &["serve"], &empty).env("RUST_LOG", "warn")).await;
    replica.signal("TERM");
    assert_eq!(replica.wait().await, Some(0), "serve with empty URLs stops cleanly");

    let output = bin(dir.path(), &["maintain", "--json"], &empty).output().await;
    output.assert_success("maintain with empty URLs");
    let report = output.json();
    assert_eq!(report["database"]["backend"], "sqlite", "{report:#}");
    assert_eq!(report["redis"]["status"], "skipped", "{report:#}");

    // `check` checks what is configured: an empty URL configures nothing.
    let output = bin(dir.path(), &["check", "--json"], &empty).output().await;
    output.assert_success("check with empty URLs");
    let report = output.json();
    assert_eq!(component(&report, "postgres")["status"], "skipped", "{report:#}");
    assert_eq!(component(&report, "redis")["status"], "skipped", "{report:#}");

    for args in [
        &["backup", "--dir", backups_arg][..],
        &["verify-backup", "--dir", backups_arg],
        &["restore", "--latest", "--dir", backups_arg, "--yes"],
    ] {
        let output = bin(dir.path(), args, &empty).output().await;
        let line = assert_fails_fast(&output, &format!("{args:?} with DATABASE_URL empty"), "DATABASE_URL");
        assert!(line.contains("PostgreSQL") && line.contains("empty"), "{args:?}: says why: {line}");
    }
    assert_eq!(files_in(backups.path()), Vec::<String>::new(), "nothing written");
}

#[tokio::test]
async fn a_bad_redis_url_stops_every_command_that_uses_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = tempfile::tempdir().expect("tempdir");
    let backups_arg = path_str(backups.path());
    let db = TestDatabase::create().await;
    let env = [("DATABASE_URL", db.url.as_str()), ("REDIS_URL", "not-a-url")];

    for args in [&["serve"][..], &["maintain", "--json"], &["check", "--json"]] {
        let output = bin(dir.path(), args, &env).output().await;
        assert_fails_fast(&output, &format!("{args:?} with REDIS_URL=not-a-url"), "REDIS_URL");
    }

    // The commands without Redis do their work.
    for args in [
        &["migrate"][..],
        &["backup", "--dir", backups_arg],
        &["verify-backup", "--dir", backups_arg],
        &["restore", "--latest", "--dir", backups_arg, "--yes"],
    ] {
        bin(dir.path(), args, &env).output().await.assert_success(&format!("{args:?} with REDIS_URL=not-a-url"));
    }
    assert_eq!(dumps_in(backups.path()).len(), 1, "{:?}", files_in(backups.path()));
}
