//! TLS to PostgreSQL, as docs/deployment.md ("TLS to the database") prescribes: each test starts
//! a throwaway cluster of its own on a free port of 127.0.0.1 that accepts only TLS (`hostssl`
//! lines only, scram-sha-256) with a server certificate for 127.0.0.1/localhost signed by a test
//! CA, and shows what the service and `backup` (pg_dump through libpq) do with `sslmode` and
//! `sslrootcert`. Needs the PostgreSQL server binaries (initdb, pg_ctl) and openssl: a missing one
//! fails the test, naming it. The cluster is stopped and its directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::ops::backup;
use crate::helpers::postgres_server::{run, set_mode, PostgresServer};
use crate::helpers::{access_count, free_port, run_bin, settings, Output, TestApp};
use endpoint_stats::config::{DatabaseSettings, DatabaseUrl};

#[tokio::test]
async fn the_service_and_backup_work_through_verify_full_with_the_ca_file() {
    let server = TlsPostgres::start();
    let url = server.url(&format!("sslmode=verify-full&sslrootcert={}", server.ca.display()));

    let app =
        TestApp::spawn(settings(DatabaseSettings { url: DatabaseUrl::parse(&url).expect("URL"), pool_size: 4 }, None))
            .await;
    for expected in 1..=3 {
        assert_eq!(access_count(app.get("/").await).await, expected);
    }

    // Seen from the server: every connection of the service is encrypted, and the count is stored.
    let pool = sqlx::PgPool::connect(&url).await.expect("the test's own verify-full connection");
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'endpoint-stats'",
    )
    .fetch_one(&pool)
    .await
    .expect("pg_stat_ssl");
    assert!(encrypted >= 1 && plain == 0, "service connections: {encrypted} with TLS, {plain} without");
    let (stored,): (i64,) = sqlx::query_as("SELECT access_count FROM endpoint_access WHERE endpoint = '/'")
        .fetch_one(&pool)
        .await
        .expect("stored count");
    assert_eq!(stored, 3);
    pool.close().await;
    app.shutdown().await;

    // The ops commands hand sslmode and sslrootcert on to pg_dump (libpq): with verify-full and
    // no root certificate of its own (~/.postgresql/root.crt), libpq would refuse to connect.
    let dir = tempfile::tempdir().expect("tempdir");
    let output = backup(&url, dir.path()).await;
    output.assert_success("backup through verify-full");
    assert!(output.stdout.contains("public.endpoint_access=1"), "{}", output.stdout);
    assert_no_password(&output, &server.password);
}

#[tokio::test]
async fn a_wrong_ca_a_missing_ca_file_and_no_tls_fail_the_start_with_one_line() {
    let server = TlsPostgres::start();

    // A certificate the given CA did not sign.
    let wrong_ca = server.url(&format!("sslmode=verify-full&sslrootcert={}", server.wrong_ca.display()));
    let line = failed_start(&server, &wrong_ca).await;
    assert!(line.ends_with("invalid peer certificate: UnknownIssuer"), "{line}");

    // The Secret is not mounted: the parameter and the path are named.
    let missing = server.dir().join("not-mounted/ca.crt");
    let missing_ca = server.url(&format!("sslmode=verify-full&sslrootcert={}", missing.display()));
    let line = failed_start(&server, &missing_ca).await;
    assert!(line.contains(&format!("sslrootcert={}: cannot read the file", missing.display())), "{line}");

    // No TLS at all: the server has no pg_hba.conf line for an unencrypted connection.
    let line = failed_start(&server, &server.url("sslmode=disable")).await;
    assert!(line.contains("no pg_hba.conf entry") && line.contains("no encryption"), "{line}");

    // `require` encrypts without checking the certificate (what docs/deployment.md warns about):
    // against a server whose CA the client was not given, it connects.
    let output = run_bin(&["migrate"], &[("DATABASE_URL", &server.url("sslmode=require"))]).await;
    output.assert_success("migrate with sslmode=require");
}

/// `serve` with `database_url` must exit non-zero at start with exactly one line on stderr, naming
/// DATABASE_URL, showing the URL without its password; returns that line.
async fn failed_start(server: &TlsPostgres, database_url: &str) -> String {
    let port = free_port().to_string();
    let output = run_bin(&["serve"], &[("DATABASE_URL", database_url), ("PORT", &port), ("BIND", "127.0.0.1")]).await;
    output.assert_failure("serve");
    assert_no_password(&output, &server.password);
    let lines: Vec<&str> = output.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{}", output.stderr);
    let line = output.error_line();
    assert!(
        line.starts_with("endpoint-stats: error: DATABASE_URL: cannot use postgres://postgres:***@127.0.0.1:"),
        "{line}"
    );
    line
}

fn assert_no_password(output: &Output, password: &str) {
    assert!(
        !output.stdout.contains(password) && !output.stderr.contains(password),
        "the password leaked:\nstdout: {}\nstderr: {}",
        output.stdout,
        output.stderr
    );
}

/// A PostgreSQL cluster of the test's own ([`PostgresServer`]) that accepts only TLS connections
/// on 127.0.0.1:`port`, as `postgres` with `password`. `ca` signed its certificate (for 127.0.0.1
/// and localhost); `wrong_ca` is another CA.
struct TlsPostgres {
    server: PostgresServer,
    password: String,
    ca: PathBuf,
    wrong_ca: PathBuf,
}

impl TlsPostgres {
    fn start() -> Self {
        let server = PostgresServer::new();
        let path = server.dir().to_path_buf();
        let mut tls = Self {
            ca: path.join("ca.crt"),
            wrong_ca: path.join("wrong-ca.crt"),
            server,
            password: format!("tls-test-{:016x}", rand::random::<u64>()),
        };
        tls.make_certificates();
        tls.init_and_start();
        tls
    }

    fn dir(&self) -> &Path {
        self.server.dir()
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres?QUERY`
    fn url(&self, query: &str) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/postgres?{query}", self.password, self.server.port)
    }

    fn make_certificates(&self) {
        let dir = self.dir();
        let ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"];
        for (name, subject) in [("ca", "/CN=endpoint-stats test CA"), ("wrong-ca", "/CN=endpoint-stats other CA")] {
            let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
            let mut args = vec!["req", "-x509", "-subj", subject, "-keyout", &key, "-out", &crt];
            args.extend(ec_key);
            args.extend([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(dir, &args);
        }
        let mut args = vec!["req", "-new", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"];
        args.extend(&ec_key[..5]);
        openssl(dir, &args);
        std::fs::write(
            dir.join("server.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("write server.ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        set_mode(&dir.join("server.key"), 0o600);
    }

    fn init_and_start(&mut self) {
        let dir = self.dir().to_path_buf();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.password)).expect("write pwfile");
        set_mode(&pwfile, 0o600);
        self.server.initdb(&["--auth=scram-sha-256", &format!("--pwfile={}", pwfile.display())]);
        let _ = std::fs::remove_file(&pwfile);
        // Only with TLS.
        let settings = format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\nmax_connections = 30",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        self.server.configure(&settings, Some("hostssl all all 127.0.0.1/32 scram-sha-256\n"));
        self.server.start();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut command = Command::new("openssl");
    command.args(args).current_dir(dir);
    run(&mut command, "openssl");
}
