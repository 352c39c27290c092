//! `backup`: files, consistency, retention and clean failures (real PostgreSQL, the real binary).

use std::time::Duration;

use crate::helpers::ops::*;
use crate::helpers::{self, free_port, heavy, run_bin, settings, Bin, TestApp, TestDatabase};
use chrono::Utc;

#[tokio::test]
async fn backup_writes_a_checksummed_dump_with_a_manifest_of_the_database() {
    let db = TestDatabase::create().await;
    count_accesses(&db, 5, 2, 0).await;
    let dir = tempfile::tempdir().expect("tempdir");

    let output = backup(&db.url, dir.path()).await;
    output.assert_success("backup");

    let dump = single_dump(dir.path());
    let name = dump.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
    assert_eq!(
        files_in(dir.path()),
        vec![name.clone(), format!("{name}.manifest.json"), format!("{name}.sha256")],
        "exactly the dump and its companions, no temp file"
    );
    // The name carries the UTC time of the backup.
    let stamp = name.trim_start_matches("endpoint-stats-").trim_end_matches(".dump");
    let time = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").expect("time in name").and_utc();
    assert!((Utc::now() - time).num_seconds().abs() < 120, "{name}");
    // The one-line summary names the file, its size, the time and the rows.
    let summary = output.stdout.trim();
    assert!(summary.starts_with("backup: ") && summary.contains(&name) && summary.contains(" bytes in "), "{summary}");
    assert!(summary.contains("public.endpoint_access=2"), "{summary}");

    // sha256sum can check it.
    let status = std::process::Command::new("sha256sum")
        .args(["-c", "--quiet", &format!("{name}.sha256")])
        .current_dir(dir.path())
        .status()
        .expect("sha256sum");
    assert!(status.success(), "sha256sum -c rejects the checksum file");

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("{name}.manifest.json"))).expect("read"))
            .expect("manifest JSON");
    assert_eq!(manifest["file"], name.as_str());
    assert_eq!(manifest["database"], db.name.as_str());
    assert_eq!(manifest["tool"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(manifest["server_version"].as_str().is_some_and(|v| !v.is_empty()));
    assert_eq!(manifest["tables"]["public.endpoint_access"]["rows"], 2);
    assert_eq!(
        manifest["tables"]["public._sqlx_migrations"]["rows"],
        manifest["migrations"].as_array().map(Vec::len).unwrap_or(0)
    );
    assert_eq!(manifest["bytes"], std::fs::metadata(&dump).expect("stat").len());
}

/// The row counts of the manifest are those of the dump even while rows are being added: both
/// come from one exported snapshot. verify-backup would report a mismatch otherwise.
#[tokio::test]
async fn manifest_matches_the_dump_while_rows_are_inserted() {
    let _heavy = heavy().await;
    let db = TestDatabase::create().await;
    TestApp::spawn(settings(db.settings(), None)).await.shutdown().await;
    insert_synthetic_rows(&db.url, 200_000).await;
    let dir = tempfile::tempdir().expect("tempdir");

    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                sqlx::query("INSERT INTO endpoint_access VALUES ($1, 1, now(), now())")
                    .bind(format!("/concurrent/{i}"))
                    .execute(&pool)
                    .await
                    .expect("concurrent insert");
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let output = backup(&db.url, dir.path()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let inserted = writer.await.expect("writer");
    output.assert_success("backup under inserts");
    assert!(inserted > 10, "the writer ran during the backup ({inserted} inserts)");

    let verify = run_bin(&["verify-backup", "--dir", path_str(dir.path())], &[("DATABASE_URL", &db.url)]).await;
    verify.assert_success("verify-backup of a dump taken under inserts");
    let (now,): (i64,) = sqlx::query_as("SELECT count(*) FROM endpoint_access").fetch_one(&pool).await.expect("count");
    pool.close().await;
    let manifest = std::fs::read_to_string(dir.path().join(format!("{}.manifest.json", dumps_in(dir.path())[0])))
        .expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("JSON");
    let rows = manifest["tables"]["public.endpoint_access"]["rows"].as_i64().expect("rows");
    assert!(rows >= 200_000 && rows < now, "snapshot count {rows} between the seed and the final {now}");
}

#[tokio::test]
async fn retention_prunes_dumps_older_than_the_retention_and_keeps_recent_ones() {
    let db = TestDatabase::create().await;
    TestApp::spawn(settings(db.settings(), None)).await.shutdown().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Utc::now();
    let days = chrono::Duration::days;
    let old_good = fake_dump(dir.path(), now - days(30), true);
    let just_past = fake_dump(dir.path(), now - days(11), true);
    let old_incomplete = fake_dump(dir.path(), now - days(12), false);
    let recent = fake_dump(dir.path(), now - days(3), true);
    let recent_incomplete = fake_dump(dir.path(), now - days(2), false);
    // Leftovers: companions whose dump is gone, an unfinished file of a crashed run, a foreign file.
    let orphan = format!("{}.sha256", endpoint_stats::ops::dump_file_name(now - days(40)));
    std::fs::write(dir.path().join(&orphan), b"x").expect("write");
    let crashed = format!(".{}.partial", endpoint_stats::ops::dump_file_name(now - days(2)));
    std::fs::write(dir.path().join(&crashed), b"x").expect("write");
    std::fs::write(dir.path().join("README"), b"operator notes").expect("write");

    let output =
        run_bin(&["backup", "--dir", path_str(dir.path()), "--retention-days", "10"], &[("DATABASE_URL", &db.url)])
            .await;
    output.assert_success("backup");
    assert!(output.stdout.contains("3 old dumps"), "{}", output.stdout);

    let dumps = dumps_in(dir.path());
    assert_eq!(dumps.len(), 3, "{dumps:?}");
    assert!(dumps.contains(&recent) && dumps.contains(&recent_incomplete), "{dumps:?}");
    for gone in [&old_good, &just_past, &old_incomplete] {
        assert!(!dumps.contains(gone), "{gone} should be pruned: {dumps:?}");
        assert!(!dir.path().join(format!("{gone}.sha256")).exists(), "{gone}.sha256 should be pruned");
        assert!(!dir.path().join(format!("{gone}.manifest.json")).exists(), "{gone} manifest should be pruned");
    }
    let files = files_in(dir.path());
    assert!(!files.contains(&orphan) && !files.contains(&crashed), "{files:?}");
    assert!(files.contains(&"README".to_owned()), "foreign files are left alone: {files:?}");
    assert!(files.contains(&format!("{recent}.manifest.json")), "{files:?}");
}

#[tokio::test]
async fn retention_never_prunes_the_newest_good_dump_even_when_it_is_too_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Utc::now();
    let days = chrono::Duration::days;
    let oldest = fake_dump(dir.path(), now - days(30), true);
    let newest_good = fake_dump(dir.path(), now - days(20), true);
    // Newer but incomplete (no checksum, no manifest): not restorable, so not a reason to keep less.
    let newer_incomplete = fake_dump(dir.path(), now - days(15), false);

    let output =
        run_bin(&["backup", "--prune-only", "--dir", path_str(dir.path()), "--retention-days", "10"], &[]).await;
    output.assert_success("backup --prune-only");

    assert_eq!(dumps_in(dir.path()), vec![newest_good.clone()], "only the newest good dump survives");
    assert_eq!(
        files_in(dir.path()),
        vec![newest_good.clone(), format!("{newest_good}.manifest.json"), format!("{newest_good}.sha256")]
    );
    assert!(output.stdout.contains(&oldest) && output.stdout.contains(&newer_incomplete), "{}", output.stdout);

    // Applying it again keeps it again.
    run_bin(&["backup", "--prune-only", "--dir", path_str(dir.path()), "--retention-days", "1"], &[])
        .await
        .assert_success("second prune");
    assert_eq!(dumps_in(dir.path()), vec![newest_good]);
}

#[tokio::test]
async fn missing_pg_dump_is_named_and_leaves_no_file() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let empty_bin = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("backups");

    let output = run_bin(
        &["backup", "--dir", path_str(&target)],
        &[("DATABASE_URL", &db.url), ("PATH", path_str(empty_bin.path()))],
    )
    .await;
    output.assert_failure("backup without pg_dump");
    let error = output.error_line();
    assert!(error.contains("pg_dump not found in PATH"), "{}", output.stderr);
    assert_eq!(output.stderr.lines().count(), 1, "one clear line: {}", output.stderr);
    assert!(backup_like(&target).is_empty(), "{:?}", files_in(&target));
}

#[tokio::test]
async fn unreachable_or_missing_database_fails_clearly_and_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed_port = format!("postgres://postgres@127.0.0.1:{}/endpoint_stats", free_port());
    let missing_db = format!("postgres://postgres@127.0.0.1:5432/{}", helpers::unique_name("missing"));

    for (url, expected) in [(&closed_port, "Connection refused"), (&missing_db, "does not exist")] {
        let output = backup(url, dir.path()).await;
        output.assert_failure("backup of an unreachable database");
        let error = output.error_line();
        assert!(error.contains("DATABASE_URL") && error.contains(expected), "{}", output.stderr);
        assert!(backup_like(dir.path()).is_empty(), "{:?}", files_in(dir.path()));
    }
}

#[tokio::test]
async fn sqlite_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = run_bin(&["backup", "--dir", path_str(dir.path())], &[]).await;
    output.assert_failure("backup of SQLite");
    assert!(output.error_line().contains("PostgreSQL only"), "{}", output.stderr);
    assert!(files_in(dir.path()).is_empty());
}

/// pg_dump failing half-way (here: a stand-in that writes part of a file, then reports a full
/// disk) leaves neither a dump nor a temp file.
#[tokio::test]
async fn failing_pg_dump_leaves_no_partial_file() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = tempfile::tempdir().expect("tempdir");
    let script = bin.path().join("pg_dump");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 15'; exit 0; fi\n\
         for a in \"$@\"; do if [ \"$prev\" = --file ]; then printf 'PGDMP partial' > \"$a\"; fi; prev=$a; done\n\
         echo 'pg_dump: error: could not write to output file: No space left on device' >&2\n\
         exit 1\n",
    )
    .expect("write script");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    let output = run_bin(
        &["backup", "--dir", path_str(dir.path()), "--pg-bin-dir", path_str(bin.path())],
        &[("DATABASE_URL", &db.url)],
    )
    .await;
    output.assert_failure("backup with a failing pg_dump");
    let error = output.error_line();
    assert!(
        error.contains("pg_dump failed (exit 1)") && error.contains("No space left on device"),
        "{}",
        output.stderr
    );
    assert!(files_in(dir.path()).is_empty(), "{:?}", files_in(dir.path()));
}

/// A real full disk: a 256 KiB tmpfs (needs root; skipped with a note otherwise).
#[tokio::test]
async fn full_disk_fails_clearly_and_leaves_no_partial_file() {
    let mount_point = tempfile::tempdir().expect("tempdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", path_str(mount_point.path())])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount_point.path().to_owned());

    let db = TestDatabase::create().await;
    TestApp::spawn(settings(db.settings(), None)).await.shutdown().await;
    insert_synthetic_rows(&db.url, 100_000).await;
    let output = backup(&db.url, mount_point.path()).await;
    output.assert_failure("backup onto a full disk");
    assert!(output.error_line().contains("No space left on device"), "{}", output.stderr);
    assert!(files_in(mount_point.path()).is_empty(), "{:?}", files_in(mount_point.path()));
}

/// A dump holds the whole database: dump, checksum and manifest are 0600 and the folders 0700,
/// even under `umask 000`, for a folder the backup creates and for a wide-open one it finds.
#[tokio::test]
async fn backups_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDatabase::create().await;
    count_accesses(&db, 1, 0, 0).await;
    let base = tempfile::tempdir().expect("tempdir");
    let created = base.path().join("new").join("backups");
    let existing = base.path().join("existing");
    std::fs::create_dir(&existing).expect("mkdir");
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let mode = |path: &std::path::Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777;

    for dir in [&created, &existing] {
        let output = Bin::new(&["backup", "--dir"]).arg(dir).env("DATABASE_URL", &db.url).umask("000").output().await;
        assert!(output.code == 0, "backup failed: {}", output.stderr);
        let dump = single_dump(dir);
        let name = dump.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        for file in [name.clone(), format!("{name}.sha256"), format!("{name}.manifest.json")] {
            assert_eq!(mode(&dir.join(&file)), 0o600, "{file} in {}", dir.display());
        }
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    assert_eq!(mode(&base.path().join("new")), 0o700, "a parent the backup created");
}
