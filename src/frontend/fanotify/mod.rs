//! The fanotify pre-content front end: EROFS file-backed mounts over sparse blob files
//! that are filled on `FAN_PRE_ACCESS` events (Linux 6.14+). Its failover lives here too:
//! the holder that keeps the group ([`holder`]) and the journal a successor recovers
//! from ([`journal`]); its [`mounter`] is the snapshotter's way in.
//!
//! Order of things, which matters:
//! 1. A holder process owns the group ([`holder`]); the daemon gets it over a socket.
//! 2. Each data blob gets a sparse file `<cache>/blobs/<blob id>` of the blob's size on
//!    ext4, xfs or btrfs, a page map rebuilt from SEEK_DATA/SEEK_HOLE, and a
//!    `FAN_PRE_ACCESS` mark if it is not complete. The mark comes *before* any mount opens
//!    the file: a file opened while no pre-content watcher exists never raises events.
//! 3. Events left by a dead daemon are answered ([`journal`]) before any new one is read.
//! 4. The serving engine ([`crate::serve::Engine`], the same one cachefiles uses) reads
//!    events in batches; each is journaled, then its missing whole chunks are filled
//!    through the event's fd by the engine's workers (registered buffers, verified by
//!    `decode_record`, io_uring or sync writes), and it is answered `FAN_ALLOW`, or
//!    `FAN_DENY_ERRNO(EIO)` on any failure, before its fd is closed. A range that is
//!    already filled is allowed at once. A blob that becomes complete is unmarked.
//!    See [`engine`].
//! 5. Only then are layers mounted:
//!    `mount -t erofs -o ro,device=<cache>/blobs/<blob id> <root>/layers/<diff_id hex>.erofs MNT`
//!    (with mount(2) directly; util-linux `mount` would put a loop device under the
//!    image). See [`mount`].
//!
//! On shutdown the mounts go first, then the workers, then the group (the holder is
//! told `BYE`). If a mount cannot be removed the holder keeps the group and, after its
//! grace period, fails reads with EIO.
//!
//! # Crash safety
//! The kernel allows every pending event when a group's last fd closes, and a hole then
//! reads as zeros. So the group lives in the holder ([`holder`]), and:
//! - a pending permission event survives the death of the process that read it; the
//!   kernel matches a response by the event's fd *number* alone, whoever writes it
//!   (checked on this kernel by the `pending_events_outlive_their_reader...` test);
//! - workers journal every event they read (fd number, blob, range) in memory shared
//!   with the holder ([`journal`]) before filling, and clear the entry after the
//!   response and before closing the fd ([`respond`]);
//! - a successor answers journaled events first (filling through the blob's kept write
//!   fd, a dup of an earlier event fd on which writes raise no events), then denies with
//!   EIO whatever else is pending below the fd limit (events read but not journaled),
//!   and only then reads new events, so no old fd number can be taken for a new one;
//! - with no successor within the grace period the holder answers everything with EIO;
//! - if the holder dies, the daemon starts a replacement that adopts the group.
//!
//! # Fills go through the serving engine
//! [`engine`] implements [`crate::serve::FrontEnd`] for this front end:
//! - `poll_fd`: the group fd (non-blocking).
//! - `next`: per engine thread (`Local`), read at most [`EVENTS_PER_READ`] events (never
//!   more than the thread's free journal slots) into a local queue, journal each one at
//!   once (fd number, blob, range; see [`journal`]), then hand out one per call. An
//!   event whose range is filled already is answered inside `next`, batched through the
//!   thread's [`respond::Responder`] io_uring; otherwise `Next::Fill` with
//!   `source = Chunked(table)`, `offset`/`len` = the first run of its missing chunks
//!   that no request in flight writes (claimed for the request, so that the page map is
//!   set exactly for what the engine wrote), `target` = the event fd, and a token
//!   carrying the event. An event whose missing chunks are all claimed by requests in
//!   flight (a prefetch, another reader) is parked on the blob instead of filling them
//!   again.
//! - `complete`: on `Ok`, set the page-map bits, unmark the blob if complete, release
//!   the claim and answer the parked events it completes (FAN_ALLOW, from whichever
//!   thread completed it); an event's own request that failed is answered
//!   FAN_DENY_ERRNO(EIO), and parked events that still need a chunk nobody writes are
//!   redriven into fills of their own (so a corrupt chunk fails only the events that
//!   touch it). Every answer: response, journal slot cleared, fd closed (by the last
//!   reference: the engine drops the request's after `complete` returns), the order
//!   recovery relies on.
//! - Journal slots per engine thread: [`MAX_FILLS_PER_THREAD`] in flight plus one read
//!   batch queued, so at most [`MAX_WORKERS`] threads. A slot freed by another thread
//!   (a parked event answered there) goes back to its owner.
//! - Prefetch: a sequential event queues the next [`PREFETCH_BYTES`] in pieces of
//!   [`PREFETCH_PIECE_BYTES`] on a queue shared by the engine threads and wakes them
//!   ([`crate::serve::FrontEnd::wake_fd`]); a thread with no event to read takes a
//!   piece and fills it into the blob's kept write fd (no event, no answer), so both
//!   cores fill ahead of the reader.
//! - Before the engine starts: holder attach, blob files, marks and recovery; after it
//!   starts: priming the write fds, then mounts. Recovery (and events still queued when
//!   the engine stops) fill synchronously with [`fill::PackFiller`], which uses the same
//!   verification step (`store::chunk::decode_record`) as the engine's workers.

pub mod blobfile;
pub mod cli;
mod engine;
pub mod event;
pub mod fill;
pub mod holder;
pub mod import;
pub mod journal;
pub mod mount;
pub mod mounter;
pub mod respond;
pub mod sys;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde::Serialize;

use self::blobfile::{PageMap, PAGE_BYTES};
use self::fill::{Filler, PackFiller, Packs};
use self::journal::{Journal, SLOTS};
use crate::serve::{Engine, EngineConfig};
use crate::store::{BlobSource, BlobTable, Registry};

/// Events read per `read(2)`: the buffer holds at most this many (an event is at least
/// 24 bytes), and each worker owns this many journal slots.
pub const EVENTS_PER_READ: usize = 64;
/// Most workers (engine threads): journal slots / slots per thread.
pub const MAX_WORKERS: usize = SLOTS / SLOTS_PER_THREAD;
/// fd numbers a daemon may use; recovery probes every number below it.
pub const FD_LIMIT: u64 = 16384;

/// Errors of the fanotify front end.
#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The cache directory is on a filesystem that cannot back lazy blobs.
    #[error("cache directory {dir} is on {fs}; fanotify blob files need ext4, xfs or btrfs")]
    UnsupportedFs {
        /// The directory.
        dir: PathBuf,
        /// Its filesystem.
        fs: String,
    },
    /// A kernel call failed.
    #[error("{what}: {source}")]
    Kernel {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The holder could not be reached or started.
    #[error("fanotify holder at {socket}: {reason}")]
    Holder {
        /// Its socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Too many workers for the journal.
    #[error("{0} workers requested; at most {MAX_WORKERS}")]
    TooManyWorkers(usize),
}

/// Why this kernel or filesystem cannot run the fanotify front end.
#[derive(Debug, thiserror::Error)]
#[error("fanotify pre-content events unavailable: {0}")]
pub struct Reason(pub String);

/// Checks that this kernel supports `FAN_PRE_ACCESS` marks on files of `cache_dir`'s
/// filesystem (creates and removes a probe file there). Used for automatic front-end
/// selection.
pub fn probe(cache_dir: &Path) -> Result<(), Reason> {
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| Reason(format!("{}: {e}", cache_dir.display())))?;
    blobfile::check_cache_fs(cache_dir).map_err(|e| Reason(e.to_string()))?;
    let group = sys::init_group().map_err(|e| {
        Reason(format!(
            "fanotify_init(FAN_CLASS_PRE_CONTENT): {e} (needs root and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"
        ))
    })?;
    let path = cache_dir.join(format!(".probe-{}", std::process::id()));
    let f = File::create(&path).map_err(|e| Reason(format!("{}: {e}", path.display())))?;
    let r = sys::mark(
        group.as_fd(),
        sys::FAN_MARK_ADD,
        sys::FAN_PRE_ACCESS,
        f.as_fd(),
    )
    .map_err(|e| {
        Reason(format!(
            "fanotify_mark(FAN_PRE_ACCESS) on {}: {e} (needs Linux 6.14+)",
            path.display()
        ))
    });
    let _ = std::fs::remove_file(&path);
    r
}

/// Settings of the front end.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory of the blob files and the holder socket, on ext4/xfs/btrfs
    /// (conventionally `<root>/fanotify`).
    pub cache_dir: PathBuf,
    /// Serving-engine threads reading events and filling (1..=[`MAX_WORKERS`]).
    pub workers: usize,
    /// How long the holder waits for a successor before failing closed.
    pub grace: Duration,
    /// The `dedupd` binary, to start the holder (`dedupd fanotify-holder`).
    pub holder_exe: PathBuf,
    /// Unmark blobs once complete (always, except to measure the cost of events on
    /// filled ranges).
    pub unmark_complete: bool,
    /// Write the responses of events needing no fill through a per-thread io_uring,
    /// batched (else write(2) each). Responses after a fill are written at completion.
    pub uring_responses: bool,
    /// Fill ahead of sequential readers ([`PREFETCH_BYTES`]), as engine fill requests.
    pub prefetch: bool,
    /// The store's pack directory (`<root>/chunks`).
    pub packs_dir: PathBuf,
    /// See [`EngineConfig::digest_on_read`].
    pub digest_on_read: bool,
    /// Where chunks of lazily pulled blobs come from (see [`EngineConfig::fetcher`]).
    pub fetcher: Option<Arc<crate::remote::Fetcher>>,
}

/// Counters, as `serve-fanotify` prints them on exit.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// Permission events read.
    pub events: u64,
    /// Answered FAN_ALLOW.
    pub allowed: u64,
    /// Answered FAN_DENY_ERRNO(EIO).
    pub denied: u64,
    /// Allowed without touching the store (range already filled).
    pub cached: u64,
    /// Chunks read from the store.
    pub chunks_fetched: u64,
    /// Bytes written into blob files.
    pub bytes_filled: u64,
    /// Blobs unmarked because they became complete.
    pub unmarked: u64,
    /// Events left by a previous daemon, answered from the journal.
    pub recovered_journaled: u64,
    /// Events left by a previous daemon without a journal entry, denied.
    pub recovered_orphans: u64,
    /// Times an event waited for a fill already in flight instead of filling again.
    pub parked: u64,
    /// True when this daemon continued a group (the holder outlived a previous daemon).
    pub continued: bool,
    /// Of `bytes_filled`, those filled ahead of a sequential reader (prefetch).
    #[serde(default)]
    pub prefetch_bytes: u64,
    /// The serving engine's own counters, latency histogram and slowest requests.
    #[serde(skip)]
    pub engine: crate::serve::StatsSnapshot,
}

impl Stats {
    /// Adds the counters of a front end that stopped (a restart over new blobs) to
    /// these, so that totals never go back; the slowest requests are merged.
    pub fn accumulate(&mut self, past: &Stats) {
        self.events += past.events;
        self.allowed += past.allowed;
        self.denied += past.denied;
        self.cached += past.cached;
        self.chunks_fetched += past.chunks_fetched;
        self.bytes_filled += past.bytes_filled;
        self.unmarked += past.unmarked;
        self.recovered_journaled += past.recovered_journaled;
        self.recovered_orphans += past.recovered_orphans;
        self.parked += past.parked;
        self.prefetch_bytes += past.prefetch_bytes;
        let (e, p) = (&mut self.engine, &past.engine);
        e.reads += p.reads;
        e.reads_ok += p.reads_ok;
        e.reads_failed += p.reads_failed;
        e.bytes_written += p.bytes_written;
        e.chunks_fetched += p.chunks_fetched;
        e.chunk_errors += p.chunk_errors;
        e.write_errors += p.write_errors;
        e.fetch_waits += p.fetch_waits;
        e.refetches += p.refetches;
        e.fetch_errors += p.fetch_errors;
        e.source_errors += p.source_errors;
        e.served_from_store_bytes += p.served_from_store_bytes;
        e.served_from_registry_bytes += p.served_from_registry_bytes;
        e.latency.add(&p.latency);
        e.slowest.extend(p.slowest.iter().cloned());
        e.slowest.sort_by_key(|r| std::cmp::Reverse(r.total_us));
        e.slowest.truncate(crate::serve::stats::SLOW_KEPT);
    }
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    cached: AtomicU64,
    bytes_filled: AtomicU64,
    unmarked: AtomicU64,
    recovered_journaled: AtomicU64,
    recovered_orphans: AtomicU64,
    parked: AtomicU64,
    prefetched: AtomicU64,
}

/// One data blob being served.
struct Blob {
    id: String,
    id_bin: [u8; 32],
    table: Arc<BlobTable>,
    path: PathBuf,
    /// Kept open for SEEK_DATA and for (un)marking.
    file: File,
    map: PageMap,
    marked: AtomicBool,
    /// A write fd on which writes raise no events (a dup of an event fd), kept by the
    /// holder for successors, which need it to fill ranges left in the journal.
    writer: OnceLock<Arc<OwnedFd>>,
    /// End of the last event range: an event starting there is sequential.
    next_seq: AtomicU64,
    /// End of the last range queued as a prefetch.
    prefetched_to: AtomicU64,
    /// Ranges fill requests in flight are writing, and events parked on them.
    claims: Mutex<engine::Claims>,
    /// Set while [`FanotifyFrontEnd::prime`] reads the file for a write fd: that read
    /// is allowed unfilled (see `engine::Shared::classify`).
    priming: AtomicBool,
}

/// How far ahead of a sequential reader the prefetcher fills.
pub const PREFETCH_BYTES: u64 = 4 << 20;
/// Size of one prefetch request: the window is cut into pieces that either engine
/// thread takes, so that both cores fill ahead of a reader.
pub const PREFETCH_PIECE_BYTES: u64 = 512 << 10;
/// Prefetch pieces queued at most (beyond it prefetch is dropped: it is only a hint).
const PREFETCH_QUEUE: usize = 64;
/// Fill requests in flight per engine thread.
pub const MAX_FILLS_PER_THREAD: usize = 64;
/// Journal slots of one engine thread: one read batch queued plus every fill in flight.
const SLOTS_PER_THREAD: usize = EVENTS_PER_READ + MAX_FILLS_PER_THREAD;

struct Shared {
    group: OwnedFd,
    journal: Journal,
    blobs: Vec<Blob>,
    by_inode: HashMap<(u64, u64), usize>,
    by_id: HashMap<[u8; 32], usize>,
    holder: Mutex<OwnedFd>,
    holder_alive: AtomicBool,
    stop: OwnedFd,
    packs: Arc<Packs>,
    counters: Counters,
    continued: bool,
    unmark_complete: bool,
    uring_responses: bool,
    /// Fill ahead of sequential readers.
    prefetch: bool,
    /// Ourselves, for the engine threads' [`engine::Local`]s.
    me: std::sync::Weak<Shared>,
    /// Engine threads that took their journal slots so far.
    threads_started: std::sync::atomic::AtomicUsize,
    /// Written to wake the engine threads (work queued below): never read back.
    wake: OwnedFd,
    /// Prefetch pieces `(blob, offset, len)`, taken by whichever engine thread is free.
    prefetch_q: Mutex<std::collections::VecDeque<(usize, u64, u64)>>,
    /// Events handed back for a fill of their own (a request they waited for failed).
    redrive: Mutex<std::collections::VecDeque<engine::Waiter>>,
    /// Journal slots freed by another thread, per owning thread.
    returned: Vec<Mutex<Vec<usize>>>,
}

/// The running front end.
pub struct FanotifyFrontEnd {
    shared: Arc<Shared>,
    engine: Option<Engine>,
    /// The engine's counters, once it stopped.
    engine_final: crate::serve::StatsSnapshot,
    workers: Vec<JoinHandle<()>>,
}

fn kerr(what: impl Into<String>) -> impl FnOnce(io::Error) -> FanotifyError {
    let what = what.into();
    move |source| FanotifyError::Kernel { what, source }
}

/// Connects to the holder of `cache_dir`, starting one if none listens.
fn attach(opts: &Options) -> Result<holder::Attached, FanotifyError> {
    let socket = opts.cache_dir.join("holder.sock");
    let herr = |reason: String| FanotifyError::Holder {
        socket: socket.clone(),
        reason,
    };
    // Bounded: a holder that accepts but cannot hand over (a replacement whose adopting
    // daemon died) closes the connection; the next attempt starts a fresh one.
    let mut last = None;
    for _ in 0..3 {
        let conn = match holder::connect(&socket) {
            Ok(c) => c,
            Err(_) => match spawn_holder(opts, false) {
                Ok(c) => c,
                Err(e) => {
                    // A holder told BYE a moment ago may still hold the lock.
                    tracing::warn!("starting a fanotify holder failed ({e}); retrying");
                    last = Some(io::Error::other(e.to_string()));
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        match holder::receive(conn) {
            Ok(a) => return Ok(a),
            Err(e) => {
                tracing::warn!("fanotify holder hand-over failed ({e}); retrying");
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(herr(last.map(|e| e.to_string()).unwrap_or_default()))
}

/// Starts `dedupd fanotify-holder` (with `adopt`, as a replacement that takes the
/// group from us) and connects to it.
fn spawn_holder(opts: &Options, adopt: bool) -> Result<OwnedFd, FanotifyError> {
    let socket = opts.cache_dir.join("holder.sock");
    let herr = |reason: String| FanotifyError::Holder {
        socket: socket.clone(),
        reason,
    };
    let log = opts.cache_dir.join("holder.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| herr(format!("{}: {e}", log.display())))?;
    let mut cmd = Command::new(&opts.holder_exe);
    cmd.arg("fanotify-holder")
        .arg("--socket")
        .arg(&socket)
        .arg("--grace-ms")
        .arg(opts.grace.as_millis().to_string());
    if adopt {
        cmd.arg("--adopt");
        // The dead holder's socket file is stale; the new holder binds a fresh one.
        let _ = std::fs::remove_file(&socket);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a signal to the daemon's group spares it.
        .process_group(0)
        .spawn()
        .map_err(|e| herr(format!("starting {}: {e}", opts.holder_exe.display())))?;
    let _ = std::fs::write(opts.cache_dir.join("holder.pid"), child.id().to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    // Not waited for once it listens: it must outlive us (dropping `child` leaves it).
    loop {
        match holder::connect(&socket) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(herr(format!("did not come up: {e}")))
            }
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    // E.g. it found the lock still held by a holder on its way out.
                    return Err(herr(format!("exited ({status}) before listening: {e}")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Keeps fd numbers of this process below [`FD_LIMIT`] so that recovery can probe them.
fn cap_fd_limit() -> Result<u64, FanotifyError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(kerr("getrlimit(RLIMIT_NOFILE)")(io::Error::last_os_error()));
    }
    let want = lim.rlim_cur.clamp(1024, FD_LIMIT).min(lim.rlim_max);
    if want != lim.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } < 0 {
            return Err(kerr("setrlimit(RLIMIT_NOFILE)")(io::Error::last_os_error()));
        }
    }
    Ok(want)
}

impl FanotifyFrontEnd {
    /// Attaches to (or starts) the holder, prepares and marks every data blob of
    /// `registry`, answers whatever a previous daemon left pending, and only then starts
    /// the serving engine ([`crate::serve::Engine`], `opts.workers` threads) on the
    /// group. Mount layers only after this returns.
    pub fn start(registry: &Registry, opts: &Options) -> Result<FanotifyFrontEnd, FanotifyError> {
        if opts.workers == 0 || opts.workers > MAX_WORKERS {
            return Err(FanotifyError::TooManyWorkers(opts.workers));
        }
        std::fs::create_dir_all(&opts.cache_dir).map_err(|source| FanotifyError::Io {
            path: opts.cache_dir.clone(),
            source,
        })?;
        blobfile::check_cache_fs(&opts.cache_dir)?;
        let fd_limit = cap_fd_limit()?;
        let packs = Packs::open(registry).map_err(|source| FanotifyError::Io {
            path: opts.cache_dir.clone(),
            source,
        })?;
        let att = attach(opts)?;
        let journal = Journal::map(att.journal).map_err(kerr("mapping the journal"))?;
        // A group that already has a probe limit was used by an earlier daemon.
        let continued = journal.probe_fd_limit() > 0;
        journal.raise_probe_fd_limit(fd_limit);

        let mut blobs = Vec::new();
        let mut ids: Vec<&String> = registry.blobs.keys().collect();
        ids.sort();
        let mut writers = att.writers;
        // Writers the holder keeps that this daemon will not use: told to drop them.
        let mut stale: Vec<String> = Vec::new();
        for id in ids {
            let BlobSource::Chunked(table) = &*registry.blobs[id] else {
                continue;
            };
            let mut id_bin = [0u8; 32];
            if hex::decode_to_slice(id, &mut id_bin).is_err() {
                tracing::warn!(blob = %id, "blob id is not 64 hex digits; not served");
                continue;
            }
            let path = blobfile::blob_path(&opts.cache_dir, id);
            let file = blobfile::prepare(&path, table.size_bytes())?;
            let map = PageMap::from_file(&file, table.size_bytes(), &path)?;
            let writer = OnceLock::new();
            if let Some(w) = writers.remove(id.as_str()) {
                // A writer kept for an earlier file of this blob (deleted when its layer
                // went, made again since) writes into that dead inode: fills through it
                // would mark pages that this file never gets, and they would read as
                // zeros. Only a writer of this very file is adopted.
                if same_inode(&w, &file) {
                    let _ = writer.set(Arc::new(w));
                } else {
                    tracing::warn!(blob = %id, "the holder's write fd is for an earlier file of this blob; dropped");
                    stale.push(id.clone());
                }
            }
            blobs.push(Blob {
                id: id.clone(),
                id_bin,
                table: table.clone(),
                path,
                file,
                map,
                marked: AtomicBool::new(false),
                writer,
                next_seq: AtomicU64::new(u64::MAX),
                prefetched_to: AtomicU64::new(0),
                claims: Mutex::default(),
                priming: AtomicBool::new(false),
            });
        }
        // Blobs that are gone (and so not served): their writers keep dead inodes, and
        // their disk space, alive in the holder.
        stale.extend(writers.into_keys());
        for id in &stale {
            let msg = format!("DROP {id}");
            if let Err(e) = holder::send(att.conn.as_fd(), msg.as_bytes(), &[]) {
                tracing::warn!(blob = %id, "asking the holder to drop a stale write fd: {e}");
            }
        }
        let mut by_inode = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, b) in blobs.iter().enumerate() {
            let md = b.file.metadata().map_err(|source| FanotifyError::Io {
                path: b.path.clone(),
                source,
            })?;
            by_inode.insert((md.dev(), md.ino()), i);
            by_id.insert(b.id_bin, i);
            if b.map.complete() && opts.unmark_complete {
                // Complete from an earlier run: no events at all.
                let _ = sys::mark(
                    att.group.as_fd(),
                    sys::FAN_MARK_REMOVE,
                    sys::FAN_PRE_ACCESS,
                    b.file.as_fd(),
                );
            } else {
                sys::mark(
                    att.group.as_fd(),
                    sys::FAN_MARK_ADD,
                    sys::FAN_PRE_ACCESS,
                    b.file.as_fd(),
                )
                .map_err(kerr(format!(
                    "fanotify_mark(FAN_PRE_ACCESS) on {}",
                    b.path.display()
                )))?;
                b.marked.store(true, Ordering::Release);
            }
        }
        let stop = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )
        .map_err(|e| kerr("eventfd")(e.into()))?;
        let wake = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(|e| kerr("eventfd")(e.into()))?;
        let shared = Arc::new_cyclic(|me| Shared {
            group: att.group,
            journal,
            blobs,
            by_inode,
            by_id,
            holder: Mutex::new(att.conn),
            holder_alive: AtomicBool::new(true),
            stop: stop.into(),
            packs: packs.clone(),
            counters: Counters::default(),
            continued,
            unmark_complete: opts.unmark_complete,
            uring_responses: opts.uring_responses,
            prefetch: opts.prefetch,
            me: me.clone(),
            threads_started: Default::default(),
            wake: wake.into(),
            prefetch_q: Mutex::default(),
            redrive: Mutex::default(),
            returned: (0..MAX_WORKERS).map(|_| Mutex::default()).collect(),
        });
        // Pending events of a dead daemon first: no new event is read before this.
        shared.recover(
            &mut PackFiller::with_packs_dir(packs.clone(), opts.packs_dir.clone()),
            opts.fetcher.as_deref(),
        );
        let mut workers = Vec::new();
        {
            let s = shared.clone();
            let opts = opts.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("fanotify-holder-watch".into())
                    .spawn(move || s.watch_holder(&opts))
                    .map_err(kerr("spawning the holder watcher"))?,
            );
        }
        let mut fe = FanotifyFrontEnd {
            shared: shared.clone(),
            engine: None,
            engine_final: Default::default(),
            workers,
        };
        let cfg = engine_config(opts);
        let engine = Engine::start(cfg, shared).map_err(|e| FanotifyError::Kernel {
            what: "starting the serving engine".into(),
            source: io::Error::other(e.to_string()),
        })?;
        fe.engine = Some(engine);
        fe.prime();
        Ok(fe)
    }

    /// Gets a write fd for every marked blob that has none: a one-byte read through a
    /// plain fd raises an event whose fd a worker keeps.
    fn prime(&self) {
        for b in &self.shared.blobs {
            if b.writer.get().is_some() || !b.marked.load(Ordering::Acquire) {
                continue;
            }
            let path = b.path.clone();
            b.priming.store(true, Ordering::Release);
            // A thread, so that a kernel that raises no event cannot block start-up.
            let t = std::thread::spawn(move || {
                if let Ok(f) = File::open(&path) {
                    let _ = f.read_at(&mut [0u8; 1], 0);
                }
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while b.writer.get().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            b.priming.store(false, Ordering::Release);
            if b.writer.get().is_none() {
                tracing::warn!(blob = %b.id, "no write fd for blob (no event for a priming read)");
            }
            drop(t);
        }
    }

    /// Path of blob `id`'s file (to pass as `device=` when mounting).
    pub fn blob_path(&self, id: &str) -> Option<&Path> {
        self.shared
            .blobs
            .iter()
            .find(|b| b.id == id)
            .map(|b| b.path.as_path())
    }

    /// True when this daemon took over a group from an earlier one (its mounts may
    /// still be in place and are served as they are).
    pub fn continued(&self) -> bool {
        self.shared.continued
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let engine = match &self.engine {
            Some(e) => e.stats(),
            None => self.engine_final.clone(),
        };
        Stats {
            events: l(&c.events),
            allowed: l(&c.allowed),
            denied: l(&c.denied),
            cached: l(&c.cached),
            chunks_fetched: l(&self.shared.packs.chunks_read) + engine.chunks_fetched,
            bytes_filled: l(&c.bytes_filled),
            unmarked: l(&c.unmarked),
            recovered_journaled: l(&c.recovered_journaled),
            recovered_orphans: l(&c.recovered_orphans),
            parked: l(&c.parked),
            continued: self.shared.continued,
            prefetch_bytes: l(&c.prefetched),
            engine,
        }
    }

    /// Stops the engine (after its in-flight fills completed and every event it read
    /// was answered), answers what is still queued in the group synchronously, and
    /// stops the holder watcher.
    fn halt(&mut self) {
        if let Some(e) = self.engine.take() {
            self.engine_final = e.stop();
            self.shared.answer_leftovers();
            self.shared.drain_sync();
        }
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&self.shared.stop, &one);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Stops serving (after everything read was answered and the group's queue was
    /// drained). With `release`, tells the holder to exit: the group closes, which is
    /// only safe once no mount uses an incomplete blob. Without it the holder keeps the
    /// group and fails closed after its grace period.
    pub fn shutdown(mut self, release: bool) -> Stats {
        self.halt();
        if release {
            let conn = self.shared.holder.lock().unwrap_or_else(|p| p.into_inner());
            if holder::send(conn.as_fd(), b"BYE", &[]).is_ok() {
                // Wait (bounded) until the holder hangs up, so that a daemon started
                // right after this finds no holder on its way out.
                let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(2000u16));
            }
        }
        self.stats()
    }
}

impl Drop for FanotifyFrontEnd {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The engine settings for `opts`.
fn engine_config(opts: &Options) -> EngineConfig {
    let mut cfg = EngineConfig::new(opts.packs_dir.clone());
    cfg.fetcher = opts.fetcher.clone();
    cfg.threads = opts.workers;
    cfg.max_requests_per_thread = MAX_FILLS_PER_THREAD;
    // Blob files are on ext4/xfs/btrfs: pwrite on the engine thread (an io_uring write
    // that cannot complete inline is handed to an io-wq thread, one more context switch
    // per chunk on a machine whose CPUs the readers need too).
    cfg.write_strategy = crate::serve::WriteStrategy::Sync;
    cfg.digest_on_read = opts.digest_on_read;
    cfg
}

/// What to answer, and whether the store was touched.
enum Answer {
    Allow { cached: bool },
    Deny,
}

impl Shared {
    fn blob_of_fd(&self, fd: BorrowedFd<'_>) -> Option<usize> {
        let st = nix::sys::stat::fstat(fd).ok()?;
        self.by_inode.get(&(st.st_dev, st.st_ino)).copied()
    }

    /// Answers what a dead daemon left: journaled events are filled (through the blob's
    /// kept write fd) and allowed, or denied; then any orphan is denied. Runs before any
    /// worker reads, so that no fd number of ours can be confused with an old one.
    fn recover(&self, filler: &mut PackFiller, fetcher: Option<&crate::remote::Fetcher>) {
        let live = self.journal.live();
        if let Some(f) = fetcher {
            self.fetch_for_recovery(&live, filler, f);
        }
        for (slot, e) in live {
            let answer = match self.by_id.get(&e.blob) {
                Some(&bi) => match self.blobs[bi].writer.get() {
                    Some(w) => self.fill_range(bi, e.offset, e.count, w.as_fd(), filler),
                    None => Answer::Deny,
                },
                None => Answer::Deny,
            };
            let response = match answer {
                Answer::Allow { .. } => sys::FAN_ALLOW,
                Answer::Deny => sys::FAN_DENY_EIO,
            };
            if matches!(sys::respond(self.group.as_fd(), e.fd, response), Ok(true)) {
                self.counters
                    .recovered_journaled
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.journal.clear(slot);
        }
        let orphans = holder::probe_orphans(self.group.as_fd(), &self.journal);
        self.counters
            .recovered_orphans
            .fetch_add(orphans, Ordering::Relaxed);
        if orphans > 0 {
            tracing::warn!(
                orphans,
                "denied (EIO) events a dead daemon read but had not journaled"
            );
        }
    }

    /// Fetches what journaled events need of lazily pulled blobs and the store lacks
    /// (a fetch the dead daemon had in flight is redone here, once), all requests at
    /// once, and gives the filler their locations. A chunk that cannot be fetched is
    /// left out: its event is denied (EIO), as a live fill that failed would be.
    fn fetch_for_recovery(
        &self,
        live: &[(usize, journal::Entry)],
        filler: &mut PackFiller,
        fetcher: &crate::remote::Fetcher,
    ) {
        let mut asked = std::collections::HashSet::new();
        let mut waits = Vec::new();
        for (_, e) in live {
            let Some(&bi) = self.by_id.get(&e.blob) else {
                continue;
            };
            let b = &self.blobs[bi];
            let all = b.table.entries();
            for x in b.table.overlapping(e.offset, e.count) {
                let end = x.blob_offset + x.slot_len();
                if x.loc.is_some()
                    || b.map.all(x.blob_offset / PAGE_BYTES, end / PAGE_BYTES)
                    || !asked.insert((bi, x.blob_offset))
                {
                    continue;
                }
                let index = all.partition_point(|y| y.blob_offset < x.blob_offset);
                let (tx, rx) = crossbeam_channel::bounded(1);
                fetcher.request(b.table.clone(), index, crate::remote::Reply::Channel(tx));
                waits.push((b.table.id().to_string(), x.blob_offset, rx));
            }
        }
        if !waits.is_empty() {
            tracing::info!(
                chunks = waits.len(),
                "fetching what a dead daemon's journaled events need"
            );
        }
        // Bounded: each fetch ends by the fetcher's deadline.
        for (blob, offset, rx) in waits {
            match rx.recv() {
                Ok(Ok(loc)) => {
                    filler.fetched.insert((blob, offset), loc);
                }
                Ok(Err(e)) => tracing::error!(%blob, offset, ?e, "recovery fetch failed"),
                Err(_) => tracing::error!(%blob, offset, "the fetcher stopped"),
            }
        }
    }

    /// Keeps a dup of the first event fd of a blob as its write fd, and gives it to the
    /// holder for successors.
    fn adopt_writer(&self, bi: usize, fd: BorrowedFd<'_>) {
        let b = &self.blobs[bi];
        if b.writer.get().is_some() {
            return;
        }
        let Ok(dup) = fd.try_clone_to_owned() else {
            return;
        };
        if b.writer.set(Arc::new(dup)).is_err() {
            return;
        }
        let raw = b.writer.get().expect("just set").as_raw_fd();
        let conn = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        let msg = format!("KEEP {}", b.id);
        if let Err(e) = holder::send(conn.as_fd(), msg.as_bytes(), &[raw]) {
            if self.holder_alive.swap(false, Ordering::AcqRel) {
                tracing::error!("the fanotify holder is gone ({e}): a daemon crash would now expose unfilled ranges");
            }
        }
    }

    /// Replaces the holder if it dies while we run: a new holder adopts our group, so
    /// that a later crash of ours still leaves the group alive.
    fn watch_holder(&self, opts: &Options) {
        // Bounded by the daemon's life; each round waits for an event.
        loop {
            let conn_raw = self
                .holder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_raw_fd();
            // SAFETY: the connection fd is only replaced by this thread, below.
            let conn = unsafe { BorrowedFd::borrow_raw(conn_raw) };
            let mut fds = [
                PollFd::new(conn, PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            if fds[0].revents().is_none_or(|r| r.is_empty()) {
                continue;
            }
            tracing::error!(
                "the fanotify holder died; starting a replacement that adopts our group"
            );
            self.holder_alive.store(false, Ordering::Release);
            match self.replace_holder(opts) {
                Ok(new) => {
                    *self.holder.lock().unwrap_or_else(|p| p.into_inner()) = new;
                    self.holder_alive.store(true, Ordering::Release);
                    tracing::warn!("a replacement fanotify holder holds the group");
                }
                Err(e) => {
                    tracing::error!("no replacement holder ({e}): a crash of this daemon would expose unfilled ranges");
                    return;
                }
            }
        }
    }

    fn replace_holder(&self, opts: &Options) -> Result<OwnedFd, FanotifyError> {
        let conn = spawn_holder(opts, true)?;
        let herr = |e: io::Error| FanotifyError::Holder {
            socket: opts.cache_dir.join("holder.sock"),
            reason: e.to_string(),
        };
        holder::send(
            conn.as_fd(),
            b"ADOPT",
            &[self.group.as_raw_fd(), self.journal.fd().as_raw_fd()],
        )
        .map_err(herr)?;
        for b in &self.blobs {
            if let Some(w) = b.writer.get() {
                let msg = format!("KEEP {}", b.id);
                holder::send(conn.as_fd(), msg.as_bytes(), &[w.as_raw_fd()]).map_err(herr)?;
            }
        }
        Ok(conn)
    }

    /// Makes `[offset, offset + count)` of blob `bi` readable: fills the chunks that
    /// have a missing page, through `target`. Unmarks the blob once complete.
    fn fill_range(
        &self,
        bi: usize,
        offset: u64,
        count: u64,
        target: BorrowedFd<'_>,
        filler: &mut dyn Filler,
    ) -> Answer {
        let b = &self.blobs[bi];
        let size = b.table.size_bytes();
        let end = offset.saturating_add(count).min(size);
        if offset >= end {
            return Answer::Allow { cached: true };
        }
        if b.map.all(offset / PAGE_BYTES, end.div_ceil(PAGE_BYTES)) {
            return Answer::Allow { cached: true };
        }
        // Runs of consecutive slots with a missing page, filled whole.
        let entries = b.table.overlapping(offset, end - offset);
        let mut i = 0;
        while i < entries.len() {
            let missing = |e: &crate::store::BlobEntry| {
                !b.map.all(
                    e.blob_offset / PAGE_BYTES,
                    (e.blob_offset + e.slot_len()) / PAGE_BYTES,
                )
            };
            if !missing(&entries[i]) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < entries.len() && missing(&entries[j]) {
                j += 1;
            }
            let start = entries[i].blob_offset;
            let stop = entries[j - 1].blob_offset + entries[j - 1].slot_len();
            match filler.fill(&b.table, start, stop - start, target) {
                Ok(done) => {
                    self.counters
                        .bytes_filled
                        .fetch_add(done.bytes, Ordering::Relaxed);
                    b.map.set(start / PAGE_BYTES, stop / PAGE_BYTES);
                }
                Err(e) => {
                    tracing::error!("fill failed, answering EIO: {e}");
                    return Answer::Deny;
                }
            }
            i = j;
        }
        self.unmark_if_complete(bi);
        Answer::Allow { cached: false }
    }
}

/// Whether two fds are the same file (device and inode).
fn same_inode(a: &OwnedFd, b: &File) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}
