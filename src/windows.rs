//! Recent-window counters: accesses per endpoint over the last minute and the last hour.
//!
//! With Redis, the figures are shared by every replica: each replica adds its committed accesses
//! to time-bucketed hashes (`{prefix}window:10s:{bucket}`, `{prefix}window:1m:{bucket}`) that
//! expire on their own. The hot path never waits for Redis: the batcher adds to a local pending
//! table and a background task flushes it once a second, so the shared figures trail by at most
//! that. Reading them is shared too: one read of Redis serves every request of the replica for
//! [`READ_MAX_AGE`] (and within one 10 s bucket), and concurrent requests that find no fresh read
//! wait for the one read in flight instead of each sending their own ([`SharedRead`]). So an
//! access shows in every replica's figures at most `FLUSH_INTERVAL` + `READ_MAX_AGE` (1.25 s) after
//! its commit, plus the time of a Redis round trip. Without Redis, the same buckets are kept
//! in-process (per replica) and read directly.
//!
//! Redis is never on the counting path: when it is down, counting goes on exactly and only these
//! figures are reported missing.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::Serialize;

use crate::config::RedisSettings;
use crate::endpoints::{CountedEndpoint, PerEndpoint, COUNTED_ENDPOINTS};
use crate::redis_conn;
use crate::telemetry::Metrics;

/// Width of the fine buckets; "last minute" is the sum of the newest six.
pub const FINE_BUCKET_SECONDS: i64 = 10;
const FINE_BUCKETS_PER_MINUTE: i64 = 60 / FINE_BUCKET_SECONDS;
/// Width of the coarse buckets in Redis; "last hour" is the sum of the newest sixty.
const COARSE_BUCKET_SECONDS: i64 = 60;
const COARSE_BUCKETS_PER_HOUR: i64 = 60;
/// Keys outlive the windows that read them by a margin, then Redis drops them.
const FINE_KEY_TTL_SECONDS: i64 = 3 * 60;
const COARSE_KEY_TTL_SECONDS: i64 = 65 * 60;
/// The longest window reported; older buckets are of no use to anyone.
pub const LONGEST_WINDOW_SECONDS: i64 = COARSE_BUCKETS_PER_HOUR * COARSE_BUCKET_SECONDS;
/// Redis bucket kinds: the name in the key and the bucket width in seconds.
const WINDOW_KEY_KINDS: [(&str, i64); 2] = [("10s", FINE_BUCKET_SECONDS), ("1m", COARSE_BUCKET_SECONDS)];
/// Connection and response timeouts of the Redis client.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on one Redis operation as a caller sees it: room for one connection attempt.
const REDIS_OPERATION_LIMIT: Duration = Duration::from_millis(1000);
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one read of the windows from Redis answers every request of this replica. Well under
/// the figures' 10 s resolution, and a quarter of the flush interval, which already sets how far
/// they trail: reads cost at most four Redis round trips a second, whatever the request rate.
const READ_MAX_AGE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounts {
    pub last_minute: u64,
    pub last_hour: u64,
}

/// Recent-window figures for all endpoints, or why they are missing.
#[derive(Debug, Clone)]
pub enum WindowsReport {
    Available(PerEndpoint<WindowCounts>),
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowSource {
    /// Shared by all replicas through Redis.
    Redis,
    /// This replica's own accesses only (no Redis configured).
    Process,
}

#[derive(Clone)]
pub struct Windows {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Metrics,
    backend: Backend,
}

enum Backend {
    InProcess(Mutex<BucketRing>),
    Redis(Box<RedisWindows>),
}

impl Windows {
    pub fn in_process(metrics: Metrics) -> Self {
        Self { inner: Arc::new(Inner { metrics, backend: Backend::InProcess(Mutex::new(BucketRing::default())) }) }
    }

    /// Redis-backed windows. Connecting is lazy and retried, so a Redis that is down at start
    /// only degrades the window figures.
    pub fn redis(settings: &RedisSettings, metrics: Metrics) -> Result<Self, String> {
        let client = redis_conn::open(&settings.url)?;
        let backend = Backend::Redis(Box::new(RedisWindows {
            client,
            prefix: settings.key_prefix.clone(),
            connection: tokio::sync::Mutex::new(None),
            pending: Mutex::new(BTreeMap::new()),
            reads: SharedRead::new(READ_MAX_AGE),
        }));
        Ok(Self { inner: Arc::new(Inner { metrics, backend }) })
    }

    pub fn source(&self) -> WindowSource {
        match self.inner.backend {
            Backend::InProcess(_) => WindowSource::Process,
            Backend::Redis(_) => WindowSource::Redis,
        }
    }

    /// Adds committed accesses. Never blocks on I/O.
    pub fn record(&self, increments: &PerEndpoint<i64>) {
        let now = unix_now();
        match &self.inner.backend {
            Backend::InProcess(ring) => lock(ring).add(now / FINE_BUCKET_SECONDS, increments),
            Backend::Redis(redis) => {
                let mut pending = lock(&redis.pending);
                let bucket = pending.entry(now / FINE_BUCKET_SECONDS).or_insert([0; COUNTED_ENDPOINTS]);
                for (slot, n) in bucket.iter_mut().zip(increments) {
                    *slot += u64::try_from(*n).unwrap_or(0);
                }
            }
        }
    }

    pub async fn report(&self) -> WindowsReport {
        let now = unix_now();
        match &self.inner.backend {
            Backend::InProcess(ring) => WindowsReport::Available(lock(ring).counts(now / FINE_BUCKET_SECONDS)),
            // One read serves every request for a while; only an actual read is an operation.
            Backend::Redis(redis) => {
                let read = async {
                    let result = redis.read(now).await;
                    self.inner.metrics.redis_result("read_windows", &result);
                    match result {
                        Ok(counts) => WindowsReport::Available(counts),
                        Err(error) => WindowsReport::Unavailable(error),
                    }
                };
                redis.reads.get(now / FINE_BUCKET_SECONDS, read).await
            }
        }
    }

    /// Redis health for readiness: `None` when Redis is not configured.
    pub async fn redis_health(&self) -> Option<Result<(), String>> {
        match &self.inner.backend {
            Backend::InProcess(_) => None,
            Backend::Redis(redis) => {
                let result = redis.ping().await;
                self.inner.metrics.redis_result("ping", &result);
                if result.is_err() {
                    // Figures read before the outage are not shown as available after it is seen.
                    redis.reads.forget();
                }
                Some(result)
            }
        }
    }

    /// Pushes pending increments to Redis. Kept for the next try when Redis is down; increments
    /// older than the longest window are dropped since no window would show them.
    pub async fn flush(&self) {
        if let Backend::Redis(redis) = &self.inner.backend {
            let result = redis.flush().await;
            self.inner.metrics.redis_result("flush_windows", &result);
            if let Err(error) = result {
                redis.reads.forget();
                tracing::debug!(%error, "window flush to Redis failed; will retry");
            }
        }
    }

    /// Flushes once a second until the returned handle is aborted.
    pub fn spawn_flusher(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !matches!(self.inner.backend, Backend::Redis(_)) {
            return None;
        }
        let windows = self.clone();
        Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                windows.flush().await;
            }
        }))
    }
}

/// Every window key starts with this, after the configured key prefix.
pub fn window_key_prefix(prefix: &str) -> String {
    format!("{prefix}window:")
}

fn window_key(prefix: &str, kind: &str, bucket: i64) -> String {
    format!("{prefix}window:{kind}:{bucket}")
}

/// What a window key says after its `{prefix}window:` part: the end of its bucket as a Unix time,
/// or `None` for a name this version does not write.
pub fn window_key_end(suffix: &str) -> Option<i64> {
    let (kind, bucket) = suffix.split_once(':')?;
    let width = WINDOW_KEY_KINDS.iter().find(|(name, _)| *name == kind)?.1;
    // Exactly what window_key writes: decimal digits (`parse` would also take `+5` and `-5`).
    if !bucket.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bucket: i64 = bucket.parse().ok()?;
    bucket.checked_add(1)?.checked_mul(width)
}

/// A value read once and shared (single flight): every caller within `max_age` of a read, asking
/// for the same key, gets that read's value; a caller that finds none waits for the read in
/// flight, if any, and takes its value however long it took, so that while Redis hangs, callers
/// queue behind one read instead of one read each. The key is what the value was computed for
/// (here the 10 s bucket), so a value never outlives its bucket.
struct SharedRead<K, V> {
    max_age: Duration,
    latest: Mutex<Latest<K, V>>,
    /// Held for the duration of a read: the single flight.
    flight: tokio::sync::Mutex<()>,
}

struct Latest<K, V> {
    /// Reads finished so far, so that a waiter knows whether one finished while it waited.
    reads: u64,
    last: Option<Read<K, V>>,
}

struct Read<K, V> {
    key: K,
    /// When the read started: its value is no older than that.
    started: tokio::time::Instant,
    value: V,
}

impl<K: PartialEq + Copy, V: Clone> SharedRead<K, V> {
    fn new(max_age: Duration) -> Self {
        Self { max_age, latest: Mutex::new(Latest { reads: 0, last: None }), flight: tokio::sync::Mutex::new(()) }
    }

    fn fresh(&self, key: K, latest: &Latest<K, V>) -> Option<V> {
        latest
            .last
            .as_ref()
            .filter(|last| last.key == key && last.started.elapsed() < self.max_age)
            .map(|last| last.value.clone())
    }

    /// The shared value for `key`, read with `read` when there is no fresh one.
    async fn get(&self, key: K, read: impl Future<Output = V>) -> V {
        let seen = {
            let latest = lock(&self.latest);
            if let Some(value) = self.fresh(key, &latest) {
                return value;
            }
            latest.reads
        };
        let _flight = self.flight.lock().await;
        {
            let latest = lock(&self.latest);
            if let Some(last) = latest.last.as_ref().filter(|last| last.key == key && latest.reads != seen) {
                // The read this caller waited for, however long it took.
                return last.value.clone();
            }
            if let Some(value) = self.fresh(key, &latest) {
                return value;
            }
        }
        let started = tokio::time::Instant::now();
        let value = read.await;
        let mut latest = lock(&self.latest);
        latest.reads += 1;
        latest.last = Some(Read { key, started, value: value.clone() });
        value
    }

    /// Makes the next caller read again (a Redis failure seen elsewhere).
    fn forget(&self) {
        lock(&self.latest).last = None;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder panicked mid-update
    // (plain counters), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// In-process fine buckets covering the last hour.
#[derive(Default)]
struct BucketRing {
    buckets: VecDeque<(i64, PerEndpoint<u64>)>,
}

const RING_BUCKETS: i64 = LONGEST_WINDOW_SECONDS / FINE_BUCKET_SECONDS;

impl BucketRing {
    fn add(&mut self, bucket: i64, increments: &PerEndpoint<i64>) {
        if self.buckets.back().is_none_or(|(newest, _)| *newest < bucket) {
            self.buckets.push_back((bucket, [0; COUNTED_ENDPOINTS]));
        }
        while self.buckets.front().is_some_and(|(oldest, _)| *oldest <= bucket - RING_BUCKETS) {
            self.buckets.pop_front();
        }
        // Clock steps backwards land in the newest bucket rather than being lost.
        if let Some((_, counts)) = self.buckets.back_mut() {
            for (slot, n) in counts.iter_mut().zip(increments) {
                *slot += u64::try_from(*n).unwrap_or(0);
            }
        }
    }

    fn counts(&self, now_bucket: i64) -> PerEndpoint<WindowCounts> {
        let mut result = [WindowCounts::default(); COUNTED_ENDPOINTS];
        for (bucket, counts) in &self.buckets {
            let age = now_bucket - bucket;
            for (window, n) in result.iter_mut().zip(counts) {
                if age < RING_BUCKETS {
                    window.last_hour += n;
                }
                if age < FINE_BUCKETS_PER_MINUTE {
                    window.last_minute += n;
                }
            }
        }
        result
    }
}

struct RedisWindows {
    client: redis::Client,
    prefix: String,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// fine bucket -> accesses not yet in Redis
    pending: Mutex<BTreeMap<i64, PerEndpoint<u64>>>,
    /// The last read of the windows, shared by every request, keyed by its fine bucket.
    reads: SharedRead<i64, WindowsReport>,
}

impl RedisWindows {
    fn fine_key(&self, bucket: i64) -> String {
        window_key(&self.prefix, WINDOW_KEY_KINDS[0].0, bucket)
    }

    fn coarse_key(&self, bucket: i64) -> String {
        window_key(&self.prefix, WINDOW_KEY_KINDS[1].0, bucket)
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = redis_conn::connect(self.client.clone(), REDIS_TIMEOUT).await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// One bound for the whole operation, the wait for a connection included: while Redis hangs,
    /// callers queue behind one reconnection attempt at a time, and a readiness probe must not wait
    /// for all of them.
    async fn run<T: redis::FromRedisValue>(&self, pipeline: &redis::Pipeline) -> Result<T, String> {
        let operation = async {
            let mut connection = self.connection().await?;
            pipeline.query_async::<T>(&mut connection).await.map_err(|error| format!("Redis error: {error}"))
        };
        tokio::time::timeout(REDIS_OPERATION_LIMIT, operation)
            .await
            .map_err(|_| format!("Redis did not answer within {REDIS_OPERATION_LIMIT:?}"))?
    }

    async fn ping(&self) -> Result<(), String> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("PING");
        self.run::<(String,)>(&pipeline).await.map(|_| ())
    }

    async fn flush(&self) -> Result<(), String> {
        let pending = std::mem::take(&mut *lock(&self.pending));
        if pending.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for (fine_bucket, counts) in &pending {
            let coarse_bucket = fine_bucket * FINE_BUCKET_SECONDS / COARSE_BUCKET_SECONDS;
            let (fine, coarse) = (self.fine_key(*fine_bucket), self.coarse_key(coarse_bucket));
            for endpoint in CountedEndpoint::ALL {
                let n = counts[endpoint.index()];
                if n > 0 {
                    pipeline.hincr(&fine, endpoint.path(), n).ignore();
                    pipeline.hincr(&coarse, endpoint.path(), n).ignore();
                }
            }
            pipeline.expire(&fine, FINE_KEY_TTL_SECONDS).ignore();
            pipeline.expire(&coarse, COARSE_KEY_TTL_SECONDS).ignore();
        }
        let result = self.run::<()>(&pipeline).await;
        if result.is_err() {
            // MULTI/EXEC applied all or nothing: put everything back for the next flush.
            let oldest_useful = unix_now() / FINE_BUCKET_SECONDS - RING_BUCKETS;
            let mut current = lock(&self.pending);
            for (bucket, counts) in pending.into_iter().filter(|(bucket, _)| *bucket > oldest_useful) {
                let slot = current.entry(bucket).or_insert([0; COUNTED_ENDPOINTS]);
                for (total, n) in slot.iter_mut().zip(counts) {
                    *total += n;
                }
            }
        }
        result
    }

    async fn read(&self, now: i64) -> Result<PerEndpoint<WindowCounts>, String> {
        let fine_now = now / FINE_BUCKET_SECONDS;
        let coarse_now = now / COARSE_BUCKET_SECONDS;
        let mut pipeline = redis::pipe();
        for bucket in (fine_now - FINE_BUCKETS_PER_MINUTE + 1)..=fine_now {
            pipeline.hgetall(self.fine_key(bucket));
        }
        for bucket in (coarse_now - COARSE_BUCKETS_PER_HOUR + 1)..=coarse_now {
            pipeline.hgetall(self.coarse_key(bucket));
        }
        let hashes: Vec<BTreeMap<String, u64>> = self.run(&pipeline).await?;
        Ok(sum_window_hashes(&hashes))
    }
}

/// The figures from the hashes [`RedisWindows::read`] asks for: the six fine buckets of the last
/// minute, then the sixty coarse buckets of the last hour. Fields of other names are ignored.
fn sum_window_hashes(hashes: &[BTreeMap<String, u64>]) -> PerEndpoint<WindowCounts> {
    let fine_count = usize::try_from(FINE_BUCKETS_PER_MINUTE).unwrap_or(6);
    let mut result = [WindowCounts::default(); COUNTED_ENDPOINTS];
    for (position, hash) in hashes.iter().enumerate() {
        for (path, n) in hash {
            if let Some(endpoint) = CountedEndpoint::from_path(path) {
                let window = &mut result[endpoint.index()];
                if position < fine_count {
                    window.last_minute += n;
                } else {
                    window.last_hour += n;
                }
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn window_key_names_round_trip_to_bucket_ends() {
        let prefix = window_key_prefix("p:");
        for (kind, width) in WINDOW_KEY_KINDS {
            let key = window_key("p:", kind, 100);
            assert_eq!(window_key_end(&key[prefix.len()..]), Some(101 * width), "{key}");
        }
        assert_eq!(window_key_end("10s:100"), Some(1010));
        assert_eq!(window_key_end("1m:100"), Some(6060));
        assert_eq!(window_key_end("1h:100"), None);
        assert_eq!(window_key_end("10s:x"), None);
        assert_eq!(window_key_end("10s"), None);
        assert_eq!(window_key_end("10s:+100"), None);
        assert_eq!(window_key_end("1m:100:x"), None);
    }

    #[test]
    fn ring_sums_the_last_minute_and_hour() {
        let mut ring = BucketRing::default();
        let now = 1_000_000;
        ring.add(now - 400, &[100, 0, 0]); // older than an hour: forgotten
        ring.add(now - 300, &[10, 0, 0]); // 50 minutes ago
        ring.add(now - 5, &[1, 0, 2]); // 50 seconds ago
        ring.add(now, &[1, 1, 0]);
        let counts = ring.counts(now);
        assert_eq!(counts[0], WindowCounts { last_minute: 2, last_hour: 12 });
        assert_eq!(counts[1], WindowCounts { last_minute: 1, last_hour: 1 });
        assert_eq!(counts[2], WindowCounts { last_minute: 2, last_hour: 2 });
    }

    #[test]
    fn hashes_sum_to_the_last_minute_and_hour() {
        let hash = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        let mut hashes: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); 66];
        hashes[0] = hash(&[("/", 1), ("/other", 50)]);
        hashes[5] = hash(&[("/", 2), ("/stats", 3)]);
        hashes[6] = hash(&[("/", 30)]);
        hashes[65] = hash(&[("/", 4), ("/api/v1/endpoints", 5)]);
        let counts = sum_window_hashes(&hashes);
        assert_eq!(counts[CountedEndpoint::Root.index()], WindowCounts { last_minute: 3, last_hour: 34 });
        assert_eq!(counts[CountedEndpoint::Stats.index()], WindowCounts { last_minute: 3, last_hour: 0 });
        assert_eq!(counts[CountedEndpoint::Endpoints.index()], WindowCounts { last_minute: 0, last_hour: 5 });
    }

    /// A read that counts how often it ran and takes `took`.
    async fn counted_read(reads: &AtomicUsize, took: Duration, value: u32) -> u32 {
        reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(took).await;
        value
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn concurrent_callers_share_one_read() {
        let shared = SharedRead::new(HOUR);
        let reads = AtomicUsize::new(0);
        let callers = (0..50).map(|i| shared.get(1, counted_read(&reads, Duration::from_millis(5), i)));
        let values = futures_util::future::join_all(callers).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    }

    #[tokio::test]
    async fn a_read_serves_its_bucket_until_it_is_too_old_or_forgotten() {
        let shared = SharedRead::new(HOUR);
        let reads = AtomicUsize::new(0);
        assert_eq!(shared.get(1, counted_read(&reads, Duration::ZERO, 10)).await, 10);
        assert_eq!(shared.get(1, counted_read(&reads, Duration::ZERO, 11)).await, 10, "fresh: shared");
        assert_eq!(shared.get(2, counted_read(&reads, Duration::ZERO, 20)).await, 20, "new bucket: read again");
        assert_eq!(shared.get(2, counted_read(&reads, Duration::ZERO, 21)).await, 20, "fresh: shared");
        shared.forget();
        assert_eq!(shared.get(2, counted_read(&reads, Duration::ZERO, 22)).await, 22, "forgotten: read again");
        assert_eq!(reads.load(Ordering::SeqCst), 3);

        let never_fresh = SharedRead::new(Duration::ZERO);
        assert_eq!(never_fresh.get(1, counted_read(&reads, Duration::ZERO, 30)).await, 30);
        assert_eq!(never_fresh.get(1, counted_read(&reads, Duration::ZERO, 31)).await, 31, "too old: read again");
    }

    /// While Redis hangs, a read takes its whole time limit, longer than the figures stay fresh:
    /// the callers that waited for it still take its value rather than reading again one by one.
    #[tokio::test]
    async fn callers_waiting_for_a_slow_read_take_its_value() {
        let shared = SharedRead::new(Duration::from_millis(1));
        let reads = AtomicUsize::new(0);
        let callers = (0..6).map(|i| shared.get(1, counted_read(&reads, Duration::from_millis(50), i)));
        let values = futures_util::future::join_all(callers).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    }
}
