//! `#[repr(C)]` mirrors of `include/uapi/linux/cachefiles.h` (Linux 6.12), and the
//! constants of the on-demand protocol. Nothing here interprets bytes: see
//! [`super::msg`] for the checked parser.

/// The largest message `read(2)` on `/dev/cachefiles` returns; a buffer of this size
/// always holds one whole message.
pub const CACHEFILES_MSG_MAX_SIZE: usize = 1024;

/// Opcode: the kernel asks the daemon to open an object (cookie) and gives it an fd.
pub const CACHEFILES_OP_OPEN: u32 = 0;
/// Opcode: the object is gone; close every fd held for it.
pub const CACHEFILES_OP_CLOSE: u32 = 1;
/// Opcode: fill a range of the object's cache file.
pub const CACHEFILES_OP_READ: u32 = 2;

/// `_IOW(0x98, 1, int)`: completes a READ; issued on the object's anon fd with the
/// msg_id passed by value (not as a pointer).
pub const CACHEFILES_IOC_READ_COMPLETE: u32 = 0x4004_9801;

/// Page size the kernel aligns READ requests to, and the granularity of cache writes.
pub const PAGE_BYTES: u64 = 4096;

/// `struct cachefiles_msg`: the header of every message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachefilesMsg {
    /// Request id, echoed by `copen` and READ_COMPLETE.
    pub msg_id: u32,
    /// One of the `CACHEFILES_OP_*` values.
    pub opcode: u32,
    /// Length of the whole message, header included.
    pub len: u32,
    /// The object the message is about.
    pub object_id: u32,
    // u8 data[] follows.
}

/// `struct cachefiles_open`: the payload of an OPEN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachefilesOpen {
    /// Bytes of the volume key, its trailing NUL included.
    pub volume_key_size: u32,
    /// Bytes of the cookie key (no NUL).
    pub cookie_key_size: u32,
    /// The anon fd installed in the reader's fd table.
    pub fd: u32,
    /// Reserved flags.
    pub flags: u32,
    // u8 data[]: volume key, then cookie key.
}

/// `struct cachefiles_read`: the payload of a READ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachefilesRead {
    /// Offset in the object.
    pub off: u64,
    /// Length of the range.
    pub len: u64,
}

/// Size of [`CachefilesMsg`].
pub const MSG_HEADER_BYTES: usize = 16;
/// Size of [`CachefilesOpen`].
pub const OPEN_HEADER_BYTES: usize = 16;
/// Size of [`CachefilesRead`].
pub const READ_BYTES: usize = 16;

const _: () = assert!(std::mem::size_of::<CachefilesMsg>() == MSG_HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<CachefilesOpen>() == OPEN_HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<CachefilesRead>() == READ_BYTES);
const _: () = assert!(std::mem::align_of::<CachefilesRead>() == 8);
const _: () = assert!(MSG_HEADER_BYTES + OPEN_HEADER_BYTES < CACHEFILES_MSG_MAX_SIZE);
// _IOW(type 0x98, nr 1, size 4): dir=1 (write) << 30 | size << 16 | type << 8 | nr.
const _: () = assert!(CACHEFILES_IOC_READ_COMPLETE == (1 << 30) | (4 << 16) | (0x98 << 8) | 1);
