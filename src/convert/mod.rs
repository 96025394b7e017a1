//! OCI layer conversion: tar (plain, gzip or zstd, detected by content) to an EROFS
//! metadata image plus deduplicated chunks in the store.
//!
//! The work is split across threads (see `pieces`): a parser thread reads, decompresses and
//! hashes the layer (SHA-256 of the file and of the tar), parses the tar (`tarfmt`) and
//! builds the [`Tree`] (metadata only); worker threads hash (BLAKE3) and lz4-compress the
//! chunks of file data in batches; the calling thread appends them to the store in order.
//! Nothing becomes visible in the store unless the whole layer converts: on any error the
//! ingest is dropped (the pack is truncated back) and the temporary image removed.

mod dir;
mod export;
mod pieces;
mod sparse;
pub mod tar;
mod tarfmt;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

pub use self::dir::convert_dir;
pub use self::export::{export, Exported};
use self::pieces::PieceSender;
pub use self::tar::Compression;
use crate::erofs::{self, Device, ImageOptions, Tree, WriteError};
use crate::store::blob::blob_id;
use crate::store::{
    BlobBuilder, LayerCommit, LayerRecord, Store, StoreError, DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES,
};

/// The longest name a directory entry may have (EROFS and Linux).
pub const MAX_NAME_BYTES: usize = 255;
/// The smallest chunk size (one EROFS block).
pub const MIN_CHUNK_BYTES: u32 = 4096;
/// The largest value of one xattr (EROFS stores its size in 16 bits).
const MAX_XATTR_VALUE_BYTES: usize = u16::MAX as usize;

/// Errors of conversion and export. Each names the layer (file or id) and, for bad input,
/// the entry and the rule it broke.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// An entry of the layer (or the stream around it) is invalid.
    #[error("{layer}: entry {entry}: {rule}")]
    Entry {
        /// The layer file (or directory).
        layer: PathBuf,
        /// The entry: its path, or its position when the header itself is bad.
        entry: String,
        /// What is wrong.
        rule: String,
    },
    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image could not be written.
    #[error("{layer}: {source}")]
    Image {
        /// The layer.
        layer: PathBuf,
        /// The cause.
        #[source]
        source: WriteError,
    },
    /// The chunk size is not a power of two in 4 KiB ..= 1 MiB.
    #[error("chunk size {0} is not a power of two between 4096 and 1048576")]
    ChunkSize(u64),
    /// The layer to export is not in the store.
    #[error("layer {0} is not in the store")]
    UnknownLayer(String),
    /// The store side of the pipeline stopped; its own error is reported instead.
    #[error("the chunk writer stopped")]
    StoreStopped,
    /// A layer's bytes are not the ones its image names (see [`Expected`]).
    #[error("{layer}: {what} {actual}, but the image says {expected}")]
    Mismatch {
        /// The layer.
        layer: String,
        /// Which digest: `the blob's digest is` or `the tar's diff_id is`.
        what: &'static str,
        /// What the image names.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
}

type Result<T> = std::result::Result<T, ConvertError>;

/// Checks that an xattr can be stored in EROFS.
pub(crate) fn check_xattr(name: &[u8], value: &[u8]) -> std::result::Result<(), String> {
    let shown = String::from_utf8_lossy(name);
    let ok_prefix = [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.len() > p.len() && name.starts_with(p))
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default";
    if !ok_prefix {
        return Err(format!(
            "xattr {shown:?} has no namespace EROFS can store \
             (user., trusted., security., system.posix_acl_*)"
        ));
    }
    if name.len() > MAX_NAME_BYTES || name.contains(&0) {
        return Err(format!("xattr name {shown:?} is invalid or over 255 bytes"));
    }
    if value.len() > MAX_XATTR_VALUE_BYTES {
        return Err(format!(
            "xattr {shown:?} has a {} byte value, over {MAX_XATTR_VALUE_BYTES}",
            value.len()
        ));
    }
    Ok(())
}

/// What the parser side produced.
pub(crate) struct Parsed {
    tree: Tree,
    digest: String,
    diff_id: String,
    files: u64,
}

/// What converting one layer did: the JSON line `dedupd convert` prints.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// The layer file (or directory) converted.
    pub layer: String,
    /// `sha256:` of the file as given.
    pub digest: String,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Compression found by content (`tar`, `gzip`, `zstd`; `dir` for a directory).
    pub compression: String,
    /// Entries in the layer.
    pub files: u64,
    /// Chunk references of its files (holes excluded).
    pub chunks: u64,
    /// Chunks this conversion added to the store.
    pub new_chunks: u64,
    /// File data bytes (holes excluded).
    pub logical_bytes: u64,
    /// Bytes this conversion added to the packs.
    pub stored_bytes: u64,
    /// Chunk size used.
    pub chunk_bytes: u32,
    /// Metadata image size.
    pub image_bytes: u64,
    /// Data blobs of the layer.
    pub blobs: Vec<String>,
    /// True when the layer was in the store before: nothing new was stored.
    pub already_converted: bool,
    /// Wall time of the conversion.
    pub seconds: f64,
}

/// Checks a chunk size.
pub fn check_chunk_bytes(chunk_bytes: u64) -> Result<u32> {
    if chunk_bytes.is_power_of_two()
        && (u64::from(MIN_CHUNK_BYTES)..=MAX_CHUNK_BYTES as u64).contains(&chunk_bytes)
    {
        Ok(chunk_bytes as u32)
    } else {
        Err(ConvertError::ChunkSize(chunk_bytes))
    }
}

/// Removes a temporary file unless disarmed.
struct TempFile {
    path: PathBuf,
    armed: bool,
    /// Whether the file still exists (and must go) once the commit renamed it.
    armed_after_commit: bool,
}

impl TempFile {
    fn new(store: &Store) -> TempFile {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = store
            .root()
            .join("layers")
            .join(format!(".convert-{}-{n}.tmp", std::process::id()));
        TempFile {
            path,
            armed: true,
            armed_after_commit: true,
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes temporary images that crashed conversions of other processes left behind (the
/// store is open by one process at a time, so another pid's file is abandoned).
fn remove_stale_temp_files(store: &Store) {
    let ours = format!(".convert-{}-", std::process::id());
    let Ok(dir) = fs::read_dir(store.root().join("layers")) else {
        return;
    };
    for entry in dir.flatten().take(10_000) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".convert-") && name.ends_with(".tmp") && !name.starts_with(&ours) {
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!("removing stale {}: {e}", entry.path().display());
            }
        }
    }
}

/// Converts the layer file at `layer` into the store with chunks of `chunk_bytes`.
pub fn convert_layer(store: &Store, layer: &Path, chunk_bytes: u32) -> Result<Report> {
    let chunk_bytes = check_chunk_bytes(u64::from(chunk_bytes))?;
    let mut compression = Compression::None;
    let report = run(store, layer, chunk_bytes, |pieces| {
        let (parsed, c) = tar::parse_layer(layer, pieces)?;
        compression = c;
        Ok(parsed)
    })?;
    Ok(Report {
        compression: compression.name().into(),
        ..report
    })
}

/// What a layer read from a stream must be, checked before anything is committed.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The key the layer is stored under (`sha256:<64 hex>`: the snapshotter's layer
    /// id, its chain id), in place of its diff_id.
    pub key: &'a str,
    /// The compressed blob's digest (the manifest's): kept as the layer's alias.
    pub digest: &'a str,
    /// The uncompressed tar's digest (the config's diff_id).
    pub diff_id: &'a str,
}

/// Converts the layer read from `input` (an OCI layer blob: tar, tar+gzip or tar+zstd)
/// into the store as layer `expected.key`, with chunks of `chunk_bytes`, and returns its
/// record. `name` names the layer in errors. Both digests of `expected` are checked at
/// the end of the input, before the commit: on a mismatch, or any error of `input`, the
/// ingest is dropped and nothing the conversion stored stays. Reads `input` on the
/// parser thread, so a reader fed from elsewhere overlaps with the conversion.
pub fn convert_reader(
    store: &Store,
    name: &str,
    input: Box<dyn std::io::Read + Send>,
    chunk_bytes: u32,
    expected: Expected<'_>,
) -> Result<LayerRecord> {
    let chunk_bytes = check_chunk_bytes(u64::from(chunk_bytes))?;
    let layer = Path::new(name);
    run(store, layer, chunk_bytes, move |pieces| {
        let (mut parsed, _) = tar::parse_reader(layer, input, pieces)?;
        let mismatch = |what, expected: &str, actual: &str| ConvertError::Mismatch {
            layer: name.to_string(),
            what,
            expected: expected.to_string(),
            actual: actual.to_string(),
        };
        if parsed.digest != expected.digest {
            return Err(mismatch(
                "the blob's digest is",
                expected.digest,
                &parsed.digest,
            ));
        }
        if parsed.diff_id != expected.diff_id {
            return Err(mismatch(
                "the tar's diff_id is",
                expected.diff_id,
                &parsed.diff_id,
            ));
        }
        parsed.diff_id = expected.key.to_string();
        Ok(parsed)
    })?;
    store
        .layer(expected.key)?
        .ok_or_else(|| ConvertError::UnknownLayer(expected.key.to_string()))
}

/// Runs one conversion: `parse` on a second thread, chunk storage on this one, then the
/// image and the commit.
fn run<F>(store: &Store, layer: &Path, chunk_bytes: u32, parse: F) -> Result<Report>
where
    F: FnOnce(&mut PieceSender) -> Result<Parsed> + Send,
{
    let start = Instant::now();
    let mut ingest = store.ingest()?;
    remove_stale_temp_files(store);
    let mut builder = BlobBuilder::new();
    let (mut sender, receiver) = pieces::pipeline(chunk_bytes);
    let (stored, parsed) = std::thread::scope(|s| {
        let parser = s.spawn(move || {
            let parsed = parse(&mut sender).and_then(|p| {
                sender.flush().map_err(|_| ConvertError::StoreStopped)?;
                Ok(p)
            });
            (parsed, sender.chunks, sender.logical_bytes)
        });
        let stored = receiver.run(store, &mut ingest, &mut builder);
        let parsed = parser.join();
        (stored, parsed)
    });
    let stored_at = start.elapsed();
    let (parsed, chunks, logical_bytes) = match parsed {
        Ok(p) => p,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    // A store failure makes the parser fail too; report the cause.
    let addrs = stored?;
    let Parsed {
        mut tree,
        digest,
        diff_id,
        files,
    } = parsed?;
    pieces::resolve_addrs(&mut tree, &addrs);

    let mut tmp = TempFile::new(store);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { path, source }
    };
    let previous = store.layer(&diff_id)?;
    let already_converted = previous.is_some();
    let (record, blobs) = match previous {
        Some(prev) => {
            // Converted before (perhaps from another compression of the same tar, or with
            // another chunk size): keep the first conversion, store nothing, and only
            // record this file's digest. The "new" image is a hard link to the old one,
            // so the commit's rename changes nothing (and the link is removed after).
            if ingest.new_chunks() > 0 {
                drop(ingest);
                ingest = store.ingest()?;
            }
            let image = store.image_path(prev.id_hex());
            fs::hard_link(&image, &tmp.path).map_err(io_err(&image))?;
            let record = LayerRecord {
                digests: vec![digest.clone()],
                ..prev
            };
            (record, vec![])
        }
        None => {
            let devices = if builder.is_empty() {
                vec![]
            } else {
                let blocks = u32::try_from(builder.blocks()).map_err(|_| ConvertError::Entry {
                    layer: layer.to_path_buf(),
                    entry: "(all)".into(),
                    rule: "the layer's data exceeds 16 TiB".into(),
                })?;
                vec![Device {
                    tag: blob_id(&builder.encode()),
                    blocks,
                }]
            };
            let opts = ImageOptions {
                chunk_bits: chunk_bytes.trailing_zeros() as u8,
                devices,
                build_time: 0,
            };
            let file = File::create(&tmp.path).map_err(io_err(&tmp.path))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let info = erofs::write_image(&tree, &opts, &mut out).map_err(|source| {
                ConvertError::Image {
                    layer: layer.to_path_buf(),
                    source,
                }
            })?;
            let file = out
                .into_inner()
                .map_err(|e| io_err(&tmp.path)(e.into_error()))?;
            file.sync_all().map_err(io_err(&tmp.path))?;
            tmp.armed_after_commit = false;
            let blobs = opts
                .devices
                .iter()
                .map(|d| (d.tag.clone(), builder.entries().to_vec()))
                .collect::<Vec<_>>();
            let record = LayerRecord {
                diff_id: diff_id.clone(),
                digests: vec![digest.clone()],
                blobs: opts.devices.iter().map(|d| d.tag.clone()).collect(),
                chunk_bytes,
                image_bytes: info.bytes,
                files,
                chunks,
                new_chunks: 0,
                logical_bytes,
                stored_bytes: 0,
                remote: None,
            };
            (record, blobs)
        }
    };
    drop(tree);
    let imaged_at = start.elapsed();
    let committed = ingest.commit(LayerCommit {
        record,
        image_tmp: &tmp.path,
        blobs,
    })?;
    tmp.armed = tmp.armed_after_commit;
    tracing::debug!(
        "converted {}: data {:.3}s, image {:.3}s, commit {:.3}s",
        layer.display(),
        stored_at.as_secs_f64(),
        (imaged_at - stored_at).as_secs_f64(),
        (start.elapsed() - imaged_at).as_secs_f64()
    );
    Ok(Report {
        layer: layer.display().to_string(),
        digest,
        diff_id,
        compression: String::new(),
        files,
        chunks,
        new_chunks: committed.new_chunks,
        logical_bytes,
        stored_bytes: committed.stored_bytes,
        chunk_bytes: committed.chunk_bytes,
        image_bytes: committed.image_bytes,
        blobs: committed.blobs,
        already_converted,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `dedupd convert` arguments.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Store root.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: std::path::PathBuf,
    /// Chunk size in bytes: a power of two from 4096 to 1048576.
    #[arg(long, default_value_t = u64::from(DEFAULT_CHUNK_BYTES))]
    pub chunk_size: u64,
    /// Layer files (OCI layer blobs: tar, tar+gzip or tar+zstd, detected by content).
    #[arg(required = true)]
    pub layers: Vec<std::path::PathBuf>,
}

/// `dedupd export` arguments.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Store root.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: std::path::PathBuf,
    /// Layer digest or diff_id (with or without `sha256:`).
    pub layer: String,
    /// Output directory.
    pub outdir: std::path::PathBuf,
}

/// Runs `dedupd convert`: one JSON line per layer, stopping at the first failure (the
/// layers before it stay converted).
pub fn convert_cmd(args: &ConvertArgs) -> anyhow::Result<()> {
    let chunk_bytes = check_chunk_bytes(args.chunk_size)?;
    let store = Store::open(&args.root)?;
    let stdout = std::io::stdout();
    for layer in &args.layers {
        let report = convert_layer(&store, layer, chunk_bytes)?;
        let mut out = stdout.lock();
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        out.flush()?;
    }
    Ok(())
}

/// Runs `dedupd export`.
pub fn export_cmd(args: &ExportArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.root)?;
    let exported = export(&store, &args.layer, &args.outdir)?;
    println!("{}", serde_json::to_string(&exported)?);
    Ok(())
}
