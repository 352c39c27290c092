//! TLS to PostgreSQL, as docs/deployment.md ("TLS to the database") prescribes: each test starts
//! a throwaway cluster of its own on a free port of 127.0.0.1 that accepts only TLS (`hostssl`
//! lines only, scram-sha-256) with a server certificate for 127.0.0.1/localhost signed by a test
//! CA, and shows what the service and `backup` (pg_dump through libpq) do with `sslmode` and
//! `sslrootcert`. Needs the PostgreSQL server binaries (initdb, pg_ctl) and openssl: a missing one
//! fails the test, naming it. The cluster is stopped and its directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::helpers::ops::backup;
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
    let missing = server.dir.path().join("not-mounted/ca.crt");
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

/// A PostgreSQL cluster in a temporary directory that accepts only TLS connections on
/// 127.0.0.1:`port`, as `postgres` with `password`. `ca` signed its certificate (for 127.0.0.1
/// and localhost); `wrong_ca` is another CA.
struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `setpriv … --` when running as root (PostgreSQL refuses to run as root).
    run_as: Vec<String>,
    port: u16,
    password: String,
    ca: PathBuf,
    wrong_ca: PathBuf,
    started: bool,
}

impl TlsPostgres {
    fn start() -> Self {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let run_as = if is_root(&path) {
            // the postgres user of the Debian package (scripts/test.sh installs it)
            let known = Command::new("id").arg("postgres").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
            assert!(
                known,
                "running as root needs the user postgres to run the test cluster (apt-get install postgresql)"
            );
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"].map(String::from).to_vec()
        } else {
            Vec::new()
        };
        let mut server = Self {
            ca: path.join("ca.crt"),
            wrong_ca: path.join("wrong-ca.crt"),
            dir,
            bin,
            run_as,
            port: free_port(),
            password: format!("tls-test-{:016x}", rand::random::<u64>()),
            started: false,
        };
        server.make_certificates();
        server.init_and_start();
        server
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres?QUERY`
    fn url(&self, query: &str) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/postgres?{query}", self.password, self.port)
    }

    fn make_certificates(&self) {
        let dir = self.dir.path();
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
        let dir = self.dir.path().to_path_buf();
        let data = dir.join("data");
        std::fs::write(dir.join("pwfile"), format!("{}\n", self.password)).expect("write pwfile");
        set_mode(&dir.join("pwfile"), 0o600);
        if !self.run_as.is_empty() {
            run(
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir),
                "chown the test cluster's directory",
            );
        }
        let pwfile = format!("--pwfile={}", dir.join("pwfile").display());
        run(
            self.pg_command("initdb").arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                &pwfile,
            ]),
            "initdb",
        );
        let _ = std::fs::remove_file(dir.join("pwfile"));
        // Only TCP on 127.0.0.1 (no Unix socket), and only with TLS.
        let config = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\nssl = on\n\
             ssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\nmax_connections = 30\n",
            self.port,
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("conf");
        std::io::Write::write_all(&mut conf, config.as_bytes()).expect("append to postgresql.conf");
        std::fs::write(data.join("pg_hba.conf"), "hostssl all all 127.0.0.1/32 scram-sha-256\n").expect("pg_hba.conf");

        let log = dir.join("postgres.log");
        let status = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl");
        // Whatever happened, drop tries to stop it.
        self.started = true;
        assert!(
            status.success(),
            "the test cluster did not start; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn pg_command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        match self.run_as.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        }
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        if self.started {
            let data = self.dir.path().join("data");
            let stopped = self
                .pg_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-w", "-t", "20", "-m", "fast", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !stopped {
                let _ = self
                    .pg_command("pg_ctl")
                    .arg("-D")
                    .arg(&data)
                    .args(["-w", "-t", "20", "-m", "immediate", "stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // the TempDir removes the directory after this
    }
}

/// The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl (Debian keeps them off PATH),
/// else the directory of initdb on PATH.
fn postgres_bin_dir() -> PathBuf {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_tools(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).find(|dir| has_tools(dir)).unwrap_or_else(|| {
        panic!(
            "initdb and pg_ctl not found in /usr/lib/postgresql/*/bin nor on PATH: this test runs a PostgreSQL \
             server of its own; install it (Debian: apt-get install postgresql, as scripts/test.sh does)"
        )
    })
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut command = Command::new("openssl");
    command.args(args).current_dir(dir);
    run(&mut command, "openssl");
}

/// Runs `command` to success; panics naming `what` (a missing program included) with its output.
fn run(command: &mut Command, what: &str) {
    let output = match command.stdin(Stdio::null()).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what}: {:?} not found ({error}); this test needs it installed", command.get_program())
        }
        Err(error) => panic!("{what}: cannot run {:?}: {error}", command.get_program()),
    };
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn is_root(owned: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(owned).is_ok_and(|m| m.uid() == 0)
}
