//! The two pieces of systemd's service protocol dedupd speaks, written by hand (no
//! libsystemd): `sd_notify` datagrams to `$NOTIFY_SOCKET`, with fds attached for the fd
//! store (`FDSTORE=1`), and the fds systemd passes back to a restarted service
//! (`$LISTEN_FDS`, `$LISTEN_FDNAMES`, `$LISTEN_PID`; the first is fd 3).
//! See sd_notify(3) and sd_listen_fds(3).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// Most fds taken from `$LISTEN_FDS` (systemd's own store limit is configurable; this
/// bounds what we trust).
const MAX_LISTEN_FDS: usize = 64;

/// Set once the passed fds were taken: they are owned from then on, and only once.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// True when a service manager listens for notifications (`$NOTIFY_SOCKET` is set).
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`, with `fds`
/// attached. Ok(false) when there is no notify socket.
pub fn notify(state: &str, fds: &[RawFd]) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    notify_to(&path, state, fds)?;
    Ok(true)
}

/// [`notify`] to the socket at `path` (`@name`: an abstract socket).
fn notify_to(path: &std::ffi::OsStr, state: &str, fds: &[RawFd]) -> io::Result<()> {
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => UnixAddr::new_abstract(abstract_name)?,
        None => UnixAddr::new(bytes)?,
    };
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let iov = [IoSlice::new(state.as_bytes())];
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    socket::sendmsg(
        sock.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(())
}

/// The fds systemd passed to this process, with their names (`$LISTEN_FDNAMES`, else
/// "unknown"), each made close-on-exec. Empty when none were passed to *this* process
/// (`$LISTEN_PID` must be our pid), and on every call after the first.
pub fn listen_fds() -> Vec<(String, OwnedFd)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_LISTEN_FDS);
    if !pid_ok || n == 0 || TAKEN.swap(true, Ordering::AcqRel) {
        return Vec::new();
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    (0..n)
        .map(|i| {
            let fd = LISTEN_FDS_START + i as RawFd;
            // SAFETY: systemd passed fds LISTEN_FDS_START.. LISTEN_FDS_START+n to this
            // process (LISTEN_PID is ours); nothing else in the process owns them, and the
            // TAKEN flag makes this the only place that takes them, once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(
                &owned,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            let name = names
                .get(i)
                .cloned()
                .unwrap_or_else(|| "unknown".to_string());
            (name, owned)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn notify_sends_the_state_and_the_fds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(rx.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        let f = tempfile::tempfile().unwrap();
        notify_to(
            path.as_os_str(),
            "FDSTORE=1\nFDNAME=cachefiles",
            &[f.as_raw_fd()],
        )
        .unwrap();
        let mut buf = [0u8; 256];
        let (n, fds) = crate::frontend::holder::recv(rx.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=cachefiles");
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn fds_passed_to_another_pid_are_not_taken() {
        // LISTEN_PID names another process: nothing is ours.
        assert!(std::env::var_os("LISTEN_PID").is_none());
        assert!(listen_fds().is_empty());
    }
}
