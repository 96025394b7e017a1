//! How a converted layer's EROFS image becomes a directory overlay can stack: one mount
//! per layer at `ROOT/m/<slot>`, kept while any snapshot references the layer. The
//! snapshotter chooses where (a short number per layer, see [`super::meta`]); how depends
//! on the daemon's front end, so it sits behind [`LayerMounter`]:
//! cachefiles mounts `-t erofs none -o fsid=...,domain_id=...`, fanotify mounts sparse
//! blob files it fills on demand, and [`LocalMounter`] (here) materializes the data
//! blobs as plain files and mounts the image file-backed.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cachefiles::cull::cull_dead;
use crate::cachefiles::Device;
use crate::store::{LayerRecord, Store};

/// Errors of layer mounts. Messages name the layer or path.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Filesystem or mount syscall failure on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The store could not provide the layer's data.
    #[error("layer {layer}: {source}")]
    Store {
        /// Layer hex id.
        layer: String,
        /// The cause.
        #[source]
        source: Box<crate::store::StoreError>,
    },
    /// The daemon's blob registry could not be brought up to date.
    #[error("refreshing the blob registry: {0}")]
    Registry(String),
    /// A blob the layer names is not in the store.
    #[error("layer {layer}: blob {blob} is not in the store")]
    MissingBlob {
        /// Layer hex id.
        layer: String,
        /// Blob id.
        blob: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where layers are mounted: `ROOT/m`, one directory per layer named by its mount slot.
/// Short on purpose: an overlay names every lower layer in one mount option string,
/// which must fit a page (see `super::OVERLAY_WORST_DATA_BYTES`).
pub fn mount_dir(root: &Path) -> PathBuf {
    root.join(MOUNT_DIR)
}

/// The name of [`mount_dir`] under the root.
pub const MOUNT_DIR: &str = "m";

/// Where daemons before mount slots mounted layers: `ROOT/mnt/<layer hex>`. Mounts found
/// there at start are moved to [`mount_dir`] (see [`super::Snapshotter::open`]).
pub const LEGACY_MOUNT_DIR: &str = "mnt";

/// Mounts and unmounts converted layers at the paths the snapshotter gives.
/// Implementations are idempotent: mounting a layer already mounted at `target` (also by
/// a previous run of the daemon) leaves it there; unmounting an unmounted layer succeeds.
pub trait LayerMounter: Send + Sync {
    /// Front-end name, for logs and status.
    fn name(&self) -> &'static str;
    /// Mounts `layer` read-only at `target` (the directory is made if missing).
    fn mount(&self, layer: &LayerRecord, target: &Path) -> Result<(), MountError>;
    /// Unmounts layer `hex` from `target` and removes the directory.
    fn unmount(&self, hex: &str, target: &Path) -> Result<(), MountError>;
    /// Frees per-blob resources (cache files, materialized blobs) of blobs the store no
    /// longer has. Called after layers are removed, and by Cleanup.
    fn release_blobs(&self, store: &Store) -> Result<u64, MountError>;
    /// Swaps the data plane's registry for a fresh one, so that nothing reads packs
    /// through chunk locations older than now (called before retired packs are unlinked).
    /// Front ends that keep no registry between calls need nothing.
    fn refresh_registry(&self) -> Result<(), MountError> {
        Ok(())
    }
}

/// True when `path` is a mountpoint: its device differs from its parent's (or it is the
/// root of the same filesystem, which cannot happen under ROOT/m).
pub fn is_mountpoint(path: &Path) -> bool {
    let (Ok(m), Some(parent)) = (fs::symlink_metadata(path), path.parent()) else {
        return false;
    };
    match fs::metadata(parent) {
        Ok(p) => m.dev() != p.dev(),
        Err(_) => false,
    }
}

/// Unmounts `path` (lazily if busy) and removes the directory.
pub fn unmount_dir(path: &Path) -> Result<(), MountError> {
    if is_mountpoint(path) {
        match nix::mount::umount2(path, nix::mount::MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| io_err(path)(e.into()))?;
            }
            Err(e) => return Err(io_err(path)(e.into())),
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The `local` front end: blobs materialized eagerly as files under `ROOT/local/`, images
/// mounted file-backed with `-o device=` for each data blob.
pub struct LocalMounter {
    store: Arc<Store>,
    blob_dir: PathBuf,
    /// Serializes mounts, unmounts and blob file writes.
    lock: Mutex<()>,
}

impl LocalMounter {
    /// A mounter for the store at `store.root()`.
    pub fn new(store: Arc<Store>) -> Result<LocalMounter, MountError> {
        let blob_dir = store.root().join("local");
        fs::create_dir_all(&blob_dir).map_err(io_err(&blob_dir))?;
        Ok(LocalMounter {
            store,
            blob_dir,
            lock: Mutex::new(()),
        })
    }

    fn blob_path(&self, id: &str) -> PathBuf {
        self.blob_dir.join(id)
    }

    /// Writes blob `id` as a plain file (temp file, then rename), unless present.
    fn materialize(&self, layer: &str, id: &str) -> Result<PathBuf, MountError> {
        let path = self.blob_path(id);
        if path.exists() {
            return Ok(path);
        }
        let store_err = |source| MountError::Store {
            layer: layer.to_string(),
            source: Box::new(source),
        };
        let table = self
            .store
            .blob_table(id)
            .map_err(store_err)?
            .ok_or_else(|| MountError::MissingBlob {
                layer: layer.to_string(),
                blob: id.to_string(),
            })?;
        let tmp = self.blob_dir.join(format!("{id}.tmp"));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.set_len(table.size_bytes()).map_err(io_err(&tmp))?;
        let mut buf = Vec::new();
        for e in table.entries() {
            self.store
                .read_chunk(&e.digest, &mut buf)
                .map_err(store_err)?;
            file.write_all_at(&buf, e.blob_offset)
                .map_err(io_err(&tmp))?;
        }
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(path)
    }
}

impl LayerMounter for LocalMounter {
    fn name(&self) -> &'static str {
        "local"
    }

    fn mount(&self, layer: &LayerRecord, target: &Path) -> Result<(), MountError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let hex = layer.id_hex();
        if is_mountpoint(target) {
            return Ok(());
        }
        let mut devices = Vec::with_capacity(layer.blobs.len());
        for id in &layer.blobs {
            devices.push(self.materialize(hex, id)?);
        }
        fs::create_dir_all(target).map_err(io_err(target))?;
        let image = self.store.image_path(hex);
        let data: String = devices
            .iter()
            .map(|d| format!("device={}", d.display()))
            .collect::<Vec<_>>()
            .join(",");
        nix::mount::mount(
            Some(&image),
            target,
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NODEV,
            if data.is_empty() {
                None
            } else {
                Some(data.as_str())
            },
        )
        .map_err(|e| io_err(&image)(e.into()))?;
        Ok(())
    }

    fn unmount(&self, _hex: &str, target: &Path) -> Result<(), MountError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        unmount_dir(target)
    }

    fn release_blobs(&self, store: &Store) -> Result<u64, MountError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut freed = 0;
        let entries = fs::read_dir(&self.blob_dir).map_err(io_err(&self.blob_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.blob_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".tmp").unwrap_or(&name);
            let keep = !name.ends_with(".tmp")
                && store.has_blob(id).map_err(|source| MountError::Store {
                    layer: "-".into(),
                    source: Box::new(source),
                })?;
            if !keep {
                let p = entry.path();
                fs::remove_file(&p).map_err(io_err(&p))?;
                freed += 1;
            }
        }
        Ok(freed)
    }
}

/// Makes the daemon's blob registry match the store (called before a layer is mounted, so
/// the kernel's OPEN of its image and blobs finds them, and after layers are removed).
pub type RegistryRefresh = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The `cachefiles` front end: layers mounted as EROFS over fscache
/// (`mount -t erofs none -o fsid=<layer hex>[,domain_id=<domain>]`); the kernel asks the
/// daemon's data plane for the image and its blobs by name, lazily. Not exercised on a
/// kernel without on-demand cachefiles (this host); the VM suite is where it runs.
///
/// A mount outlives the daemon that made it, and so does its cache while a copy of the
/// device fd lives on (`crate::cachefiles::failover`): a daemon that took the cache over
/// ([`FscacheMounter::continued`]) keeps the layer mounts it finds, which go on reading
/// through the restart. A daemon that had to bind a fresh cache cannot serve mounts of
/// the old one (the kernel withdrew it: every read that misses the page cache fails), so
/// it replaces a mount it finds: unmounted (lazily if a container still uses it) and
/// mounted again over the new cache.
pub struct FscacheMounter {
    domain_id: Option<String>,
    refresh: RegistryRefresh,
    /// Serializes mounts and unmounts; holds the layers this process mounted.
    lock: Mutex<std::collections::HashSet<String>>,
    cull: Option<(Arc<dyn Device>, PathBuf)>,
    /// The cache was taken over from a previous daemon: mounts found are its own.
    continued: bool,
}

/// Passes of `cull` while dead entries are still busy: the kernel withdraws the objects
/// of an unmounted layer asynchronously.
const CULL_PASSES: u32 = 10;
const CULL_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

impl FscacheMounter {
    /// A mounter whose `domain_id` shares blobs (and their page cache) between layers;
    /// `refresh` updates the data plane's registry from the store.
    pub fn new(domain_id: Option<String>, refresh: RegistryRefresh) -> FscacheMounter {
        FscacheMounter {
            domain_id,
            refresh,
            lock: Mutex::new(std::collections::HashSet::new()),
            cull: None,
            continued: false,
        }
    }

    /// Marks the cache as taken over from a previous daemon: layer mounts found in place
    /// are served as they are, never remounted.
    pub fn continued(mut self, continued: bool) -> FscacheMounter {
        self.continued = continued;
        self
    }

    /// Frees cache files of removed layers and blobs through `dev`'s `cull` command;
    /// `cache_dir` is the directory the cache was bound to.
    pub fn with_cull(mut self, dev: Arc<dyn Device>, cache_dir: PathBuf) -> FscacheMounter {
        self.cull = Some((dev, cache_dir));
        self
    }

    fn refresh(&self) -> Result<(), MountError> {
        (self.refresh)().map_err(MountError::Registry)
    }
}

impl LayerMounter for FscacheMounter {
    fn name(&self) -> &'static str {
        "cachefiles"
    }

    fn mount(&self, layer: &LayerRecord, target: &Path) -> Result<(), MountError> {
        let mut mine = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let hex = layer.id_hex();
        if is_mountpoint(target) {
            if mine.contains(hex) {
                return Ok(());
            }
            if self.continued {
                // Mounted over this very cache by the daemon we took it from.
                self.refresh()?;
                mine.insert(hex.to_string());
                return Ok(());
            }
            tracing::info!(
                layer = %hex,
                "replacing a layer mount left by an earlier daemon (its cache is gone)"
            );
            unmount_dir(target)?;
        }
        self.refresh()?;
        fs::create_dir_all(target).map_err(io_err(target))?;
        let mut data = format!("fsid={hex}");
        if let Some(d) = &self.domain_id {
            data.push_str(&format!(",domain_id={d}"));
        }
        nix::mount::mount(
            Some("none"),
            target,
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|e| io_err(target)(e.into()))?;
        mine.insert(hex.to_string());
        Ok(())
    }

    fn unmount(&self, hex: &str, target: &Path) -> Result<(), MountError> {
        let mut mine = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        mine.remove(hex);
        unmount_dir(target)
    }

    fn refresh_registry(&self) -> Result<(), MountError> {
        self.refresh()
    }

    fn release_blobs(&self, store: &Store) -> Result<u64, MountError> {
        // Removed blobs leave the registry first, so no new OPEN finds them.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh()?;
        let Some((dev, cache_dir)) = &self.cull else {
            return Ok(0);
        };
        let layers = store.layers().map_err(|e| MountError::Io {
            path: cache_dir.clone(),
            source: io::Error::other(format!("reading the store's layers: {e}")),
        })?;
        // Cookie keys still in use: every layer's image (its fsid) and data blobs.
        let keys: std::collections::HashSet<&str> = layers
            .iter()
            .flat_map(|l| std::iter::once(l.id_hex()).chain(l.blobs.iter().map(String::as_str)))
            .collect();
        let live = |id: &str| keys.contains(id);
        let mut freed = 0;
        for pass in 0..CULL_PASSES {
            let r = cull_dead(&**dev, cache_dir, &live).map_err(|e| MountError::Io {
                path: cache_dir.clone(),
                source: e,
            })?;
            freed += r.volumes + r.files;
            if r.busy == 0 {
                break;
            }
            if pass + 1 == CULL_PASSES {
                tracing::info!(busy = r.busy, "cache entries still in use; culled later");
            } else {
                std::thread::sleep(CULL_RETRY);
            }
        }
        Ok(freed)
    }
}
