//! The fetcher: chunks of lazily pulled blobs, fetched from the registry when a kernel
//! read needs them and the node does not hold them.
//!
//! A serving thread that meets such a chunk calls [`Fetcher::request`] and moves on; it
//! never waits on the network. The answer (where the chunk is now readable, in the
//! store's packs) arrives in the thread's [`Mailbox`], whose eventfd the thread polls
//! on its ring. Blocking callers (the `local` front end, tests) use [`Reply::Channel`].
//!
//! One dispatcher task owns the bookkeeping, so nothing here is locked per chunk:
//! - **single flight**: a chunk being fetched gains waiters instead of a second fetch;
//! - **local first**: a chunk fetched and not yet committed, or already in the store (a
//!   conversion or another image brought it), is answered at once;
//! - **windows**: a miss fetches the chunk and the missing chunks after it that are
//!   adjacent in the data blob, up to a window that starts at
//!   [`FetchConfig::min_window_bytes`] and doubles while a blob is read sequentially, up
//!   to [`FetchConfig::max_window_bytes`] (the network's answer to readahead: few round
//!   trips for a sequential read, little waste for a random one);
//! - **bounds**: at most [`FetchConfig::max_fetches`] range requests in flight (the
//!   registry client bounds each host too); the rest queue in order.
//!
//! A range request is retried with backoff while its error is retryable (5xx, a reset,
//! a short body, a registry that ignored Range) until [`FetchConfig::timeout`] after it
//! began; then its waiters fail (the kernel reader gets EIO) and the next read tries
//! again. Every record is verified whole ([`chunk::verify_foreign_record`]) before it is
//! appended to the store; a chunk that fails is fetched once more, then fails. Nothing
//! unverified is written anywhere. Verified records go to the store's fetch writer
//! ([`FetchWriter`]): readable at once, committed to the index in groups every
//! [`FetchConfig::commit_period`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::digest::ChunkDigest;
use crate::store::chunk::{self, ChunkLoc, MAX_CHUNK_BYTES};
use crate::store::{BlobTable, FetchWriter, Locator, RemoteSource, Store};

/// An error of one range request.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct RangeError {
    /// Worth trying again (5xx, reset, timeout, short body, Range ignored).
    pub retryable: bool,
    /// What happened, naming the registry and blob (never credentials).
    pub message: String,
}

/// The future of one range request.
pub type RangeFuture = Pin<Box<dyn Future<Output = Result<Bytes, RangeError>> + Send>>;

/// Where ranges of data blobs come from: the registry client, or a fake in tests.
pub trait RangeSource: Send + Sync + 'static {
    /// Exactly `len` bytes of data blob `blob` (a digest) of `source`, from `offset`.
    fn get_range(&self, source: &RemoteSource, blob: &str, offset: u64, len: u64) -> RangeFuture;
}

/// Fetcher settings.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Bytes fetched around a miss that does not continue a sequential read (at least
    /// the missing chunk).
    pub min_window_bytes: u64,
    /// Largest window, reached by doubling while a blob is read in order.
    pub max_window_bytes: u64,
    /// How long a read may wait for its chunk before it fails (EIO).
    pub timeout: Duration,
    /// Range requests in flight.
    pub max_fetches: usize,
    /// How often fetched chunks are committed to the store's index.
    pub commit_period: Duration,
    /// Threads of the fetcher's runtime (network and verification).
    pub threads: usize,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig {
            min_window_bytes: 256 << 10,
            max_window_bytes: 4 << 20,
            timeout: Duration::from_secs(30),
            max_fetches: 16,
            commit_period: Duration::from_millis(100),
            threads: 2,
        }
    }
}

/// Why a chunk could not be fetched. The reader gets EIO.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchFailure {
    /// The registry did not deliver in time.
    #[error("no answer from the registry within {0:?}: {1}")]
    Timeout(Duration, String),
    /// The bytes failed verification, twice.
    #[error("fetched bytes failed verification twice: {0}")]
    Corrupt(String),
    /// The registry refused, or a blob is not remote.
    #[error("{0}")]
    Registry(String),
    /// Keeping the chunk failed (disk full, I/O error).
    #[error("storing the fetched chunk: {0}")]
    Store(String),
    /// The fetcher stopped before the answer.
    #[error("the fetcher stopped")]
    Stopped,
}

/// Answers for one serving thread: a queue plus an eventfd it polls.
pub struct Mailbox {
    fd: OwnedFd,
    queue: Mutex<Vec<(u32, Result<ChunkLoc, FetchFailure>)>>,
}

impl Mailbox {
    /// A mailbox with a non-blocking eventfd.
    pub fn new() -> io::Result<Mailbox> {
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Mailbox {
            // SAFETY: `raw` is a fresh fd nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            queue: Mutex::new(Vec::new()),
        })
    }

    /// The eventfd: readable when answers are queued.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn post(&self, ticket: u32, result: Result<ChunkLoc, FetchFailure>) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((ticket, result));
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd; a full counter
        // (EAGAIN) still leaves it readable, which is all the reader needs.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Moves every queued answer into `out` (cleared first) and resets the eventfd.
    pub fn take(&self, out: &mut Vec<(u32, Result<ChunkLoc, FetchFailure>)>) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from our eventfd.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        out.clear();
        std::mem::swap(
            out,
            &mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()),
        );
    }
}

/// Where an answer goes.
pub enum Reply {
    /// To a serving thread's mailbox, under its ticket.
    Mailbox {
        /// The thread's mailbox.
        mailbox: Arc<Mailbox>,
        /// The thread's name for the wait.
        ticket: u32,
    },
    /// To a blocking caller.
    Channel(crossbeam_channel::Sender<Result<ChunkLoc, FetchFailure>>),
}

impl Reply {
    fn send(self, result: Result<ChunkLoc, FetchFailure>) {
        match self {
            Reply::Mailbox { mailbox, ticket } => mailbox.post(ticket, result),
            Reply::Channel(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// The fetcher's counters.
#[derive(Debug, Default)]
pub struct FetchStats {
    requests: AtomicU64,
    local: AtomicU64,
    joined: AtomicU64,
    range_requests: AtomicU64,
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    zero_chunks: AtomicU64,
    retries: AtomicU64,
    timeouts: AtomicU64,
    corrupt: AtomicU64,
    failed: AtomicU64,
    registry_errors: AtomicU64,
    store_errors: AtomicU64,
    /// Latency of range requests (each try), microseconds.
    latency: crate::serve::stats::AtomicHistogram,
}

/// A copy of [`FetchStats`].
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FetchStatsSnapshot {
    /// Chunks asked for by readers.
    pub requests: u64,
    /// Of those, found local (fetched before, or in the store).
    pub local: u64,
    /// Of those, joined a fetch in flight (single flight).
    pub joined: u64,
    /// Range requests sent (retries included).
    pub range_requests: u64,
    /// Chunks fetched and verified.
    pub chunks_fetched: u64,
    /// Body bytes received.
    pub bytes_fetched: u64,
    /// All-zero chunks made locally instead of fetched.
    pub zero_chunks: u64,
    /// Range requests retried.
    pub retries: u64,
    /// Chunks failed for want of an answer in time.
    pub timeouts: u64,
    /// Chunks that failed verification (each try counts).
    pub corrupt: u64,
    /// Chunks failed for any reason.
    pub failed: u64,
    /// Chunks failed because the registry refused (an error not worth retrying).
    #[serde(default)]
    pub registry_errors: u64,
    /// Chunks fetched and verified that could not be stored.
    #[serde(default)]
    pub store_errors: u64,
    /// Median range request latency (bucket upper bound), microseconds.
    #[serde(default)]
    pub latency_us_p50: u64,
    /// 99th percentile range request latency, microseconds.
    #[serde(default)]
    pub latency_us_p99: u64,
}

impl FetchStats {
    /// The counters now.
    pub fn snapshot(&self) -> FetchStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FetchStatsSnapshot {
            requests: g(&self.requests),
            local: g(&self.local),
            joined: g(&self.joined),
            range_requests: g(&self.range_requests),
            chunks_fetched: g(&self.chunks_fetched),
            bytes_fetched: g(&self.bytes_fetched),
            zero_chunks: g(&self.zero_chunks),
            retries: g(&self.retries),
            timeouts: g(&self.timeouts),
            corrupt: g(&self.corrupt),
            failed: g(&self.failed),
            registry_errors: g(&self.registry_errors),
            store_errors: g(&self.store_errors),
            latency_us_p50: crate::serve::stats::percentile(&self.latency.load().buckets, 0.5),
            latency_us_p99: crate::serve::stats::percentile(&self.latency.load().buckets, 0.99),
        }
    }

    /// The range request latency histogram.
    pub fn latency(&self) -> crate::serve::stats::LatencyHistogram {
        self.latency.load()
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

enum Msg {
    Request {
        table: Arc<BlobTable>,
        index: usize,
        reply: Reply,
    },
    Done(Vec<(ChunkDigest, Result<ChunkLoc, FetchFailure>)>),
    Committed(Vec<ChunkDigest>),
    Stop(crossbeam_channel::Sender<()>),
}

/// One chunk of a window: where it is in the data blob and what it must be.
#[derive(Clone, Copy, Debug)]
struct Piece {
    digest: ChunkDigest,
    raw_len: u32,
    offset: u64,
    len: u32,
}

/// One range request's worth of adjacent chunks of one data blob.
struct Window {
    source: RemoteSource,
    blob: String,
    pieces: Vec<Piece>,
}

/// What the fetch tasks share.
struct Ctx {
    store: Arc<Store>,
    source: Arc<dyn RangeSource>,
    cfg: FetchConfig,
    stats: Arc<FetchStats>,
    tx: mpsc::UnboundedSender<Msg>,
    writer: Mutex<Option<FetchWriter>>,
}

/// The running fetcher. Dropping it (or [`Fetcher::stop`]) fails what still waits,
/// commits what was fetched, and ends its threads.
pub struct Fetcher {
    tx: mpsc::UnboundedSender<Msg>,
    stats: Arc<FetchStats>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Fetcher {
    /// Starts the fetcher's runtime, dispatcher and committer.
    pub fn start(
        store: Arc<Store>,
        source: Arc<dyn RangeSource>,
        cfg: FetchConfig,
    ) -> io::Result<Arc<Fetcher>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads.max(1))
            .max_blocking_threads(cfg.threads.max(1) * 2)
            .thread_name("dedupd-fetch")
            .enable_all()
            .build()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(FetchStats::default());
        let ctx = Arc::new(Ctx {
            store,
            source,
            cfg,
            stats: stats.clone(),
            tx: tx.clone(),
            writer: Mutex::new(None),
        });
        runtime.spawn(Dispatcher::new(ctx.clone()).run(rx));
        runtime.spawn(commit_loop(ctx));
        Ok(Arc::new(Fetcher {
            tx,
            stats,
            runtime: Mutex::new(Some(runtime)),
        }))
    }

    /// Asks for entry `index` of `table` (a lazily pulled blob); the answer goes to
    /// `reply`. Never blocks.
    pub fn request(&self, table: Arc<BlobTable>, index: usize, reply: Reply) {
        if let Err(mpsc::error::SendError(Msg::Request { reply, .. })) =
            self.tx.send(Msg::Request {
                table,
                index,
                reply,
            })
        {
            reply.send(Err(FetchFailure::Stopped));
        }
    }

    /// [`Fetcher::request`] for a caller that can wait (not a serving thread).
    pub fn fetch_blocking(
        &self,
        table: Arc<BlobTable>,
        index: usize,
    ) -> Result<ChunkLoc, FetchFailure> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.request(table, index, Reply::Channel(tx));
        rx.recv().unwrap_or(Err(FetchFailure::Stopped))
    }

    /// The fetcher's runtime, for other registry work of the daemon (discovery,
    /// metadata); `None` once stopped.
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|rt| rt.handle().clone())
    }

    /// The counters.
    pub fn stats(&self) -> FetchStatsSnapshot {
        self.stats.snapshot()
    }

    /// Latency of its range requests (each try), microseconds.
    pub fn latency(&self) -> crate::serve::stats::LatencyHistogram {
        self.stats.latency()
    }

    /// Fails what still waits, commits what was fetched, and stops the threads.
    pub fn stop(&self) {
        let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Stop(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
        rt.shutdown_timeout(Duration::from_secs(5));
    }
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Per blob: where the last window ended and how large it was.
#[derive(Clone, Copy, Default)]
struct Sequence {
    next: usize,
    window: u64,
}

/// Most blobs whose read order is remembered (the map is cleared past it).
const MAX_SEQUENCES: usize = 4096;

struct Dispatcher {
    ctx: Arc<Ctx>,
    inflight: HashMap<ChunkDigest, Vec<Reply>>,
    landed: HashMap<ChunkDigest, ChunkLoc>,
    sequences: HashMap<String, Sequence>,
    queued: VecDeque<Window>,
    running: usize,
}

impl Dispatcher {
    fn new(ctx: Arc<Ctx>) -> Dispatcher {
        Dispatcher {
            ctx,
            inflight: HashMap::new(),
            landed: HashMap::new(),
            sequences: HashMap::new(),
            queued: VecDeque::new(),
            running: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Request {
                    table,
                    index,
                    reply,
                } => self.on_request(table, index, reply),
                Msg::Done(results) => {
                    self.running = self.running.saturating_sub(1);
                    for (d, r) in results {
                        if let Ok(loc) = r {
                            self.landed.insert(d, loc);
                        }
                        for w in self.inflight.remove(&d).unwrap_or_default() {
                            w.send(r.clone());
                        }
                    }
                }
                Msg::Committed(digests) => {
                    for d in digests {
                        self.landed.remove(&d);
                    }
                }
                Msg::Stop(done) => {
                    for (_, waiters) in self.inflight.drain() {
                        for w in waiters {
                            w.send(Err(FetchFailure::Stopped));
                        }
                    }
                    let ctx = self.ctx.clone();
                    let _ = tokio::task::spawn_blocking(move || commit_now(&ctx)).await;
                    let _ = done.send(());
                    return;
                }
            }
            self.start_fetches();
        }
    }

    fn on_request(&mut self, table: Arc<BlobTable>, index: usize, reply: Reply) {
        let stats = &self.ctx.stats;
        bump(&stats.requests, 1);
        let Some(e) = table.entries().get(index).copied() else {
            reply.send(Err(FetchFailure::Registry(format!(
                "blob {}: no chunk {index}",
                table.id()
            ))));
            return;
        };
        if let Some(loc) = self.landed.get(&e.digest) {
            bump(&stats.local, 1);
            reply.send(Ok(*loc));
            return;
        }
        if let Some(waiters) = self.inflight.get_mut(&e.digest) {
            bump(&stats.joined, 1);
            waiters.push(reply);
            return;
        }
        if let Some(loc) = self.stored(&e.digest, e.raw_len) {
            bump(&stats.local, 1);
            reply.send(Ok(loc));
            return;
        }
        let Some(remote) = table.remote() else {
            reply.send(Err(FetchFailure::Registry(format!(
                "chunk {} of blob {} is in neither the store nor a registry",
                e.digest,
                table.id()
            ))));
            return;
        };
        if e.digest == zero_digest(e.raw_len) {
            // All zeros: made here, verified by the same digest, no round trip.
            self.inflight.insert(e.digest, vec![reply]);
            let ctx = self.ctx.clone();
            tokio::task::spawn_blocking(move || {
                let r = store_zero_chunk(&ctx, e.digest, e.raw_len);
                let _ = ctx.tx.send(Msg::Done(vec![(e.digest, r)]));
            });
            self.running += 1;
            return;
        }
        let window = self.plan(&table, remote, index);
        for p in &window.pieces {
            self.inflight.insert(p.digest, Vec::new());
        }
        self.inflight
            .get_mut(&e.digest)
            .expect("the window starts with the requested chunk")
            .push(reply);
        self.queued.push_back(window);
    }

    /// The chunk's location if the store has it (a malformed row or a length that
    /// disagrees counts as absent: the chunk is fetched and verified instead).
    fn stored(&self, digest: &ChunkDigest, raw_len: u32) -> Option<ChunkLoc> {
        match self.ctx.store.locate(digest) {
            Ok(Some(loc)) if loc.raw_len == raw_len => Some(loc),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(chunk = %digest, "looking the chunk up in the store: {e}");
                None
            }
        }
    }

    /// The window around entry `index`: it, then the entries after it whose records
    /// follow on in the same data blob and that nobody holds or fetches, up to the
    /// blob's current window size.
    fn plan(
        &mut self,
        table: &Arc<BlobTable>,
        remote: &crate::store::RemoteBlob,
        index: usize,
    ) -> Window {
        let cfg = &self.ctx.cfg;
        if self.sequences.len() > MAX_SEQUENCES {
            self.sequences.clear();
        }
        let seq = self.sequences.entry(table.id().to_string()).or_default();
        let budget = if index == seq.next && seq.window > 0 {
            (seq.window * 2).min(cfg.max_window_bytes)
        } else {
            cfg.min_window_bytes
        };
        let entries = table.entries();
        let Locator::Record {
            data,
            offset: first,
            len,
        } = remote.locators[index];
        let mut pieces = vec![Piece {
            digest: entries[index].digest,
            raw_len: entries[index].raw_len,
            offset: first,
            len,
        }];
        let mut end = first + u64::from(len);
        // Bounded by the table's length.
        for k in index + 1..entries.len() {
            let Locator::Record {
                data: d,
                offset,
                len,
            } = remote.locators[k];
            let e = &entries[k];
            if end - first >= budget
                || d != data
                || offset != end
                || e.loc.is_some()
                || self.inflight.contains_key(&e.digest)
                || self.landed.contains_key(&e.digest)
                || pieces.iter().any(|p| p.digest == e.digest)
                || self.stored(&e.digest, e.raw_len).is_some()
            {
                break;
            }
            pieces.push(Piece {
                digest: e.digest,
                raw_len: e.raw_len,
                offset,
                len,
            });
            end += u64::from(len);
        }
        let seq = self.sequences.entry(table.id().to_string()).or_default();
        *seq = Sequence {
            next: index + pieces.len(),
            window: budget,
        };
        Window {
            source: remote.source.clone(),
            blob: remote.data_blobs[usize::from(data)].clone(),
            pieces,
        }
    }

    fn start_fetches(&mut self) {
        while self.running < self.ctx.cfg.max_fetches.max(1) {
            let Some(w) = self.queued.pop_front() else {
                return;
            };
            self.running += 1;
            tokio::spawn(fetch_window(self.ctx.clone(), w));
        }
    }
}

/// Fetches one window with retries and verification, and reports every chunk of it.
async fn fetch_window(ctx: Arc<Ctx>, w: Window) {
    let deadline = Instant::now() + ctx.cfg.timeout;
    let mut todo = w.pieces.clone();
    let mut results: Vec<(ChunkDigest, Result<ChunkLoc, FetchFailure>)> = Vec::new();
    let mut backoff = Duration::from_millis(50);
    let mut corrupt_tries = 0;
    // Bounded by the deadline (each pass waits, or ends the loop) and the verification
    // retry (once).
    while !todo.is_empty() {
        let start = todo[0].offset;
        let last = todo[todo.len() - 1];
        let len = last.offset + u64::from(last.len) - start;
        bump(&ctx.stats.range_requests, 1);
        let sent = std::time::Instant::now();
        let got = tokio::time::timeout_at(
            deadline,
            ctx.source.get_range(&w.source, &w.blob, start, len),
        )
        .await;
        let took = sent.elapsed();
        ctx.stats.latency.record_us(took.as_micros() as u64);
        tracing::debug!(
            blob = %w.blob,
            offset = start,
            len,
            chunks = todo.len(),
            ms = took.as_millis() as u64,
            ok = matches!(got, Ok(Ok(_))),
            "range request"
        );
        let fail = |why: FetchFailure, todo: &mut Vec<Piece>, results: &mut Vec<_>| {
            for p in todo.drain(..) {
                results.push((p.digest, Err(why.clone())));
            }
        };
        let bytes = match got {
            Err(_) => {
                bump(&ctx.stats.timeouts, todo.len() as u64);
                let what = format!(
                    "{}/{} {} bytes {start}+{len}",
                    w.source.registry, w.source.repository, w.blob
                );
                fail(
                    FetchFailure::Timeout(ctx.cfg.timeout, what),
                    &mut todo,
                    &mut results,
                );
                break;
            }
            Ok(Ok(b)) if b.len() as u64 == len => b,
            Ok(r) => {
                let e = r.err().unwrap_or_else(|| RangeError {
                    retryable: true,
                    message: format!("short body from {}: want {len} bytes", w.source.registry),
                });
                if e.retryable && Instant::now() + backoff < deadline {
                    bump(&ctx.stats.retries, 1);
                    tracing::debug!(blob = %w.blob, "range request failed ({e}); retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                if e.retryable {
                    bump(&ctx.stats.timeouts, todo.len() as u64);
                    fail(
                        FetchFailure::Timeout(ctx.cfg.timeout, e.message),
                        &mut todo,
                        &mut results,
                    );
                } else {
                    bump(&ctx.stats.registry_errors, todo.len() as u64);
                    fail(FetchFailure::Registry(e.message), &mut todo, &mut results);
                }
                break;
            }
        };
        bump(&ctx.stats.bytes_fetched, len);
        let pieces = std::mem::take(&mut todo);
        let c = ctx.clone();
        let checked =
            tokio::task::spawn_blocking(move || verify_and_store(&c, &pieces, start, &bytes))
                .await
                .unwrap_or_else(|_| Vec::new());
        let mut bad = Vec::new();
        for (p, r) in checked {
            match r {
                Ok(loc) => results.push((p.digest, Ok(loc))),
                Err(Verify::Corrupt(why)) => {
                    bump(&ctx.stats.corrupt, 1);
                    tracing::warn!(chunk = %p.digest, blob = %w.blob, offset = p.offset, "fetched chunk failed verification: {why}");
                    bad.push((p, why));
                }
                Err(Verify::Store(why)) => {
                    bump(&ctx.stats.store_errors, 1);
                    results.push((p.digest, Err(FetchFailure::Store(why))))
                }
            }
        }
        if bad.is_empty() {
            break;
        }
        corrupt_tries += 1;
        if corrupt_tries > 1 {
            for (p, why) in bad {
                results.push((p.digest, Err(FetchFailure::Corrupt(why))));
            }
            break;
        }
        todo = bad.into_iter().map(|(p, _)| p).collect();
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count() as u64;
    bump(&ctx.stats.failed, failed);
    let _ = ctx.tx.send(Msg::Done(results));
}

enum Verify {
    Corrupt(String),
    Store(String),
}

/// Verifies each piece's record in `bytes` (which start at data-blob offset `start`)
/// and appends the good ones to the store.
fn verify_and_store(
    ctx: &Ctx,
    pieces: &[Piece],
    start: u64,
    bytes: &[u8],
) -> Vec<(Piece, Result<ChunkLoc, Verify>)> {
    let mut out = vec![0u8; MAX_CHUNK_BYTES];
    pieces
        .iter()
        .map(|p| {
            let at = (p.offset - start) as usize;
            let record = &bytes[at..at + p.len as usize];
            let r = chunk::verify_foreign_record(record, p.raw_len, &p.digest, &mut out)
                .map_err(|e| Verify::Corrupt(e.to_string()))
                .and_then(|leaves| {
                    append(ctx, record, p.digest, p.raw_len, leaves).map_err(Verify::Store)
                });
            if r.is_ok() {
                bump(&ctx.stats.chunks_fetched, 1);
            }
            (*p, r)
        })
        .collect()
}

fn append(
    ctx: &Ctx,
    record: &[u8],
    digest: ChunkDigest,
    raw_len: u32,
    leaves: Option<crate::digest::Leaves>,
) -> Result<ChunkLoc, String> {
    let mut w = ctx.writer.lock().unwrap_or_else(|p| p.into_inner());
    if w.is_none() {
        *w = Some(ctx.store.fetch_writer().map_err(|e| e.to_string())?);
    }
    let w = w.as_mut().expect("set above");
    w.append(record, digest, raw_len, leaves)
        .map_err(|e| e.to_string())
}

fn store_zero_chunk(
    ctx: &Ctx,
    digest: ChunkDigest,
    raw_len: u32,
) -> Result<ChunkLoc, FetchFailure> {
    let zeros = vec![0u8; raw_len as usize];
    let (d, leaves) = crate::digest::Leaves::digest_of(&zeros);
    debug_assert_eq!(d, digest);
    let mut record = Vec::new();
    chunk::encode_record(&zeros, &d, &mut record);
    let r = append(ctx, &record, d, raw_len, leaves).map_err(FetchFailure::Store);
    if r.is_ok() {
        bump(&ctx.stats.zero_chunks, 1);
    }
    r
}

/// The digest of `len` zero bytes (cached: a few lengths recur).
fn zero_digest(len: u32) -> ChunkDigest {
    static CACHE: Mutex<Vec<(u32, ChunkDigest)>> = Mutex::new(Vec::new());
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, d)) = c.iter().find(|(l, _)| *l == len) {
        return *d;
    }
    let d = ChunkDigest::of(&vec![0u8; len as usize]);
    if c.len() >= 64 {
        c.clear();
    }
    c.push((len, d));
    d
}

/// Commits what the writer holds and tells the dispatcher which chunks the index now
/// answers for.
fn commit_now(ctx: &Ctx) {
    let mut w = ctx.writer.lock().unwrap_or_else(|p| p.into_inner());
    let Some(w) = w.as_mut() else { return };
    if w.pending() == 0 {
        return;
    }
    match w.commit() {
        Ok(done) => {
            let _ = ctx.tx.send(Msg::Committed(done.digests));
        }
        Err(e) => tracing::warn!("committing fetched chunks: {e}"),
    }
}

async fn commit_loop(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.cfg.commit_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.tx.is_closed() {
            return;
        }
        let c = ctx.clone();
        let _ = tokio::task::spawn_blocking(move || commit_now(&c)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::digest::Leaves;
    use crate::store::blob::{blob_id, BlobBuilder};
    use crate::store::{
        LayerRecord, RemoteBlob, RemoteLayer, RemoteLayerCommit, DEFAULT_CHUNK_BYTES,
    };

    /// Serves data blobs from memory, with faults.
    #[derive(Default)]
    struct Fake {
        blobs: Mutex<HashMap<String, Vec<u8>>>,
        /// 0: serve; 1: flip a byte in every answer; 2: flip only the first answer;
        /// 3: never answer; 4: 503 (retryable) for the first two answers.
        mode: AtomicU32,
        calls: AtomicU32,
        ranges: Mutex<Vec<(u64, u64)>>,
    }

    impl RangeSource for Fake {
        fn get_range(&self, _s: &RemoteSource, blob: &str, offset: u64, len: u64) -> RangeFuture {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.ranges.lock().unwrap().push((offset, len));
            let mode = self.mode.load(Ordering::SeqCst);
            let data = self.blobs.lock().unwrap().get(blob).cloned();
            Box::pin(async move {
                if mode == 3 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                if mode == 4 && n < 2 {
                    return Err(RangeError {
                        retryable: true,
                        message: "503".into(),
                    });
                }
                let data = data.ok_or(RangeError {
                    retryable: false,
                    message: "404".into(),
                })?;
                let mut b = data[offset as usize..(offset + len) as usize].to_vec();
                if mode == 1 || (mode == 2 && n == 0) {
                    let mid = b.len() / 2;
                    b[mid] ^= 0x40;
                }
                Ok(Bytes::from(b))
            })
        }
    }

    fn chunk_bytes(n: u32, len: usize) -> Vec<u8> {
        let mut x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A store with one lazily pulled blob of `chunks`, published in order in one data
    /// blob that `fake` serves. Returns the blob's table.
    fn setup(
        dir: &std::path::Path,
        chunks: &[Vec<u8>],
        fake: &Fake,
    ) -> (Arc<Store>, Arc<BlobTable>) {
        let store = Arc::new(Store::open(dir).unwrap());
        let mut b = BlobBuilder::new();
        let mut data = Vec::new();
        let mut locators = Vec::new();
        for c in chunks {
            let (d, _) = Leaves::digest_of(c);
            b.add(d, c.len() as u32);
            if locators.len() < b.len() {
                let mut rec = Vec::new();
                chunk::encode_record(c, &d, &mut rec);
                locators.push(Locator::Record {
                    data: 0,
                    offset: data.len() as u64,
                    len: rec.len() as u32,
                });
                data.extend_from_slice(&rec);
            }
        }
        fake.blobs
            .lock()
            .unwrap()
            .insert("sha256:data".into(), data);
        let id = blob_id(&b.encode());
        let tmp = dir.join("layers").join("x.tmp");
        std::fs::write(&tmp, b"image").unwrap();
        let source = RemoteSource {
            registry: "fake".into(),
            repository: "r".into(),
        };
        store
            .commit_remote_layer(RemoteLayerCommit {
                record: LayerRecord {
                    diff_id: "sha256:aa".into(),
                    digests: vec!["sha256:bb".into()],
                    blobs: vec![id.clone()],
                    chunk_bytes: DEFAULT_CHUNK_BYTES,
                    image_bytes: 5,
                    files: 1,
                    chunks: chunks.len() as u64,
                    new_chunks: 0,
                    logical_bytes: 0,
                    stored_bytes: 0,
                    remote: Some(RemoteLayer {
                        source: source.clone(),
                        artifact: "sha256:cc".into(),
                    }),
                },
                image_tmp: &tmp,
                blobs: vec![(
                    id.clone(),
                    b.entries().to_vec(),
                    RemoteBlob {
                        source,
                        data_blobs: vec!["sha256:data".into()],
                        locators,
                    },
                )],
            })
            .unwrap();
        let table = Arc::new(store.blob_table(&id).unwrap().unwrap());
        (store, table)
    }

    fn cfg() -> FetchConfig {
        FetchConfig {
            min_window_bytes: 64 << 10,
            max_window_bytes: 1 << 20,
            timeout: Duration::from_secs(2),
            commit_period: Duration::from_millis(20),
            ..FetchConfig::default()
        }
    }

    fn read(store: &Store, loc: &ChunkLoc, digest: &ChunkDigest) -> Vec<u8> {
        let f = std::fs::File::open(store.pack_path(loc.pack)).unwrap();
        let mut rec = vec![0u8; loc.record_len()];
        crate::store::read_full_at(&f, &mut rec, loc.offset).unwrap();
        let mut out = vec![0u8; loc.raw_len as usize];
        chunk::decode_record(&rec, loc, digest, &mut out).unwrap();
        out
    }

    #[test]
    fn concurrent_readers_of_one_chunk_cause_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let chunks: Vec<Vec<u8>> = (0..4).map(|n| chunk_bytes(n, 65536)).collect();
        let (store, table) = setup(dir.path(), &chunks, &fake);
        // A window of one chunk: only chunk 2 is fetched.
        let f = Fetcher::start(
            store.clone(),
            fake.clone(),
            FetchConfig {
                min_window_bytes: 1,
                ..cfg()
            },
        )
        .unwrap();
        let rx: Vec<_> = (0..8)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::bounded(1);
                f.request(table.clone(), 2, Reply::Channel(tx));
                rx
            })
            .collect();
        for r in rx {
            let loc = r.recv().unwrap().unwrap();
            assert_eq!(read(&store, &loc, &table.entries()[2].digest), chunks[2]);
        }
        let s = f.stats();
        assert_eq!((s.range_requests, s.chunks_fetched), (1, 1), "{s:?}");
        assert_eq!(s.requests, 8);
        assert_eq!(s.joined + s.local, 7, "{s:?}");
        // Committed soon: then the store answers, and nothing more is fetched.
        f.stop();
        assert!(store.locate(&table.entries()[2].digest).unwrap().is_some());
        let f = Fetcher::start(store.clone(), fake.clone(), cfg()).unwrap();
        f.fetch_blocking(table.clone(), 2).unwrap();
        assert_eq!(f.stats().range_requests, 0);
    }

    #[test]
    fn sequential_reads_fetch_growing_windows_of_adjacent_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let chunks: Vec<Vec<u8>> = (0..40).map(|n| chunk_bytes(n, 65536)).collect();
        let (store, table) = setup(dir.path(), &chunks, &fake);
        let f = Fetcher::start(store.clone(), fake.clone(), cfg()).unwrap();
        for i in 0..40 {
            let loc = f.fetch_blocking(table.clone(), i).unwrap();
            assert_eq!(
                read(&store, &loc, &table.entries()[i].digest),
                chunks[i],
                "chunk {i}"
            );
        }
        let lens: Vec<u64> = fake
            .ranges
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.1 / 65584)
            .collect();
        // One chunk, then doubling windows up to 1 MiB (16 chunks).
        assert_eq!(lens, [1, 2, 4, 8, 16, 9], "{lens:?}");
        assert_eq!(f.stats().chunks_fetched, 40);
    }

    #[test]
    fn bytes_that_fail_verification_are_fetched_once_more_then_fail() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let chunks: Vec<Vec<u8>> = (0..3).map(|n| chunk_bytes(n, 65536)).collect();
        let (store, table) = setup(dir.path(), &chunks, &fake);
        let f = Fetcher::start(
            store.clone(),
            fake.clone(),
            FetchConfig {
                min_window_bytes: 1,
                ..cfg()
            },
        )
        .unwrap();
        fake.mode.store(2, Ordering::SeqCst); // the first answer is damaged
        let loc = f.fetch_blocking(table.clone(), 0).unwrap();
        assert_eq!(read(&store, &loc, &table.entries()[0].digest), chunks[0]);
        assert_eq!(f.stats().corrupt, 1);
        fake.mode.store(1, Ordering::SeqCst); // every answer is damaged
        let err = f.fetch_blocking(table.clone(), 1).unwrap_err();
        assert!(matches!(err, FetchFailure::Corrupt(_)), "{err}");
        assert_eq!(f.stats().corrupt, 3);
        // Nothing of the damaged chunk reached the store.
        f.stop();
        assert!(store.locate(&table.entries()[1].digest).unwrap().is_none());
        // Fixed: the next read succeeds.
        fake.mode.store(0, Ordering::SeqCst);
        let f = Fetcher::start(store.clone(), fake.clone(), cfg()).unwrap();
        let loc = f.fetch_blocking(table.clone(), 1).unwrap();
        assert_eq!(read(&store, &loc, &table.entries()[1].digest), chunks[1]);
    }

    #[test]
    fn a_silent_registry_fails_readers_within_the_timeout_and_retryable_errors_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let chunks: Vec<Vec<u8>> = (0..3).map(|n| chunk_bytes(n, 65536)).collect();
        let (store, table) = setup(dir.path(), &chunks, &fake);
        let f = Fetcher::start(
            store.clone(),
            fake.clone(),
            FetchConfig {
                min_window_bytes: 1,
                timeout: Duration::from_millis(500),
                ..cfg()
            },
        )
        .unwrap();
        fake.mode.store(3, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let err = f.fetch_blocking(table.clone(), 0).unwrap_err();
        assert!(matches!(err, FetchFailure::Timeout(..)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        fake.mode.store(4, Ordering::SeqCst);
        fake.calls.store(0, Ordering::SeqCst);
        let loc = f.fetch_blocking(table.clone(), 0).unwrap();
        assert_eq!(read(&store, &loc, &table.entries()[0].digest), chunks[0]);
        assert_eq!(f.stats().retries, 2);
    }

    #[test]
    fn zero_chunks_are_made_locally() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let chunks = vec![vec![0u8; 65536], chunk_bytes(1, 100)];
        let (store, table) = setup(dir.path(), &chunks, &fake);
        let f = Fetcher::start(store.clone(), fake.clone(), cfg()).unwrap();
        let loc = f.fetch_blocking(table.clone(), 0).unwrap();
        assert_eq!(read(&store, &loc, &table.entries()[0].digest), chunks[0]);
        let s = f.stats();
        assert_eq!((s.zero_chunks, s.range_requests), (1, 0), "{s:?}");
    }
}
