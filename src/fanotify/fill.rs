//! The one step every front end needs from the serving core: "write these chunks of
//! this blob, verified, into this fd". [`Filler`] is that narrow interface; [`PackFiller`]
//! is the straightforward synchronous implementation (pread the record from its pack,
//! decode and verify, pwrite whole zero-padded slots). The io_uring engine (`serve`)
//! is meant to replace it behind the same trait.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::store::chunk::{self, MAX_CHUNK_BYTES, MAX_RECORD_BYTES};
use crate::store::{read_full_at, BlobEntry, BlobTable, Registry};

/// Why a fill failed. Any of these makes the front end answer EIO.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The store no longer has a chunk of the range.
    #[error("blob {blob}: chunk {digest} at offset {offset} is not in the store")]
    MissingChunk {
        /// Blob id.
        blob: String,
        /// Chunk digest.
        digest: String,
        /// Slot offset in the blob.
        offset: u64,
    },
    /// The chunk's pack is not open.
    #[error("blob {blob}: pack {pack} is not known")]
    MissingPack {
        /// Blob id.
        blob: String,
        /// Pack number.
        pack: u32,
    },
    /// Reading the record failed.
    #[error("reading {path}: {source}")]
    Read {
        /// Pack file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The record does not decode to the chunk's bytes (corrupt pack).
    #[error("blob {blob}: chunk {digest} at offset {offset}: {source}")]
    Corrupt {
        /// Blob id.
        blob: String,
        /// Chunk digest.
        digest: String,
        /// Slot offset in the blob.
        offset: u64,
        /// Cause.
        #[source]
        source: chunk::ChunkError,
    },
    /// Writing into the blob file failed.
    #[error("blob {blob}: writing offset {offset}: {source}")]
    Write {
        /// Blob id.
        blob: String,
        /// Offset.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What a fill did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FillDone {
    /// Chunks read from the store.
    pub chunks: u64,
    /// Bytes written to the target.
    pub bytes: u64,
}

/// Fills blob slots into a target file. One per worker thread (it owns its buffers).
pub trait Filler: Send {
    /// Writes every slot of `blob` that overlaps `[offset, offset + len)` to `target`
    /// at its blob offset: whole slots, each chunk verified before any byte of it is
    /// written, the slot's tail padded with zeros. On error, slots written before the
    /// failing one hold verified bytes; the failing one and later ones are untouched.
    fn fill(
        &mut self,
        blob: &BlobTable,
        offset: u64,
        len: u64,
        target: BorrowedFd<'_>,
    ) -> Result<FillDone, FillError>;
}

/// Open pack files and counters shared by every [`PackFiller`].
#[derive(Debug)]
pub struct Packs {
    files: HashMap<u32, (PathBuf, File)>,
    /// Chunks read from packs (all fillers).
    pub chunks_read: AtomicU64,
}

impl Packs {
    /// Opens every pack of the registry (kept open for the daemon's life).
    pub fn open(registry: &Registry) -> io::Result<Arc<Packs>> {
        let mut files = HashMap::new();
        for (n, path) in &registry.packs {
            let f = File::open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            files.insert(*n, (path.clone(), f));
        }
        Ok(Arc::new(Packs {
            files,
            chunks_read: AtomicU64::new(0),
        }))
    }
}

/// The synchronous filler: pread, decode, verify, pwrite.
pub struct PackFiller {
    packs: Arc<Packs>,
    record: Vec<u8>,
    out: Vec<u8>,
}

impl PackFiller {
    /// A filler with its own buffers (one record and one chunk, allocated once).
    pub fn new(packs: Arc<Packs>) -> PackFiller {
        PackFiller {
            packs,
            record: vec![0u8; MAX_RECORD_BYTES],
            out: vec![0u8; MAX_CHUNK_BYTES],
        }
    }

    fn fill_entry(
        &mut self,
        blob: &BlobTable,
        e: &BlobEntry,
        target: BorrowedFd<'_>,
    ) -> Result<u64, FillError> {
        let loc = e.loc.ok_or_else(|| FillError::MissingChunk {
            blob: blob.id().to_string(),
            digest: e.digest.to_string(),
            offset: e.blob_offset,
        })?;
        let (path, file) =
            self.packs
                .files
                .get(&loc.pack)
                .ok_or_else(|| FillError::MissingPack {
                    blob: blob.id().to_string(),
                    pack: loc.pack,
                })?;
        let want = loc.record_len();
        let n = read_full_at(file, &mut self.record[..want], loc.offset).map_err(|source| {
            FillError::Read {
                path: path.clone(),
                source,
            }
        })?;
        self.packs.chunks_read.fetch_add(1, Ordering::Relaxed);
        let slot = e.slot_len() as usize;
        chunk::decode_record(&self.record[..n], &loc, &e.digest, &mut self.out[..slot]).map_err(
            |source| FillError::Corrupt {
                blob: blob.id().to_string(),
                digest: e.digest.to_string(),
                offset: e.blob_offset,
                source,
            },
        )?;
        self.out[e.raw_len as usize..slot].fill(0);
        write_all_at(target, &self.out[..slot], e.blob_offset).map_err(|source| {
            FillError::Write {
                blob: blob.id().to_string(),
                offset: e.blob_offset,
                source,
            }
        })?;
        Ok(slot as u64)
    }
}

impl Filler for PackFiller {
    fn fill(
        &mut self,
        blob: &BlobTable,
        offset: u64,
        len: u64,
        target: BorrowedFd<'_>,
    ) -> Result<FillDone, FillError> {
        let mut done = FillDone::default();
        for e in blob.overlapping(offset, len) {
            done.bytes += self.fill_entry(blob, e, target)?;
            done.chunks += 1;
        }
        Ok(done)
    }
}

/// pwrite until done (bounded: each call writes at least one byte or fails).
pub fn write_all_at(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of the given length; the fd is valid (borrowed).
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwrite wrote 0 bytes",
            ));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}
