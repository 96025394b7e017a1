//! The cachefiles on-demand front end: turns OPEN / READ / CLOSE from a [`Device`] (the
//! real `/dev/cachefiles` or the simulator) into fill requests.
//!
//! Objects (object_id -> blob source + anon fd) live in a shared table changed only by
//! OPEN and CLOSE; each engine thread keeps its own cache of it, invalidated by an epoch
//! counter, so a READ costs one atomic load and a local hash lookup. The blob registry
//! is swapped whole ([`RegistryHandle::replace`]) and read only on OPEN.
//!
//! A READ whose range the cache file already holds (one a dead daemon filled and did
//! not complete, sent again after `restore`) is completed at once, unread.
//!
//! Only the shared table and in-flight fills own an object's anon fd; thread caches hold
//! weak references. A CLOSE must release the fd at once, even while other threads sleep
//! in poll: the kernel frees the cachefiles object, and with it the fscache volume, only
//! when the last fd is gone, and a later mount of the same domain waits for that volume
//! inside mount(2).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::frontend::cachefiles::abi::{CACHEFILES_MSG_MAX_SIZE, CACHEFILES_OP_OPEN};
use crate::frontend::cachefiles::{msg, send, Command, Device, Msg};
use crate::serve::stats::{bump, ThreadCounters};
use crate::serve::{FillOutcome, FillRequest, FillSource, FrontEnd, Next, MAX_FILL_BYTES};
use crate::store::Registry;

/// The blob registry as the data plane sees it: read on OPEN, replaced whole by the
/// control side.
#[derive(Default)]
pub struct RegistryHandle(RwLock<Arc<Registry>>);

impl RegistryHandle {
    /// A handle holding `reg`.
    pub fn new(reg: Registry) -> RegistryHandle {
        RegistryHandle(RwLock::new(Arc::new(reg)))
    }

    /// The current registry.
    pub fn load(&self) -> Arc<Registry> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs a new registry; objects already open keep their source.
    pub fn replace(&self, reg: Registry) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(reg);
    }
}

struct Object {
    source: FillSource,
    fd: Arc<OwnedFd>,
    /// The cookie key: the blob id (or the layer id, for its image).
    key: String,
}

/// Per-thread state: the message buffer and the object cache (weak: see the module doc).
pub struct Local {
    buf: Vec<u8>,
    cache: HashMap<u32, Weak<Object>>,
    epoch: u64,
}

/// The cachefiles front end over any [`Device`].
pub struct CachefilesFront {
    dev: Arc<dyn Device>,
    registry: Arc<RegistryHandle>,
    objects: RwLock<HashMap<u32, Arc<Object>>>,
    epoch: AtomicU64,
    opens_by_blob: Mutex<BTreeMap<String, u64>>,
}

/// Distinct blob names tracked in the per-blob OPEN counts.
const MAX_TRACKED_BLOBS: usize = 65536;

impl CachefilesFront {
    /// A front end reading `dev`, serving blobs of `registry`.
    pub fn new(dev: Arc<dyn Device>, registry: Arc<RegistryHandle>) -> CachefilesFront {
        CachefilesFront {
            dev,
            registry,
            objects: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(1),
            opens_by_blob: Mutex::new(BTreeMap::new()),
        }
    }

    /// Objects currently open.
    pub fn open_objects(&self) -> usize {
        self.objects.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Data bytes of the cache files of open objects whose cookie key `wanted` accepts,
    /// by key. An object in use is a file the kernel has not linked into the cache
    /// directory yet (it does so when the object is withdrawn), so a walk of the
    /// directory cannot see it; its anon fd seeks in it (`SEEK_DATA` / `SEEK_HOLE`).
    pub fn open_data_bytes(&self, wanted: &dyn Fn(&str) -> bool) -> HashMap<String, u64> {
        let objects: Vec<Arc<Object>> = self
            .objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|o| wanted(&o.key))
            .cloned()
            .collect();
        let mut out: HashMap<String, u64> = HashMap::new();
        for o in objects {
            // Summed: each volume (a layer's fsid) has its own object of a shared blob.
            *out.entry(o.key.clone()).or_default() += data_bytes(&o.fd, o.source.size_bytes());
        }
        out
    }

    fn copen(&self, msg_id: u32, size: Result<u64, i32>) -> io::Result<()> {
        send(&*self.dev, &Command::Copen { msg_id, size })
    }

    fn lookup(&self, local: &mut Local, object_id: u32) -> Option<Arc<Object>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if epoch != local.epoch {
            local.cache.clear();
            local.epoch = epoch;
        }
        if let Some(o) = local.cache.get(&object_id).and_then(Weak::upgrade) {
            return Some(o);
        }
        let found = self
            .objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&object_id)
            .cloned();
        match found {
            Some(o) => {
                local.cache.insert(object_id, Arc::downgrade(&o));
                Some(o)
            }
            None => {
                local.cache.remove(&object_id);
                None
            }
        }
    }

    fn on_open(
        &self,
        msg_id: u32,
        object_id: u32,
        volume_key: &str,
        cookie_key: &str,
        raw_fd: u32,
        c: &ThreadCounters,
    ) {
        // SAFETY: the device installed this fd in our table for this OPEN (the kernel
        // does so when the message is read; the simulator dups a fresh fd); nothing else
        // owns it, and a successfully parsed OPEN is the only place we take it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw_fd as i32) };
        // The kernel installs it without O_CLOEXEC; keep it out of any child process.
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        bump(&c.opens);
        {
            let mut m = self.opens_by_blob.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() < MAX_TRACKED_BLOBS || m.contains_key(cookie_key) {
                *m.entry(cookie_key.to_string()).or_default() += 1;
            }
        }
        let reg = self.registry.load();
        let source = match reg.blobs.get(cookie_key) {
            None => {
                tracing::warn!(volume_key, blob = cookie_key, "OPEN of an unknown blob");
                Err(libc::ENOENT)
            }
            Some(b) => FillSource::open(b).map_err(|e| {
                tracing::warn!(
                    blob = cookie_key,
                    "OPEN: cannot open the blob's source: {e}"
                );
                libc::EIO
            }),
        };
        match source {
            Err(errno) => {
                bump(&c.opens_failed);
                if let Err(e) = self.copen(msg_id, Err(errno)) {
                    tracing::warn!(msg_id, "copen: {e}");
                }
                drop(fd); // An OPEN answered with an error keeps no fd.
            }
            Ok(source) => {
                let size = source.size_bytes();
                let obj = Arc::new(Object {
                    source,
                    fd: Arc::new(fd),
                    key: cookie_key.to_string(),
                });
                // Insert before the reply: READs for the object may follow at once.
                self.objects
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(object_id, obj);
                self.epoch.fetch_add(1, Ordering::Release);
                tracing::debug!(object_id, blob = cookie_key, size, "OPEN");
                if let Err(e) = self.copen(msg_id, Ok(size)) {
                    tracing::warn!(msg_id, blob = cookie_key, "copen: {e}");
                    bump(&c.opens_failed);
                    self.remove(object_id);
                }
            }
        }
    }

    fn remove(&self, object_id: u32) -> bool {
        let gone = self
            .objects
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&object_id)
            .is_some();
        self.epoch.fetch_add(1, Ordering::Release);
        gone
    }
}

impl FrontEnd for CachefilesFront {
    type Token = u32;
    type Local = Local;

    fn name(&self) -> &'static str {
        "cachefiles"
    }

    fn new_local(&self) -> Local {
        Local {
            buf: vec![0u8; CACHEFILES_MSG_MAX_SIZE],
            cache: HashMap::new(),
            epoch: 0,
        }
    }

    fn poll_fd(&self) -> std::os::fd::RawFd {
        self.dev.poll_fd()
    }

    fn next(&self, local: &mut Local, c: &ThreadCounters) -> Next<u32> {
        let n = match self.dev.read_msg(&mut local.buf) {
            Ok(0) => return Next::Empty,
            Ok(n) => n.min(local.buf.len()),
            Err(e) => return Next::Error(e),
        };
        let parsed = msg::parse(&local.buf[..n]);
        match parsed {
            Err(e) => {
                bump(&c.malformed_messages);
                tracing::warn!("malformed cachefiles message: {e}");
                // An OPEN we cannot parse still waits for an answer: refuse it. Its fd
                // (if any) is not trusted and so not closed.
                if let Some((msg_id, CACHEFILES_OP_OPEN)) = msg::peek_header(&local.buf[..n]) {
                    if let Err(e) = self.copen(msg_id, Err(libc::EINVAL)) {
                        tracing::debug!(msg_id, "copen of a malformed OPEN: {e}");
                    }
                }
                Next::Handled
            }
            Ok(Msg::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key,
                fd,
                ..
            }) => {
                self.on_open(msg_id, object_id, &volume_key, &cookie_key, fd, c);
                Next::Handled
            }
            Ok(Msg::Close { object_id }) => {
                bump(&c.closes);
                if !self.remove(object_id) {
                    tracing::debug!(object_id, "CLOSE of an unknown object");
                }
                local.cache.remove(&object_id);
                Next::Handled
            }
            Ok(Msg::Read {
                msg_id,
                object_id,
                off,
                len,
            }) => {
                let Some(obj) = self.lookup(local, object_id) else {
                    bump(&c.unknown_objects);
                    tracing::warn!(msg_id, object_id, "READ for an unknown object");
                    return Next::Handled;
                };
                if len == 0
                    || len > MAX_FILL_BYTES
                    || off.checked_add(len).is_none()
                    || off >= obj.source.size_bytes()
                {
                    bump(&c.insane_reads);
                    tracing::warn!(msg_id, object_id, off, len, "READ of an insane range");
                    let refused = FillOutcome::Failed(crate::serve::FillError::Source);
                    self.complete(local, msg_id, &obj.fd, refused, c);
                    return Next::Handled;
                }
                if already_cached(&obj.fd, off, len) {
                    // A READ a dead daemon filled and did not complete, sent again after
                    // `restore`: the cache file holds it; nothing is read twice.
                    bump(&c.reads);
                    bump(&c.reads_ok);
                    self.complete(local, msg_id, &obj.fd, FillOutcome::Ok, c);
                    return Next::Handled;
                }
                Next::Fill(FillRequest {
                    source: obj.source.clone(),
                    offset: off,
                    len,
                    target: obj.fd.clone(),
                    token: msg_id,
                })
            }
        }
    }

    fn complete(
        &self,
        _local: &mut Local,
        msg_id: u32,
        target: &OwnedFd,
        _outcome: FillOutcome,
        c: &ThreadCounters,
    ) {
        // Failed or not, the kernel is told; an unwritten range reads as EIO.
        match self.dev.complete_read(target.as_raw_fd(), msg_id) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => bump(&c.complete_einval),
            Err(e) => {
                bump(&c.complete_errors);
                tracing::warn!(msg_id, "READ_COMPLETE: {e}");
            }
        }
    }

    fn opens_by_blob(&self) -> BTreeMap<String, u64> {
        self.opens_by_blob
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Extents of data a bytes count walks per file, at most.
const MAX_EXTENTS: usize = 1 << 16;

/// Bytes of `[0, size)` in data extents of the file behind `fd` (0 if it cannot seek).
fn data_bytes(fd: &OwnedFd, size: u64) -> u64 {
    use nix::unistd::{lseek, Whence};
    let mut total = 0;
    let mut pos: i64 = 0;
    let end = i64::try_from(size).unwrap_or(i64::MAX);
    // Bounded by MAX_EXTENTS; each turn moves past one data extent.
    for _ in 0..MAX_EXTENTS {
        if pos >= end {
            break;
        }
        let Ok(data) = lseek(fd, pos, Whence::SeekData) else {
            break; // ENXIO: no data after pos.
        };
        let Ok(hole) = lseek(fd, data, Whence::SeekHole) else {
            break;
        };
        let hole = hole.min(end);
        if hole <= data {
            break;
        }
        total += (hole - data) as u64;
        pos = hole;
    }
    total
}

/// True when the cache file behind `fd` holds every byte of `[off, off + len)`: no hole
/// starts before the range's end (`SEEK_HOLE`; an object's anon fd seeks in its cache
/// file). The kernel asks only for ranges it lacks, so this holds only for a READ that a
/// dead daemon filled without completing, re-sent after `restore`.
fn already_cached(fd: &OwnedFd, off: u64, len: u64) -> bool {
    let Ok(start) = i64::try_from(off) else {
        return false;
    };
    match nix::unistd::lseek(fd, start, nix::unistd::Whence::SeekHole) {
        Ok(hole) => u64::try_from(hole).is_ok_and(|h| h >= off.saturating_add(len)),
        Err(_) => false,
    }
}
