//! The on-disk chunk record, and its decode-and-verify step used by every reader.
//!
//! A pack file is a sequence of records, each a fixed header followed by the payload:
//!
//! ```text
//! offset size
//!      0    4  magic "DDC1"
//!      4    4  flags (bit 0: payload is an lz4 block)
//!      8    4  raw_len: uncompressed length
//!     12    4  stored_len: payload length
//!     16   32  BLAKE3 of the uncompressed bytes
//!     48    .  payload
//! ```
//!
//! The header repeats what the index knows, so a reader can check that the index points at
//! the record it thinks it does, and an index could be rebuilt from the packs alone.

use crate::digest::{ChunkDigest, Leaves};
use crate::store::lz4prefix;

/// Size of the record header in bytes.
pub const RECORD_HEADER_BYTES: usize = 48;
/// Record magic, little-endian "DDC1".
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"DDC1");
/// Flag: the payload is an lz4 block (no size prefix).
pub const FLAG_LZ4: u32 = 1;
/// The largest chunk the store accepts. Bounds every buffer that holds one chunk.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// The largest record: an incompressible chunk is stored raw, so never above this.
pub const MAX_RECORD_BYTES: usize = RECORD_HEADER_BYTES + MAX_CHUNK_BYTES;

/// Where a chunk's record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Pack file number.
    pub pack: u32,
    /// Byte offset of the record header in the pack.
    pub offset: u64,
    /// Payload length in bytes.
    pub stored_len: u32,
    /// Uncompressed length in bytes.
    pub raw_len: u32,
    /// The chunk's BLAKE3 leaves, from the index (see [`decode_record_range`]); `None`
    /// for chunks of one leaf and for chunks converted before the index kept them.
    pub leaves: Option<Leaves>,
    /// The at-rest checksum of the record's payload ([`payload_sum`]), taken from the
    /// bytes written when the chunk entered the store (verified against its digest just
    /// before); `None` for chunks stored before the index kept it: those are verified
    /// against their digest on every read.
    pub sum: Option<u64>,
}

/// The at-rest checksum of a record's payload (the bytes after the header): xxh3-64.
/// It detects damage to stored bytes (bit rot, torn or misdirected writes), not forgery:
/// see the README's "Verification".
pub fn payload_sum(payload: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload)
}

impl ChunkLoc {
    /// Whether the payload is an lz4 block: the encoder compresses exactly when that
    /// saves bytes, so the lengths say it.
    pub fn is_lz4(&self) -> bool {
        self.stored_len < self.raw_len
    }

    /// Bytes to read from `offset` to get the whole record.
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.stored_len as usize
    }
}

/// Why a chunk record could not be turned into verified bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The record is shorter than its header says.
    #[error("chunk record truncated: {got} of {want} bytes")]
    Truncated {
        /// Bytes available.
        got: usize,
        /// Bytes the header needs.
        want: usize,
    },
    /// The header does not describe the chunk the index points at.
    #[error("chunk record header does not match the index (magic, lengths or digest)")]
    HeaderMismatch,
    /// The payload does not decompress to exactly `raw_len` bytes.
    #[error("chunk payload does not decompress to its length")]
    Decompress,
    /// The decompressed bytes do not hash to the chunk's digest.
    #[error("chunk digest mismatch")]
    DigestMismatch,
    /// The output buffer is smaller than the chunk.
    #[error("output buffer of {got} bytes is smaller than the chunk ({want})")]
    BufferTooSmall {
        /// Buffer size.
        got: usize,
        /// Chunk size.
        want: usize,
    },
}

/// Encodes a record for `data` into `out` (cleared first); compresses when that saves space.
pub fn encode_record(data: &[u8], digest: &ChunkDigest, out: &mut Vec<u8>) {
    assert!(
        data.len() <= MAX_CHUNK_BYTES,
        "chunk of {} bytes exceeds the limit",
        data.len()
    );
    out.clear();
    out.resize(RECORD_HEADER_BYTES, 0);
    let compressed = lz4_flex::block::compress(data);
    let (flags, payload): (u32, &[u8]) = if compressed.len() < data.len() {
        (FLAG_LZ4, &compressed)
    } else {
        (0, data)
    };
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&flags.to_le_bytes());
    out[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
    out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[16..48].copy_from_slice(&digest.0);
    out.extend_from_slice(payload);
}

/// Whether the payload of `record` (from [`encode_record`]) is `data`, or decodes to it:
/// what an at-rest checksum may then vouch for. `scratch` takes the decoded bytes (kept
/// by the caller, so that checking a chunk allocates nothing).
pub fn payload_is(record: &[u8], data: &[u8], scratch: &mut Vec<u8>) -> bool {
    let Some(payload) = record.get(RECORD_HEADER_BYTES..) else {
        return false;
    };
    if payload.len() == data.len() {
        return payload == data;
    }
    scratch.clear();
    scratch.resize(data.len(), 0);
    matches!(lz4_flex::block::decompress_into(payload, scratch), Ok(n) if n == data.len())
        && scratch[..] == *data
}

/// Checks the record header against the index: magic, lengths and chunk digest.
fn check_header(record: &[u8], loc: &ChunkLoc, digest: &ChunkDigest) -> Result<(), ChunkError> {
    let want = loc.record_len();
    if record.len() < want {
        return Err(ChunkError::Truncated {
            got: record.len(),
            want,
        });
    }
    check_header_bytes(record, loc, digest, false)
}

/// Checks the header at the start of `header` against the index: magic, lengths, chunk
/// digest, and with `exact_flags` the flags too. The encoder compresses only when that
/// saves bytes, so the flags follow from the lengths and every header byte is pinned by
/// the index. Readers that decode by the header's flag (whole records) accept a record
/// another encoder flagged otherwise; the engine, which places each payload by its
/// lengths before reading it, and records arriving from a registry, do not.
fn check_header_bytes(
    header: &[u8],
    loc: &ChunkLoc,
    digest: &ChunkDigest,
    exact_flags: bool,
) -> Result<(), ChunkError> {
    if header.len() < RECORD_HEADER_BYTES {
        return Err(ChunkError::Truncated {
            got: header.len(),
            want: RECORD_HEADER_BYTES,
        });
    }
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let flags = if loc.is_lz4() { FLAG_LZ4 } else { 0 };
    if word(0) != RECORD_MAGIC
        || (exact_flags && word(4) != flags)
        || word(8) != loc.raw_len
        || word(12) != loc.stored_len
        || header[16..48] != digest.0
    {
        return Err(ChunkError::HeaderMismatch);
    }
    Ok(())
}

/// Checks a record read in two parts (the engine reads each payload where its bytes are
/// needed: a raw one straight into its place in the output, an lz4 one aside): the header
/// against the index, then the payload. With `trust_sum` and the index's at-rest checksum
/// (`loc.sum`), the payload is checked against that; otherwise (no checksum, a reader
/// that wants the digest, or a payload that fails its checksum) the chunk's bytes are
/// hashed and compared with `digest`.
///
/// A raw record's bytes are `payload` itself (`out` must be `None`). An lz4 record is
/// decoded into `out[..raw_len]`, at least up to `to` (`from..to` is the part the reader
/// needs): only a prefix is decoded when the checksum vouches for the whole payload, or
/// when the index's BLAKE3 leaves verify the leaves under `from..to`. On error no byte is
/// valid.
pub fn verify_split(
    header: &[u8],
    payload: &[u8],
    loc: &ChunkLoc,
    digest: &ChunkDigest,
    out: Option<&mut [u8]>,
    (from, to): (usize, usize),
    trust_sum: bool,
) -> Result<(), ChunkError> {
    check_header_bytes(header, loc, digest, true)?;
    if payload.len() != loc.stored_len as usize {
        return Err(ChunkError::Truncated {
            got: payload.len(),
            want: loc.stored_len as usize,
        });
    }
    let raw_len = loc.raw_len as usize;
    // A payload that fails its checksum was damaged at rest; the digest then decides,
    // which may still clear the leaves a reader needs from a chunk damaged elsewhere.
    let sum = loc
        .sum
        .filter(|&sum| trust_sum && payload_sum(payload) == sum);
    let Some(out) = out else {
        if loc.is_lz4() {
            return Err(ChunkError::BufferTooSmall {
                got: 0,
                want: raw_len,
            });
        }
        if sum.is_none() && ChunkDigest::of(payload) != *digest {
            return Err(ChunkError::DigestMismatch);
        }
        return Ok(());
    };
    if !loc.is_lz4() {
        return Err(ChunkError::HeaderMismatch);
    }
    if out.len() < raw_len {
        return Err(ChunkError::BufferTooSmall {
            got: out.len(),
            want: raw_len,
        });
    }
    let out = &mut out[..raw_len];
    let to = to.min(raw_len);
    if sum.is_some() {
        // The payload is the one that was verified when it entered the store, and lz4
        // decoding is deterministic: decoding it is all that is left.
        return match lz4prefix::decode_prefix(payload, out, to.max(1).min(raw_len)) {
            Ok(n) if n >= to && (to < raw_len || n == raw_len) => Ok(()),
            _ => Err(ChunkError::Decompress),
        };
    }
    if let Some(leaves) = &loc.leaves {
        let leaf = Leaves::leaf_bytes(raw_len);
        let (first, last) = (from / leaf, to.saturating_sub(1) / leaf);
        let end = (last + 1).saturating_mul(leaf);
        if from < to
            && end < raw_len
            && leaves.combine_to(raw_len, digest)
            && lz4prefix::decode_prefix(payload, out, end).is_ok()
            && (first..=last).all(|i| leaves.check_leaf(raw_len, i, &out[i * leaf..(i + 1) * leaf]))
        {
            return Ok(());
        }
        // Not verified this way: the whole-chunk check decides.
    }
    match lz4_flex::block::decompress_into(payload, out) {
        Ok(n) if n == raw_len => {}
        _ => return Err(ChunkError::Decompress),
    }
    if ChunkDigest::of(out) != *digest {
        return Err(ChunkError::DigestMismatch);
    }
    Ok(())
}

/// [`decode_record_or_in_place`] for a reader that needs only `out[from..to]`. When the
/// index has the chunk's leaves (`loc.leaves`), they combine to the chunk digest, and
/// the payload is an lz4 block, only the sequences up to the end of the last leaf the
/// range touches are decoded, and only the leaves the range touches are hashed: BLAKE3
/// is a tree, so those leaves are verified against the chunk digest as firmly as the
/// whole chunk would be. In every other case (no leaves, a range reaching the last
/// leaf, a leaf that does not verify) the chunk is decoded and verified whole, which
/// refuses a corrupt record. Returns what [`decode_record_or_in_place`] returns; on
/// `Ok(false)` at least `out[from..to]` is valid.
pub fn decode_record_range(
    record: &[u8],
    loc: &ChunkLoc,
    digest: &ChunkDigest,
    out: &mut [u8],
    from: usize,
    to: usize,
) -> Result<bool, ChunkError> {
    let raw_len = loc.raw_len as usize;
    if let Some(leaves) = &loc.leaves {
        let leaf = Leaves::leaf_bytes(raw_len);
        let (first, last) = (from / leaf, to.saturating_sub(1) / leaf);
        let end = (last + 1).saturating_mul(leaf);
        if from < to && end < raw_len && out.len() >= raw_len {
            check_header(record, loc, digest)?;
            let lz4 = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) & FLAG_LZ4;
            let payload = &record[RECORD_HEADER_BYTES..loc.record_len()];
            if lz4 != 0
                && leaves.combine_to(raw_len, digest)
                && lz4prefix::decode_prefix(payload, &mut out[..raw_len], end).is_ok()
                && (first..=last)
                    .all(|i| leaves.check_leaf(raw_len, i, &out[i * leaf..(i + 1) * leaf]))
            {
                return Ok(false);
            }
            // Not verified this way: the whole-chunk check decides.
        }
    }
    decode_record_or_in_place(record, loc, digest, out)
}

/// Decodes the record in `record` (header plus payload, as read from `loc`) into
/// `out[..loc.raw_len]`, and verifies the digest. No byte of `out` is valid on error.
pub fn decode_record(
    record: &[u8],
    loc: &ChunkLoc,
    digest: &ChunkDigest,
    out: &mut [u8],
) -> Result<(), ChunkError> {
    if decode_record_or_in_place(record, loc, digest, out)? {
        let raw_len = loc.raw_len as usize;
        out[..raw_len].copy_from_slice(&record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + raw_len]);
    }
    Ok(())
}

/// [`decode_record`] without the copy of a record stored uncompressed: returns `true`
/// when the verified bytes are `record[RECORD_HEADER_BYTES..][..loc.raw_len]` (stored
/// raw; `out` untouched), `false` when they were decompressed into `out[..loc.raw_len]`.
/// Either way the digest was checked; on error no byte of either is valid.
pub fn decode_record_or_in_place(
    record: &[u8],
    loc: &ChunkLoc,
    digest: &ChunkDigest,
    out: &mut [u8],
) -> Result<bool, ChunkError> {
    check_header(record, loc, digest)?;
    let raw_len = loc.raw_len as usize;
    if out.len() < raw_len {
        return Err(ChunkError::BufferTooSmall {
            got: out.len(),
            want: raw_len,
        });
    }
    let payload = &record[RECORD_HEADER_BYTES..loc.record_len()];
    let flags = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes"));
    if flags & FLAG_LZ4 != 0 {
        let out = &mut out[..raw_len];
        match lz4_flex::block::decompress_into(payload, out) {
            Ok(n) if n == raw_len => {}
            _ => return Err(ChunkError::Decompress),
        }
        if ChunkDigest::of(out) != *digest {
            return Err(ChunkError::DigestMismatch);
        }
        Ok(false)
    } else {
        if payload.len() != raw_len {
            return Err(ChunkError::Decompress);
        }
        if ChunkDigest::of(payload) != *digest {
            return Err(ChunkError::DigestMismatch);
        }
        Ok(true)
    }
}

/// Checks a record that arrived from outside the node (a registry's data blob) before
/// anything keeps it: the header must describe chunk `digest` of `raw_len` bytes and
/// span exactly `record`, its flags must follow from the lengths (lz4 exactly when the
/// payload is shorter), the payload must decode to exactly `raw_len` bytes, and those
/// must hash to `digest`. Leaves the chunk in `out[..raw_len]` and returns its leaves
/// (computed in the same BLAKE3 pass as the digest). On error no byte is valid.
pub fn verify_foreign_record(
    record: &[u8],
    raw_len: u32,
    digest: &ChunkDigest,
    out: &mut [u8],
) -> Result<Option<Leaves>, ChunkError> {
    let stored_len = record
        .len()
        .checked_sub(RECORD_HEADER_BYTES)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(ChunkError::Truncated {
            got: record.len(),
            want: RECORD_HEADER_BYTES,
        })?;
    let loc = ChunkLoc {
        pack: 0,
        offset: 0,
        stored_len,
        raw_len,
        leaves: None,
        sum: None,
    };
    check_header_bytes(record, &loc, digest, true)?;
    let n = raw_len as usize;
    if out.len() < n {
        return Err(ChunkError::BufferTooSmall {
            got: out.len(),
            want: n,
        });
    }
    let out = &mut out[..n];
    let payload = &record[RECORD_HEADER_BYTES..];
    let flags = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes"));
    if flags & FLAG_LZ4 != 0 {
        match lz4_flex::block::decompress_into(payload, out) {
            Ok(got) if got == n => {}
            _ => return Err(ChunkError::Decompress),
        }
    } else if flags == 0 && payload.len() == n {
        out.copy_from_slice(payload);
    } else {
        return Err(ChunkError::Decompress);
    }
    let (got, leaves) = Leaves::digest_of(out);
    if got != *digest {
        return Err(ChunkError::DigestMismatch);
    }
    Ok(leaves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_records_are_verified_whole_before_they_are_kept() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let (digest, rec, loc) = encoded(&data);
        let mut out = vec![0u8; data.len()];
        let leaves = verify_foreign_record(&rec, data.len() as u32, &digest, &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(leaves, loc.leaves);
        // A flipped payload bit, a wrong length, a short record, trailing bytes.
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(verify_foreign_record(&bad, data.len() as u32, &digest, &mut out).is_err());
        assert!(verify_foreign_record(&rec, data.len() as u32 - 1, &digest, &mut out).is_err());
        assert!(verify_foreign_record(&rec[..100], data.len() as u32, &digest, &mut out).is_err());
        let mut long = rec.clone();
        long.push(0);
        assert!(verify_foreign_record(&long, data.len() as u32, &digest, &mut out).is_err());
        let other = ChunkDigest::of(b"other");
        assert!(verify_foreign_record(&rec, data.len() as u32, &other, &mut out).is_err());
    }

    /// `verify_split` on `rec` (a whole record) with the checksum the store would keep.
    fn split(
        rec: &[u8],
        loc: &ChunkLoc,
        digest: &ChunkDigest,
        out: &mut [u8],
        range: (usize, usize),
        trust_sum: bool,
    ) -> Result<(), ChunkError> {
        let (header, payload) = rec.split_at(RECORD_HEADER_BYTES);
        let out = if loc.is_lz4() { Some(out) } else { None };
        verify_split(header, payload, loc, digest, out, range, trust_sum)
    }

    #[test]
    fn split_records_are_checked_by_their_sum_or_their_digest() {
        let raw: Vec<u8> = (0..65_536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let text: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        for data in [raw, text] {
            let (digest, rec, mut loc) = encoded(&data);
            loc.sum = Some(payload_sum(&rec[RECORD_HEADER_BYTES..]));
            let n = data.len();
            let mut out = vec![0u8; n];
            for trust in [true, false] {
                split(&rec, &loc, &digest, &mut out, (0, n), trust).unwrap();
                if loc.is_lz4() {
                    assert_eq!(out, data);
                }
            }
            // A damaged payload fails the sum; the digest then refuses it.
            let mut bad = rec.clone();
            bad[RECORD_HEADER_BYTES + loc.stored_len as usize / 3] ^= 0x10;
            assert!(split(&bad, &loc, &digest, &mut out, (0, n), true).is_err());
            // A flipped flag (raw read as lz4, or the reverse) is refused by the header
            // check before any payload byte is used.
            let mut flag = rec.clone();
            flag[4] ^= 1;
            assert_eq!(
                split(&flag, &loc, &digest, &mut out, (0, n), true),
                Err(ChunkError::HeaderMismatch)
            );
            // A sum that does not match (a record moved under a stale index row) is
            // not trusted: the digest decides, and the bytes are right.
            let stale = ChunkLoc {
                sum: Some(loc.sum.unwrap() ^ 1),
                ..loc
            };
            split(&rec, &stale, &digest, &mut out, (0, n), true).unwrap();
            // A payload of the wrong length.
            let (h, p) = rec.split_at(RECORD_HEADER_BYTES);
            let short = if loc.is_lz4() {
                Some(&mut out[..])
            } else {
                None
            };
            assert!(matches!(
                verify_split(h, &p[1..], &loc, &digest, short, (0, n), true),
                Err(ChunkError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn only_payloads_that_are_or_decode_to_the_data_are_vouched_for() {
        let text: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for data in [&text, &noise] {
            let (_, rec, _) = encoded(data);
            assert!(payload_is(&rec, data, &mut Vec::new()));
            let mut bad = rec.clone();
            let mid = RECORD_HEADER_BYTES + (rec.len() - RECORD_HEADER_BYTES) / 2;
            bad[mid] ^= 0x20;
            assert!(!payload_is(&bad, data, &mut Vec::new()));
        }
    }

    #[test]
    fn an_lz4_flag_the_lengths_do_not_call_for_is_refused_where_payloads_are_placed() {
        // A foreign encoder's record: lz4 although no shorter than the chunk.
        let data = vec![7u8; 100];
        let block = lz4_flex::block::compress(&data);
        let mut payload = block.clone();
        payload.resize(data.len() + 3, 0);
        let digest = ChunkDigest::of(&data);
        let mut rec = vec![0u8; RECORD_HEADER_BYTES];
        rec[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec[4..8].copy_from_slice(&FLAG_LZ4.to_le_bytes());
        rec[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        rec[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        rec[16..48].copy_from_slice(&digest.0);
        rec.extend_from_slice(&payload);
        let mut out = vec![0u8; data.len()];
        assert_eq!(
            verify_foreign_record(&rec, data.len() as u32, &digest, &mut out),
            Err(ChunkError::HeaderMismatch)
        );
        let loc = ChunkLoc {
            pack: 0,
            offset: 0,
            stored_len: payload.len() as u32,
            raw_len: data.len() as u32,
            leaves: None,
            sum: None,
        };
        assert!(!loc.is_lz4());
        let (h, p) = rec.split_at(RECORD_HEADER_BYTES);
        assert_eq!(
            verify_split(h, p, &loc, &digest, None, (0, 100), true),
            Err(ChunkError::HeaderMismatch)
        );
    }

    #[test]
    fn a_trusted_lz4_prefix_is_decoded_only_as_far_as_needed() {
        let data: Vec<u8> = (0..262_144u32).map(|i| (i / 7 % 251) as u8).collect();
        let (digest, rec, mut loc) = encoded(&data);
        assert!(loc.is_lz4());
        loc.sum = Some(payload_sum(&rec[RECORD_HEADER_BYTES..]));
        let mut out = vec![0u8; data.len()];
        split(&rec, &loc, &digest, &mut out, (4096, 8192), true).unwrap();
        assert_eq!(out[4096..8192], data[4096..8192]);
        // Damage past the prefix: the sum refuses the payload, the leaves clear the
        // prefix.
        let mut bad = rec.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x40;
        let mut out = vec![0u8; data.len()];
        split(&bad, &loc, &digest, &mut out, (4096, 8192), true).unwrap();
        assert_eq!(out[4096..8192], data[4096..8192]);
    }

    /// `data`'s digest, its record, and the record's location (at offset 0 of pack 0,
    /// with the leaves the index would keep).
    fn encoded(data: &[u8]) -> (ChunkDigest, Vec<u8>, ChunkLoc) {
        let (digest, leaves) = Leaves::digest_of(data);
        let mut rec = Vec::new();
        encode_record(data, &digest, &mut rec);
        let loc = ChunkLoc {
            pack: 0,
            offset: 0,
            stored_len: (rec.len() - RECORD_HEADER_BYTES) as u32,
            raw_len: data.len() as u32,
            leaves,
            sum: None,
        };
        (digest, rec, loc)
    }

    fn round_trip(data: &[u8]) {
        let (digest, rec, loc) = encoded(data);
        let mut out = vec![0u8; data.len()];
        decode_record(&rec, &loc, &digest, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn compressible_and_incompressible_chunks_round_trip() {
        round_trip(&vec![7u8; 65536]);
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        round_trip(&noise);
        round_trip(b"x");
    }

    #[test]
    fn a_flipped_payload_bit_is_caught() {
        let data = vec![1u8; 8192];
        let (digest, mut rec, loc) = encoded(&data);
        let last = rec.len() - 1;
        rec[last] ^= 0x40;
        let mut out = vec![0u8; 8192];
        let err = decode_record(&rec, &loc, &digest, &mut out).unwrap_err();
        assert!(
            matches!(err, ChunkError::Decompress | ChunkError::DigestMismatch),
            "{err:?}"
        );
    }

    #[test]
    fn raw_records_verify_in_place_and_compressed_ones_decode() {
        // xorshift64: incompressible for lz4, so stored raw.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for (data, raw) in [(noise, true), (vec![3u8; 65536], false)] {
            let (digest, mut rec, loc) = encoded(&data);
            let mut out = vec![0u8; data.len()];
            assert_eq!(
                decode_record_or_in_place(&rec, &loc, &digest, &mut out).unwrap(),
                raw
            );
            let got = if raw {
                &rec[RECORD_HEADER_BYTES..]
            } else {
                &out[..]
            };
            assert_eq!(got, &data[..]);
            // A flipped bit of the payload is caught either way.
            let last = rec.len() - 1;
            rec[last] ^= 0x10;
            let err = decode_record_or_in_place(&rec, &loc, &digest, &mut out).unwrap_err();
            assert!(
                matches!(err, ChunkError::Decompress | ChunkError::DigestMismatch),
                "{err:?}"
            );
        }
    }

    /// A compressible 64 KiB chunk, its record, and its location with the leaves the
    /// index would keep.
    fn lz4_chunk() -> (Vec<u8>, ChunkDigest, Vec<u8>, ChunkLoc) {
        let data: Vec<u8> = (0..65536u32)
            .map(|i| (i / 7 % 61) as u8 ^ (i >> 12) as u8)
            .collect();
        let (digest, rec, loc) = encoded(&data);
        assert_eq!(rec[4], FLAG_LZ4 as u8, "compressible, so stored as lz4");
        assert!(loc.leaves.is_some());
        (data, digest, rec, loc)
    }

    #[test]
    fn a_range_is_decoded_only_up_to_the_end_of_its_last_leaf() {
        let (data, digest, rec, loc) = lz4_chunk();
        for (from, to) in [(0usize, 1usize), (0, 4096), (16384, 20480), (20000, 40000)] {
            // Bytes past the last leaf touched keep the marker: they were not decoded.
            let mut out = vec![0xEEu8; data.len()];
            assert!(!decode_record_range(&rec, &loc, &digest, &mut out, from, to).unwrap());
            assert_eq!(out[from..to], data[from..to]);
            assert_eq!(out[data.len() - 1], 0xEE, "[{from}, {to})");
        }
        // Reaching the last leaf: decoded and verified whole.
        let mut out = vec![0u8; data.len()];
        decode_record_range(&rec, &loc, &digest, &mut out, 4096, data.len()).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn a_corrupt_tail_spoils_only_the_leaves_it_changes() {
        // The last payload byte is the chunk's last literal: leaf 3 decodes wrong.
        let (data, digest, mut rec, loc) = lz4_chunk();
        let last = rec.len() - 1;
        rec[last] ^= 0x01;
        let mut out = vec![0u8; data.len()];
        // A read of the head decodes and verifies leaf 0 only: the right bytes.
        assert!(!decode_record_range(&rec, &loc, &digest, &mut out, 0, 4096).unwrap());
        assert_eq!(out[..4096], data[..4096]);
        // A read of the tail needs the whole chunk, which no longer verifies.
        let err = decode_record_range(&rec, &loc, &digest, &mut out, 61440, 65536).unwrap_err();
        assert!(
            matches!(err, ChunkError::Decompress | ChunkError::DigestMismatch),
            "{err:?}"
        );
        // A corrupt first literal still decodes, but leaf 0 comes out wrong: refused.
        let (_, _, mut rec, _) = lz4_chunk();
        let token = rec[RECORD_HEADER_BYTES];
        assert!(
            token >> 4 > 0 && token >> 4 < 15,
            "starts with a few literals"
        );
        rec[RECORD_HEADER_BYTES + 1] ^= 0x20;
        let mut whole = vec![0u8; data.len()];
        lz4_flex::block::decompress_into(&rec[RECORD_HEADER_BYTES..], &mut whole).unwrap();
        assert_ne!(whole[..4096], data[..4096]);
        assert!(decode_record_range(&rec, &loc, &digest, &mut out, 0, 4096).is_err());
        // A wrong chunk digest in the header: refused before any decoding.
        let (_, _, mut rec, _) = lz4_chunk();
        rec[20] ^= 1;
        assert_eq!(
            decode_record_range(&rec, &loc, &digest, &mut out, 0, 4096),
            Err(ChunkError::HeaderMismatch)
        );
    }

    #[test]
    fn leaves_that_do_not_combine_to_the_digest_are_not_trusted() {
        let (data, digest, rec, mut loc) = lz4_chunk();
        let mut b = loc.leaves.unwrap().as_bytes().to_vec();
        b[0] ^= 1;
        loc.leaves = Leaves::from_bytes(&b);
        let mut out = vec![0u8; data.len()];
        decode_record_range(&rec, &loc, &digest, &mut out, 0, 4096).unwrap();
        assert_eq!(out, data, "decoded whole and verified");
        loc.leaves = None;
        let mut out = vec![0u8; data.len()];
        decode_record_range(&rec, &loc, &digest, &mut out, 0, 4096).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn a_short_record_is_refused() {
        let loc = ChunkLoc {
            pack: 0,
            offset: 0,
            stored_len: 10,
            raw_len: 10,
            leaves: None,
            sum: None,
        };
        let mut out = [0u8; 10];
        assert!(matches!(
            decode_record(&[0u8; 20], &loc, &ChunkDigest([0; 32]), &mut out),
            Err(ChunkError::Truncated { .. })
        ));
    }
}
