//! The serving core: a thread-per-core io_uring engine that turns fill requests from a
//! kernel front end into verified bytes in a cache file.
//!
//! # The fill interface (what every front end implements)
//!
//! The engine knows nothing of `/dev/cachefiles` or fanotify. A front end implements
//! [`FrontEnd`]:
//!
//! - [`FrontEnd::poll_fd`]: an fd that polls readable when kernel events may be queued.
//!   Every engine thread arms a multishot `POLL_ADD` on it and, when it fires, calls
//!   [`FrontEnd::next`] until it returns [`Next::Empty`] (or the thread is full).
//! - [`FrontEnd::next`] reads one kernel event. Control events (cachefiles OPEN/CLOSE,
//!   malformed input) are handled inside the front end and return [`Next::Handled`]; a
//!   request for data returns [`Next::Fill`] with a [`FillRequest`]: *what* to serve
//!   ([`FillSource`]: a chunked blob or a plain file), *where* (`offset`, `len`), *into
//!   which fd* (`target`: the cachefiles anon fd, or a fanotify event's fd), and an opaque
//!   completion `token`.
//! - [`FrontEnd::complete`] is called exactly once per [`FillRequest`], on the thread
//!   that served it, after every write of the request has landed (or failed), with a
//!   [`FillOutcome`]. cachefiles answers with the READ_COMPLETE ioctl in both cases (an
//!   unwritten range is EIO for the reader); a fanotify front end answers `FAN_ALLOW` on
//!   [`FillOutcome::Ok`] and `FAN_DENY_ERRNO(EIO)` otherwise. The engine drops its
//!   reference to `target` only after `complete` returns, so a front end that holds no
//!   other reference sees the fd closed after its answer, never before.
//!
//! What the engine guarantees: the page-aligned cover of `[offset, offset + len)`,
//! clipped to the source's size, is written in full with verified bytes (zeros past the
//! data), or the request completes as failed; a chunk that fails its digest or is missing
//! is never written (other, verified chunks of the same request may be). With
//! [`EngineConfig::read_around`], the whole chunks that cover the range are written (for
//! a plain-file source, the aligned 128 KiB window around it).
//!
//! # Threads
//!
//! One thread per core, pinned; each owns an io_uring, a fixed set of page-aligned
//! registered buffers, a slab of in-flight operations keyed by `user_data`, and its
//! requests. Nothing is shared on the hot path but the front end's read-mostly tables.
//! Writes go out as io_uring `WRITE_FIXED` ([`WriteStrategy::Uring`], on io-wq workers
//! capped per ring) or as `pwrite` on the core thread ([`WriteStrategy::Sync`]).

mod bufpool;
mod engine_sync;
mod engine_uring;
pub mod sim;
pub mod stats;
mod worker;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

pub use self::stats::{StatsSnapshot, ThreadCounters};
use crate::store::{BlobSource, BlobTable};

/// The largest fill request accepted; larger ones are counted as insane and failed.
pub const MAX_FILL_BYTES: u64 = 64 << 20;
/// Cache-file write granularity: pages.
pub const PAGE_BYTES: u64 = 4096;

/// What a fill request reads from.
#[derive(Clone, Debug)]
pub enum FillSource {
    /// A blob made of stored chunks.
    Chunked(Arc<BlobTable>),
    /// A plain file (an EROFS metadata image), zero-padded up to `size_bytes`.
    File {
        /// The open file.
        file: Arc<File>,
        /// Its length: bytes past it read as zeros.
        data_bytes: u64,
        /// The size reported to the kernel.
        size_bytes: u64,
    },
}

impl FillSource {
    /// Opens what the engine needs to serve `blob` (the image file of an `Image`).
    pub fn open(blob: &BlobSource) -> io::Result<FillSource> {
        Ok(match blob {
            BlobSource::Chunked(t) => FillSource::Chunked(t.clone()),
            BlobSource::Image { path, size_bytes } => {
                let file = File::open(path)?;
                let data_bytes = file.metadata()?.len();
                FillSource::File {
                    file: Arc::new(file),
                    data_bytes,
                    size_bytes: *size_bytes,
                }
            }
        })
    }

    /// Size of the target in bytes; fills never write past it.
    pub fn size_bytes(&self) -> u64 {
        match self {
            FillSource::Chunked(t) => t.size_bytes(),
            FillSource::File { size_bytes, .. } => *size_bytes,
        }
    }
}

/// One request for data from a front end.
#[derive(Debug)]
pub struct FillRequest<T> {
    /// What to read.
    pub source: FillSource,
    /// Offset in the target (and the source).
    pub offset: u64,
    /// Length of the range.
    pub len: u64,
    /// The file to fill. Kept open until the request completes.
    pub target: Arc<OwnedFd>,
    /// Given back to [`FrontEnd::complete`].
    pub token: T,
}

/// How a fill request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillOutcome {
    /// Every byte of the range was written.
    Ok,
    /// Part of the range was left unwritten; the reader must get EIO.
    Failed(FillError),
}

/// Why a fill request failed (the first cause).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillError {
    /// A chunk failed verification or decompression, or was missing.
    Chunk,
    /// A chunk could not be fetched from the registry (in time, or intact).
    Fetch,
    /// Reading the source (pack or image file) failed.
    Source,
    /// Writing the target failed (ENOSPC, EIO, short write).
    Write,
}

/// What [`FrontEnd::next`] produced.
pub enum Next<T> {
    /// A request for data.
    Fill(FillRequest<T>),
    /// An event handled inside the front end (OPEN, CLOSE, bad input): call again.
    Handled,
    /// Nothing is queued.
    Empty,
    /// Reading the kernel's queue failed; wait for the next poll.
    Error(io::Error),
}

/// A kernel front end: see the module documentation.
pub trait FrontEnd: Send + Sync + 'static {
    /// Completion token of one request.
    type Token: Send + 'static;
    /// Per-thread state (message buffer, lookup caches).
    type Local: Send + 'static;
    /// Name for logs and stats.
    fn name(&self) -> &'static str;
    /// Fresh per-thread state.
    fn new_local(&self) -> Self::Local;
    /// Fd that polls readable when events may be queued.
    fn poll_fd(&self) -> RawFd;
    /// An eventfd the front end writes when it has work for [`FrontEnd::next`] that no
    /// kernel event announces (work queued by another engine thread). Every thread arms
    /// a multishot poll on it and treats a wake-up like one of [`FrontEnd::poll_fd`].
    /// Default: none.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Reads one event.
    fn next(&self, local: &mut Self::Local, counters: &ThreadCounters) -> Next<Self::Token>;
    /// Acknowledges a request once all its writes have landed.
    fn complete(
        &self,
        local: &mut Self::Local,
        token: Self::Token,
        target: &OwnedFd,
        outcome: FillOutcome,
        counters: &ThreadCounters,
    );
    /// Called after each write of a request landed: `[offset, offset + len)` of its
    /// target now holds verified bytes (or the zeros past the data), before the request
    /// as a whole completes. Default: nothing.
    fn written(&self, _local: &mut Self::Local, _token: &Self::Token, _offset: u64, _len: u64) {}
    /// OPENs per blob name, for stats.
    fn opens_by_blob(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}

/// How cache-file writes are issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WriteStrategy {
    /// io_uring WRITE_FIXED from registered buffers, batched per loop turn; they run on
    /// io-wq workers (the anon fd has no NOWAIT), capped by
    /// [`EngineConfig::iowq_workers`].
    Uring,
    /// `pwrite` on the engine thread.
    Sync,
}

impl WriteStrategy {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            WriteStrategy::Uring => "uring",
            WriteStrategy::Sync => "sync",
        }
    }
}

/// Engine configuration; every queue and buffer is bounded by it.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Engine threads (at least 1).
    pub threads: usize,
    /// Pin thread `i` to online CPU `i % cpus`.
    pub pin: bool,
    /// Write strategy.
    pub write_strategy: WriteStrategy,
    /// Registered buffers per thread (at least 3).
    pub buffers_per_thread: usize,
    /// Bytes per buffer: a page of record headers, then a data area that must hold the
    /// largest chunk (default: the store's max), and with it the most a run reads.
    pub buffer_bytes: usize,
    /// Fill requests in flight per thread; the device is not drained beyond it.
    pub max_requests_per_thread: usize,
    /// Fill requests a thread takes from the front end per loop turn before it starts
    /// them and looks again. Small, so that a burst of requests on the shared device is
    /// spread over the threads instead of queueing behind the one that woke first.
    pub admit_per_turn: usize,
    /// Submission queue entries per ring (also bounds in-flight operations).
    pub ring_entries: u32,
    /// io-wq workers per ring (bounded and unbounded), for io_uring writes.
    pub iowq_workers: u32,
    /// Fill the whole chunks around each request (default): the chunk is decompressed
    /// and verified anyway, and once its slot is cached the kernel sends no READ for the
    /// rest of it (see `bench/RESULTS.md`, reader_seq).
    pub read_around: bool,
    /// Check every chunk read against its BLAKE3 digest, as when it entered the node,
    /// instead of against the at-rest checksum the index keeps for it (the default; see
    /// the README's "Verification"). Chunks stored before the index kept checksums are
    /// checked against their digest either way.
    pub digest_on_read: bool,
    /// Directory of the store's pack files (`<root>/chunks`).
    pub packs_dir: PathBuf,
    /// Where chunks of lazily pulled blobs come from when the store lacks them. A piece
    /// that needs one is parked (its request goes on with its other pieces) until the
    /// fetcher answers in the thread's mailbox; without a fetcher such a chunk is
    /// missing (EIO).
    pub fetcher: Option<Arc<crate::remote::Fetcher>>,
}

impl EngineConfig {
    /// Defaults for a store whose packs live in `packs_dir`.
    pub fn new(packs_dir: PathBuf) -> EngineConfig {
        EngineConfig {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            pin: true,
            write_strategy: WriteStrategy::Uring,
            buffers_per_thread: 32,
            buffer_bytes: worker::HEADER_AREA_BYTES + crate::store::chunk::MAX_CHUNK_BYTES,
            max_requests_per_thread: 64,
            admit_per_turn: 4,
            ring_entries: 256,
            iowq_workers: 4,
            read_around: true,
            digest_on_read: false,
            packs_dir,
            fetcher: None,
        }
    }
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A configuration value is out of range.
    #[error("engine config: {0}")]
    Config(String),
    /// Setting up a thread (ring, buffers) failed.
    #[error("engine thread {thread}: {what}: {source}")]
    Setup {
        /// Thread index.
        thread: usize,
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Running engine threads. [`Engine::stop`] (or drop) ends them after their in-flight
/// requests complete.
pub struct Engine {
    stop_fd: OwnedFd,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<[ThreadCounters]>,
    front_name: &'static str,
    strategy: WriteStrategy,
    opens: Box<dyn Fn() -> BTreeMap<String, u64> + Send + Sync>,
}

impl Engine {
    /// Starts `cfg.threads` threads serving `front`.
    pub fn start<F: FrontEnd>(cfg: EngineConfig, front: Arc<F>) -> Result<Engine, EngineError> {
        if cfg.threads == 0 || cfg.threads > 1024 {
            return Err(EngineError::Config(format!("threads = {}", cfg.threads)));
        }
        if cfg.buffers_per_thread < 3 || cfg.buffers_per_thread > 4096 {
            return Err(EngineError::Config(format!(
                "buffers_per_thread = {} (3..=4096)",
                cfg.buffers_per_thread
            )));
        }
        if cfg.buffer_bytes < 2 * PAGE_BYTES as usize || cfg.buffer_bytes > (64 << 20) {
            return Err(EngineError::Config(format!(
                "buffer_bytes = {} (8 KiB..=64 MiB)",
                cfg.buffer_bytes
            )));
        }
        if cfg.max_requests_per_thread == 0
            || cfg.admit_per_turn == 0
            || cfg.ring_entries < 8
            || cfg.ring_entries > 4096
        {
            return Err(EngineError::Config(
                "max_requests_per_thread >= 1, admit_per_turn >= 1 and ring_entries in 8..=4096"
                    .into(),
            ));
        }
        // SAFETY: eventfd(2) with valid flags; the returned fd is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(EngineError::Setup {
                thread: 0,
                what: "eventfd",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh fd we own.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let counters: Arc<[ThreadCounters]> = (0..cfg.threads)
            .map(|_| ThreadCounters::default())
            .collect();
        let cfg = Arc::new(cfg);
        let cpus = online_cpus();
        let mut threads = Vec::with_capacity(cfg.threads);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(cfg.threads);
        for i in 0..cfg.threads {
            let (cfg, front, counters) = (cfg.clone(), front.clone(), counters.clone());
            let stop = stop_fd.as_raw_fd();
            let cpu = cpus.get(i % cpus.len().max(1)).copied();
            let ready_tx = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("dedupd-serve-{i}"))
                .spawn(move || {
                    if cfg.pin {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                    }
                    match worker::Worker::new(i, cfg, front, counters, stop) {
                        Ok(w) => {
                            let _ = ready_tx.send(Ok(()));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|source| EngineError::Setup {
                    thread: i,
                    what: "spawn",
                    source,
                })?;
            threads.push(handle);
        }
        let mut engine = Engine {
            stop_fd,
            threads,
            counters,
            front_name: front.name(),
            strategy: cfg.write_strategy,
            opens: {
                let front = front.clone();
                Box::new(move || front.opens_by_blob())
            },
        };
        for _ in 0..cfg.threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    engine.stop_threads();
                    return Err(e);
                }
                Err(_) => break,
            }
        }
        tracing::info!(
            threads = cfg.threads,
            write_strategy = cfg.write_strategy.name(),
            front_end = front.name(),
            read_around = cfg.read_around,
            "data plane started"
        );
        Ok(engine)
    }

    /// Summed counters of every thread.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = stats::snapshot(&self.counters);
        s.front_end = self.front_name.to_string();
        s.write_strategy = self.strategy.name().to_string();
        s.opens_by_blob = (self.opens)();
        s.distinct_blobs_opened = s.opens_by_blob.len() as u64;
        s
    }

    /// Raw per-thread counters.
    pub fn counters(&self) -> &[ThreadCounters] {
        &self.counters
    }

    /// The per-thread counters, shared: for readers on other threads (the metrics
    /// endpoint), which sum them when they need them.
    pub fn shared_counters(&self) -> Arc<[ThreadCounters]> {
        self.counters.clone()
    }

    fn stop_threads(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        let _ = unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
    }

    /// Stops the threads after their in-flight requests complete; returns final stats.
    pub fn stop(mut self) -> StatsSnapshot {
        self.stop_threads();
        self.stats()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Sum of the latency histograms' counts (for tests that wait for quiescence).
pub fn completed(counters: &[ThreadCounters]) -> u64 {
    counters
        .iter()
        .map(|t| t.reads_ok.load(Ordering::Relaxed) + t.reads_failed.load(Ordering::Relaxed))
        .sum()
}

fn online_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            tracing::warn!(cpu, "could not pin engine thread: {e}");
        }
    }
}
