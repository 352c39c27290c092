//! Group commit.
//!
//! Every counted request sends its access to one task per process. While that task commits a
//! batch, the next one accumulates in the channel; the next commit takes everything that waited.
//! A batch is one transaction: for each endpoint the stored count rises by the batch's accesses to
//! it, and the accesses get the consecutive values that end at the new count. So every value a
//! client sees is committed before it is sent, values are unique, and throughput grows with
//! concurrency instead of being bound by one commit per request.
//!
//! A 503 must mean "not counted". Each access carries the deadline of its request, and the time it
//! has left decides whether it may still join a commit; the database itself cancels a commit that
//! runs too long. See [`CommitLimits`].

use std::sync::Arc;
use std::time::{Duration, Instant};

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
///   answered 503 uncounted. An access waits in the queue for at most one commit (≤ 0.45 T), so it
///   normally still has 0.55 T when its turn comes.
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

async fn run(
    mut receiver: mpsc::Receiver<PendingAccess>,
    stop: Arc<Notify>,
    database: Database,
    windows: Windows,
    metrics: Metrics,
    limits: CommitLimits,
) {
    let context = CommitContext { database, windows, metrics, limits };
    let mut connection = None;
    let mut batch = Vec::with_capacity(64);
    // One commit at a time: the accesses that arrive meanwhile form the next batch, which starts as
    // soon as this one is answered. (A second commit in flight only waits for the row lock of the
    // first, and costs PostgreSQL CPU: docs/operations/tuning.md.)
    loop {
        tokio::select! {
            received = receiver.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break; // closed and drained
                }
                commit(&mut batch, &mut connection, &context).await;
            }
            // From here on sends fail at once, and what was queued before is still received.
            () = stop.notified() => receiver.close(),
        }
    }
    if let Some(connection) = connection {
        connection.close().await;
    }
    tracing::debug!("access batcher stopped: every access answered");
}

struct CommitContext {
    database: Database,
    windows: Windows,
    metrics: Metrics,
    limits: CommitLimits,
}

async fn commit(batch: &mut Vec<PendingAccess>, held: &mut Option<CommitConnection>, context: &CommitContext) {
    let CommitContext { database, metrics, limits, .. } = context;
    let CommitLimits { statement_timeout, commit_limit } = *limits;
    // A client that gave up (disconnect) is not counted: its access would be stored without a 200
    // response to match it. Nor is an access with too little time left for a commit.
    let join_by = Instant::now() + commit_limit;
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
    if expired > 0 {
        tracing::warn!(accesses = expired, "accesses waited too long for a commit; answered 503, not counted");
    }
    if batch.is_empty() {
        return;
    }
    let mut increments: PerEndpoint<i64> = [0; COUNTED_ENDPOINTS];
    let mut wants_snapshot = false;
    for pending in batch.iter() {
        increments[pending.endpoint.index()] += 1;
        wants_snapshot |= pending.wants_snapshot;
    }

    let started = Instant::now();
    let attempt = async {
        let connection = match held {
            Some(connection) => connection,
            None => held.insert(database.commit_connection(statement_timeout).await?),
        };
        connection.commit_batch(&increments, wants_snapshot).await
    };
    let outcome = tokio::time::timeout(commit_limit, attempt).await;
    metrics.db_commit_duration.observe(started.elapsed().as_secs_f64());

    let failure = match outcome {
        Ok(Ok(committed)) => return answer_batch(batch, committed, &increments, context),
        Ok(Err(error)) => StoreError::from(error),
        Err(_) => StoreError::Timeout(commit_limit),
    };
    // A connection that failed or was abandoned mid-statement is in an unknown state.
    if let Some(connection) = held.take() {
        connection.discard();
    }
    fail_batch(batch, metrics, failure);
}

fn answer_batch(
    batch: &mut Vec<PendingAccess>,
    committed: CommittedBatch,
    increments: &PerEndpoint<i64>,
    context: &CommitContext,
) {
    let CommitContext { windows, metrics, .. } = context;
    metrics.db_batch_size.observe(batch.len() as f64);

    let mut next_value: PerEndpoint<i64> = [0; COUNTED_ENDPOINTS];
    for index in 0..COUNTED_ENDPOINTS {
        next_value[index] = committed.counts_after[index] - increments[index] + 1;
    }
    // Recorded before any reply: in-process windows show the access to the client's next request;
    // Redis windows within the flush and read intervals (docs/CONTRACT.md).
    windows.record(increments);
    let snapshot = committed.snapshot.map(Arc::new);
    for pending in batch.drain(..) {
        let index = pending.endpoint.index();
        let access_count = next_value[index];
        next_value[index] += 1;
        let snapshot = if pending.wants_snapshot { snapshot.clone() } else { None };
        // The receiver may have gone in the meantime; the access is committed either way.
        let _ = pending.reply.send(Ok(Access { access_count, snapshot }));
    }
}

fn fail_batch(batch: &mut Vec<PendingAccess>, metrics: &Metrics, error: StoreError) {
    metrics.db_errors.with_label_values(&["commit"]).inc();
    tracing::warn!(error = %error, accesses = batch.len(), "group commit failed; accesses answered 503");
    for pending in batch.drain(..) {
        let _ = pending.reply.send(Err(error.clone()));
    }
}
