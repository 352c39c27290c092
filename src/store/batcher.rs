//! Group commit.
//!
//! Every counted request sends its access to one task per process. While that task commits a
//! batch, the next one accumulates in the channel; the next commit takes everything that waited.
//! A batch is one transaction: for each endpoint the stored count rises by the batch's accesses to
//! it, and the accesses get the consecutive values that end at the new count. So every value a
//! client sees is committed before it is sent, values are unique, and throughput grows with
//! concurrency instead of being bound by one commit per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{
    CommitConnection, CommittedBatch, CountedEndpoint, Database, EndpointRecord, PerEndpoint, StoreError,
    COUNTED_ENDPOINTS,
};
use crate::telemetry::Metrics;
use crate::windows::Windows;

/// Upper bound of accesses in one commit; bounds the statement and the latency of one batch.
const MAX_BATCH: usize = 4096;
/// Accesses that may wait for a batch before senders are slowed down (backpressure).
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
    reply: oneshot::Sender<Result<Access, StoreError>>,
}

/// The handle request handlers use to count. Cheap to clone.
#[derive(Clone)]
pub struct AccessCounter {
    sender: mpsc::Sender<PendingAccess>,
    request_timeout: Duration,
}

impl AccessCounter {
    /// Starts the batcher. It ends, after committing what is queued, once every handle is dropped.
    pub fn start(
        database: Database,
        windows: Windows,
        metrics: Metrics,
        request_timeout: Duration,
    ) -> (Self, JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        // A commit must give up before the client does, so that a client never gets a 503 for an
        // access that was committed after all.
        let commit_timeout = request_timeout.mul_f64(0.8);
        let task = tokio::spawn(run(receiver, database, windows, metrics, commit_timeout));
        (Self { sender, request_timeout }, task)
    }

    /// Counts one access and returns its committed count.
    pub async fn record(&self, endpoint: CountedEndpoint, wants_snapshot: bool) -> Result<Access, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = PendingAccess { endpoint, wants_snapshot, reply };
        let exchange = async {
            self.sender.send(pending).await.map_err(|_| StoreError::ShuttingDown)?;
            answer.await.map_err(|_| StoreError::ShuttingDown)?
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| StoreError::Timeout(self.request_timeout))?
    }
}

async fn run(
    mut receiver: mpsc::Receiver<PendingAccess>,
    database: Database,
    windows: Windows,
    metrics: Metrics,
    commit_timeout: Duration,
) {
    let context = CommitContext { database, windows, metrics, commit_timeout };
    let mut connection = None;
    let mut batch = Vec::with_capacity(64);
    // One commit at a time: the accesses that arrive meanwhile form the next batch, which starts as
    // soon as this one is answered. (A second commit in flight only waits for the row lock of the
    // first, and costs PostgreSQL CPU: docs/operations/tuning.md.)
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&mut batch, &mut connection, &context).await;
    }
    tracing::debug!("access batcher stopped: every access answered");
}

struct CommitContext {
    database: Database,
    windows: Windows,
    metrics: Metrics,
    commit_timeout: Duration,
}

async fn commit(batch: &mut Vec<PendingAccess>, held: &mut Option<CommitConnection>, context: &CommitContext) {
    let CommitContext { database, metrics, commit_timeout, .. } = context;
    let commit_timeout = *commit_timeout;
    // A client that gave up (timeout, disconnect) is not counted: its access would be stored
    // without a 200 response to match it.
    batch.retain(|pending| !pending.reply.is_closed());
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
            None => held.insert(database.commit_connection().await?),
        };
        connection.commit_batch(&increments, wants_snapshot).await
    };
    let outcome = tokio::time::timeout(commit_timeout, attempt).await;
    metrics.db_commit_duration.observe(started.elapsed().as_secs_f64());

    let failure = match outcome {
        Ok(Ok(committed)) => return answer_batch(batch, committed, &increments, context),
        Ok(Err(error)) => StoreError::from(error),
        Err(_) => StoreError::Timeout(commit_timeout),
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
    // Recorded before any reply, so that a client's next request sees its access in the windows.
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
    let message = error.to_string();
    for pending in batch.drain(..) {
        let _ = pending.reply.send(Err(StoreError::Unavailable(message.clone())));
    }
}
