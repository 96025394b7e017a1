//! The snapshotter's [`LayerMounter`] for the cachefiles front end.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::cull::{cull_dead, file_bytes_by_key, Listings};
use super::front::CachefilesFront;
use super::Device;
use crate::frontend::{
    io_err, is_mountpoint, unmount_dir, unmount_if_unused, LayerMounter, MountError,
    RegistryRefresh,
};
use crate::store::{LayerRecord, Store};

/// The `cachefiles` front end: layers mounted as EROFS over fscache
/// (`mount -t erofs none -o fsid=<layer hex>[,domain_id=<domain>]`); the kernel asks the
/// daemon's data plane for the image and its blobs by name, lazily. Not exercised on a
/// kernel without on-demand cachefiles (this host); the VM suite is where it runs.
///
/// A mount outlives the daemon that made it, and so does its cache while a copy of the
/// device fd lives on (`crate::frontend::cachefiles::failover`): a daemon that took the cache over
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
    /// The data plane's front end, whose open objects are the cache files of mounted
    /// layers (counted by [`LayerMounter::copy_bytes`]).
    front: Option<Arc<CachefilesFront>>,
    /// What the last walk of the cache directory listed (see [`Listings`]).
    listings: Mutex<Listings>,
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
            front: None,
            listings: Mutex::default(),
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

    /// Counts the cache files of mounted layers through `front`'s open objects.
    pub fn with_front(mut self, front: Arc<CachefilesFront>) -> FscacheMounter {
        self.front = Some(front);
        self
    }

    /// Culls, in passes while the kernel still withdraws them (`EBUSY`), every cache
    /// entry whose key `live` refuses. Returns the entries culled.
    fn cull_passes(&self, live: &(dyn Fn(&str) -> bool + Sync)) -> Result<u64, MountError> {
        let Some((dev, cache_dir)) = &self.cull else {
            return Ok(0);
        };
        let mut freed = 0;
        for pass in 0..CULL_PASSES {
            let r = cull_dead(&**dev, cache_dir, live).map_err(|e| MountError::Io {
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

    /// Bytes of the cache files whose cookie key `wanted` accepts, linked or open
    /// (`None` without a cache directory).
    fn bytes_of(&self, wanted: &dyn Fn(&str) -> bool) -> Option<u64> {
        let (_, cache_dir) = self.cull.as_ref()?;
        let mut listings = self.listings.lock().unwrap_or_else(|p| p.into_inner());
        let linked = match file_bytes_by_key(cache_dir, wanted, &mut listings) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(dir = %cache_dir.display(), "counting cache files: {e}");
                Default::default()
            }
        };
        drop(listings);
        let open = self
            .front
            .as_ref()
            .map(|f| f.open_data_bytes(wanted))
            .unwrap_or_default();
        // An object reopened from a linked file is seen both ways: the larger counts.
        let keys: HashSet<&String> = linked.keys().chain(open.keys()).collect();
        Some(
            keys.into_iter()
                .map(|k| {
                    let a = linked.get(k).copied().unwrap_or(0);
                    let b = open.get(k).copied().unwrap_or(0);
                    a.max(b)
                })
                .sum(),
        )
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

    fn unmount_unused(&self, hex: &str, target: &Path) -> Result<bool, MountError> {
        let mut mine = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let done = unmount_if_unused(target)?;
        if done {
            mine.remove(hex);
        }
        Ok(done)
    }

    /// Culls the volumes of `layers` (unmounted: the kernel withdraws their objects and
    /// links their files into the cache) and their blobs' files, except blobs in `keep`.
    /// A later mount makes the cookies again and the kernel asks for every range anew.
    fn free_copies(
        &self,
        layers: &[LayerRecord],
        keep: &HashSet<String>,
    ) -> Result<u64, MountError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dead: HashSet<&str> = layers
            .iter()
            .flat_map(|l| std::iter::once(l.id_hex()).chain(l.blobs.iter().map(String::as_str)))
            .filter(|k| !keep.contains(*k))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        self.cull_passes(&|k: &str| !dead.contains(k))
    }

    fn copy_bytes(&self, layers: &[LayerRecord]) -> u64 {
        let keys: HashSet<&str> = layers
            .iter()
            .flat_map(|l| std::iter::once(l.id_hex()).chain(l.blobs.iter().map(String::as_str)))
            .collect();
        self.bytes_of(&|k: &str| keys.contains(k)).unwrap_or(0)
    }

    fn files_bytes(&self) -> Option<u64> {
        self.bytes_of(&|_| true)
    }

    fn refresh_registry(&self) -> Result<(), MountError> {
        self.refresh()
    }

    fn release_blobs(&self, store: &Store) -> Result<u64, MountError> {
        // Removed blobs leave the registry first, so no new OPEN finds them.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh()?;
        let Some((_, cache_dir)) = &self.cull else {
            return Ok(0);
        };
        let layers = store.layers().map_err(|e| MountError::Io {
            path: cache_dir.clone(),
            source: io::Error::other(format!("reading the store's layers: {e}")),
        })?;
        // Cookie keys still in use: every layer's image (its fsid) and data blobs.
        let keys: HashSet<&str> = layers
            .iter()
            .flat_map(|l| std::iter::once(l.id_hex()).chain(l.blobs.iter().map(String::as_str)))
            .collect();
        let live = |id: &str| keys.contains(id);
        self.cull_passes(&live)
    }
}
