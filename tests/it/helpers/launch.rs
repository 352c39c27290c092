//! The one way the tests start the real binary: [`Bin`] describes a run (arguments, a clean
//! environment, where its output goes, a wrapper such as an open-file limit or a umask);
//! [`Bin::output`] runs a command to completion, and [`Replica`] keeps a server running on a free
//! port of 127.0.0.1 until it is signalled or dropped.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{client, free_port};

/// How long a one-shot command may take before the test fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);
/// How long a replica may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// One run of `endpoint-stats`, in a clean environment: `PATH`, text logs at warn level (both
/// replaced by [`Bin::env`], removed by [`Bin::env_remove`]) and what the test adds; stdin empty;
/// the process killed when the test drops it.
pub struct Bin {
    wrapper: Vec<OsString>,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    current_dir: Option<PathBuf>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
}

impl Bin {
    pub fn new(args: &[&str]) -> Self {
        let mut env = BTreeMap::new();
        env.insert("PATH".into(), std::env::var_os("PATH").unwrap_or_default());
        env.insert("LOG_FORMAT".into(), "text".into());
        env.insert("RUST_LOG".into(), "warn".into());
        Self {
            wrapper: Vec::new(),
            args: args.iter().map(OsString::from).collect(),
            env,
            current_dir: None,
            stdout: None,
            stderr: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.env.insert(key.into(), value.as_ref().to_owned());
        self
    }

    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.remove(OsStr::new(key));
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.current_dir = Some(dir.to_owned());
        self
    }

    pub fn stdout(mut self, stdout: impl Into<Stdio>) -> Self {
        self.stdout = Some(stdout.into());
        self
    }

    pub fn stderr(mut self, stderr: impl Into<Stdio>) -> Self {
        self.stderr = Some(stderr.into());
        self
    }

    /// stderr (the log) into a new file at `path`.
    pub fn log_to(self, path: &Path) -> Self {
        self.stderr(std::fs::File::create(path).expect("log file"))
    }

    /// Runs under `prlimit --nofile=N:N`.
    pub fn open_file_limit(mut self, limit: u64) -> Self {
        self.wrapper =
            ["prlimit".to_owned(), format!("--nofile={limit}:{limit}"), "--".to_owned()].map(Into::into).into();
        self
    }

    /// Runs under `umask MASK` (through `sh`).
    pub fn umask(mut self, mask: &str) -> Self {
        self.wrapper =
            ["sh".to_owned(), "-c".to_owned(), format!("umask {mask} && exec \"$0\" \"$@\"")].map(Into::into).into();
        self
    }

    fn command(self) -> tokio::process::Command {
        let binary = OsStr::new(env!("CARGO_BIN_EXE_endpoint-stats"));
        let mut program = self
            .wrapper
            .iter()
            .map(OsString::as_os_str)
            .chain([binary])
            .chain(self.args.iter().map(OsString::as_os_str));
        let mut command = tokio::process::Command::new(program.next().expect("a program"));
        command.args(program).env_clear().envs(&self.env).stdin(Stdio::null()).kill_on_drop(true);
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        if let Some(stdout) = self.stdout {
            command.stdout(stdout);
        }
        if let Some(stderr) = self.stderr {
            command.stderr(stderr);
        }
        command
    }

    /// Runs the command to completion (at most 300 s); stdout and stderr are captured unless
    /// directed elsewhere.
    pub async fn output(self) -> Output {
        let what = format!("endpoint-stats {:?}", self.args);
        let output = tokio::time::timeout(COMMAND_LIMIT, self.command().output())
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish within {COMMAND_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("run {what}: {e}"));
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs `endpoint-stats ARGS` to completion with [`Bin`]'s clean environment and `env`.
pub async fn run_bin(args: &[&str], env: &[(&str, &str)]) -> Output {
    Bin::new(args).envs(env).output().await
}

/// What a run of the binary produced.
#[derive(Debug)]
pub struct Output {
    /// The exit code; -1 when a signal ended the process.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn assert_success(&self, what: &str) {
        assert_eq!(self.code, 0, "{what} failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
    }

    pub fn assert_failure(&self, what: &str) {
        assert_ne!(self.code, 0, "{what} should have failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
    }

    /// The one-line error that main prints for an Err.
    pub fn error_line(&self) -> String {
        self.stderr.lines().find(|l| l.starts_with("endpoint-stats: error: ")).unwrap_or_default().to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// The real binary serving on a free port of 127.0.0.1 (for SIGKILL and SIGTERM tests, several
/// replicas, process limits); killed on drop.
pub struct Replica {
    pub port: u16,
    pub address: String,
    child: Option<tokio::process::Child>,
}

impl Replica {
    /// `endpoint-stats` on `database_url` with `env`, once ready; its log goes to the test's stderr.
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> Self {
        Self::start_bin(Bin::new(&[]).env("DATABASE_URL", database_url).envs(env)).await
    }

    /// `bin` on a free port, once ready.
    pub async fn start_bin(bin: Bin) -> Self {
        let mut replica = Self::spawn(bin);
        replica.wait_ready(READY_LIMIT).await;
        replica
    }

    /// `bin` on a free port (`PORT`, `BIND`), not waited for; stdout discarded unless directed.
    pub fn spawn(mut bin: Bin) -> Self {
        let port = free_port();
        bin = bin.env("PORT", port.to_string()).env("BIND", "127.0.0.1");
        if bin.stdout.is_none() {
            bin.stdout = Some(Stdio::null());
        }
        let child = bin.command().spawn().expect("spawn endpoint-stats");
        Self { port, address: format!("http://127.0.0.1:{port}"), child: Some(child) }
    }

    pub async fn wait_ready(&mut self, limit: Duration) {
        assert!(self.ready_within(limit).await, "replica on port {} not ready after {limit:?}", self.port);
    }

    /// Whether `/ready` answers 200 within `limit`; false at once when the process has exited.
    pub async fn ready_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let client = client();
        while Instant::now() < deadline {
            if self.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                return false;
            }
            if let Ok(response) = client.get(format!("{}/ready", self.address)).send().await {
                if response.status().is_success() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).and_then(|id| i32::try_from(id).ok()).expect("running child")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        self.wait_at_most(Duration::from_secs(30)).await
    }

    /// The exit code, or `None` when the process is still running after `limit` (it is killed).
    pub async fn wait_at_most(&mut self, limit: Duration) -> Option<i32> {
        self.exit_within(limit).await?.code()
    }

    /// How the process ended, or `None` when it is still running after `limit` (it is killed).
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        tokio::time::timeout(limit, child.wait()).await.ok()?.ok()
    }
}
