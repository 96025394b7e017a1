//! The chunk store: content-addressed, deduplicated, lz4-compressed file data, plus the
//! records of converted layers and the chunk tables of their blobs.
//!
//! Layout under the root (default `/var/lib/dedupd`):
//!
//! ```text
//! dedupd.redb             chunk index (with BLAKE3 leaves and payload checksums), pack
//!                         lengths, blobs, layers (redb, transactional)
//! chunks/NNNNNNNN.pack    append-only chunk records (see [`chunk`])
//! layers/<hex>.erofs      EROFS metadata images, one per layer (diff_id hex)
//! ```
//!
//! Crash safety: an [`Ingest`] appends records to a pack it leases, then at commit
//! `fdatasync`s it, renames the layer's image into place, and commits one redb
//! transaction that makes the chunks, the blob and the layer visible together. A crash
//! before the commit leaves bytes past the pack's committed length, which the next
//! ingest truncates away; an ingest dropped without commit truncates them at once.
//!
//! Concurrency: several ingests may run at once (layers streamed in parallel, a Commit
//! beside them), each on a pack of its own (the lease), sharing the ingest lock; what
//! must not see a half-written layer takes it exclusively ([`Store::remove_layer`],
//! compaction), so no ingest ever names a chunk that a removal is dropping. Two ingests
//! may both store a chunk new to the index: the first commit indexes it, the second
//! finds it indexed and leaves its own record as dead pack space (not counted live, not
//! counted as the layer's new chunk), so every count stays exact.
//!
//! Space: [`Store::remove_layer`] drops chunks from the index only; their records stay in
//! the packs until [`Store::compact`]. The `pack_live` table counts, per pack, the record
//! bytes of indexed chunks, kept in the same transactions as the index, so dead bytes are
//! known without a scan. Compaction retires packs with no live record, and rewrites packs
//! whose live fraction is under a threshold: their live records are verified, appended to
//! the active pack through the ingest machinery (under the ingest lock), synced, and one
//! transaction repoints the moved chunks and drops the old pack's row. A crash before that
//! commit leaves the old records valid and new bytes past the committed length (truncated
//! by the next ingest); a crash after it leaves an orphan pack file (no row) that the next
//! [`Store::finish_compaction`] unlinks. Pack numbers are never reused (`store_meta`
//! remembers the highest one), so a cached fd or a stale [`ChunkLoc`] never names a
//! different file under the same number.
//!
//! The rule for readers: a [`Registry`] built before a compaction may hold [`ChunkLoc`]s
//! in retired packs, and the data plane may open packs by path from them. So
//! [`Store::compact`] never unlinks a file: the caller first swaps every live registry
//! for a fresh [`Store::registry`], then calls [`Store::finish_compaction`], which unlinks
//! every pack file that has no row. A process without a running data plane (the CLI) may
//! call both at once.
//!
//! Swapping the registry is not enough for rewrites: the cachefiles front end keeps the
//! [`BlobTable`] of each object the kernel opened (`frontend/cachefiles/front.rs`) for as
//! long as the layer stays mounted, and the io_uring worker opens packs by path from
//! those locations (`serve/worker.rs`, `pack_fd`). A rewritten pack may hold chunks of
//! mounted layers, so the daemon (snapshotter Cleanup) compacts with
//! [`CompactOptions::dead_only`]: a pack with no live chunk is named by no live table.
//! Rewriting sparse packs runs offline (`dedupd store compact`, no daemon running).

pub mod blob;
pub mod chunk;
mod compact;
pub mod evict;
pub mod lz4prefix;
pub mod remote;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

pub use self::blob::{BlobBuilder, BlobEntry, BlobTable, RawEntry, BLOCK_BYTES};
pub use self::chunk::{ChunkError, ChunkLoc, MAX_CHUNK_BYTES};
pub use self::compact::{CompactOptions, CompactStats, FinishStats};
pub use self::evict::{Evictable, Evicted, Hole, Punched};
pub use self::remote::{
    FetchCommit, FetchWriter, Locator, RemoteBlob, RemoteLayerCommit, RemoteSource,
};
use crate::digest::ChunkDigest;
pub use crate::digest::Leaves;

/// Default chunk size: the unit of dedup, of verification, and of each fill.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
/// A new pack is started once the active one reaches this size.
const PACK_ROLL_BYTES: u64 = 1 << 30;

/// digest -> (pack, offset, stored_len, raw_len, refs). `refs` counts blobs that hold it.
const CHUNKS: TableDefinition<&[u8], (u32, u64, u32, u32, u32)> = TableDefinition::new("chunks");
/// digest -> the chunk's BLAKE3 leaves ([`Leaves::as_bytes`]), for chunks of more than
/// one leaf. They let a reader verify part of a chunk, so decode only a prefix of it;
/// they follow from the chunk's bytes alone and are checked against its digest before
/// use. A chunk without a row (stores from before this table) is decoded whole.
const CHUNK_LEAVES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunk_leaves");
/// digest -> the at-rest checksum of the chunk's record payload ([`chunk::payload_sum`]),
/// for every indexed chunk. It is taken from the bytes written, when they were known
/// good, so a reader can detect damaged stored bytes without hashing the chunk; a row
/// lives and dies with the chunk's `chunks` row (a move by compaction copies the payload
/// byte for byte, so the row stays valid). A chunk without a row (stores from before
/// this table) has `sum: None` and is verified against its digest on every read.
const CHUNK_SUMS: TableDefinition<&[u8], u64> = TableDefinition::new("chunk_sums");
/// pack -> committed length.
const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs");
/// pack -> bytes of records of indexed chunks in it (the live bytes).
const PACK_LIVE: TableDefinition<u32, u64> = TableDefinition::new("pack_live");
/// Store-wide counters: [`META_MAX_PACK`], [`META_PACK_LIVE_READY`].
const STORE_META: TableDefinition<&str, u64> = TableDefinition::new("store_meta");
/// The highest pack number ever committed; new packs take numbers above it.
const META_MAX_PACK: &str = "max_pack";
/// Set once `pack_live` has been built (stores made before it existed are scanned once).
const META_PACK_LIVE_READY: &str = "pack_live_ready";
/// blob id -> encoded chunk table.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// blob id -> number of layers that use it.
const BLOB_REFS: TableDefinition<&str, u32> = TableDefinition::new("blob_refs");
/// diff_id -> JSON [`LayerRecord`].
const LAYERS: TableDefinition<&str, &[u8]> = TableDefinition::new("layers");
/// compressed digest -> diff_id.
const LAYER_ALIASES: TableDefinition<&str, &str> = TableDefinition::new("layer_aliases");
/// chunk digest -> blobs naming it, for chunks registered blobs name but the packs do not
/// hold (lazily pulled; see [`remote`]). A chunk is in this table or in `chunks`, never
/// both.
const REMOTE_REFS: TableDefinition<&[u8], u32> = TableDefinition::new("remote_refs");
/// blob id -> where its chunks are published ([`RemoteBlob::encode`]).
const REMOTE_BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("remote_blobs");
/// blob id -> the chunk indexes a first start read, in order (u32 LE each): what the
/// prefetcher fetches first.
const BLOB_TRACES: TableDefinition<&str, &[u8]> = TableDefinition::new("blob_traces");
/// Most entries of one access trace.
pub const MAX_TRACE_ENTRIES: usize = 1 << 20;

/// Errors of the store. Messages name the root or the item involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Filesystem I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: redb::Error,
    },
    /// Another process (a running daemon, or another convert) has the store open.
    #[error("store {root} is in use by another dedupd process")]
    InUse {
        /// The root.
        root: PathBuf,
    },
    /// A record in the database is malformed.
    #[error("metadata database {path}: corrupt {what}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was corrupt.
        what: String,
    },
    /// A chunk could not be read back.
    #[error("chunk {digest}: {source}")]
    Chunk {
        /// The chunk.
        digest: ChunkDigest,
        /// The cause.
        #[source]
        source: ChunkError,
    },
    /// A chunk the caller needs is not in the store.
    #[error("chunk {0} is not in the store")]
    MissingChunk(ChunkDigest),
}

type Result<T> = std::result::Result<T, StoreError>;

/// What the store knows of one converted layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    /// `sha256:<hex>` of each layer file (as given) that converted to this diff_id.
    pub digests: Vec<String>,
    /// Data blobs in EROFS device order (device 1 is `blobs[0]`).
    pub blobs: Vec<String>,
    /// Chunk size used for the layer's files.
    pub chunk_bytes: u32,
    /// Size of the metadata image in bytes.
    pub image_bytes: u64,
    /// Entries in the layer (all kinds).
    pub files: u64,
    /// Chunk references of its files (holes excluded).
    pub chunks: u64,
    /// Chunks this layer added to the store.
    pub new_chunks: u64,
    /// Bytes of file data in the layer (sparse holes excluded).
    pub logical_bytes: u64,
    /// Bytes this layer added to the packs.
    pub stored_bytes: u64,
    /// Set for a layer pulled lazily: its chunks are fetched from a registry when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

/// Where a lazily pulled layer came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteLayer {
    /// The repository of the image and its artifact.
    pub source: RemoteSource,
    /// Digest of the dedupd artifact manifest the layer's metadata came from.
    pub artifact: String,
}

impl LayerRecord {
    /// Hex of the diff_id: names the image file and serves as the EROFS fsid.
    pub fn id_hex(&self) -> &str {
        self.diff_id
            .strip_prefix("sha256:")
            .unwrap_or(&self.diff_id)
    }
}

/// What [`Store::remove_layer`] freed.
#[derive(Clone, Debug, Default)]
pub struct RemovedLayer {
    /// The removed layer.
    pub record: Option<LayerRecord>,
    /// Blobs no layer uses any more (their registrations are gone).
    pub blobs: Vec<String>,
    /// Chunks that left the index.
    pub chunks: u64,
    /// Their uncompressed bytes.
    pub chunk_bytes: u64,
}

/// Totals of the store, as `dedupd store stats` prints them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StoreStats {
    /// Layers converted.
    pub layers: u64,
    /// File data bytes over all layers, before any dedup.
    pub logical_bytes: u64,
    /// Bytes of distinct chunks (uncompressed).
    pub unique_bytes: u64,
    /// Bytes of the committed pack files (compressed records and headers).
    pub stored_bytes: u64,
    /// Of `stored_bytes`, those no indexed chunk uses: what `dedupd store compact` can
    /// reclaim.
    pub dead_bytes: u64,
    /// Distinct chunks.
    pub chunks: u64,
    /// logical / unique.
    pub dedup_ratio: f64,
    /// logical / stored.
    pub total_ratio: f64,
}

/// A blob the daemon can serve, keyed in a [`Registry`] by the name the kernel uses.
#[derive(Debug)]
pub enum BlobSource {
    /// A data blob assembled from chunks.
    Chunked(Arc<BlobTable>),
    /// A layer's EROFS metadata image, served from its file.
    Image {
        /// The image file.
        path: PathBuf,
        /// Size reported to the kernel: the file size rounded up to a block.
        size_bytes: u64,
    },
}

impl BlobSource {
    /// The size to report to the kernel (stable across restarts).
    pub fn size_bytes(&self) -> u64 {
        match self {
            BlobSource::Chunked(t) => t.size_bytes(),
            BlobSource::Image { size_bytes, .. } => *size_bytes,
        }
    }
}

/// Every servable blob of a store, by kernel-visible name (data blob id, or a layer's
/// fsid = diff_id hex for its metadata image). Read-mostly: built by the control side,
/// shared with the data plane behind an `Arc` and replaced whole.
#[derive(Debug, Default)]
pub struct Registry {
    /// name -> source.
    pub blobs: HashMap<String, Arc<BlobSource>>,
    /// Pack files by number, for the data plane to open.
    pub packs: Vec<(u32, PathBuf)>,
}

/// An open store.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    db: redb::Database,
    /// Shared by ingests (each on a pack of its own), exclusive for what must not run
    /// beside one: layer removal and compaction.
    ingest_lock: RwLock<()>,
    /// Packs being written (by an ingest or the fetch writer): no other writer appends
    /// to them and compaction leaves them alone.
    leases: Mutex<Leases>,
    /// A new pack is started once the active one reaches this size.
    pack_roll_bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Memory redb may keep for the index's pages (its default is 1 GiB). The data plane
/// never reads the database on its hot path (the registry is in memory), and the pages
/// of a lookup are in the kernel's page cache anyway; left at the default, every page
/// the registry load read stayed resident in the daemon for its whole life.
const DB_CACHE_BYTES: usize = 4 << 20;

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for dir in [root.to_path_buf(), root.join("chunks"), root.join("layers")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let db_path = root.join("dedupd.redb");
        let db = match redb::Database::builder()
            .set_cache_size(DB_CACHE_BYTES)
            .create(&db_path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse {
                    root: root.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(StoreError::Db {
                    path: db_path,
                    source: e.into(),
                })
            }
        };
        let store = Store {
            root: root.to_path_buf(),
            db_path,
            db,
            ingest_lock: RwLock::new(()),
            leases: Mutex::new(Leases::default()),
            pack_roll_bytes: PACK_ROLL_BYTES,
        };
        // Create every table so that readers never meet a missing one.
        let txn = store.db.begin_write().map_err(store.db_err())?;
        {
            txn.open_table(CHUNKS).map_err(store.db_err())?;
            txn.open_table(CHUNK_LEAVES).map_err(store.db_err())?;
            txn.open_table(CHUNK_SUMS).map_err(store.db_err())?;
            txn.open_table(PACKS).map_err(store.db_err())?;
            txn.open_table(BLOBS).map_err(store.db_err())?;
            txn.open_table(BLOB_REFS).map_err(store.db_err())?;
            txn.open_table(LAYERS).map_err(store.db_err())?;
            txn.open_table(LAYER_ALIASES).map_err(store.db_err())?;
            txn.open_table(REMOTE_REFS).map_err(store.db_err())?;
            txn.open_table(REMOTE_BLOBS).map_err(store.db_err())?;
            txn.open_table(BLOB_TRACES).map_err(store.db_err())?;
            let mut meta = txn.open_table(STORE_META).map_err(store.db_err())?;
            let ready = meta
                .get(META_PACK_LIVE_READY)
                .map_err(store.db_err())?
                .is_some();
            if !ready {
                // A store from before `pack_live`: count live bytes once from the index.
                let chunks = txn.open_table(CHUNKS).map_err(store.db_err())?;
                let mut live: HashMap<u32, u64> = HashMap::new();
                for item in chunks.iter().map_err(store.db_err())? {
                    let (_, v) = item.map_err(store.db_err())?;
                    let (p, _, s, _, _) = v.value();
                    *live.entry(p).or_default() += record_bytes(s);
                }
                let mut pack_live = txn.open_table(PACK_LIVE).map_err(store.db_err())?;
                for (p, n) in live {
                    pack_live.insert(p, n).map_err(store.db_err())?;
                }
                let packs = txn.open_table(PACKS).map_err(store.db_err())?;
                let last = packs
                    .last()
                    .map_err(store.db_err())?
                    .map(|(k, _)| k.value());
                meta.insert(META_MAX_PACK, u64::from(last.unwrap_or(0)))
                    .map_err(store.db_err())?;
                meta.insert(META_PACK_LIVE_READY, 1)
                    .map_err(store.db_err())?;
            }
        }
        txn.commit().map_err(store.db_err())?;
        Ok(store)
    }

    fn db_err<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| StoreError::Db {
            path: self.db_path.clone(),
            source: e.into(),
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.db_path.clone(),
            what: what.into(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of pack number `pack`.
    pub fn pack_path(&self, pack: u32) -> PathBuf {
        self.root.join("chunks").join(format!("{pack:08}.pack"))
    }

    /// Path of the metadata image of the layer with diff_id hex `id_hex`.
    pub fn image_path(&self, id_hex: &str) -> PathBuf {
        self.root.join("layers").join(format!("{id_hex}.erofs"))
    }

    /// Looks a layer up by diff_id or by the digest of a layer file; either may be given
    /// with or without the `sha256:` prefix.
    pub fn layer(&self, key: &str) -> Result<Option<LayerRecord>> {
        let key = if key.starts_with("sha256:") {
            key.to_string()
        } else {
            format!("sha256:{key}")
        };
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let layers = txn.open_table(LAYERS).map_err(self.db_err())?;
        let aliases = txn.open_table(LAYER_ALIASES).map_err(self.db_err())?;
        let diff_id = match aliases.get(key.as_str()).map_err(self.db_err())? {
            Some(d) => d.value().to_string(),
            None => key,
        };
        match layers.get(diff_id.as_str()).map_err(self.db_err())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value())
                    .map_err(|_| self.corrupt(format!("layer {diff_id}")))?,
            )),
            None => Ok(None),
        }
    }

    /// Every converted layer.
    pub fn layers(&self) -> Result<Vec<LayerRecord>> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let layers = txn.open_table(LAYERS).map_err(self.db_err())?;
        let mut out = Vec::new();
        for item in layers.iter().map_err(self.db_err())? {
            let (k, v) = item.map_err(self.db_err())?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|_| self.corrupt(format!("layer {}", k.value())))?,
            );
        }
        Ok(out)
    }

    /// Where chunk `digest` is stored, if it is.
    pub fn locate(&self, digest: &ChunkDigest) -> Result<Option<ChunkLoc>> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
        let leaves = txn.open_table(CHUNK_LEAVES).map_err(self.db_err())?;
        let sums = txn.open_table(CHUNK_SUMS).map_err(self.db_err())?;
        resolve_loc(&chunks, &leaves, &sums, digest).map_err(self.db_err())
    }

    /// Data bytes of blobs `ids` (the sum of their chunks' lengths) and, of those, the
    /// bytes whose chunk the store holds: how much of a lazily pulled layer is on this
    /// node. One read transaction, one lookup per chunk.
    pub fn local_bytes(&self, ids: &[String]) -> Result<(u64, u64)> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let blobs = txn.open_table(BLOBS).map_err(self.db_err())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
        let leaves = txn.open_table(CHUNK_LEAVES).map_err(self.db_err())?;
        let sums = txn.open_table(CHUNK_SUMS).map_err(self.db_err())?;
        let (mut total, mut local) = (0, 0);
        for id in ids {
            let Some(v) = blobs.get(id.as_str()).map_err(self.db_err())? else {
                continue;
            };
            let entries =
                blob::decode_table(v.value()).ok_or_else(|| self.corrupt(format!("blob {id}")))?;
            for e in entries {
                total += u64::from(e.raw_len);
                if resolve_loc(&chunks, &leaves, &sums, &e.digest)
                    .map_err(self.db_err())?
                    .is_some()
                {
                    local += u64::from(e.raw_len);
                }
            }
        }
        Ok((total, local))
    }

    /// The chunk table of blob `id`.
    pub fn blob_entries(&self, id: &str) -> Result<Option<Vec<RawEntry>>> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let blobs = txn.open_table(BLOBS).map_err(self.db_err())?;
        match blobs.get(id).map_err(self.db_err())? {
            Some(v) => Ok(Some(
                blob::decode_table(v.value()).ok_or_else(|| self.corrupt(format!("blob {id}")))?,
            )),
            None => Ok(None),
        }
    }

    /// Loads blob `id` for serving, with every chunk location resolved.
    pub fn blob_table(&self, id: &str) -> Result<Option<BlobTable>> {
        let Some(entries) = self.blob_entries(id)? else {
            return Ok(None);
        };
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
        let leaves = txn.open_table(CHUNK_LEAVES).map_err(self.db_err())?;
        let sums = txn.open_table(CHUNK_SUMS).map_err(self.db_err())?;
        let mut failed = None;
        let table = BlobTable::new(id.to_string(), &entries, |d| {
            match resolve_loc(&chunks, &leaves, &sums, d) {
                Ok(loc) => loc,
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            }
        });
        if let Some(e) = failed {
            return Err(self.db_err()(e));
        }
        let mut table = table;
        if let Some(r) = self.remote_blob(id)? {
            if r.locators.len() != table.entries().len() {
                return Err(self.corrupt(format!(
                    "remote blob {id}: {} locators for {} chunks",
                    r.locators.len(),
                    table.entries().len()
                )));
            }
            table.set_remote(Arc::new(r));
        }
        Ok(Some(table))
    }

    /// Where the chunks of blob `id` are published, for a lazily pulled blob.
    pub fn remote_blob(&self, id: &str) -> Result<Option<RemoteBlob>> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let t = txn.open_table(REMOTE_BLOBS).map_err(self.db_err())?;
        match t.get(id).map_err(self.db_err())? {
            Some(v) => {
                Ok(Some(RemoteBlob::decode(v.value()).ok_or_else(|| {
                    self.corrupt(format!("remote blob {id}"))
                })?))
            }
            None => Ok(None),
        }
    }

    /// The access trace of blob `id` (chunk indexes in first-read order), if recorded.
    pub fn trace(&self, id: &str) -> Result<Option<Vec<u32>>> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let t = txn.open_table(BLOB_TRACES).map_err(self.db_err())?;
        Ok(t.get(id).map_err(self.db_err())?.map(|v| {
            v.value()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        }))
    }

    /// Keeps `indexes` as the access trace of blob `id` (replacing one kept before) while
    /// the blob is registered; at most [`MAX_TRACE_ENTRIES`] are kept.
    pub fn put_trace(&self, id: &str, indexes: &[u32]) -> Result<()> {
        let bytes: Vec<u8> = indexes
            .iter()
            .take(MAX_TRACE_ENTRIES)
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let txn = self.db.begin_write().map_err(self.db_err())?;
        {
            let blobs = txn.open_table(BLOBS).map_err(self.db_err())?;
            if blobs.get(id).map_err(self.db_err())?.is_none() {
                return Ok(());
            }
            let mut t = txn.open_table(BLOB_TRACES).map_err(self.db_err())?;
            t.insert(id, bytes.as_slice()).map_err(self.db_err())?;
        }
        txn.commit().map_err(self.db_err())
    }

    /// Chunks registered blobs name that the packs do not hold.
    pub fn remote_chunks(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let t = txn.open_table(REMOTE_REFS).map_err(self.db_err())?;
        t.len().map_err(self.db_err())
    }

    /// Reads chunk `entry` back into `out` (resized to its length), verified. The slow
    /// path, for export and tests; the data plane has its own.
    pub fn read_chunk(&self, digest: &ChunkDigest, out: &mut Vec<u8>) -> Result<()> {
        let loc = self
            .locate(digest)?
            .ok_or(StoreError::MissingChunk(*digest))?;
        let path = self.pack_path(loc.pack);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut record = vec![0u8; loc.record_len()];
        let n = read_full_at(&file, &mut record, loc.offset).map_err(io_err(&path))?;
        out.resize(loc.raw_len as usize, 0);
        chunk::decode_record(&record[..n], &loc, digest, out).map_err(|source| StoreError::Chunk {
            digest: *digest,
            source,
        })
    }

    /// Reads chunk `digest`'s whole `DDC1` record, header and payload as the pack holds
    /// it, into `record`, after checking it: the header against the index, the payload
    /// decoded (into `scratch`, for records stored compressed) and hashed against the
    /// digest. What a publisher copies into a data blob; a damaged record never leaves
    /// the node. Returns the chunk's location.
    pub fn read_record(
        &self,
        digest: &ChunkDigest,
        record: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<ChunkLoc> {
        let loc = self
            .locate(digest)?
            .ok_or(StoreError::MissingChunk(*digest))?;
        let path = self.pack_path(loc.pack);
        let file = File::open(&path).map_err(io_err(&path))?;
        record.resize(loc.record_len(), 0);
        let n = read_full_at(&file, record, loc.offset).map_err(io_err(&path))?;
        scratch.resize(loc.raw_len as usize, 0);
        chunk::decode_record_or_in_place(&record[..n], &loc, digest, scratch).map_err(
            |source| StoreError::Chunk {
                digest: *digest,
                source,
            },
        )?;
        Ok(loc)
    }

    /// Everything the data plane can serve: every layer's image and every blob.
    pub fn registry(&self) -> Result<Registry> {
        let mut reg = Registry::default();
        for layer in self.layers()? {
            let path = self.image_path(layer.id_hex());
            let size_bytes = layer.image_bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            reg.blobs.insert(
                layer.id_hex().to_string(),
                Arc::new(BlobSource::Image { path, size_bytes }),
            );
            for id in &layer.blobs {
                if reg.blobs.contains_key(id) {
                    continue;
                }
                let table = self
                    .blob_table(id)?
                    .ok_or_else(|| self.corrupt(format!("missing blob {id}")))?;
                reg.blobs
                    .insert(id.clone(), Arc::new(BlobSource::Chunked(Arc::new(table))));
            }
        }
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let packs = txn.open_table(PACKS).map_err(self.db_err())?;
        for item in packs.iter().map_err(self.db_err())? {
            let (k, _) = item.map_err(self.db_err())?;
            reg.packs.push((k.value(), self.pack_path(k.value())));
        }
        Ok(reg)
    }

    /// Totals over the whole store.
    pub fn stats(&self) -> Result<StoreStats> {
        let layers = self.layers()?;
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
        let packs = txn.open_table(PACKS).map_err(self.db_err())?;
        let (mut unique_bytes, mut n) = (0u64, 0u64);
        for item in chunks.iter().map_err(self.db_err())? {
            let (_, v) = item.map_err(self.db_err())?;
            unique_bytes += u64::from(v.value().3);
            n += 1;
        }
        let pack_live = txn.open_table(PACK_LIVE).map_err(self.db_err())?;
        let (mut stored_bytes, mut dead_bytes) = (0u64, 0u64);
        for item in packs.iter().map_err(self.db_err())? {
            let (k, v) = item.map_err(self.db_err())?;
            let live = pack_live
                .get(k.value())
                .map_err(self.db_err())?
                .map_or(0, |v| v.value());
            stored_bytes += v.value();
            dead_bytes += v.value().saturating_sub(live);
        }
        let logical_bytes: u64 = layers.iter().map(|l| l.logical_bytes).sum();
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Ok(StoreStats {
            layers: layers.len() as u64,
            logical_bytes,
            unique_bytes,
            stored_bytes,
            dead_bytes,
            chunks: n,
            dedup_ratio: ratio(logical_bytes, unique_bytes),
            total_ratio: ratio(logical_bytes, stored_bytes),
        })
    }

    /// Removes layer `diff_id` (with or without `sha256:`): its record, its aliases, its
    /// image file, and every blob and chunk whose last reference it held. Pack space is
    /// not reclaimed here (compaction is separate); freed chunks leave the index and the
    /// stats at once. Waits for running ingests (and keeps new ones waiting), so that an
    /// ingest never names a chunk this removal drops. Returns `None` when the layer is
    /// unknown.
    pub fn remove_layer(&self, diff_id: &str) -> Result<Option<RemovedLayer>> {
        let _guard = self.exclusive();
        let Some(record) = self.layer(diff_id)? else {
            return Ok(None);
        };
        let mut removed = RemovedLayer::default();
        let result = (|| -> std::result::Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut layers = txn.open_table(LAYERS)?;
                let mut aliases = txn.open_table(LAYER_ALIASES)?;
                let mut blobs = txn.open_table(BLOBS)?;
                let mut blob_refs = txn.open_table(BLOB_REFS)?;
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut leaves = txn.open_table(CHUNK_LEAVES)?;
                let mut sums = txn.open_table(CHUNK_SUMS)?;
                let mut pack_live = txn.open_table(PACK_LIVE)?;
                let mut remote_refs = txn.open_table(REMOTE_REFS)?;
                let mut remote_blobs = txn.open_table(REMOTE_BLOBS)?;
                let mut traces = txn.open_table(BLOB_TRACES)?;
                layers.remove(record.diff_id.as_str())?;
                for d in &record.digests {
                    let points_here = aliases
                        .get(d.as_str())?
                        .is_some_and(|v| v.value() == record.diff_id);
                    if points_here {
                        aliases.remove(d.as_str())?;
                    }
                }
                for id in &record.blobs {
                    let refs = blob_refs.get(id.as_str())?.map(|v| v.value()).unwrap_or(0);
                    if refs > 1 {
                        blob_refs.insert(id.as_str(), refs - 1)?;
                        continue;
                    }
                    blob_refs.remove(id.as_str())?;
                    let table = blobs.remove(id.as_str())?.map(|v| v.value().to_vec());
                    remote_blobs.remove(id.as_str())?;
                    traces.remove(id.as_str())?;
                    removed.blobs.push(id.clone());
                    let Some(table) = table else { continue };
                    let entries = blob::decode_table(&table).ok_or_else(|| {
                        redb::Error::Corrupted(format!("blob {id}: undecodable chunk table"))
                    })?;
                    let mut seen = std::collections::HashSet::new();
                    for e in entries {
                        if !seen.insert(e.digest) {
                            continue;
                        }
                        let v = chunks.get(e.digest.0.as_slice())?.map(|v| v.value());
                        let Some((p, o, s, r, n)) = v else {
                            // Never fetched: only its count goes.
                            let key = e.digest.0.as_slice();
                            let count = remote_refs.get(key)?.map(|v| v.value());
                            match count {
                                Some(n) if n > 1 => {
                                    remote_refs.insert(key, n - 1)?;
                                }
                                Some(_) => {
                                    remote_refs.remove(key)?;
                                }
                                None => {}
                            }
                            continue;
                        };
                        if n > 1 {
                            chunks.insert(e.digest.0.as_slice(), (p, o, s, r, n - 1))?;
                        } else {
                            chunks.remove(e.digest.0.as_slice())?;
                            leaves.remove(e.digest.0.as_slice())?;
                            sums.remove(e.digest.0.as_slice())?;
                            let live = pack_live.get(p)?.map_or(0, |v| v.value());
                            pack_live.insert(p, live.saturating_sub(record_bytes(s)))?;
                            removed.chunks += 1;
                            removed.chunk_bytes += u64::from(r);
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|e| StoreError::Db {
            path: self.db_path.clone(),
            source: e,
        })?;
        let image = self.image_path(record.id_hex());
        match fs::remove_file(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&image)(e)),
        }
        removed.record = Some(record);
        Ok(Some(removed))
    }

    /// True when blob `id` is registered (some layer uses it).
    pub fn has_blob(&self, id: &str) -> Result<bool> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let blobs = txn.open_table(BLOBS).map_err(self.db_err())?;
        Ok(blobs.get(id).map_err(self.db_err())?.is_some())
    }

    /// Starts writing one layer's chunks, on a pack of its own. Ingests run side by side;
    /// one waits while a layer is removed or the store compacted. A thread must not open
    /// a second ingest while it holds one (a removal waiting between them would block
    /// both).
    pub fn ingest(&self) -> Result<Ingest<'_>> {
        let guard = self.ingest_lock.read().unwrap_or_else(|p| p.into_inner());
        self.open_ingest(IngestGuard::Shared(guard))
    }

    /// The ingest lock, exclusively: no ingest runs until it is dropped.
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.ingest_lock.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest pack while an ingest may still append to it (under the roll size, with
    /// its row), with its committed length, and the highest pack number ever committed.
    fn newest_pack(&self) -> Result<(Option<(u32, u64)>, u32)> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let packs = txn.open_table(PACKS).map_err(self.db_err())?;
        let meta = txn.open_table(STORE_META).map_err(self.db_err())?;
        let max_pack = meta
            .get(META_MAX_PACK)
            .map_err(self.db_err())?
            .map_or(0, |v| v.value());
        let max_pack = u32::try_from(max_pack).map_err(|_| self.corrupt("max_pack"))?;
        let last = packs
            .last()
            .map_err(self.db_err())?
            .map(|(k, v)| (k.value(), v.value()))
            .filter(|&(p, len)| p == max_pack && len < self.pack_roll_bytes);
        Ok((last, max_pack))
    }

    /// Leases the pack the next ingest appends to and returns its committed length: the
    /// newest pack if [`Store::newest_pack`] offers it and no other writer holds it,
    /// else a new number.
    fn lease_ingest_pack(&self) -> Result<(u32, u64)> {
        let (last, _) = self.newest_pack()?;
        if let Some((p, len)) = last {
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            if leases.held.insert(p) {
                return Ok((p, len));
            }
        }
        Ok((self.lease_new_pack()?, 0))
    }

    /// Leases the lowest pack number above every committed one that no writer holds.
    /// Numbers above the highest committed one hold nothing the index names (a file
    /// under one, left by a writer that crashed or gave up, is truncated by its new
    /// owner), so reusing them is safe, and it leaves no stray file behind.
    fn lease_new_pack(&self) -> Result<u32> {
        let (_, max_pack) = self.newest_pack()?;
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the number of leases held.
        let mut n = max_pack;
        loop {
            n = n
                .checked_add(1)
                .ok_or_else(|| self.corrupt("pack numbers exhausted"))?;
            if leases.held.insert(n) {
                return Ok(n);
            }
        }
    }

    /// Ends a lease taken by [`Store::lease_ingest_pack`] or [`Store::lease_new_pack`].
    fn release_pack(&self, pack: u32) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.held.remove(&pack);
    }

    /// Packs a writer holds now.
    fn held_packs(&self) -> HashSet<u32> {
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.held.clone()
    }

    fn open_ingest<'s>(&'s self, guard: IngestGuard<'s>) -> Result<Ingest<'s>> {
        let (pack, committed) = self.lease_ingest_pack()?;
        let path = self.pack_path(pack);
        let opened = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            // Drop whatever a crashed ingest appended past the committed length.
            .and_then(|f| f.set_len(committed).map(|()| f));
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                self.release_pack(pack);
                return Err(io_err(&path)(e));
            }
        };
        Ok(Ingest {
            store: self,
            _guard: guard,
            pack,
            pack_path: path,
            file,
            committed,
            len: committed,
            pending: HashMap::new(),
            record: Vec::with_capacity(chunk::MAX_RECORD_BYTES),
            scratch: Vec::new(),
            new_chunks: 0,
            new_bytes: 0,
            done: false,
        })
    }
}

/// The location of chunk `digest` in the index, with its leaves and its payload sum when
/// it has them (a malformed leaves row counts as none: the chunk is then verified whole;
/// a missing sum row leaves it to be verified against its digest).
fn resolve_loc(
    chunks: &impl ReadableTable<&'static [u8], (u32, u64, u32, u32, u32)>,
    leaves: &impl ReadableTable<&'static [u8], &'static [u8]>,
    sums: &impl ReadableTable<&'static [u8], u64>,
    digest: &ChunkDigest,
) -> std::result::Result<Option<ChunkLoc>, redb::StorageError> {
    let Some(v) = chunks.get(digest.0.as_slice())? else {
        return Ok(None);
    };
    let (pack, offset, stored_len, raw_len, _) = v.value();
    let leaves = leaves
        .get(digest.0.as_slice())?
        .and_then(|l| Leaves::from_bytes(l.value()));
    let sum = sums.get(digest.0.as_slice())?.map(|s| s.value());
    Ok(Some(ChunkLoc {
        pack,
        offset,
        stored_len,
        raw_len,
        leaves,
        sum,
    }))
}

/// Bytes of the record of a chunk whose payload is `stored_len` bytes.
fn record_bytes(stored_len: u32) -> u64 {
    (chunk::RECORD_HEADER_BYTES as u64) + u64::from(stored_len)
}

/// Reads until `buf` is full or end of file; returns bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// What [`Ingest::put_chunk`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    /// The chunk's digest.
    pub digest: ChunkDigest,
    /// True when this call stored it (it was in neither the store nor this ingest).
    pub new: bool,
}

/// How an [`Ingest`] holds the ingest lock.
enum IngestGuard<'s> {
    /// A layer's ingest: others run beside it.
    Shared(#[allow(dead_code)] RwLockReadGuard<'s, ()>),
    /// Compaction's copy: nothing runs beside it.
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'s, ()>),
}

/// One layer being written. Dropping it without [`Ingest::commit`] removes every byte it
/// appended.
pub struct Ingest<'s> {
    store: &'s Store,
    _guard: IngestGuard<'s>,
    pack: u32,
    pack_path: PathBuf,
    file: File,
    committed: u64,
    len: u64,
    pending: HashMap<ChunkDigest, ChunkLoc>,
    record: Vec<u8>,
    /// Where [`chunk::payload_is`] decodes a compressed payload.
    scratch: Vec<u8>,
    new_chunks: u64,
    new_bytes: u64,
    done: bool,
}

/// A layer to commit.
pub struct LayerCommit<'a> {
    /// The record (its `new_chunks` and `stored_bytes` are filled in by the commit).
    pub record: LayerRecord,
    /// The image, written to a temporary file in the same filesystem as the root; it is
    /// renamed into place.
    pub image_tmp: &'a Path,
    /// The layer's data blobs: id and table, in device order (matching `record.blobs`).
    pub blobs: Vec<(String, Vec<RawEntry>)>,
}

impl Ingest<'_> {
    /// Stores `data` (at most [`MAX_CHUNK_BYTES`]) unless a chunk with its digest exists.
    pub fn put_chunk(&mut self, data: &[u8]) -> Result<Put> {
        let (digest, leaves) = Leaves::digest_of(data);
        if self.pending.contains_key(&digest) || self.store.locate(&digest)?.is_some() {
            return Ok(Put { digest, new: false });
        }
        let mut record = std::mem::take(&mut self.record);
        chunk::encode_record(data, &digest, &mut record);
        // The checksum vouches for the payload on every later read, so an lz4 payload
        // gets one only once it is known to decode to the bytes just hashed.
        let vouched = chunk::payload_is(&record, data, &mut self.scratch);
        let put = self.append_record(&record, digest, data.len() as u32, leaves, vouched);
        self.record = record;
        put
    }

    /// As [`Ingest::put_chunk`], with the record already encoded by
    /// [`chunk::encode_record`] and the digest and leaves from [`Leaves::digest_of`] (so
    /// that callers can hash and compress on other threads). `vouched`: the caller
    /// checked that the payload is, or decodes to, the bytes it hashed
    /// ([`chunk::payload_is`]); only then is an at-rest checksum kept for it, and reads
    /// of a record without one verify it by digest.
    pub fn put_encoded(
        &mut self,
        digest: ChunkDigest,
        raw_len: u32,
        record: &[u8],
        leaves: Option<Leaves>,
        vouched: bool,
    ) -> Result<Put> {
        assert!(
            record.len() >= chunk::RECORD_HEADER_BYTES
                && record[8..12] == raw_len.to_le_bytes()
                && record[16..48] == digest.0,
            "put_encoded takes a record from chunk::encode_record for this chunk"
        );
        if self.pending.contains_key(&digest) || self.store.locate(&digest)?.is_some() {
            return Ok(Put { digest, new: false });
        }
        self.append_record(record, digest, raw_len, leaves, vouched)
    }

    /// Appends `record`; `vouched`: its payload is known to be the chunk's bytes or to
    /// decode to them (checked against the bytes hashed for `digest`), so it gets an
    /// at-rest checksum. Without, reads verify it by digest.
    pub(super) fn append_record(
        &mut self,
        record: &[u8],
        digest: ChunkDigest,
        raw_len: u32,
        leaves: Option<Leaves>,
        vouched: bool,
    ) -> Result<Put> {
        self.file
            .write_all_at(record, self.len)
            .map_err(io_err(&self.pack_path))?;
        // Summed from the bytes in memory, not read back: they are the ones known good.
        let sum = vouched.then(|| chunk::payload_sum(&record[chunk::RECORD_HEADER_BYTES..]));
        let loc = ChunkLoc {
            pack: self.pack,
            offset: self.len,
            stored_len: (record.len() - chunk::RECORD_HEADER_BYTES) as u32,
            raw_len,
            leaves,
            sum,
        };
        self.len += record.len() as u64;
        self.pending.insert(digest, loc);
        self.new_chunks += 1;
        self.new_bytes += record.len() as u64;
        Ok(Put { digest, new: true })
    }

    /// Chunks stored so far by this ingest.
    pub fn new_chunks(&self) -> u64 {
        self.new_chunks
    }

    /// Pack bytes appended so far by this ingest.
    pub fn new_bytes(&self) -> u64 {
        self.new_bytes
    }

    /// Makes the layer durable and visible: syncs the pack, renames the image into place,
    /// and commits chunks, blobs and layer in one transaction. Returns the final record.
    /// A pending chunk that another writer indexed meanwhile (an ingest beside this one,
    /// the fetch writer) keeps that writer's record: this one's bytes become dead space,
    /// and the record's `new_chunks` and `stored_bytes` leave it out.
    pub fn commit(mut self, commit: LayerCommit<'_>) -> Result<LayerRecord> {
        let store = self.store;
        self.file.sync_data().map_err(io_err(&self.pack_path))?;
        let mut record = commit.record;
        let image = store.image_path(record.id_hex());
        fs::rename(commit.image_tmp, &image).map_err(io_err(&image))?;
        let layers_dir = store.root.join("layers");
        File::open(&layers_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&layers_dir))?;

        let result = (|| -> std::result::Result<LayerRecord, redb::Error> {
            let txn = store.db.begin_write()?;
            {
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut leaves = txn.open_table(CHUNK_LEAVES)?;
                let mut sums = txn.open_table(CHUNK_SUMS)?;
                let mut remote_refs = txn.open_table(REMOTE_REFS)?;
                // Converted meanwhile by another ingest: its chunks are the layer's, and
                // this one's would be named by no blob.
                let converted = txn
                    .open_table(LAYERS)?
                    .get(record.diff_id.as_str())?
                    .is_some();
                let (mut indexed, mut added) = (0u64, 0u64);
                for (d, l) in &self.pending {
                    if converted || chunks.get(d.0.as_slice())?.is_some() {
                        // Indexed by another writer since this one stored it.
                        continue;
                    }
                    // Lazily pulled blobs that name this chunk now find it here.
                    let named = remote_refs.remove(d.0.as_slice())?.map_or(0, |v| v.value());
                    chunks.insert(
                        d.0.as_slice(),
                        (l.pack, l.offset, l.stored_len, l.raw_len, named),
                    )?;
                    if let Some(lv) = &l.leaves {
                        leaves.insert(d.0.as_slice(), lv.as_bytes())?;
                    }
                    if let Some(sum) = l.sum {
                        sums.insert(d.0.as_slice(), sum)?;
                    }
                    indexed += 1;
                    added += record_bytes(l.stored_len);
                }
                record.new_chunks = indexed;
                record.stored_bytes = added;
                if self.len != self.committed {
                    // A layer with no new chunk leaves the packs (and pack numbers) alone.
                    let mut pack_live = txn.open_table(PACK_LIVE)?;
                    let live = pack_live.get(self.pack)?.map_or(0, |v| v.value());
                    pack_live.insert(self.pack, live + added)?;
                    let mut packs = txn.open_table(PACKS)?;
                    packs.insert(self.pack, self.len)?;
                    let mut meta = txn.open_table(STORE_META)?;
                    let max_pack = meta.get(META_MAX_PACK)?.map_or(0, |v| v.value());
                    meta.insert(META_MAX_PACK, max_pack.max(u64::from(self.pack)))?;
                }
                let mut blobs = txn.open_table(BLOBS)?;
                let mut blob_refs = txn.open_table(BLOB_REFS)?;
                let mut layers = txn.open_table(LAYERS)?;
                let mut aliases = txn.open_table(LAYER_ALIASES)?;
                let previous = layers
                    .get(record.diff_id.as_str())?
                    .map(|v| v.value().to_vec());
                if let Some(prev) = previous {
                    // Converted before: keep the first conversion, add this file's digest.
                    if let Ok(mut prev) = serde_json::from_slice::<LayerRecord>(&prev) {
                        for d in &record.digests {
                            if !prev.digests.contains(d) {
                                prev.digests.push(d.clone());
                            }
                        }
                        prev.new_chunks = record.new_chunks;
                        let json = serde_json::to_vec(&prev).expect("serializable");
                        layers.insert(record.diff_id.as_str(), json.as_slice())?;
                    }
                } else {
                    for (id, entries) in &commit.blobs {
                        let refs = blob_refs.get(id.as_str())?.map(|v| v.value()).unwrap_or(0);
                        if refs == 0 {
                            blobs.insert(id.as_str(), blob::encode_table(entries).as_slice())?;
                            let mut seen = std::collections::HashSet::new();
                            for e in entries {
                                if !seen.insert(e.digest) {
                                    continue;
                                }
                                let v = chunks.get(e.digest.0.as_slice())?.map(|v| v.value());
                                let Some((p, o, s, r, n)) = v else {
                                    return Err(redb::Error::Corrupted(format!(
                                        "blob {id} names chunk {} that is not stored",
                                        e.digest
                                    )));
                                };
                                chunks.insert(e.digest.0.as_slice(), (p, o, s, r, n + 1))?;
                            }
                        }
                        blob_refs.insert(id.as_str(), refs + 1)?;
                    }
                    let json = serde_json::to_vec(&record).expect("serializable");
                    layers.insert(record.diff_id.as_str(), json.as_slice())?;
                }
                for d in &record.digests {
                    aliases.insert(d.as_str(), record.diff_id.as_str())?;
                }
            }
            txn.commit()?;
            Ok(record)
        })();
        let record = result.map_err(|e| StoreError::Db {
            path: store.db_path.clone(),
            source: e,
        })?;
        self.committed = self.len;
        self.done = true;
        Ok(record)
    }
}

impl Drop for Ingest<'_> {
    fn drop(&mut self) {
        if !self.done && self.len != self.committed {
            // Best effort: a failure here is repaired by the next ingest's truncate.
            let _ = self.file.set_len(self.committed);
        }
        self.store.release_pack(self.pack);
    }
}

/// Pack leases of one process (see [`Store::lease_new_pack`]).
#[derive(Debug, Default)]
struct Leases {
    /// Packs held by a writer.
    held: HashSet<u32>,
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Commits one layer of `chunks` in one blob (a test fixture shared with `compact`).
    pub(crate) fn commit_layer(store: &Store, diff: &str, chunks: &[Vec<u8>]) -> LayerRecord {
        let mut ing = store.ingest().unwrap();
        let mut b = BlobBuilder::new();
        for c in chunks {
            let put = ing.put_chunk(c).unwrap();
            b.add(put.digest, c.len() as u32);
        }
        let id = blob::blob_id(&b.encode());
        let tmp = store.root().join("layers").join("img.tmp");
        fs::write(&tmp, b"image").unwrap();
        let record = LayerRecord {
            diff_id: format!("sha256:{diff}"),
            digests: vec![format!("sha256:{diff}00")],
            blobs: vec![id.clone()],
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            image_bytes: 5,
            files: chunks.len() as u64,
            chunks: chunks.len() as u64,
            new_chunks: 0,
            logical_bytes: chunks.iter().map(|c| c.len() as u64).sum(),
            stored_bytes: 0,
            remote: None,
        };
        ing.commit(LayerCommit {
            record,
            image_tmp: &tmp,
            blobs: vec![(id, b.entries().to_vec())],
        })
        .unwrap()
    }

    #[test]
    fn chunks_are_stored_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = vec![vec![1u8; 65536], vec![2u8; 100]];
        let r1 = commit_layer(&store, "aa", &a);
        assert_eq!(r1.new_chunks, 2);
        let r2 = commit_layer(&store, "bb", &[vec![1u8; 65536], vec![3u8; 7]]);
        assert_eq!(r2.new_chunks, 1);
        let mut out = Vec::new();
        store.read_chunk(&ChunkDigest::of(&a[1]), &mut out).unwrap();
        assert_eq!(out, a[1]);
        let stats = store.stats().unwrap();
        assert_eq!(stats.chunks, 3);
        assert_eq!(stats.logical_bytes, 65536 * 2 + 107);
        assert_eq!(
            store.layer("sha256:aa00").unwrap().unwrap().diff_id,
            "sha256:aa"
        );
        let reg = store.registry().unwrap();
        assert_eq!(reg.blobs.len(), 4);
    }

    #[test]
    fn records_are_read_raw_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunks = [
            vec![7u8; 65536],
            (0..5000u32).map(|i| ((i * 7919) >> 3) as u8).collect(),
        ];
        commit_layer(&store, "aa", &chunks);
        let (mut rec, mut scratch) = (Vec::new(), Vec::new());
        for c in &chunks {
            let d = ChunkDigest::of(c);
            let loc = store.read_record(&d, &mut rec, &mut scratch).unwrap();
            assert_eq!(rec.len(), loc.record_len());
            let mut out = vec![0u8; c.len()];
            chunk::verify_foreign_record(&rec, c.len() as u32, &d, &mut out).unwrap();
            assert_eq!(&out, c);
        }
        // A flipped payload byte in the pack is refused, not copied.
        let d = ChunkDigest::of(&chunks[0]);
        let loc = store.locate(&d).unwrap().unwrap();
        let pack = fs::OpenOptions::new()
            .write(true)
            .open(store.pack_path(loc.pack))
            .unwrap();
        let at = loc.offset + loc.record_len() as u64 - 1;
        let mut b = [0u8; 1];
        File::open(store.pack_path(loc.pack))
            .unwrap()
            .read_at(&mut b, at)
            .unwrap();
        pack.write_at(&[b[0] ^ 0x55], at).unwrap();
        assert!(matches!(
            store.read_record(&d, &mut rec, &mut scratch),
            Err(StoreError::Chunk { .. })
        ));
        assert!(matches!(
            store.read_record(&ChunkDigest::of(b"absent"), &mut rec, &mut scratch),
            Err(StoreError::MissingChunk(_))
        ));
    }

    #[test]
    fn dropped_ingest_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit_layer(&store, "aa", &[vec![9u8; 5000]]);
        let before = fs::metadata(store.pack_path(1)).unwrap().len();
        {
            let mut ing = store.ingest().unwrap();
            ing.put_chunk(&[4u8; 9000]).unwrap();
        }
        assert_eq!(fs::metadata(store.pack_path(1)).unwrap().len(), before);
        assert!(store
            .locate(&ChunkDigest::of(&[4u8; 9000]))
            .unwrap()
            .is_none());
        assert_eq!(store.stats().unwrap().chunks, 1);
    }

    #[test]
    fn removing_layers_frees_only_unreferenced_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit_layer(&store, "aa", &[vec![1u8; 65536], vec![2u8; 100]]);
        commit_layer(&store, "bb", &[vec![1u8; 65536], vec![3u8; 7]]);
        assert_eq!(store.stats().unwrap().chunks, 3);
        let r = store.remove_layer("aa").unwrap().unwrap();
        assert_eq!((r.chunks, r.blobs.len()), (1, 1));
        assert!(store.layer("sha256:aa").unwrap().is_none());
        assert!(store.layer("sha256:aa00").unwrap().is_none());
        assert!(!store.image_path("aa").exists());
        let mut out = Vec::new();
        store
            .read_chunk(&ChunkDigest::of(&[1u8; 65536]), &mut out)
            .unwrap();
        assert!(store
            .locate(&ChunkDigest::of(&[2u8; 100]))
            .unwrap()
            .is_none());
        assert_eq!(store.stats().unwrap().chunks, 2);
        store.remove_layer("sha256:bb").unwrap().unwrap();
        assert_eq!(store.stats().unwrap().chunks, 0);
        assert_eq!(store.stats().unwrap().layers, 0);
        assert!(store.remove_layer("bb").unwrap().is_none());
    }

    /// The leaf rows, for tests.
    fn leaf_rows(store: &Store) -> usize {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(CHUNK_LEAVES).unwrap();
        t.iter().unwrap().count()
    }

    #[test]
    fn chunks_of_several_leaves_keep_them_until_they_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let big: Vec<u8> = (0..65536u32).map(|i| (i % 97) as u8).collect();
        let small = vec![5u8; 4096];
        commit_layer(&store, "aa", &[big.clone(), small.clone()]);
        let loc = store.locate(&ChunkDigest::of(&big)).unwrap().unwrap();
        assert_eq!(loc.leaves, Leaves::digest_of(&big).1);
        assert!(loc.leaves.is_some());
        // One leaf: nothing to keep.
        let one = store.locate(&ChunkDigest::of(&small)).unwrap().unwrap();
        assert_eq!(one.leaves, None);
        assert_eq!(leaf_rows(&store), 1);
        // The served table carries them too.
        let reg = store.registry().unwrap();
        let served = reg
            .blobs
            .values()
            .find_map(|b| match &**b {
                BlobSource::Chunked(t) => Some(t.entries()[0].loc),
                _ => None,
            })
            .unwrap();
        assert_eq!(served, Some(loc));
        store.remove_layer("aa").unwrap().unwrap();
        assert_eq!(leaf_rows(&store), 0);
    }

    /// The sum row of chunk `d` (shared with the other store tests).
    pub(crate) fn sum_row(store: &Store, d: &ChunkDigest) -> Option<u64> {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(CHUNK_SUMS).unwrap();
        let v = t.get(d.0.as_slice()).unwrap();
        v.map(|v| v.value())
    }

    /// The sum rows, for tests.
    fn sum_rows(store: &Store) -> usize {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(CHUNK_SUMS).unwrap();
        t.iter().unwrap().count()
    }

    /// [`chunk::payload_sum`] of the payload `loc` names, read back from its pack: what
    /// the index must agree with, found without it.
    pub(crate) fn pack_payload_sum(store: &Store, loc: &ChunkLoc) -> u64 {
        let mut rec = vec![0u8; loc.record_len()];
        File::open(store.pack_path(loc.pack))
            .unwrap()
            .read_exact_at(&mut rec, loc.offset)
            .unwrap();
        chunk::payload_sum(&rec[chunk::RECORD_HEADER_BYTES..])
    }

    /// Poorly compressible bytes, so stored raw.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn every_indexed_chunk_keeps_its_payload_sum_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let big: Vec<u8> = (0..65536u32).map(|i| (i % 97) as u8).collect();
        let raw = noise(1, 5000);
        let shared = vec![5u8; 4096];
        commit_layer(&store, "aa", &[big.clone(), raw.clone(), shared.clone()]);
        commit_layer(&store, "bb", std::slice::from_ref(&shared));
        for c in [&big, &raw, &shared] {
            let d = ChunkDigest::of(c);
            let loc = store.locate(&d).unwrap().unwrap();
            assert_eq!(loc.sum, Some(pack_payload_sum(&store, &loc)));
            assert_eq!(sum_row(&store, &d), loc.sum);
        }
        // Of the stored payload, which for a compressed chunk is not the chunk.
        let lz = store.locate(&ChunkDigest::of(&big)).unwrap().unwrap();
        assert!(lz.stored_len < lz.raw_len);
        assert_ne!(lz.sum, Some(chunk::payload_sum(&big)));
        let stored_raw = store.locate(&ChunkDigest::of(&raw)).unwrap().unwrap();
        assert_eq!(stored_raw.stored_len, stored_raw.raw_len);
        assert_eq!(stored_raw.sum, Some(chunk::payload_sum(&raw)));
        // One row per chunk, those of one leaf too.
        assert_eq!(sum_rows(&store), 3);
        assert_eq!(leaf_rows(&store), 1);
        // The served tables carry them.
        let reg = store.registry().unwrap();
        for b in reg.blobs.values() {
            if let BlobSource::Chunked(t) = &**b {
                for e in t.entries() {
                    assert!(e.loc.unwrap().sum.is_some());
                    assert_eq!(e.loc, store.locate(&e.digest).unwrap());
                }
            }
        }
        // A chunk another layer still names keeps its row; the others lose theirs.
        store.remove_layer("aa").unwrap().unwrap();
        assert_eq!(sum_rows(&store), 1);
        assert!(sum_row(&store, &ChunkDigest::of(&shared)).is_some());
        store.remove_layer("bb").unwrap().unwrap();
        assert_eq!(sum_rows(&store), 0);
    }

    #[test]
    fn a_chunk_without_a_sum_row_resolves_with_none_and_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (noise(2, 9000), vec![8u8; 70_000]);
        let rec = commit_layer(&store, "aa", &[a.clone(), b.clone()]);
        let (da, db) = (ChunkDigest::of(&a), ChunkDigest::of(&b));
        let with = store.locate(&da).unwrap().unwrap();
        assert!(with.sum.is_some());
        // As a chunk stored before the index kept sums.
        let txn = store.db.begin_write().unwrap();
        txn.open_table(CHUNK_SUMS)
            .unwrap()
            .remove(da.0.as_slice())
            .unwrap();
        txn.commit().unwrap();
        let without = store.locate(&da).unwrap().unwrap();
        assert_eq!(without, ChunkLoc { sum: None, ..with });
        assert!(store.locate(&db).unwrap().unwrap().sum.is_some());
        let table = store.blob_table(&rec.blobs[0]).unwrap().unwrap();
        assert_eq!(table.entries()[0].loc, Some(without));
        let mut out = Vec::new();
        store.read_chunk(&da, &mut out).unwrap();
        assert_eq!(out, a);

        // A store from before the table: opening creates it empty and makes up no row;
        // new chunks get theirs.
        let txn = store.db.begin_write().unwrap();
        assert!(txn.delete_table(CHUNK_SUMS).unwrap());
        txn.commit().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(sum_rows(&store), 0);
        assert_eq!(store.locate(&db).unwrap().unwrap().sum, None);
        let c = vec![9u8; 3000];
        commit_layer(&store, "bb", std::slice::from_ref(&c));
        let lc = store.locate(&ChunkDigest::of(&c)).unwrap().unwrap();
        assert_eq!(lc.sum, Some(pack_payload_sum(&store, &lc)));
        // Removing chunks that have no row is no error.
        store.remove_layer("aa").unwrap().unwrap();
        assert!(store.locate(&da).unwrap().is_none());
        assert_eq!(sum_rows(&store), 1);
    }

    /// Opens an ingest, stores `chunks` and returns it with the blob they make.
    fn stage<'s>(store: &'s Store, chunks: &[Vec<u8>]) -> (Ingest<'s>, BlobBuilder) {
        let mut ing = store.ingest().unwrap();
        let mut b = BlobBuilder::new();
        for c in chunks {
            let put = ing.put_chunk(c).unwrap();
            b.add(put.digest, c.len() as u32);
        }
        (ing, b)
    }

    /// Commits what [`stage`] staged as layer `diff`.
    fn finish(store: &Store, ing: Ingest<'_>, b: &BlobBuilder, diff: &str) -> LayerRecord {
        let id = blob::blob_id(&b.encode());
        let tmp = store.root().join("layers").join(format!("{diff}.tmp"));
        fs::write(&tmp, b"image").unwrap();
        let record = LayerRecord {
            diff_id: format!("sha256:{diff}"),
            digests: vec![],
            blobs: vec![id.clone()],
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            image_bytes: 5,
            files: 1,
            chunks: b.entries().len() as u64,
            new_chunks: 0,
            logical_bytes: 0,
            stored_bytes: 0,
            remote: None,
        };
        ing.commit(LayerCommit {
            record,
            image_tmp: &tmp,
            blobs: vec![(id, b.entries().to_vec())],
        })
        .unwrap()
    }

    /// The blob count of chunk `data` in the index.
    fn refs(store: &Store, data: &[u8]) -> Option<u32> {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(CHUNKS).unwrap();
        let v = t.get(ChunkDigest::of(data).0.as_slice()).unwrap();
        v.map(|v| v.value().4)
    }

    #[test]
    fn concurrent_ingests_index_a_shared_new_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shared = vec![3u8; 65536];
        let (a_own, b_own) = (vec![4u8; 5000], vec![5u8; 7000]);
        // Both stage the shared chunk as new: neither sees the other's pending one.
        let (ing_a, blob_a) = stage(&store, &[shared.clone(), a_own.clone()]);
        let (ing_b, blob_b) = stage(&store, &[shared.clone(), b_own.clone()]);
        assert_ne!(ing_a.pack, ing_b.pack, "each ingest writes its own pack");
        assert_eq!((ing_a.new_chunks(), ing_b.new_chunks()), (2, 2));
        let record_len = |c: &[u8]| {
            let mut r = Vec::new();
            chunk::encode_record(c, &ChunkDigest::of(c), &mut r);
            r.len() as u64
        };
        let shared_record = record_len(&shared);
        // B commits first: A finds the shared chunk indexed and skips its own copy.
        let rb = finish(&store, ing_b, &blob_b, "bb");
        let ra = finish(&store, ing_a, &blob_a, "aa");
        assert_eq!((rb.new_chunks, ra.new_chunks), (2, 1));
        assert_eq!(ra.stored_bytes, record_len(&a_own));
        assert_eq!(refs(&store, &shared), Some(2), "both blobs count");
        let loc = store.locate(&ChunkDigest::of(&shared)).unwrap().unwrap();
        let b_pack = store
            .locate(&ChunkDigest::of(&b_own))
            .unwrap()
            .unwrap()
            .pack;
        assert_eq!(
            loc.pack, b_pack,
            "the first commit's record is the one indexed"
        );
        let stats = store.stats().unwrap();
        assert_eq!(stats.chunks, 3);
        assert_eq!(stats.dead_bytes, shared_record, "A's copy is dead space");
        let mut out = Vec::new();
        store
            .read_chunk(&ChunkDigest::of(&shared), &mut out)
            .unwrap();
        assert_eq!(out, shared);
        // Removing either layer keeps the shared chunk; removing both frees all.
        store.remove_layer("bb").unwrap().unwrap();
        assert_eq!(refs(&store, &shared), Some(1));
        store
            .read_chunk(&ChunkDigest::of(&a_own), &mut out)
            .unwrap();
        store.remove_layer("aa").unwrap().unwrap();
        let stats = store.stats().unwrap();
        assert_eq!((stats.chunks, stats.layers), (0, 0));
        store.compact(CompactOptions::dead_only()).unwrap();
        store.finish_compaction().unwrap();
        assert_eq!(store.stats().unwrap().stored_bytes, 0);
    }

    #[test]
    fn an_ingest_of_a_layer_committed_meanwhile_indexes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (c1, c2) = (vec![6u8; 9000], vec![7u8; 9001]);
        let (ing_1, blob_1) = stage(&store, std::slice::from_ref(&c1));
        let (ing_2, blob_2) = stage(&store, &[c1.clone(), c2.clone()]);
        finish(&store, ing_1, &blob_1, "cc");
        let r = finish(&store, ing_2, &blob_2, "cc");
        assert_eq!(r.new_chunks, 0);
        // The first conversion stands, and the second's chunks named by no blob are
        // not indexed.
        assert!(store.locate(&ChunkDigest::of(&c2)).unwrap().is_none());
        assert_eq!(refs(&store, &c1), Some(1));
        store.remove_layer("cc").unwrap().unwrap();
        assert_eq!(store.stats().unwrap().chunks, 0);
    }

    #[test]
    fn removal_and_compaction_wait_for_running_ingests() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit_layer(&store, "aa", &[vec![1u8; 4096]]);
        commit_layer(&store, "bb", &[vec![2u8; 4096]]);
        let (ing, blob) = stage(&store, &[vec![1u8; 4096], vec![9u8; 4096]]);
        let done = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                store.remove_layer("aa").unwrap().unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            });
            s.spawn(|| {
                store.compact(CompactOptions::dead_only()).unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert_eq!(done.load(Ordering::SeqCst), 0, "ran beside an ingest");
            // The chunk the ingest found in the store is still there at its commit.
            finish(&store, ing, &blob, "cc");
        });
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert!(store.layer("aa").unwrap().is_none());
        assert_eq!(refs(&store, &[1u8; 4096]), Some(1), "cc keeps it");
        let mut out = Vec::new();
        store
            .read_chunk(&ChunkDigest::of(&[1u8; 4096]), &mut out)
            .unwrap();
    }

    #[test]
    fn a_second_process_is_told_the_store_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::InUse { .. })
        ));
    }
}
