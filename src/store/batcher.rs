//! Group commit.
//!
//! Every counted request sends its access to one task per process. While a commit is in flight,
//! the next accesses accumulate; the next commit takes everything that waited. A batch is one
//! transaction: for each endpoint the stored count rises by the batch's accesses to it, and the
//! accesses get the consecutive values that end at the new count. So every value a client sees is
//! committed before it is sent, values are unique, and throughput grows with concurrency instead
//! of being bound by one commit per request.
//!
//! A 503 must mean "not counted". Each access carries the deadline of its request, and the time it
//! has left decides whether it may still join a commit; the database itself cancels a commit that
//! runs too long. See [`CommitLimits`].
//!
//! How many commits may be in flight at once is decided by [`Pacing`] from the commits it
//! measures: one while the database answers like a local one, more, spaced evenly, when each
//! commit spends most of its time waiting on a network round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{JoinError, JoinHandle};

use super::{
    CommitConnection, CommittedBatch, CountedEndpoint, Database, EndpointRecord, PerEndpoint, StoreError,
    COUNTED_ENDPOINTS,
};
use crate::telemetry::Metrics;
use crate::windows::Windows;

/// Upper bound of accesses in one commit; bounds the statement and the latency of one batch.
const MAX_BATCH: usize = 4096;
/// Accesses that may wait for a batch; beyond that a request is answered 503 at once (load
/// shedding) instead of queueing for longer than it could wait.
const QUEUE_CAPACITY: usize = 65_536;

/// A counted access, committed.
#[derive(Debug, Clone)]
pub struct Access {
    /// The endpoint's count including this access; unique for the endpoint.
    pub access_count: i64,
    /// Every stored row as of the commit, when it was asked for.
    pub snapshot: Option<Arc<Vec<EndpointRecord>>>,
}

struct PendingAccess {
    endpoint: CountedEndpoint,
    wants_snapshot: bool,
    /// When the request's timeout runs out.
    deadline: Instant,
    reply: oneshot::Sender<Result<Access, StoreError>>,
}

/// How a request's timeout `T` is shared out, so that every request is answered within `T` and a
/// 503 never goes to an access that ends up stored:
///
/// - The database cancels a commit statement still running after `statement_timeout` (0.3 T), for
///   example one waiting for a row lock. A cancelled statement rolls back, so the batch's 503 is
///   true, and a statement the batcher stopped waiting for cannot commit later behind its back.
/// - The batcher stops waiting for a commit after `commit_limit` (0.45 T). That only happens when
///   the connection is lost or hangs, the one case where the outcome is unknown (see
///   docs/operations/tuning.md); the connection is then closed.
/// - An access joins a commit only while it has at least `commit_limit` left; otherwise it is
///   answered 503 uncounted. An access waits for at most one commit (≤ 0.45 T) before its own
///   starts, so it normally still has 0.55 T when its turn comes.
#[derive(Debug, Clone, Copy)]
pub struct CommitLimits {
    pub statement_timeout: Duration,
    pub commit_limit: Duration,
}

impl CommitLimits {
    pub fn for_request_timeout(request_timeout: Duration) -> Self {
        Self { statement_timeout: request_timeout.mul_f64(0.3), commit_limit: request_timeout.mul_f64(0.45) }
    }
}

/// The handle request handlers use to count. Cheap to clone.
#[derive(Clone)]
pub struct AccessCounter {
    sender: mpsc::Sender<PendingAccess>,
    request_timeout: Duration,
}

/// The running batcher task, owned by the application, which ends it at shutdown.
///
/// Its end does not wait for every [`AccessCounter`] to be dropped: handles live on in whatever
/// still holds a router clone (a connection task, say), so shutdown could not rely on that.
pub struct Batcher {
    task: JoinHandle<()>,
    stop: Arc<Notify>,
}

impl Batcher {
    /// Stops taking accesses (later ones are answered "shutting down"), commits and answers those
    /// already queued, and returns when the task has ended.
    pub async fn finish(self) -> Result<(), JoinError> {
        self.stop.notify_one();
        self.task.await
    }
}

impl AccessCounter {
    /// Starts the batcher.
    pub fn start(database: Database, windows: Windows, metrics: Metrics, request_timeout: Duration) -> (Self, Batcher) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let limits = CommitLimits::for_request_timeout(request_timeout);
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(run(receiver, stop.clone(), database, windows, metrics, limits));
        (Self { sender, request_timeout }, Batcher { task, stop })
    }

    /// Counts one access and returns its committed count. The batcher answers every access it
    /// takes by the access's deadline (see [`CommitLimits`]), so no timer runs per request.
    pub async fn record(&self, endpoint: CountedEndpoint, wants_snapshot: bool) -> Result<Access, StoreError> {
        let (reply, answer) = oneshot::channel();
        let deadline = Instant::now() + self.request_timeout;
        let pending = PendingAccess { endpoint, wants_snapshot, deadline, reply };
        self.sender.try_send(pending).map_err(|error| match error {
            TrySendError::Full(_) => StoreError::Overloaded(QUEUE_CAPACITY),
            TrySendError::Closed(_) => StoreError::ShuttingDown,
        })?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?
    }
}

/// Most commits in flight at once, whatever the round trip. Each holds a database connection, and
/// beyond this the spacing between commits is shorter than the server's own part of a commit, so
/// another one would only queue for the row lock.
const MAX_COMMITS_IN_FLIGHT: usize = 4;

/// The share of a commit's fastest time that one commit in flight covers. A commit on a database
/// beside the service takes 0.15–0.4 ms here, and there a second commit in flight measured no
/// faster (docs/operations/tuning.md): the CPU was the limit, and every extra commit costs CPU.
/// A commit slower than this even at its fastest is waiting, on the network or on a disk flush,
/// and overlapping commits fill that wait.
const LOCAL_COMMIT: Duration = Duration::from_micros(500);

/// The fastest commit of the last two periods stands for the round trip plus the server's own
/// work: what no batching can shorten. Queueing only adds to a commit, so a minimum over a few
/// seconds sees through load, and it follows a database that moved (a failover to another zone).
const FLOOR_PERIOD: Duration = Duration::from_secs(2);

/// Decides how many commits may be in flight and how far apart they start, from the commits it
/// has measured; nothing for an operator to tune per cluster.
#[derive(Debug, Clone)]
struct Pacing {
    max_in_flight: usize,
    /// Fastest commit of the current and of the previous period.
    floor_current: Option<Duration>,
    floor_previous: Option<Duration>,
    period_started: Instant,
    /// Moving average of recent commits, the time a batch takes from leaving to its answer.
    typical: Option<Duration>,
}

impl Pacing {
    fn new(max_in_flight: usize, now: Instant) -> Self {
        Self {
            max_in_flight: max_in_flight.clamp(1, MAX_COMMITS_IN_FLIGHT),
            floor_current: None,
            floor_previous: None,
            period_started: now,
            typical: None,
        }
    }

    /// Takes in the duration of a commit that succeeded (a failure says nothing of the round trip).
    fn observe(&mut self, took: Duration, now: Instant) {
        if now.duration_since(self.period_started) >= FLOOR_PERIOD {
            self.floor_previous = self.floor_current.take();
            self.period_started = now;
        }
        self.floor_current = Some(self.floor_current.map_or(took, |floor| floor.min(took)));
        // An exponential average over about eight commits: recent enough to follow the load.
        self.typical = Some(self.typical.map_or(took, |typical| (typical * 7 + took) / 8));
    }

    fn floor(&self) -> Option<Duration> {
        match (self.floor_current, self.floor_previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Commits allowed in flight: one per [`LOCAL_COMMIT`] of the floor, so one for a local
    /// database and, say, three for a database 1 ms away.
    fn allowed_in_flight(&self) -> usize {
        let Some(floor) = self.floor() else { return 1 };
        let covered = floor.as_nanos().div_ceil(LOCAL_COMMIT.as_nanos());
        usize::try_from(covered).unwrap_or(usize::MAX).clamp(1, self.max_in_flight)
    }

    /// The time between two commit starts that spreads the allowed commits evenly over one commit's
    /// duration, so that each takes about the same share of the waiting accesses.
    fn spacing(&self) -> Duration {
        match self.typical {
            Some(typical) => typical / u32::try_from(self.allowed_in_flight()).unwrap_or(1),
            None => Duration::ZERO,
        }
    }

    /// Whether a batch may leave now, with `in_flight` commits out, the last of them sent at
    /// `last_start`.
    fn may_start(&self, in_flight: usize, last_start: Option<Instant>, now: Instant) -> bool {
        if in_flight == 0 {
            return true;
        }
        in_flight < self.allowed_in_flight() && last_start.is_none_or(|last| now.duration_since(last) >= self.spacing())
    }
}

/// What one commit hands back to the loop when it is over.
struct CommitDone {
    /// The connection, when the commit left it in a known state.
    connection: Option<CommitConnection>,
    /// How long a successful commit took.
    succeeded_in: Option<Duration>,
}

async fn run(
    mut receiver: mpsc::Receiver<PendingAccess>,
    stop: Arc<Notify>,
    database: Database,
    windows: Windows,
    metrics: Metrics,
    limits: CommitLimits,
) {
    let max_in_flight = match &database {
        // Connections beyond the batcher's serve readiness and reads.
        Database::Postgres(_) => usize::try_from(database.pool_usage().2).unwrap_or(1).saturating_sub(1),
        // SQLite has one writer: a second commit would only wait for the first's file lock.
        Database::Sqlite(_) => 1,
    };
    let context = Arc::new(CommitContext { database, windows, metrics, limits });
    let mut pacing = Pacing::new(max_in_flight, Instant::now());
    let mut idle: Vec<CommitConnection> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut last_start: Option<Instant> = None;
    let mut batch = Vec::with_capacity(64);
    let mut open = true;
    // With one commit allowed this is the plain group commit: the accesses that arrive while a
    // commit is in flight stay in the channel (nothing wakes this task for them) and form the
    // next batch as soon as it is answered. With more allowed, arrivals are taken as they come and
    // leave as a batch when [`Pacing::may_start`] says so.
    loop {
        let now = Instant::now();
        if !batch.is_empty() && pacing.may_start(in_flight.len(), last_start, now) {
            let connection = idle.pop();
            let taken = std::mem::replace(&mut batch, Vec::with_capacity(64));
            in_flight.push(commit(taken, connection, context.clone()));
            last_start = Some(now);
            continue;
        }
        if !open && batch.is_empty() && in_flight.is_empty() {
            break; // closed, drained and answered
        }
        let below_limit = in_flight.len() < pacing.allowed_in_flight();
        let may_take = open && batch.len() < MAX_BATCH && below_limit;
        let next_start = last_start.map(|last| last + pacing.spacing());
        let room = MAX_BATCH - batch.len();
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let CommitDone { connection, succeeded_in } = done;
                if let Some(took) = succeeded_in {
                    pacing.observe(took, Instant::now());
                    let allowed = i64::try_from(pacing.allowed_in_flight()).unwrap_or(i64::MAX);
                    context.metrics.db_commits_in_flight_limit.set(allowed);
                }
                // Connections beyond what the pacing now allows are closed, on a task of their
                // own: the batcher does not wait a round trip for it.
                match connection {
                    Some(connection) if idle.len() < pacing.allowed_in_flight() => idle.push(connection),
                    Some(connection) => drop(tokio::spawn(connection.close())),
                    None => {}
                }
            }
            received = receiver.recv_many(&mut batch, room), if may_take => {
                if received == 0 {
                    open = false; // closed and drained
                }
            }
            // Arrivals normally trigger the next start; this wakes a held batch when none come.
            // Tokio's timer rounds up to a millisecond: late, never early.
            () = sleep_until_or_never(next_start), if !batch.is_empty() && below_limit => {}
            // From here on sends fail at once, and what was queued before is still received.
            () = stop.notified(), if open => receiver.close(),
        }
    }
    for connection in idle {
        connection.close().await;
    }
    tracing::debug!("access batcher stopped: every access answered");
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

struct CommitContext {
    database: Database,
    windows: Windows,
    metrics: Metrics,
    limits: CommitLimits,
}

/// Commits one batch and answers every access in it.
async fn commit(
    mut batch: Vec<PendingAccess>,
    held: Option<CommitConnection>,
    context: Arc<CommitContext>,
) -> CommitDone {
    let CommitContext { database, metrics, limits, .. } = &*context;
    let CommitLimits { statement_timeout, commit_limit } = *limits;
    let expired = triage(&mut batch, Instant::now() + commit_limit, commit_limit);
    if expired > 0 {
        tracing::warn!(accesses = expired, "accesses waited too long for a commit; answered 503, not counted");
    }
    if batch.is_empty() {
        return CommitDone { connection: held, succeeded_in: None };
    }
    let (increments, wants_snapshot) = tally(&batch);

    let mut held = held;
    let started = Instant::now();
    let attempt = async {
        let connection = match &mut held {
            Some(connection) => connection,
            None => held.insert(database.commit_connection(statement_timeout).await?),
        };
        connection.commit_batch(&increments, wants_snapshot).await
    };
    let outcome = tokio::time::timeout(commit_limit, attempt).await;
    let took = started.elapsed();
    metrics.db_commit_duration.observe(took.as_secs_f64());

    let failure = match outcome {
        Ok(Ok(committed)) => {
            answer_batch(batch, committed, &increments, &context);
            return CommitDone { connection: held, succeeded_in: Some(took) };
        }
        Ok(Err(error)) => StoreError::from(error),
        Err(_) => StoreError::Timeout(commit_limit),
    };
    // A connection that failed or was abandoned mid-statement is in an unknown state.
    if let Some(connection) = held.take() {
        connection.discard();
    }
    fail_batch(batch, metrics, failure);
    CommitDone { connection: None, succeeded_in: None }
}

/// Drops the accesses whose client gave up (disconnected): each would be stored without a 200 to
/// match it. Answers 503 to those with less than `commit_limit` left before their deadline, which
/// a commit could outlast. Returns how many were answered so.
fn triage(batch: &mut Vec<PendingAccess>, join_by: Instant, commit_limit: Duration) -> usize {
    let mut expired = 0;
    let mut index = 0;
    while index < batch.len() {
        if batch[index].reply.is_closed() {
            batch.swap_remove(index);
        } else if batch[index].deadline < join_by {
            let late = batch.swap_remove(index);
            let _ = late.reply.send(Err(StoreError::Timeout(commit_limit)));
            expired += 1;
        } else {
            index += 1;
        }
    }
    expired
}

/// The batch's accesses per endpoint, and whether any of them reports every row.
fn tally(batch: &[PendingAccess]) -> (PerEndpoint<i64>, bool) {
    let mut increments: PerEndpoint<i64> = [0; COUNTED_ENDPOINTS];
    let mut wants_snapshot = false;
    for pending in batch {
        increments[pending.endpoint.index()] += 1;
        wants_snapshot |= pending.wants_snapshot;
    }
    (increments, wants_snapshot)
}

/// The first value each endpoint's accesses get: the batch's `n` accesses to an endpoint take the
/// consecutive values that end at its committed count, `count_after - n + 1 ..= count_after`.
fn first_values(counts_after: &PerEndpoint<i64>, increments: &PerEndpoint<i64>) -> PerEndpoint<i64> {
    std::array::from_fn(|index| counts_after[index] - increments[index] + 1)
}

fn answer_batch(
    batch: Vec<PendingAccess>,
    committed: CommittedBatch,
    increments: &PerEndpoint<i64>,
    context: &CommitContext,
) {
    let CommitContext { windows, metrics, .. } = context;
    metrics.db_batch_size.observe(batch.len() as f64);

    let mut next_value = first_values(&committed.counts_after, increments);
    // Recorded before any reply: in-process windows show the access to the client's next request;
    // Redis windows within the flush and read intervals (docs/CONTRACT.md).
    windows.record(increments);
    let snapshot = committed.snapshot.map(Arc::new);
    for pending in batch {
        let index = pending.endpoint.index();
        let access_count = next_value[index];
        next_value[index] += 1;
        let snapshot = if pending.wants_snapshot { snapshot.clone() } else { None };
        // The receiver may have gone in the meantime; the access is committed either way.
        let _ = pending.reply.send(Ok(Access { access_count, snapshot }));
    }
}

fn fail_batch(batch: Vec<PendingAccess>, metrics: &Metrics, error: StoreError) {
    metrics.db_errors.with_label_values(&["commit"]).inc();
    tracing::warn!(error = %error, accesses = batch.len(), "group commit failed; accesses answered 503");
    for pending in batch {
        let _ = pending.reply.send(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(
        endpoint: CountedEndpoint,
        deadline: Instant,
    ) -> (PendingAccess, oneshot::Receiver<Result<Access, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (PendingAccess { endpoint, wants_snapshot: false, deadline, reply }, answer)
    }

    #[test]
    fn values_of_a_batch_are_consecutive_and_end_at_the_committed_count() {
        let root = CountedEndpoint::ALL[0].index();
        let other = CountedEndpoint::ALL[1].index();
        let mut counts_after = [0; COUNTED_ENDPOINTS];
        let mut increments = [0; COUNTED_ENDPOINTS];
        counts_after[root] = 100;
        increments[root] = 3;
        counts_after[other] = 1;
        increments[other] = 1;
        let first = first_values(&counts_after, &increments);
        assert_eq!(first[root], 98, "98, 99, 100");
        assert_eq!(first[other], 1, "a row's first access gets 1");
    }

    #[tokio::test]
    async fn triage_drops_abandoned_accesses_and_answers_late_ones_uncounted() {
        let now = Instant::now();
        let limit = Duration::from_millis(450);
        let endpoint = CountedEndpoint::ALL[0];
        let (on_time, mut on_time_answer) = pending(endpoint, now + Duration::from_secs(1));
        let (late, late_answer) = pending(endpoint, now + Duration::from_millis(100));
        let (abandoned, abandoned_answer) = pending(endpoint, now + Duration::from_secs(1));
        drop(abandoned_answer);
        let mut batch = vec![late, abandoned, on_time];

        let expired = triage(&mut batch, now + limit, limit);

        assert_eq!(expired, 1);
        assert_eq!(batch.len(), 1, "only the access with time for a commit stays");
        assert!(batch[0].deadline > now + limit);
        assert!(matches!(late_answer.await, Ok(Err(StoreError::Timeout(_)))), "late: 503, not counted");
        assert!(on_time_answer.try_recv().is_err(), "the kept access is not answered yet");
    }

    #[test]
    fn tally_counts_accesses_per_endpoint_and_asks_a_snapshot_if_any_wants_one() {
        let now = Instant::now();
        let [first, second] = [CountedEndpoint::ALL[0], CountedEndpoint::ALL[1]];
        let (a, _a) = pending(first, now);
        let (b, _b) = pending(first, now);
        let (mut c, _c) = pending(second, now);
        c.wants_snapshot = true;
        let (increments, wants_snapshot) = tally(&[a, b, c]);
        assert_eq!(increments[first.index()], 2);
        assert_eq!(increments[second.index()], 1);
        assert!(wants_snapshot);
    }

    fn paced(commit: Duration, commits: u32) -> (Pacing, Instant) {
        let mut now = Instant::now();
        let mut pacing = Pacing::new(MAX_COMMITS_IN_FLIGHT, now);
        for _ in 0..commits {
            now += commit;
            pacing.observe(commit, now);
        }
        (pacing, now)
    }

    #[test]
    fn a_local_database_gets_one_commit_at_a_time() {
        let (pacing, now) = paced(Duration::from_micros(300), 100);
        assert_eq!(pacing.allowed_in_flight(), 1);
        assert!(pacing.may_start(0, Some(now), now));
        assert!(!pacing.may_start(1, Some(now - Duration::from_secs(1)), now), "never a second one");
    }

    #[test]
    fn a_distant_database_gets_overlapping_commits_spaced_over_one_commit() {
        let (pacing, now) = paced(Duration::from_micros(1_300), 100);
        assert_eq!(pacing.allowed_in_flight(), 3, "1.3 ms at its fastest: three commits of 0.5 ms");
        let spacing = pacing.spacing();
        assert!(spacing > Duration::from_micros(400) && spacing < Duration::from_micros(450), "{spacing:?}");
        assert!(!pacing.may_start(1, Some(now), now), "too soon after the last start");
        assert!(pacing.may_start(1, Some(now - spacing), now));
        assert!(!pacing.may_start(3, Some(now - spacing), now), "at most the allowed number");
    }

    #[test]
    fn overlap_is_bounded_by_the_connections_the_batcher_may_take() {
        let mut pacing = Pacing::new(2, Instant::now());
        pacing.observe(Duration::from_millis(20), Instant::now());
        assert_eq!(pacing.allowed_in_flight(), 2);
        assert_eq!(Pacing::new(100, Instant::now()).max_in_flight, MAX_COMMITS_IN_FLIGHT);
    }

    #[test]
    fn queueing_does_not_raise_the_floor_and_a_moved_database_is_followed() {
        let (mut pacing, mut now) = paced(Duration::from_micros(300), 10);
        // Under load most commits take longer; the fastest still shows the database is local.
        for _ in 0..100 {
            now += Duration::from_millis(3);
            pacing.observe(Duration::from_millis(3), now);
        }
        assert_eq!(pacing.allowed_in_flight(), 1);
        // After a failover to a primary 2 ms away, within two periods the floor is the new one.
        for _ in 0..3000 {
            now += Duration::from_micros(2_200);
            pacing.observe(Duration::from_micros(2_200), now);
        }
        assert_eq!(pacing.allowed_in_flight(), MAX_COMMITS_IN_FLIGHT);
    }
}
