//! The device holder: a small process (`dedupd cachefiles-holder`, started by the daemon
//! when no systemd fd store is there) that keeps a copy of the bound `/dev/cachefiles` fd,
//! so that the cache outlives any daemon. When the last copy of that fd closes the kernel
//! withdraws the cache: every mounted layer then fails with EIO until it is mounted again.
//! While a copy lives, a daemon killed mid-request is survivable (see [`super::failover`]).
//!
//! The holder never reads the device: requests queued while no daemon runs wait in the
//! kernel for the next one, which takes the fd and writes `restore`.
//!
//! Protocol (`SOCK_SEQPACKET` at `ROOT/cachefiles/holder.sock`, mode 0600, peers checked
//! with `SO_PEERCRED`; one daemon attached at a time: the next connection is accepted only
//! after the previous daemon's end closed, so two daemons never read the device at once):
//! - holder -> daemon on attach: `DEVICE` with the fd (a cache is bound: take it over),
//!   or `EMPTY` (bind a fresh cache, then send it back with `KEEP`);
//! - daemon -> holder: `KEEP` with the fd; `BYE` (clean stop, no volume of the cache left:
//!   the holder closes its copy, the cache unbinds, the holder exits);
//! - `dedupd teardown` -> holder: `QUIT`; answered `GONE` (nothing mounted over the cache:
//!   the holder exits) or `BUSY <why>` (it stays).
//!
//! A holder does not outlive what it serves: with no daemon attached it checks every
//! second whether the cache still has a volume (`/proc/fs/netfs/volumes`: an EROFS mount
//! over fscache holds one from the start of mount(2) to the end of its unmount, in any
//! mount namespace), and after [`IDLE_EXIT`] without one it exits.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::frontend::holder::{accept, check_peer, recv, send, MESSAGE_BYTES};

/// How long a holder with no daemon and no volume waits before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How long a holder keeps a cache with mounted layers for a daemon that does not come
/// back. After that it closes the device: the kernel withdraws the cache and readers of
/// uncached data get EIO instead of waiting for good.
pub const GRACE: Duration = Duration::from_secs(30);
/// How long `QUIT` waits for the volumes of just-unmounted layers to go (the kernel
/// releases them a moment after umount(2) returns).
const VOLUMES_SETTLE: Duration = Duration::from_secs(3);
/// How often a holder with no daemon looks at the cache's volumes.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Where the kernel lists fscache volumes (`fs/netfs/fscache_proc.c`); the older path
/// is a symlink to it.
const VOLUMES: [&str; 2] = ["/proc/fs/netfs/volumes", "/proc/fs/fscache/volumes"];

/// Volumes of the cache tagged `tag` (one per mounted layer, or per domain), by key.
/// Only one cachefiles cache can be bound at a time, so these are ours.
pub fn cache_volumes(tag: &str) -> io::Result<Vec<String>> {
    let mut last = None;
    for path in VOLUMES {
        match std::fs::read_to_string(path) {
            Ok(text) => return Ok(parse_volumes(&text, tag)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one path"))
}

/// Parses the `volumes` table: `VOLUME REF nCOOK ACC FL CACHE KEY` after two header
/// lines; the cache name is cut to 15 characters.
fn parse_volumes(text: &str, tag: &str) -> Vec<String> {
    let want: String = tag.chars().take(15).collect();
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 7 && f[5] == want).then(|| f[6..].join(" "))
        })
        .collect()
}

enum State {
    /// No daemon attached.
    Waiting,
    /// A daemon (or `dedupd teardown`) is attached on this connection.
    Attached(OwnedFd),
}

/// Runs the holder on `socket_path` for the cache tagged `tag`, until told `BYE`, or
/// `QUIT` with nothing mounted, or until it has had no daemon and no volume for
/// [`IDLE_EXIT`].
pub fn run(socket_path: &Path, tag: &str, grace: Duration) -> io::Result<()> {
    // Dying on a stray signal would withdraw the cache under every mounted layer.
    crate::frontend::holder::ignore_stray_signals()?;
    let Some(_lock) = crate::frontend::holder::lock(socket_path)? else {
        tracing::info!(
            "cachefiles holder: another holder owns {}",
            socket_path.display()
        );
        return Ok(());
    };
    let listener = crate::frontend::holder::listen(socket_path)?;
    tracing::info!(socket = %socket_path.display(), "cachefiles holder: listening");
    let mut device: Option<OwnedFd> = None;
    let mut state = State::Waiting;
    let mut buf = vec![0u8; MESSAGE_BYTES];
    let mut idle_since: Option<Instant> = None;
    // Since when a bound cache has had no daemon (set when one goes away).
    let mut orphaned_since: Option<Instant> = None;
    let mut next_check = Instant::now() + IDLE_CHECK;
    let leave = |why: &str| {
        tracing::info!("cachefiles holder: {why}; closing the device and exiting");
        let _ = std::fs::remove_file(socket_path);
    };
    loop {
        let timeout = match &state {
            State::Attached(_) => PollTimeout::NONE,
            State::Waiting => {
                let left = next_check.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_millis() as i32 + 1).unwrap_or(PollTimeout::MAX)
            }
        };
        let (listen_ready, conn_ready) = {
            // A connection waiting while a daemon is attached stays queued (it is
            // accepted once that daemon is gone): not polled, or poll would spin.
            let attached = matches!(state, State::Attached(_));
            let listen = if attached {
                PollFlags::empty()
            } else {
                PollFlags::POLLIN
            };
            let mut fds = vec![PollFd::new(listener.as_fd(), listen)];
            if let State::Attached(c) = &state {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let r = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            (r(0), r(1))
        };
        if conn_ready {
            let State::Attached(conn) = &state else {
                unreachable!()
            };
            match recv(conn.as_fd(), &mut buf) {
                Ok((0, _)) | Err(_) => {
                    if device.is_some() {
                        tracing::warn!(
                            "cachefiles holder: daemon went away; keeping the cache for the next one"
                        );
                    }
                    state = State::Waiting;
                    idle_since = None;
                    orphaned_since = Some(Instant::now());
                    next_check = Instant::now() + IDLE_CHECK;
                }
                Ok((n, mut fds)) => match &buf[..n] {
                    b"KEEP" => match fds.pop() {
                        Some(fd) => {
                            tracing::info!("cachefiles holder: keeping the bound device");
                            device = Some(fd);
                        }
                        None => tracing::warn!("cachefiles holder: KEEP without an fd"),
                    },
                    b"BYE" => {
                        leave("the daemon stopped with nothing mounted");
                        return Ok(());
                    }
                    b"QUIT" => match settled_volumes(tag) {
                        Ok(v) if v.is_empty() => {
                            let _ = send(conn.as_fd(), b"GONE", &[]);
                            leave("teardown, and no volume of the cache is left");
                            return Ok(());
                        }
                        r => {
                            let why = match r {
                                Ok(v) => format!(
                                    "BUSY {} volume(s) of cache {tag:?} still mounted: {}",
                                    v.len(),
                                    v.join(", ")
                                ),
                                Err(e) => format!("BUSY cannot list volumes: {e}"),
                            };
                            let _ = send(conn.as_fd(), why.as_bytes(), &[]);
                        }
                    },
                    other => tracing::warn!(
                        "cachefiles holder: unknown message {:?}",
                        String::from_utf8_lossy(other)
                    ),
                },
            }
            continue;
        }
        if listen_ready && !matches!(state, State::Attached(_)) {
            let Ok(conn) = accept(&listener) else {
                continue;
            };
            if let Err(e) = check_peer(&conn) {
                tracing::warn!("cachefiles holder: {e}");
                continue;
            }
            let sent = match &device {
                Some(d) => send(conn.as_fd(), b"DEVICE", &[d.as_raw_fd()]),
                None => send(conn.as_fd(), b"EMPTY", &[]),
            };
            match sent {
                Ok(()) => {
                    tracing::info!(
                        with_device = device.is_some(),
                        "cachefiles holder: daemon attached"
                    );
                    state = State::Attached(conn);
                    orphaned_since = None;
                }
                Err(e) => tracing::warn!("cachefiles holder: hand-over failed: {e}"),
            }
            continue;
        }
        if let State::Waiting = state {
            if Instant::now() < next_check {
                continue;
            }
            next_check = Instant::now() + IDLE_CHECK;
            if device.is_some() && orphaned_since.is_some_and(|t| t.elapsed() >= grace) {
                tracing::error!(
                    "cachefiles holder: no daemon came back within {grace:?}: withdrawing the \
                     cache, so that reads of data not cached fail with EIO instead of waiting"
                );
                leave("no daemon within the grace period");
                return Ok(());
            }
            let idle = match (&device, cache_volumes(tag)) {
                (None, _) => true,
                (Some(_), Ok(v)) => v.is_empty(),
                // Cannot tell: keep the cache (a missing /proc is no reason to drop it).
                (Some(_), Err(_)) => false,
            };
            if !idle {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= IDLE_EXIT {
                leave("no daemon and nothing mounted over the cache");
                return Ok(());
            }
        }
    }
}

/// The cache's volumes once those of layers just unmounted had [`VOLUMES_SETTLE`] to go.
fn settled_volumes(tag: &str) -> io::Result<Vec<String>> {
    let deadline = Instant::now() + VOLUMES_SETTLE;
    loop {
        let v = cache_volumes(tag)?;
        if v.is_empty() || Instant::now() >= deadline {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_of_our_cache_only() {
        let text = "VOLUME   REF   nCOOK ACC FL CACHE           KEY\n\
                    ======== ===== ===== === == =============== ================\n\
                    00000003     2     1   0 00 dedupd          erofs,t70-remount\n\
                    00000004     1     0   0 00 other           erofs,x\n\
                    00000005     3     2   0 00 dedupd          erofs,abc\n";
        assert_eq!(
            parse_volumes(text, "dedupd"),
            vec!["erofs,t70-remount".to_string(), "erofs,abc".to_string()]
        );
        assert!(parse_volumes(text, "none").is_empty());
        assert!(parse_volumes("", "dedupd").is_empty());
    }
}
