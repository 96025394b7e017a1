//! Lazy layers: finding a layer's published artifact and registering the layer in the
//! store from its metadata blob alone. The snapshotter calls this on a containerd
//! Prepare that names an image layer ([`LazyPuller::register_layer`]); the data follows
//! on demand through the [`super::Fetcher`].
//!
//! Discovery: the image manifest's referrers (the OCI 1.1 API, else the referrers tag
//! `sha256-<hex>`), filtered to [`ARTIFACT_TYPE`]; the newest-listed match wins. The
//! artifact manifest is cached per image manifest, as is the absence of one (for
//! [`NEGATIVE_TTL`], so that the layers of an unpublished image ask once, and an image
//! published later is found soon after).

use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::artifact::{Artifact, ArtifactLayer, LayerMeta, ARTIFACT_TYPE, MAX_META_BYTES};
use super::fetch::{Fetcher, RangeError, RangeFuture, RangeSource};
use crate::registry::{ImageRef, Registry, RegistryError, MAX_MANIFEST_BYTES};
use crate::store::{
    LayerRecord, RemoteBlob, RemoteLayer, RemoteLayerCommit, RemoteSource, Store, StoreError,
};

/// How long "this image has no artifact" is believed.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Why a layer could not be pulled lazily (the caller falls back to a full pull).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry failed (boxed: a registry error is large, and rare).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// The artifact or its metadata is malformed.
    #[error(transparent)]
    Artifact(#[from] super::artifact::ArtifactError),
    /// The artifact disagrees with the image (diff_id, chain id).
    #[error("{0}")]
    Mismatch(String),
    /// Registering the layer failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Resolving the image (manifest, config) failed.
    #[error(transparent)]
    Image(#[from] super::image::ImageError),
    /// Converting the streamed layer failed (digest or diff_id mismatch, bad tar, ...);
    /// nothing it stored stays.
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
    /// The layer is not in the image's manifest.
    #[error("{image}: no layer {layer} in the manifest")]
    NoSuchLayer {
        /// The image (manifest digest).
        image: String,
        /// The layer's digest.
        layer: String,
    },
    /// Writing the layer's image failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<RegistryError> for PullError {
    fn from(e: RegistryError) -> Self {
        PullError::Registry(Box::new(e))
    }
}

/// A found artifact: its manifest digest and contents.
#[derive(Clone, Debug)]
pub struct Found {
    /// Digest of the artifact manifest.
    pub digest: String,
    /// The artifact.
    pub artifact: Artifact,
}

/// Finds artifacts and registers lazy layers. Blocking calls (it runs them on the
/// fetcher's runtime): call from a blocking context, never from async code.
pub struct LazyPuller {
    registry: Registry,
    store: Arc<Store>,
    runtime: tokio::runtime::Handle,
    found: Mutex<HashMap<String, Discovered>>,
    fetcher: Option<Arc<Fetcher>>,
    prefetch: PrefetchMode,
    stream: bool,
}

/// When an image's artifact was looked for, and what was found.
type Discovered = (Instant, Option<Arc<Found>>);

/// What the prefetcher fetches after a layer is mounted lazily.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchMode {
    /// Nothing: every chunk is fetched when read.
    None,
    /// The chunks an earlier start read (its access trace), in that order.
    Trace,
    /// The traced chunks first, then the rest in file order: the node ends up with the
    /// whole image.
    #[default]
    All,
}

/// The published form of access traces: per blob id, chunk indexes in first-read
/// order ([`super::artifact::TRACE_MEDIA_TYPE`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traces {
    /// Format version (1).
    pub version: u32,
    /// Blob id -> chunk indexes.
    pub blobs: std::collections::BTreeMap<String, Vec<u32>>,
}

/// Largest published trace accepted.
const MAX_TRACE_BLOB_BYTES: u64 = 64 << 20;

impl LazyPuller {
    /// A puller over `registry` that runs requests on `runtime` and prefetches with
    /// `fetcher` in `prefetch` mode.
    pub fn new(
        registry: Registry,
        store: Arc<Store>,
        runtime: tokio::runtime::Handle,
        fetcher: Option<Arc<Fetcher>>,
        prefetch: PrefetchMode,
    ) -> Self {
        LazyPuller {
            registry,
            store,
            runtime,
            found: Mutex::new(HashMap::new()),
            fetcher,
            prefetch,
            stream: true,
        }
    }

    /// Whether layers without an artifact are streamed into the converter
    /// ([`Self::stream_layer`]); on by default.
    pub fn with_stream(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }

    /// See [`Self::with_stream`].
    pub fn streams(&self) -> bool {
        self.stream
    }

    /// Streams layer `layer_digest` of image `manifest` (a manifest digest reference)
    /// from the registry straight into the converter, stored under `id_hex` (the
    /// snapshotter's layer id): no compressed copy and no unpacked tree on disk. Both
    /// digests are checked at the end of the stream, before the commit (the blob's
    /// against the manifest, the tar's against the config's diff_id, which
    /// `check_diff_id` also checks against the chain id containerd expects); on any
    /// error nothing the stream stored stays. Blocking: the download runs on the
    /// puller's runtime, the conversion on this thread and the parser's.
    pub fn stream_layer(
        &self,
        manifest: &ImageRef,
        layer_digest: &str,
        id_hex: &str,
        check_diff_id: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<LayerRecord, PullError> {
        let resolved = self
            .runtime
            .block_on(super::image::resolve(&self.registry, manifest))?;
        let diff_id = resolved
            .manifest
            .layers
            .iter()
            .position(|l| l.digest == layer_digest)
            .and_then(|i| resolved.diff_ids.get(i))
            .ok_or_else(|| PullError::NoSuchLayer {
                image: manifest.to_string(),
                layer: layer_digest.to_string(),
            })?
            .clone();
        check_diff_id(&diff_id).map_err(PullError::Mismatch)?;
        let (_, stream) = self
            .runtime
            .block_on(self.registry.blob_stream(manifest, layer_digest))?;
        let reader = StreamReader::spawn(&self.runtime, stream);
        let key = format!("sha256:{id_hex}");
        let name = format!("{manifest} layer {layer_digest}");
        let record = crate::convert::convert_reader(
            &self.store,
            &name,
            Box::new(reader),
            crate::store::DEFAULT_CHUNK_BYTES,
            crate::convert::Expected {
                key: &key,
                digest: layer_digest,
                diff_id: &diff_id,
            },
        )?;
        Ok(record)
    }

    /// Queues the chunks of lazily pulled layer `record` that the node lacks for
    /// background fetching, as the prefetch mode says: the access trace first (the
    /// node's own, or the one published with the artifact), then (mode `all`) the rest
    /// in file order.
    pub fn prefetch_layer(&self, record: &LayerRecord) {
        let Some(fetcher) = &self.fetcher else { return };
        if self.prefetch == PrefetchMode::None || record.remote.is_none() {
            return;
        }
        for id in &record.blobs {
            let table = match self.store.blob_table(id) {
                Ok(Some(t)) if t.remote().is_some() => t,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(blob = %id, "prefetch: loading the blob table: {e}");
                    continue;
                }
            };
            let n = table.entries().len() as u32;
            let mut seen = vec![false; n as usize];
            let mut order: Vec<u32> = Vec::new();
            if let Ok(Some(trace)) = self.store.trace(id) {
                for i in trace {
                    if i < n && !std::mem::replace(&mut seen[i as usize], true) {
                        order.push(i);
                    }
                }
            }
            let traced = order.len();
            if self.prefetch == PrefetchMode::All {
                order.extend((0..n).filter(|&i| !seen[i as usize]));
            }
            tracing::info!(blob = %id, traced, chunks = order.len(), "prefetch queued");
            fetcher.prefetch(Arc::new(table), order);
        }
    }

    /// Keeps the access traces published with `found` for blobs of this node that have
    /// none yet.
    fn import_traces(&self, repo: &ImageRef, found: &Found) {
        let Some(d) = &found.artifact.trace else {
            return;
        };
        if d.size > MAX_TRACE_BLOB_BYTES {
            return;
        }
        let traces = self
            .runtime
            .block_on(self.registry.get_blob(repo, &d.digest, d.size))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Traces>(&b).map_err(|e| e.to_string()));
        match traces {
            Ok(t) => {
                for (blob, order) in t.blobs {
                    if matches!(self.store.trace(&blob), Ok(None)) {
                        if let Err(e) = self.store.put_trace(&blob, &order) {
                            tracing::warn!(blob = %blob, "keeping a published trace: {e}");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(trace = %d.digest, "the published access trace: {e}"),
        }
    }

    /// The registry client.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The dedupd artifact of image manifest `manifest` (a repository with the
    /// manifest's digest), if one is published.
    pub fn artifact(&self, manifest: &ImageRef) -> Result<Option<Arc<Found>>, PullError> {
        let key = manifest.to_string();
        {
            let found = self.found.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, f)) = found.get(&key) {
                if f.is_some() || at.elapsed() < NEGATIVE_TTL {
                    return Ok(f.clone());
                }
            }
        }
        let f = self
            .runtime
            .block_on(self.discover(manifest))?
            .map(Arc::new);
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        if found.len() > 4096 {
            found.clear();
        }
        found.insert(key, (Instant::now(), f.clone()));
        Ok(f)
    }

    async fn discover(&self, manifest: &ImageRef) -> Result<Option<Found>, PullError> {
        let refs = self
            .registry
            .referrers(manifest, Some(ARTIFACT_TYPE))
            .await?;
        let Some(d) = refs
            .iter()
            .rev()
            .find(|d| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
        else {
            return Ok(None);
        };
        if d.size > MAX_MANIFEST_BYTES as u64 {
            return Err(PullError::Mismatch(format!(
                "artifact manifest {} is {} bytes",
                d.digest, d.size
            )));
        }
        let m = self
            .registry
            .get_manifest(&manifest.with_digest(&d.digest))
            .await?;
        let artifact = Artifact::parse(&m.bytes)?;
        let want = manifest.digest.as_deref().unwrap_or_default();
        if artifact.subject != want {
            return Err(PullError::Mismatch(format!(
                "artifact {} serves {}, not {want}",
                d.digest, artifact.subject
            )));
        }
        tracing::info!(image = %manifest, artifact = %m.digest, layers = artifact.layers.len(), "found a dedupd artifact");
        Ok(Some(Found {
            digest: m.digest,
            artifact,
        }))
    }

    /// Fetches and decodes the metadata blob of `layer`.
    pub fn fetch_meta(
        &self,
        repo: &ImageRef,
        layer: &ArtifactLayer,
    ) -> Result<LayerMeta, PullError> {
        if layer.meta.size > MAX_META_BYTES {
            return Err(PullError::Mismatch(format!(
                "metadata blob {} is {} bytes",
                layer.meta.digest, layer.meta.size
            )));
        }
        let bytes = self.runtime.block_on(self.registry.get_blob(
            repo,
            &layer.meta.digest,
            layer.meta.size,
        ))?;
        let meta = LayerMeta::decode(&bytes)?;
        if meta.header.layer_digest != layer.layer_digest || meta.header.diff_id != layer.diff_id {
            return Err(PullError::Mismatch(format!(
                "metadata blob {} describes layer {} ({}), the manifest says {} ({})",
                layer.meta.digest,
                meta.header.layer_digest,
                meta.header.diff_id,
                layer.layer_digest,
                layer.diff_id
            )));
        }
        let data: Vec<&str> = layer.data.iter().map(|d| d.digest.as_str()).collect();
        if meta.header.data != data {
            return Err(PullError::Mismatch(format!(
                "metadata blob {} names other data blobs than the manifest",
                layer.meta.digest
            )));
        }
        Ok(meta)
    }

    /// Registers layer `layer_digest` of image manifest `manifest` in the store under
    /// layer id `id_hex` (the snapshotter's chain id), from its artifact's metadata
    /// alone. `Ok(None)`: the image has no artifact, or it does not cover the layer.
    /// `check_diff_id` sees the metadata's diff_id before anything is stored (the caller
    /// checks it against the chain id containerd computed from the image config).
    pub fn register_layer(
        &self,
        manifest: &ImageRef,
        layer_digest: &str,
        id_hex: &str,
        check_diff_id: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<Option<LayerRecord>, PullError> {
        let Some(found) = self.artifact(manifest)? else {
            return Ok(None);
        };
        let Some(layer) = found.artifact.layer(layer_digest) else {
            return Ok(None);
        };
        let meta = self.fetch_meta(manifest, layer)?;
        check_diff_id(&meta.header.diff_id).map_err(PullError::Mismatch)?;
        let source = RemoteSource {
            registry: manifest.registry.clone(),
            repository: manifest.repository.clone(),
        };
        let tmp = self
            .store
            .root()
            .join("layers")
            .join(format!(".lazy-{id_hex}.tmp"));
        fs::write(&tmp, &meta.image).map_err(|source| PullError::Io {
            path: tmp.clone(),
            source,
        })?;
        let h = &meta.header;
        let record = LayerRecord {
            diff_id: format!("sha256:{id_hex}"),
            digests: vec![layer_digest.to_string()],
            blobs: h.blobs.iter().map(|b| b.id.clone()).collect(),
            chunk_bytes: h.chunk_bytes,
            image_bytes: h.image_bytes,
            files: h.files,
            chunks: h.chunks,
            new_chunks: 0,
            logical_bytes: h.logical_bytes,
            stored_bytes: 0,
            remote: Some(RemoteLayer {
                source: source.clone(),
                artifact: found.digest.clone(),
            }),
        };
        let blobs = h
            .blobs
            .iter()
            .zip(meta.blobs)
            .map(|(b, (entries, locators))| {
                let remote = RemoteBlob {
                    source: source.clone(),
                    data_blobs: h.data.clone(),
                    locators,
                };
                (b.id.clone(), entries, remote)
            })
            .collect();
        let r = self.store.commit_remote_layer(RemoteLayerCommit {
            record,
            image_tmp: &tmp,
            blobs,
        });
        let _ = fs::remove_file(&tmp);
        let record = r?;
        self.import_traces(manifest, &found);
        Ok(Some(record))
    }
}

/// The registry as the fetcher's source of data-blob ranges.
impl RangeSource for Registry {
    fn get_range(&self, source: &RemoteSource, blob: &str, offset: u64, len: u64) -> RangeFuture {
        let registry = self.clone();
        let repo = ImageRef {
            registry: source.registry.clone(),
            repository: source.repository.clone(),
            tag: None,
            digest: None,
        };
        let blob = blob.to_string();
        Box::pin(async move {
            registry
                .get_blob_range(&repo, &blob, offset, len)
                .await
                .map_err(|e| RangeError {
                    retryable: e.is_retryable(),
                    message: e.to_string(),
                })
        })
    }
}

/// Blocks of a registry stream kept in flight between the download and the converter:
/// enough to keep both busy, little memory (a body's frames are small).
const STREAM_QUEUE: usize = 64;

/// A blocking reader over a registry blob stream: a task on the runtime forwards the
/// body's frames through a bounded queue (the download runs ahead of the converter by at
/// most [`STREAM_QUEUE`] frames); a stream error, including a digest mismatch at the
/// end, becomes the reader's error. Dropping the reader ends the download.
struct StreamReader {
    rx: std::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    cur: bytes::Bytes,
}

impl StreamReader {
    fn spawn(runtime: &tokio::runtime::Handle, mut stream: crate::registry::BlobStream) -> Self {
        use tokio_stream::StreamExt as _;
        let (tx, rx) = std::sync::mpsc::sync_channel(STREAM_QUEUE);
        runtime.spawn_blocking(move || {
            let handle = tokio::runtime::Handle::current();
            // Bounded by the stream's end (or error), or by the reader going away.
            while let Some(item) = handle.block_on(stream.next()) {
                let item = item.map_err(|e| format!("{e:#}"));
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        StreamReader {
            rx,
            cur: bytes::Bytes::new(),
        }
    }
}

impl std::io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(Ok(b)) => self.cur = b,
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                // The download ended: the sender is gone after the last frame.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}
