//! The bounded cache: keeps the data of lazily pulled layers under `[cache] limit`.
//!
//! What is bounded: chunks in the store that can be fetched again ([`Store::evictable`]:
//! named by lazily pulled layers only), plus the records of evicted chunks whose bytes
//! are not yet deallocated. Every `check_period_ms` one pass:
//! 1. takes the chunks read since the last pass from the fetcher's [`TouchLog`] (each
//!    fetched chunk, and each stored chunk a fill read) and stamps them with a growing
//!    clock;
//! 2. deallocates the records of chunks evicted more than `punch_grace_ms` ago
//!    ([`Store::punch`]);
//! 3. if the bounded bytes pass the high watermark, evicts chunks least recently used
//!    first (a chunk never touched in this process's life counts as oldest, in the
//!    order its record was written) until they are at the low watermark.
//!
//! Recency is what the daemon sees: the kernel serves what a cache or blob file holds
//! without asking, so a chunk's last use is the last time a fill needed it. An evicted
//! chunk is fetched again by the next fill that needs it; a fill that had its old
//! location reads a hole, fails verification and asks the fetcher instead (see
//! `serve/worker.rs`), so a reader racing an eviction still gets the right bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{CacheConfig, LimitSpec};
use crate::digest::ChunkDigest;
use crate::remote::TouchLog;
use crate::store::{Hole, Store};

/// The limit and its watermarks, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// The configured limit.
    pub limit: u64,
    /// Eviction starts above this.
    pub high: u64,
    /// ... and stops at this.
    pub low: u64,
}

impl Watermarks {
    /// From the config; `root` is where a percentage is taken of (its filesystem's
    /// size). `None` when the cache is unbounded.
    pub fn from_config(cfg: &CacheConfig, root: &Path) -> anyhow::Result<Option<Watermarks>> {
        let Some(spec) = cfg.spec().map_err(anyhow::Error::msg)? else {
            return Ok(None);
        };
        let limit = match spec {
            LimitSpec::Bytes(b) => b,
            LimitSpec::Percent(p) => {
                let st = nix::sys::statvfs::statvfs(root)
                    .with_context(|| format!("statvfs {}", root.display()))?;
                let size = st.blocks() as u64 * st.fragment_size() as u64;
                size / 100 * u64::from(p)
            }
        };
        let share = |pct: u8| (u128::from(limit) * u128::from(pct) / 100) as u64;
        Ok(Some(Watermarks {
            limit,
            high: share(cfg.high_watermark_percent),
            low: share(cfg.low_watermark_percent),
        }))
    }
}

/// The evictor's counters, read by status and metrics.
#[derive(Debug, Default)]
pub struct EvictStats {
    /// Bytes counted against the limit at the last pass.
    pub bounded_bytes: AtomicU64,
    /// Chunks evicted.
    pub chunks: AtomicU64,
    /// Their record bytes.
    pub bytes: AtomicU64,
    /// Record bytes deallocated.
    pub punched_bytes: AtomicU64,
    /// Passes that found the data over the high watermark.
    pub over_high: AtomicU64,
    /// Passes that failed (the store could not be read or written).
    pub failures: AtomicU64,
    /// Evicted records that could not be deallocated.
    pub punch_failures: AtomicU64,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Bytes counted against the limit (indexed evictable records, and evicted ones
    /// not yet deallocated) once due records were deallocated, before evicting.
    pub before: u64,
    /// ... and after evicting (evicted records count until deallocated).
    pub after: u64,
    /// Chunks evicted.
    pub evicted: u64,
    /// Record bytes deallocated.
    pub punched: u64,
}

/// The shortest grace before an evicted record is deallocated: a fill that looked the
/// chunk up just before the eviction (the fetcher's `stored` answer) reads it well
/// within this.
pub const MIN_GRACE: Duration = Duration::from_millis(100);

/// Keeps the bounded data under its watermarks (see the module doc).
pub struct Evictor {
    store: Arc<Store>,
    marks: Watermarks,
    grace: Duration,
    touches: Option<Arc<TouchLog>>,
    /// Evicted records not yet deallocated, with when they were evicted.
    pending: VecDeque<(Instant, Hole)>,
    /// Last use per chunk (a clock that grows by one per touch).
    recency: HashMap<ChunkDigest, u64>,
    clock: u64,
    stats: Arc<EvictStats>,
}

impl Evictor {
    /// An evictor for `store`; `touches` (the fetcher's) gives the order.
    pub fn new(
        store: Arc<Store>,
        marks: Watermarks,
        grace: Duration,
        touches: Option<Arc<TouchLog>>,
    ) -> Evictor {
        if let Some(t) = &touches {
            t.enable();
        }
        Evictor {
            store,
            marks,
            grace: grace.max(MIN_GRACE),
            touches,
            pending: VecDeque::new(),
            recency: HashMap::new(),
            clock: 0,
            stats: Arc::new(EvictStats::default()),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<EvictStats> {
        self.stats.clone()
    }

    /// The limit it keeps.
    pub fn watermarks(&self) -> Watermarks {
        self.marks
    }

    /// One pass at time `now` (see the module doc).
    pub fn pass(&mut self, now: Instant) -> anyhow::Result<Pass> {
        let r = self.pass_inner(now);
        if r.is_err() {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn pass_inner(&mut self, now: Instant) -> anyhow::Result<Pass> {
        if let Some(t) = &self.touches {
            for d in t.drain() {
                self.clock += 1;
                self.recency.insert(d, self.clock);
            }
        }
        let mut pass = Pass::default();
        let mut due = Vec::new();
        while let Some(&(at, h)) = self.pending.front() {
            if now.saturating_duration_since(at) < self.grace {
                break;
            }
            due.push(h);
            self.pending.pop_front();
        }
        pass.punched = self.punch(&due);
        let mut list = self.store.evictable().context("listing evictable chunks")?;
        let pending = |p: &VecDeque<(Instant, Hole)>| p.iter().map(|(_, h)| h.len).sum::<u64>();
        let mut stored: u64 = list.iter().map(|e| e.record_bytes).sum();
        pass.before = stored + pending(&self.pending);
        let live: HashSet<ChunkDigest> = list.iter().map(|e| e.digest).collect();
        self.recency.retain(|d, _| live.contains(d));
        // Records evicted already are on their way out: only what is still indexed
        // decides (else every pass in a grace period would evict again).
        if stored > self.marks.high {
            self.stats.over_high.fetch_add(1, Ordering::Relaxed);
            // Oldest use first; never used in this life: oldest record first (the
            // list comes in pack order, and the sort is stable).
            list.sort_by_key(|e| self.recency.get(&e.digest).copied().unwrap_or(0));
            let mut victims = Vec::new();
            let mut left = stored;
            for e in &list {
                if left <= self.marks.low {
                    break;
                }
                victims.push(e.digest);
                left = left.saturating_sub(e.record_bytes);
            }
            let done = self.store.evict(&victims).context("evicting chunks")?;
            for h in &done.holes {
                self.pending.push_back((now, *h));
            }
            for d in &victims {
                self.recency.remove(d);
            }
            stored = stored.saturating_sub(done.bytes);
            pass.evicted = done.chunks;
            self.stats.chunks.fetch_add(done.chunks, Ordering::Relaxed);
            self.stats.bytes.fetch_add(done.bytes, Ordering::Relaxed);
            tracing::info!(
                stored_before = stored + done.bytes,
                high = self.marks.high,
                low = self.marks.low,
                chunks = done.chunks,
                bytes = done.bytes,
                kept = done.kept,
                "cache over its high watermark: evicted the least recently used chunks"
            );
        }
        pass.after = stored + pending(&self.pending);
        self.stats
            .bounded_bytes
            .store(pass.after, Ordering::Relaxed);
        Ok(pass)
    }

    /// Deallocates every pending record at once: for when nothing reads any more (the
    /// data plane has stopped).
    pub fn finish(&mut self) -> u64 {
        let all: Vec<Hole> = self.pending.drain(..).map(|(_, h)| h).collect();
        self.punch(&all)
    }

    /// Deallocates `holes`; one that fails is logged and left as dead pack space
    /// (compaction reclaims it), never retried.
    fn punch(&self, holes: &[Hole]) -> u64 {
        if holes.is_empty() {
            return 0;
        }
        let p = self.store.punch(holes);
        if p.failed > 0 {
            self.stats
                .punch_failures
                .fetch_add(p.failed, Ordering::Relaxed);
            tracing::warn!(
                failed = p.failed,
                first = p.first_error.as_deref().unwrap_or(""),
                "evicted records could not be deallocated (they stay as dead pack space)"
            );
        }
        self.stats
            .punched_bytes
            .fetch_add(p.bytes, Ordering::Relaxed);
        p.bytes
    }
}

/// The evictor's thread: a pass every `period` until stopped, then the pending
/// records are deallocated (call [`EvictorThread::stop`] after the data plane stops).
pub struct EvictorThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    stats: Arc<EvictStats>,
    marks: Watermarks,
}

impl EvictorThread {
    /// Starts passes of `evictor` every `period`.
    pub fn spawn(mut evictor: Evictor, period: Duration) -> std::io::Result<EvictorThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = evictor.stats();
        let marks = evictor.watermarks();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("dedupd-evict".into())
            .spawn(move || {
                // Bounded by the stop flag, checked at least every `period`.
                while !flag.load(Ordering::Relaxed) {
                    if let Err(e) = evictor.pass(Instant::now()) {
                        tracing::warn!("bounded cache: {e:#}");
                    }
                    std::thread::park_timeout(period);
                }
                evictor.finish();
            })?;
        Ok(EvictorThread {
            stop,
            handle: Some(handle),
            stats,
            marks,
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<EvictStats> {
        &self.stats
    }

    /// The limit it keeps.
    pub fn watermarks(&self) -> Watermarks {
        self.marks
    }

    /// Ends the passes and deallocates what is pending.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for EvictorThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitSpec;
    use crate::digest::Leaves;
    use crate::store::chunk;
    use crate::store::remote::store_tests::remote_layer;
    use crate::store::tests::commit_layer;

    /// 64 KiB that lz4 cannot shrink, so every record has the same length.
    fn chunk_of(n: u8) -> Vec<u8> {
        let mut out = vec![0u8; 65536];
        blake3::Hasher::new()
            .update(&[n])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn fetch(store: &Arc<Store>, data: &[Vec<u8>]) {
        let mut w = store.fetch_writer().unwrap();
        for c in data {
            let (d, l) = Leaves::digest_of(c);
            let mut rec = vec![];
            chunk::encode_record(c, &d, &mut rec);
            w.append(&rec, d, c.len() as u32, l).unwrap();
        }
        w.commit().unwrap();
    }

    #[test]
    fn limits_parse_with_units_and_percentages_and_refuse_nonsense() {
        assert_eq!(LimitSpec::parse("1048576"), Ok(LimitSpec::Bytes(1 << 20)));
        assert_eq!(LimitSpec::parse("500MiB"), Ok(LimitSpec::Bytes(500 << 20)));
        assert_eq!(LimitSpec::parse("2GB"), Ok(LimitSpec::Bytes(2_000_000_000)));
        assert_eq!(LimitSpec::parse(" 25% "), Ok(LimitSpec::Percent(25)));
        for bad in [
            "0",
            "0%",
            "101%",
            "12 parsecs",
            "",
            "GiB",
            "99999999999999TiB",
        ] {
            assert!(LimitSpec::parse(bad).is_err(), "{bad}");
        }
        let mut cfg = CacheConfig {
            limit: Some("10MiB".into()),
            ..CacheConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let m = Watermarks::from_config(&cfg, dir.path()).unwrap().unwrap();
        assert_eq!(m.limit, 10 << 20);
        assert_eq!((m.high, m.low), ((10 << 20) * 9 / 10, (10 << 20) * 8 / 10));
        cfg.low_watermark_percent = 95;
        assert!(Watermarks::from_config(&cfg, dir.path()).is_err());
        cfg.limit = Some("50%".into());
        cfg.low_watermark_percent = 80;
        let m = Watermarks::from_config(&cfg, dir.path()).unwrap().unwrap();
        assert!(m.limit > 0);
        cfg.limit = None;
        assert!(Watermarks::from_config(&cfg, dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_pass_over_the_high_watermark_evicts_least_recently_used_down_to_the_low_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let chunks: Vec<Vec<u8>> = (1..=10).map(chunk_of).collect();
        // A converted layer holds chunk 1; a lazy layer names all ten, nine fetched.
        commit_layer(&store, "11", &chunks[..1]);
        remote_layer(&store, "22", &chunks);
        fetch(&store, &chunks[1..]);
        let ev = store.evictable().unwrap();
        assert_eq!(ev.len(), 9);
        let rec = ev[0].record_bytes;
        // Room for 6 records at the high watermark, 4 at the low one.
        let marks = Watermarks {
            limit: 7 * rec,
            high: 6 * rec,
            low: 4 * rec,
        };
        let touches = Arc::new(TouchLog::default());
        let mut e = Evictor::new(
            store.clone(),
            marks,
            Duration::from_secs(5),
            Some(touches.clone()),
        );
        // Chunk 2 (fetched first) was used lately: it stays.
        touches.touch(ChunkDigest::of(&chunks[1]));
        let t0 = Instant::now();
        let p = e.pass(t0).unwrap();
        assert_eq!((p.before, p.evicted, p.after), (9 * rec, 5, 9 * rec));
        let kept: Vec<bool> = chunks
            .iter()
            .map(|c| store.locate(&ChunkDigest::of(c)).unwrap().is_some())
            .collect();
        assert_eq!(
            kept,
            [true, true, false, false, false, false, false, true, true, true],
            "the converted chunk and the recently used one stay; the oldest others go"
        );
        // Nothing is punched before the grace period; then everything pending is.
        let p = e.pass(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(
            (p.punched, p.evicted),
            (0, 0),
            "no second eviction in the grace"
        );
        let p = e.pass(t0 + Duration::from_secs(6)).unwrap();
        assert_eq!((p.punched, p.evicted, p.before), (5 * rec, 0, 4 * rec));
        assert_eq!(e.stats().chunks.load(Ordering::Relaxed), 5);
        // Under the watermark nothing more goes.
        assert_eq!(e.pass(t0 + Duration::from_secs(7)).unwrap().evicted, 0);
    }
}
