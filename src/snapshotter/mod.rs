//! The containerd snapshots service (`containerd.services.snapshots.v1`), snapshotter
//! name `dedup`.
//!
//! Layout under the root:
//!
//! ```text
//! snapshots.redb          snapshot metadata (its own redb file, see [`meta`])
//! snapshots/<id>/fs       upper directory of an active snapshot (or an unpacking layer)
//! snapshots/<id>/work     overlay work directory
//! m/<slot>                a converted layer's EROFS mount (see [`mounter`]); the slot is
//!                         a small number per layer, kept in the metadata
//! ```
//!
//! A container's overlay names every layer below it in one `lowerdir=` option, and the
//! whole option string of mount(2) must fit a page. Layer mountpoints are therefore
//! short and share one parent: 128 layers under the default root fit a plain mount(2)
//! (worst case in [`OVERLAY_WORST_DATA_BYTES`]), and under a longer root containerd's
//! mount code still fits them by passing the lowerdirs relative to `m/`. Daemons before
//! slots mounted layers at `mnt/<layer hex>` (65 bytes a layer even relative: about 60
//! layers at most); those mounts are moved to `m/<slot>` at start.
//!
//! Committing an active snapshot converts its directory into an EROFS image plus chunks
//! in the store (once per layer id), mounts the layer, and removes the unpacked files: a
//! committed snapshot is its layer mount. Layer ids come from containerd's
//! `containerd.io/snapshot.ref` label (the chain id), so the same layer is never
//! converted twice.
//!
//! Running it inside `dedupd run` (one process with the data plane; the store is opened
//! once and shared):
//!
//! ```text
//! let store = Arc::new(Store::open(&config.root)?);
//! let mounter: Arc<dyn LayerMounter> = match front_end {
//!     Local => Arc::new(LocalMounter::new(store.clone())?),
//!     Cachefiles => Arc::new(FscacheMounter::new(&config.root, domain, refresh)?),
//!     ...
//! };
//! let snap = Arc::new(Snapshotter::open(&config.root, store.clone(), mounter)?);
//! let control = ControlThread::spawn(config.socket.clone(), snap)?;
//! ... // data plane runs; on SIGTERM:
//! control.stop()?;
//! ```

pub mod convert;
pub mod filter;
mod idle;
pub mod meta;
mod service;
mod trash;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::Digest;

pub use self::idle::Released;
pub use self::meta::{Kind, Snap};
pub use self::service::Service;
use crate::frontend;
pub use crate::frontend::cachefiles::FscacheMounter;
pub use crate::frontend::local::LocalMounter;
pub use crate::frontend::{LayerMounter, RegistryRefresh};
use crate::store::Store;

/// The generated protobuf code (moved to [`crate::proto`]; kept here for its old paths).
pub use crate::proto;

/// The label containerd's unpacker puts on the snapshot it prepares for a layer: the
/// layer's chain id.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Labels the CRI plugin (and `dedupd pull`) add to a layer's Prepare: the image
/// reference, its manifest digest and the layer's digest. With them a layer can be
/// pulled lazily from its published artifact.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// See [`LABEL_CRI_IMAGE_REF`].
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// See [`LABEL_CRI_IMAGE_REF`].
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// Layers one container's overlay can stack and still mount with a plain mount(2) under
/// the default root: Docker's limit (127) plus the container's own upper dir to spare.
pub const MAX_PLAIN_MOUNT_LAYERS: usize = 128;

/// mount(2) copies at most one page of options (the string and its NUL).
const MOUNT_DATA_MAX_BYTES: usize = 4096;

/// containerd 1.6 (`mount/mount_linux.go`) rewrites an overlay's lowerdirs relative to
/// their common parent when its options, summed without separators, reach a page less
/// 512 bytes. Below this, containerd passes our options to mount(2) as they are.
const CONTAINERD_COMPACT_BYTES: usize = MOUNT_DATA_MAX_BYTES - 512;

/// Decimal digits of `n`.
const fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Length of the option string [`overlay_options`] builds for an active snapshot (work
/// and upper dir) over `layers` lowers, with root `root_bytes` long, snapshot id
/// `id_digits` long and every slot `slot_digits` long.
const fn overlay_data_bytes(
    root_bytes: usize,
    layers: usize,
    id_digits: usize,
    slot_digits: usize,
) -> usize {
    let index = "index=off".len();
    let snap_dir = root_bytes + "/snapshots/".len() + id_digits;
    let work = "workdir=".len() + snap_dir + "/work".len();
    let upper = "upperdir=".len() + snap_dir + "/fs".len();
    let lower_dir = root_bytes + 1 + frontend::MOUNT_DIR.len() + 1 + slot_digits;
    let lower = "lowerdir=".len() + layers * lower_dir + (layers - 1);
    // Four options, three commas.
    index + work + upper + lower + 3
}

/// The longest option string of a 128-layer container overlay under the default root:
/// the largest snapshot id (`u64::MAX`, 20 digits) and every slot the largest
/// ([`meta::MAX_LAYER_SLOT`], 5 digits). 3209 bytes: it fits a page (4096 with the NUL)
/// and stays under containerd's compaction threshold, so the mounts need no rewriting.
/// Realistic ids and slots (7 and 3 digits) make it about 2900. The old layout
/// (`mnt/<64 hex>`) needed 11,017 bytes, and 8,457 even as containerd rewrites it.
pub const OVERLAY_WORST_DATA_BYTES: usize = overlay_data_bytes(
    crate::config::DEFAULT_ROOT.len(),
    MAX_PLAIN_MOUNT_LAYERS,
    digits(u64::MAX),
    digits(meta::MAX_LAYER_SLOT),
);
const _: () = assert!(OVERLAY_WORST_DATA_BYTES < MOUNT_DATA_MAX_BYTES);
const _: () = assert!(OVERLAY_WORST_DATA_BYTES - 3 < CONTAINERD_COMPACT_BYTES);

/// Errors of the snapshotter, one per gRPC code containerd's snapshotters use.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// A snapshot (or parent) does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot by that name exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The daemon failed (I/O, database, conversion, mount).
    #[error("{0}")]
    Internal(String),
}

impl From<SnapError> for tonic::Status {
    fn from(e: SnapError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            SnapError::NotFound(_) => tonic::Status::not_found(msg),
            SnapError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            SnapError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> SnapError {
    SnapError::Internal(e.to_string())
}

fn io_internal(path: &Path) -> impl FnOnce(io::Error) -> SnapError + '_ {
    move |e| SnapError::Internal(format!("{}: {e}", path.display()))
}

/// One mount of a snapshot's mount list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    /// Filesystem type (`bind`, `overlay`).
    pub kind: String,
    /// Source.
    pub source: String,
    /// Options.
    pub options: Vec<String>,
}

/// What Cleanup removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Snapshot directories with no snapshot.
    pub dirs: u64,
    /// Layer mounts no snapshot references.
    pub mounts: u64,
    /// Owned layers no snapshot references.
    pub layers: u64,
    /// Blob files of blobs the store no longer has.
    pub blob_files: u64,
    /// Pack bytes unlinked by the compaction that follows.
    pub pack_bytes_freed: u64,
}

/// What the snapshotter holds, for `dedupd status` and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// Front end mounting layers.
    pub front_end: String,
    /// Active snapshots (containers, layers being unpacked).
    pub active: u64,
    /// Views.
    pub views: u64,
    /// Committed snapshots.
    pub committed: u64,
    /// Converted layers the committed snapshots use, with what the store knows of them.
    pub layers: Vec<LayerStatus>,
}

/// One converted layer in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LayerStatus {
    /// Layer id (chain id hex): names its image and its fsid.
    pub id: String,
    /// Committed snapshots that use it.
    pub snapshots: u64,
    /// Converted: the store has its record and image.
    pub converted: bool,
    /// Its EROFS mount is in place.
    pub mounted: bool,
    /// Entries, chunk references and data bytes, from the store.
    pub files: u64,
    /// See `files`.
    pub chunks: u64,
    /// See `files`.
    pub logical_bytes: u64,
    /// Pulled lazily: its chunks come from a registry when first read.
    #[serde(default)]
    pub remote: bool,
    /// Bytes of its data blobs (the sum of their chunks; for a converted layer,
    /// `logical_bytes`).
    #[serde(default)]
    pub data_bytes: u64,
    /// Of `data_bytes`, those whose chunks are in the local store (all of a converted
    /// layer; for a lazily pulled one, what was fetched or shared with other layers).
    #[serde(default)]
    pub local_bytes: u64,
}

/// How long the local bytes of a lazily pulled layer are reused before they are counted
/// again (a lookup per chunk).
pub const LOCAL_BYTES_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Conversions at Commit: counts and a latency histogram (microseconds).
#[derive(Debug, Default)]
pub struct Conversions {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    latency: crate::serve::stats::AtomicHistogram,
}

/// A copy of [`Conversions`].
#[derive(Clone, Debug, Default)]
pub struct ConversionStats {
    /// Layers converted.
    pub ok: u64,
    /// Conversions that failed.
    pub failed: u64,
    /// Their durations, microseconds.
    pub latency: crate::serve::stats::LatencyHistogram,
}

impl Conversions {
    fn record(&self, took: std::time::Duration, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if ok { &self.ok } else { &self.failed }.fetch_add(1, Relaxed);
        self.latency.record_us(took.as_micros() as u64);
    }
}

/// The snapshotter: metadata, the chunk store, and the layer mounter.
pub struct Snapshotter {
    root: PathBuf,
    meta: meta::Meta,
    store: Arc<Store>,
    mounter: Arc<dyn LayerMounter>,
    /// Held while layers or snapshot directories are created or dropped (Prepare/View,
    /// Commit, Remove of a committed snapshot, Cleanup), so that Cleanup never takes a
    /// new directory for an orphan and a layer being converted or reused is never dropped.
    layers_lock: std::sync::Mutex<()>,
    /// Read from a Prepare's, View's or Mounts' first layer mount to the mounts it
    /// returns; written while idle layers are unmounted (see [`idle`]).
    mount_use: std::sync::RwLock<()>,
    /// Bumped by every Remove: the set of idle layers may have changed.
    generation: std::sync::atomic::AtomicU64,
    /// Unpacked trees and removed snapshot directories, deleted in the background.
    trash: trash::Trash,
    /// Lazy pull from published artifacts; `None`: every layer is unpacked and converted.
    lazy: Option<Arc<crate::remote::LazyPuller>>,
    /// Layer conversions at Commit: counts and durations.
    conversions: Conversions,
    /// Local bytes of lazily pulled layers, recomputed at most every [`LOCAL_BYTES_TTL`].
    local_cache: std::sync::Mutex<BTreeMap<String, (Instant, u64, u64)>>,
    /// Lazy layers whose background prefetch this daemon started: a layer's prefetch
    /// starts when a container (an active or view snapshot) first uses it, not at the
    /// pull, so a pull moves only metadata.
    prefetching: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Snapshotter {
    /// Opens the snapshotter at `root` over `store` (whose root is usually the same),
    /// and mounts every layer a committed snapshot references (a restart keeps mounts
    /// made by the previous run; mounts of the layout before slots are moved).
    pub fn open(
        root: &Path,
        store: Arc<Store>,
        mounter: Arc<dyn LayerMounter>,
    ) -> Result<Snapshotter, SnapError> {
        let snaps = root.join("snapshots");
        fs::create_dir_all(&snaps).map_err(io_internal(&snaps))?;
        let mnt = frontend::mount_dir(root);
        fs::create_dir_all(&mnt).map_err(io_internal(&mnt))?;
        let meta = meta::Meta::open(&root.join("snapshots.redb"))?;
        let trash = trash::Trash::open(root).map_err(io_internal(&root.join("trash")))?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            meta,
            store,
            mounter,
            layers_lock: std::sync::Mutex::new(()),
            mount_use: std::sync::RwLock::new(()),
            generation: Default::default(),
            trash,
            lazy: None,
            conversions: Conversions::default(),
            local_cache: Default::default(),
            prefetching: Default::default(),
        };
        s.unmount_legacy();
        for (key, snap) in s.meta.list()? {
            if let Some(hex) = &snap.layer {
                if let Err(e) = s.mount_layer(hex) {
                    tracing::error!(snapshot = %key, layer = %hex, "cannot mount layer: {e}");
                }
            }
        }
        Ok(s)
    }

    /// Unmounts the layer mounts a daemon before mount slots left at `mnt/<layer hex>`
    /// (detached if a container still uses one: its overlay keeps the mount it has) and
    /// removes the directory; [`Snapshotter::open`] then mounts the layers at `m/<slot>`,
    /// where the next Mounts finds them. A layer that cannot be unmounted is logged and
    /// left; the daemon starts anyway.
    fn unmount_legacy(&self) {
        let dir = self.root.join(frontend::LEGACY_MOUNT_DIR);
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        let mut moved = 0u64;
        for e in entries.flatten() {
            let hex = e.file_name().to_string_lossy().into_owned();
            match self.mounter.unmount(&hex, &e.path()) {
                Ok(()) => moved += 1,
                Err(e) => {
                    tracing::error!(layer = %hex, "cannot unmount a layer of the old layout: {e}")
                }
            }
        }
        if let Err(e) = fs::remove_dir(&dir) {
            tracing::error!("{}: {e}", dir.display());
        }
        tracing::info!(
            layers = moved,
            "layer mounts of the old layout (mnt/<layer>) removed; layers mount at m/<slot>"
        );
    }

    /// Pulls layers lazily with `puller` when a Prepare names an image layer that has a
    /// published artifact, and resumes the prefetch of the lazy layers that containers use
    /// (a restart loses what was queued, not what was fetched).
    pub fn with_lazy(mut self, puller: Arc<crate::remote::LazyPuller>) -> Snapshotter {
        self.lazy = Some(puller);
        if let Ok(snaps) = self.meta.list() {
            for (_, s) in snaps {
                if s.kind == Kind::Committed {
                    continue;
                }
                if let Ok(ancestors) = self.meta.ancestors(&s.parent) {
                    for (_, a) in ancestors {
                        if let Some(hex) = &a.layer {
                            self.start_prefetch(hex);
                        }
                    }
                }
            }
        }
        self
    }

    /// Starts the background prefetch of lazy layer `hex`, once per daemon (the queue
    /// is not kept across restarts; what it fetched is).
    fn start_prefetch(&self, hex: &str) {
        let Some(lazy) = &self.lazy else { return };
        let first = self
            .prefetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hex.to_string());
        if !first {
            return;
        }
        match self.store.layer(hex) {
            Ok(Some(r)) if r.remote.is_some() => lazy.prefetch_layer(&r),
            Ok(_) => {}
            Err(e) => tracing::warn!(layer = %hex, "prefetch: reading the layer record: {e}"),
        }
    }

    /// The front end mounting layers.
    pub fn mounter_name(&self) -> &'static str {
        self.mounter.name()
    }

    /// Counts of snapshots and the state of every layer they use.
    pub fn status(&self) -> Result<Status, SnapError> {
        let mut st = Status {
            front_end: self.mounter.name().to_string(),
            ..Status::default()
        };
        let mut uses: BTreeMap<String, u64> = BTreeMap::new();
        for (_, s) in self.meta.list()? {
            match s.kind {
                Kind::Active => st.active += 1,
                Kind::View => st.views += 1,
                Kind::Committed => st.committed += 1,
            }
            if let Some(hex) = s.layer {
                *uses.entry(hex).or_default() += 1;
            }
        }
        for (id, snapshots) in uses {
            let record = self.store.layer(&id).map_err(internal)?;
            let mounted = self
                .layer_mountpoint(&id)?
                .is_some_and(|m| frontend::is_mountpoint(&m));
            let (data_bytes, local_bytes) = match &record {
                Some(r) if r.remote.is_some() => self.local_bytes(&id, r)?,
                Some(r) => (r.logical_bytes, r.logical_bytes),
                None => (0, 0),
            };
            st.layers.push(LayerStatus {
                snapshots,
                converted: record.is_some(),
                mounted,
                files: record.as_ref().map_or(0, |r| r.files),
                chunks: record.as_ref().map_or(0, |r| r.chunks),
                logical_bytes: record.as_ref().map_or(0, |r| r.logical_bytes),
                remote: record.as_ref().is_some_and(|r| r.remote.is_some()),
                data_bytes,
                local_bytes,
                id,
            });
        }
        Ok(st)
    }

    /// Data bytes of a lazily pulled layer and how many of them are local, reused for
    /// [`LOCAL_BYTES_TTL`].
    fn local_bytes(
        &self,
        id: &str,
        record: &crate::store::LayerRecord,
    ) -> Result<(u64, u64), SnapError> {
        let now = Instant::now();
        {
            let cache = self.local_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, total, local)) = cache.get(id) {
                if now.duration_since(*at) < LOCAL_BYTES_TTL {
                    return Ok((*total, *local));
                }
            }
        }
        let (total, local) = self.store.local_bytes(&record.blobs).map_err(internal)?;
        let mut cache = self.local_cache.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the layers in use: entries of layers gone are dropped here.
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(id.to_string(), (now, total, local));
        Ok((total, local))
    }

    /// Conversions at Commit so far.
    pub fn conversions(&self) -> ConversionStats {
        use std::sync::atomic::Ordering::Relaxed;
        ConversionStats {
            ok: self.conversions.ok.load(Relaxed),
            failed: self.conversions.failed.load(Relaxed),
            latency: self.conversions.latency.load(),
        }
    }

    /// The metadata store (for status and tests).
    pub fn meta(&self) -> &meta::Meta {
        &self.meta
    }

    fn snap_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn slot_dir(&self, slot: u64) -> PathBuf {
        frontend::mount_dir(&self.root).join(slot.to_string())
    }

    /// Where layer `hex` is mounted while a snapshot uses it (`ROOT/m/<slot>`); `None`
    /// when it has no mount slot.
    pub fn layer_mountpoint(&self, hex: &str) -> Result<Option<PathBuf>, SnapError> {
        Ok(self.meta.layer_slot(hex)?.map(|s| self.slot_dir(s)))
    }

    /// Mounts layer `hex` at its slot (given now if it has none) unless it is mounted.
    fn mount_layer(&self, hex: &str) -> Result<PathBuf, SnapError> {
        let record = self
            .store
            .layer(hex)
            .map_err(internal)?
            .ok_or_else(|| SnapError::Internal(format!("layer {hex} is not in the store")))?;
        let slot = match self.meta.layer_slot(hex)? {
            Some(s) => s,
            None => self.meta.assign_layer_slot(hex)?,
        };
        let target = self.slot_dir(slot);
        let was_mounted = frontend::is_mountpoint(&target);
        self.mounter.mount(&record, &target).map_err(internal)?;
        if !was_mounted {
            // Links the layer to its data blobs, which the data plane's log lines name.
            tracing::info!(
                layer = %hex,
                slot,
                blobs = %record.blobs.join(","),
                lazy = record.remote.is_some(),
                "layer mounted"
            );
        }
        Ok(target)
    }

    /// Prepare (`kind` Active) or View: records the snapshot, makes its directories, and
    /// returns its mounts.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<MountSpec>, SnapError> {
        let _use = self.mount_use.read().unwrap_or_else(|p| p.into_inner());
        if kind == Kind::Active {
            if let Some(target) = labels.get(LABEL_SNAPSHOT_REF) {
                self.check_remote(target, parent)?;
                if self.prepare_lazy(key, target, parent, &labels)? {
                    return Err(SnapError::AlreadyExists(format!(
                        "target snapshot {target:?} (pulled lazily)"
                    )));
                }
            }
        }
        // The merged root takes its owner from the upper dir: give it the parent's, as
        // containerd's overlayfs snapshotter does (images whose root is not root's).
        let owner = match self.meta.get(parent)? {
            Some(Snap {
                kind: Kind::Committed,
                layer: Some(hex),
                ..
            }) => {
                use std::os::unix::fs::MetadataExt;
                let m = self.mount_layer(&hex)?;
                let md = fs::metadata(&m).map_err(io_internal(&m))?;
                Some((md.uid(), md.gid()))
            }
            _ => None,
        };
        // Under the layers lock: Cleanup must not take the new directory for an orphan.
        let layers = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.meta.create(kind, key, parent, labels)?;
        let dir = self.snap_dir(snap.id);
        let made = (|| {
            fs::create_dir_all(dir.join("fs"))?;
            fs::set_permissions(dir.join("fs"), fs::Permissions::from_mode(0o755))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(dir.join("fs"), Some(uid), Some(gid))?;
            }
            if kind == Kind::Active {
                // Used by overlayfs with the mounter's (root's) credentials only.
                fs::create_dir_all(dir.join("work"))?;
                fs::set_permissions(dir.join("work"), fs::Permissions::from_mode(0o700))?;
            }
            Ok::<(), io::Error>(())
        })();
        if let Err(e) = made {
            let _ = self.meta.remove(key);
            let _ = fs::remove_dir_all(&dir);
            return Err(io_internal(&dir)(e));
        }
        drop(layers);
        self.mounts_of(&snap)
    }

    /// containerd's remote-snapshot fast path: an unpack Prepare labelled with chain id
    /// `target` gets AlreadyExists when a committed snapshot with that label and parent
    /// exists (pulled in another namespace, say); containerd then finds it with a List
    /// filter on the label and parent, and neither downloads nor applies the layer.
    fn check_remote(&self, target: &str, parent: &str) -> Result<(), SnapError> {
        let found = self.meta.list()?.into_iter().find(|(_, s)| {
            s.kind == Kind::Committed
                && s.parent == parent
                && s.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target)
        });
        match found {
            Some((name, s)) => {
                if let Some(hex) = &s.layer {
                    self.mount_layer(hex)?;
                }
                tracing::info!(target, snapshot = %name, "layer already present: remote snapshot");
                Err(SnapError::AlreadyExists(format!(
                    "target snapshot {target:?} (as {name:?})"
                )))
            }
            None => Ok(()),
        }
    }

    /// containerd's remote-snapshot path for a layer with a published artifact: when the
    /// Prepare of chain id `target` carries the CRI labels naming an image and one of
    /// its layers, and the image has a dedupd artifact covering that layer, the layer is
    /// registered from its metadata blob alone, mounted, and committed under `target`
    /// (the caller answers AlreadyExists, and containerd downloads and applies
    /// nothing). Returns false when the layer is to be unpacked as usual: no labels, no
    /// lazy pull configured, no artifact, or any failure (logged: the full pull still
    /// works).
    fn prepare_lazy(
        &self,
        key: &str,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, SnapError> {
        let Some(lazy) = &self.lazy else {
            return Ok(false);
        };
        let (Some(image), Some(manifest), Some(layer)) = (
            labels.get(LABEL_CRI_IMAGE_REF),
            labels.get(LABEL_CRI_MANIFEST_DIGEST),
            labels.get(LABEL_CRI_LAYER_DIGEST),
        ) else {
            return Ok(false);
        };
        let Some(hex) = target
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
        else {
            return Ok(false);
        };
        let manifest_ref = match crate::registry::ImageRef::parse(image) {
            Ok(r) => r.with_digest(manifest),
            Err(e) => {
                tracing::warn!(image, "lazy pull: bad image reference: {e}");
                return Ok(false);
            }
        };
        // containerd computed `target` from the image config: the artifact's diff_id
        // must give the same chain id over the parent's.
        let parent_chain = match self.meta.get(parent)? {
            None if parent.is_empty() => None,
            Some(p) if p.kind == Kind::Committed => Some(
                p.labels
                    .get(LABEL_SNAPSHOT_REF)
                    .cloned()
                    .or_else(|| p.layer.as_ref().map(|h| format!("sha256:{h}")))
                    .unwrap_or_default(),
            ),
            _ => return Ok(false),
        };
        let check = |diff_id: &str| {
            let chain = match &parent_chain {
                None => diff_id.to_string(),
                Some(p) => {
                    crate::remote::image::chain_ids(&[p.clone(), diff_id.to_string()])[1].clone()
                }
            };
            if chain == target {
                Ok(())
            } else {
                Err(format!(
                    "the artifact's diff_id {diff_id} over parent {parent:?} gives chain id \
                     {chain}, containerd expects {target}"
                ))
            }
        };
        let _layers = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let record = match self.store.layer(&hex).map_err(internal)? {
            Some(r) => Some(r),
            None => {
                self.meta.own_layer(&hex)?;
                match lazy.register_layer(&manifest_ref, layer, &hex, check) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(image = %manifest_ref, layer, "lazy pull failed, unpacking instead: {e}");
                        self.meta.disown_layer(&hex)?;
                        return Ok(false);
                    }
                }
            }
        };
        let (record, streamed) = match record {
            Some(r) => (r, false),
            None if lazy.streams() => {
                // No artifact: the layer streams from the registry into the converter
                // (no download into containerd's content store, no unpack).
                match lazy.stream_layer(&manifest_ref, layer, &hex, check) {
                    Ok(r) => (r, true),
                    Err(e) => {
                        tracing::warn!(
                            image = %manifest_ref,
                            layer,
                            "streaming the layer failed, unpacking it instead: {e}"
                        );
                        self.meta.disown_layer(&hex)?;
                        return Ok(false);
                    }
                }
            }
            None => {
                tracing::info!(
                    image = %manifest_ref,
                    layer,
                    "no dedupd artifact covers the layer: unpacking it as usual"
                );
                self.meta.disown_layer(&hex)?;
                return Ok(false);
            }
        };
        drop(_layers);
        if let Err(e) = self.mount_layer(&hex) {
            tracing::warn!(layer = %hex, "mounting the lazy layer failed, unpacking instead: {e}");
            return Ok(false);
        }
        // Committed under the chain id (the name containerd's metadata looks up by label
        // and parent), or under the Prepare key if that name is taken by a snapshot on
        // another parent (the same layer over another namespace's parent key).
        let name = match self.meta.get(target)? {
            None => target.to_string(),
            Some(_) => key.to_string(),
        };
        let mut keep = BTreeMap::new();
        keep.insert(LABEL_SNAPSHOT_REF.to_string(), target.to_string());
        for l in [
            LABEL_CRI_IMAGE_REF,
            LABEL_CRI_MANIFEST_DIGEST,
            LABEL_CRI_LAYER_DIGEST,
        ] {
            if let Some(v) = labels.get(l) {
                keep.insert(l.to_string(), v.clone());
            }
        }
        let tmp_key = format!("{key} (lazy)");
        self.meta
            .create(Kind::Active, &tmp_key, parent, BTreeMap::new())?;
        self.meta.commit(
            &tmp_key,
            &name,
            keep,
            &hex,
            record.image_bytes + record.logical_bytes,
            record.files,
        )?;
        if streamed {
            tracing::info!(
                layer = %hex,
                image = %manifest_ref,
                layer_digest = %layer,
                logical_bytes = record.logical_bytes,
                ms = started.elapsed().as_millis() as u64,
                "layer streamed from the registry into the converter"
            );
        } else {
            tracing::info!(
                layer = %hex,
                image = %manifest_ref,
                layer_digest = %layer,
                remote = record.remote.is_some(),
                ms = started.elapsed().as_millis() as u64,
                "layer pulled lazily: mounted from its metadata, data on demand"
            );
        }
        // Its prefetch starts when a container uses it (see `prefetching`).
        Ok(true)
    }

    /// The mounts of active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>, SnapError> {
        let snap = self.meta.stat(key)?;
        if snap.kind == Kind::Committed {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key:?} is committed: it has no mounts"
            )));
        }
        let _use = self.mount_use.read().unwrap_or_else(|p| p.into_inner());
        self.mounts_of(&snap)
    }

    /// Mounts as containerd's overlayfs snapshotter builds them, with the committed
    /// layers' EROFS mounts as lower directories.
    fn mounts_of(&self, snap: &Snap) -> Result<Vec<MountSpec>, SnapError> {
        let dir = self.snap_dir(snap.id);
        let upper = dir.join("fs");
        let mut lowers = Vec::new();
        for (key, s) in self.meta.ancestors(&snap.parent)? {
            let hex = s.layer.as_deref().ok_or_else(|| {
                SnapError::Internal(format!("committed snapshot {key:?} has no layer"))
            })?;
            lowers.push(self.mount_layer(hex)?);
            self.start_prefetch(hex);
        }
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let lowers: Vec<String> = lowers.iter().map(|p| path(p)).collect();
        if lowers.is_empty() {
            let mode = if snap.kind == Kind::View { "ro" } else { "rw" };
            return Ok(vec![MountSpec {
                kind: "bind".into(),
                source: path(&upper),
                options: vec![mode.into(), "rbind".into()],
            }]);
        }
        if snap.kind == Kind::View && lowers.len() == 1 {
            return Ok(vec![MountSpec {
                kind: "bind".into(),
                source: lowers[0].clone(),
                options: vec!["ro".into(), "rbind".into()],
            }]);
        }
        let rw = (snap.kind == Kind::Active).then(|| (path(&dir.join("work")), path(&upper)));
        Ok(vec![MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: overlay_options(rw.as_ref().map(|(w, u)| (w.as_str(), u.as_str())), &lowers),
        }])
    }

    /// The layer id of an active snapshot being committed: its chain id, taken from
    /// containerd's `containerd.io/snapshot.ref` label, else from the names containerd's
    /// unpacker uses (committed name `<ns>/<n>/sha256:<chain id>` and key
    /// `<ns>/<n>/extract-<...> sha256:<chain id>`, both); else a digest of the committed name
    /// and the snapshot's creation (a container commit: unique). The chain id names the
    /// layer's content together with all its parents, so equal ids mean equal trees.
    fn layer_id(active: &Snap, key: &str, name: &str, labels: &BTreeMap<String, String>) -> String {
        let chain_hex = |s: &str| -> Option<String> {
            let hex = s.strip_prefix("sha256:")?;
            (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| hex.to_ascii_lowercase())
        };
        let label = labels
            .get(LABEL_SNAPSHOT_REF)
            .or_else(|| active.labels.get(LABEL_SNAPSHOT_REF));
        if let Some(r) = label {
            return chain_hex(r).unwrap_or_else(|| hex::encode(sha2::Sha256::digest(r.as_bytes())));
        }
        // Only the unpacker's own pattern counts (the same chain id in both names): a
        // container commit merely *named* like a chain id must not be taken for a layer
        // that exists, or its content would be replaced by that layer's.
        let from_name = name.rsplit('/').next().and_then(chain_hex);
        let from_key = key
            .rsplit('/')
            .next()
            .filter(|k| k.starts_with("extract-"))
            .and_then(|k| k.rsplit(' ').next())
            .and_then(chain_hex);
        if let (Some(a), Some(b)) = (&from_name, &from_key) {
            if a == b {
                return a.clone();
            }
        }
        let seed = format!(
            "dedupd commit {name} {}.{:09} {}",
            active.created.secs, active.created.nanos, active.id
        );
        hex::encode(sha2::Sha256::digest(seed.as_bytes()))
    }

    /// Commit: converts the active snapshot's tree (unless its layer exists), mounts the
    /// layer, records the committed snapshot, and removes the unpacked files.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        parent: &str,
    ) -> Result<(), SnapError> {
        let mut labels = labels;
        meta::check_labels(&labels)?;
        let active = self.meta.check_commit(key, name)?;
        // Keep the chain id on the committed snapshot: the fast path looks it up there.
        if let Some(r) = active.labels.get(LABEL_SNAPSHOT_REF) {
            labels
                .entry(LABEL_SNAPSHOT_REF.to_string())
                .or_insert_with(|| r.clone());
        }
        if !parent.is_empty() && parent != active.parent {
            return Err(SnapError::InvalidArgument(format!(
                "commit of {key:?} onto parent {parent:?}: rebase is not supported"
            )));
        }
        let hex = Self::layer_id(&active, key, name, &labels);
        let _layers = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.snap_dir(active.id);
        let upper = dir.join("fs");
        // Where a Commit's time goes, in one log line (the cold-start bench reads it).
        let started = Instant::now();
        let (size_bytes, inodes) = convert::disk_usage(&upper).map_err(internal)?;
        let usage_done = Instant::now();
        match self.store.layer(&hex).map_err(internal)? {
            Some(_) => {
                tracing::info!(snapshot = %name, layer = %hex, "layer already converted");
            }
            None => {
                self.meta.own_layer(&hex)?;
                let converted = convert::convert_layer(&self.store, &upper, &hex);
                self.conversions
                    .record(usage_done.elapsed(), converted.is_ok());
                let record = converted.map_err(internal)?;
                tracing::info!(
                    snapshot = %name,
                    layer = %hex,
                    files = record.files,
                    new_chunks = record.new_chunks,
                    image_bytes = record.image_bytes,
                    "layer converted"
                );
            }
        }
        let convert_done = Instant::now();
        self.mount_layer(&hex)?;
        let mount_done = Instant::now();
        self.meta
            .commit(key, name, labels, &hex, size_bytes, inodes)?;
        let record_done = Instant::now();
        // Only the image and the chunks remain: the unpacked tree goes (moved out at
        // once, deleted in the background).
        self.trash.discard(&dir);
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
        let end = Instant::now();
        tracing::info!(
            layer = %hex,
            usage_ms = ms(started, usage_done),
            convert_ms = ms(usage_done, convert_done),
            mount_ms = ms(convert_done, mount_done),
            record_ms = ms(mount_done, record_done),
            remove_ms = ms(record_done, end),
            total_ms = ms(started, end),
            "commit timing"
        );
        Ok(())
    }

    /// Remove: drops the snapshot and its directory; a committed snapshot's layer is
    /// unmounted and, when owned and no other snapshot references it, removed from the
    /// store with every chunk nothing else references.
    pub fn remove(&self, key: &str) -> Result<(), SnapError> {
        let snap = self.meta.remove(key)?;
        // A layer may have become idle.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.trash.discard(&self.snap_dir(snap.id));
        if let Some(hex) = &snap.layer {
            let _layers = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
            if !self.layer_referenced(hex)? {
                self.drop_layer(hex)?;
            }
        }
        Ok(())
    }

    /// Unmounts layer `hex` from its slot, then frees the slot (only then: a slot never
    /// names two mounted layers).
    fn unmount_layer(&self, hex: &str) -> Result<(), SnapError> {
        if let Some(slot) = self.meta.layer_slot(hex)? {
            self.mounter
                .unmount(hex, &self.slot_dir(slot))
                .map_err(internal)?;
            self.meta.free_layer_slot(hex)?;
        }
        Ok(())
    }

    fn layer_referenced(&self, hex: &str) -> Result<bool, SnapError> {
        Ok(self
            .meta
            .list()?
            .iter()
            .any(|(_, s)| s.layer.as_deref() == Some(hex)))
    }

    /// Unmounts layer `hex` (freeing its slot) and, if owned, removes it from the store.
    fn drop_layer(&self, hex: &str) -> Result<(), SnapError> {
        self.unmount_layer(hex)?;
        self.prefetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hex);
        if self.meta.owned_layers()?.iter().any(|l| l == hex) {
            if let Some(r) = self.store.remove_layer(hex).map_err(internal)? {
                tracing::info!(
                    layer = %hex,
                    chunks_freed = r.chunks,
                    blobs_freed = r.blobs.len(),
                    "layer removed"
                );
            }
            self.meta.disown_layer(hex)?;
            self.mounter.release_blobs(&self.store).map_err(internal)?;
        }
        Ok(())
    }

    /// Stat.
    pub fn stat(&self, key: &str) -> Result<Snap, SnapError> {
        self.meta.stat(key)
    }

    /// Update of labels.
    pub fn update(
        &self,
        key: &str,
        labels: &BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snap, SnapError> {
        self.meta.update(key, labels, paths)
    }

    /// List, filtered (containerd filter syntax; several filters are ORed).
    pub fn list(&self, filters: &[String]) -> Result<Vec<(String, Snap)>, SnapError> {
        filter::select(filters, self.meta.list()?)
    }

    /// Usage: an active snapshot's upper directory as it is now; a committed snapshot's
    /// EROFS image plus the file data its layer holds, and its inodes at commit.
    pub fn usage(&self, key: &str) -> Result<(u64, u64), SnapError> {
        let snap = self.meta.stat(key)?;
        match (&snap.kind, &snap.layer) {
            (Kind::Committed, Some(hex)) => {
                let (bytes, files) = match self.store.layer(hex).map_err(internal)? {
                    Some(r) => (r.image_bytes + r.logical_bytes, r.files),
                    None => (snap.size_bytes, snap.inodes),
                };
                Ok((bytes, files.max(snap.inodes)))
            }
            _ => {
                let upper = self.snap_dir(snap.id).join("fs");
                convert::disk_usage(&upper).map_err(internal)
            }
        }
    }

    /// Cleanup: removes snapshot directories no snapshot owns, layer mounts no snapshot
    /// references, owned layers no snapshot references (with their last-reference
    /// chunks), and blob files of blobs the store no longer has.
    pub fn cleanup(&self) -> Result<CleanupReport, SnapError> {
        let mut report = CleanupReport::default();
        let _layers = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
        let snaps = self.meta.list()?;
        let ids: std::collections::HashSet<String> =
            snaps.iter().map(|(_, s)| s.id.to_string()).collect();
        let layers: std::collections::HashSet<&str> = snaps
            .iter()
            .filter_map(|(_, s)| s.layer.as_deref())
            .collect();
        let sdir = self.root.join("snapshots");
        for e in fs::read_dir(&sdir).map_err(io_internal(&sdir))? {
            let e = e.map_err(io_internal(&sdir))?;
            if !ids.contains(e.file_name().to_string_lossy().as_ref()) {
                let p = e.path();
                fs::remove_dir_all(&p).map_err(io_internal(&p))?;
                report.dirs += 1;
            }
        }
        // Mounted layers no snapshot references (a Commit that failed after mounting),
        // then directories under m/ that no slot names (a crash between unmount and
        // freeing the slot leaves the slot, never the reverse, but be thorough).
        let mut slots = std::collections::HashSet::new();
        for (hex, slot) in self.meta.layer_slots()? {
            if layers.contains(hex.as_str()) {
                slots.insert(slot.to_string());
            } else {
                self.unmount_layer(&hex)?;
                report.mounts += 1;
            }
        }
        let mdir = frontend::mount_dir(&self.root);
        for e in fs::read_dir(&mdir).map_err(io_internal(&mdir))? {
            let e = e.map_err(io_internal(&mdir))?;
            if !slots.contains(e.file_name().to_string_lossy().as_ref()) {
                frontend::unmount_dir(&e.path()).map_err(internal)?;
                report.mounts += 1;
            }
        }
        for hex in self.meta.owned_layers()? {
            if !layers.contains(hex.as_str()) {
                self.store.remove_layer(&hex).map_err(internal)?;
                self.meta.disown_layer(&hex)?;
                report.layers += 1;
            }
        }
        report.blob_files = self.mounter.release_blobs(&self.store).map_err(internal)?;
        // Reclaim pack space; retired packs are unlinked only once the data plane has
        // dropped registries that may still point into them. Dead packs only: mounted
        // layers keep serving from tables loaded at mount (see the `store` module doc).
        let compacted = self
            .store
            .compact(crate::store::CompactOptions::dead_only())
            .map_err(internal)?;
        tracing::info!(?compacted, "cleanup: compaction");
        self.mounter.refresh_registry().map_err(internal)?;
        report.pack_bytes_freed = self
            .store
            .finish_compaction()
            .map_err(internal)?
            .bytes_freed;
        Ok(report)
    }
}

/// Options of an overlay over `lowers` (uppermost first), as containerd's overlayfs
/// snapshotter builds them; `rw` is the work and upper dir of an active snapshot.
fn overlay_options(rw: Option<(&str, &str)>, lowers: &[String]) -> Vec<String> {
    let mut options = vec!["index=off".to_string()];
    if let Some((work, upper)) = rw {
        options.push(format!("workdir={work}"));
        options.push(format!("upperdir={upper}"));
    }
    options.push(format!("lowerdir={}", lowers.join(":")));
    options
}

/// Binds `socket` (parent directory created 0700, a stale socket replaced, mode 0600).
/// The socket is bound under umask 077 whatever the process umask is, so it is 0600
/// from the moment it exists: no window in which another user could connect.
pub fn bind(socket: &Path) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
    }
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let old = crate::perms::private_umask();
    let listener = tokio::net::UnixListener::bind(socket);
    if old & crate::perms::UMASK != crate::perms::UMASK {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(old as _));
    }
    let listener = listener?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Connections of the snapshotter socket whose peer is root (or dedupd's user): any
/// other is closed at once and logged (`SO_PEERCRED`; the socket's mode already keeps
/// other users out, this holds even if someone loosens it).
fn root_peers(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<tokio::net::UnixStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::UnixListenerStream::new(listener).filter(|conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) => match crate::perms::allowed_uid(cred.uid()) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(pid = ?cred.pid(), "snapshotter: connection refused: {why}");
                    false
                }
            },
            Err(e) => {
                tracing::warn!("snapshotter: connection refused: SO_PEERCRED: {e}");
                false
            }
        },
        Err(_) => true,
    })
}

/// Serves the snapshots API on `socket` until `shutdown` completes. Runs on the calling
/// tokio runtime (the daemon's current-thread control runtime); snapshot operations run
/// on its blocking pool.
pub async fn serve(
    socket: &Path,
    snapshotter: Arc<Snapshotter>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SnapError> {
    let listener = bind(socket).map_err(io_internal(socket))?;
    tracing::info!(
        socket = %socket.display(),
        front_end = snapshotter.mounter_name(),
        "snapshotter dedup serving"
    );
    let incoming = root_peers(listener);
    let svc = proto::snapshots::snapshots_server::SnapshotsServer::new(Service::new(snapshotter));
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let server = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move { stopped.notified().await });
    tokio::pin!(server);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut server => r.map_err(internal),
        () = &mut shutdown => {
            // Graceful: in-flight calls finish, clients get GOAWAY. Bounded, because a
            // client that keeps its connection open (containerd does) would hold it forever.
            stop.notify_one();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r.map_err(internal),
                Err(_) => {
                    tracing::warn!("snapshotter: clients still connected after {SHUTDOWN_GRACE:?}; closing");
                    Ok(())
                }
            }
        }
    };
    let _ = fs::remove_file(socket);
    result
}

/// How long a stopping server waits for clients to finish and disconnect.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The daemon's control thread: a current-thread tokio runtime serving the snapshotter
/// (snapshot operations on its bounded blocking pool). Stop it with [`ControlThread::stop`].
pub struct ControlThread {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), SnapError>>>,
}

/// Threads of the control runtime's blocking pool (conversions, file and DB work).
pub const CONTROL_BLOCKING_THREADS: usize = 8;

impl ControlThread {
    /// Starts serving `snapshotter` on `socket` in a new thread named `control`.
    pub fn spawn(socket: PathBuf, snapshotter: Arc<Snapshotter>) -> io::Result<ControlThread> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads(CONTROL_BLOCKING_THREADS)
                    .build()
                    .map_err(internal)?;
                rt.block_on(serve(&socket, snapshotter, async {
                    let _ = rx.await;
                }))
            })?;
        Ok(ControlThread {
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// True while the server runs (false after a bind or serve error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops serving (in-flight requests finish) and joins the thread.
    pub fn stop(mut self) -> Result<(), SnapError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(SnapError::Internal("control thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `dedupd snapshotter` arguments: the old name of `dedupd run --front-end local`.
#[derive(clap::Args, Debug)]
pub struct SnapshotterArgs {
    /// Root of the store and the snapshots.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Socket to serve on.
    #[arg(long, default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active() -> Snap {
        Snap {
            id: 7,
            kind: Kind::Active,
            parent: String::new(),
            labels: BTreeMap::new(),
            created: meta::Stamp { secs: 1, nanos: 2 },
            updated: meta::Stamp::default(),
            layer: None,
            size_bytes: 0,
            inodes: 0,
        }
    }

    /// What containerd 1.6's mount code passes to mount(2) for `options`: past its
    /// threshold, the lowerdirs relative to the parent of their longest common prefix.
    fn containerd_data(options: &[String]) -> String {
        let size: usize = options.iter().map(String::len).sum();
        if size < CONTAINERD_COMPACT_BYTES {
            return options.join(",");
        }
        let lower = options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        let dirs: Vec<&str> = lower.split(':').collect();
        let (min, max) = (dirs.iter().min().unwrap(), dirs.iter().max().unwrap());
        let common = min
            .bytes()
            .zip(max.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let parent = min[..common].rsplit_once('/').unwrap().0.len() + 1;
        let rel: Vec<&str> = dirs.iter().map(|d| &d[parent..]).collect();
        let mut out: Vec<String> = options
            .iter()
            .filter(|o| !o.starts_with("lowerdir="))
            .cloned()
            .collect();
        out.push(format!("lowerdir={}", rel.join(":")));
        out.join(",")
    }

    fn active_options(root: &str, id: u64, lowers: &[String]) -> Vec<String> {
        let snap = format!("{root}/snapshots/{id}");
        let (work, upper) = (format!("{snap}/work"), format!("{snap}/fs"));
        overlay_options(Some((&work, &upper)), lowers)
    }

    /// The worst case the compile-time check bounds is what [`overlay_options`] builds; a
    /// longer root still fits through containerd's rewriting; the old layout's 64-hex
    /// mountpoints did not fit 61 layers even rewritten.
    #[test]
    fn overlay_options_of_128_layers_fit_a_page() {
        let root = crate::config::DEFAULT_ROOT;
        let slot = meta::MAX_LAYER_SLOT;
        let lowers = vec![format!("{root}/m/{slot}"); MAX_PLAIN_MOUNT_LAYERS];
        let worst = active_options(root, u64::MAX, &lowers);
        assert_eq!(worst.join(",").len(), OVERLAY_WORST_DATA_BYTES);
        assert_eq!(OVERLAY_WORST_DATA_BYTES, 3209);
        assert_eq!(containerd_data(&worst), worst.join(","), "no rewriting");

        // A 100-byte root: too long for the absolute list, fine relative to m/.
        let long = format!("/{}", "r".repeat(99));
        let lowers: Vec<String> = (1..=MAX_PLAIN_MOUNT_LAYERS)
            .map(|s| format!("{long}/m/{s}"))
            .collect();
        let opts = active_options(&long, 1234567, &lowers);
        assert!(opts.join(",").len() >= MOUNT_DATA_MAX_BYTES);
        let data = containerd_data(&opts);
        let rel: Vec<String> = (1..=MAX_PLAIN_MOUNT_LAYERS)
            .map(|s| s.to_string())
            .collect();
        assert!(
            data.ends_with(&format!(",lowerdir={}", rel.join(":"))),
            "{data}"
        );
        assert!(data.len() < 1024, "{data}");

        // The old layout, even rewritten, takes 65 bytes a layer: 61 layers fit under the
        // default root and 62 do not; under the e2e test's 33-byte root 61 do not (issue 12).
        let old = |root: &str, n: u8| -> usize {
            let l: Vec<String> = (0..n)
                .map(|i| format!("{root}/mnt/{}", hex::encode([i; 32])))
                .collect();
            containerd_data(&active_options(root, 1234567, &l)).len()
        };
        assert!(old(root, 61) < MOUNT_DATA_MAX_BYTES, "{}", old(root, 61));
        assert!(old(root, 62) >= MOUNT_DATA_MAX_BYTES, "{}", old(root, 62));
        let e2e_root = "/var/tmp/dedupd-e2e.XXXXXX/dedupd";
        assert!(old(e2e_root, 61) >= MOUNT_DATA_MAX_BYTES);
        let old128: Vec<String> = (0..128u8)
            .map(|i| format!("{root}/mnt/{}", hex::encode([i; 32])))
            .collect();
        let old128 = active_options(root, u64::MAX, &old128);
        assert_eq!(
            (old128.join(",").len(), containerd_data(&old128).len()),
            (11_017, 8_457)
        );
    }

    #[test]
    fn layer_ids_come_from_chain_ids() {
        let chain = "ab".repeat(32);
        let none = BTreeMap::new();
        // containerd 1.6's unpacker: no labels, chain id in the names.
        let name = format!("default/4/sha256:{chain}");
        let key = format!("default/3/extract-1-x sha256:{chain}");
        assert_eq!(Snapshotter::layer_id(&active(), &key, &name, &none), chain);
        // One name alone is not enough.
        assert_ne!(
            Snapshotter::layer_id(&active(), &key, "ns/9/other", &none),
            chain
        );
        assert_ne!(
            Snapshotter::layer_id(&active(), "ns/3/mine", &name, &none),
            chain
        );
        // The label wins.
        let other = "cd".repeat(32);
        let mut l = BTreeMap::new();
        l.insert(LABEL_SNAPSHOT_REF.to_string(), format!("sha256:{other}"));
        assert_eq!(Snapshotter::layer_id(&active(), &key, &name, &l), other);
        // A container commit: unique per snapshot, never a chain id.
        let a = Snapshotter::layer_id(&active(), "default/5/c1", "default/6/img", &none);
        let mut b_snap = active();
        b_snap.id = 8;
        let b = Snapshotter::layer_id(&b_snap, "default/5/c1", "default/6/img", &none);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        // Malformed digests are not taken for chain ids.
        let bad = "default/4/sha256:xyz";
        assert_ne!(Snapshotter::layer_id(&active(), "k", bad, &none), "xyz");
    }
}
