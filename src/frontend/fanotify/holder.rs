//! The group holder: a small process that owns the fanotify group so that it outlives
//! any daemon. When the last fd of a group closes, the kernel *allows* every pending
//! event, and a reader of an unfilled range of a sparse blob then gets zeros; with the
//! holder alive that cannot happen.
//!
//! Protocol (a `SOCK_SEQPACKET` unix socket, one daemon attached at a time; the next
//! connection is accepted only after the previous daemon's end closed, i.e. after the
//! old process can no longer read events):
//! - holder -> daemon on attach: `GROUP` with fds [group, journal memfd]; then zero or
//!   more `WRITERS id id ...` each with one fd per id (a write fd per blob, see
//!   [`super::FanotifyFrontEnd`]); then `END`.
//! - daemon -> a holder started with `--adopt` (the previous holder died while the
//!   daemon ran): `ADOPT` with fds [group, journal memfd], then `KEEP`s as below.
//! - daemon -> holder: `KEEP id` with one fd (keep this blob's write fd for successors);
//!   `DROP id` (forget it: the blob is gone, or its file was made again);
//!   `BYE` (clean shutdown: mounts are gone, the holder exits and the group closes).
//! - `dedupd teardown` -> holder: `QUIT`; the holder answers `GONE` and exits when no
//!   marked blob file is in use ([`blobs_in_use`]), else `BUSY <why>` and stays.
//!
//! Peers are checked (`SO_PEERCRED`: root or the holder's uid) and the socket is 0600.
//!
//! When a daemon goes away without `BYE` and none attaches within the grace period,
//! the holder fails closed: it answers every journaled and orphaned event, and every
//! new one, with EIO, until a daemon attaches again. Mounts then fail loudly, never
//! silently.
//!
//! A holder does not outlive what it serves: with no daemon attached it checks every
//! second whether any marked blob file is open elsewhere (an EROFS mount holds its blob
//! files open; the test is a write lease, which only a file's sole opener gets), and
//! once none has been for [`IDLE_EXIT`] it closes the group and exits. A daemon that
//! stopped with its layers mounted keeps its holder; unmounting them (or
//! `dedupd teardown`) ends it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::event;
use super::journal::Journal;
use super::sys;
use crate::frontend::holder::{accept, check_peer};
pub use crate::frontend::holder::{connect, recv, send, seqpacket, FDS_PER_MESSAGE, MESSAGE_BYTES};

/// How long a holder with no daemon waits, with nothing using its blobs, before it
/// exits on its own.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How often a holder with no daemon checks whether anything still uses its blobs.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Answers every journaled event and every orphan (an event read by a dead daemon but
/// not journaled) with EIO. Returns (journaled, orphans) answered.
pub fn deny_leftovers(group: BorrowedFd<'_>, journal: &Journal) -> (u64, u64) {
    let mut journaled = 0;
    for (slot, e) in journal.live() {
        if matches!(sys::respond(group, e.fd, sys::FAN_DENY_EIO), Ok(true)) {
            journaled += 1;
        }
        journal.clear(slot);
    }
    (journaled, probe_orphans(group, journal))
}

/// Denies (EIO) whatever event is pending under any fd number below the journal's
/// probe limit. Only safe while nobody of this group has read an event it has not
/// answered yet.
pub fn probe_orphans(group: BorrowedFd<'_>, journal: &Journal) -> u64 {
    let limit = journal.probe_fd_limit().min(1 << 20) as i32;
    (0..limit)
        .filter(|&fd| matches!(sys::respond(group, fd, sys::FAN_DENY_EIO), Ok(true)))
        .count() as u64
}

enum State {
    /// No daemon since this instant.
    Waiting(Instant),
    /// A daemon (or `dedupd teardown`) is attached on this connection.
    Attached(OwnedFd),
    /// The grace period passed: every event is answered with EIO.
    FailClosed,
}

/// Runs the holder until a daemon says `BYE`, `dedupd teardown` says `QUIT` while nothing
/// uses the blobs, or, with no daemon attached, nothing has used them for [`IDLE_EXIT`].
/// Creates the group and the journal (or, with `adopt`, takes them from the daemon that
/// started it), listens on `socket_path`.
pub fn run(socket_path: &Path, grace: Duration, adopt: bool) -> io::Result<()> {
    // A holder that dies on a stray signal closes the group and exposes holes as zeros.
    crate::frontend::holder::ignore_stray_signals()?;
    // Its socket and lock file are root's alone (whoever started it).
    crate::perms::private_umask();
    // One holder per socket: a second one (two daemons racing to start it) leaves.
    let Some(_lock) = crate::frontend::holder::lock(socket_path)? else {
        tracing::info!(
            "fanotify holder: another holder owns {}",
            socket_path.display()
        );
        return Ok(());
    };
    let listener = crate::frontend::holder::listen(socket_path)?;
    let blob_dir = socket_path.parent().map(|d| d.join("blobs"));
    let mut writers: HashMap<String, OwnedFd> = HashMap::new();
    let (group, journal, mut state) = if adopt {
        // A replacement for a holder that died: the running daemon gives us its group.
        // The daemon that started us connects first. If it died before saying ADOPT, a
        // successor may connect instead and wait for a GROUP we do not have: give up
        // after a bound, so that it sees the connection close and starts a fresh holder.
        let bad = || {
            let _ = std::fs::remove_file(socket_path);
            io::Error::new(io::ErrorKind::InvalidData, "expected ADOPT with 2 fds")
        };
        let conn = accept(&listener)?;
        check_peer(&conn)?;
        let mut buf = vec![0u8; MESSAGE_BYTES];
        let (n, mut fds) =
            crate::frontend::holder::recv_timeout(conn.as_fd(), &mut buf, Duration::from_secs(5))
                .map_err(|_| bad())?;
        if &buf[..n] != b"ADOPT" || fds.len() != 2 {
            return Err(bad());
        }
        let journal = Journal::map(fds.pop().expect("2 fds"))?;
        let group = fds.pop().expect("2 fds");
        tracing::warn!(socket = %socket_path.display(), "fanotify holder: adopted a running daemon's group");
        (group, journal, State::Attached(conn))
    } else {
        let group = sys::init_group()?;
        let journal = Journal::map(Journal::create()?)?;
        tracing::info!(socket = %socket_path.display(), "fanotify holder: group created, listening");
        (group, journal, State::Waiting(Instant::now()))
    };
    let mut buf = vec![0u8; MESSAGE_BYTES];
    let mut evbuf = vec![0u8; 64 * sys::EVENT_METADATA_BYTES];
    let mut evs = Vec::new();
    // Since when nothing has used the blobs while no daemon was attached.
    let mut idle_since: Option<Instant> = None;
    let mut next_check = Instant::now() + IDLE_CHECK;
    loop {
        let attached = matches!(state, State::Attached(_));
        let mut wait = if attached {
            Duration::MAX
        } else {
            next_check.saturating_duration_since(Instant::now())
        };
        if let State::Waiting(since) = &state {
            wait = wait.min(grace.saturating_sub(since.elapsed()));
        }
        let timeout = if wait == Duration::MAX {
            PollTimeout::NONE
        } else {
            PollTimeout::try_from(wait.as_millis().min(60_000) as i32 + 1)
                .unwrap_or(PollTimeout::MAX)
        };
        let (listen_ready, conn_ready, group_ready) = {
            // A connection waiting while a daemon is attached stays queued (it is
            // accepted once that daemon is gone): not polled, or poll would spin.
            let listen = if attached {
                PollFlags::empty()
            } else {
                PollFlags::POLLIN
            };
            let mut fds = vec![PollFd::new(listener.as_fd(), listen)];
            match &state {
                State::Attached(c) => fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN)),
                State::FailClosed => fds.push(PollFd::new(group.as_fd(), PollFlags::POLLIN)),
                State::Waiting(_) => {}
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
            (r(0), attached && r(1), !attached && r(1))
        };
        if conn_ready {
            let State::Attached(conn) = &state else {
                unreachable!()
            };
            match recv(conn.as_fd(), &mut buf) {
                Ok((0, _)) | Err(_) => {
                    tracing::warn!("fanotify holder: daemon went away without BYE; waiting {grace:?} for a successor");
                    state = State::Waiting(Instant::now());
                    idle_since = None;
                    next_check = Instant::now() + IDLE_CHECK;
                }
                Ok((n, mut fds)) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    if msg == "BYE" {
                        tracing::info!("fanotify holder: daemon said BYE; closing the group");
                        let _ = std::fs::remove_file(socket_path);
                        return Ok(());
                    } else if msg == "QUIT" {
                        // `dedupd teardown`: leave only if nothing uses the blobs.
                        match blobs_in_use(group.as_fd(), &writers, blob_dir.as_deref()) {
                            0 => {
                                let _ = send(conn.as_fd(), b"GONE", &[]);
                                tracing::info!("fanotify holder: teardown and no blob in use; closing the group");
                                let _ = std::fs::remove_file(socket_path);
                                return Ok(());
                            }
                            n => {
                                let m = format!(
                                    "BUSY {n} marked blob file(s) still open (a mount uses them)"
                                );
                                let _ = send(conn.as_fd(), m.as_bytes(), &[]);
                            }
                        }
                    } else if let Some(id) = msg.strip_prefix("KEEP ") {
                        if let Some(fd) = fds.pop() {
                            writers.insert(id.to_string(), fd);
                        }
                    } else if let Some(id) = msg.strip_prefix("DROP ") {
                        writers.remove(id);
                    } else {
                        tracing::warn!("fanotify holder: unknown message {msg:?}");
                    }
                }
            }
            continue;
        }
        if group_ready {
            // Fail closed: answer everything with EIO, loudly.
            let n = match nix::unistd::read(&group, &mut evbuf) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            evs.clear();
            if let Err(e) = event::parse(&evbuf[..n], &mut evs) {
                tracing::error!("fanotify holder: {e}");
            }
            for ev in &evs {
                if ev.fd >= 0 {
                    let _ = sys::respond(group.as_fd(), ev.fd, sys::FAN_DENY_EIO);
                    // SAFETY: the kernel installed this fd for us with the event; we own
                    // it and close it once.
                    drop(unsafe { OwnedFd::from_raw_fd(ev.fd) });
                }
            }
            tracing::error!(
                events = evs.len(),
                "fanotify holder: no daemon; answered EIO"
            );
            continue;
        }
        if listen_ready && !attached {
            let Ok(conn) = accept(&listener) else {
                continue;
            };
            if let Err(e) = check_peer(&conn) {
                tracing::warn!("fanotify holder: {e}");
                continue;
            }
            match hand_over(conn.as_fd(), &group, &journal, &writers) {
                Ok(()) => {
                    tracing::info!("fanotify holder: daemon attached");
                    state = State::Attached(conn);
                }
                Err(e) => tracing::warn!("fanotify holder: hand-over failed: {e}"),
            }
            continue;
        }
        if let State::Waiting(since) = &state {
            if since.elapsed() >= grace {
                let (j, o) = deny_leftovers(group.as_fd(), &journal);
                tracing::error!(
                    journaled = j,
                    orphans = o,
                    "fanotify holder: no daemon within {grace:?}; failing closed: every read of an unfilled range now gets EIO"
                );
                state = State::FailClosed;
            }
        }
        if !matches!(state, State::Attached(_)) && Instant::now() >= next_check {
            next_check = Instant::now() + IDLE_CHECK;
            if blobs_in_use(group.as_fd(), &writers, blob_dir.as_deref()) == 0 {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= IDLE_EXIT {
                    tracing::info!(
                        "fanotify holder: no daemon and no mount uses a marked blob for {IDLE_EXIT:?}; closing the group"
                    );
                    let _ = std::fs::remove_file(socket_path);
                    return Ok(());
                }
            } else {
                idle_since = None;
            }
        }
    }
}

/// Marked blob files something other than this holder has open (a file-backed EROFS
/// mount opens its blob files read-only; a reader waiting on an event reads through
/// such a mount). A mark whose file cannot be found or tested counts as in use. Zero
/// marks (every blob complete, or every blob file gone) is zero in use: mounts over
/// complete blobs raise no events and need no group.
pub fn blobs_in_use(
    group: BorrowedFd<'_>,
    writers: &HashMap<String, OwnedFd>,
    blob_dir: Option<&Path>,
) -> usize {
    let marks = match marks(group) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("fanotify holder: reading the group's marks: {e}");
            return usize::MAX;
        }
    };
    if marks.is_empty() {
        return 0;
    }
    let ident = |fd: BorrowedFd<'_>| {
        nix::sys::stat::fstat(fd)
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    };
    let mut by_inode: HashMap<(u64, u64), BorrowedFd<'_>> = HashMap::new();
    for w in writers.values() {
        if let Some(k) = ident(w.as_fd()) {
            by_inode.insert(k, w.as_fd());
        }
    }
    // Blob files the holder has no write fd for (never read through a daemon): opened
    // read-only here for the test, only those (another open of a file that has a write
    // fd here would make its own test fail).
    let mut opened = Vec::new();
    let missing: Vec<(u64, u64)> = marks
        .iter()
        .map(|m| m.id)
        .filter(|id| !by_inode.contains_key(id))
        .collect();
    if !missing.is_empty() {
        use std::os::unix::fs::MetadataExt;
        if let Some(rd) = blob_dir.and_then(|d| std::fs::read_dir(d).ok()) {
            for e in rd.flatten().take(1 << 16) {
                let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if missing.contains(&(md.dev(), md.ino())) {
                    if let Ok(f) = std::fs::File::open(e.path()) {
                        opened.push(f);
                    }
                }
            }
        }
    }
    // Marked inodes no path leads to (their root was removed while a mount still had
    // them open, or after): opened by handle. One that cannot be opened counts in use.
    let found: std::collections::HashSet<(u64, u64)> =
        opened.iter().filter_map(|f| ident(f.as_fd())).collect();
    for m in &marks {
        if by_inode.contains_key(&m.id) || found.contains(&m.id) {
            continue;
        }
        if let Some((kind, h)) = &m.handle {
            match open_by_handle(m.id.0, *kind, h) {
                Ok(f) => opened.push(f),
                Err(e) => tracing::debug!(inode = m.id.1, "opening a marked inode by handle: {e}"),
            }
        }
    }
    for f in &opened {
        if let Some(k) = ident(f.as_fd()) {
            by_inode.entry(k).or_insert(f.as_fd());
        }
    }
    marks
        .iter()
        .filter(|m| by_inode.get(&m.id).is_none_or(|fd| opened_elsewhere(*fd)))
        .count()
}

/// One inode mark of a group, as `/proc/self/fdinfo` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The marked inode as (st_dev, inode), in the user-space encoding of `stat`.
    pub id: (u64, u64),
    /// Its file handle (type, bytes), to open it when no path leads to it any more.
    pub handle: Option<(i32, Vec<u8>)>,
}

/// The group's inode marks, from `/proc/self/fdinfo`.
pub fn marks(group: BorrowedFd<'_>) -> io::Result<Vec<Mark>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", group.as_raw_fd()))?;
    text.lines()
        .filter(|l| l.starts_with("fanotify ino:"))
        .map(parse_mark)
        .collect()
}

/// Parses `fanotify ino:<hex> sdev:<hex> ... fhandle-bytes:<hex> fhandle-type:<hex>
/// f_handle:<hex bytes>`.
fn parse_mark(line: &str) -> io::Result<Mark> {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
    };
    let (Some(ino), Some(sdev)) = (field("ino:"), field("sdev:")) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected fdinfo line {line:?}"),
        ));
    };
    let handle = (|| {
        let bytes = field("fhandle-bytes:")? as usize;
        let kind = field("fhandle-type:")? as i32;
        let hex = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("f_handle:"))?;
        if hex.len() != bytes * 2 {
            return None;
        }
        let raw = (0..bytes)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some((kind, raw))
    })();
    // The kernel prints its own dev_t (major << 20 | minor); stat gives the user-space
    // encoding.
    let dev = libc::makedev((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32);
    Ok(Mark {
        id: (dev, ino),
        handle,
    })
}

/// Opens a marked inode read-only by its file handle (the blob file may have no path
/// left: a root removed while a mount still uses it). Needs a directory of the same
/// filesystem, found in `/proc/self/mountinfo`.
fn open_by_handle(dev: u64, kind: i32, handle: &[u8]) -> io::Result<std::fs::File> {
    use std::os::unix::ffi::OsStrExt;
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount_point = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[2] == want)
        .map(|f| unescape_mount_path(f[4]))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no mount of {want}")))?;
    let dir = std::fs::File::open(std::ffi::OsStr::from_bytes(&mount_point))?;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: `buf` is a complete struct file_handle that outlives the call; the kernel
    // only reads it. The returned fd, if any, is new and owned by nobody else.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            dir.as_raw_fd(),
            buf.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as RawFd) })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
pub fn unescape_mount_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// True when an open file description other than `fd`'s has the file open: a write
/// lease is granted only to the file's sole opener (`F_SETLEASE`; released at once).
pub fn opened_elsewhere(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: fcntl on a valid borrowed fd with integer arguments; no memory involved.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    if r != 0 {
        return true;
    }
    // SAFETY: as above; drops the lease just taken.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    false
}

fn hand_over(
    conn: BorrowedFd<'_>,
    group: &OwnedFd,
    journal: &Journal,
    writers: &HashMap<String, OwnedFd>,
) -> io::Result<()> {
    send(
        conn,
        b"GROUP",
        &[group.as_raw_fd(), journal.fd().as_raw_fd()],
    )?;
    let all: Vec<(&String, &OwnedFd)> = writers.iter().collect();
    for part in all.chunks(FDS_PER_MESSAGE) {
        let mut msg = String::from("WRITERS");
        for (id, _) in part {
            msg.push(' ');
            msg.push_str(id);
        }
        let fds: Vec<RawFd> = part.iter().map(|(_, f)| f.as_raw_fd()).collect();
        send(conn, msg.as_bytes(), &fds)?;
    }
    send(conn, b"END", &[])
}

/// What a daemon gets from the holder.
pub struct Attached {
    /// The connection (kept open for the daemon's life; closing it tells the holder).
    pub conn: OwnedFd,
    /// The group.
    pub group: OwnedFd,
    /// The journal memfd.
    pub journal: OwnedFd,
    /// Write fds by blob id.
    pub writers: HashMap<String, OwnedFd>,
}

/// Receives the hand-over on a fresh connection.
pub fn receive(conn: OwnedFd) -> io::Result<Attached> {
    let mut buf = vec![0u8; MESSAGE_BYTES];
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("holder: {m}"));
    let (n, mut fds) = recv(conn.as_fd(), &mut buf)?;
    if &buf[..n] != b"GROUP" || fds.len() != 2 {
        return Err(bad("expected GROUP with 2 fds"));
    }
    let journal = fds.pop().expect("2 fds");
    let group = fds.pop().expect("2 fds");
    let mut writers = HashMap::new();
    // Bounded by the holder's writer count; a broken holder ends it with an error.
    for _ in 0..1_000_000 {
        let (n, fds) = recv(conn.as_fd(), &mut buf)?;
        let msg = std::str::from_utf8(&buf[..n]).map_err(|_| bad("non-UTF-8 message"))?;
        if msg == "END" {
            return Ok(Attached {
                conn,
                group,
                journal,
                writers,
            });
        }
        let ids: Vec<&str> = msg
            .strip_prefix("WRITERS")
            .ok_or_else(|| bad("expected WRITERS or END"))?
            .split_whitespace()
            .collect();
        if ids.len() != fds.len() {
            return Err(bad("WRITERS ids and fds differ in number"));
        }
        for (id, fd) in ids.into_iter().zip(fds) {
            writers.insert(id.to_string(), fd);
        }
    }
    Err(bad("too many messages"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_with_their_handles() {
        let line = "fanotify ino:1a2b sdev:800003 mflags:0 mask:80000 ignored_mask:0 \
                    fhandle-bytes:8 fhandle-type:1 f_handle:0102030405060708";
        let m = parse_mark(line).unwrap();
        assert_eq!(m.id, (libc::makedev(8, 3), 0x1a2b));
        assert_eq!(m.handle, Some((1, vec![1, 2, 3, 4, 5, 6, 7, 8])));
        let short = "fanotify ino:5 sdev:800003 mflags:0 mask:80000 ignored_mask:0";
        assert_eq!(parse_mark(short).unwrap().handle, None);
        assert!(parse_mark("fanotify ino:zz").is_err());
        assert_eq!(unescape_mount_path("/a\\040b\\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape_mount_path("/tail\\04"), b"/tail\\04".to_vec());
    }
}
