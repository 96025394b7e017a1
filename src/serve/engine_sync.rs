//! Write strategy "sync": `pwrite` on the engine thread. No io-wq hop, but the thread
//! blocks for the duration of each O_DIRECT write.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

/// Writes all of `buf` to `fd` at `off`; a short write is an error (the cache file's
/// range would be left partly unfilled).
pub(super) fn write_all_at(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0usize;
    // Bounded: each pass writes at least one byte or returns.
    while done < buf.len() {
        match nix::sys::uio::pwrite(fd.as_fd(), &buf[done..], (off + done as u64) as i64) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(())
}
