//! An lz4 block decoder that stops once it has produced the bytes a reader asked for.
//!
//! A chunk is one lz4 block, and a 4 KiB READ needs only the bytes up to the end of its
//! range: every later sequence can be skipped. `lz4_flex` decodes whole blocks only, so
//! the data plane uses this decoder for such prefixes (`chunk::decode_record_range`,
//! which verifies what it decoded through the chunk's BLAKE3 leaves). Its input is read
//! from a pack file and may be corrupt, so it is safe Rust: every copy is
//! bounds-checked, and malformed input gives an error, never a panic (fuzzed by the
//! `lz4_prefix` cargo-fuzz target).
//!
//! Block format (lz4 "block" specification): a sequence of
//! `token | [literal length bytes] | literals | offset (u16 le) | [match length bytes]`,
//! where the token's high nibble is the literal length and its low nibble the match
//! length minus 4, 15 in a nibble meaning that bytes of 255 follow until one below 255.
//! The last sequence has literals only.

/// Why a block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lz4Error {
    /// A length, literal or offset runs past the end of the input.
    TruncatedInput,
    /// The output buffer is too small for what the block encodes.
    OutputOverflow,
    /// A match offset of zero, or one reaching before the start of the output.
    BadOffset,
    /// The block ended before `want` bytes were produced.
    ShortBlock,
}

/// Minimum match length in the lz4 format.
const MIN_MATCH: usize = 4;
/// Width of the fixed-size literal copy of the fast path.
const WIDE: usize = 16;
/// The longest match without extra length bytes, copied fixed-width on the fast path.
const SHORT_MATCH: usize = 14 + MIN_MATCH;

/// Decodes the lz4 block `input` into `out` until at least `want` bytes are produced, and
/// returns how many were (between `want` and `out.len()`; the whole block when `want` is
/// `out.len()`). `out[..returned]` is the block's output; bytes past it are unspecified.
pub fn decode_prefix(input: &[u8], out: &mut [u8], want: usize) -> Result<usize, Lz4Error> {
    if want > out.len() {
        return Err(Lz4Error::OutputOverflow);
    }
    let mut ip = 0usize;
    let mut op = 0usize;
    // The fast zone: far enough from both ends that a sequence with short lengths
    // (no extra length bytes) can be copied with fixed-width moves.
    let in_fast = input.len().saturating_sub(WIDE + 3);
    let out_fast = out.len().saturating_sub(WIDE + SHORT_MATCH);
    // Bounded by the input: every pass consumes at least the token byte.
    loop {
        let token = *input.get(ip).ok_or(Lz4Error::TruncatedInput)?;
        ip += 1;

        if token >> 4 != 15 && token & 15 != 15 && ip < in_fast && op < out_fast {
            // Literals (< 15) and the match (< 19) fit fixed-width copies, and the
            // offset and the next token lie inside the input.
            let lit = usize::from(token >> 4);
            out[op..op + WIDE].copy_from_slice(&input[ip..ip + WIDE]);
            ip += lit;
            op += lit;
            if op >= want {
                return Ok(op);
            }
            let offset = usize::from(u16::from_le_bytes([input[ip], input[ip + 1]]));
            ip += 2;
            let len = usize::from(token & 15) + MIN_MATCH;
            if offset == 0 || offset > op {
                return Err(Lz4Error::BadOffset);
            }
            let src = op - offset;
            if offset >= len {
                // The first `len` bytes read lie before `op`; the rest is overwritten
                // later or lies past the returned length.
                let run: [u8; SHORT_MATCH] =
                    out[src..src + SHORT_MATCH].try_into().expect("fixed width");
                out[op..op + SHORT_MATCH].copy_from_slice(&run);
            } else {
                overlapping_match(out, src, op, len);
            }
            op += len;
            continue;
        }

        let mut lit = usize::from(token >> 4);
        if lit == 15 {
            lit += read_length(input, &mut ip)?;
        }
        let src = input.get(ip..ip + lit).ok_or(Lz4Error::TruncatedInput)?;
        out.get_mut(op..op + lit)
            .ok_or(Lz4Error::OutputOverflow)?
            .copy_from_slice(src);
        ip += lit;
        op += lit;

        if ip == input.len() {
            // The last sequence: literals only.
            return if op >= want {
                Ok(op)
            } else {
                Err(Lz4Error::ShortBlock)
            };
        }
        if op >= want {
            return Ok(op);
        }

        let offset = input
            .get(ip..ip + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .ok_or(Lz4Error::TruncatedInput)?;
        ip += 2;
        let mut len = usize::from(token & 15) + MIN_MATCH;
        if len == 15 + MIN_MATCH {
            len += read_length(input, &mut ip)?;
        }
        if offset == 0 || offset > op {
            return Err(Lz4Error::BadOffset);
        }
        if op + len > out.len() {
            return Err(Lz4Error::OutputOverflow);
        }
        let src = op - offset;
        if offset >= len {
            out.copy_within(src..src + len, op);
        } else {
            overlapping_match(out, src, op, len);
        }
        op += len;
    }
}

/// Copies a match that overlaps its own output: it repeats the `op - src` bytes before
/// `op`. Each step copies all that exists so far, doubling the repeated run.
fn overlapping_match(out: &mut [u8], src: usize, op: usize, len: usize) {
    let mut copied = 0;
    // Bounded: `copied` grows by at least `op - src` (>= 1) each pass.
    while copied < len {
        let n = (op + copied - src).min(len - copied);
        out.copy_within(src..src + n, op + copied);
        copied += n;
    }
}

/// Reads the extra length bytes after a nibble of 15.
fn read_length(input: &[u8], ip: &mut usize) -> Result<usize, Lz4Error> {
    let mut n = 0usize;
    // Bounded by the input: each pass consumes a byte.
    loop {
        let b = *input.get(*ip).ok_or(Lz4Error::TruncatedInput)?;
        *ip += 1;
        n += usize::from(b);
        if b != 255 {
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Chunks of the kinds stored: text-like, runs, noise, and mixtures.
    fn samples() -> Vec<Vec<u8>> {
        let mut rng = StdRng::seed_from_u64(11);
        let words: [&[u8]; 6] = [b"usr/lib ", b"libc.so.6 ", b"\0\0\0\0", b"ELF", b"a", b"zz"];
        let mut out = vec![vec![0u8; 65536], vec![b'x'; 1], (0..=255u8).collect()];
        for len in [4096usize, 65536, 100_000] {
            let mut text = Vec::new();
            while text.len() < len {
                text.extend_from_slice(words[rng.random_range(0..words.len())]);
            }
            text.truncate(len);
            out.push(text.clone());
            let mut mixed = text;
            rng.fill(&mut mixed[..len / 2]);
            out.push(mixed);
        }
        // Short periods (offsets 1..20) with long matches.
        for period in 1..20usize {
            out.push((0..30_000).map(|i| (i % period) as u8 * 7).collect());
        }
        out
    }

    #[test]
    fn every_prefix_matches_the_whole_block() {
        for data in samples() {
            let block = lz4_flex::block::compress(&data);
            let mut out = vec![0u8; data.len()];
            assert_eq!(decode_prefix(&block, &mut out, data.len()), Ok(data.len()));
            assert_eq!(out, data);
            let step = (data.len() / 97).max(1);
            for want in (0..=data.len()).step_by(step) {
                let mut out = vec![0xA5u8; data.len()];
                let got = decode_prefix(&block, &mut out, want).unwrap();
                assert!(got >= want && got <= data.len());
                assert_eq!(out[..got], data[..got], "want {want} of {}", data.len());
            }
        }
    }

    #[test]
    fn a_block_longer_than_its_buffer_is_refused() {
        let data = vec![9u8; 5000];
        let block = lz4_flex::block::compress(&data);
        let mut out = vec![0u8; 4999];
        assert_eq!(
            decode_prefix(&block, &mut out, 4999),
            Err(Lz4Error::OutputOverflow)
        );
        let mut out = vec![0u8; 5001];
        assert_eq!(
            decode_prefix(&block, &mut out, 5001),
            Err(Lz4Error::ShortBlock)
        );
    }

    #[test]
    fn malformed_blocks_give_errors_not_panics() {
        let mut rng = StdRng::seed_from_u64(5);
        let data: Vec<u8> = (0..20_000)
            .map(|i| (i % 251) as u8 ^ (i / 300) as u8)
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut out = vec![0u8; data.len()];
        for _ in 0..3000 {
            let mut bad = block.clone();
            match rng.random_range(0..3) {
                0 => bad.truncate(rng.random_range(0..block.len())),
                1 => {
                    let i = rng.random_range(0..bad.len());
                    bad[i] ^= 1 << rng.random_range(0..8);
                }
                _ => {
                    let n = rng.random_range(0..64);
                    bad = (0..n).map(|_| rng.random()).collect();
                }
            }
            let want = rng.random_range(0..=data.len());
            // Any result is fine as long as it is within bounds and does not panic.
            if let Ok(n) = decode_prefix(&bad, &mut out, want) {
                assert!(n >= want && n <= out.len());
            }
        }
        assert_eq!(
            decode_prefix(&[], &mut out, 0),
            Err(Lz4Error::TruncatedInput)
        );
        // An offset of zero.
        assert_eq!(
            decode_prefix(&[0x10, b'a', 0, 0], &mut out, 10),
            Err(Lz4Error::BadOffset)
        );
    }
}
