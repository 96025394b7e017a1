//! Synchronous fills: "write these chunks of this blob, verified, into this fd", for the
//! paths that cannot wait for the serving engine: recovery of a dead daemon's journaled
//! events (before the engine may read new ones), events still queued when the engine
//! stops, and the `local` front end's materialization. Live fanotify fills go through
//! the engine ([`super::engine`]). [`PackFiller`] preads records from their packs,
//! verifies them with the engine's step (`store::chunk::decode_record`) and pwrites
//! whole zero-padded slots.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::store::chunk::{self, ChunkLoc, MAX_CHUNK_BYTES, MAX_RECORD_BYTES};
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
    /// written, the slot's tail padded with zeros. On error, some slots before the
    /// failing one may have been written (verified bytes); the failing one and later
    /// ones are untouched.
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
            // Fills mostly walk a pack forward: ask for a larger readahead window.
            // SAFETY: advisory call on a valid fd; no memory involved.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
            files.insert(*n, (path.clone(), f));
        }
        Ok(Arc::new(Packs {
            files,
            chunks_read: AtomicU64::new(0),
        }))
    }
}

/// Most bytes of records read, and of slots written, in one batch: runs of chunks
/// whose records are adjacent in a pack (the common case: a blob's chunks were ingested
/// in order) are read with one pread and written with one pwrite.
pub const BATCH_BYTES: usize = 4 << 20;
const _: () = assert!(BATCH_BYTES >= MAX_RECORD_BYTES && BATCH_BYTES >= MAX_CHUNK_BYTES);

/// The synchronous filler: pread, decode, verify, pwrite.
pub struct PackFiller {
    packs: Arc<Packs>,
    record: Vec<u8>,
    out: Vec<u8>,
    /// Where packs the [`Packs`] did not open are (`<root>/chunks`): the fetcher writes
    /// packs of its own after the daemon started.
    packs_dir: Option<PathBuf>,
    /// Packs opened here, for chunks in packs newer than the [`Packs`].
    opened: HashMap<u32, (PathBuf, File)>,
    /// Locations of chunks of lazily pulled blobs fetched for recovery (the blob
    /// table, made at mount, has none), by blob id and slot offset.
    pub fetched: HashMap<(String, u64), ChunkLoc>,
}

impl PackFiller {
    /// A filler with its own buffers (allocated once).
    pub fn new(packs: Arc<Packs>) -> PackFiller {
        PackFiller {
            packs,
            record: vec![0u8; BATCH_BYTES],
            out: vec![0u8; BATCH_BYTES],
            packs_dir: None,
            opened: HashMap::new(),
            fetched: HashMap::new(),
        }
    }

    /// A filler that also opens packs in `dir` that `packs` lacks (made later).
    pub fn with_packs_dir(packs: Arc<Packs>, dir: PathBuf) -> PackFiller {
        PackFiller {
            packs_dir: Some(dir),
            ..PackFiller::new(packs)
        }
    }

    /// Opens pack `pack` from the packs directory if neither the shared [`Packs`] nor
    /// this filler has it.
    fn open_pack(&mut self, blob: &BlobTable, pack: u32) -> Result<(), FillError> {
        if self.packs.files.contains_key(&pack) || self.opened.contains_key(&pack) {
            return Ok(());
        }
        let missing = || FillError::MissingPack {
            blob: blob.id().to_string(),
            pack,
        };
        let path = self
            .packs_dir
            .as_ref()
            .ok_or_else(missing)?
            .join(format!("{pack:08}.pack"));
        let f = File::open(&path).map_err(|_| missing())?;
        self.opened.insert(pack, (path, f));
        Ok(())
    }

    /// Fills `run`: entries whose slots are consecutive in the blob and whose records
    /// are consecutive in one pack, together at most BATCH_BYTES each way.
    fn fill_run(
        &mut self,
        blob: &BlobTable,
        run: &[BlobEntry],
        target: BorrowedFd<'_>,
    ) -> Result<u64, FillError> {
        let first = run[0].loc.expect("runs hold located entries");
        let last = run[run.len() - 1].loc.expect("located");
        let rec_bytes = (last.offset + last.record_len() as u64 - first.offset) as usize;
        self.open_pack(blob, first.pack)?;
        let (path, file) = match self.packs.files.get(&first.pack) {
            Some(x) => x,
            None => &self.opened[&first.pack],
        };
        let n =
            read_full_at(file, &mut self.record[..rec_bytes], first.offset).map_err(|source| {
                FillError::Read {
                    path: path.clone(),
                    source,
                }
            })?;
        let mut out_at = 0usize;
        for e in run {
            let loc = e.loc.expect("located");
            let rec_at = (loc.offset - first.offset) as usize;
            let rec_end = (rec_at + loc.record_len()).min(n);
            let slot = e.slot_len() as usize;
            self.packs.chunks_read.fetch_add(1, Ordering::Relaxed);
            chunk::decode_record(
                &self.record[rec_at.min(rec_end)..rec_end],
                &loc,
                &e.digest,
                &mut self.out[out_at..out_at + slot],
            )
            .map_err(|source| FillError::Corrupt {
                blob: blob.id().to_string(),
                digest: e.digest.to_string(),
                offset: e.blob_offset,
                source,
            })?;
            self.out[out_at + e.raw_len as usize..out_at + slot].fill(0);
            out_at += slot;
        }
        write_all_at(target, &self.out[..out_at], run[0].blob_offset).map_err(|source| {
            FillError::Write {
                blob: blob.id().to_string(),
                offset: run[0].blob_offset,
                source,
            }
        })?;
        Ok(out_at as u64)
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
        let mut entries = blob.overlapping(offset, len).to_vec();
        if !self.fetched.is_empty() {
            for e in entries.iter_mut().filter(|e| e.loc.is_none()) {
                e.loc = self
                    .fetched
                    .get(&(blob.id().to_string(), e.blob_offset))
                    .copied();
            }
        }
        let mut done = FillDone::default();
        let mut i = 0;
        // Bounded: each iteration consumes at least one entry.
        while i < entries.len() {
            let e = &entries[i];
            let loc = e.loc.ok_or_else(|| FillError::MissingChunk {
                blob: blob.id().to_string(),
                digest: e.digest.to_string(),
                offset: e.blob_offset,
            })?;
            let (mut rec_bytes, mut out_bytes) = (loc.record_len(), e.slot_len() as usize);
            let mut j = i + 1;
            while j < entries.len() {
                let (prev, next) = (&entries[j - 1], &entries[j]);
                let (Some(p), Some(q)) = (prev.loc, next.loc) else {
                    break;
                };
                let adjacent = q.pack == p.pack
                    && q.offset == p.offset + p.record_len() as u64
                    && next.blob_offset == prev.blob_offset + prev.slot_len();
                if !adjacent
                    || rec_bytes + q.record_len() > BATCH_BYTES
                    || out_bytes + next.slot_len() as usize > BATCH_BYTES
                {
                    break;
                }
                rec_bytes += q.record_len();
                out_bytes += next.slot_len() as usize;
                j += 1;
            }
            done.bytes += self.fill_run(blob, &entries[i..j], target)?;
            done.chunks += (j - i) as u64;
            i = j;
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::store::{LayerCommit, LayerRecord, RawEntry, Store};

    /// A store with one blob of `chunks` (in order), returning its registry.
    fn store_with(dir: &std::path::Path, chunks: &[Vec<u8>]) -> (Store, Registry, String) {
        let store = Store::open(&dir.join("root")).unwrap();
        let mut ing = store.ingest().unwrap();
        let mut entries = Vec::new();
        for c in chunks {
            let put = ing.put_chunk(c).unwrap();
            entries.push(RawEntry {
                digest: put.digest,
                raw_len: c.len() as u32,
            });
        }
        let id = crate::store::blob::blob_id(&crate::store::blob::encode_table(&entries));
        let tmp = dir.join("root/layers/img.tmp");
        std::fs::write(&tmp, [0u8; 4096]).unwrap();
        let record = LayerRecord {
            diff_id: format!("sha256:{}", "ab".repeat(32)),
            digests: vec![],
            blobs: vec![id.clone()],
            chunk_bytes: 65536,
            image_bytes: 4096,
            files: 0,
            chunks: 0,
            new_chunks: 0,
            logical_bytes: 0,
            stored_bytes: 0,
            remote: None,
        };
        ing.commit(LayerCommit {
            record,
            image_tmp: &tmp,
            blobs: vec![(id.clone(), entries)],
        })
        .unwrap();
        let reg = store.registry().unwrap();
        (store, reg, id)
    }

    fn table(reg: &Registry, id: &str) -> Arc<BlobTable> {
        match &*reg.blobs[id] {
            crate::store::BlobSource::Chunked(t) => t.clone(),
            _ => panic!("not chunked"),
        }
    }

    #[test]
    fn fills_whole_padded_slots_and_refuses_corrupt_chunks() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let chunks: Vec<Vec<u8>> = (0..40u32)
            .map(|i| {
                let len = if i % 7 == 3 { 5000 } else { 65536 };
                (0..len)
                    .map(|k| (k as u32 ^ i.wrapping_mul(2654435761)) as u8)
                    .collect()
            })
            .collect();
        let (store, reg, id) = store_with(dir.path(), &chunks);
        let t = table(&reg, &id);
        let packs = Packs::open(&reg).unwrap();
        let mut filler = PackFiller::new(packs.clone());
        let out_path = dir.path().join("blob");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&out_path)
            .unwrap();
        out.set_len(t.size_bytes()).unwrap();
        // A range in the middle: exactly the overlapping slots are written.
        let done = filler.fill(&t, 70_000, 10, out.as_fd()).unwrap();
        assert_eq!(done.chunks, 1);
        let done = filler.fill(&t, 0, t.size_bytes(), out.as_fd()).unwrap();
        assert_eq!(done.chunks, 40);
        assert_eq!(done.bytes, t.size_bytes());
        let mut got = vec![0u8; t.size_bytes() as usize];
        out.read_exact_at(&mut got, 0).unwrap();
        let mut want = Vec::new();
        for c in &chunks {
            want.extend_from_slice(c);
            want.resize(want.len().div_ceil(4096) * 4096, 0);
        }
        assert!(got == want);

        // Corrupt chunk 30's payload: a fill over it fails, and writes nothing of it.
        let e = t.entries()[30];
        let loc = e.loc.unwrap();
        let pack = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(store.pack_path(loc.pack))
            .unwrap();
        let at = loc.offset + 48 + 100;
        let mut b = [0u8; 1];
        pack.read_exact_at(&mut b, at).unwrap();
        pack.write_all_at(&[b[0] ^ 1], at).unwrap();
        let fresh = dir.path().join("blob2");
        let out2 = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&fresh)
            .unwrap();
        out2.set_len(t.size_bytes()).unwrap();
        let err = filler
            .fill(&t, 0, t.size_bytes(), out2.as_fd())
            .unwrap_err();
        assert!(matches!(err, FillError::Corrupt { .. }), "{err}");
        let mut slot = vec![0u8; e.slot_len() as usize];
        out2.read_exact_at(&mut slot, e.blob_offset).unwrap();
        assert!(
            slot.iter().all(|&x| x == 0),
            "no byte of a corrupt chunk is written"
        );
    }
}
