//! How the cachefiles cache outlives the daemon, and how a successor takes it over.
//!
//! The cache lives as long as some copy of the bound `/dev/cachefiles` fd does, so the
//! daemon never holds the only one. Who keeps the other copy ([`Keeper`]):
//! - **systemd's fd store**, when `$NOTIFY_SOCKET` is set: after binding, the daemon
//!   sends the fd with `FDSTORE=1` and `FDNAME=cachefiles`; a restarted daemon gets it
//!   back in `$LISTEN_FDS` (`dist/dedupd.service` sets `FileDescriptorStoreMax` and
//!   `FileDescriptorStorePreserve=yes`, so a stop or a failed start keeps it too);
//! - otherwise a **holder process** ([`super::holder`], `ROOT/cachefiles/holder.sock`),
//!   started by the first daemon, replaced by the daemon if it dies;
//! - or a **supervisor** that passed the fd in `DEDUPD_CACHEFILES_FD` and keeps its own.
//!
//! A successor takes the fd (no `dir`, `tag` or `bind`: the device refuses them), loads
//! the blob registry, and writes `restore` once, before its first read of the device
//! ([`acquire`] returns [`Acquired::continued`]; the daemon writes `restore` after the
//! registry is loaded and before the engine starts). The kernel then re-delivers every
//! request the dead daemon had read and not answered, and each object a READ needs comes
//! back as a new OPEN with the same keys, a new object id and a new fd; the front end
//! answers it with the same size as before (sizes come from the store, which has every
//! blob before it is mounted) and skips ranges the cache file already holds (the dead
//! daemon may have written them without completing the READ). Mounts are not touched:
//! they keep working across the restart, readers of uncached ranges wait for it.
//!
//! A clean stop with nothing mounted gives the cache up ([`Keeper::release`]): the holder
//! exits (or the fd store forgets the fd), the cache unbinds, and another daemon (or
//! root) can bind the device. With layers still mounted the keeper keeps it.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::{send, CachefilesDevice, Command, DEVICE_PATH};
use crate::frontend::holder::MESSAGE_BYTES;

/// Environment variable naming an inherited `/dev/cachefiles` fd (a supervisor keeps its
/// own copy): the daemon takes the cache over instead of binding one.
pub const CACHEFILES_FD_ENV: &str = "DEDUPD_CACHEFILES_FD";
/// The name of the device fd in systemd's fd store.
pub const FD_NAME: &str = "cachefiles";
/// How long a daemon waits for a holder's hand-over (another daemon may still be
/// attached: it is being killed, or it is alive and this start is a mistake).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a fresh bind retries `EBUSY` (a holder of another root on its way out, or
/// its cache still unbinding).
const BUSY_RETRY: Duration = Duration::from_secs(15);

/// Where things are, for [`acquire`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory of the holder's socket, lock, pid file and log (`ROOT/cachefiles`).
    pub state_dir: PathBuf,
    /// The cache directory a fresh cache is bound to (`ROOT/cache`).
    pub cache_dir: PathBuf,
    /// The cache's tag.
    pub tag: String,
    /// The `dedupd` binary, to start the holder (`dedupd cachefiles-holder`).
    pub exe: PathBuf,
}

impl Options {
    /// The holder's socket.
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("holder.sock")
    }
}

/// Errors of taking or binding the cache.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The device could not be opened or bound.
    #[error("{path}: {reason}")]
    Device {
        /// The device or cache directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The holder could not be reached, started or talked to.
    #[error("cachefiles holder at {socket}: {reason}")]
    Holder {
        /// Its socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `DEDUPD_CACHEFILES_FD` is not an fd number.
    #[error("{CACHEFILES_FD_ENV} must be an fd number, not {0:?}")]
    BadInheritedFd(String),
}

/// The bound device and who keeps its other copy.
pub struct Acquired {
    /// The device.
    pub device: CachefilesDevice,
    /// True when the cache was bound by an earlier daemon: write `restore` (once, before
    /// the first read) and keep the mounts.
    pub continued: bool,
    /// Who keeps the cache alive when this daemon dies.
    pub keeper: Keeper,
}

/// Who keeps a copy of the device fd.
pub struct Keeper {
    kind: KeeperKind,
}

enum KeeperKind {
    Systemd,
    Supervisor,
    Holder(Arc<HolderLink>),
}

struct HolderLink {
    opts: Options,
    conn: Mutex<OwnedFd>,
    /// A copy of the device fd, to give a replacement holder.
    device: OwnedFd,
    stop: OwnedFd,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Keeper {
    /// Who it is, for logs and status.
    pub fn name(&self) -> &'static str {
        match self.kind {
            KeeperKind::Systemd => "systemd fd store",
            KeeperKind::Supervisor => "supervisor (DEDUPD_CACHEFILES_FD)",
            KeeperKind::Holder(_) => "holder process",
        }
    }

    /// At a clean stop: with `in_use` false (no volume of the cache left), the keeper lets
    /// the cache go (the holder exits; the fd store drops the fd); otherwise it keeps it
    /// for the next daemon.
    pub fn release(mut self, in_use: bool) {
        let kind = std::mem::replace(&mut self.kind, KeeperKind::Supervisor);
        match kind {
            KeeperKind::Holder(link) => {
                link.stop_watcher();
                if in_use {
                    tracing::info!("layers are still mounted: the cachefiles holder keeps the cache for the next daemon");
                    return;
                }
                let conn = link.conn.lock().unwrap_or_else(|p| p.into_inner());
                if crate::frontend::holder::send(conn.as_fd(), b"BYE", &[]).is_ok() {
                    // Until the holder hangs up (bounded): a daemon started right after
                    // this one must find the device free.
                    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut fds, PollTimeout::from(3000u16));
                }
                tracing::info!("nothing is mounted: the cachefiles cache is released");
            }
            KeeperKind::Systemd => {
                if in_use {
                    tracing::info!("layers are still mounted: systemd's fd store keeps the cache");
                    return;
                }
                let msg = format!("FDSTOREREMOVE=1\nFDNAME={FD_NAME}");
                if let Err(e) = crate::systemd::notify(&msg, &[]) {
                    tracing::warn!("asking systemd to drop the cachefiles fd: {e}");
                }
            }
            KeeperKind::Supervisor => {}
        }
    }
}

/// A keeper dropped without [`Keeper::release`] (the daemon gave up on this cache, say
/// `restore` failed) stops watching its holder, which keeps the cache for the next
/// daemon: nothing is released behind the caller's back, and no thread outlives it.
impl Drop for Keeper {
    fn drop(&mut self) {
        if let KeeperKind::Holder(link) = &self.kind {
            link.stop_watcher();
        }
    }
}

/// Takes the cache over from whoever keeps it, or binds a fresh one and hands a copy to
/// the keeper. Does not write `restore`: the caller does, after loading the registry.
pub fn acquire(opts: &Options) -> Result<Acquired, FailoverError> {
    // 1. systemd gave the fd back.
    let mut passed = crate::systemd::listen_fds();
    if let Some(i) = passed.iter().position(|(n, _)| n == FD_NAME) {
        let (_, fd) = passed.swap_remove(i);
        tracing::info!("took the cachefiles device from systemd's fd store");
        return Ok(Acquired {
            device: CachefilesDevice::from_file(fd.into()),
            continued: true,
            keeper: Keeper {
                kind: KeeperKind::Systemd,
            },
        });
    }
    for (name, _) in &passed {
        tracing::warn!(name, "systemd passed an fd dedupd does not use; closed");
    }
    // 2. A supervisor passed it.
    if let Some(v) = std::env::var_os(CACHEFILES_FD_ENV) {
        let s = v.to_string_lossy().into_owned();
        let fd: RawFd = s
            .parse()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or(FailoverError::BadInheritedFd(s))?;
        // SAFETY: the supervisor that set the variable handed us this open fd of
        // /dev/cachefiles and no longer uses it through this number.
        let file = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        tracing::info!(fd, "took the cachefiles device from {CACHEFILES_FD_ENV}");
        return Ok(Acquired {
            device: CachefilesDevice::from_file(file),
            continued: true,
            keeper: Keeper {
                kind: KeeperKind::Supervisor,
            },
        });
    }
    // 3. Under systemd with nothing stored: bind, then store a copy.
    if crate::systemd::under_systemd() {
        let device = bind_fresh(opts)?;
        let msg = format!("FDSTORE=1\nFDNAME={FD_NAME}");
        match crate::systemd::notify(&msg, &[device.as_raw_fd()]) {
            Ok(_) => {
                tracing::info!("cachefiles device stored in systemd's fd store");
                return Ok(Acquired {
                    device,
                    continued: false,
                    keeper: Keeper {
                        kind: KeeperKind::Systemd,
                    },
                });
            }
            Err(e) => {
                tracing::warn!("systemd did not take the cachefiles fd ({e}); using a holder");
                let link = attach_fresh_holder(opts, &device)?;
                return Ok(Acquired {
                    device,
                    continued: false,
                    keeper: link,
                });
            }
        }
    }
    // 4. A holder process.
    fs::create_dir_all(&opts.state_dir).map_err(|e| FailoverError::Holder {
        socket: opts.socket(),
        reason: format!("{}: {e}", opts.state_dir.display()),
    })?;
    let (conn, held) = attach(opts)?;
    let (device, continued) = match held {
        Some(fd) => {
            tracing::info!("took the cachefiles device from the holder");
            (CachefilesDevice::from_file(fd.into()), true)
        }
        None => {
            let device = bind_fresh(opts)?;
            crate::frontend::holder::send(conn.as_fd(), b"KEEP", &[device.as_raw_fd()]).map_err(
                |e| FailoverError::Holder {
                    socket: opts.socket(),
                    reason: format!("handing over the device: {e}"),
                },
            )?;
            (device, false)
        }
    };
    let keeper = watch(opts, conn, &device)?;
    Ok(Acquired {
        device,
        continued,
        keeper,
    })
}

/// Writes `restore`: the kernel re-delivers what the dead daemon had read and not
/// answered. Exactly once per takeover, before the first read.
pub fn restore(device: &CachefilesDevice) -> io::Result<()> {
    send(device, &Command::Restore)
}

/// Opens the device and binds a fresh on-demand cache in `opts.cache_dir`.
pub fn bind_fresh(opts: &Options) -> Result<CachefilesDevice, FailoverError> {
    let path = Path::new(DEVICE_PATH);
    let deadline = Instant::now() + BUSY_RETRY;
    let device = loop {
        match CachefilesDevice::open(path) {
            Ok(d) => break d,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                tracing::info!("{DEVICE_PATH} is busy; waiting for its holder to let it go");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(FailoverError::Device {
                    path: path.into(),
                    reason: "busy; another daemon (cachefilesd, nydusd, dedupd of another \
                             root) or its holder has it (`dedupd teardown --root R` ends a \
                             dedupd holder)"
                        .into(),
                })
            }
            Err(e) => {
                return Err(FailoverError::Device {
                    path: path.into(),
                    reason: e.to_string(),
                })
            }
        }
    };
    fs::create_dir_all(&opts.cache_dir).map_err(|e| FailoverError::Device {
        path: opts.cache_dir.clone(),
        reason: e.to_string(),
    })?;
    device
        .bind(&opts.cache_dir, &opts.tag)
        .map_err(|e| FailoverError::Device {
            path: opts.cache_dir.clone(),
            reason: format!("binding the cache (needs ext4/xfs with user xattrs): {e}"),
        })?;
    tracing::info!(cache_dir = %opts.cache_dir.display(), "cachefiles cache bound (on-demand)");
    Ok(device)
}

/// Connects to the holder (starting one if none listens) and receives its hand-over:
/// the device if it keeps one.
fn attach(opts: &Options) -> Result<(OwnedFd, Option<OwnedFd>), FailoverError> {
    let socket = opts.socket();
    let herr = |reason: String| FailoverError::Holder {
        socket: socket.clone(),
        reason,
    };
    let mut last = String::new();
    // Bounded: a holder on its way out (idle, or told BYE a moment ago) may accept and
    // close, or still hold its lock; the next attempt starts a fresh one.
    for _ in 0..5 {
        let conn = match crate::frontend::holder::connect(&socket) {
            Ok(c) => c,
            Err(_) => match spawn_holder(opts) {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        let mut buf = vec![0u8; MESSAGE_BYTES];
        match crate::frontend::holder::recv_timeout(conn.as_fd(), &mut buf, ATTACH_TIMEOUT) {
            Ok((n, mut fds)) if &buf[..n] == b"DEVICE" && fds.len() == 1 => {
                return Ok((conn, fds.pop()))
            }
            Ok((n, _)) if &buf[..n] == b"EMPTY" => return Ok((conn, None)),
            Ok((0, _)) => last = "the holder closed the connection (on its way out)".into(),
            Ok((n, _)) => {
                return Err(herr(format!(
                    "unexpected hand-over {:?}",
                    String::from_utf8_lossy(&buf[..n])
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(herr(format!(
                    "no hand-over within {ATTACH_TIMEOUT:?}: another dedupd is attached \
                     (one daemon per root)"
                )))
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(herr(last))
}

/// Starts `dedupd cachefiles-holder` and connects to it.
fn spawn_holder(opts: &Options) -> Result<OwnedFd, FailoverError> {
    let socket = opts.socket();
    let herr = |reason: String| FailoverError::Holder {
        socket: socket.clone(),
        reason,
    };
    let log_path = opts.state_dir.join("holder.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| herr(format!("{}: {e}", log_path.display())))?;
    let mut child = Process::new(&opts.exe)
        .arg("cachefiles-holder")
        .arg("--socket")
        .arg(&socket)
        .arg("--tag")
        .arg(&opts.tag)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a signal to the daemon's group spares it.
        .process_group(0)
        .spawn()
        .map_err(|e| herr(format!("starting {}: {e}", opts.exe.display())))?;
    let _ = fs::write(opts.state_dir.join("holder.pid"), child.id().to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    // Not waited for once it listens: it must outlive us (dropping `child` leaves it).
    loop {
        match crate::frontend::holder::connect(&socket) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(herr(format!("did not come up: {e}")))
            }
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(herr(format!("exited ({status}) before listening: {e}")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A fresh holder given `device` at once (the systemd fallback).
fn attach_fresh_holder(opts: &Options, device: &CachefilesDevice) -> Result<Keeper, FailoverError> {
    fs::create_dir_all(&opts.state_dir).map_err(|e| FailoverError::Holder {
        socket: opts.socket(),
        reason: e.to_string(),
    })?;
    let (conn, held) = attach(opts)?;
    if held.is_some() {
        return Err(FailoverError::Holder {
            socket: opts.socket(),
            reason: "the holder already keeps another cache".into(),
        });
    }
    crate::frontend::holder::send(conn.as_fd(), b"KEEP", &[device.as_raw_fd()]).map_err(|e| {
        FailoverError::Holder {
            socket: opts.socket(),
            reason: e.to_string(),
        }
    })?;
    watch(opts, conn, device)
}

/// Watches the holder connection: if the holder dies while we run, a replacement is
/// started and given the device, so that a later crash of ours still leaves the cache.
fn watch(
    opts: &Options,
    conn: OwnedFd,
    device: &CachefilesDevice,
) -> Result<Keeper, FailoverError> {
    let herr = |e: io::Error| FailoverError::Holder {
        socket: opts.socket(),
        reason: e.to_string(),
    };
    let dup = device.as_fd().try_clone_to_owned().map_err(herr)?;
    let stop = nix::sys::eventfd::EventFd::from_value_and_flags(
        0,
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
    )
    .map_err(|e| herr(e.into()))?;
    let link = Arc::new(HolderLink {
        opts: opts.clone(),
        conn: Mutex::new(conn),
        device: dup,
        stop: stop.into(),
        watcher: Mutex::new(None),
    });
    let l = link.clone();
    let handle = std::thread::Builder::new()
        .name("cachefiles-holder-watch".into())
        .spawn(move || l.watch())
        .map_err(herr)?;
    *link.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    Ok(Keeper {
        kind: KeeperKind::Holder(link),
    })
}

impl HolderLink {
    /// Stops the watcher thread and waits for it (idempotent).
    fn stop_watcher(&self) {
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&self.stop, &one);
        let handle = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(w) = handle {
            let _ = w.join();
        }
    }

    fn watch(&self) {
        // Bounded by the daemon's life: each round waits for an event.
        loop {
            let raw = self
                .conn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_raw_fd();
            // SAFETY: the connection is replaced only by this thread, below.
            let conn = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
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
            tracing::error!("the cachefiles holder died; starting a replacement");
            let _ = fs::remove_file(self.opts.socket());
            match attach(&self.opts).and_then(|(c, held)| {
                if held.is_some() {
                    return Err(FailoverError::Holder {
                        socket: self.opts.socket(),
                        reason: "a replacement holder already had a device".into(),
                    });
                }
                crate::frontend::holder::send(c.as_fd(), b"KEEP", &[self.device.as_raw_fd()])
                    .map_err(|e| FailoverError::Holder {
                        socket: self.opts.socket(),
                        reason: e.to_string(),
                    })?;
                Ok(c)
            }) {
                Ok(c) => {
                    *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = c;
                    tracing::warn!("a replacement cachefiles holder keeps the cache");
                }
                Err(e) => {
                    tracing::error!(
                        "no replacement holder ({e}): a crash of this daemon would now \
                         withdraw the cache under every mounted layer"
                    );
                    return;
                }
            }
        }
    }
}

/// Waits (up to `bound`) until the cache tagged `tag` has no volume left; returns true
/// when some remain (layers still mounted somewhere).
pub fn still_mounted(tag: &str, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        match super::holder::cache_volumes(tag) {
            Ok(v) if v.is_empty() => return false,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(v) => {
                tracing::info!(volumes = ?v, "cachefiles volumes still in place");
                return true;
            }
            Err(e) => {
                tracing::warn!("cannot list fscache volumes ({e}); keeping the cache");
                return true;
            }
        }
    }
}
