//! `restore`: refused without --yes (nothing touched), checksum first, all or nothing, verified.

use crate::helpers::ops::*;
use crate::helpers::{run_bin, settings, TestApp, TestDatabase};

#[tokio::test]
async fn restore_without_yes_refuses_names_the_command_and_touches_nothing() {
    let db = TestDatabase::create().await;
    let app = TestApp::spawn(settings(db.settings(), None)).await;
    seed_via_api(&app, 3, 1, 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&db.url, dir.path()).await.assert_success("backup");
    // Counting goes on after the backup: a restore would roll these back.
    seed_via_api(&app, 4, 0, 0).await;
    app.shutdown().await;
    let before = db.stored_counts().await;
    assert_eq!(before.get("/"), Some(&7));
    let dump = single_dump(dir.path());

    let dir_arg = path_str(dir.path());
    let dump_arg = path_str(&dump);
    for (args, expected) in [
        (
            vec!["restore", "--latest", "--dir", dir_arg],
            format!("endpoint-stats restore --latest --dir {dir_arg} --yes"),
        ),
        (vec!["restore", "--from", dump_arg], format!("endpoint-stats restore --from {dump_arg} --yes")),
    ] {
        let output = run_bin(&args, &[("DATABASE_URL", &db.url)]).await;
        output.assert_failure("restore without --yes");
        let error = output.error_line();
        assert!(error.contains("refusing to restore") && error.contains("without --yes"), "{}", output.stderr);
        assert!(error.contains(&expected), "the command to run is given: {error}");
        assert_eq!(output.stderr.lines().count(), 1, "{}", output.stderr);
        assert_eq!(db.stored_counts().await, before, "counts unchanged");
    }
    assert_eq!(files_in(dir.path()).len(), 3, "the backup directory is untouched too");
}

#[tokio::test]
async fn restore_with_yes_replaces_newer_data_with_the_dump() {
    let db = TestDatabase::create().await;
    count_accesses(&db, 3, 2, 0).await;
    let at_backup = db.stored_counts().await;
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&db.url, dir.path()).await.assert_success("backup");

    // After the backup: more accesses and a new endpoint row.
    count_accesses(&db, 5, 0, 2).await;
    assert_ne!(db.stored_counts().await, at_backup);

    let dump = single_dump(dir.path());
    let output = run_bin(&["restore", "--from", path_str(&dump), "--yes"], &[("DATABASE_URL", &db.url)]).await;
    output.assert_success("restore --from --yes");
    assert_eq!(db.stored_counts().await, at_backup, "the database holds exactly the dump again");
    assert!(output.stdout.contains("match the manifest"), "{}", output.stdout);
}

#[tokio::test]
async fn a_damaged_dump_is_not_restored() {
    let db = TestDatabase::create().await;
    count_accesses(&db, 2, 0, 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&db.url, dir.path()).await.assert_success("backup");
    count_accesses(&db, 1, 0, 0).await;
    let before = db.stored_counts().await;

    // Checksum mismatch: refused before anything is touched.
    let dump = single_dump(dir.path());
    let original = std::fs::read(&dump).expect("read");
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x55;
    std::fs::write(&dump, &damaged).expect("write");
    let output =
        run_bin(&["restore", "--latest", "--dir", path_str(dir.path()), "--yes"], &[("DATABASE_URL", &db.url)]).await;
    output.assert_failure("restore of a corrupted dump");
    assert!(output.error_line().contains("checksum mismatch"), "{}", output.stderr);
    assert_eq!(db.stored_counts().await, before);

    // A truncated dump with a matching checksum: pg_restore fails inside its single transaction,
    // so the database is as it was (not half-cleaned).
    std::fs::write(&dump, &original[..original.len() * 2 / 3]).expect("truncate");
    recompute_checksum_and_manifest(&dump);
    let output =
        run_bin(&["restore", "--latest", "--dir", path_str(dir.path()), "--yes"], &[("DATABASE_URL", &db.url)]).await;
    output.assert_failure("restore of a truncated dump");
    assert!(output.error_line().contains("the database is unchanged"), "{}", output.stderr);
    assert_eq!(db.stored_counts().await, before, "single transaction: nothing half-restored");
}

#[tokio::test]
async fn restore_latest_skips_a_newer_incomplete_dump() {
    let db = TestDatabase::create().await;
    count_accesses(&db, 3, 1, 0).await;
    let at_backup = db.stored_counts().await;
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&db.url, dir.path()).await.assert_success("backup");
    // A newer dump without its checksum and manifest, as a backup that died half-way leaves it.
    let incomplete = fake_dump(dir.path(), chrono::Utc::now() + chrono::Duration::hours(1), false);
    count_accesses(&db, 2, 0, 0).await;

    let output =
        run_bin(&["restore", "--latest", "--dir", path_str(dir.path()), "--yes"], &[("DATABASE_URL", &db.url)]).await;
    output.assert_success("restore --latest with a newer incomplete dump");
    assert!(output.stdout.contains(&format!("skipping newer {incomplete}")), "{}", output.stdout);
    assert_eq!(db.stored_counts().await, at_backup, "the good dump was restored");
}

/// The columns of `table` in `db` (empty when there is no such table) and its row count.
async fn table_shape(db: &TestDatabase, table: &str) -> (Vec<String>, i64) {
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let columns: Vec<(String,)> = sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 \
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&pool)
    .await
    .expect("columns");
    let rows = if columns.is_empty() {
        0
    } else {
        let (rows,): (i64,) =
            sqlx::query_as(&format!("SELECT count(*) FROM \"{table}\"")).fetch_one(&pool).await.expect("count");
        rows
    };
    pool.close().await;
    (columns.into_iter().map(|(c,)| c).collect(), rows)
}

#[tokio::test]
async fn restore_into_a_database_of_another_name_needs_its_own_flag() {
    let (source, _dir, dump) = database_with_dump(3, 1, 0).await;
    let at_backup = source.stored_counts().await;

    // Another database of this service, with counts of its own.
    let other = TestDatabase::create().await;
    count_accesses(&other, 1, 0, 2).await;
    let before = other.stored_counts().await;

    let output = run_bin(&["restore", "--from", path_str(&dump), "--yes"], &[("DATABASE_URL", &other.url)]).await;
    output.assert_failure("restore into a database of another name");
    let error = output.error_line();
    assert!(error.contains("refusing to restore") && error.contains("nothing was changed"), "{}", output.stderr);
    assert!(error.contains("check `database name`"), "names the check: {error}");
    assert!(error.contains(&source.name) && error.contains(&other.name), "names both databases: {error}");
    assert!(error.contains("--into-other-database"), "gives the flag: {error}");
    assert_eq!(other.stored_counts().await, before, "nothing changed");

    let output = run_bin(
        &["restore", "--from", path_str(&dump), "--yes", "--into-other-database"],
        &[("DATABASE_URL", &other.url)],
    )
    .await;
    output.assert_success("restore --into-other-database");
    assert_eq!(other.stored_counts().await, at_backup, "the other database holds the dump");
}

#[tokio::test]
async fn restore_refuses_a_target_whose_endpoint_access_is_another_applications() {
    let (_source, _dir, dump) = database_with_dump(2, 0, 0).await;

    // Another application's database, with a table of the same name and other columns.
    let foreign = TestDatabase::create().await;
    let pool = sqlx::PgPool::connect(&foreign.url).await.expect("connect");
    for sql in [
        "CREATE TABLE endpoint_access (id bigserial PRIMARY KEY, path text NOT NULL, hits integer NOT NULL)",
        "INSERT INTO endpoint_access (path, hits) VALUES ('/login', 41), ('/logout', 7)",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    pool.close().await;
    let before = table_shape(&foreign, "endpoint_access").await;
    assert_eq!(before.1, 2);

    // Both checks refuse, each naming itself: the name first, then, with the flag, the table.
    for (flags, check) in
        [(&[][..], "check `database name`"), (&["--into-other-database"][..], "check `table columns`")]
    {
        let mut args = vec!["restore", "--from", path_str(&dump), "--yes"];
        args.extend_from_slice(flags);
        let output = run_bin(&args, &[("DATABASE_URL", &foreign.url)]).await;
        output.assert_failure("restore over another application's table");
        let error = output.error_line();
        assert!(error.contains(check), "{flags:?} refused by {check}: {}", output.stderr);
        assert!(error.contains("nothing was changed"), "{error}");
        assert_eq!(table_shape(&foreign, "endpoint_access").await, before, "{flags:?}: the table is untouched");
        assert_eq!(table_shape(&foreign, "_sqlx_migrations").await, (Vec::new(), 0), "{flags:?}: nothing added");
        if !flags.is_empty() {
            assert!(error.contains("public.endpoint_access") && error.contains("path text not null"), "{error}");
        }
    }
}
