//! The fanotify kernel ABI (`include/uapi/linux/fanotify.h`, 6.14+ for pre-content
//! events), kept apart from the safe front end that uses it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `fanotify_init` flag: close the group fd on exec.
pub const FAN_CLOEXEC: u32 = 0x0000_0001;
/// `fanotify_init` flag: reads do not block.
pub const FAN_NONBLOCK: u32 = 0x0000_0002;
/// `fanotify_init` class: pre-content permission events (needed for `FAN_PRE_ACCESS`).
pub const FAN_CLASS_PRE_CONTENT: u32 = 0x0000_0008;
/// `fanotify_init` flag: no queue limit. Without it a full queue (16,384 events)
/// silently *allows* new permission events, which would expose holes as zeros.
pub const FAN_UNLIMITED_QUEUE: u32 = 0x0000_0010;
/// `fanotify_init` flag: no limit on the number of marks.
pub const FAN_UNLIMITED_MARKS: u32 = 0x0000_0020;

/// `fanotify_mark` flag: add to the mark's mask.
pub const FAN_MARK_ADD: u32 = 0x0000_0001;
/// `fanotify_mark` flag: remove from the mark's mask (the mark goes when empty).
pub const FAN_MARK_REMOVE: u32 = 0x0000_0002;

/// Event: a range of a file is about to be read (or written); content may be filled
/// before answering.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;

/// Response: let the access go on.
pub const FAN_ALLOW: u32 = 0x01;
/// Response: refuse the access (EPERM unless an errno is given).
pub const FAN_DENY: u32 = 0x02;
/// Bits of the errno carried in the top byte of a deny response.
const FAN_ERRNO_BITS: u32 = 8;
const FAN_ERRNO_SHIFT: u32 = 32 - FAN_ERRNO_BITS;
const FAN_ERRNO_MASK: u32 = (1 << FAN_ERRNO_BITS) - 1;

/// The deny response that makes the reader's syscall fail with `errno` (6.14+; the
/// kernel accepts a short list, EIO among them).
pub const fn deny_errno(errno: i32) -> u32 {
    FAN_DENY | (((errno as u32) & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT)
}

/// `FAN_DENY_ERRNO(EIO)`: what every failed fill answers.
pub const FAN_DENY_EIO: u32 = deny_errno(libc::EIO);
const _: () = assert!(FAN_DENY_EIO == 0x0500_0002);

/// Event metadata version this parser understands.
pub const FANOTIFY_METADATA_VERSION: u8 = 3;
/// Info record type: the byte range of a pre-content event.
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
/// `fd` of an event that has no file (queue overflow).
pub const FAN_NOFD: i32 = -1;

/// `struct fanotify_event_metadata`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventMetadata {
    /// Length of the whole event, info records included.
    pub event_len: u32,
    /// [`FANOTIFY_METADATA_VERSION`].
    pub vers: u8,
    /// Zero.
    pub reserved: u8,
    /// Length of this struct.
    pub metadata_len: u16,
    /// Event bits.
    pub mask: u64,
    /// An fd open on the accessed file (installed in the reader's table), or an error.
    pub fd: i32,
    /// The accessing process.
    pub pid: i32,
}
/// Bytes of [`EventMetadata`]: the smallest event.
pub const EVENT_METADATA_BYTES: usize = 24;
const _: () = assert!(std::mem::size_of::<EventMetadata>() == EVENT_METADATA_BYTES);

/// `struct fanotify_event_info_header`.
pub const INFO_HEADER_BYTES: usize = 4;
/// `struct fanotify_event_info_range { hdr; u32 pad; u64 offset; u64 count; }`.
pub const INFO_RANGE_BYTES: usize = 24;

/// `struct fanotify_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Response {
    /// The event's fd number as the reader received it: the kernel matches the pending
    /// event by this number alone, whichever process writes the response.
    pub fd: i32,
    /// [`FAN_ALLOW`], [`FAN_DENY`] or [`deny_errno`].
    pub response: u32,
}
const _: () = assert!(std::mem::size_of::<Response>() == 8);

/// Creates a pre-content group with an unlimited queue (see [`FAN_UNLIMITED_QUEUE`]).
pub fn init_group() -> io::Result<OwnedFd> {
    let flags = FAN_CLASS_PRE_CONTENT
        | FAN_CLOEXEC
        | FAN_NONBLOCK
        | FAN_UNLIMITED_QUEUE
        | FAN_UNLIMITED_MARKS;
    let event_f_flags = (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
    // SAFETY: plain syscall with integer arguments; on success the returned fd is new and
    // owned by nobody else.
    let fd = unsafe { libc::fanotify_init(flags, event_f_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(group, flags, mask, file, NULL)`: marks (or unmarks) the inode of
/// the open file `file`.
pub fn mark(group: BorrowedFd<'_>, flags: u32, mask: u64, file: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both fds are valid for the call (borrowed); a NULL path makes the kernel
    // use `file` itself.
    let r = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            file.as_raw_fd(),
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes one response. `Ok(false)`: no pending event had that fd number (ENOENT).
pub fn respond(group: BorrowedFd<'_>, fd: i32, response: u32) -> io::Result<bool> {
    let r = Response { fd, response };
    // SAFETY: `r` is a plain repr(C) value of exactly the size passed; the group fd is
    // valid for the call.
    let n = unsafe {
        libc::write(
            group.as_raw_fd(),
            (&r as *const Response).cast(),
            std::mem::size_of::<Response>(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}
