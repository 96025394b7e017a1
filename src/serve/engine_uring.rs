//! Write strategy "uring": cache-file writes as io_uring WRITE_FIXED (or WRITE when the
//! buffers could not be registered), submitted in one batch per loop turn. The anon fd
//! has no FMODE_NOWAIT, so each write runs on an io-wq worker; the ring caps them.

use io_uring::{opcode, squeue, types, IoUring};

/// Caps the io-wq workers of `ring` (bounded and unbounded: the anon fd is not a
/// regular file, so its writes count as unbounded work).
pub(super) fn cap_workers(ring: &IoUring, workers: u32) -> std::io::Result<()> {
    let mut max = [workers, workers];
    ring.submitter().register_iowq_max_workers(&mut max)
}

/// The SQE writing `len` bytes at `ptr` (inside registered buffer `buf_index`, or
/// unregistered when `None`) to `fd` at `off`.
///
/// Marked IOSQE_ASYNC: the kernel's anon fd would send it to io-wq anyway (no
/// FMODE_NOWAIT), and the flag makes a simulator's plain ext4 file behave the same
/// instead of taking ext4's non-blocking direct-I/O path.
pub(super) fn write_entry(
    fd: i32,
    ptr: *const u8,
    len: u32,
    buf_index: Option<u16>,
    off: u64,
    user_data: u64,
) -> squeue::Entry {
    match buf_index {
        Some(i) => opcode::WriteFixed::new(types::Fd(fd), ptr, len, i)
            .offset(off)
            .build()
            .flags(squeue::Flags::ASYNC)
            .user_data(user_data),
        None => opcode::Write::new(types::Fd(fd), ptr, len)
            .offset(off)
            .build()
            .flags(squeue::Flags::ASYNC)
            .user_data(user_data),
    }
}

/// The SQE reading `len` bytes of `fd` at `off` into `ptr`.
pub(super) fn read_entry(
    fd: i32,
    ptr: *mut u8,
    len: u32,
    buf_index: Option<u16>,
    off: u64,
    user_data: u64,
) -> squeue::Entry {
    match buf_index {
        Some(i) => opcode::ReadFixed::new(types::Fd(fd), ptr, len, i)
            .offset(off)
            .build()
            .user_data(user_data),
        None => opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(off)
            .build()
            .user_data(user_data),
    }
}
