//! `dedupd publish`: pushes a dedupd artifact (see [`super::artifact`] and
//! `docs/artifact-format.md`) beside an image, for each of its linux platform manifests.
//!
//! Two phases, so that a bad image pushes nothing:
//! 1. every layer of every platform is put in the store: found by its compressed digest,
//!    or streamed from the registry into a file under the store root (length and digest
//!    checked), converted, and the file removed. Its diff_id must be the one the image
//!    config gives.
//! 2. per layer, the records of its distinct chunks are copied out of the packs
//!    (verified) into data blobs, in the order of its chunk tables: conversion meets a
//!    file's chunks one after the other, so what one read of a file needs lies together
//!    and the fetcher's growing windows cover it in few range requests. Then the
//!    metadata blob (EROFS image, tables, locators), and per platform the artifact
//!    manifest (`subject` = that platform's manifest) and its referrers entry.
//!
//! Every byte written follows from the store's content alone (no clock, no randomness,
//! ordered maps), so publishing again builds the same blobs and manifests, and every
//! upload is preceded by a HEAD: the second run uploads nothing. The image's own
//! manifests, configs and layers are only read.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio_stream::StreamExt;

use super::artifact::{
    distinct_chunks, Artifact, ArtifactLayer, LayerMeta, MetaBlob, MetaHeader, ARTIFACT_TYPE,
    EMPTY_DIGEST, FORMAT_VERSION, MAX_DATA_BLOBS, TRACE_MEDIA_TYPE,
};
use super::image::{resolve_platforms, ImageError};
use super::pull::Traces;
use crate::convert::{check_chunk_bytes, convert_layer, ConvertError};
use crate::digest::{ChunkDigest, OciHasher};
use crate::registry::{
    auth, Descriptor, ImageRef, Registry, RegistryError, RegistryOptions, OCI_MANIFEST,
};
use crate::store::{
    chunk, LayerRecord, Locator, RawEntry, Store, StoreError, DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES,
};

/// Largest data blob. A layer whose records pass it is split over several, each under
/// it; locators address a blob by a 16-bit index and a 64-bit offset, so this is a
/// choice (registries and proxies handle blobs of a few GiB best), not a format limit.
pub const MAX_DATA_BLOB_BYTES: u64 = 4 << 30;
/// Folder under the store root for the files a publish writes (layer downloads, data
/// blobs); emptied of them at start, since the store (and so this folder) is one
/// process's at a time.
const WORK_DIR: &str = "publish";
/// How long `publish` waits for a registry's answer: it answers an upload only once it
/// has hashed and stored the whole blob, which takes minutes for gigabytes on a slow
/// disk (30 s, the pull default, failed a 256 MiB upload on an emulated VM). Publishing
/// is on no reader's path.
const PUSH_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

const _: () = assert!(MAX_DATA_BLOB_BYTES >= chunk::MAX_RECORD_BYTES as u64);
const _: () = assert!(MAX_DATA_BLOBS <= u16::MAX as usize + 1);

/// Why publishing failed. Names the layer or file involved.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The registry failed (boxed: a registry error is large, and rare).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// The image's manifests or config could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A layer did not convert.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The config's diff_id for a layer is not the digest of its tar.
    #[error(
        "layer {layer}: the image config gives diff_id {config}, \
         but the layer's uncompressed tar is {actual}: refusing to publish"
    )]
    DiffId {
        /// The layer (compressed digest).
        layer: String,
        /// The diff_id in the image config.
        config: String,
        /// The diff_id of the converted tar.
        actual: String,
    },
    /// The registry's layer blob is not what the manifest describes.
    #[error("layer {layer}: {why}")]
    Layer {
        /// The layer (compressed digest).
        layer: String,
        /// What is wrong.
        why: String,
    },
    /// The store holds the layer only as a lazily pulled one.
    #[error(
        "layer {layer} is in the store only as a lazily pulled layer (its chunks may be \
         missing): publish from a store that converted it whole"
    )]
    Lazy {
        /// The layer (compressed digest).
        layer: String,
    },
    /// I/O on a file of the publish.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<RegistryError> for PublishError {
    fn from(e: RegistryError) -> Self {
        PublishError::Registry(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to publish.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Chunk size for layers this publish converts (a layer already in the store keeps
    /// the size it was converted with).
    pub chunk_bytes: u32,
    /// Largest data blob ([`MAX_DATA_BLOB_BYTES`]; smaller in tests).
    pub max_data_blob_bytes: u64,
    /// Other stores (nodes' roots, their daemons stopped) whose access traces of the
    /// image's blobs are published too, after the publishing store's own.
    pub traces_from: Vec<PathBuf>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_data_blob_bytes: MAX_DATA_BLOB_BYTES,
            traces_from: Vec::new(),
        }
    }
}

/// What `dedupd publish` did: the JSON it prints.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The image as given.
    pub image: String,
    /// One per platform manifest published for.
    pub artifacts: Vec<ArtifactSummary>,
    /// Blobs uploaded (HEAD said absent).
    pub blobs_uploaded: u64,
    /// Blobs the registry already had (HEAD said present).
    pub blobs_present: u64,
    /// Bytes of the blobs uploaded.
    pub bytes_uploaded: u64,
    /// Artifact manifests uploaded (those already there are not put again).
    pub manifests_uploaded: u64,
    /// Wall time.
    pub seconds: f64,
}

/// The artifact of one platform manifest.
#[derive(Clone, Debug, Serialize)]
pub struct ArtifactSummary {
    /// `os/arch[/variant]` from the index; `null` for an image named by its manifest.
    pub platform: Option<String>,
    /// The image manifest it serves (its `subject`).
    pub subject: String,
    /// The artifact manifest's digest.
    pub artifact: String,
    /// Its size.
    pub artifact_bytes: u64,
    /// False when the registry had it already.
    pub manifest_uploaded: bool,
    /// Per image layer, in order.
    pub layers: Vec<LayerSummary>,
    /// Blobs with an access trace published in the artifact (0: no trace blob).
    pub traced_blobs: usize,
}

/// How a layer got into the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerSource {
    /// Downloaded and converted by this publish.
    Converted,
    /// Already in the store.
    Reused,
}

/// One layer's part of an artifact.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    /// Compressed digest (as in the image manifest).
    pub digest: String,
    /// diff_id.
    pub diff_id: String,
    /// Converted now or taken from the store.
    pub source: LayerSource,
    /// Chunk size of its files.
    pub chunk_bytes: u32,
    /// Distinct chunks in its data blobs.
    pub chunks: u64,
    /// The metadata blob.
    pub meta: BlobSummary,
    /// The data blobs, in locator order.
    pub data: Vec<BlobSummary>,
}

/// One pushed blob.
#[derive(Clone, Debug, Serialize)]
pub struct BlobSummary {
    /// `sha256:` digest.
    pub digest: String,
    /// Size.
    pub bytes: u64,
    /// False when the registry had it already.
    pub uploaded: bool,
}

/// Publishes the artifact of `image` (a tag or digest; a plain manifest or an index),
/// taking layers from `store` or converting them into it, and pushing into `image`'s
/// repository. Runs the registry calls on `rt` (a runtime this thread may block on).
pub fn publish(
    store: &Store,
    registry: &Registry,
    rt: &tokio::runtime::Runtime,
    image: &ImageRef,
    opts: &PublishOptions,
) -> Result<Summary, PublishError> {
    let start = Instant::now();
    check_chunk_bytes(u64::from(opts.chunk_bytes))?;
    let work = WorkDir::open(store)?;
    let platforms = rt.block_on(resolve_platforms(registry, image))?;

    // Phase 1: every layer in the store and checked before anything is pushed.
    let mut layers: HashMap<String, (LayerRecord, LayerSource)> = HashMap::new();
    for p in &platforms {
        for (desc, diff_id) in p.manifest.layers.iter().zip(&p.diff_ids) {
            if !layers.contains_key(&desc.digest) {
                let l = layer_in_store(store, registry, rt, &p.image, desc, &work, opts)?;
                layers.insert(desc.digest.clone(), l);
            }
            let (record, _) = &layers[&desc.digest];
            if record.diff_id != *diff_id {
                return Err(PublishError::DiffId {
                    layer: desc.digest.clone(),
                    config: diff_id.clone(),
                    actual: record.diff_id.clone(),
                });
            }
        }
    }

    // Phase 2: blobs, then per platform the manifest and its referrers entry.
    let mut pusher = Pusher {
        registry,
        rt,
        blobs_uploaded: 0,
        blobs_present: 0,
        bytes_uploaded: 0,
    };
    let mut built: HashMap<String, (ArtifactLayer, LayerSummary)> = HashMap::new();
    let mut artifacts = Vec::with_capacity(platforms.len());
    let mut manifests_uploaded = 0;
    let trace_stores = opts
        .traces_from
        .iter()
        .map(|root| Store::open(root))
        .collect::<Result<Vec<_>, _>>()?;
    for p in &platforms {
        let mut parts = Vec::with_capacity(p.manifest.layers.len());
        let mut summaries = Vec::with_capacity(p.manifest.layers.len());
        for desc in &p.manifest.layers {
            if !built.contains_key(&desc.digest) {
                let (record, source) = &layers[&desc.digest];
                let b = build_and_push(
                    store,
                    &mut pusher,
                    &p.image,
                    desc,
                    record,
                    *source,
                    &work,
                    opts,
                )?;
                built.insert(desc.digest.clone(), b);
            }
            let (part, summary) = &built[&desc.digest];
            parts.push(part.clone());
            summaries.push(summary.clone());
        }
        pusher.blob(
            &p.image,
            EMPTY_DIGEST,
            Upload::Bytes(Bytes::from_static(b"{}")),
        )?;
        // The access traces this store and `traces_from` keep for the image's blobs (a
        // lazily pulled blob's trace is kept by the node that pulled it): published so
        // that the next node's prefetcher fetches what a start reads first.
        let mut traces = Traces {
            version: 1,
            blobs: BTreeMap::new(),
        };
        for desc in &p.manifest.layers {
            for id in &layers[&desc.digest].0.blobs {
                for s in std::iter::once(store).chain(trace_stores.iter()) {
                    if let Some(order) = s.trace(id)? {
                        if !order.is_empty() {
                            traces.blobs.entry(id.clone()).or_insert(order);
                            break;
                        }
                    }
                }
            }
        }
        let trace = if traces.blobs.is_empty() {
            None
        } else {
            let bytes = Bytes::from(serde_json::to_vec(&traces).expect("traces serialize"));
            let digest = sha256(&bytes);
            let size = bytes.len() as u64;
            pusher.blob(&p.image, &digest, Upload::Bytes(bytes))?;
            Some(Descriptor {
                media_type: TRACE_MEDIA_TYPE.to_string(),
                digest,
                size,
                artifact_type: None,
                annotations: Default::default(),
            })
        };
        let artifact = Artifact {
            subject: p.manifest_desc.digest.clone(),
            layers: parts,
            trace,
        };
        let bytes = Bytes::from(artifact.manifest(&p.manifest_desc));
        let digest = sha256(&bytes);
        let at = p.image.with_digest(&digest);
        let there = match rt.block_on(registry.get_manifest(&at)) {
            Ok(m) => m.bytes == bytes,
            Err(RegistryError::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        if !there {
            rt.block_on(registry.push_manifest(&at, OCI_MANIFEST, bytes.clone()))?;
            manifests_uploaded += 1;
        }
        rt.block_on(registry.add_referrer(
            &p.image,
            Descriptor {
                media_type: OCI_MANIFEST.to_string(),
                digest: digest.clone(),
                size: bytes.len() as u64,
                artifact_type: Some(ARTIFACT_TYPE.to_string()),
                annotations: Default::default(),
            },
        ))?;
        tracing::info!(image = %p.image, platform = ?p.platform, artifact = %digest, "published");
        artifacts.push(ArtifactSummary {
            platform: p.platform.clone(),
            subject: p.manifest_desc.digest.clone(),
            artifact: digest,
            artifact_bytes: bytes.len() as u64,
            manifest_uploaded: !there,
            layers: summaries,
            traced_blobs: traces.blobs.len(),
        });
    }
    Ok(Summary {
        image: image.to_string(),
        artifacts,
        blobs_uploaded: pusher.blobs_uploaded,
        blobs_present: pusher.blobs_present,
        bytes_uploaded: pusher.bytes_uploaded,
        manifests_uploaded,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The store's record of layer `desc` of `repo`, converting it first if the store
/// lacks it.
fn layer_in_store(
    store: &Store,
    registry: &Registry,
    rt: &tokio::runtime::Runtime,
    repo: &ImageRef,
    desc: &Descriptor,
    work: &WorkDir,
    opts: &PublishOptions,
) -> Result<(LayerRecord, LayerSource), PublishError> {
    let source = match store.layer(&desc.digest)? {
        Some(_) => LayerSource::Reused,
        None => {
            let file = work.file("layer");
            rt.block_on(download(registry, repo, desc, &file.0))?;
            let report = convert_layer(store, &file.0, opts.chunk_bytes)?;
            tracing::info!(layer = %desc.digest, diff_id = %report.diff_id, chunks = report.chunks, "converted");
            LayerSource::Converted
        }
    };
    let record = store
        .layer(&desc.digest)?
        .ok_or_else(|| PublishError::Layer {
            layer: desc.digest.clone(),
            why: "not in the store after its conversion".to_string(),
        })?;
    if record.remote.is_some() {
        return Err(PublishError::Lazy {
            layer: desc.digest.clone(),
        });
    }
    Ok((record, source))
}

/// Streams layer blob `desc` into `path`, checking its length and digest.
async fn download(
    registry: &Registry,
    repo: &ImageRef,
    desc: &Descriptor,
    path: &Path,
) -> Result<(), PublishError> {
    let layer_err = |why: String| PublishError::Layer {
        layer: desc.digest.clone(),
        why,
    };
    let (announced, mut stream) = registry.blob_stream(repo, &desc.digest).await?;
    if let Some(n) = announced.filter(|&n| n != desc.size) {
        return Err(layer_err(format!(
            "the registry announces {n} bytes, the manifest says {}",
            desc.size
        )));
    }
    // Plain blocking writes: this runtime runs the publish alone.
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io_err(path))?);
    let mut hasher = OciHasher::new();
    let mut got = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        got += piece.len() as u64;
        if got > desc.size {
            return Err(layer_err(format!(
                "the registry sends more than the {} bytes the manifest says",
                desc.size
            )));
        }
        hasher.update(&piece);
        out.write_all(&piece).map_err(io_err(path))?;
    }
    out.flush().map_err(io_err(path))?;
    if got != desc.size {
        return Err(layer_err(format!(
            "the registry sent {got} bytes, the manifest says {}",
            desc.size
        )));
    }
    let actual = hasher.finish();
    if actual != desc.digest {
        return Err(layer_err(format!("the bytes sent hash to {actual}")));
    }
    Ok(())
}

/// Builds layer `desc`'s data blobs and metadata blob and pushes them.
#[allow(clippy::too_many_arguments)]
fn build_and_push(
    store: &Store,
    pusher: &mut Pusher<'_>,
    repo: &ImageRef,
    desc: &Descriptor,
    record: &LayerRecord,
    source: LayerSource,
    work: &WorkDir,
    opts: &PublishOptions,
) -> Result<(ArtifactLayer, LayerSummary), PublishError> {
    let layer_digest = desc.digest.as_str();
    let built = build_layer(store, layer_digest, record, work, opts.max_data_blob_bytes)?;
    let mut data = Vec::with_capacity(built.data.len());
    for d in &built.data {
        let uploaded = pusher.blob(repo, &d.digest, Upload::File(&d.file.0, d.bytes))?;
        data.push(BlobSummary {
            digest: d.digest.clone(),
            bytes: d.bytes,
            uploaded,
        });
    }
    let meta_digest = sha256(&built.meta);
    let meta_bytes = built.meta.len() as u64;
    let uploaded = pusher.blob(repo, &meta_digest, Upload::Bytes(built.meta))?;
    let descriptor = |digest: &str, size: u64| Descriptor {
        media_type: String::new(),
        digest: digest.to_string(),
        size,
        artifact_type: None,
        annotations: Default::default(),
    };
    let part = ArtifactLayer {
        layer_digest: layer_digest.to_string(),
        diff_id: record.diff_id.clone(),
        meta: descriptor(&meta_digest, meta_bytes),
        data: data
            .iter()
            .map(|d| descriptor(&d.digest, d.bytes))
            .collect(),
    };
    let summary = LayerSummary {
        digest: layer_digest.to_string(),
        diff_id: record.diff_id.clone(),
        source,
        chunk_bytes: record.chunk_bytes,
        chunks: built.chunks,
        meta: BlobSummary {
            digest: meta_digest,
            bytes: meta_bytes,
            uploaded,
        },
        data,
    };
    Ok((part, summary))
}

/// A layer's blobs, built: data blob files and the encoded metadata blob.
struct BuiltLayer {
    data: Vec<DataFile>,
    meta: Bytes,
    chunks: u64,
}

/// Copies the distinct chunks of `record`'s blobs into data blobs (see the module doc)
/// and encodes its metadata blob.
fn build_layer(
    store: &Store,
    layer_digest: &str,
    record: &LayerRecord,
    work: &WorkDir,
    max_data_blob_bytes: u64,
) -> Result<BuiltLayer, PublishError> {
    let layer_err = |why: String| PublishError::Layer {
        layer: layer_digest.to_string(),
        why,
    };
    let mut writer = DataWriter {
        work,
        max_bytes: max_data_blob_bytes,
        done: Vec::new(),
        open: None,
    };
    let mut placed: HashMap<ChunkDigest, Locator> = HashMap::new();
    let mut tables: Vec<(Vec<RawEntry>, Vec<Locator>)> = Vec::with_capacity(record.blobs.len());
    let mut meta_blobs = Vec::with_capacity(record.blobs.len());
    let mut rec = Vec::with_capacity(chunk::MAX_RECORD_BYTES);
    let mut scratch = Vec::with_capacity(MAX_CHUNK_BYTES);
    for id in &record.blobs {
        let entries = store
            .blob_entries(id)?
            .ok_or_else(|| layer_err(format!("its blob {id} is not in the store")))?;
        for (digest, raw_len) in distinct_chunks(&entries) {
            if placed.contains_key(&digest) {
                continue;
            }
            let loc = store.read_record(&digest, &mut rec, &mut scratch)?;
            if loc.raw_len != raw_len {
                return Err(layer_err(format!(
                    "chunk {digest} is {} bytes in the store, {raw_len} in blob {id}",
                    loc.raw_len
                )));
            }
            let (data, offset) = writer.append(&rec).map_err(|e| match e {
                Append::Io(e) => e,
                Append::TooMany => layer_err(format!(
                    "its chunks need more than {MAX_DATA_BLOBS} data blobs"
                )),
            })?;
            let len = rec.len() as u32;
            placed.insert(digest, Locator::Record { data, offset, len });
        }
        // Duplicates in a table (none today: a blob holds a chunk once) share a record.
        let locators = entries.iter().map(|e| placed[&e.digest]).collect();
        meta_blobs.push(MetaBlob {
            id: id.clone(),
            chunks: u32::try_from(entries.len())
                .map_err(|_| layer_err(format!("blob {id} has over 2^32 chunks")))?,
        });
        tables.push((entries, locators));
    }
    let data = writer.finish()?;
    let image_path = store.image_path(record.id_hex());
    let image = fs::read(&image_path).map_err(io_err(&image_path))?;
    if image.len() as u64 != record.image_bytes {
        return Err(layer_err(format!(
            "{} is {} bytes, its record says {}",
            image_path.display(),
            image.len(),
            record.image_bytes
        )));
    }
    let meta = LayerMeta {
        header: MetaHeader {
            version: FORMAT_VERSION,
            diff_id: record.diff_id.clone(),
            layer_digest: layer_digest.to_string(),
            chunk_bytes: record.chunk_bytes,
            image_bytes: image.len() as u64,
            files: record.files,
            chunks: record.chunks,
            logical_bytes: record.logical_bytes,
            data: data.iter().map(|d| d.digest.clone()).collect(),
            blobs: meta_blobs,
        },
        image,
        blobs: tables,
    };
    let encoded = meta.encode();
    // What a reader will check, checked before anything leaves the node.
    LayerMeta::decode(&encoded).map_err(|e| layer_err(format!("its metadata blob: {e}")))?;
    Ok(BuiltLayer {
        data,
        meta: Bytes::from(encoded),
        chunks: placed.len() as u64,
    })
}

/// A finished data blob file.
struct DataFile {
    file: TempPath,
    digest: String,
    bytes: u64,
}

/// A data blob being written.
struct OpenData {
    file: TempPath,
    out: BufWriter<File>,
    hasher: OciHasher,
    bytes: u64,
}

/// Appends records to data blob files, starting a new one when the next record would
/// take the current one past `max_bytes`.
struct DataWriter<'a> {
    work: &'a WorkDir,
    max_bytes: u64,
    done: Vec<DataFile>,
    open: Option<OpenData>,
}

enum Append {
    Io(PublishError),
    TooMany,
}

impl DataWriter<'_> {
    /// Appends `record`; returns the data blob's index and the record's offset in it.
    fn append(&mut self, record: &[u8]) -> Result<(u16, u64), Append> {
        let len = record.len() as u64;
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.bytes + len > self.max_bytes)
        {
            self.close().map_err(Append::Io)?;
        }
        if self.open.is_none() {
            if self.done.len() >= MAX_DATA_BLOBS {
                return Err(Append::TooMany);
            }
            let file = self.work.file("data");
            let f = File::create(&file.0).map_err(|e| Append::Io(io_err(&file.0)(e)))?;
            self.open = Some(OpenData {
                file,
                out: BufWriter::with_capacity(1 << 20, f),
                hasher: OciHasher::new(),
                bytes: 0,
            });
        }
        let index = self.done.len() as u16;
        let o = self.open.as_mut().expect("opened above");
        o.out
            .write_all(record)
            .map_err(|e| Append::Io(io_err(&o.file.0)(e)))?;
        o.hasher.update(record);
        let offset = o.bytes;
        o.bytes += len;
        Ok((index, offset))
    }

    fn close(&mut self) -> Result<(), PublishError> {
        if let Some(mut o) = self.open.take() {
            o.out.flush().map_err(io_err(&o.file.0))?;
            self.done.push(DataFile {
                digest: o.hasher.finish(),
                file: o.file,
                bytes: o.bytes,
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<DataFile>, PublishError> {
        self.close()?;
        Ok(self.done)
    }
}

/// What to upload.
enum Upload<'a> {
    Bytes(Bytes),
    /// A file and its length.
    File(&'a Path, u64),
}

/// Pushes blobs and counts what it uploaded.
struct Pusher<'a> {
    registry: &'a Registry,
    rt: &'a tokio::runtime::Runtime,
    blobs_uploaded: u64,
    blobs_present: u64,
    bytes_uploaded: u64,
}

impl Pusher<'_> {
    /// Uploads a blob unless the registry has it (HEAD first); returns whether it did.
    fn blob(
        &mut self,
        repo: &ImageRef,
        digest: &str,
        what: Upload<'_>,
    ) -> Result<bool, PublishError> {
        let (uploaded, len) = match what {
            Upload::Bytes(b) => {
                let len = b.len() as u64;
                (
                    self.rt.block_on(self.registry.push_blob(repo, digest, b))?,
                    len,
                )
            }
            Upload::File(path, len) => (
                self.rt
                    .block_on(self.registry.push_blob_file(repo, digest, path))?,
                len,
            ),
        };
        if uploaded {
            self.blobs_uploaded += 1;
            self.bytes_uploaded += len;
        } else {
            self.blobs_present += 1;
        }
        Ok(uploaded)
    }
}

/// The publish's folder under the store root.
struct WorkDir {
    dir: PathBuf,
    next: std::cell::Cell<u64>,
}

impl WorkDir {
    /// Creates the folder and removes what an earlier publish left in it.
    fn open(store: &Store) -> Result<WorkDir, PublishError> {
        let dir = store.root().join(WORK_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Bounded: a crashed run leaves at most a layer file and a few data blobs.
        for entry in fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .flatten()
            .take(100_000)
        {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        Ok(WorkDir {
            dir,
            next: std::cell::Cell::new(0),
        })
    }

    /// A new file name, removed when the returned guard drops.
    fn file(&self, kind: &str) -> TempPath {
        let n = self.next.get();
        self.next.set(n + 1);
        TempPath(self.dir.join(format!("{kind}-{n}.tmp")))
    }
}

/// A file removed on drop.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn sha256(b: &[u8]) -> String {
    let mut h = OciHasher::new();
    h.update(b);
    h.finish()
}

/// `dedupd publish` arguments.
#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// The image: `registry/repository[:tag][@digest]` (a manifest or an index).
    pub image: String,
    /// Store root (no daemon may have it open).
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Speak plain HTTP to a registry that has no hosts.toml (like `ctr --plain-http`).
    #[arg(long)]
    pub plain_http: bool,
    /// containerd's host configuration directory (`<dir>/<host>/hosts.toml`).
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    pub hosts_dir: PathBuf,
    /// docker's config.json with credentials [default: $DOCKER_CONFIG/config.json or
    /// ~/.docker/config.json].
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// Chunk size for layers converted now: a power of two from 4096 to 1048576.
    #[arg(long, default_value_t = u64::from(DEFAULT_CHUNK_BYTES))]
    pub chunk_size: u64,
    /// Also publish the access traces that this store root keeps for the image's blobs
    /// (a node that pulled the image lazily and started it; its daemon stopped).
    /// Repeatable; the first root with a trace of a blob wins, `--root` before them.
    #[arg(long)]
    pub traces_from: Vec<PathBuf>,
}

/// Runs `dedupd publish`: prints the [`Summary`] as JSON.
pub fn publish_cmd(args: &PublishArgs) -> anyhow::Result<()> {
    let chunk_bytes = check_chunk_bytes(args.chunk_size)?;
    let image = ImageRef::parse(&args.image)?;
    let store = Store::open(&args.root)?;
    let registry = Registry::new(RegistryOptions {
        hosts_dir: args.hosts_dir.clone(),
        plain_http: args.plain_http,
        docker_config: Some(
            args.docker_config
                .clone()
                .unwrap_or_else(auth::default_docker_config),
        ),
        request_timeout: PUSH_ANSWER_TIMEOUT,
        ..RegistryOptions::default()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let opts = PublishOptions {
        chunk_bytes,
        traces_from: args.traces_from.clone(),
        ..PublishOptions::default()
    };
    let summary = publish(&store, &registry, &rt, &image, &opts)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RemoteBlob, RemoteLayer, RemoteLayerCommit, RemoteSource};

    /// Pseudo-random bytes (xorshift), incompressible enough for lz4 to store some raw.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A plain tar of `files` at `path`.
    fn tar_file(path: &Path, files: &[(&str, Vec<u8>)]) {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        fs::write(path, b.into_inner().unwrap()).unwrap();
    }

    #[test]
    fn data_blobs_hold_each_chunk_once_in_table_order_and_split_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let big = noise(1, 300_000);
        let zeros = vec![0u8; 100_000];
        let layer = dir.path().join("layer.tar");
        tar_file(
            &layer,
            &[
                ("a/big", big.clone()),
                ("a/zeros", zeros),
                ("b/copy-of-big", big),
                ("b/small", b"hello".to_vec()),
            ],
        );
        let report = convert_layer(&store, &layer, 65536).unwrap();
        let record = store.layer(&report.digest).unwrap().unwrap();
        let work = WorkDir::open(&store).unwrap();
        // Two full records (65,584 bytes each, stored raw) fit under 140,000.
        let max = 140_000;
        let built = build_layer(&store, &report.digest, &record, &work, max).unwrap();
        // big: 5 chunks; zeros: 2 (64 KiB of zeros, then 34,464 zeros); small: 1.
        assert_eq!(built.chunks, 8);
        assert!(built.data.len() >= 3, "{} data blobs", built.data.len());
        let meta = LayerMeta::decode(&built.meta).unwrap();
        assert_eq!(meta.header.layer_digest, report.digest);
        assert_eq!(meta.header.diff_id, record.diff_id);
        assert_eq!(
            meta.image,
            fs::read(store.image_path(record.id_hex())).unwrap()
        );
        let files: Vec<Vec<u8>> = built
            .data
            .iter()
            .map(|d| fs::read(&d.file.0).unwrap())
            .collect();
        for (d, bytes) in built.data.iter().zip(&files) {
            assert_eq!(sha256(bytes), d.digest);
            assert_eq!(bytes.len() as u64, d.bytes);
            assert!(d.bytes <= max);
        }
        assert_eq!(
            meta.header.data,
            built
                .data
                .iter()
                .map(|d| d.digest.clone())
                .collect::<Vec<_>>()
        );
        // In table order, each record starts where the one before ended (or a new
        // blob starts at 0), and every record verifies against the table's digest.
        let (entries, locators) = &meta.blobs[0];
        let mut end = (0u16, 0u64);
        let mut out = vec![0u8; MAX_CHUNK_BYTES];
        for (e, l) in entries.iter().zip(locators) {
            let Locator::Record { data, offset, len } = *l;
            assert!(
                (data, offset) == end || (data == end.0 + 1 && offset == 0),
                "{l:?} after {end:?}"
            );
            end = (data, offset + u64::from(len));
            let rec = &files[usize::from(data)][offset as usize..][..len as usize];
            chunk::verify_foreign_record(rec, e.raw_len, &e.digest, &mut out).unwrap();
        }
        let total: u64 = built.data.iter().map(|d| d.bytes).sum();
        assert_eq!(
            end.1
                + built.data[..built.data.len() - 1]
                    .iter()
                    .map(|d| d.bytes)
                    .sum::<u64>(),
            total
        );
        // Built again: the same bytes.
        let again = build_layer(&store, &report.digest, &record, &work, max).unwrap();
        assert_eq!(again.meta, built.meta);
        let digests = |b: &BuiltLayer| b.data.iter().map(|d| d.digest.clone()).collect::<Vec<_>>();
        assert_eq!(digests(&again), digests(&built));
        // The files go with their guards.
        let paths: Vec<PathBuf> = built.data.iter().map(|d| d.file.0.clone()).collect();
        drop(built);
        assert!(paths.iter().all(|p| !p.exists()));
    }

    #[test]
    fn lazily_pulled_layers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tmp = dir.path().join("image.tmp");
        let mut image = vec![0u8; 4096];
        image[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        fs::write(&tmp, &image).unwrap();
        let entries = vec![RawEntry {
            digest: ChunkDigest::of(b"x"),
            raw_len: 1,
        }];
        let id = crate::store::blob::blob_id(&crate::store::blob::encode_table(&entries));
        let source = RemoteSource {
            registry: "127.0.0.1:1".into(),
            repository: "r".into(),
        };
        let layer = format!("sha256:{}", "b".repeat(64));
        store
            .commit_remote_layer(RemoteLayerCommit {
                record: LayerRecord {
                    diff_id: format!("sha256:{}", "a".repeat(64)),
                    digests: vec![layer.clone()],
                    blobs: vec![id.clone()],
                    chunk_bytes: 65536,
                    image_bytes: 4096,
                    files: 1,
                    chunks: 1,
                    new_chunks: 0,
                    logical_bytes: 1,
                    stored_bytes: 0,
                    remote: Some(RemoteLayer {
                        source: source.clone(),
                        artifact: format!("sha256:{}", "c".repeat(64)),
                    }),
                },
                image_tmp: &tmp,
                blobs: vec![(
                    id,
                    entries,
                    RemoteBlob {
                        source,
                        data_blobs: vec![format!("sha256:{}", "d".repeat(64))],
                        locators: vec![Locator::Record {
                            data: 0,
                            offset: 0,
                            len: 49,
                        }],
                    },
                )],
            })
            .unwrap();
        // Never asked: the store answers first.
        let registry = Registry::new(RegistryOptions {
            docker_config: None,
            ..RegistryOptions::default()
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let desc = Descriptor {
            media_type: String::new(),
            digest: layer.clone(),
            size: 1,
            artifact_type: None,
            annotations: Default::default(),
        };
        let work = WorkDir::open(&store).unwrap();
        let repo = ImageRef::parse("127.0.0.1:1/r:t").unwrap();
        let e = layer_in_store(
            &store,
            &registry,
            &rt,
            &repo,
            &desc,
            &work,
            &PublishOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, PublishError::Lazy { .. }), "{e}");
        assert!(e.to_string().contains(&layer), "{e}");
    }
}
