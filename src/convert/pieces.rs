//! The conversion pipeline between the parser and the store.
//!
//! The parser thread (decompression, tar parsing, the tree) cuts each regular file into
//! chunk-sized pieces (all-zero ones too: see [`PieceSender::file`]; the chunks of a
//! sparse file's holes share one all-zero piece), packed, in order, into
//! batches of about 1 MiB that worker threads hash and compress, and that the store side
//! appends and places in the layer's data blob in sequence order (so the result does not
//! depend on thread timing). Batches, not chunks, cross threads: on a busy machine every
//! hand-off can cost a scheduler round trip. A fixed pool of batch buffers bounds memory
//! whatever the layer size. The parser does not wait for a piece's block address: it
//! records the piece's sequence number in the tree, and [`resolve_addrs`] swaps in the
//! real addresses at the end.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crossbeam_channel::{Receiver, Sender};

use crate::digest::{ChunkDigest, Leaves};
use crate::erofs::{ChunkAddr, FileData, Kind, Tree};
use crate::store::chunk::{encode_record, payload_is};
use crate::store::{BlobBuilder, Ingest, Store, StoreError};

/// Batch buffers in the pool: bounds the pipeline's memory to this many batches.
pub(crate) const PIPELINE_BATCHES: usize = 8;
/// Target size of a batch (a batch always holds at least one chunk).
const BATCH_BYTES: usize = 1 << 20;
/// At most this many hashing and compressing threads.
const MAX_WORKERS: usize = 4;
/// The most chunks of sparse-file holes one layer may have. Data chunks are bounded by
/// the layer's size, but a hole costs a few bytes of tar, and each of its chunks costs 8
/// bytes of memory and of image (its chunk index entry): this caps both at 128 MiB
/// (1 TiB of holes in 64 KiB chunks, 16 TiB in 1 MiB chunks).
pub(crate) const MAX_HOLE_CHUNKS: u64 = 1 << 24;

/// Consecutive non-zero pieces of file data on their way to the store.
pub(crate) struct Batch {
    /// Sequence number of the first piece.
    first_seq: u64,
    /// The pieces' bytes, back to back; `used` of them are valid.
    buf: Vec<u8>,
    used: usize,
    /// (offset in `buf`, length) of each piece.
    pieces: Vec<(usize, usize)>,
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
    /// More chunks of holes than [`MAX_HOLE_CHUNKS`].
    TooManyHoleChunks,
}

/// The parser's end of the pipeline.
pub(crate) struct PieceSender {
    chunk_bytes: usize,
    work: Sender<Batch>,
    free: Receiver<Batch>,
    /// The batch being filled.
    current: Option<Batch>,
    next_seq: u64,
    /// The sequence number of the all-zero piece that every hole chunk points to, once
    /// sent.
    zero_seq: Option<u32>,
    /// Hole chunks so far (at most [`MAX_HOLE_CHUNKS`]).
    hole_chunks: u64,
    /// Non-hole chunks sent.
    pub chunks: u64,
    /// Bytes of non-hole chunks sent.
    pub logical_bytes: u64,
}

/// The store's end of the pipeline.
pub(crate) struct PieceReceiver {
    work: Receiver<Batch>,
    free: Sender<Batch>,
}

/// A connected pair with `PIPELINE_BATCHES` batch buffers for chunks of `chunk_bytes`.
pub(crate) fn pipeline(chunk_bytes: u32) -> (PieceSender, PieceReceiver) {
    let chunk_bytes = chunk_bytes as usize;
    let batch_bytes = BATCH_BYTES.max(chunk_bytes);
    let (work_tx, work_rx) = crossbeam_channel::bounded(PIPELINE_BATCHES);
    let (free_tx, free_rx) = crossbeam_channel::bounded(PIPELINE_BATCHES);
    for _ in 0..PIPELINE_BATCHES {
        free_tx
            .send(Batch {
                first_seq: 0,
                buf: vec![0u8; batch_bytes],
                used: 0,
                pieces: Vec::with_capacity(batch_bytes / chunk_bytes),
            })
            .expect("the pool channel holds PIPELINE_BATCHES buffers");
    }
    (
        PieceSender {
            chunk_bytes,
            work: work_tx,
            free: free_rx,
            current: None,
            next_seq: 0,
            zero_seq: None,
            hole_chunks: 0,
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
    /// Makes `current` a batch with room for one more chunk: the current one, or (after
    /// sending a full one) an empty one from the pool.
    fn make_room(&mut self) -> Result<(), PieceError> {
        let full = self
            .current
            .as_ref()
            .is_some_and(|b| b.used + self.chunk_bytes > b.buf.len());
        if full {
            self.flush()?;
        }
        if self.current.is_none() {
            let mut b = self.free.recv().map_err(|_| PieceError::StoreGone)?;
            b.first_seq = self.next_seq;
            b.used = 0;
            b.pieces.clear();
            self.current = Some(b);
        }
        Ok(())
    }

    /// Sends the current batch, if it holds any piece.
    pub(crate) fn flush(&mut self) -> Result<(), PieceError> {
        if let Some(b) = self.current.take() {
            if b.pieces.is_empty() {
                self.current = Some(b);
            } else {
                self.work.send(b).map_err(|_| PieceError::StoreGone)?;
            }
        }
        Ok(())
    }

    /// Cuts the next `size` bytes of `r` into chunks, which all go to the store (an
    /// all-zero chunk is stored once and shared, not written as a hole). The returned
    /// addresses are sequence numbers until [`resolve_addrs`] runs.
    pub(crate) fn file<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        size: u64,
    ) -> Result<FileData, PieceError> {
        self.sparse_file(r, size, &[(0, size)])
    }

    /// Cuts a sparse file of `size` bytes into chunks: `r` gives the bytes of its data
    /// `regions` (offset, length; in order, not overlapping, within `size`) back to back,
    /// and the rest reads as zeros. A chunk with data is read and sent like any other
    /// (its hole parts zeroed); a chunk that is all hole is never read, hashed or
    /// compressed: it points to one all-zero chunk, sent once per layer. Over fscache,
    /// 6.12's erofs zero-fills the rest of a read request after an unmapped chunk, so
    /// data following an EROFS hole in the same readahead window would read as zeros:
    /// hence a shared zero chunk rather than an EROFS hole. The last chunk of a file may
    /// point to it too: the kernel reads only the blocks the file covers.
    pub(crate) fn sparse_file<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        size: u64,
        regions: &[(u64, u64)],
    ) -> Result<FileData, PieceError> {
        let chunk_bytes = self.chunk_bytes as u64;
        let want: u64 = regions.iter().map(|&(_, len)| len).sum();
        let mut got = 0u64;
        // Never trust a declared size for an allocation: grow as chunks are cut.
        let mut chunks = Vec::with_capacity(size.div_ceil(chunk_bytes).min(1024) as usize);
        // The first region that may still overlap the current chunk.
        let mut next = 0;
        let mut start = 0u64;
        while start < size {
            let end = size.min(start + chunk_bytes);
            // Regions before this chunk were read with the chunks they overlap.
            while next < regions.len() && regions[next].0 + regions[next].1 <= start {
                next += 1;
            }
            let overlapping = regions[next..]
                .iter()
                .take_while(|&&(offset, _)| offset < end)
                .map(|&(offset, len)| (offset.max(start), (offset + len).min(end)))
                .filter(|&(lo, hi)| lo < hi);
            let covered: u64 = overlapping.clone().map(|(lo, hi)| hi - lo).sum();
            if covered == 0 {
                let blkaddr = self.zero_chunk()?;
                self.hole_chunks += 1;
                if self.hole_chunks > MAX_HOLE_CHUNKS {
                    return Err(PieceError::TooManyHoleChunks);
                }
                chunks.push(ChunkAddr::Blob { device: 1, blkaddr });
                start = end;
                continue;
            }
            let len = (end - start) as usize;
            self.make_room()?;
            let batch = self.current.as_mut().expect("make_room leaves a batch");
            let at = batch.used;
            let piece = &mut batch.buf[at..at + len];
            if covered < len as u64 {
                // Batch buffers are reused: the hole parts must be zeroed.
                piece.fill(0);
            }
            for (lo, hi) in overlapping {
                let part = &mut piece[(lo - start) as usize..(hi - start) as usize];
                let n = read_full(r, part).map_err(PieceError::Read)?;
                got += n as u64;
                if n < part.len() {
                    return Err(PieceError::Short { got, want });
                }
            }
            // All-zero pieces of data are stored like any other (the store and the blob
            // keep one copy), never as EROFS holes (see above).
            let blkaddr = u32::try_from(self.next_seq).map_err(|_| PieceError::TooManyChunks)?;
            batch.pieces.push((at, len));
            batch.used += len;
            self.next_seq += 1;
            self.chunks += 1;
            self.logical_bytes += len as u64;
            chunks.push(ChunkAddr::Blob { device: 1, blkaddr });
            start = end;
        }
        debug_assert_eq!(got, want, "the caller checked the regions");
        Ok(FileData { size, chunks })
    }

    /// The sequence number of the all-zero chunk (of `chunk_bytes`) that holes point to,
    /// sending it the first time. It is not counted in `chunks` or `logical_bytes`.
    fn zero_chunk(&mut self) -> Result<u32, PieceError> {
        if let Some(seq) = self.zero_seq {
            return Ok(seq);
        }
        let seq = u32::try_from(self.next_seq).map_err(|_| PieceError::TooManyChunks)?;
        self.make_room()?;
        let len = self.chunk_bytes;
        let batch = self.current.as_mut().expect("make_room leaves a batch");
        let at = batch.used;
        batch.buf[at..at + len].fill(0);
        batch.pieces.push((at, len));
        batch.used += len;
        self.next_seq += 1;
        self.zero_seq = Some(seq);
        Ok(seq)
    }
}

/// Per piece: its digest, and (when the store lacks it) its encoded record, leaves, and
/// whether the record's payload was checked against the bytes hashed.
type HashedPieces = Vec<(ChunkDigest, Option<(Vec<u8>, Option<Leaves>, bool)>)>;

/// A batch after a worker hashed it (and compressed the chunks the store lacks).
struct Hashed {
    batch: Batch,
    /// Per piece: its digest, and its encoded record (`None`: the store holds it).
    results: Result<HashedPieces, StoreError>,
}

/// Hashes pieces and encodes (compresses) the ones the store lacks.
fn hash_worker(store: &Store, work: Receiver<Batch>, done: Sender<Hashed>) {
    let mut scratch = Vec::new(); // grows to the largest chunk decoded
    for batch in work.iter() {
        let results = batch
            .pieces
            .iter()
            .map(|&(at, len)| {
                let data = &batch.buf[at..at + len];
                let (digest, leaves) = Leaves::digest_of(data);
                let found = store.locate(&digest)?;
                let record = found.is_none().then(|| {
                    let mut r = Vec::new();
                    encode_record(data, &digest, &mut r);
                    // Checked here, on this worker, so the store may keep an at-rest
                    // checksum for the payload (see Ingest::put_encoded).
                    let vouched = payload_is(&r, data, &mut scratch);
                    (r, leaves, vouched)
                });
                Ok((digest, record))
            })
            .collect();
        if done.send(Hashed { batch, results }).is_err() {
            return;
        }
    }
}

impl PieceReceiver {
    /// Stores every piece until the sender is dropped; returns the block address of each
    /// piece by sequence number. Hashing and compression run on worker threads; the
    /// pieces are appended and placed in the blob in sequence order, so the result is
    /// deterministic. On error the pipeline is torn down (the sender sees
    /// [`PieceError::StoreGone`]).
    pub(crate) fn run(
        self,
        store: &Store,
        ingest: &mut Ingest<'_>,
        builder: &mut BlobBuilder,
    ) -> Result<Vec<u32>, StoreError> {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_WORKERS);
        let PieceReceiver { work, free } = self;
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Hashed>(PIPELINE_BATCHES);
        // `move`: on return the closure drops `done_rx` and `free`, before the scope joins,
        // so blocked workers and the parser wake up and stop.
        std::thread::scope(move |s| {
            for _ in 0..workers {
                let (work, done) = (work.clone(), done_tx.clone());
                s.spawn(move || hash_worker(store, work, done));
            }
            drop(done_tx);
            drop(work);
            let mut addrs: Vec<u32> = Vec::new();
            // Batches arriving out of order; at most PIPELINE_BATCHES are in flight.
            let mut waiting = BTreeMap::new();
            for h in done_rx.iter() {
                waiting.insert(h.batch.first_seq, h);
                while let Some(h) = waiting.remove(&(addrs.len() as u64)) {
                    let Hashed { batch, results } = h;
                    for (&(_, len), (digest, record)) in batch.pieces.iter().zip(results?) {
                        if let Some((record, leaves, vouched)) = record {
                            ingest.put_encoded(digest, len as u32, &record, leaves, vouched)?;
                        }
                        addrs.push(builder.add(digest, len as u32));
                    }
                    // The sender may already be gone; then the buffer is simply dropped.
                    let _ = free.send(batch);
                }
            }
            Ok(addrs)
        })
    }
}

#[cfg(test)]
impl PieceReceiver {
    /// Consumes every piece without storing it; returns the pieces' bytes by sequence
    /// number (each piece's "address" is its sequence number).
    pub(crate) fn drain(self) -> Vec<Vec<u8>> {
        let mut pieces = Vec::new();
        for batch in self.work.iter() {
            assert_eq!(
                batch.first_seq,
                pieces.len() as u64,
                "batches arrive in order"
            );
            for &(at, len) in &batch.pieces {
                pieces.push(batch.buf[at..at + len].to_vec());
            }
            let _ = self.free.send(batch);
        }
        pieces
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
