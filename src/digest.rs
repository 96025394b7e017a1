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
    fn chunk_digest_hex_round_trips() {
        let d = ChunkDigest::of(b"hello");
        assert_eq!(ChunkDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(ChunkDigest::from_hex("zz"), None);
    }
}
