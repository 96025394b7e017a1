//! Digests: BLAKE3 names chunks and blobs; SHA-256 names OCI layers.

use std::fmt;

use sha2::Digest as _;

/// The content digest of one chunk of file data: BLAKE3 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> ChunkDigest {
        ChunkDigest(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<ChunkDigest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkDigest(out))
    }
}

/// Most leaves a chunk's digest is split into for [`Leaves`].
pub const MAX_LEAVES: usize = 4;
/// The smallest leaf: below it, verifying a leaf saves too little over the whole chunk.
pub const MIN_LEAF_BYTES: usize = 16 << 10;

/// The chaining values of a chunk's BLAKE3 tree cut into equal leaves (the last one may
/// be short) of [`Leaves::leaf_bytes`]: BLAKE3 hashes a chunk as a binary tree, so the
/// values of a few subtrees combine into the chunk digest, and a reader that has only
/// some of the chunk's bytes can verify them against the digest through their leaves.
/// They depend on the chunk's bytes only, so they need not be trusted: [`combine_to`]
/// checks them against the digest first.
///
/// [`combine_to`]: Leaves::combine_to
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leaves {
    cvs: [[u8; 32]; MAX_LEAVES],
    count: u8,
}

impl Leaves {
    /// Leaf size for a chunk of `len` bytes: a power of two, at least [`MIN_LEAF_BYTES`],
    /// so that there are at most [`MAX_LEAVES`] of them.
    pub fn leaf_bytes(len: usize) -> usize {
        (len.next_power_of_two() / MAX_LEAVES).max(MIN_LEAF_BYTES)
    }

    /// The chunk digest of `data` and, when it spans more than one leaf, its leaves.
    /// The digest is the same as [`ChunkDigest::of`] (computed through the leaves).
    pub fn digest_of(data: &[u8]) -> (ChunkDigest, Option<Leaves>) {
        let leaf = Self::leaf_bytes(data.len());
        if data.len() <= leaf {
            return (ChunkDigest::of(data), None);
        }
        let mut leaves = Leaves {
            cvs: [[0; 32]; MAX_LEAVES],
            count: 0,
        };
        for (i, part) in data.chunks(leaf).enumerate() {
            leaves.cvs[i] = leaf_cv(i * leaf, part);
            leaves.count += 1;
        }
        let root = leaves.root(data.len());
        (root, Some(leaves))
    }

    /// Parses the stored form ([`Leaves::as_bytes`]); `None` unless it holds 2 to
    /// [`MAX_LEAVES`] values.
    pub fn from_bytes(b: &[u8]) -> Option<Leaves> {
        let count = b.len() / 32;
        if !b.len().is_multiple_of(32) || !(2..=MAX_LEAVES).contains(&count) {
            return None;
        }
        let mut cvs = [[0; 32]; MAX_LEAVES];
        for (cv, part) in cvs.iter_mut().zip(b.chunks_exact(32)) {
            cv.copy_from_slice(part);
        }
        Some(Leaves {
            cvs,
            count: count as u8,
        })
    }

    /// The stored form: the chaining values in order.
    pub fn as_bytes(&self) -> &[u8] {
        self.cvs[..usize::from(self.count)].as_flattened()
    }

    /// True when these are the leaves of a chunk of `len` bytes whose digest is `digest`.
    pub fn combine_to(&self, len: usize, digest: &ChunkDigest) -> bool {
        let leaf = Self::leaf_bytes(len);
        len > leaf && len.div_ceil(leaf) == usize::from(self.count) && self.root(len) == *digest
    }

    /// True when `data` is leaf `i` of the chunk of `len` bytes these leaves describe.
    /// Meaningful once [`Leaves::combine_to`] held.
    pub fn check_leaf(&self, len: usize, i: usize, data: &[u8]) -> bool {
        let leaf = Self::leaf_bytes(len);
        i < usize::from(self.count)
            && i * leaf < len
            && data.len() == leaf.min(len - i * leaf)
            && leaf_cv(i * leaf, data) == self.cvs[i]
    }

    /// The root of the tree over these leaves, for a chunk of `len` (> one leaf) bytes.
    fn root(&self, len: usize) -> ChunkDigest {
        use blake3::hazmat::{left_subtree_len, merge_subtrees_root, Mode};
        let leaf = Self::leaf_bytes(len);
        let left = left_subtree_len(len as u64) as usize;
        let l = self.subtree(0, left, leaf);
        let r = self.subtree(left, len - left, leaf);
        ChunkDigest(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
    }

    /// The chaining value of the subtree over `[off, off + len)`, split as BLAKE3 splits
    /// it: every split point of a range longer than a leaf is a multiple of the leaf.
    fn subtree(&self, off: usize, len: usize, leaf: usize) -> [u8; 32] {
        use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, Mode};
        if len <= leaf {
            return self.cvs.get(off / leaf).copied().unwrap_or([0; 32]);
        }
        let left = left_subtree_len(len as u64) as usize;
        let l = self.subtree(off, left, leaf);
        let r = self.subtree(off + left, len - left, leaf);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
}

/// The chaining value of the subtree of `data` starting at byte `offset` of its chunk.
fn leaf_cv(offset: usize, data: &[u8]) -> [u8; 32] {
    use blake3::hazmat::HasherExt;
    blake3::Hasher::new()
        .set_input_offset(offset as u64)
        .update(data)
        .finalize_non_root()
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkDigest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A streaming SHA-256 that renders as an OCI digest string (`sha256:<hex>`).
#[derive(Default, Clone)]
pub struct OciHasher(sha2::Sha256);

impl OciHasher {
    /// A fresh hasher.
    pub fn new() -> OciHasher {
        OciHasher(sha2::Sha256::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// `sha256:<64 hex>`.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

/// A reader adapter that hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: OciHasher,
    bytes: u64,
}

impl<R> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> HashingReader<R> {
        HashingReader {
            inner,
            hasher: OciHasher::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The OCI digest of everything read, and the inner reader.
    pub fn finish(self) -> (String, R) {
        (self.hasher.finish(), self.inner)
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_digest_of_empty_input_is_the_well_known_value() {
        assert_eq!(
            OciHasher::new().finish(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn digests_through_leaves_are_blake3() {
        let mut x = 7u64;
        let data: Vec<u8> = (0..(1 << 20) + 3000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let lens = [
            0usize,
            1,
            1024,
            1025,
            16384,
            16385,
            20000,
            32768,
            32769,
            49152,
            49153,
            65535,
            65536,
            65537,
            100_000,
            131072,
            200_000,
            524_288,
            1 << 20,
            (1 << 20) + 3000,
        ];
        for len in lens {
            let d = &data[..len];
            let (digest, leaves) = Leaves::digest_of(d);
            assert_eq!(digest, ChunkDigest::of(d), "len {len}");
            let leaf = Leaves::leaf_bytes(len);
            assert_eq!(leaves.is_some(), len > leaf, "len {len}");
            let Some(leaves) = leaves else { continue };
            assert!(leaves.combine_to(len, &digest));
            assert_eq!(Leaves::from_bytes(leaves.as_bytes()), Some(leaves));
            for (i, part) in d.chunks(leaf).enumerate() {
                assert!(leaves.check_leaf(len, i, part), "len {len} leaf {i}");
                let mut bad = part.to_vec();
                bad[part.len() / 2] ^= 1;
                assert!(!leaves.check_leaf(len, i, &bad));
            }
            // A wrong digest or a changed value: refused. (The values do not commit to
            // the length; `len` comes from the index and sizes every leaf checked.)
            assert!(!leaves.combine_to(len, &ChunkDigest::of(b"x")));
            let mut b = leaves.as_bytes().to_vec();
            b[5] ^= 1;
            assert!(!Leaves::from_bytes(&b).unwrap().combine_to(len, &digest));
        }
        // A row of more leaves than the length has: refused, not a panic.
        let (_, four) = Leaves::digest_of(&data[..65536]);
        assert!(!four.unwrap().check_leaf(20000, 3, &data[..100]));
        assert_eq!(Leaves::from_bytes(&[0; 32]), None);
        assert_eq!(Leaves::from_bytes(&[0; 33]), None);
        assert_eq!(Leaves::from_bytes(&[0; 32 * (MAX_LEAVES + 1)]), None);
    }

    #[test]
    fn chunk_digest_hex_round_trips() {
        let d = ChunkDigest::of(b"hello");
        assert_eq!(ChunkDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(ChunkDigest::from_hex("zz"), None);
    }
}
