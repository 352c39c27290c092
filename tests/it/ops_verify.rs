//! `verify-backup`: a real restore into a scratch database; every fault named, scratch dropped.

use crate::helpers::ops::*;
use crate::helpers::{self, run_bin, Output, TestDatabase};

/// A seeded database and a backup of it in a temp dir.
async fn backed_up() -> (TestDatabase, tempfile::TempDir) {
    let db = TestDatabase::create().await;
    count_accesses(&db, 4, 3, 1).await;
    insert_synthetic_rows(&db.url, 20_000).await;
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&db.url, dir.path()).await.assert_success("backup");
    (db, dir)
}

async fn verify(db: &TestDatabase, dir: &std::path::Path) -> Output {
    run_bin(&["verify-backup", "--dir", path_str(dir)], &[("DATABASE_URL", &db.url)]).await
}

/// The scratch database named in the output exists no more.
async fn assert_scratch_dropped(output: &Output) {
    let scratch = scratch_name(output).unwrap_or_else(|| panic!("no scratch database named: {output:?}"));
    assert!(!database_exists(&scratch).await, "scratch database {scratch} left behind");
}

#[tokio::test]
async fn a_good_backup_verifies_and_the_scratch_database_is_dropped() {
    let (db, dir) = backed_up().await;
    let output = verify(&db, dir.path()).await;
    output.assert_success("verify-backup");
    assert!(output.stdout.starts_with("verify-backup: ok: "), "{}", output.stdout);
    assert!(output.stdout.contains("rows and migrations"), "{}", output.stdout);
    assert_scratch_dropped(&output).await;
}

/// The scratch server may be another one (here the same, through --scratch-url, with a
/// DATABASE_URL that could not serve).
#[tokio::test]
async fn scratch_url_chooses_the_server() {
    let (_db, dir) = backed_up().await;
    let output = run_bin(
        &["verify-backup", "--dir", path_str(dir.path()), "--scratch-url", &helpers::postgres_admin_url()],
        &[],
    )
    .await;
    output.assert_success("verify-backup --scratch-url");
    assert_scratch_dropped(&output).await;
}

#[tokio::test]
async fn a_dump_cut_in_half_is_caught_by_the_restore() {
    let (db, dir) = backed_up().await;
    let dump = single_dump(dir.path());
    let bytes = std::fs::read(&dump).expect("read");
    std::fs::write(&dump, &bytes[..bytes.len() / 2]).expect("truncate");
    // As if pg_dump itself had written a short file: checksum and manifest describe the bad file.
    recompute_checksum_and_manifest(&dump);

    let output = verify(&db, dir.path()).await;
    output.assert_failure("verify-backup of a truncated dump");
    let error = output.error_line();
    assert!(error.contains("FAILED") && error.contains("pg_restore failed"), "{}", output.stderr);
    assert_scratch_dropped(&output).await;
}

#[tokio::test]
async fn a_wrong_checksum_is_named() {
    let (db, dir) = backed_up().await;
    let dump = single_dump(dir.path());
    let checksum = dump.with_file_name(format!("{}.sha256", dump.file_name().and_then(|n| n.to_str()).expect("name")));
    let text = std::fs::read_to_string(&checksum).expect("read");
    let flipped = match text.strip_prefix('0') {
        Some(rest) => format!("1{rest}"),
        None => format!("0{}", text.get(1..).unwrap_or_default()),
    };
    std::fs::write(&checksum, flipped).expect("write");

    let output = verify(&db, dir.path()).await;
    output.assert_failure("verify-backup with a wrong checksum");
    assert!(output.error_line().contains("checksum mismatch"), "{}", output.stderr);
}

#[tokio::test]
async fn a_corrupted_byte_is_caught_by_the_checksum() {
    let (db, dir) = backed_up().await;
    let dump = single_dump(dir.path());
    let mut bytes = std::fs::read(&dump).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&dump, bytes).expect("write");

    let output = verify(&db, dir.path()).await;
    output.assert_failure("verify-backup of a corrupted dump");
    assert!(output.error_line().contains("checksum mismatch"), "{}", output.stderr);
}

#[tokio::test]
async fn a_missing_manifest_is_named() {
    let (db, dir) = backed_up().await;
    let dump = single_dump(dir.path());
    std::fs::remove_file(
        dump.with_file_name(format!("{}.manifest.json", dump.file_name().and_then(|n| n.to_str()).expect("name"))),
    )
    .expect("remove manifest");

    let output = verify(&db, dir.path()).await;
    output.assert_failure("verify-backup without a manifest");
    assert!(output.error_line().contains("missing manifest"), "{}", output.stderr);
}

#[tokio::test]
async fn a_row_count_that_differs_from_the_manifest_is_named() {
    let (db, dir) = backed_up().await;
    let dump = single_dump(dir.path());
    let manifest_path =
        dump.with_file_name(format!("{}.manifest.json", dump.file_name().and_then(|n| n.to_str()).expect("name")));
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("read")).expect("JSON");
    let rows = manifest["tables"]["public.endpoint_access"]["rows"].as_i64().expect("rows");
    manifest["tables"]["public.endpoint_access"]["rows"] = serde_json::Value::from(rows + 1);
    std::fs::write(&manifest_path, manifest.to_string()).expect("write");

    let output = verify(&db, dir.path()).await;
    output.assert_failure("verify-backup with a wrong row count");
    let error = output.error_line();
    assert!(error.contains("row count mismatch in public.endpoint_access"), "{}", output.stderr);
    assert!(error.contains(&format!("manifest {}, restored {rows}", rows + 1)), "{error}");
    assert_scratch_dropped(&output).await;
}

#[tokio::test]
async fn the_newest_dump_is_the_one_verified_and_an_empty_directory_fails() {
    let (db, dir) = backed_up().await;
    // A newer dump with nothing beside it: verify must look at it, and fail.
    let newer = fake_dump(dir.path(), chrono::Utc::now() + chrono::Duration::hours(1), false);
    let output = verify(&db, dir.path()).await;
    output.assert_failure("verify-backup of an incomplete newest dump");
    assert!(output.error_line().contains(&newer), "{}", output.stderr);

    let empty = tempfile::tempdir().expect("tempdir");
    let output = verify(&db, empty.path()).await;
    output.assert_failure("verify-backup of an empty directory");
    assert!(output.error_line().contains("no backup in"), "{}", output.stderr);
}
