//! A TCP proxy that stands in for the network between the service and its database (issue 14):
//! it adds a one-way delay in each direction, can be pointed at a new upstream while running (as
//! a Kubernetes Service is when a new primary is elected) and can cut every connection at once.
//!
//! Usage: delay-proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:5432 --delay-us 500
//!
//! - `--delay-us` is the ONE-WAY delay added in each direction: the round trip grows by twice it.
//! - The first line on stdout is `listening HOST:PORT` (the port actually bound).
//! - Control commands are read from stdin, one a line, each answered by one line on stdout that
//!   starts with `ok` or `error`:
//!   - `upstream HOST:PORT`: new connections go there from now on; open ones keep theirs;
//!   - `cut`: closes every open connection, both sides, at once (`ok cut N`);
//!   - `delay US`: the one-way delay for every chunk read from now on;
//!   - `stats`: `ok stats chunks N late_us_mean M late_us_max X`, how late after its deadline each
//!     chunk was written since the last `stats` (the proxy's own error), and resets them.
//!
//!   The same figures since the start go to stderr when the proxy ends on SIGTERM or SIGINT.
//!
//!   EOF on stdin ends the control, not the proxy: it runs until SIGTERM or SIGINT.
//!
//! Delay semantics: a pipe with latency, not a slow link. Every chunk read from one side is
//! written to the other once the delay has passed, counted from the moment it was read; chunks
//! keep their order and are not queued behind each other's delays. A new connection is connected
//! upstream after one round trip, as a TCP handshake across the network would take. An EOF is
//! passed on (half-close) after the delay like data; a reset or error closes both sides.
//!
//! Why threads and clock_nanosleep, not tokio: tokio's timer wheel has a resolution of 1 ms and
//! rounds deadlines up, so a 250 µs delay would become 1-2 ms. Here every connection has one
//! reader and one writer thread per direction, on blocking sockets. The reader stamps each chunk
//! with an absolute CLOCK_MONOTONIC deadline (read time + delay) and hands it to the writer through
//! a bounded channel; the writer sleeps with clock_nanosleep(TIMER_ABSTIME) until that deadline,
//! with its timer slack set to 1 ns (PR_SET_TIMERSLACK; the default 50 µs would be added to every
//! wake-up). An absolute deadline is immune to the time spent between computing and sleeping, and
//! a signal's EINTR simply sleeps again to the same deadline. No spinning: on a 2-core machine that
//! shares its cores with the database and the load, a busy wait would steal the CPU it measures.
//! What remains is the scheduler's wake-up latency, tens of microseconds on an idle core; the
//! proxy's own cost at 0 µs is measured in docs/operations/tuning.md.
//! The thread count (4 per connection) is fine for a test stand-in: a service pool holds tens.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use clap::Parser;
use rustix::thread::{clock_nanosleep_absolute, set_current_timer_slack, ClockId};
use rustix::time::{clock_gettime, Timespec};

#[derive(Parser, Debug)]
#[command(name = "delay-proxy", about = "A delaying, repointable TCP proxy (the network in the test kit)")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed as `listening HOST:PORT`).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where new connections go (HOST:PORT); `upstream HOST:PORT` on stdin changes it.
    #[arg(long)]
    upstream: String,
    /// One-way delay added in each direction, in microseconds (round trip += 2 x this).
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
}

/// Chunks buffered per direction before the reader stops reading (back-pressure).
const QUEUE_CHUNKS: usize = 256;
const CHUNK_BYTES: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Sleeps until `deadline_ns` on CLOCK_MONOTONIC (absolute, so EINTR just sleeps again).
fn sleep_until(deadline_ns: u64) {
    let at = Timespec { tv_sec: (deadline_ns / 1_000_000_000) as _, tv_nsec: (deadline_ns % 1_000_000_000) as _ };
    while now_ns() < deadline_ns {
        if clock_nanosleep_absolute(ClockId::Monotonic, &at).is_ok() {
            break;
        }
    }
}

fn low_timer_slack() {
    // Best effort: without it the delays are still right, only up to 50 µs later.
    let _ = set_current_timer_slack(NonZeroU64::new(1));
}

/// The sockets of one proxied connection, for `cut`.
#[derive(Default)]
struct Sockets(Vec<TcpStream>);

impl Sockets {
    fn close(&self) {
        for s in &self.0 {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub struct Proxy {
    local_addr: SocketAddr,
    upstream: Mutex<String>,
    delay_ns: AtomicU64,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Sockets>>,
    lateness: Lateness,
    lateness_total: Lateness,
}

/// How late after their deadlines chunks were written.
#[derive(Default)]
struct Lateness {
    chunks: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Lateness {
    fn record(&self, late_ns: u64) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(late_ns, Ordering::Relaxed);
        self.max_ns.fetch_max(late_ns, Ordering::Relaxed);
    }

    /// "chunks N late_us_mean M late_us_max X", and resets the figures.
    fn take(&self) -> String {
        let chunks = self.chunks.swap(0, Ordering::Relaxed);
        let sum = self.sum_ns.swap(0, Ordering::Relaxed);
        let max = self.max_ns.swap(0, Ordering::Relaxed);
        format!(
            "chunks {chunks} late_us_mean {:.1} late_us_max {:.1}",
            sum as f64 / chunks.max(1) as f64 / 1e3,
            max as f64 / 1e3
        )
    }
}

/// Deregisters a connection once all of its threads are done.
struct ConnGuard {
    proxy: Arc<Proxy>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.proxy.open.lock().unwrap().remove(&self.id);
    }
}

enum Chunk {
    Data(u64, Vec<u8>),
    Eof(u64),
}

impl Proxy {
    /// Binds `listen` and accepts connections on a thread of its own.
    pub fn start(listen: &str, upstream: &str, delay_us: u64) -> std::io::Result<Arc<Proxy>> {
        resolve(upstream)?;
        let listener = TcpListener::bind(listen)?;
        let proxy = Arc::new(Proxy {
            local_addr: listener.local_addr()?,
            upstream: Mutex::new(upstream.to_string()),
            delay_ns: AtomicU64::new(delay_us.saturating_mul(1000)),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            lateness: Lateness::default(),
            lateness_total: Lateness::default(),
        });
        let p = proxy.clone();
        thread::Builder::new().name("accept".into()).spawn(move || {
            for client in listener.incoming() {
                match client {
                    Ok(client) => {
                        let p = p.clone();
                        let _ = thread::Builder::new().name("conn".into()).spawn(move || p.serve(client));
                    }
                    // e.g. EMFILE: back off instead of spinning
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        })?;
        Ok(proxy)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs one control command and returns its one-line answer.
    pub fn command(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("upstream"), Some(addr), None) => match resolve(addr) {
                Ok(_) => {
                    *self.upstream.lock().unwrap() = addr.to_string();
                    format!("ok upstream {addr}")
                }
                Err(e) => format!("error upstream {addr}: {e}"),
            },
            (Some("cut"), None, None) => {
                let cut: Vec<Sockets> = self.open.lock().unwrap().drain().map(|(_, s)| s).collect();
                for sockets in &cut {
                    sockets.close();
                }
                format!("ok cut {}", cut.len())
            }
            (Some("delay"), Some(us), None) => match us.parse::<u64>() {
                Ok(us) => {
                    self.delay_ns.store(us.saturating_mul(1000), Ordering::Relaxed);
                    format!("ok delay {us}")
                }
                Err(e) => format!("error delay {us}: {e}"),
            },
            (Some("stats"), None, None) => format!("ok stats {}", self.lateness.take()),
            (None, _, _) => "error empty command".to_string(),
            _ => format!("error unknown command: {} (upstream HOST:PORT | cut | delay US | stats)", line.trim()),
        }
    }

    fn serve(self: Arc<Self>, client: TcpStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(client_for_cut) = client.try_clone() else { return };
        self.open.lock().unwrap().insert(id, Sockets(vec![client_for_cut]));
        let guard = Arc::new(ConnGuard { proxy: self.clone(), id });
        low_timer_slack();
        // The handshake across the network: one round trip before the upstream sees the connection.
        sleep_until(now_ns() + 2 * self.delay_ns.load(Ordering::Relaxed));
        let target = self.upstream.lock().unwrap().clone();
        let upstream = match resolve(&target).and_then(|a| TcpStream::connect_timeout(&a, CONNECT_TIMEOUT)) {
            Ok(s) => s,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        };
        {
            let mut open = self.open.lock().unwrap();
            match (open.get_mut(&id), upstream.try_clone()) {
                (Some(sockets), Ok(clone)) => sockets.0.push(clone),
                // cut while connecting, or out of descriptors
                _ => {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = upstream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        };
        let up = self.clone().direction(client, u2, guard.clone());
        let down = self.clone().direction(upstream, c2, guard);
        let _ = (up, down);
    }

    /// Starts the reader and the writer of one direction, `from` -> `to`.
    fn direction(self: Arc<Self>, from: TcpStream, to: TcpStream, guard: Arc<ConnGuard>) -> std::io::Result<()> {
        let (tx, rx) = sync_channel::<Chunk>(QUEUE_CHUNKS);
        let (from_w, to_r) = (from.try_clone()?, to.try_clone()?);
        let (g, p) = (guard.clone(), self.clone());
        thread::Builder::new().name("write".into()).spawn(move || {
            low_timer_slack();
            p.write_loop(rx, to, from_w);
            drop(g);
        })?;
        thread::Builder::new().name("read".into()).spawn(move || {
            self.read_loop(from, to_r, tx);
            drop(guard);
        })?;
        Ok(())
    }

    fn read_loop(&self, mut from: TcpStream, to: TcpStream, tx: SyncSender<Chunk>) {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            match from.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(Chunk::Eof(now_ns() + self.delay_ns.load(Ordering::Relaxed)));
                    return;
                }
                Ok(n) => {
                    let deadline = now_ns() + self.delay_ns.load(Ordering::Relaxed);
                    if tx.send(Chunk::Data(deadline, buf[..n].to_vec())).is_err() {
                        return; // the writer is gone: it closed both sides already
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // a reset: pass it on at once, both sides
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// Writes each chunk at its deadline, in order. A later chunk never goes before an earlier
    /// one, even if the delay was lowered in between (byte order first).
    fn write_loop(&self, rx: Receiver<Chunk>, mut to: TcpStream, from: TcpStream) {
        while let Ok(chunk) = rx.recv() {
            match chunk {
                Chunk::Data(deadline, bytes) => {
                    sleep_until(deadline);
                    let late = now_ns().saturating_sub(deadline);
                    self.lateness.record(late);
                    self.lateness_total.record(late);
                    if to.write_all(&bytes).is_err() {
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                        return;
                    }
                }
                Chunk::Eof(deadline) => {
                    sleep_until(deadline);
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    }
}

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} resolves to nothing")))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let proxy = Proxy::start(&args.listen, &args.upstream, args.delay_us)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {}", proxy.local_addr())?;
        out.flush()?;
    }
    let control = proxy.clone();
    thread::Builder::new().name("control".into()).spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            let answer = control.command(&line);
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{answer}").and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        // EOF: no more commands; the proxy keeps running.
    })?;
    // Signals only: the data path is on threads (see the module comment).
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    eprintln!("delay-proxy: since the start, {}", proxy.lateness_total.take());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An echo server that prefixes every answer with `tag`; returns its address.
    fn echo_server(tag: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                thread::spawn(move || {
                    let _ = conn.set_nodelay(true);
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        let mut answer = tag.to_vec();
                        answer.extend_from_slice(&buf[..n]);
                        if conn.write_all(&answer).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn connect(proxy: &Proxy) -> TcpStream {
        let s = TcpStream::connect(proxy.local_addr()).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends one byte and reads the tagged echo; returns the tag and the round trip.
    fn round_trip(s: &mut TcpStream) -> (u8, Duration) {
        let start = Instant::now();
        s.write_all(b"x").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf[1], b'x');
        (buf[0], start.elapsed())
    }

    #[test]
    fn adds_the_delay_in_each_direction() {
        let proxy = Proxy::start("127.0.0.1:0", &echo_server(b"A").to_string(), 2000).unwrap();
        let mut s = connect(&proxy);
        let times: Vec<Duration> = (0..10).map(|_| round_trip(&mut s).1).collect();
        let min = *times.iter().min().unwrap();
        // 2 ms each way: never less than 4 ms; the margin above is generous for a loaded machine.
        assert!(min >= Duration::from_millis(4), "round trips {times:?}");
        assert!(min < Duration::from_millis(4 + 50), "round trips {times:?}");

        assert_eq!(proxy.command("delay 5000"), "ok delay 5000");
        let (_, slower) = round_trip(&mut s);
        assert!(slower >= Duration::from_millis(10), "round trip at 5 ms one-way: {slower:?}");

        // Chunks in flight are not queued behind each other's delays: ten writes 1 ms apart
        // come back about 10 ms after the first, not 10 x 10 ms.
        assert_eq!(proxy.command("delay 2000"), "ok delay 2000");
        let start = Instant::now();
        for _ in 0..10 {
            s.write_all(b"x").unwrap();
            thread::sleep(Duration::from_millis(1));
        }
        let mut buf = [0u8; 20];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"AxAxAxAxAxAxAxAxAxAx");
        assert!(start.elapsed() < Duration::from_millis(10 * 4), "ten pipelined chunks took {:?}", start.elapsed());
    }

    #[test]
    fn repoints_new_connections_and_cuts_open_ones() {
        let (a, b) = (echo_server(b"A"), echo_server(b"B"));
        let proxy = Proxy::start("127.0.0.1:0", &a.to_string(), 0).unwrap();
        let mut first = connect(&proxy);
        assert_eq!(round_trip(&mut first).0, b'A');

        assert_eq!(proxy.command(&format!("upstream {b}")), format!("ok upstream {b}"));
        let mut second = connect(&proxy);
        assert_eq!(round_trip(&mut second).0, b'B');
        // an open connection keeps its upstream, as through a Service
        assert_eq!(round_trip(&mut first).0, b'A');

        assert_eq!(proxy.command("cut"), "ok cut 2");
        for s in [&mut first, &mut second] {
            let mut buf = [0u8; 1];
            // closed: EOF or a reset, not a timeout
            match s.read(&mut buf) {
                Ok(0) => {}
                Ok(_) => panic!("data after cut"),
                Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "no close after cut: {e}"),
            }
        }
        // the proxy still serves new connections after a cut
        let mut third = connect(&proxy);
        assert_eq!(round_trip(&mut third).0, b'B');

        assert!(proxy.command("upstream nowhere").starts_with("error"));
        assert!(proxy.command("delay soon").starts_with("error"));
        assert!(proxy.command("jump").starts_with("error"));
        assert!(proxy.command("stats").starts_with("ok stats chunks "));
    }
}
