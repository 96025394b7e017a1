//! The EROFS on-disk format (`fs/erofs/erofs_fs.h`) and our image writer.
//!
//! Images use 4 KiB blocks. Regular files are chunk-based (`EROFS_INODE_CHUNK_BASED` with
//! chunk indexes): their data lives in data blobs named through the device table, which
//! is the layout EROFS reads over fscache, over fanotify-filled files, and with
//! `-o device=` on a plain mount.

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
