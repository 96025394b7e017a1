//! Blobs: the virtual byte ranges the kernel reads, defined by a chunk table.
//!
//! A blob is a sequence of slots. Slot `i` holds chunk `i` and is its length rounded up to
//! [`BLOCK_BYTES`], so every chunk starts on a block boundary, as EROFS chunk indexes need,
//! and the padding reads as zeros. A chunk appears at most once per blob; files that share
//! it point at the same slot. The blob's name is the BLAKE3 of its encoded table, so the
//! same table has the same name everywhere.

use std::sync::Arc;

use crate::digest::ChunkDigest;
use crate::store::chunk::{ChunkLoc, MAX_CHUNK_BYTES};
use crate::store::remote::RemoteBlob;

/// EROFS block size, and the granularity of blob slots and cache-file writes.
pub const BLOCK_BYTES: u64 = 4096;
/// Table encoding version (first byte of an encoded table).
const TABLE_VERSION: u8 = 1;
/// Bytes per encoded table entry: raw_len (u32) + digest.
const ENTRY_BYTES: usize = 4 + 32;

/// One chunk of a blob, as written by conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEntry {
    /// Chunk digest.
    pub digest: ChunkDigest,
    /// Uncompressed length, 1..=MAX_CHUNK_BYTES.
    pub raw_len: u32,
}

/// Builds a blob's table while a layer is converted, deduplicating chunks within the blob.
#[derive(Default)]
pub struct BlobBuilder {
    entries: Vec<RawEntry>,
    slot_of: std::collections::HashMap<ChunkDigest, u32>,
    next_block: u64,
}

impl BlobBuilder {
    /// An empty blob.
    pub fn new() -> BlobBuilder {
        BlobBuilder::default()
    }

    /// Adds a chunk (or finds it) and returns the block address of its slot.
    pub fn add(&mut self, digest: ChunkDigest, raw_len: u32) -> u32 {
        assert!(raw_len > 0 && raw_len as usize <= MAX_CHUNK_BYTES);
        if let Some(&block) = self.slot_of.get(&digest) {
            return block;
        }
        let block = u32::try_from(self.next_block).expect("blob exceeds 16 TiB");
        self.entries.push(RawEntry { digest, raw_len });
        self.slot_of.insert(digest, block);
        self.next_block += u64::from(raw_len).div_ceil(BLOCK_BYTES);
        block
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Size of the blob in blocks.
    pub fn blocks(&self) -> u64 {
        self.next_block
    }

    /// The entries in slot order.
    pub fn entries(&self) -> &[RawEntry] {
        &self.entries
    }

    /// Encodes the table; its [`blob_id`] names the blob.
    pub fn encode(&self) -> Vec<u8> {
        encode_table(&self.entries)
    }
}

/// Encodes a chunk table.
pub fn encode_table(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + entries.len() * ENTRY_BYTES);
    out.push(TABLE_VERSION);
    for e in entries {
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.extend_from_slice(&e.digest.0);
    }
    out
}

/// Decodes a chunk table, checking every length.
pub fn decode_table(bytes: &[u8]) -> Option<Vec<RawEntry>> {
    let (&version, rest) = bytes.split_first()?;
    if version != TABLE_VERSION || rest.len() % ENTRY_BYTES != 0 {
        return None;
    }
    rest.chunks_exact(ENTRY_BYTES)
        .map(|e| {
            let raw_len = u32::from_le_bytes(e[..4].try_into().ok()?);
            if raw_len == 0 || raw_len as usize > MAX_CHUNK_BYTES {
                return None;
            }
            Some(RawEntry {
                raw_len,
                digest: ChunkDigest(e[4..].try_into().ok()?),
            })
        })
        .collect()
}

/// The name of a blob: hex BLAKE3 of its encoded table (64 characters, the size of an
/// EROFS device tag).
pub fn blob_id(encoded_table: &[u8]) -> String {
    hex::encode(blake3::hash(encoded_table).as_bytes())
}

/// One chunk of a loaded blob, with where to find it.
#[derive(Clone, Copy, Debug)]
pub struct BlobEntry {
    /// Offset of the slot in the blob.
    pub blob_offset: u64,
    /// Chunk digest.
    pub digest: ChunkDigest,
    /// Uncompressed length.
    pub raw_len: u32,
    /// Its record in the store; `None` when the store no longer has it (reads give EIO).
    pub loc: Option<ChunkLoc>,
}

impl BlobEntry {
    /// Length of the slot (raw length rounded up to a block).
    pub fn slot_len(&self) -> u64 {
        u64::from(self.raw_len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
    }
}

/// A blob's table, loaded for serving: maps a byte range to its chunks in O(1) per chunk.
#[derive(Debug)]
pub struct BlobTable {
    id: String,
    size_bytes: u64,
    entries: Vec<BlobEntry>,
    /// For each bucket of `MAX_CHUNK_BYTES` of blob space, the index of the first entry
    /// whose slot ends after the bucket's start. A lookup scans at most
    /// `MAX_CHUNK_BYTES / BLOCK_BYTES` entries from there.
    bucket_first: Vec<u32>,
    /// Where the chunks are published, for a lazily pulled blob: entries whose `loc` is
    /// `None` are fetched from there.
    remote: Option<Arc<RemoteBlob>>,
}

/// log2 of the bucket size of the lookup index.
const BUCKET_SHIFT: u32 = MAX_CHUNK_BYTES.trailing_zeros();
const _: () = assert!(1usize << BUCKET_SHIFT == MAX_CHUNK_BYTES);
const _: () = assert!((MAX_CHUNK_BYTES as u64).is_multiple_of(BLOCK_BYTES));

impl BlobTable {
    /// Builds the serving table for blob `id` from its entries, resolving each chunk's
    /// location with `resolve`.
    pub fn new(
        id: String,
        raw: &[RawEntry],
        mut resolve: impl FnMut(&ChunkDigest) -> Option<ChunkLoc>,
    ) -> BlobTable {
        let mut entries = Vec::with_capacity(raw.len());
        let mut offset = 0u64;
        for r in raw {
            let e = BlobEntry {
                blob_offset: offset,
                digest: r.digest,
                raw_len: r.raw_len,
                loc: resolve(&r.digest).filter(|l| l.raw_len == r.raw_len),
            };
            offset += e.slot_len();
            entries.push(e);
        }
        let size_bytes = offset;
        let buckets = size_bytes.div_ceil(1 << BUCKET_SHIFT) as usize;
        let mut bucket_first = Vec::with_capacity(buckets);
        let mut i = 0usize;
        for b in 0..buckets {
            let start = (b as u64) << BUCKET_SHIFT;
            while i < entries.len() && entries[i].blob_offset + entries[i].slot_len() <= start {
                i += 1;
            }
            bucket_first.push(i as u32);
        }
        BlobTable {
            id,
            size_bytes,
            entries,
            bucket_first,
            remote: None,
        }
    }

    /// Makes the table lazily pulled: `remote` has one locator per entry.
    pub fn set_remote(&mut self, remote: Arc<RemoteBlob>) {
        assert_eq!(remote.locators.len(), self.entries.len());
        self.remote = Some(remote);
    }

    /// Where the chunks are published, for a lazily pulled blob.
    pub fn remote(&self) -> Option<&Arc<RemoteBlob>> {
        self.remote.as_ref()
    }

    /// The blob's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Size in bytes (a multiple of [`BLOCK_BYTES`]). The size reported to the kernel.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// All entries in blob order.
    pub fn entries(&self) -> &[BlobEntry] {
        &self.entries
    }

    /// Index of the entry whose slot contains `offset`, if `offset < size`.
    pub fn index_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.size_bytes {
            return None;
        }
        let mut i = self.bucket_first[(offset >> BUCKET_SHIFT) as usize] as usize;
        // Bounded: a bucket spans at most MAX_CHUNK_BYTES / BLOCK_BYTES slots.
        while self.entries[i].blob_offset + self.entries[i].slot_len() <= offset {
            i += 1;
        }
        Some(i)
    }

    /// The entries whose slots overlap `[offset, offset + len)`, in order. Empty when the
    /// range starts at or past the end.
    pub fn overlapping(&self, offset: u64, len: u64) -> &[BlobEntry] {
        let Some(first) = self.index_at(offset) else {
            return &[];
        };
        let end = offset.saturating_add(len).min(self.size_bytes);
        if end <= offset {
            return &[];
        }
        let last = self.index_at(end - 1).expect("end - 1 is inside the blob");
        &self.entries[first..=last]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> ChunkDigest {
        ChunkDigest::of(&i.to_le_bytes())
    }

    #[test]
    fn builder_dedups_and_packs_slots_on_blocks() {
        let mut b = BlobBuilder::new();
        assert_eq!(b.add(d(1), 65536), 0);
        assert_eq!(b.add(d(2), 100), 16);
        assert_eq!(b.add(d(1), 65536), 0);
        assert_eq!(b.add(d(3), 4097), 17);
        assert_eq!(b.blocks(), 19);
        assert_eq!(decode_table(&b.encode()).unwrap(), b.entries());
    }

    #[test]
    fn overlapping_finds_exactly_the_touched_slots() {
        let mut b = BlobBuilder::new();
        let lens = [65536u32, 100, 4097, 1 << 20, 8192, 1, 300000];
        for (i, &l) in lens.iter().enumerate() {
            b.add(d(i as u32), l);
        }
        let t = BlobTable::new("x".into(), b.entries(), |_| None);
        assert_eq!(t.size_bytes(), b.blocks() * BLOCK_BYTES);
        // Brute force over many ranges.
        for off in (0..t.size_bytes() + 8192).step_by(4096 * 3) {
            for len in [1u64, 4096, 65536, 200000, 3 << 20] {
                let got: Vec<u64> = t
                    .overlapping(off, len)
                    .iter()
                    .map(|e| e.blob_offset)
                    .collect();
                let want: Vec<u64> = t
                    .entries()
                    .iter()
                    .filter(|e| e.blob_offset < off + len && e.blob_offset + e.slot_len() > off)
                    .map(|e| e.blob_offset)
                    .collect();
                assert_eq!(got, want, "off {off} len {len}");
            }
        }
    }

    #[test]
    fn corrupt_tables_are_refused() {
        assert!(decode_table(&[]).is_none());
        assert!(decode_table(&[2]).is_none());
        assert!(decode_table(&[1, 0, 0]).is_none());
        let mut zero_len = vec![1u8];
        zero_len.extend_from_slice(&[0u8; 36]);
        assert!(decode_table(&zero_len).is_none());
    }
}
