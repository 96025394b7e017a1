//! One engine thread: its ring, buffers, in-flight operations and requests.
//!
//! A request is a cursor over its page-aligned fill range. Pieces (one chunk slot, one
//! buffer of a plain file, or a run of zeros) are started from the cursor while buffers
//! and operation slots last; a request waiting for buffers sits in `pending`, and while
//! anything is pending the device is not drained. A chunked piece is a *run*: up to
//! [`MAX_RUN_CHUNKS`] chunks whose slots follow each other in the target and whose
//! records follow each other in one pack, so that it costs one read, one write and one
//! buffer whatever its number of chunks. The read is a `readv` that scatters each record:
//! its header into the buffer's first page, a payload stored raw straight to its slot's
//! place in the rest of the buffer (page-aligned, so it is written from there, O_DIRECT
//! targets included), an lz4 payload into a second buffer to be decoded into that place.
//! Each chunk is then checked ([`verify_split`]: against its at-rest checksum, or its
//! digest) before the run is written in one write. A plain-file piece is one buffer read
//! and written. An in-flight operation owns its buffers until its CQE arrives.
//!
//! A chunk of a lazily pulled blob that the store lacks is asked of the fetcher
//! ([`crate::remote::Fetcher`]) and its piece parked in `waits`; the request's other
//! pieces go on. The answer (where the fetched chunk now is in the packs) arrives in the
//! thread's mailbox, whose eventfd the ring polls; the piece then continues as a pack
//! read like any other. The thread never waits on the network.
//!
//! Each request has an id (`req` in the log: thread in the top 16 bits, then a sequence
//! number) and adds up what its pieces waited on: pack reads in flight (store), parked on
//! the fetcher (network) and writes into the target (kernel). The times come from a
//! clock read once per loop turn (and around each synchronous write), so this costs the
//! hot path no more than a clock read per turn. A request among the thread's slowest
//! recent ones is kept for `dedupd status` ([`SlowTracker`]); one slower than
//! [`SLOW_LOG_US`] is logged with its breakdown.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::bufpool::BufPool;
use super::stats::{bump, unix_ms_now, SlowRequest, SlowTracker, ThreadCounters};
use super::{
    engine_sync, engine_uring, EngineConfig, EngineError, FillError, FillOutcome, FillRequest,
    FillSource, FrontEnd, Next, WriteStrategy, PAGE_BYTES,
};
use crate::digest::ChunkDigest;
use crate::remote::{FetchFailure, Mailbox, Reply};
use crate::store::chunk::{verify_split, ChunkLoc, RECORD_HEADER_BYTES};
use crate::store::BlobTable;

const POLL_DEVICE: u64 = u64::MAX;
const POLL_STOP: u64 = u64::MAX - 1;
const POLL_WAKE: u64 = u64::MAX - 2;
const POLL_FETCH: u64 = u64::MAX - 3;
/// Times one piece whose stored record failed is asked of the fetcher again.
const MAX_REFETCHES: u8 = 3;
/// Bytes at the start of each buffer for the headers of a run's records; the data area
/// after it is page-aligned.
pub(super) const HEADER_AREA_BYTES: usize = PAGE_BYTES as usize;
/// Chunks per run at most: their headers fill the header area.
const MAX_RUN_CHUNKS: usize = 64;
const _: () = assert!(MAX_RUN_CHUNKS * RECORD_HEADER_BYTES <= HEADER_AREA_BYTES);
/// Pieces parked on the fetcher per thread: enough for every request in flight to wait
/// on several chunks (a read-around window of a sequential read).
const MAX_WAITS_PER_REQUEST: usize = 16;
/// Events read from the front end per loop turn before completions are looked at again.
const DRAIN_BATCH: usize = 256;
/// Operation completions handled per loop turn before the front end is read again.
/// Reads of cached pack data complete inline at submit, so one turn could otherwise
/// decode, verify and write every chunk in flight (16 and more, about 30 us each)
/// while new kernel events wait; this keeps their wait to a few chunks.
const OPS_PER_TURN: usize = 4;
/// Read-around window for plain-file sources (metadata images).
const FILE_READ_AROUND_BYTES: u64 = 128 << 10;
/// Pack files kept open per thread.
const MAX_OPEN_PACKS: usize = 4096;
/// A request slower than this is logged (INFO) with what it waited on.
pub const SLOW_LOG_US: u64 = 100_000;
/// Slow requests logged per thread per second at most; the rest are counted in the next
/// line.
const SLOW_LOGS_PER_SECOND: u32 = 10;

/// A fixed-capacity slab: indices are stable while an item lives.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    fn new(cap: usize) -> Slab<T> {
        Slab {
            items: (0..cap).map(|_| None).collect(),
            free: (0..cap as u32).rev().collect(),
        }
    }
    /// Stores `t`, or hands it back when the slab is full.
    fn insert(&mut self, t: T) -> Result<u32, T> {
        let Some(i) = self.free.pop() else {
            return Err(t);
        };
        self.items[i as usize] = Some(t);
        Ok(i)
    }
    fn remove(&mut self, i: u32) -> Option<T> {
        let t = self.items.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(t)
    }
    fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize)?.as_mut()
    }
    fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize)?.as_ref()
    }
    fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
    fn room(&self) -> usize {
        self.free.len()
    }
}

/// An operation in flight in the ring.
enum Op {
    /// A run of chunk records is being read (see the module documentation): headers and
    /// raw payloads into `rbuf`, lz4 payloads into `sbuf`. The first chunk is named here
    /// (from the blob table, or from the fetcher's answer); the others are the table's
    /// entries after `index`.
    PackRun {
        req: u32,
        rbuf: u16,
        sbuf: Option<u16>,
        digest: ChunkDigest,
        /// Boxed: the BLAKE3 leaves make a location large, and every op slot pays for
        /// the largest variant.
        loc: Box<ChunkLoc>,
        slot_off: u64,
        index: usize,
        n: u16,
        /// Bytes the read asks for (every record of the run).
        read_len: u32,
        w_off: u64,
        w_len: u32,
        /// Submitted at (the turn clock).
        t0: Instant,
        /// The chunk came from the registry (the piece was parked on the fetcher).
        fetched: bool,
        /// See [`Wait::refetched`].
        refetched: u8,
    },
    /// A range of a plain file is being read into `dbuf`.
    FileRead {
        req: u32,
        dbuf: u16,
        off: u64,
        len: u32,
        data_bytes: u64,
    },
    /// A write of `len` bytes from `buf` (None: the zero buffer) at `off` is in flight.
    Write {
        req: u32,
        buf: Option<u16>,
        len: u32,
        off: u64,
        /// Submitted at (the turn clock).
        t0: Instant,
    },
}

struct Request<T> {
    token: Option<T>,
    source: FillSource,
    target: Arc<OwnedFd>,
    cursor: u64,
    end: u64,
    in_flight: u32,
    failed: Option<FillError>,
    queued: bool,
    started: Instant,
    /// Id in logs and in `dedupd status`.
    id: u64,
    /// Start of the range (page-aligned, read-around included).
    first: u64,
    /// Microseconds pieces spent in pack reads, parked on the fetcher, in writes.
    store_us: u64,
    fetch_us: u64,
    write_us: u64,
}

enum Step {
    Started,
    Blocked,
    Done,
}

/// A piece waiting for the fetcher, or fetched and waiting for buffers.
#[derive(Clone, Copy)]
struct Wait {
    req: u32,
    digest: ChunkDigest,
    slot_off: u64,
    w_off: u64,
    w_len: u32,
    /// When it was parked on the fetcher.
    parked: Instant,
    /// Times its stored record failed and it was asked of the fetcher again.
    refetched: u8,
}

pub(super) struct Worker<F: FrontEnd> {
    // Declared first so it is dropped before the buffers it points into.
    ring: IoUring,
    pool: BufPool,
    /// Fixed buffers are in use: the pool's slots are registered with the ring, each on
    /// its first use (see [`register_pool`]).
    fixed: bool,
    /// Which slots are registered (the zero slot last).
    registered: Vec<bool>,
    cfg: Arc<EngineConfig>,
    front: Arc<F>,
    local: F::Local,
    counters: Arc<[ThreadCounters]>,
    id: usize,
    stop_fd: RawFd,
    ops: Slab<Op>,
    reqs: Slab<Request<F::Token>>,
    pending: VecDeque<u32>,
    packs: HashMap<u32, File>,
    /// The iovecs of the run read into each buffer, kept until its completion.
    iovs: Vec<Vec<libc::iovec>>,
    /// The chunks of the run being checked (reused).
    run: Vec<(ChunkDigest, ChunkLoc, u64)>,
    /// Pieces parked on the fetcher, keyed by ticket.
    waits: Slab<Wait>,
    /// Fetched pieces whose pack read has not started (no buffers yet).
    fetched: VecDeque<(Wait, ChunkLoc)>,
    /// Where the fetcher answers; `None` without a fetcher.
    mailbox: Option<Arc<Mailbox>>,
    answers: Vec<(u32, Result<ChunkLoc, FetchFailure>)>,
    device_ready: bool,
    stopping: bool,
    cqes: Vec<(u64, i32, u32)>,
    /// The turn clock: read once per loop turn and after synchronous writes.
    now: Instant,
    /// Sequence number of the next request.
    next_req: u64,
    /// This thread's slowest recent requests.
    slow: SlowTracker,
    /// Start of the current second of slow-request logging, lines logged in it, and
    /// lines suppressed.
    slow_logs: (Instant, u32, u64),
}

impl<F: FrontEnd> Worker<F> {
    /// `slot` as a fixed buffer index, registering it first if this is its first use;
    /// `None` (a plain read or write) without fixed buffers or when it cannot be
    /// registered.
    fn fixed_slot(&mut self, slot: u16) -> Option<u16> {
        if !self.fixed {
            return None;
        }
        let i = slot as usize;
        if !self.registered[i] {
            let iov = [self.pool.iovec(slot)];
            // SAFETY: the iovec points into `pool`'s allocation, which outlives the ring
            // (declared after it, so dropped after it); the kernel pins the pages.
            match unsafe {
                self.ring
                    .submitter()
                    .register_buffers_update(u32::from(slot), &iov, None)
            } {
                Ok(()) => self.registered[i] = true,
                Err(e) => {
                    tracing::warn!(thread = self.id, slot, "registering a buffer: {e}");
                    return None;
                }
            }
        }
        Some(slot)
    }

    pub(super) fn new(
        id: usize,
        cfg: Arc<EngineConfig>,
        front: Arc<F>,
        counters: Arc<[ThreadCounters]>,
        stop_fd: RawFd,
    ) -> Result<Worker<F>, EngineError> {
        let setup = |what| {
            move |source| EngineError::Setup {
                thread: id,
                what,
                source,
            }
        };
        let entries = cfg.ring_entries.next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(setup("io_uring setup"))?;
        let pool = BufPool::new(cfg.buffers_per_thread, cfg.buffer_bytes);
        let (fixed, registered) = register_pool(&ring, &pool, id);
        if cfg.write_strategy == WriteStrategy::Uring {
            if let Err(e) = engine_uring::cap_workers(&ring, cfg.iowq_workers) {
                tracing::warn!(thread = id, "could not cap io-wq workers: {e}");
            }
        }
        // Every op and request slot is bounded by the ring, so the CQ never overflows.
        let max_ops = (entries as usize).saturating_sub(4).max(4);
        let local = front.new_local();
        let mailbox = match cfg.fetcher {
            Some(_) => Some(Arc::new(Mailbox::new().map_err(setup("fetch mailbox"))?)),
            None => None,
        };
        Ok(Worker {
            ring,
            pool,
            fixed,
            registered,
            reqs: Slab::new(cfg.max_requests_per_thread),
            waits: Slab::new(cfg.max_requests_per_thread * MAX_WAITS_PER_REQUEST),
            cfg,
            front,
            local,
            counters,
            id,
            stop_fd,
            ops: Slab::new(max_ops),
            pending: VecDeque::new(),
            packs: HashMap::new(),
            iovs: Vec::new(),
            run: Vec::with_capacity(MAX_RUN_CHUNKS),
            fetched: VecDeque::new(),
            mailbox,
            answers: Vec::new(),
            device_ready: true,
            stopping: false,
            cqes: Vec::with_capacity(entries as usize * 2),
            now: Instant::now(),
            next_req: 0,
            slow: SlowTracker::default(),
            slow_logs: (Instant::now(), 0, 0),
        })
    }

    fn c(&self) -> &ThreadCounters {
        &self.counters[self.id]
    }

    /// Pushes an SQE, flushing the queue to the kernel when it is full.
    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        for _ in 0..64 {
            // SAFETY: every buffer an SQE names is a pool slot owned by the op whose
            // user_data it carries (or the zero slot, never written), and every fd stays
            // open until that op's CQE: requests hold their target, packs and files
            // stay open for the worker's life.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("submission queue stays full"))
    }

    fn arm_polls(&mut self, device: bool, stop: bool) {
        if device {
            let e = opcode::PollAdd::new(types::Fd(self.front.poll_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(POLL_DEVICE);
            if let Err(err) = self.push(&e) {
                tracing::error!(thread = self.id, "arming device poll: {err}");
            }
        }
        if stop {
            let e = opcode::PollAdd::new(types::Fd(self.stop_fd), libc::POLLIN as u32)
                .build()
                .user_data(POLL_STOP);
            if let Err(err) = self.push(&e) {
                tracing::error!(thread = self.id, "arming stop poll: {err}");
            }
        }
    }

    /// Arms the multishot poll on the front end's wake fd, if it has one.
    fn arm_wake(&mut self) {
        let Some(fd) = self.front.wake_fd() else {
            return;
        };
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(POLL_WAKE);
        if let Err(err) = self.push(&e) {
            tracing::error!(thread = self.id, "arming wake poll: {err}");
        }
    }

    /// Arms the multishot poll on the fetcher mailbox's eventfd, if there is one.
    fn arm_mailbox(&mut self) {
        let Some(fd) = self.mailbox.as_ref().map(|m| m.fd()) else {
            return;
        };
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(POLL_FETCH);
        if let Err(err) = self.push(&e) {
            tracing::error!(thread = self.id, "arming fetch mailbox poll: {err}");
        }
    }

    pub(super) fn run(mut self) {
        self.arm_polls(true, true);
        self.arm_wake();
        self.arm_mailbox();
        // Bounded by the stop request: every turn either makes progress or waits.
        loop {
            let left = self.reap();
            self.start_fetched();
            self.pump();
            if self.device_ready && !self.stopping {
                self.drain();
            }
            if self.stopping && self.reqs.len() == 0 && self.ops.len() == 0 {
                break;
            }
            let busy = left || (self.device_ready && !self.stopping && self.can_admit());
            let want = usize::from(!busy);
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!(thread = self.id, "io_uring_enter: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.now = Instant::now();
        }
        tracing::debug!(thread = self.id, "engine thread stopped");
    }

    fn can_admit(&self) -> bool {
        self.reqs.room() > 0 && self.pending.is_empty()
    }

    /// Handles completions: every poll completion queued, and at most
    /// [`OPS_PER_TURN`] operation completions (the rest stay queued for the next turn).
    /// Returns true when completions were left.
    fn reap(&mut self) -> bool {
        self.cqes.clear();
        let mut ops = 0;
        let mut left = false;
        {
            let mut cq = self.ring.completion();
            // Bounded by the queue's length.
            while let Some(cqe) = cq.next() {
                let ud = cqe.user_data();
                self.cqes.push((ud, cqe.result(), cqe.flags()));
                if ud < POLL_FETCH {
                    ops += 1;
                    if ops == OPS_PER_TURN {
                        left = !cq.is_empty();
                        break;
                    }
                }
            }
        }
        let cqes = std::mem::take(&mut self.cqes);
        for &(ud, res, flags) in &cqes {
            match ud {
                POLL_DEVICE => {
                    if res < 0 {
                        bump(&self.c().device_errors);
                        tracing::warn!(
                            thread = self.id,
                            "device poll failed: {}",
                            io::Error::from_raw_os_error(-res)
                        );
                    } else {
                        self.device_ready = true;
                    }
                    if !cqueue::more(flags) && !self.stopping {
                        if res < 0 {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        self.arm_polls(true, false);
                    }
                }
                POLL_WAKE => {
                    if res >= 0 {
                        self.device_ready = true;
                    }
                    if !cqueue::more(flags) && !self.stopping {
                        if res < 0 {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        self.arm_wake();
                    }
                }
                POLL_FETCH => {
                    self.take_answers();
                    if !cqueue::more(flags) {
                        if res < 0 {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        self.arm_mailbox();
                    }
                }
                POLL_STOP => self.stopping = true,
                _ => self.op_done(ud as u32, res),
            }
        }
        self.cqes = cqes;
        left
    }

    fn drain(&mut self) {
        let mut admitted = 0;
        for _ in 0..DRAIN_BATCH {
            // The device stays ready: the rest is for the other threads, or for the
            // next turn of this one once these are started.
            if !self.can_admit() || admitted >= self.cfg.admit_per_turn {
                return;
            }
            let next = self.front.next(&mut self.local, &self.counters[self.id]);
            match next {
                Next::Empty => {
                    self.device_ready = false;
                    return;
                }
                Next::Handled => {}
                Next::Error(e) => {
                    bump(&self.c().device_errors);
                    tracing::warn!(thread = self.id, "reading kernel events: {e}");
                    self.device_ready = false;
                    return;
                }
                Next::Fill(r) => {
                    self.admit(r);
                    self.pump();
                    admitted += 1;
                }
            }
        }
    }

    fn admit(&mut self, r: FillRequest<F::Token>) {
        bump(&self.c().reads);
        let size = r.source.size_bytes();
        let mut start = r.offset / PAGE_BYTES * PAGE_BYTES;
        let mut end = r
            .offset
            .saturating_add(r.len)
            .div_ceil(PAGE_BYTES)
            .saturating_mul(PAGE_BYTES)
            .min(size.div_ceil(PAGE_BYTES) * PAGE_BYTES);
        if self.cfg.read_around && start < end {
            match &r.source {
                FillSource::Chunked(t) => {
                    let touched = t.overlapping(start, end - start);
                    if let (Some(a), Some(b)) = (touched.first(), touched.last()) {
                        start = start.min(a.blob_offset);
                        end = end.max(b.blob_offset + b.slot_len());
                    }
                }
                FillSource::File { size_bytes, .. } => {
                    // Metadata images are read 4 KiB at a time, synchronously, while the
                    // kernel mounts: fill the aligned window around each READ.
                    start = start / FILE_READ_AROUND_BYTES * FILE_READ_AROUND_BYTES;
                    end = end
                        .div_ceil(FILE_READ_AROUND_BYTES)
                        .saturating_mul(FILE_READ_AROUND_BYTES)
                        .min(size_bytes.div_ceil(PAGE_BYTES) * PAGE_BYTES);
                }
            }
        }
        let req = Request {
            token: Some(r.token),
            source: r.source,
            target: r.target,
            cursor: start,
            end: end.max(start),
            in_flight: 0,
            failed: None,
            queued: true,
            started: Instant::now(),
            id: ((self.id as u64) << 48) | (self.next_req & ((1 << 48) - 1)),
            first: start,
            store_us: 0,
            fetch_us: 0,
            write_us: 0,
        };
        self.next_req += 1;
        let i = match self.reqs.insert(req) {
            Ok(i) => i,
            Err(mut req) => {
                // can_admit() was checked; should it not hold, the kernel still hears.
                tracing::error!(thread = self.id, "request slab full");
                if let Some(token) = req.token.take() {
                    let failed = FillOutcome::Failed(FillError::Source);
                    let c = &self.counters[self.id];
                    self.front
                        .complete(&mut self.local, token, &req.target, failed, c);
                }
                return;
            }
        };
        self.c().note_in_flight(self.reqs.len() as u64);
        self.pending.push_back(i);
    }

    fn pump(&mut self) {
        while let Some(&r) = self.pending.front() {
            match self.start_piece(r) {
                Step::Started => {}
                Step::Blocked => return,
                Step::Done => {
                    self.pending.pop_front();
                    if let Some(q) = self.reqs.get_mut(r) {
                        q.queued = false;
                    }
                    self.maybe_finish(r);
                }
            }
        }
    }

    fn fail(&mut self, r: u32, why: FillError) {
        if let Some(q) = self.reqs.get_mut(r) {
            q.failed.get_or_insert(why);
            q.cursor = q.end;
        }
    }

    fn pack_fd(&mut self, pack: u32) -> io::Result<RawFd> {
        if self.packs.len() >= MAX_OPEN_PACKS && !self.packs.contains_key(&pack) {
            self.packs.clear();
        }
        Ok(match self.packs.entry(pack) {
            Entry::Occupied(e) => e.get().as_raw_fd(),
            Entry::Vacant(v) => {
                let path = self.cfg.packs_dir.join(format!("{pack:08}.pack"));
                v.insert(File::open(path)?).as_raw_fd()
            }
        })
    }

    /// Bytes of a buffer's data area (after its header area): the most a run holds.
    fn data_bytes(&self) -> u64 {
        (self.pool.slot_bytes() - HEADER_AREA_BYTES) as u64
    }

    /// The run that starts at entry `index` of `table` (whose chunk the store has) for a
    /// fill ending at `end`: how many chunks it takes, and where its write ends. A run
    /// goes on while the next entry's slot follows in the target, the fill reaches into
    /// it, its record follows in the same pack, and the data area has room.
    fn plan_run(&self, table: &BlobTable, index: usize, end: u64) -> (usize, u64) {
        let entries = table.entries();
        let cap = self.data_bytes();
        let mut last = &entries[index];
        let (mut n, mut bytes) = (1, last.slot_len());
        // Bounded by MAX_RUN_CHUNKS.
        while n < MAX_RUN_CHUNKS {
            let (Some(next), Some(loc)) = (entries.get(index + n), last.loc) else {
                break;
            };
            let slot_end = last.blob_offset + last.slot_len();
            let follows = next.loc.is_some_and(|l| {
                l.pack == loc.pack
                    && l.offset == loc.offset + loc.record_len() as u64
                    && placeable(&l)
            });
            if !follows
                || next.blob_offset != slot_end
                || slot_end >= end
                || bytes + next.slot_len() > cap
            {
                break;
            }
            bytes += next.slot_len();
            last = next;
            n += 1;
        }
        (n, end.min(last.blob_offset + last.slot_len()))
    }

    /// Starts the next piece of request `r`.
    fn start_piece(&mut self, r: u32) -> Step {
        let slot_bytes = self.pool.slot_bytes() as u64;
        let Some(q) = self.reqs.get_mut(r) else {
            return Step::Done;
        };
        if q.cursor >= q.end {
            return Step::Done;
        }
        if self.ops.room() == 0 {
            return Step::Blocked;
        }
        let (cursor, end) = (q.cursor, q.end);
        match q.source.clone() {
            FillSource::Chunked(table) => {
                let Some(index) = table.index_at(cursor) else {
                    return self.start_zero(r, cursor, end);
                };
                let e = &table.entries()[index];
                if e.slot_len() > self.data_bytes() {
                    bump(&self.c().chunk_errors);
                    tracing::warn!(chunk = %e.digest, "chunk larger than an engine buffer");
                    self.fail(r, FillError::Chunk);
                    return Step::Done;
                }
                let (n, w_end) = match e.loc {
                    Some(_) => self.plan_run(&table, index, end),
                    None => (1, end.min(e.blob_offset + e.slot_len())),
                };
                let wait = Wait {
                    req: r,
                    digest: e.digest,
                    slot_off: e.blob_offset,
                    w_off: cursor,
                    w_len: (w_end - cursor) as u32,
                    parked: self.now,
                    refetched: 0,
                };
                match e.loc {
                    Some(loc) => self.start_run(wait, loc, (index, n), Some(w_end)),
                    None => self.park(wait, &table, index, w_end),
                }
            }
            FillSource::File {
                file, data_bytes, ..
            } => {
                if cursor >= data_bytes {
                    return self.start_zero(r, cursor, end);
                }
                let Some(dbuf) = self.pool.take() else {
                    return Step::Blocked;
                };
                let len = (end - cursor).min(slot_bytes) as u32;
                let op = Op::FileRead {
                    req: r,
                    dbuf,
                    off: cursor,
                    len,
                    data_bytes,
                };
                let fixed = self.fixed_slot(dbuf);
                let entry = engine_uring::read_entry(
                    file.as_raw_fd(),
                    self.pool.ptr(dbuf),
                    len,
                    fixed,
                    cursor,
                    0,
                );
                self.submit_op(r, op, entry, Some(cursor + u64::from(len)))
            }
        }
    }

    /// Starts the read of piece `w`: the run of `n` chunks from entry `index` of its
    /// table (`(index, n)`; for a fetched piece, `(_, 1)`), whose first chunk's record is
    /// at `loc`. Advances the request's cursor to `new_cursor` once started (`None`: it
    /// was advanced when the piece was parked on the fetcher).
    fn start_run(
        &mut self,
        w: Wait,
        loc: ChunkLoc,
        (index, n): (usize, usize),
        new_cursor: Option<u64>,
    ) -> Step {
        let r = w.req;
        let raw_slot = u64::from(loc.raw_len).div_ceil(PAGE_BYTES) * PAGE_BYTES;
        if raw_slot > self.data_bytes() || loc.record_len() > self.pool.slot_bytes() {
            bump(&self.c().chunk_errors);
            tracing::warn!(chunk = %w.digest, "chunk record larger than an engine buffer");
            self.fail_piece(r, FillError::Chunk, new_cursor.is_none());
            return Step::Done;
        }
        let table = match self.reqs.get(r).map(|q| &q.source) {
            Some(FillSource::Chunked(t)) if n > 1 => Some(t.clone()),
            _ => None,
        };
        self.run.clear();
        self.run.push((w.digest, loc, w.slot_off));
        if let Some(t) = &table {
            self.run.extend(
                t.entries()[index + 1..index + n]
                    .iter()
                    .filter_map(|e| Some((e.digest, e.loc?, e.blob_offset))),
            );
        }
        if self.run.len() != n {
            // plan_run takes only entries the store has; a run that is not whole would
            // leave part of its write unverified.
            tracing::error!(req = self.req_id(r), "a planned run lost a chunk");
            self.fail_piece(r, FillError::Chunk, new_cursor.is_none());
            return Step::Done;
        }
        if let Some((d, _, _)) = self.run.iter().find(|(_, l, _)| !placeable(l)) {
            // A row no encoder of this format writes (stored raw, yet not raw_len
            // bytes): reading it to its slot could run past the slot. Refused unread.
            bump(&self.c().chunk_errors);
            tracing::warn!(chunk = %d, "chunk record lengths do not match its kind");
            self.fail_piece(r, FillError::Chunk, new_cursor.is_none());
            return Step::Done;
        }
        let lz4 = self.run.iter().any(|(_, l, _)| l.is_lz4());
        let want = 1 + usize::from(lz4);
        if self.ops.room() == 0 || self.pool.available() < want {
            return Step::Blocked;
        }
        let fd = match self.pack_fd(loc.pack) {
            Ok(fd) => fd,
            Err(err) if new_cursor.is_some() && self.remote_index(&w).is_some() => {
                // A lazily pulled blob's chunk in a pack that is gone (evicted, then
                // retired by compaction): the fetcher finds it or fetches it again.
                // The piece goes back to one chunk; the cursor moves past it only.
                let (table, index) = self.remote_index(&w).expect("checked");
                tracing::debug!(
                    req = self.req_id(r),
                    pack = loc.pack,
                    "opening pack: {err}; asking the fetcher"
                );
                bump(&self.c().refetches);
                let e = &table.entries()[index];
                let w_end = (w.w_off + u64::from(w.w_len)).min(e.blob_offset + e.slot_len());
                let w = Wait {
                    w_len: (w_end - w.w_off) as u32,
                    ..w
                };
                return self.park(w, &table, index, w_end);
            }
            Err(err) => {
                bump(&self.c().source_errors);
                tracing::warn!(pack = loc.pack, "opening pack: {err}");
                self.fail_piece(r, FillError::Source, new_cursor.is_none());
                return Step::Done;
            }
        };
        let rbuf = self.pool.take().expect("checked");
        let sbuf = if lz4 { self.pool.take() } else { None };
        let (rptr, sptr) = (self.pool.ptr(rbuf), sbuf.map(|b| self.pool.ptr(b)));
        let slots = self.pool.slot_bytes();
        if self.iovs.len() <= rbuf as usize {
            self.iovs.resize_with(rbuf as usize + 1, Vec::new);
        }
        let iovs = &mut self.iovs[rbuf as usize];
        iovs.clear();
        let (mut spos, mut read_len) = (0usize, 0usize);
        for (k, (_, l, slot)) in self.run.iter().enumerate() {
            let stored = l.stored_len as usize;
            let at = HEADER_AREA_BYTES + (slot - w.slot_off) as usize;
            debug_assert!(at + l.raw_len as usize <= slots && spos + stored <= slots);
            // SAFETY: every address is inside this op's buffers: headers in the header
            // area (k < MAX_RUN_CHUNKS), raw payloads at their slot in the data area
            // (plan_run keeps the run within it), lz4 payloads packed in `sbuf` (each
            // shorter than its raw bytes, so within the data area's size).
            let payload = unsafe {
                if l.is_lz4() {
                    let p = sptr.expect("an lz4 run has a scratch buffer").add(spos);
                    spos += stored;
                    p
                } else {
                    rptr.add(at)
                }
            };
            // SAFETY: k < MAX_RUN_CHUNKS, so the header lies in the header area.
            let header = unsafe { rptr.add(k * RECORD_HEADER_BYTES) };
            iovs.push(libc::iovec {
                iov_base: header.cast(),
                iov_len: RECORD_HEADER_BYTES,
            });
            iovs.push(libc::iovec {
                iov_base: payload.cast(),
                iov_len: stored,
            });
            read_len += l.record_len();
        }
        let entry = opcode::Readv::new(types::Fd(fd), iovs.as_ptr(), iovs.len() as u32)
            .offset(loc.offset)
            .build();
        let op = Op::PackRun {
            req: r,
            rbuf,
            sbuf,
            digest: w.digest,
            loc: Box::new(loc),
            slot_off: w.slot_off,
            index,
            n: self.run.len() as u16,
            read_len: read_len as u32,
            w_off: w.w_off,
            w_len: w.w_len,
            t0: self.now,
            fetched: new_cursor.is_none(),
            refetched: w.refetched,
        };
        let step = self.submit_op(r, op, entry, new_cursor);
        if new_cursor.is_none() && !matches!(step, Step::Blocked) {
            // The parked piece's count ends: the read took it over (and counted itself),
            // or the request failed.
            if let Some(q) = self.reqs.get_mut(r) {
                q.in_flight -= 1;
            }
            if matches!(step, Step::Done) {
                self.maybe_finish(r);
            }
        }
        step
    }

    /// Fails request `r` for one piece; `parked`: the piece was counted in flight while
    /// it waited on the fetcher, and that count ends here.
    fn fail_piece(&mut self, r: u32, why: FillError, parked: bool) {
        self.fail(r, why);
        if parked {
            if let Some(q) = self.reqs.get_mut(r) {
                q.in_flight -= 1;
            }
            self.maybe_finish(r);
        }
    }

    /// Parks piece `w` (entry `index` of `table`, which the store lacks) on the fetcher,
    /// and moves the request's cursor past it.
    fn park(
        &mut self,
        w: Wait,
        table: &Arc<crate::store::BlobTable>,
        index: usize,
        w_end: u64,
    ) -> Step {
        let (Some(fetcher), Some(mailbox), Some(_)) = (
            self.cfg.fetcher.clone(),
            self.mailbox.clone(),
            table.remote(),
        ) else {
            bump(&self.c().chunk_errors);
            tracing::warn!(chunk = %w.digest, blob = table.id(), "chunk missing from the store");
            self.fail(w.req, FillError::Chunk);
            return Step::Done;
        };
        let w = Wait {
            parked: self.now,
            ..w
        };
        let Ok(ticket) = self.waits.insert(w) else {
            return Step::Blocked;
        };
        bump(&self.c().fetch_waits);
        tracing::debug!(
            req = self.req_id(w.req),
            blob = table.id(),
            chunk = %w.digest,
            "chunk not local: waiting for the registry"
        );
        if let Some(q) = self.reqs.get_mut(w.req) {
            q.in_flight += 1;
            q.cursor = w_end;
        }
        fetcher.request(table.clone(), index, Reply::Mailbox { mailbox, ticket });
        Step::Started
    }

    /// Parks again, on the fetcher, a piece whose pack read failed (a hole where an
    /// evicted chunk's record was, a pack compaction retired, a damaged record), when
    /// its blob was pulled lazily: the fetcher finds where the store holds the chunk
    /// now, or fetches it again, and its answer is verified like any other. The
    /// request's cursor stays where it is. False (the caller fails the piece) for a
    /// converted blob, without a fetcher, or with no room to park.
    fn refetch(&mut self, w: Wait) -> bool {
        let (Some(fetcher), Some(mailbox), Some((table, index))) = (
            self.cfg.fetcher.clone(),
            self.mailbox.clone(),
            self.remote_index(&w),
        ) else {
            return false;
        };
        let Ok(ticket) = self.waits.insert(w) else {
            return false;
        };
        bump(&self.c().fetch_waits);
        if let Some(q) = self.reqs.get_mut(w.req) {
            q.in_flight += 1;
        }
        fetcher.request(table, index, Reply::Mailbox { mailbox, ticket });
        true
    }

    /// The table and entry of piece `w` when its blob was pulled lazily and a fetcher
    /// can get its chunk.
    fn remote_index(&self, w: &Wait) -> Option<(Arc<crate::store::BlobTable>, usize)> {
        self.cfg.fetcher.as_ref()?;
        let FillSource::Chunked(table) = &self.reqs.get(w.req)?.source else {
            return None;
        };
        table.remote()?;
        let index = table.index_at(w.slot_off)?;
        (table.entries()[index].digest == w.digest).then(|| (table.clone(), index))
    }

    /// Takes the fetcher's answers: fetched pieces queue for their pack reads, failed
    /// ones fail their requests (EIO).
    fn take_answers(&mut self) {
        let Some(mailbox) = self.mailbox.clone() else {
            return;
        };
        let mut answers = std::mem::take(&mut self.answers);
        mailbox.take(&mut answers);
        for (ticket, result) in answers.drain(..) {
            let Some(w) = self.waits.remove(ticket) else {
                tracing::error!(thread = self.id, ticket, "fetch answer for no parked piece");
                continue;
            };
            let waited = self.now.saturating_duration_since(w.parked).as_micros() as u64;
            if let Some(q) = self.reqs.get_mut(w.req) {
                q.fetch_us += waited;
            }
            match result {
                Ok(loc) => self.fetched.push_back((w, loc)),
                Err(e) => {
                    bump(&self.c().fetch_errors);
                    tracing::warn!(req = self.req_id(w.req), chunk = %w.digest, "fetching the chunk failed: {e}");
                    self.fail_piece(w.req, FillError::Fetch, true);
                }
            }
        }
        self.answers = answers;
    }

    /// Starts the pack reads of fetched pieces while buffers last.
    fn start_fetched(&mut self) {
        // Bounded by the queue's length: each pass starts, fails or stops.
        while let Some(&(w, loc)) = self.fetched.front() {
            if self.reqs.get_mut(w.req).is_some_and(|q| q.failed.is_some()) {
                // Nothing of a failed request is written: the piece just ends.
                self.fetched.pop_front();
                if let Some(q) = self.reqs.get_mut(w.req) {
                    q.in_flight -= 1;
                }
                self.maybe_finish(w.req);
                continue;
            }
            match self.start_run(w, loc, (0, 1), None) {
                Step::Blocked => return,
                Step::Started | Step::Done => {
                    self.fetched.pop_front();
                }
            }
        }
    }

    /// Inserts `op`, pushes its SQE (user_data patched in) and advances the cursor.
    fn submit_op(&mut self, r: u32, op: Op, entry: squeue::Entry, new_cursor: Option<u64>) -> Step {
        let i = match self.ops.insert(op) {
            Ok(i) => i,
            Err(op) => {
                // The caller checked for room; should it not hold, give the buffers back.
                self.release(&op);
                return Step::Blocked;
            }
        };
        let entry = entry.user_data(u64::from(i));
        if let Err(err) = self.push(&entry) {
            tracing::error!(thread = self.id, "submitting read: {err}");
            if let Some(op) = self.ops.remove(i) {
                self.release(&op);
            }
            bump(&self.c().source_errors);
            self.fail(r, FillError::Source);
            return Step::Done;
        }
        if let Some(q) = self.reqs.get_mut(r) {
            q.in_flight += 1;
            if let Some(c) = new_cursor {
                q.cursor = c;
            }
        }
        Step::Started
    }

    fn release(&mut self, op: &Op) {
        match *op {
            Op::PackRun { rbuf, sbuf, .. } => {
                self.pool.give(rbuf);
                if let Some(b) = sbuf {
                    self.pool.give(b);
                }
            }
            Op::FileRead { dbuf, .. } => self.pool.give(dbuf),
            Op::Write { buf, .. } => {
                if let Some(b) = buf {
                    self.pool.give(b);
                }
            }
        }
    }

    fn start_zero(&mut self, r: u32, cursor: u64, end: u64) -> Step {
        let len = (end - cursor).min(self.pool.zero_bytes() as u64) as u32;
        if let Some(q) = self.reqs.get_mut(r) {
            q.cursor = cursor + u64::from(len);
            q.in_flight += 1;
        }
        self.write(r, None, 0, len, cursor);
        Step::Started
    }

    /// Writes `len` bytes from `buf` (None: zeros) at buffer offset `at` to the target of
    /// `r` at `off`. The request's `in_flight` already counts this write.
    fn write(&mut self, r: u32, buf: Option<u16>, at: usize, len: u32, off: u64) {
        let Some(q) = self.reqs.get_mut(r) else {
            if let Some(b) = buf {
                self.pool.give(b);
            }
            return;
        };
        if q.failed.is_some() {
            self.write_done(r, buf, off, Err(io::Error::other("skipped")), false);
            return;
        }
        let target = q.target.clone();
        debug_assert!(off.is_multiple_of(PAGE_BYTES) && u64::from(len).is_multiple_of(PAGE_BYTES));
        let slot = buf.unwrap_or(self.pool.zero_index());
        match self.cfg.write_strategy {
            WriteStrategy::Sync => {
                // SAFETY: the slot is owned by this request (or is the zero slot) and no
                // I/O is in flight on it; `at + len` is within the slot (checked when the
                // piece was planned: w_len <= slot_len <= slot_bytes, and for a write
                // straight from a record buffer at + len <= record_len <= slot_bytes).
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.pool.ptr(slot).add(at), len as usize)
                };
                let t0 = Instant::now();
                let res = engine_sync::write_all_at(target.as_fd(), bytes, off);
                self.now = Instant::now();
                if let Some(q) = self.reqs.get_mut(r) {
                    q.write_us += self.now.saturating_duration_since(t0).as_micros() as u64;
                }
                self.write_done(r, buf, off, res.map(|()| len as usize), true);
            }
            WriteStrategy::Uring => {
                let Ok(i) = self.ops.insert(Op::Write {
                    req: r,
                    buf,
                    len,
                    off,
                    t0: self.now,
                }) else {
                    self.write_done(r, buf, off, Err(io::Error::other("no op slot")), true);
                    return;
                };
                // SAFETY: as above, `at + len` stays inside the slot.
                let ptr = unsafe { self.pool.ptr(slot).add(at) };
                let fixed = self.fixed_slot(slot);
                let e = engine_uring::write_entry(
                    target.as_raw_fd(),
                    ptr,
                    len,
                    fixed,
                    off,
                    u64::from(i),
                );
                if let Err(err) = self.push(&e) {
                    self.ops.remove(i);
                    self.write_done(r, buf, off, Err(err), true);
                }
            }
        }
    }

    fn write_done(
        &mut self,
        r: u32,
        buf: Option<u16>,
        off: u64,
        res: io::Result<usize>,
        count: bool,
    ) {
        if let Some(b) = buf {
            self.pool.give(b);
        }
        match res {
            Ok(n) => {
                self.c()
                    .bytes_written
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if n > 0 {
                    if let Some(token) = self.reqs.get_mut(r).and_then(|q| q.token.as_ref()) {
                        self.front.written(&mut self.local, token, off, n as u64);
                    }
                }
            }
            Err(e) => {
                if count {
                    bump(&self.c().write_errors);
                    tracing::warn!(req = self.req_id(r), "cache write failed: {e}");
                    self.fail(r, FillError::Write);
                }
            }
        }
        if let Some(q) = self.reqs.get_mut(r) {
            q.in_flight -= 1;
        }
        self.maybe_finish(r);
    }

    fn op_done(&mut self, i: u32, res: i32) {
        let Some(op) = self.ops.remove(i) else {
            tracing::error!(
                thread = self.id,
                user_data = i,
                "completion for no operation"
            );
            return;
        };
        match op {
            Op::Write {
                req,
                buf,
                len,
                off,
                t0,
            } => {
                let now = self.now;
                if let Some(q) = self.reqs.get_mut(req) {
                    q.write_us += now.saturating_duration_since(t0).as_micros() as u64;
                }
                let r = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else if res as u32 != len {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {res} of {len}"),
                    ))
                } else {
                    Ok(len as usize)
                };
                self.write_done(req, buf, off, r, true);
            }
            Op::PackRun {
                req,
                rbuf,
                sbuf,
                digest,
                loc,
                slot_off,
                index,
                n,
                read_len,
                w_off,
                w_len,
                t0,
                fetched,
                refetched,
            } => {
                self.c()
                    .chunks_fetched
                    .fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
                bump(&self.c().pack_reads);
                let now = self.now;
                if let Some(q) = self.reqs.get_mut(req) {
                    q.store_us += now.saturating_duration_since(t0).as_micros() as u64;
                }
                self.collect_run(req, (digest, *loc, slot_off), index, n);
                let outcome = if res < 0 {
                    Err((
                        0,
                        FillError::Source,
                        format!("pack read: {}", io::Error::from_raw_os_error(-res)),
                    ))
                } else if res as u32 != read_len {
                    Err((
                        0,
                        FillError::Chunk,
                        format!("pack read: {res} of {read_len} bytes"),
                    ))
                } else {
                    self.check_run(rbuf, sbuf, (w_off, w_len))
                };
                if let Some(b) = sbuf {
                    self.pool.give(b);
                }
                match outcome {
                    Ok(()) => {
                        if let Some(f) = &self.cfg.fetcher {
                            for (d, _, _) in &self.run {
                                f.touches().touch(*d);
                            }
                        }
                        let c = &self.counters[self.id];
                        let served = if fetched {
                            &c.fetched_bytes
                        } else {
                            &c.store_bytes
                        };
                        served.fetch_add(u64::from(w_len), std::sync::atomic::Ordering::Relaxed);
                        let at = HEADER_AREA_BYTES + (w_off - slot_off) as usize;
                        self.write(req, Some(rbuf), at, w_len, w_off);
                    }
                    Err((k, why, msg)) => {
                        self.pool.give(rbuf);
                        self.run_failed(req, k, (why, msg), (w_off, w_len), refetched);
                    }
                }
            }
            Op::FileRead {
                req,
                dbuf,
                off,
                len,
                data_bytes,
            } => {
                let got = if res < 0 { None } else { Some(res as usize) };
                match got {
                    Some(n) if n == len as usize || off + n as u64 >= data_bytes => {
                        self.pool.slot_mut(dbuf)[n..len as usize].fill(0);
                        self.write(req, Some(dbuf), 0, len, off);
                    }
                    _ => {
                        self.pool.give(dbuf);
                        bump(&self.c().source_errors);
                        let id = self.req_id(req);
                        tracing::warn!(
                            req = id,
                            offset = off,
                            "image read failed or short ({res})"
                        );
                        self.fail(req, FillError::Source);
                        self.write_done(req, None, 0, Ok(0), false);
                    }
                }
            }
        }
    }

    /// Fills `self.run` with the chunks of a run: `first`, then the entries after
    /// `index` in the request's table.
    fn collect_run(&mut self, r: u32, first: (ChunkDigest, ChunkLoc, u64), index: usize, n: u16) {
        self.run.clear();
        self.run.push(first);
        if n > 1 {
            if let Some(FillSource::Chunked(t)) = self.reqs.get(r).map(|q| &q.source) {
                let more = t.entries().get(index + 1..index + usize::from(n));
                self.run.extend(
                    more.into_iter()
                        .flatten()
                        .filter_map(|e| Some((e.digest, e.loc?, e.blob_offset))),
                );
            }
        }
    }

    /// Checks each chunk of the run in `self.run`, read into `rbuf` (and `sbuf`), and
    /// decodes its lz4 payloads into place: on success the data area of `rbuf` holds
    /// verified bytes over the write `(w_off, w_len)`, with zeros past each chunk's end
    /// up to its slot's. On failure, the index of the first chunk that failed.
    fn check_run(
        &mut self,
        rbuf: u16,
        sbuf: Option<u16>,
        (w_off, w_len): (u64, u32),
    ) -> Result<(), (usize, FillError, String)> {
        let trust_sum = !self.cfg.digest_on_read;
        let w_end = w_off + u64::from(w_len);
        let Some(&(_, _, base)) = self.run.first() else {
            return Err((0, FillError::Chunk, "an empty run".into()));
        };
        let (scratch, slot) = match sbuf {
            Some(b) => {
                let (s, r) = self.pool.pair_mut(b, rbuf);
                (s, r)
            }
            None => (&[][..], self.pool.slot_mut(rbuf)),
        };
        let (headers, data) = slot.split_at_mut(HEADER_AREA_BYTES);
        let mut spos = 0;
        for (k, (digest, loc, slot_off)) in self.run.iter().enumerate() {
            let raw_len = loc.raw_len as usize;
            let slot_len = raw_len.div_ceil(PAGE_BYTES as usize) * PAGE_BYTES as usize;
            let at = (slot_off - base) as usize;
            // The part of this chunk under the write.
            let from = (w_off.max(*slot_off) - slot_off) as usize;
            let to = (w_end.min(slot_off + slot_len as u64) - slot_off) as usize;
            let range = (from.min(raw_len), to.min(raw_len));
            let header = &headers[k * RECORD_HEADER_BYTES..(k + 1) * RECORD_HEADER_BYTES];
            let stored = loc.stored_len as usize;
            let checked = if loc.is_lz4() {
                let payload = scratch.get(spos..spos + stored).unwrap_or_default();
                spos += stored;
                let out = &mut data[at..at + raw_len];
                verify_split(header, payload, loc, digest, Some(out), range, trust_sum)
            } else {
                let payload = &data[at..at + stored];
                verify_split(header, payload, loc, digest, None, range, trust_sum)
            };
            if let Err(e) = checked {
                let msg = format!(
                    "chunk {digest} (pack {}, offset {}): {e}",
                    loc.pack, loc.offset
                );
                return Err((k, FillError::Chunk, msg));
            }
            data[at + raw_len..at + slot_len].fill(0);
        }
        Ok(())
    }

    /// Chunk `k` of the run in `self.run` (written to `(w_off, w_len)`) failed: for a
    /// lazily pulled blob each chunk of the run from `k` on is asked of the fetcher
    /// again, on its own (bounded by [`MAX_REFETCHES`]; the ones before `k` verified,
    /// but the run is written whole or not at all, so they are asked too, and the
    /// fetcher finds them in the store); otherwise the request fails (EIO).
    fn run_failed(
        &mut self,
        req: u32,
        k: usize,
        (why, msg): (FillError, String),
        (w_off, w_len): (u64, u32),
        refetched: u8,
    ) {
        let w_end = w_off + u64::from(w_len);
        let run = std::mem::take(&mut self.run);
        let mut parked = 0;
        if refetched < MAX_REFETCHES {
            for &(digest, loc, slot_off) in &run {
                let slot_end = slot_off + u64::from(loc.raw_len).div_ceil(PAGE_BYTES) * PAGE_BYTES;
                let piece_off = w_off.max(slot_off);
                let wait = Wait {
                    req,
                    digest,
                    slot_off,
                    w_off: piece_off,
                    w_len: (w_end.min(slot_end) - piece_off) as u32,
                    parked: self.now,
                    refetched: refetched + 1,
                };
                if !self.refetch(wait) {
                    break;
                }
                parked += 1;
            }
        }
        self.run = run;
        if parked == self.run.len() {
            // This op's count ends; each parked piece counts itself.
            let (d, l, _) = self.run[k.min(self.run.len() - 1)];
            tracing::debug!(req = self.req_id(req), chunk = %d, pack = l.pack, offset = l.offset, "{msg}: the chunk was evicted (or damaged) since its location was read; asking the fetcher");
            self.c()
                .refetches
                .fetch_add(parked as u64, std::sync::atomic::Ordering::Relaxed);
            self.write_done(req, None, 0, Ok(0), false);
            return;
        }
        let counter = match why {
            FillError::Chunk => &self.counters[self.id].chunk_errors,
            _ => &self.counters[self.id].source_errors,
        };
        bump(counter);
        tracing::warn!(req = self.req_id(req), "{msg}");
        self.fail(req, why);
        self.write_done(req, None, 0, Ok(0), false);
    }

    /// Id of request `r` for the log (0 if it is gone).
    fn req_id(&mut self, r: u32) -> u64 {
        self.reqs.get_mut(r).map_or(0, |q| q.id)
    }

    /// Keeps a request among this thread's slowest, and logs it if slower than
    /// [`SLOW_LOG_US`] (at most [`SLOW_LOGS_PER_SECOND`] lines a second).
    fn note_slow(&mut self, q: &Request<F::Token>, total_us: u64, ok: bool) {
        let blob = match &q.source {
            FillSource::Chunked(t) => t.id().to_string(),
            FillSource::File { .. } => "metadata image".to_string(),
        };
        if total_us >= SLOW_LOG_US {
            let (since, logged, suppressed) = &mut self.slow_logs;
            if self.now.saturating_duration_since(*since) >= Duration::from_secs(1) {
                *since = self.now;
                *logged = 0;
            }
            if *logged < SLOW_LOGS_PER_SECOND {
                *logged += 1;
                tracing::info!(
                    req = q.id,
                    blob = %blob,
                    offset = q.first,
                    len = q.end - q.first,
                    total_ms = total_us / 1000,
                    store_ms = q.store_us / 1000,
                    fetch_ms = q.fetch_us / 1000,
                    write_ms = q.write_us / 1000,
                    ok,
                    earlier_unlogged = *suppressed,
                    "slow fill request"
                );
                *suppressed = 0;
            } else {
                *suppressed += 1;
            }
        }
        if self.slow.wants(total_us) {
            let r = SlowRequest {
                req: q.id,
                blob,
                offset: q.first,
                len: q.end - q.first,
                total_us,
                store_us: q.store_us,
                fetch_us: q.fetch_us,
                write_us: q.write_us,
                ok,
                done_unix_ms: unix_ms_now(),
            };
            self.slow.keep(self.now, r, &self.counters[self.id].slowest);
        }
    }

    fn maybe_finish(&mut self, r: u32) {
        let Some(q) = self.reqs.get_mut(r) else {
            return;
        };
        if q.queued || q.in_flight > 0 || q.cursor < q.end {
            return;
        }
        let Some(mut q) = self.reqs.remove(r) else {
            return;
        };
        let outcome = match q.failed {
            None => FillOutcome::Ok,
            Some(e) => FillOutcome::Failed(e),
        };
        let now = Instant::now();
        self.now = now;
        let total_us = now.saturating_duration_since(q.started).as_micros() as u64;
        let c = &self.counters[self.id];
        bump(if outcome == FillOutcome::Ok {
            &c.reads_ok
        } else {
            &c.reads_failed
        });
        c.record_latency_us(total_us);
        if self.slow.wants(total_us) || total_us >= SLOW_LOG_US {
            self.note_slow(&q, total_us, outcome == FillOutcome::Ok);
        }
        let c = &self.counters[self.id];
        if let Some(token) = q.token.take() {
            self.front
                .complete(&mut self.local, token, &q.target, outcome, c);
        }
    }
}

/// Whether the record at `loc` can be read into a run: an lz4 payload goes aside, a raw
/// one to its slot, which holds exactly `raw_len` bytes of it.
fn placeable(loc: &ChunkLoc) -> bool {
    loc.is_lz4() || loc.stored_len == loc.raw_len
}

/// Registers `pool` with `ring` as fixed buffers. The table is made sparse and each slot
/// is registered on its first use ([`Worker::fixed_slot`]): registering pins, and so
/// makes resident, every page it covers, so a pool registered whole at start costs its
/// full size in memory (32 slots of a 1 MiB record each, per thread) even on an idle
/// node. Slots are reused most recently freed first, so the slots ever registered follow
/// the load. A kernel without sparse tables gets the whole pool at once; without fixed
/// buffers at all, plain reads and writes are used. Returns whether fixed buffers are
/// used and which slots are registered (the zero slot, last, always is).
fn register_pool(ring: &IoUring, pool: &BufPool, id: usize) -> (bool, Vec<bool>) {
    let n = pool.iovecs().len();
    let zero = pool.zero_index();
    let sub = ring.submitter();
    let sparse = sub.register_buffers_sparse(n as u32).and_then(|()| {
        // SAFETY: as in `Worker::fixed_slot`.
        unsafe { sub.register_buffers_update(u32::from(zero), &[pool.iovec(zero)], None) }
    });
    match sparse {
        Ok(()) => {
            let mut registered = vec![false; n];
            registered[zero as usize] = true;
            return (true, registered);
        }
        Err(e) => {
            let _ = sub.unregister_buffers();
            tracing::debug!(
                thread = id,
                "sparse buffer table: {e}; registering every slot"
            );
        }
    }
    // SAFETY: every iovec points into `pool`'s allocation, which outlives the ring.
    match unsafe { sub.register_buffers(&pool.iovecs()) } {
        Ok(()) => (true, vec![true; n]),
        Err(e) => {
            tracing::warn!(
                thread = id,
                "registering buffers failed ({e}); using plain reads and writes"
            );
            (false, vec![false; n])
        }
    }
}
