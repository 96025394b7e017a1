//! What the front ends' holder processes share: a holder is a small process that keeps a
//! kernel fd (the fanotify group, the bound `/dev/cachefiles` device) alive while daemons
//! come and go, and hands it to each daemon over a unix socket (`SOCK_SEQPACKET`, fds
//! passed with `SCM_RIGHTS`).
//!
//! The socket is made with mode 0600 (set on the socket before `bind`, so it never exists
//! with a wider mode), and every peer is checked with `SO_PEERCRED`: only root or the
//! holder's own user may attach, since the fds handed out are root-capable. One holder
//! per socket: it holds an exclusive `flock` on `<socket>.lock` for its whole life.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

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

/// [`recv`] that gives up after `timeout` (`ErrorKind::TimedOut`).
pub fn recv_timeout(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    timeout: std::time::Duration,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut pfd = [PollFd::new(sock, PollFlags::POLLIN)];
    let ready = loop {
        match nix::poll::poll(
            &mut pfd,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if ready == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
    }
    recv(sock, buf)
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
/// about to hand over a kernel fd.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let s = seqpacket()?;
    socket::connect(s.as_raw_fd(), &UnixAddr::new(path)?)?;
    check_peer(&s)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, format!("holder: {e}")))?;
    Ok(s)
}

/// Listens on `path` (a stale socket file is replaced), mode 0600 from the start.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let s = seqpacket()?;
    // The bound file takes the socket inode's mode (less the umask): set it first, so
    // that the path never exists with a wider mode.
    nix::sys::stat::fchmod(&s, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    socket::bind(s.as_raw_fd(), &UnixAddr::new(path)?)?;
    // Belt and braces for filesystems that ignore the socket's mode.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    socket::listen(&s, Backlog::new(16).expect("valid backlog"))?;
    Ok(s)
}

/// Accepts one connection.
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The peer's uid if it may attach (root, or dedupd's own user: the rule of
/// [`crate::perms::check_peer`]); the error names who it was.
pub fn check_peer(conn: &OwnedFd) -> io::Result<u32> {
    let uid = crate::perms::peer_uid(conn)?;
    crate::perms::allowed_uid(uid)
        .map(|()| uid)
        .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))
}

/// Takes the exclusive lock `<socket>.lock` that makes a holder the only one of its
/// socket; `None` when another holder has it.
pub fn lock(socket_path: &Path) -> io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let lock_path = socket_path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Ignores the signals that would end a holder by accident (SIGTERM, SIGINT, SIGHUP,
/// SIGPIPE, and SIGIO, which a lease break sends): a holder ends on a daemon's word, on
/// `dedupd teardown`, once nothing uses what it holds, or on SIGKILL.
pub fn ignore_stray_signals() -> io::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGPIPE,
        Signal::SIGIO,
    ] {
        // SAFETY: installing SIG_IGN runs no handler code, so no async-signal-safety
        // concern arises.
        unsafe { signal(sig, SigHandler::SigIgn) }?;
    }
    Ok(())
}

/// Whether process `pid` is alive (a zombie counts as gone: its fds are closed).
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        // The state follows the command name, which is in parentheses.
        st.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn listen_makes_a_private_socket_and_fds_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let l = listen(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let c = connect(&path).unwrap();
        let s = accept(&l).unwrap();
        assert!(check_peer(&s).is_ok());
        let f = tempfile::tempfile().unwrap();
        send(c.as_fd(), b"HELLO", &[f.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv(s.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"HELLO");
        assert_eq!(fds.len(), 1);
        let err = recv_timeout(s.as_fd(), &mut buf, std::time::Duration::from_millis(10));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let lock1 = lock(&path).unwrap();
        assert!(lock1.is_some());
        assert!(lock(&path).unwrap().is_none(), "one holder per socket");
        assert!(process_alive(std::process::id() as i32));
    }
}
