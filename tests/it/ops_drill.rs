//! Disaster-recovery drill, end to end: counts through the API, backup, verify-backup, restore
//! into an empty new database, the service on the restored database answers the same counts.

use std::collections::BTreeMap;

use crate::helpers::ops::*;
use crate::helpers::{run_bin, settings, TestApp, TestDatabase};

/// `stats` map of a `/stats` answer.
fn stats_map(body: &serde_json::Value) -> BTreeMap<String, i64> {
    body["stats"]
        .as_object()
        .expect("stats object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().expect("count")))
        .collect()
}

/// endpoint → (access_count, first_accessed, last_accessed) from `/api/v1/endpoints`.
fn endpoint_rows(body: &serde_json::Value) -> BTreeMap<String, (i64, String, String)> {
    let list = body.as_array().or_else(|| body["endpoints"].as_array()).expect("endpoint list");
    list.iter()
        .map(|e| {
            (
                e["endpoint"].as_str().expect("endpoint").to_owned(),
                (
                    e["access_count"].as_i64().expect("access_count"),
                    e["first_accessed"].as_str().expect("first_accessed").to_owned(),
                    e["last_accessed"].as_str().expect("last_accessed").to_owned(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn backup_verify_restore_into_an_empty_database_gives_identical_counts() {
    // Production: counts through the API.
    let production = TestDatabase::create().await;
    let app = TestApp::spawn(settings(production.settings(), None)).await;
    seed_via_api(&app, 17, 5, 3).await;
    let (status, endpoints_before) = app.get_json("/api/v1/endpoints").await;
    assert_eq!(status, 200);
    let (status, stats_before) = app.get_json("/stats").await;
    assert_eq!(status, 200);
    app.shutdown().await;
    let stats_before = stats_map(&stats_before);
    assert_eq!(stats_before.get("/"), Some(&17));
    assert_eq!(stats_before.get("/stats"), Some(&6));
    assert_eq!(stats_before.get("/api/v1/endpoints"), Some(&4));
    let stored_before = production.stored_counts().await;

    // Backup and verification.
    let dir = tempfile::tempdir().expect("tempdir");
    backup(&production.url, dir.path()).await.assert_success("backup");
    run_bin(&["verify-backup", "--dir", path_str(dir.path())], &[("DATABASE_URL", &production.url)])
        .await
        .assert_success("verify-backup");

    // Disaster: production is gone. Restore into a new, empty database.
    drop(production);
    let replacement = TestDatabase::create().await;
    let restore = run_bin(
        &["restore", "--latest", "--dir", path_str(dir.path()), "--yes", "--into-other-database"],
        &[("DATABASE_URL", &replacement.url)],
    )
    .await;
    restore.assert_success("restore --latest --yes");
    assert!(restore.stdout.starts_with("restore: ") && restore.stdout.contains(" s "), "{}", restore.stdout);
    assert_eq!(replacement.stored_counts().await, stored_before, "stored rows identical");

    // The service on the restored database: same counts, same first access times.
    let app = TestApp::spawn(settings(replacement.settings(), None)).await;
    let (status, stats_after) = app.get_json("/stats").await;
    assert_eq!(status, 200);
    let mut expected = stats_before.clone();
    *expected.get_mut("/stats").expect("/stats") += 1; // this very access
    assert_eq!(stats_map(&stats_after), expected);
    let (status, endpoints_after) = app.get_json("/api/v1/endpoints").await;
    assert_eq!(status, 200);
    let (before, after) = (endpoint_rows(&endpoints_before), endpoint_rows(&endpoints_after));
    for (endpoint, (_, first, _)) in &before {
        assert_eq!(&after[endpoint].1, first, "first_accessed of {endpoint} survives the restore");
    }
    assert_eq!(after["/"].0, 17);
    // Counting goes on from the restored values.
    let (_, root) = app.get_json("/").await;
    assert_eq!(root["access_count"], 18);
    app.shutdown().await;
}
