//! Imports an EROFS image whose file data lives in one extra blob device (as
//! `mkfs.erofs --chunksize=N --blobdev=BLOB DIR` makes them) into the store: the blob
//! is cut into chunks at its own offsets, so the image's chunk addresses stay valid
//! for the store's blob. A stand-in for `dedupd convert` in tests and benches.

use std::fs;
use std::io::Read;
use std::path::Path;

use sha2::Digest;

use crate::store::blob::{blob_id, encode_table};
use crate::store::{LayerCommit, LayerRecord, RawEntry, Store, StoreError, BLOCK_BYTES};

/// Errors of an import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading an input.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The blob is not a whole number of blocks, or the chunk size is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The store refused it.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stores `blob` in `chunk_bytes` pieces and commits a layer whose image is `image`
/// (copied). The layer's diff_id is the SHA-256 of the image and blob bytes.
pub fn import_erofs(
    store: &Store,
    image: &Path,
    blob: &Path,
    chunk_bytes: u32,
) -> Result<LayerRecord, ImportError> {
    if !chunk_bytes.is_power_of_two()
        || u64::from(chunk_bytes) < BLOCK_BYTES
        || chunk_bytes as usize > crate::store::MAX_CHUNK_BYTES
    {
        return Err(ImportError::Invalid(format!(
            "chunk size {chunk_bytes} is not a power of two from 4 KiB to 1 MiB"
        )));
    }
    let io_err = |p: &Path| {
        let path = p.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    let image_bytes = fs::read(image).map_err(io_err(image))?;
    let mut f = fs::File::open(blob).map_err(io_err(blob))?;
    let len = f.metadata().map_err(io_err(blob))?.len();
    if len % BLOCK_BYTES != 0 {
        return Err(ImportError::Invalid(format!(
            "{}: {len} bytes is not a whole number of 4 KiB blocks",
            blob.display()
        )));
    }
    let mut sha = sha2::Sha256::new();
    sha.update(&image_bytes);
    let mut ingest = store.ingest()?;
    let mut entries = Vec::new();
    let mut buf = vec![0u8; chunk_bytes as usize];
    let mut logical = 0u64;
    let mut left = len;
    // Bounded by the blob's length.
    while left > 0 {
        let n = left.min(u64::from(chunk_bytes)) as usize;
        f.read_exact(&mut buf[..n]).map_err(io_err(blob))?;
        sha.update(&buf[..n]);
        let put = ingest.put_chunk(&buf[..n])?;
        entries.push(RawEntry {
            digest: put.digest,
            raw_len: n as u32,
        });
        logical += n as u64;
        left -= n as u64;
    }
    let diff_id = format!("sha256:{}", hex::encode(sha.finalize()));
    let id = blob_id(&encode_table(&entries));
    let tmp = store
        .root()
        .join("layers")
        .join(format!(".import-{}", std::process::id()));
    fs::write(&tmp, &image_bytes).map_err(io_err(&tmp))?;
    let record = LayerRecord {
        diff_id,
        digests: vec![],
        blobs: vec![id.clone()],
        chunk_bytes,
        image_bytes: image_bytes.len() as u64,
        files: 0,
        chunks: entries.len() as u64,
        new_chunks: 0,
        logical_bytes: logical,
        stored_bytes: 0,
        remote: None,
    };
    Ok(ingest.commit(LayerCommit {
        record,
        image_tmp: &tmp,
        blobs: vec![(id, entries)],
    })?)
}
