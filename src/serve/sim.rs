//! A simulator of `/dev/cachefiles` on-demand mode, for tests, benches and fuzzing.
//!
//! It stands where the kernel would: it queues byte-exact OPEN / READ / CLOSE messages
//! (volume key `erofs,<domain>` + NUL, cookie key = blob name), hands out real files as
//! anon fds (each OPEN carries a fresh `dup` of an `O_DIRECT` cache file on the caller's
//! filesystem, so unaligned writes fail as the kernel's DIO writes do), and enforces the
//! kernel's rules: READs are page-aligned and inside the object, `read()` returns one
//! message or 0 when the queue is empty, readiness is signalled through an eventfd.
//! It records `copen` replies and READ completions; on every completion it checks the
//! completed range of the cache file against the blob's expected bytes: a range fully
//! written with the right bytes is served, a range with holes is EIO for the reader, and
//! any written byte that differs is a violation.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::frontend::cachefiles::msg::{encode_close, encode_open, encode_read, OPEN_FD_OFFSET};
use crate::frontend::cachefiles::{parse_copen, Device};

/// Page size of the simulated kernel.
pub const SIM_PAGE_BYTES: u64 = 4096;
/// Messages queued at most (the kernel bounds its xarray by memory; we bound it here).
pub const MAX_QUEUED: usize = 1 << 16;

/// Errors of the simulator's reader-side API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimError {
    /// No blob of that name was added.
    #[error("blob {0} is not known to the simulator")]
    UnknownBlob(String),
    /// No open object with that id.
    #[error("object {0} is not open")]
    NotOpen(u32),
    /// A READ the kernel would never send (unaligned, empty, or past the object's end).
    #[error("READ {off}+{len} breaks the kernel's rules for an object of {size} bytes")]
    BadRead {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Object size.
        size: u64,
    },
    /// The daemon did not answer in time.
    #[error("timed out waiting for the daemon")]
    Timeout,
    /// The daemon refused the OPEN with this errno.
    #[error("OPEN refused with errno {0}")]
    OpenRefused(i32),
    /// The message queue is full.
    #[error("message queue full")]
    QueueFull,
}

/// What a reader saw for one READ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The range was written with exactly the right bytes.
    Served,
    /// Part of the range stayed a hole: the reader gets EIO.
    Eio,
    /// Some written byte was wrong (recorded as a violation).
    Wrong,
    /// The reader was killed before completion (or its object closed).
    Cancelled,
    /// Completed without verification (verification off).
    Completed,
}

/// One READ in flight, as the reader holds it.
pub struct ReadTicket {
    slot: Arc<ReadSlot>,
}

struct ReadSlot {
    msg_id: u32,
    object_id: u32,
    blob: Arc<SimBlob>,
    off: u64,
    len: u64,
    sent: Instant,
    result: Mutex<Option<(ReadOutcome, Duration)>>,
    cv: Condvar,
}

impl ReadSlot {
    fn finish(&self, outcome: ReadOutcome) {
        let mut r = lock(&self.result);
        if r.is_none() {
            *r = Some((outcome, self.sent.elapsed()));
        }
        self.cv.notify_all();
    }
}

impl ReadTicket {
    /// The READ's msg_id.
    pub fn msg_id(&self) -> u32 {
        self.slot.msg_id
    }

    /// Waits for the completion; returns the outcome and the latency seen by the reader.
    pub fn wait(&self, timeout: Duration) -> Option<(ReadOutcome, Duration)> {
        let deadline = Instant::now() + timeout;
        let mut r = lock(&self.slot.result);
        loop {
            if let Some(v) = *r {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            r = self
                .slot
                .cv
                .wait_timeout(r, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

struct SimBlob {
    name: String,
    expected: Arc<[u8]>,
    direct: File,
    check: File,
    ino: u64,
}

struct PendingOpen {
    object_id: u32,
    blob: Arc<SimBlob>,
    reply: Option<Result<u64, i32>>,
}

enum Queued {
    Open { object_id: u32, bytes: Vec<u8> },
    Raw(Vec<u8>),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    next_msg_id: u32,
    next_object_id: u32,
    blobs: HashMap<String, Arc<SimBlob>>,
    /// object_id -> blob, for objects whose OPEN was sent.
    objects: HashMap<u32, (Arc<SimBlob>, Option<u64>)>,
    opens: HashMap<u32, PendingOpen>,
    reads: HashMap<u32, Arc<ReadSlot>>,
    copens: Vec<(u32, Result<u64, i32>)>,
    commands: Vec<String>,
    violations: Vec<String>,
    completions: u64,
    einval: u64,
}

/// The simulated device. Share it as `Arc<Sim>`; it implements [`Device`].
pub struct Sim {
    dir: PathBuf,
    domain: String,
    evfd: OwnedFd,
    verify: bool,
    state: Mutex<State>,
    opened: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    /// A simulator whose cache files live in `dir` (must support O_DIRECT and holes:
    /// ext4 or xfs, not tmpfs). `verify` checks every completed range.
    pub fn new(dir: &Path, domain: &str, verify: bool) -> io::Result<Sim> {
        std::fs::create_dir_all(dir)?;
        // SAFETY: eventfd(2) with valid flags; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Sim {
            dir: dir.to_path_buf(),
            domain: domain.to_string(),
            // SAFETY: `raw` is a fresh fd that we own.
            evfd: unsafe { OwnedFd::from_raw_fd(raw) },
            verify,
            state: Mutex::new(State {
                next_msg_id: 1,
                next_object_id: 1,
                ..State::default()
            }),
            opened: Condvar::new(),
        })
    }

    /// Declares a blob the kernel may open, with the bytes it must read back (its full
    /// size, zero-padded). Creates its empty cache file.
    pub fn add_blob(&self, name: &str, expected: Arc<[u8]>) -> io::Result<()> {
        let path = self.dir.join(name);
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let check = File::open(&path)?;
        let ino = direct.metadata()?.ino();
        lock(&self.state).blobs.insert(
            name.to_string(),
            Arc::new(SimBlob {
                name: name.to_string(),
                expected,
                direct,
                check,
                ino,
            }),
        );
        Ok(())
    }

    /// Empties a blob's cache file (as if the cache were culled), keeping it declared.
    pub fn punch(&self, name: &str) -> io::Result<()> {
        let st = lock(&self.state);
        let b = st
            .blobs
            .get(name)
            .ok_or_else(|| io::Error::other("unknown blob"))?;
        let len = b.direct.metadata()?.len();
        b.direct.set_len(0)?;
        b.direct.set_len(len)
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        let _ = unsafe { libc::write(self.evfd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn alloc_msg_id(st: &mut State) -> u32 {
        // Cyclic, skipping ids still in use, like the kernel's xarray allocation.
        for _ in 0..MAX_QUEUED * 2 {
            let id = st.next_msg_id;
            st.next_msg_id = st.next_msg_id.wrapping_add(1).max(1);
            if !st.reads.contains_key(&id) && !st.opens.contains_key(&id) {
                return id;
            }
        }
        st.next_msg_id
    }

    fn enqueue(&self, st: &mut State, q: Queued) -> Result<(), SimError> {
        if st.queue.len() >= MAX_QUEUED {
            return Err(SimError::QueueFull);
        }
        st.queue.push_back(q);
        self.signal();
        Ok(())
    }

    /// Queues an OPEN for `blob` and waits for the daemon's `copen`; returns the new
    /// object's id and the size the daemon reported.
    pub fn open(&self, blob: &str, timeout: Duration) -> Result<(u32, u64), SimError> {
        let mut st = lock(&self.state);
        let b = st
            .blobs
            .get(blob)
            .cloned()
            .ok_or_else(|| SimError::UnknownBlob(blob.to_string()))?;
        let msg_id = Self::alloc_msg_id(&mut st);
        let object_id = st.next_object_id;
        st.next_object_id = st.next_object_id.wrapping_add(1).max(1);
        let volume = format!("erofs,{}", self.domain);
        let bytes = encode_open(msg_id, object_id, &volume, blob.as_bytes(), u32::MAX, 0)
            .ok_or_else(|| SimError::UnknownBlob(blob.to_string()))?;
        st.opens.insert(
            msg_id,
            PendingOpen {
                object_id,
                blob: b.clone(),
                reply: None,
            },
        );
        st.objects.insert(object_id, (b, None));
        self.enqueue(&mut st, Queued::Open { object_id, bytes })?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reply) = st.opens.get(&msg_id).and_then(|p| p.reply) {
                st.opens.remove(&msg_id);
                return match reply {
                    Ok(size) => Ok((object_id, size)),
                    Err(e) => {
                        st.objects.remove(&object_id);
                        Err(SimError::OpenRefused(e))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SimError::Timeout);
            }
            st = self
                .opened
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Queues a READ of `[off, off + len)` of an open object, as the kernel would send it.
    pub fn submit_read(&self, object_id: u32, off: u64, len: u64) -> Result<ReadTicket, SimError> {
        self.submit(object_id, off, len, true)
    }

    /// Queues a READ without the kernel's checks (fault injection: insane sizes).
    pub fn submit_read_unchecked(
        &self,
        object_id: u32,
        off: u64,
        len: u64,
    ) -> Result<ReadTicket, SimError> {
        self.submit(object_id, off, len, false)
    }

    fn submit(
        &self,
        object_id: u32,
        off: u64,
        len: u64,
        check: bool,
    ) -> Result<ReadTicket, SimError> {
        let mut st = lock(&self.state);
        let (blob, size) = match st.objects.get(&object_id) {
            Some((b, Some(size))) => (b.clone(), *size),
            _ => return Err(SimError::NotOpen(object_id)),
        };
        let rounded = size.div_ceil(SIM_PAGE_BYTES) * SIM_PAGE_BYTES;
        if check
            && (!off.is_multiple_of(SIM_PAGE_BYTES)
                || !len.is_multiple_of(SIM_PAGE_BYTES)
                || len == 0
                || off.checked_add(len).is_none_or(|e| e > rounded))
        {
            return Err(SimError::BadRead { off, len, size });
        }
        let msg_id = Self::alloc_msg_id(&mut st);
        let slot = Arc::new(ReadSlot {
            msg_id,
            object_id,
            blob,
            off,
            len,
            sent: Instant::now(),
            result: Mutex::new(None),
            cv: Condvar::new(),
        });
        st.reads.insert(msg_id, slot.clone());
        if let Err(e) = self.enqueue(
            &mut st,
            Queued::Raw(encode_read(msg_id, object_id, off, len)),
        ) {
            st.reads.remove(&msg_id);
            return Err(e);
        }
        Ok(ReadTicket { slot })
    }

    /// A blocking READ.
    pub fn read(
        &self,
        object_id: u32,
        off: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<ReadOutcome, SimError> {
        let t = self.submit_read(object_id, off, len)?;
        match t.wait(timeout) {
            Some((o, _)) => Ok(o),
            None => {
                self.cancel(&t);
                Err(SimError::Timeout)
            }
        }
    }

    /// A reader's read as the kernel serves it: from the cache file when the range has
    /// no hole (no message at all), else through a READ for the range.
    pub fn read_like_kernel(
        &self,
        object_id: u32,
        off: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<ReadOutcome, SimError> {
        let blob = match lock(&self.state).objects.get(&object_id) {
            Some((b, Some(_))) => b.clone(),
            _ => return Err(SimError::NotOpen(object_id)),
        };
        let end = off.saturating_add(len);
        let cached: u64 = data_ranges(&blob.check, off, end)
            .iter()
            .map(|(a, e)| e - a)
            .sum();
        if cached < len {
            return self.read(object_id, off, len, timeout);
        }
        if !self.verify {
            return Ok(ReadOutcome::Completed);
        }
        Ok(match check_range(&blob, off, len) {
            (_, Some(w)) => {
                lock(&self.state)
                    .violations
                    .push(format!("cached read of blob {}: {w}", blob.name));
                ReadOutcome::Wrong
            }
            _ => ReadOutcome::Served,
        })
    }

    /// The reader is killed: its READ is dropped, a later completion gets EINVAL.
    pub fn cancel(&self, t: &ReadTicket) {
        lock(&self.state).reads.remove(&t.slot.msg_id);
        t.slot.finish(ReadOutcome::Cancelled);
    }

    /// Queues a CLOSE; pending READs of the object fail (EIO) as in the kernel.
    pub fn close(&self, object_id: u32) -> Result<(), SimError> {
        let mut st = lock(&self.state);
        if st.objects.remove(&object_id).is_none() {
            return Err(SimError::NotOpen(object_id));
        }
        let dead: Vec<u32> = st
            .reads
            .iter()
            .filter(|(_, s)| s.object_id == object_id)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            if let Some(s) = st.reads.remove(&id) {
                s.finish(ReadOutcome::Cancelled);
            }
        }
        let msg_id = Self::alloc_msg_id(&mut st);
        self.enqueue(&mut st, Queued::Raw(encode_close(msg_id, object_id)))
    }

    /// Queues arbitrary bytes as one message (malformed-input tests).
    pub fn inject(&self, bytes: Vec<u8>) -> Result<(), SimError> {
        let mut st = lock(&self.state);
        self.enqueue(&mut st, Queued::Raw(bytes))
    }

    /// Every `copen` reply received: (msg_id, size or errno).
    pub fn copens(&self) -> Vec<(u32, Result<u64, i32>)> {
        lock(&self.state).copens.clone()
    }

    /// Every other command written (`dir ...`, `bind ondemand`, ...).
    pub fn commands(&self) -> Vec<String> {
        lock(&self.state).commands.clone()
    }

    /// Rule breaks seen so far (wrong bytes, completions on the wrong fd, bad sizes).
    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }

    /// READ completions accepted, and completions refused with EINVAL.
    pub fn completion_counts(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.completions, st.einval)
    }

    /// Messages still queued plus READs not yet completed.
    pub fn outstanding(&self) -> usize {
        let st = lock(&self.state);
        st.queue.len() + st.reads.len()
    }

    /// Checks every cache file whole, at rest: each written page must hold exactly the
    /// expected bytes. Returns the violations found (also recorded).
    pub fn check_all(&self) -> Vec<String> {
        let blobs: Vec<Arc<SimBlob>> = lock(&self.state).blobs.values().cloned().collect();
        let mut out = Vec::new();
        for b in blobs {
            let len = b.check.metadata().map(|m| m.len()).unwrap_or(0);
            let (_, wrong) = check_range(&b, 0, len);
            if let Some(w) = wrong {
                out.push(format!("blob {}: {w}", b.name));
            }
        }
        lock(&self.state).violations.extend(out.iter().cloned());
        out
    }

    /// Anon fds of `blob` the daemon still holds (every open fd of this process on the
    /// blob's cache file, less the simulator's own two). The kernel frees a cachefiles
    /// object only when its last anon fd is closed, so after a CLOSE this must reach 0.
    pub fn daemon_fds(&self, blob: &str) -> io::Result<usize> {
        let Some(b) = lock(&self.state).blobs.get(blob).cloned() else {
            return Ok(0);
        };
        let dev = b.check.metadata()?.dev();
        let mut n = 0usize;
        for e in std::fs::read_dir("/proc/self/fd")? {
            // An fd closed while we list is simply not counted.
            let Ok(m) = std::fs::metadata(e?.path()) else {
                continue;
            };
            if m.ino() == b.ino && m.dev() == dev {
                n += 1;
            }
        }
        Ok(n.saturating_sub(2))
    }

    /// Bytes of `blob`'s cache file that are written (not holes).
    pub fn cached_bytes(&self, blob: &str) -> u64 {
        let Some(b) = lock(&self.state).blobs.get(blob).cloned() else {
            return 0;
        };
        let len = b.check.metadata().map(|m| m.len()).unwrap_or(0);
        data_ranges(&b.check, 0, len)
            .iter()
            .map(|(a, e)| e - a)
            .sum()
    }
}

/// Data (non-hole) extents of `f` inside `[start, end)`.
fn data_ranges(f: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    // Bounded: each pass advances `pos` or stops.
    while pos < end {
        // SAFETY: lseek on an fd we own; no memory involved.
        let d = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if d < 0 || d as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).min(end) };
        if h <= d as u64 {
            break;
        }
        out.push((d as u64, h));
        pos = h;
    }
    out
}

/// Checks `[off, off + len)`: returns (fully written, first wrong byte found).
fn check_range(b: &SimBlob, off: u64, len: u64) -> (bool, Option<String>) {
    let end = off + len;
    let data = data_ranges(&b.check, off, end);
    let written: u64 = data.iter().map(|(a, e)| e - a).sum();
    let mut buf = Vec::new();
    for (a, e) in data {
        buf.resize((e - a) as usize, 0);
        if b.check.read_exact_at(&mut buf, a).is_err() {
            return (false, Some(format!("cannot read back {a}..{e}")));
        }
        let want = |p: u64| b.expected.get(p as usize).copied().unwrap_or(0);
        for (i, &got) in buf.iter().enumerate() {
            let p = a + i as u64;
            if got != want(p) {
                // A page being written concurrently may read as zeros for a moment:
                // read it once more before calling it wrong.
                let page = p / SIM_PAGE_BYTES * SIM_PAGE_BYTES;
                let mut again = vec![0u8; SIM_PAGE_BYTES as usize];
                let _ = b.check.read_at(&mut again, page);
                let rel = (p - page) as usize;
                if again[rel] != want(p) {
                    return (
                        false,
                        Some(format!(
                            "byte {p} is {:#04x}, expected {:#04x}",
                            again[rel],
                            want(p)
                        )),
                    );
                }
            }
        }
    }
    (written == len, None)
}

impl Device for Sim {
    fn poll_fd(&self) -> RawFd {
        self.evfd.as_raw_fd()
    }

    fn read_msg(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = lock(&self.state);
        let Some(front) = st.queue.front() else {
            let mut counter = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer from our non-blocking eventfd;
            // EAGAIN (already zero) is fine.
            let _ = unsafe { libc::read(self.evfd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
            return Ok(0);
        };
        let need = match front {
            Queued::Open { bytes, .. } | Queued::Raw(bytes) => bytes.len(),
        };
        if buf.len() < need {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        let q = st.queue.pop_front().expect("front exists");
        match q {
            Queued::Raw(bytes) => {
                buf[..need].copy_from_slice(&bytes);
            }
            Queued::Open {
                object_id,
                mut bytes,
            } => {
                // Like the kernel, install the anon fd when the OPEN is read.
                let blob = st.objects.get(&object_id).map(|(b, _)| b.clone());
                let fd = match blob {
                    // SAFETY: dup(2) of an fd we own; the result is checked.
                    Some(b) => unsafe { libc::dup(b.direct.as_raw_fd()) },
                    None => -1,
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                bytes[OPEN_FD_OFFSET..OPEN_FD_OFFSET + 4]
                    .copy_from_slice(&(fd as u32).to_ne_bytes());
                buf[..need].copy_from_slice(&bytes);
            }
        }
        Ok(need)
    }

    fn write_cmd(&self, cmd: &[u8]) -> io::Result<()> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let mut st = lock(&self.state);
        if cmd.contains(&0) {
            return Err(einval());
        }
        let Some((msg_id, reply)) = parse_copen(cmd) else {
            let text = String::from_utf8_lossy(cmd).trim_end().to_string();
            let known = ["dir ", "tag ", "bind ondemand", "restore"];
            if !known.iter().any(|k| text.starts_with(k)) || text.starts_with("copen") {
                return Err(einval());
            }
            st.commands.push(text);
            return Ok(());
        };
        let Some(p) = st.opens.get(&msg_id) else {
            return Err(einval());
        };
        if p.reply.is_some() {
            return Err(einval());
        }
        let (object_id, blob) = (p.object_id, p.blob.clone());
        st.copens.push((msg_id, reply));
        if let Ok(size) = reply {
            if size != blob.expected.len() as u64 {
                st.violations.push(format!(
                    "copen {msg_id}: size {size} for blob {} of {} bytes",
                    blob.name,
                    blob.expected.len()
                ));
            }
            if blob.direct.metadata()?.len() < size {
                blob.direct.set_len(size)?;
            }
            if let Some(o) = st.objects.get_mut(&object_id) {
                o.1 = Some(size);
            }
        }
        if let Some(p) = st.opens.get_mut(&msg_id) {
            p.reply = Some(reply);
        }
        self.opened.notify_all();
        Ok(())
    }

    fn complete_read(&self, anon_fd: RawFd, msg_id: u32) -> io::Result<()> {
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        // SAFETY: fstat on a caller's fd into a zeroed stat buffer we own.
        let ino = unsafe {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::fstat(anon_fd, &mut stat) < 0 {
                return Err(io::Error::last_os_error());
            }
            stat.st_ino
        };
        let slot = {
            let mut st = lock(&self.state);
            let Some(slot) = st.reads.get(&msg_id).cloned() else {
                st.einval += 1;
                return Err(einval);
            };
            if slot.blob.ino != ino {
                st.violations.push(format!(
                    "READ {msg_id} of blob {} completed on another object's fd",
                    slot.blob.name
                ));
                return Err(einval);
            }
            st.reads.remove(&msg_id);
            st.completions += 1;
            slot
        };
        let outcome = if self.verify {
            let (full, wrong) = check_range(&slot.blob, slot.off, slot.len);
            match wrong {
                Some(w) => {
                    lock(&self.state).violations.push(format!(
                        "READ {msg_id} of blob {} [{}, +{}): {w}",
                        slot.blob.name, slot.off, slot.len
                    ));
                    ReadOutcome::Wrong
                }
                None if full => ReadOutcome::Served,
                None => ReadOutcome::Eio,
            }
        } else {
            ReadOutcome::Completed
        };
        slot.finish(outcome);
        Ok(())
    }
}
