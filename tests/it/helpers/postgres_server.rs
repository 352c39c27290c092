//! A PostgreSQL server of the test's own, for tests that need what the shared server cannot give:
//! TLS only (database_tls), a primary with a streaming standby that is killed and promoted
//! (failover). Each one is a cluster in a temporary directory, on a free port of 127.0.0.1, with
//! no Unix socket; it is stopped (or, after [`PostgresServer::kill`], its last processes killed)
//! and its directory removed on drop, also when the test fails.
//!
//! Needs the PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup): a missing one fails the
//! test, naming it. PostgreSQL refuses to run as root: as root, every server program runs as the
//! user `postgres` of the Debian package (scripts/test.sh installs it) through `setpriv`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct PostgresServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `setpriv … --` when running as root.
    run_as: Vec<String>,
    pub port: u16,
    started: bool,
    /// The processes of a server whose postmaster [`Self::kill`] killed: ended on drop if they
    /// are still there.
    orphans: Vec<u32>,
}

impl PostgresServer {
    /// An empty directory for a new cluster, owned by the user that will run it; nothing runs yet.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_as = if is_root(dir.path()) {
            let known = Command::new("id").arg("postgres").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
            assert!(
                known,
                "running as root needs the user postgres to run a test cluster (apt-get install postgresql)"
            );
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"].map(String::from).to_vec()
        } else {
            Vec::new()
        };
        Self { dir, bin: postgres_bin_dir(), run_as, port: free_port(), started: false, orphans: Vec::new() }
    }

    /// The cluster's directory: its files (certificates, …) go here; the data directory is `data`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir().join("postgres.log")
    }

    /// The end of the server's log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Hands the directory, and whatever the test put in it, to the user that runs the server.
    fn own_dir(&self) {
        if !self.run_as.is_empty() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(self.dir()), "chown the test cluster");
        }
    }

    /// `initdb` of `data` as superuser `postgres` (UTF8, C locale, no fsync) with `args` (the
    /// authentication method, a password file).
    pub fn initdb(&self, args: &[&str]) {
        self.own_dir();
        run(
            self.tool("initdb")
                .arg("-D")
                .arg(self.data())
                .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
                .args(args),
            "initdb",
        );
    }

    /// A copy of the primary at 127.0.0.1:`port` (its own, or a proxy's in front of it) taken
    /// with `pg_basebackup -R`: a standby streaming from there once started.
    pub fn base_backup_from(port: u16) -> Self {
        let standby = Self::new();
        standby.own_dir();
        run(
            standby.tool("pg_basebackup").arg("-D").arg(standby.data()).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ]),
            "pg_basebackup",
        );
        standby
    }

    /// Appends to postgresql.conf: TCP on 127.0.0.1 at [`Self::port`], no Unix socket, then
    /// `settings` (later lines win); replaces pg_hba.conf by `hba` when given.
    pub fn configure(&self, settings: &str, hba: Option<&str>) {
        let data = self.data();
        let config = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n{settings}\n",
            self.port
        );
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("conf");
        std::io::Write::write_all(&mut conf, config.as_bytes()).expect("append to postgresql.conf");
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");
        }
    }

    /// `pg_ctl start`, waiting (at most 30 s) until it accepts connections.
    pub fn start(&mut self) {
        let status = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-w", "-t", "30", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl");
        // Whatever happened, drop tries to stop it.
        self.started = true;
        assert!(status.success(), "the test cluster did not start; its log:\n{}", self.log_tail(40));
    }

    /// `pg_ctl promote`, waiting (at most 30 s) until the standby is a primary.
    pub fn promote(&self) {
        run(self.tool("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-t", "30", "promote"]), "pg_ctl promote");
    }

    /// SIGKILL to the postmaster, as when the primary dies. Its children (backends, WAL sender,
    /// …) are left to notice by themselves, as PostgreSQL's own are; drop ends any still there.
    pub fn kill(&mut self) {
        let postmaster = self.postmaster_pid().expect("the postmaster's pid (postmaster.pid)");
        self.orphans = children_of(postmaster);
        let status = Command::new("kill").args(["-KILL", &postmaster.to_string()]).status().expect("kill");
        assert!(status.success(), "kill -KILL {postmaster} failed");
        self.started = false;
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (for a cluster with trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn tool(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = match self.run_as.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        command.stdin(Stdio::null());
        command
    }

    fn stop(&self, mode: &str) -> bool {
        self.tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "20", "-m", mode, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.started && !self.stop("fast") {
            self.stop("immediate");
        }
        // A killed postmaster's children end on their own within moments; the directory goes
        // only when the last one has.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.orphans.iter().any(|pid| is_postgres_process(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.orphans.iter().filter(|pid| is_postgres_process(**pid)) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        // the TempDir removes the directory after this
    }
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // pid (comm) state ppid …; comm may hold spaces and parentheses
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

fn is_postgres_process(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
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

/// Runs `command` to success; panics naming `what` (a missing program included) with its output.
pub fn run(command: &mut Command, what: &str) {
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

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn is_root(owned: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(owned).is_ok_and(|m| m.uid() == 0)
}
