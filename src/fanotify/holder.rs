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
//!
//! When a daemon goes away without `BYE` and none attaches within the grace period,
//! the holder fails closed: it answers every journaled and orphaned event, and every
//! new one, with EIO, until a daemon attaches again. Mounts then fail loudly, never
//! silently.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use super::event;
use super::journal::Journal;
use super::sys;

/// Most fds sent in one message (the kernel allows 253).
pub const FDS_PER_MESSAGE: usize = 32;
/// Largest message payload.
pub const MESSAGE_BYTES: usize = 4096;

/// Sends `payload` with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= FDS_PER_MESSAGE && payload.len() <= MESSAGE_BYTES);
    let iov = [IoSlice::new(payload)];
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message into `buf`: its length (0 at end of stream) and its fds.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS installed these fds in our table just now; nobody
                // else owns them.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// A seqpacket socket.
pub fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Connects to the holder at `path`; the holder must be root (or dedupd's user): it is
/// about to hand us the fanotify group.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let s = seqpacket()?;
    socket::connect(s.as_raw_fd(), &UnixAddr::new(path)?)?;
    crate::perms::check_peer(&s)
        .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, format!("holder: {why}")))?;
    Ok(s)
}

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
    /// A daemon is attached on this connection.
    Attached(OwnedFd),
    /// The grace period passed: every event is answered with EIO.
    FailClosed,
}

/// Runs the holder until a daemon says `BYE`. Creates the group and the journal,
/// listens on `socket_path`.
pub fn run(socket_path: &Path, grace: Duration, adopt: bool) -> io::Result<()> {
    // A holder that dies on a stray signal closes the group and exposes holes as zeros:
    // it ends only on BYE (or SIGKILL, which an operator sends after unmounting).
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        // SAFETY: installing SIG_IGN runs no handler code, so no async-signal-safety
        // concern arises.
        unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) }?;
    }
    // Its socket and lock file are root's alone (whoever started it).
    crate::perms::private_umask();
    // One holder per socket: a second one (two daemons racing to start it) leaves.
    let lock_path = socket_path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    // Held until this function returns (the holder's whole life).
    let _lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            tracing::info!(
                "fanotify holder: another holder owns {}",
                lock_path.display()
            );
            return Ok(());
        }
        Err((_, e)) => return Err(e.into()),
    };
    let _ = std::fs::remove_file(socket_path);
    let listener = seqpacket()?;
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(socket_path)?)?;
    std::fs::set_permissions(
        socket_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    socket::listen(&listener, Backlog::new(16).expect("valid backlog"))?;
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
        let mut pfd = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        if nix::poll::poll(&mut pfd, PollTimeout::from(5000u16))? == 0 {
            return Err(bad());
        }
        let mut buf = vec![0u8; MESSAGE_BYTES];
        let (n, mut fds) = recv(conn.as_fd(), &mut buf)?;
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
    loop {
        let timeout = match &state {
            State::Waiting(since) => {
                let left = grace.saturating_sub(since.elapsed());
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
            _ => PollTimeout::NONE,
        };
        let (listen_ready, conn_ready, group_ready) = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
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
            let attached = matches!(state, State::Attached(_));
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
                }
                Ok((n, mut fds)) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    if msg == "BYE" {
                        tracing::info!("fanotify holder: daemon said BYE; closing the group");
                        let _ = std::fs::remove_file(socket_path);
                        return Ok(());
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
        if listen_ready && !matches!(state, State::Attached(_)) {
            let Ok(conn) = accept(&listener) else {
                continue;
            };
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
    }
}

/// Accepts a connection from root (or dedupd's user) only: the holder hands out the
/// fanotify group and blob write fds. Others are closed at once (`SO_PEERCRED`; the
/// socket's mode 0600 already keeps them out).
fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new fd owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Err(why) = crate::perms::check_peer(&conn) {
        tracing::warn!("fanotify holder: connection refused: {why}");
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    }
    Ok(conn)
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
