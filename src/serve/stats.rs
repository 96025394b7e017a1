//! Counters of the data plane: one cache-line-aligned block of atomics per engine thread
//! (no sharing on the hot path), summed into a [`StatsSnapshot`] for `stats.json`, the
//! metrics endpoint and `dedupd status`.
//!
//! Each block also holds the thread's slowest recent requests ([`SlowRequest`]): the
//! thread keeps them in its own memory ([`SlowTracker`]) and publishes a copy under a
//! mutex only when a request makes the list (rare once it is full) or an entry ages out,
//! so a request that is not among the slowest touches no lock and no shared line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// Buckets of the latency histogram (see [`bucket_of`]).
pub const LATENCY_BUCKETS: usize = 128;

/// Counters of one engine thread. Front ends count into the block of the thread that
/// called them.
#[repr(align(128))]
pub struct ThreadCounters {
    /// OPEN messages handled (answered with a size or an errno).
    pub opens: AtomicU64,
    /// OPENs answered with an errno (unknown blob, unreadable image).
    pub opens_failed: AtomicU64,
    /// CLOSE messages.
    pub closes: AtomicU64,
    /// Fill requests started (READ messages that passed checks).
    pub reads: AtomicU64,
    /// Fill requests completed with every byte written.
    pub reads_ok: AtomicU64,
    /// Fill requests completed with a range left unwritten (reader gets EIO).
    pub reads_failed: AtomicU64,
    /// Bytes written into cache files.
    pub bytes_written: AtomicU64,
    /// Chunk records read from the store.
    pub chunks_fetched: AtomicU64,
    /// Reads of pack files: one per run of chunks adjacent in the target and in a pack.
    pub pack_reads: AtomicU64,
    /// Chunks that failed verification, decompression, or were missing.
    pub chunk_errors: AtomicU64,
    /// Cache-file writes that failed (ENOSPC, EIO, short).
    pub write_errors: AtomicU64,
    /// Pieces parked on the fetcher (chunks of lazily pulled blobs the store lacked).
    pub fetch_waits: AtomicU64,
    /// Pieces whose stored record failed (an evicted chunk's hole, a retired pack, a
    /// damaged record) and that were asked of the fetcher again (lazily pulled blobs).
    pub refetches: AtomicU64,
    /// Pieces whose fetch failed (timeout, corrupt twice, registry error).
    pub fetch_errors: AtomicU64,
    /// Source reads that failed (pack or image file I/O).
    pub source_errors: AtomicU64,
    /// Messages that failed to parse.
    pub malformed_messages: AtomicU64,
    /// READs for an object id we do not hold.
    pub unknown_objects: AtomicU64,
    /// READs of an insane range (empty, overflowing, above the size limit).
    pub insane_reads: AtomicU64,
    /// READ_COMPLETE answered EINVAL (reader gone): ignored.
    pub complete_einval: AtomicU64,
    /// READ_COMPLETE failed otherwise.
    pub complete_errors: AtomicU64,
    /// Device reads that failed.
    pub device_errors: AtomicU64,
    /// Highest number of fill requests in flight at once on this thread.
    pub in_flight_hwm: AtomicU64,
    /// Fill latency histogram, microseconds (see [`bucket_of`]).
    pub latency_us: [AtomicU64; LATENCY_BUCKETS],
    /// Sum of the latencies in `latency_us`, microseconds.
    pub latency_sum_us: AtomicU64,
    /// Bytes written from chunks the local store held when the request needed them.
    pub store_bytes: AtomicU64,
    /// Bytes written from chunks that had to come from the registry first.
    pub fetched_bytes: AtomicU64,
    /// The thread's slowest recent requests, as last published by the thread.
    pub slowest: Mutex<Vec<SlowRequest>>,
}

/// Slowest requests kept per engine thread.
pub const SLOW_KEPT: usize = 16;
/// How long a slow request is kept.
pub const SLOW_WINDOW: Duration = Duration::from_secs(60);

/// One slow fill request and what it waited on. The three waits are summed over the
/// request's pieces, which overlap, so they can add up to more than `total_us`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlowRequest {
    /// Request id, as in the log (`req`): engine thread in the top 16 bits, then a
    /// per-thread sequence number.
    pub req: u64,
    /// The blob read (data blob id, or `metadata image`).
    pub blob: String,
    /// Offset of the range filled.
    pub offset: u64,
    /// Length of the range filled.
    pub len: u64,
    /// From the kernel's request to the answer, microseconds.
    pub total_us: u64,
    /// Reading chunk records from the local store (pack reads in flight).
    pub store_us: u64,
    /// Waiting for chunks from the registry.
    pub fetch_us: u64,
    /// Writing into the kernel's file (cache file or blob file).
    pub write_us: u64,
    /// False when the reader got EIO.
    pub ok: bool,
    /// When it completed, milliseconds since the Unix epoch.
    pub done_unix_ms: u64,
}

/// The engine thread's own list of its slowest requests of the last [`SLOW_WINDOW`].
pub struct SlowTracker {
    kept: Vec<(Instant, SlowRequest)>,
    /// A request at or under this is not kept (the fastest kept one, when full).
    floor_us: u64,
}

impl Default for SlowTracker {
    fn default() -> SlowTracker {
        SlowTracker {
            kept: Vec::with_capacity(SLOW_KEPT + 1),
            floor_us: 0,
        }
    }
}

impl SlowTracker {
    /// True when a request of `total_us` would be kept: the caller builds the
    /// [`SlowRequest`] (a string copy) only then.
    pub fn wants(&self, total_us: u64) -> bool {
        self.kept.len() < SLOW_KEPT || total_us > self.floor_us
    }

    /// Keeps `r` (completed at `now`), drops what aged out, and publishes the list into
    /// `into`.
    pub fn keep(&mut self, now: Instant, r: SlowRequest, into: &Mutex<Vec<SlowRequest>>) {
        self.kept
            .retain(|(t, _)| now.saturating_duration_since(*t) < SLOW_WINDOW);
        self.kept.push((now, r));
        self.kept.sort_by_key(|k| std::cmp::Reverse(k.1.total_us));
        self.kept.truncate(SLOW_KEPT);
        self.floor_us = if self.kept.len() < SLOW_KEPT {
            0
        } else {
            self.kept.last().map_or(0, |(_, r)| r.total_us)
        };
        let list: Vec<SlowRequest> = self.kept.iter().map(|(_, r)| r.clone()).collect();
        *into.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The slowest requests of every thread, slowest first, at most `n`, none older than
/// [`SLOW_WINDOW`].
pub fn slowest(threads: &[ThreadCounters], n: usize) -> Vec<SlowRequest> {
    let oldest = unix_ms_now().saturating_sub(SLOW_WINDOW.as_millis() as u64);
    let mut all: Vec<SlowRequest> = threads
        .iter()
        .flat_map(|t| t.slowest.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .filter(|r| r.done_unix_ms >= oldest)
        .collect();
    all.sort_by_key(|r| std::cmp::Reverse(r.total_us));
    all.truncate(n);
    all
}

/// A latency histogram in the engine's buckets ([`bucket_of`]), summed over threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Counts per bucket ([`LATENCY_BUCKETS`] of them).
    pub buckets: Vec<u64>,
    /// Sum of the values, microseconds.
    pub sum_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> LatencyHistogram {
        LatencyHistogram {
            buckets: vec![0; LATENCY_BUCKETS],
            sum_us: 0,
        }
    }
}

impl LatencyHistogram {
    /// Adds `other` into this one.
    pub fn add(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// A histogram of microsecond values in the engine's buckets, for code off the engine
/// threads (the fetcher): one relaxed add per value.
pub struct AtomicHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> AtomicHistogram {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::default()),
            sum_us: AtomicU64::default(),
        }
    }
}

impl std::fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicHistogram")
            .field("count", &self.load().count())
            .finish()
    }
}

impl AtomicHistogram {
    /// Counts one value.
    pub fn record_us(&self, us: u64) {
        bump(&self.buckets[bucket_of(us)]);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn load(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Histogram bucket of a value: exact below 8, then 4 buckets per power of two.
pub fn bucket_of(v: u64) -> usize {
    if v < 8 {
        return v as usize;
    }
    let p = 63 - u64::from(v.leading_zeros()); // >= 3
    let sub = (v >> (p - 2)) & 3;
    (8 + (p - 3) * 4 + sub).min(LATENCY_BUCKETS as u64 - 1) as usize
}

/// The largest value that falls in bucket `b`.
pub fn bucket_upper(b: usize) -> u64 {
    if b >= LATENCY_BUCKETS - 1 {
        return u64::MAX; // the last bucket also takes everything above it
    }
    if b < 8 {
        return b as u64;
    }
    let p = (b as u64 - 8) / 4 + 3;
    let sub = (b as u64 - 8) % 4;
    if p >= 63 {
        return u64::MAX;
    }
    ((4 + sub + 1) << (p - 2)) - 1
}

/// Percentile `q` (0..=1) of a histogram, as the upper bound of its bucket.
pub fn percentile(hist: &[u64], q: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return bucket_upper(b);
        }
    }
    bucket_upper(hist.len() - 1)
}

impl Default for ThreadCounters {
    fn default() -> ThreadCounters {
        let z = AtomicU64::default;
        ThreadCounters {
            opens: z(),
            opens_failed: z(),
            closes: z(),
            reads: z(),
            reads_ok: z(),
            reads_failed: z(),
            bytes_written: z(),
            chunks_fetched: z(),
            pack_reads: z(),
            chunk_errors: z(),
            write_errors: z(),
            fetch_waits: z(),
            refetches: z(),
            fetch_errors: z(),
            source_errors: z(),
            malformed_messages: z(),
            unknown_objects: z(),
            insane_reads: z(),
            complete_einval: z(),
            complete_errors: z(),
            device_errors: z(),
            in_flight_hwm: z(),
            latency_us: std::array::from_fn(|_| z()),
            latency_sum_us: z(),
            store_bytes: z(),
            fetched_bytes: z(),
            slowest: Mutex::default(),
        }
    }
}

impl ThreadCounters {
    /// Records the latency of one fill request.
    pub fn record_latency_us(&self, us: u64) {
        bump(&self.latency_us[bucket_of(us)]);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Raises the in-flight high-water mark to `n` if above.
    pub fn note_in_flight(&self, n: u64) {
        self.in_flight_hwm.fetch_max(n, Ordering::Relaxed);
    }
}

/// Summed counters of every engine thread, as written to `stats.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// Front end in use (`cachefiles`, `fanotify`, ...).
    pub front_end: String,
    /// Engine threads.
    pub threads: u64,
    /// Write strategy (`uring` or `sync`).
    pub write_strategy: String,
    /// See [`ThreadCounters::opens`].
    pub opens: u64,
    /// See [`ThreadCounters::opens_failed`].
    pub opens_failed: u64,
    /// Distinct blob names opened.
    pub distinct_blobs_opened: u64,
    /// OPENs per blob name.
    pub opens_by_blob: BTreeMap<String, u64>,
    /// See [`ThreadCounters::closes`].
    pub closes: u64,
    /// See [`ThreadCounters::reads`].
    pub reads: u64,
    /// See [`ThreadCounters::reads_ok`].
    pub reads_ok: u64,
    /// See [`ThreadCounters::reads_failed`].
    pub reads_failed: u64,
    /// See [`ThreadCounters::bytes_written`].
    pub bytes_written: u64,
    /// See [`ThreadCounters::chunks_fetched`].
    pub chunks_fetched: u64,
    /// See [`ThreadCounters::pack_reads`].
    #[serde(default)]
    pub pack_reads: u64,
    /// See [`ThreadCounters::chunk_errors`].
    pub chunk_errors: u64,
    /// See [`ThreadCounters::write_errors`].
    pub write_errors: u64,
    /// See [`ThreadCounters::fetch_waits`].
    #[serde(default)]
    pub fetch_waits: u64,
    /// See [`ThreadCounters::refetches`].
    #[serde(default)]
    pub refetches: u64,
    /// See [`ThreadCounters::fetch_errors`].
    #[serde(default)]
    pub fetch_errors: u64,
    /// See [`ThreadCounters::source_errors`].
    pub source_errors: u64,
    /// See [`ThreadCounters::malformed_messages`].
    pub malformed_messages: u64,
    /// See [`ThreadCounters::unknown_objects`].
    pub unknown_objects: u64,
    /// See [`ThreadCounters::insane_reads`].
    pub insane_reads: u64,
    /// See [`ThreadCounters::complete_einval`].
    pub complete_einval: u64,
    /// See [`ThreadCounters::complete_errors`].
    pub complete_errors: u64,
    /// See [`ThreadCounters::device_errors`].
    pub device_errors: u64,
    /// Highest in-flight fill requests on any one thread.
    pub in_flight_hwm: u64,
    /// Median fill latency (bucket upper bound), microseconds.
    pub latency_us_p50: u64,
    /// 99th percentile fill latency, microseconds.
    pub latency_us_p99: u64,
    /// See [`ThreadCounters::store_bytes`].
    #[serde(default)]
    pub served_from_store_bytes: u64,
    /// See [`ThreadCounters::fetched_bytes`].
    #[serde(default)]
    pub served_from_registry_bytes: u64,
    /// The slowest fill requests of the last [`SLOW_WINDOW`], slowest first.
    #[serde(default)]
    pub slowest: Vec<SlowRequest>,
    /// The fill latency histogram (for the metrics endpoint; not in `stats.json`).
    #[serde(skip)]
    pub latency: LatencyHistogram,
}

/// Sums the counters of every thread.
pub fn snapshot(threads: &[ThreadCounters]) -> StatsSnapshot {
    let sum = |f: fn(&ThreadCounters) -> &AtomicU64| -> u64 {
        threads.iter().map(|t| f(t).load(Ordering::Relaxed)).sum()
    };
    let mut hist = [0u64; LATENCY_BUCKETS];
    for t in threads {
        for (h, c) in hist.iter_mut().zip(&t.latency_us) {
            *h += c.load(Ordering::Relaxed);
        }
    }
    let latency = LatencyHistogram {
        buckets: hist.to_vec(),
        sum_us: sum(|t| &t.latency_sum_us),
    };
    StatsSnapshot {
        threads: threads.len() as u64,
        opens: sum(|t| &t.opens),
        opens_failed: sum(|t| &t.opens_failed),
        closes: sum(|t| &t.closes),
        reads: sum(|t| &t.reads),
        reads_ok: sum(|t| &t.reads_ok),
        reads_failed: sum(|t| &t.reads_failed),
        bytes_written: sum(|t| &t.bytes_written),
        chunks_fetched: sum(|t| &t.chunks_fetched),
        pack_reads: sum(|t| &t.pack_reads),
        chunk_errors: sum(|t| &t.chunk_errors),
        write_errors: sum(|t| &t.write_errors),
        fetch_waits: sum(|t| &t.fetch_waits),
        refetches: sum(|t| &t.refetches),
        fetch_errors: sum(|t| &t.fetch_errors),
        source_errors: sum(|t| &t.source_errors),
        malformed_messages: sum(|t| &t.malformed_messages),
        unknown_objects: sum(|t| &t.unknown_objects),
        insane_reads: sum(|t| &t.insane_reads),
        complete_einval: sum(|t| &t.complete_einval),
        complete_errors: sum(|t| &t.complete_errors),
        device_errors: sum(|t| &t.device_errors),
        in_flight_hwm: threads
            .iter()
            .map(|t| t.in_flight_hwm.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0),
        latency_us_p50: percentile(&hist, 0.50),
        latency_us_p99: percentile(&hist, 0.99),
        served_from_store_bytes: sum(|t| &t.store_bytes),
        served_from_registry_bytes: sum(|t| &t.fetched_bytes),
        slowest: slowest(threads, SLOW_KEPT),
        latency,
        ..StatsSnapshot::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= last || v > 100_000, "v {v}");
            last = b;
            assert!(
                bucket_upper(b) >= v,
                "v {v} b {b} upper {}",
                bucket_upper(b)
            );
            if b > 0 && b < LATENCY_BUCKETS - 1 {
                assert!(bucket_upper(b - 1) < v, "v {v}");
            }
        }
        let mut h = [0u64; LATENCY_BUCKETS];
        for v in 1..=100u64 {
            h[bucket_of(v)] += 1;
        }
        let p50 = percentile(&h, 0.5);
        assert!((50..=55).contains(&p50), "{p50}");
        assert!(percentile(&h, 0.99) >= 99);
    }

    fn slow(req: u64, total_us: u64) -> SlowRequest {
        SlowRequest {
            req,
            total_us,
            done_unix_ms: unix_ms_now(),
            ..SlowRequest::default()
        }
    }

    #[test]
    fn the_tracker_keeps_the_slowest_and_forgets_old_ones() {
        let mut t = SlowTracker::default();
        let out = Mutex::new(Vec::new());
        let t0 = Instant::now();
        for i in 0..100u64 {
            let us = (i * 37) % 101;
            if t.wants(us) {
                t.keep(t0, slow(i, us), &out);
            }
        }
        let kept = out.lock().unwrap().clone();
        assert_eq!(kept.len(), SLOW_KEPT);
        let mut want: Vec<u64> = (0..100u64).map(|i| (i * 37) % 101).collect();
        want.sort_unstable_by(|a, b| b.cmp(a));
        want.truncate(SLOW_KEPT);
        assert_eq!(kept.iter().map(|r| r.total_us).collect::<Vec<_>>(), want);
        assert!(
            !t.wants(want[SLOW_KEPT - 1]),
            "a request no slower than the floor"
        );
        // A minute later the old ones are gone, and a fast request is kept again.
        let later = t0 + SLOW_WINDOW + Duration::from_secs(1);
        t.keep(later, slow(500, 1), &out);
        assert_eq!(out.lock().unwrap().len(), 1);
        assert!(t.wants(0));
    }

    #[test]
    fn snapshot_sums_latency_and_lists_slow_requests() {
        let threads: Vec<ThreadCounters> = (0..2).map(|_| ThreadCounters::default()).collect();
        threads[0].record_latency_us(10);
        threads[1].record_latency_us(30);
        *threads[1].slowest.lock().unwrap() = vec![slow(7, 30)];
        let s = snapshot(&threads);
        assert_eq!(s.latency.count(), 2);
        assert_eq!(s.latency.sum_us, 40);
        assert_eq!(s.slowest.len(), 1);
        assert_eq!(s.slowest[0].req, 7);
    }
}
