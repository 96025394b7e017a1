//! The kernel front ends: how a layer's EROFS image and data reach the kernel, and how
//! the kernel's page-cache misses reach the serving core ([`crate::serve`]).
//!
//! One folder per front end, each holding its kernel ABI, the front end the serving
//! engine drives, the mounter the snapshotter uses, and its failover:
//!
//! | front end | kernel path | ABI | engine side | mounter | failover |
//! |---|---|---|---|---|---|
//! | [`cachefiles`] | fscache on-demand (`/dev/cachefiles`) | `abi`, `msg` | `front` | [`cachefiles::FscacheMounter`] | `holder`, `failover` (fd store, `restore`) |
//! | [`fanotify`] | pre-content events (6.14+) over sparse blob files | `sys`, `event`, `respond` | `engine` | `fanotify::mounter` | `holder`, `journal` |
//! | [`local`] | file-backed EROFS over plain files | none | none (nothing is lazy) | [`local::LocalMounter`] | none needed |
//!
//! [`holder`] is what the holder processes of the lazy front ends share (fd passing over
//! a unix socket, peer checks).
//!
//! # Adding a front end (ublk, FUSE passthrough, ...)
//! A new folder here, with:
//! - the kernel ABI, parsed into checked messages (a message of the wrong size is an
//!   error naming it, never a panic);
//! - an implementation of [`crate::serve::FrontEnd`] (`poll_fd`, `next`, `complete`), so
//!   that fills go through the serving engine: verified bytes, registered buffers, one
//!   thread per core; the front end never reads the store itself on the hot path;
//! - an implementation of [`LayerMounter`] (this file), through which the snapshotter
//!   mounts, unmounts and releases layers; mount paths come from [`mount_dir`];
//! - failover: whatever keeps the kernel object alive while the daemon restarts (a holder
//!   process built on [`holder`], or the systemd fd store, see
//!   `crate::systemd`), and how a successor picks up requests in flight;
//! - its selection in `crate::daemon` (`--front-end`, and where `auto` tries it).
//!
//! # The mount interface
//! A converted layer's EROFS image becomes a directory overlay can stack: one mount per
//! layer at `ROOT/m/<slot>`, kept while any snapshot references the layer. The
//! snapshotter chooses where (a short number per layer, see
//! [`crate::snapshotter::meta`]); how depends on the daemon's front end, so it sits behind
//! [`LayerMounter`]: cachefiles mounts `-t erofs none -o fsid=...,domain_id=...`, fanotify
//! mounts sparse blob files it fills on demand, and `local` materializes the data blobs
//! as plain files and mounts the image file-backed.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::{LayerRecord, Store};

pub mod cachefiles;
pub mod fanotify;
pub mod holder;
pub mod local;

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

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where layers are mounted: `ROOT/m`, one directory per layer named by its mount slot.
/// Short on purpose: an overlay names every lower layer in one mount option string,
/// which must fit a page (see `crate::snapshotter::OVERLAY_WORST_DATA_BYTES`).
pub fn mount_dir(root: &Path) -> PathBuf {
    root.join(MOUNT_DIR)
}

/// The name of [`mount_dir`] under the root.
pub const MOUNT_DIR: &str = "m";

/// Where daemons before mount slots mounted layers: `ROOT/mnt/<layer hex>`. Mounts found
/// there at start are moved to [`mount_dir`] (see [`crate::snapshotter::Snapshotter::open`]).
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
    /// Unmounts layer `hex` from `target` unless something uses the mount (an overlay
    /// stacked on it, a process inside): never detached. Ok(false) when it is busy; the
    /// directory stays, and the next mount of the layer uses it again.
    fn unmount_unused(&self, hex: &str, target: &Path) -> Result<bool, MountError>;
    /// Frees what the front end keeps on disk for `layers` (cache files, filled blob
    /// files), none of which is mounted, except blobs named in `keep` (mounted layers use
    /// them). A later mount reads them through the front end again. Returns the files
    /// freed.
    fn free_copies(
        &self,
        _layers: &[LayerRecord],
        _keep: &std::collections::HashSet<String>,
    ) -> Result<u64, MountError> {
        Ok(0)
    }
    /// Bytes the front end keeps on disk for `layers` (see [`LayerMounter::free_copies`]).
    fn copy_bytes(&self, _layers: &[LayerRecord]) -> u64 {
        0
    }
    /// Bytes of all the front end's files, when a walk of its directory would not see
    /// them all (`None`: the walk is right).
    fn files_bytes(&self) -> Option<u64> {
        None
    }
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

/// Unmounts `path` if nothing uses it (never detached): Ok(false) when busy. The
/// directory stays.
pub fn unmount_if_unused(path: &Path) -> Result<bool, MountError> {
    if !is_mountpoint(path) {
        return Ok(true);
    }
    match nix::mount::umount2(path, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EBUSY) => Ok(false),
        Err(e) => Err(io_err(path)(e.into())),
    }
}

/// Allocated bytes of the file at `path` (0 when there is none).
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Makes the daemon's blob registry match the store (called before a layer is mounted, so
/// the kernel's OPEN of its image and blobs finds them, and after layers are removed).
pub type RegistryRefresh = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
