//! The delaying, repointable TCP proxy of the bench kit (`delay-proxy`, bench/delay_proxy.rs),
//! standing in for the network and for a Kubernetes Service in front of the primary. Started from
//! the binary Cargo built for this package; killed when dropped.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long the proxy may take to start or to answer a command.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

pub struct DelayProxy {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    _child: Child,
}

impl DelayProxy {
    /// `delay-proxy` on a free port of 127.0.0.1, forwarding to `upstream` (`HOST:PORT`) with no delay.
    pub async fn start(upstream: &str) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delay-proxy"))
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream, "--delay-us", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn delay-proxy");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = tokio::time::timeout(ANSWER_LIMIT, stdout.next_line())
            .await
            .expect("delay-proxy did not say where it listens")
            .expect("read delay-proxy's stdout")
            .expect("delay-proxy exited before listening");
        let port = first
            .strip_prefix("listening ")
            .and_then(|address| address.trim().rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("delay-proxy's first line is not `listening HOST:PORT`: {first:?}"));
        Self { port, stdin, stdout, _child: child }
    }

    /// Sends one control command and returns its `ok …` answer.
    pub async fn command(&mut self, command: &str) -> String {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.expect("write to delay-proxy");
        self.stdin.flush().await.expect("flush delay-proxy's stdin");
        let answer = tokio::time::timeout(ANSWER_LIMIT, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("delay-proxy did not answer `{command}` within {ANSWER_LIMIT:?}"))
            .expect("read delay-proxy's stdout")
            .unwrap_or_else(|| panic!("delay-proxy exited on `{command}`"));
        assert!(answer.starts_with("ok"), "delay-proxy answered `{command}` with {answer:?}");
        answer
    }

    /// New connections go to `upstream` (`HOST:PORT`).
    pub async fn upstream(&mut self, upstream: &str) {
        self.command(&format!("upstream {upstream}")).await;
    }

    /// Closes every open connection at once.
    pub async fn cut(&mut self) {
        self.command("cut").await;
    }
}
