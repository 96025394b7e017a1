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
//! The front end's own copies of lazily pulled layers (cache files, blob files) count
//! too ([`FrontCopies`]). The kernel reads them without asking, so only those of layers
//! that no container uses can go: above the high watermark a pass first unmounts such
//! idle layers and frees their copies (see `crate::snapshotter::idle`), then evicts
//! chunks until the store's part and the copies left are at the low watermark. Copies
//! of layers in use stay; the store's chunks are evicted in their place (a mounted
//! layer's copy already holds what its readers read).
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
use crate::snapshotter::{Released, Snapshotter};
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

/// The front end's copies of lazily pulled layers: counted against the limit, freed
/// for layers no container uses.
pub trait FrontCopies: Send + Sync {
    /// Bytes they take on disk.
    fn bytes(&self) -> anyhow::Result<u64>;
    /// Unmounts the idle lazily pulled layers and frees their copies; `None` when it
    /// could not start at once (a snapshot operation is under way).
    fn release_idle(&self) -> anyhow::Result<Option<Released>>;
    /// Grows whenever the set of idle layers may have changed.
    fn generation(&self) -> u64;
}

impl FrontCopies for Snapshotter {
    fn bytes(&self) -> anyhow::Result<u64> {
        Ok(self.lazy_copy_bytes()?)
    }

    fn release_idle(&self) -> anyhow::Result<Option<Released>> {
        Ok(Snapshotter::release_idle(self)?)
    }

    fn generation(&self) -> u64 {
        Snapshotter::generation(self)
    }
}

/// How often idle layers are looked for again while over the high watermark when no
/// snapshot was removed since (a layer pulled and never run becomes idle that way).
pub const RELEASE_RETRY: Duration = Duration::from_secs(10);

/// The share of the limit the store keeps for itself (its most recently used chunks)
/// while the copies of layers in use alone pass the low watermark: chunks just
/// prefetched or fetched live until their fills read them, instead of being evicted
/// by the very next pass.
pub const STORE_FLOOR_PERCENT: u64 = 10;

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
    /// Of `bounded_bytes`, the front end's copies.
    pub copy_bytes: AtomicU64,
    /// Idle lazily pulled layers unmounted to free their copies.
    pub layers_released: AtomicU64,
    /// Front-end files freed with them.
    pub copies_freed: AtomicU64,
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
    /// The front end's copies, after the pass (part of `after`).
    pub copies: u64,
    /// Idle layers unmounted and files freed.
    pub released: Released,
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
    copies: Option<Arc<dyn FrontCopies>>,
    /// The copies' generation at the last release, and when it ran.
    released_at: Option<(u64, Instant)>,
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
            copies: None,
            released_at: None,
        }
    }

    /// Counts `copies` against the limit too, and frees those of idle layers.
    pub fn with_copies(mut self, copies: Arc<dyn FrontCopies>) -> Evictor {
        self.copies = Some(copies);
        self
    }

    /// The copies' bytes; a failure is logged and counts as none, so that the store's
    /// part is still kept under the limit.
    fn copy_bytes(&self) -> u64 {
        let Some(c) = &self.copies else { return 0 };
        c.bytes().unwrap_or_else(|e| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("bounded cache: counting the front end's copies: {e:#}");
            0
        })
    }

    /// Releases idle layers when the set of them may have changed since the last
    /// release, or [`RELEASE_RETRY`] after it.
    fn release_idle(&mut self, now: Instant) -> Released {
        let Some(c) = self.copies.clone() else {
            return Released::default();
        };
        let generation = c.generation();
        let due = match self.released_at {
            None => true,
            Some((g, at)) => g != generation || now.saturating_duration_since(at) >= RELEASE_RETRY,
        };
        if !due {
            return Released::default();
        }
        match c.release_idle() {
            Ok(Some(r)) => {
                self.released_at = Some((generation, now));
                r
            }
            // Busy: the next pass tries again.
            Ok(None) => Released::default(),
            Err(e) => {
                self.released_at = Some((generation, now));
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("bounded cache: releasing idle layers: {e:#}");
                Released::default()
            }
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
        let mut copies = self.copy_bytes();
        pass.before = stored + copies + pending(&self.pending);
        let live: HashSet<ChunkDigest> = list.iter().map(|e| e.digest).collect();
        self.recency.retain(|d, _| live.contains(d));
        // Records evicted already are on their way out: only what is still indexed
        // decides (else every pass in a grace period would evict again).
        if stored + copies > self.marks.high {
            self.stats.over_high.fetch_add(1, Ordering::Relaxed);
            if copies > 0 {
                let r = self.release_idle(now);
                if r.files > 0 {
                    copies = self.copy_bytes();
                }
                if r.unmounted > 0 || r.files > 0 {
                    tracing::info!(
                        layers = r.unmounted,
                        busy = r.busy,
                        files = r.files,
                        copies_left = copies,
                        "cache over its high watermark: idle lazily pulled layers \
                         unmounted and their front-end files freed"
                    );
                }
                self.stats
                    .layers_released
                    .fetch_add(r.unmounted, Ordering::Relaxed);
                self.stats
                    .copies_freed
                    .fetch_add(r.files, Ordering::Relaxed);
                pass.released = r;
            }
        }
        // The store's share: what the copies left under the low watermark, and never
        // less than its floor.
        let target = self
            .marks
            .low
            .saturating_sub(copies)
            .max(self.marks.limit / 100 * STORE_FLOOR_PERCENT);
        if stored + copies > self.marks.high && stored > target {
            // Oldest use first; never used in this life: oldest record first (the
            // list comes in pack order, and the sort is stable).
            list.sort_by_key(|e| self.recency.get(&e.digest).copied().unwrap_or(0));
            let mut victims = Vec::new();
            let mut left = stored;
            for e in &list {
                if left <= target {
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
        pass.after = stored + copies + pending(&self.pending);
        pass.copies = copies;
        self.stats
            .bounded_bytes
            .store(pass.after, Ordering::Relaxed);
        self.stats.copy_bytes.store(copies, Ordering::Relaxed);
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

    /// Front-end copies: `idle` bytes of them go at the first release, none later.
    struct FakeCopies {
        bytes: std::sync::Mutex<u64>,
        idle: u64,
        releases: AtomicU64,
    }

    impl FrontCopies for FakeCopies {
        fn bytes(&self) -> anyhow::Result<u64> {
            Ok(*self.bytes.lock().unwrap())
        }

        fn generation(&self) -> u64 {
            // A new generation every time: each pass may release.
            self.releases.load(Ordering::Relaxed)
        }

        fn release_idle(&self) -> anyhow::Result<Option<Released>> {
            let first = self.releases.fetch_add(1, Ordering::Relaxed) == 0;
            let mut b = self.bytes.lock().unwrap();
            let freed = if first { self.idle.min(*b) } else { 0 };
            *b -= freed;
            Ok(Some(Released {
                unmounted: u64::from(freed > 0),
                busy: 1,
                files: u64::from(freed > 0),
            }))
        }
    }

    #[test]
    fn copies_count_idle_ones_are_released_first_and_the_store_makes_room_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let chunks: Vec<Vec<u8>> = (1..=10).map(chunk_of).collect();
        remote_layer(&store, "22", &chunks);
        fetch(&store, &chunks);
        let rec = store.evictable().unwrap()[0].record_bytes;
        let marks = Watermarks {
            limit: 9 * rec,
            high: 8 * rec,
            low: 6 * rec,
        };
        // Copies of 6 records: 2 of an idle layer, 4 of one a container uses.
        let copies = Arc::new(FakeCopies {
            bytes: std::sync::Mutex::new(6 * rec),
            idle: 2 * rec,
            releases: AtomicU64::new(0),
        });
        let mut e = Evictor::new(store.clone(), marks, Duration::from_secs(5), None)
            .with_copies(copies.clone());
        let t0 = Instant::now();
        let p = e.pass(t0).unwrap();
        // 10 stored + 6 copies; the idle 2 go, then the store keeps low - 4 = 2.
        assert_eq!(p.before, 16 * rec);
        assert_eq!(p.released.unmounted, 1);
        assert_eq!((p.copies, p.evicted), (4 * rec, 8));
        assert_eq!(
            p.after,
            (2 + 4 + 8) * rec,
            "evicted records count until punched"
        );
        assert_eq!(e.stats().layers_released.load(Ordering::Relaxed), 1);
        assert_eq!(e.stats().copy_bytes.load(Ordering::Relaxed), 4 * rec);
        // Punched: 6 records in all, under the high watermark; nothing is released.
        let p = e.pass(t0 + Duration::from_secs(6)).unwrap();
        assert_eq!((p.before, p.after, p.evicted), (6 * rec, 6 * rec, 0));
        assert_eq!(copies.releases.load(Ordering::Relaxed), 1);
        // Copies in use alone over the high watermark: every evictable chunk goes.
        *copies.bytes.lock().unwrap() = 9 * rec;
        let p = e.pass(t0 + Duration::from_secs(7)).unwrap();
        assert_eq!((p.evicted, p.copies), (2, 9 * rec));
        assert_eq!(copies.releases.load(Ordering::Relaxed), 2);
        assert!(store.evictable().unwrap().is_empty());
    }
}
