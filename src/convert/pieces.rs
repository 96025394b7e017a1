//! The conversion pipeline between the parser and the store.
//!
//! The parser thread (decompression, tar parsing, the tree) cuts each regular file into
//! chunk-sized pieces and hands the non-zero ones, in order, to the store side, which
//! hashes, compresses and appends them and places them in the layer's data blob. The two
//! sides share a fixed pool of buffers, so memory stays bounded whatever the layer size.
//! The parser does not wait for a piece's block address: it records the piece's sequence
//! number in the tree, and [`resolve_addrs`] swaps in the real addresses at the end.

use std::io::{self, Read};

use crossbeam_channel::{Receiver, Sender};

use crate::digest::ChunkDigest;
use crate::erofs::{ChunkAddr, FileData, Kind, Tree};
use crate::store::{BlobBuilder, Ingest, StoreError};

/// Buffers in flight between the two sides. Bounds the pipeline's memory to this many
/// chunks (at most 1 MiB each).
pub(crate) const PIPELINE_BUFFERS: usize = 8;

/// One non-zero piece of file data on its way to the store.
pub(crate) struct Piece {
    seq: u64,
    buf: Vec<u8>,
    len: usize,
}

/// Why a file's data could not be cut into pieces.
#[derive(Debug)]
pub(crate) enum PieceError {
    /// Reading the file's data failed.
    Read(io::Error),
    /// The data ended before the size the entry declared.
    Short {
        /// Bytes available.
        got: u64,
        /// Bytes declared.
        want: u64,
    },
    /// The store side stopped (it failed; its error is the one to report).
    StoreGone,
    /// More chunks than a block address can number.
    TooManyChunks,
}

/// The parser's end of the pipeline.
pub(crate) struct PieceSender {
    chunk_bytes: usize,
    work: Sender<Piece>,
    free: Receiver<Vec<u8>>,
    spare: Option<Vec<u8>>,
    zeros: Vec<u8>,
    next_seq: u64,
    /// Non-hole chunks sent.
    pub chunks: u64,
    /// Bytes of non-hole chunks sent.
    pub logical_bytes: u64,
}

/// The store's end of the pipeline.
pub(crate) struct PieceReceiver {
    work: Receiver<Piece>,
    free: Sender<Vec<u8>>,
}

/// A connected pair with `PIPELINE_BUFFERS` buffers of `chunk_bytes`.
pub(crate) fn pipeline(chunk_bytes: u32) -> (PieceSender, PieceReceiver) {
    let chunk_bytes = chunk_bytes as usize;
    let (work_tx, work_rx) = crossbeam_channel::bounded(PIPELINE_BUFFERS);
    let (free_tx, free_rx) = crossbeam_channel::bounded(PIPELINE_BUFFERS);
    for _ in 0..PIPELINE_BUFFERS - 1 {
        free_tx
            .send(vec![0u8; chunk_bytes])
            .expect("the pool channel holds PIPELINE_BUFFERS buffers");
    }
    (
        PieceSender {
            chunk_bytes,
            work: work_tx,
            free: free_rx,
            spare: Some(vec![0u8; chunk_bytes]),
            zeros: vec![0u8; chunk_bytes],
            next_seq: 0,
            chunks: 0,
            logical_bytes: 0,
        },
        PieceReceiver {
            work: work_rx,
            free: free_tx,
        },
    )
}

/// Fills `buf` from `r`; returns how many bytes it got (less only at end of input).
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl PieceSender {
    /// Cuts the next `size` bytes of `r` into chunks: all-zero chunks become holes, the
    /// others go to the store. The returned addresses are sequence numbers until
    /// [`resolve_addrs`] runs.
    pub(crate) fn file<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        size: u64,
    ) -> Result<FileData, PieceError> {
        let n_chunks = size.div_ceil(self.chunk_bytes as u64);
        // Never trust a declared size for an allocation: grow as data arrives.
        let mut chunks = Vec::with_capacity(n_chunks.min(1024) as usize);
        let mut left = size;
        while left > 0 {
            let len = left.min(self.chunk_bytes as u64) as usize;
            let mut buf = match self.spare.take() {
                Some(b) => b,
                None => self.free.recv().map_err(|_| PieceError::StoreGone)?,
            };
            let got = read_full(r, &mut buf[..len]).map_err(PieceError::Read);
            let got = match got {
                Ok(g) => g,
                Err(e) => {
                    self.spare = Some(buf);
                    return Err(e);
                }
            };
            if got < len {
                self.spare = Some(buf);
                return Err(PieceError::Short {
                    got: size - left + got as u64,
                    want: size,
                });
            }
            left -= len as u64;
            if buf[..len] == self.zeros[..len] {
                self.spare = Some(buf);
                chunks.push(ChunkAddr::Hole);
                continue;
            }
            let seq = self.next_seq;
            let blkaddr = u32::try_from(seq).map_err(|_| PieceError::TooManyChunks)?;
            self.next_seq += 1;
            self.chunks += 1;
            self.logical_bytes += len as u64;
            self.work
                .send(Piece { seq, buf, len })
                .map_err(|_| PieceError::StoreGone)?;
            chunks.push(ChunkAddr::Blob { device: 1, blkaddr });
        }
        Ok(FileData { size, chunks })
    }
}

impl PieceReceiver {
    /// Stores every piece until the sender is dropped; returns the block address of each
    /// piece by sequence number. On error the pipeline is torn down (the sender sees
    /// [`PieceError::StoreGone`]).
    pub(crate) fn run(
        self,
        ingest: &mut Ingest<'_>,
        builder: &mut BlobBuilder,
    ) -> Result<Vec<u32>, StoreError> {
        let mut addrs = Vec::new();
        for piece in self.work.iter() {
            debug_assert_eq!(piece.seq, addrs.len() as u64);
            let data = &piece.buf[..piece.len];
            let digest = ChunkDigest::of(data);
            ingest.put_chunk_with_digest(data, digest)?;
            addrs.push(builder.add(digest, piece.len as u32));
            // The sender may already be gone; then the buffer is simply dropped.
            let _ = self.free.send(piece.buf);
        }
        Ok(addrs)
    }
}

#[cfg(test)]
impl PieceReceiver {
    /// Consumes every piece without storing it; each piece's "address" is its sequence
    /// number.
    pub(crate) fn drain(self) -> Vec<u32> {
        let mut addrs = Vec::new();
        for piece in self.work.iter() {
            addrs.push(piece.seq as u32);
            let _ = self.free.send(piece.buf);
        }
        addrs
    }
}

/// Replaces the sequence numbers the parser put in the tree by block addresses.
pub(crate) fn resolve_addrs(tree: &mut Tree, addrs: &[u32]) {
    for id in 0..tree.arena_len() {
        if let Kind::File(data) = &mut tree.node_mut(id as u32).kind {
            for c in &mut data.chunks {
                if let ChunkAddr::Blob { blkaddr, .. } = c {
                    *blkaddr = addrs[*blkaddr as usize];
                }
            }
        }
    }
}
