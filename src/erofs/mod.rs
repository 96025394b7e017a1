//! The EROFS on-disk format (`fs/erofs/erofs_fs.h`) and our image writer.
//!
//! Images use 4 KiB blocks. Regular files are chunk-based (`EROFS_INODE_CHUNK_BASED` with
//! chunk indexes): their data lives in data blobs named through the device table, which
//! is the layout EROFS reads over fscache, over fanotify-filled files, and with
//! `-o device=` on a plain mount.
//!
//! # On-disk choices
//! - **Superblock** at byte 1024 of block 0: `blkszbits` 12, `meta_blkaddr` 0 (a nid is
//!   the inode's byte offset / 32), `feature_incompat` = `CHUNKED_FILE` (+
//!   `DEVICE_TABLE` when there are data blobs), `feature_compat` = `SB_CHKSUM`: crc32c
//!   (seed ~0, no final xor) of bytes 1024..4096 of block 0 with the checksum field zeroed.
//!   uuid and volume name are zero and `build_time` comes from [`ImageOptions`], so the
//!   same tree and options give the same bytes.
//! - **Device table** right after the superblock (`devt_slotoff` 9, byte 1152): one
//!   128-byte `erofs_deviceslot` per blob, `tag` = [`Device::tag`], `blocks`,
//!   `mapped_blkaddr` 0. The inodes follow it; the root inode comes first, so its nid
//!   (which must fit the 16-bit `root_nid`) is 36 + 4 x devices.
//! - **Inodes** in depth-first order ([`Tree::reachable`]), 32-byte aligned. Compact
//!   (32 B) only when the inode's mtime equals `build_time` with 0 ns (compact inodes have
//!   no time of their own), uid/gid and nlink fit 16 bits and the size 32 bits; otherwise
//!   extended (64 B, own mtime + nsec, negative times allowed). The inode, its xattrs and
//!   any inline data never straddle a block when together they fit in one; otherwise the
//!   inode core at least starts and ends in one block.
//! - **Regular files**: always `CHUNK_BASED`, format `EROFS_CHUNK_FORMAT_INDEXES` with
//!   `chunk_bits` minus 12 as blkbits, followed (8-byte aligned, after the xattrs) by one
//!   8-byte `{advise 0, device_id, blkaddr}` per chunk; holes are `device_id 0, blkaddr
//!   EROFS_NULL_ADDR`. Empty files have no indexes. Every blob chunk must lie inside its
//!   device's `blocks`.
//! - **Directories**: entries sorted bytewise with `.` and `..` merged in, packed greedily
//!   into 4 KiB blocks (dirents then names; a block's last name ends at the first NUL or at
//!   `i_size`); `i_size` = full blocks + bytes used in the last. A directory of one block
//!   is `FLAT_INLINE` (stored right after its inode) when it fits there; larger ones are
//!   `FLAT_PLAIN` in consecutive blocks after the metadata. nlink = 2 + subdirectories.
//! - **Symlinks**: `FLAT_INLINE` target after the inode (fast symlink); a target that
//!   cannot share the block with its inode and xattrs goes to its own block (`FLAT_PLAIN`).
//! - **Devices, fifos, sockets**: `i_u` = `new_encode_dev(major, minor)` (12-bit major,
//!   20-bit minor) or 0. An overlay whiteout is simply a 0:0 char device.
//! - **Hard links**: one inode, nlink = number of names ([`Tree::reachable`]).
//! - **Xattrs**: prefixes `user.`=1, `system.posix_acl_access`=2,
//!   `system.posix_acl_default`=3, `trusted.`=4, `security.`=6 (no long-prefix table). A
//!   (name, value) pair carried by two or more inodes is stored once in the shared xattr
//!   area (`xattr_blkaddr`, after the inodes) and referenced by id (up to 255 per inode);
//!   the rest are inline after the inode, in name order. `h_name_filter` is 0 (no filter
//!   feature).
//!
//! # Refused (`WriteError::Unrepresentable`, naming the path and the rule)
//! Names that are empty, over 255 bytes, contain `/` or NUL, or are `.`/`..`; xattr names
//! without one of the prefixes above, over 255 bytes in full, or `user.*` on anything but
//! a regular file or directory (the VFS would list but never return them); xattr values
//! over 65535 bytes or more than ~256 KiB of xattrs per inode; symlink targets empty, over
//! 4095 bytes or containing NUL; device numbers beyond 12/20 bits; uid/gid 4294967295;
//! mtime nanoseconds >= 10^9; permission bits beyond 07777; a chunk list whose length
//! does not match the size, or a chunk on device 0, on a device not in the table, or
//! outside its device; a directory with more than one name (hard-linked or cyclic);
//! images beyond 2^32 blocks; chunk_bits outside 12..=43; device tags empty, over 64 bytes
//! or containing NUL.

pub mod format;
pub mod tree;
mod writer;

#[cfg(test)]
mod tests;

use std::io::{Seek, Write};

pub use self::tree::{ChunkAddr, FileData, Kind, Meta, Node, NodeId, Tree};

/// One extra device (data blob) in the image's device table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The blob's name: at most 64 bytes (our blob ids are 64 hex characters). In fscache
    /// mode it is the cookie key the kernel asks the daemon for.
    pub tag: String,
    /// Size of the blob in 4 KiB blocks.
    pub blocks: u32,
}

/// How to write an image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// log2 of the chunk size of regular files (12 ..= 20).
    pub chunk_bits: u8,
    /// Data blobs; `ChunkAddr::Blob { device: n, .. }` refers to `devices[n - 1]`.
    pub devices: Vec<Device>,
    /// Superblock build time, seconds (keep fixed for reproducible images).
    pub build_time: u64,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image size in bytes (a multiple of 4096).
    pub bytes: u64,
    /// Inodes written.
    pub inodes: u64,
}

/// Errors of the writer.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Output I/O.
    #[error("writing EROFS image: {0}")]
    Io(#[from] std::io::Error),
    /// The tree cannot be represented (a name over 255 bytes, an xattr name with no
    /// EROFS prefix, a chunk list that does not match the size, ...).
    #[error("cannot represent in EROFS: {0}")]
    Unrepresentable(String),
}

/// Writes `tree` as an EROFS image to `out`. Deterministic: the same tree and options
/// give the same bytes.
pub fn write_image<W: Write + Seek>(
    tree: &Tree,
    opts: &ImageOptions,
    out: &mut W,
) -> Result<ImageInfo, WriteError> {
    writer::write(tree, opts, out)
}
