//! The snapshotter's [`LayerMounter`] for the fanotify front end: layers mounted
//! file-backed over sparse blob files that the running [`FanotifyFrontEnd`] fills on
//! pre-content events.
//!
//! A layer committed while the daemon runs names blobs the front end does not serve yet.
//! The front end takes its blob set at start, so the mounter restarts it over the
//! store's current registry (the holder keeps the group and its marks across the
//! restart, exactly as across a daemon restart: mounted layers stall for the moment of
//! the hand-over, they never read a hole). Only when every blob of the layer has a
//! prepared, marked file is the image mounted, with mount(2), never a loop device.
//! Released blobs lose their files (and with the inode, their marks).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{blobfile, mount, FanotifyFrontEnd, Options, Stats};
use crate::frontend::{self, is_mountpoint, unmount_dir, MountError};
use crate::snapshotter::LayerMounter;
use crate::store::{LayerRecord, Store};

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct State {
    /// `None` only if a restart failed; the next mount tries again.
    fe: Option<FanotifyFrontEnd>,
    /// Layers this process mounted (a mount found at start is reused only when the
    /// group was continued from the previous daemon).
    mounted_here: HashSet<String>,
    /// Front-end restarts (blob set changes).
    restarts: u64,
    /// Counters of front ends stopped by restarts, so that totals never go back.
    past: Stats,
    /// Blobs in the registry the front end was started over.
    blobs: u64,
    /// Blob files of idle layers were deleted ([`LayerMounter::free_copies`]): a
    /// superblock nobody can see (an overlay detached while a file was open) may still
    /// read their old inodes, so the group is never released at shutdown.
    freed: bool,
}

/// Mounts layers over the fanotify front end it owns.
pub struct FanotifyMounter {
    store: Arc<Store>,
    opts: Options,
    /// Where the snapshotter mounts layers (`ROOT/m`): a layer still mounted there keeps
    /// the group alive at shutdown.
    mnt_dir: PathBuf,
    state: Mutex<State>,
}

impl FanotifyMounter {
    /// Starts the front end over every blob the store has (blob files prepared and
    /// marked, the holder attached or started); layers are mounted under
    /// `<store root>/m`.
    pub fn start(store: Arc<Store>, opts: Options) -> Result<FanotifyMounter, MountError> {
        let mnt_dir = frontend::mount_dir(store.root());
        fs::create_dir_all(&mnt_dir).map_err(io_err(&mnt_dir))?;
        let registry = store.registry().map_err(|source| MountError::Store {
            layer: "-".into(),
            source: Box::new(source),
        })?;
        let fe = FanotifyFrontEnd::start(&registry, &opts).map_err(|e| MountError::Io {
            path: opts.cache_dir.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(FanotifyMounter {
            store,
            opts,
            mnt_dir,
            state: Mutex::new(State {
                fe: Some(fe),
                mounted_here: HashSet::new(),
                restarts: 0,
                blobs: registry.blobs.len() as u64,
                past: Stats::default(),
                freed: false,
            }),
        })
    }

    /// The front end's counters (zeros while it is down).
    pub fn stats(&self) -> Stats {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = st
            .fe
            .as_ref()
            .map(FanotifyFrontEnd::stats)
            .unwrap_or_default();
        s.accumulate(&st.past);
        s
    }

    /// Blobs of the registry the front end serves (the last one it was started over).
    pub fn registered_blobs(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).blobs
    }

    /// Restarts the front end over the store's current blobs.
    pub fn reload(&self) -> Result<(), MountError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.restart(&mut st)
    }

    fn restart(&self, st: &mut State) -> Result<(), MountError> {
        let registry = self.store.registry().map_err(|source| MountError::Store {
            layer: "-".into(),
            source: Box::new(source),
        })?;
        if let Some(old) = st.fe.take() {
            // Not released: the holder keeps the group (and every mark) for the successor.
            let done = old.shutdown(false);
            st.past.accumulate(&done);
        }
        let fe = FanotifyFrontEnd::start(&registry, &self.opts).map_err(|e| MountError::Io {
            path: self.opts.cache_dir.clone(),
            source: io::Error::other(format!("restarting the fanotify front end: {e}")),
        })?;
        st.restarts += 1;
        st.blobs = registry.blobs.len() as u64;
        tracing::info!(
            blobs = registry.blobs.len(),
            restarts = st.restarts,
            "fanotify front end now serves the store's current blobs"
        );
        st.fe = Some(fe);
        Ok(())
    }

    /// Stops the front end. The group is released (the holder exits) only when no
    /// layer is mounted any more and this daemon deleted no blob file of an idle layer; otherwise the holder keeps it for a successor and
    /// fails reads with EIO after its grace period.
    pub fn shutdown(&self) -> Stats {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mounted = fs::read_dir(&self.mnt_dir)
            .map(|rd| rd.flatten().any(|e| is_mountpoint(&e.path())))
            .unwrap_or(true);
        let release = !mounted && !st.freed;
        let mut s = match st.fe.take() {
            Some(fe) => fe.shutdown(release),
            None => Stats::default(),
        };
        s.accumulate(&st.past);
        s
    }
}

impl LayerMounter for FanotifyMounter {
    fn name(&self) -> &'static str {
        "fanotify"
    }

    fn mount(&self, layer: &LayerRecord, target: &Path) -> Result<(), MountError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let hex = layer.id_hex().to_string();
        if is_mountpoint(target) {
            let continued = st.fe.as_ref().is_some_and(FanotifyFrontEnd::continued);
            if st.mounted_here.contains(&hex) || continued {
                return Ok(());
            }
            // Mounted under a group that is gone: holes may have read as zeros.
            tracing::warn!(
                "{} was mounted under a lost group; detaching it",
                target.display()
            );
            mount::unmount(target, true).map_err(io_err(target))?;
        }
        let served = |st: &State| {
            st.fe
                .as_ref()
                .is_some_and(|fe| layer.blobs.iter().all(|b| fe.blob_path(b).is_some()))
        };
        if !served(&st) {
            // New blobs (a layer committed since the front end started): prepare and
            // mark their files before anything can open them.
            self.restart(&mut st)?;
        }
        let fe = st.fe.as_ref().ok_or_else(|| MountError::Io {
            path: self.opts.cache_dir.clone(),
            source: io::Error::other("fanotify front end is down"),
        })?;
        let mut devices = Vec::with_capacity(layer.blobs.len());
        for id in &layer.blobs {
            let p = fe.blob_path(id).ok_or_else(|| MountError::MissingBlob {
                layer: hex.clone(),
                blob: id.clone(),
            })?;
            devices.push(p.to_path_buf());
        }
        let image = self.store.image_path(&hex);
        mount::mount_erofs(&image, &devices, target).map_err(io_err(&image))?;
        st.mounted_here.insert(hex);
        Ok(())
    }

    fn unmount(&self, hex: &str, target: &Path) -> Result<(), MountError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.mounted_here.remove(hex);
        unmount_dir(target)
    }

    fn unmount_unused(&self, hex: &str, target: &Path) -> Result<bool, MountError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let done = frontend::unmount_if_unused(target)?;
        if done {
            st.mounted_here.remove(hex);
        }
        Ok(done)
    }

    /// Deletes the filled blob files of `layers` (not mounted), then restarts the front
    /// end, which makes each of them again: empty, sparse, and marked before any mount
    /// can open it, so every read of it raises an event again. A file marked while a
    /// mount already had it open would raise none, which is why a mounted layer's files
    /// are never freed. Files with nothing allocated are left alone (no restart for them).
    fn free_copies(
        &self,
        layers: &[LayerRecord],
        keep: &HashSet<String>,
    ) -> Result<u64, MountError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = 0;
        let mut first_err = None;
        for id in layers.iter().flat_map(|l| l.blobs.iter()) {
            let path = blobfile::blob_path(&self.opts.cache_dir, id);
            if keep.contains(id) || frontend::allocated_bytes(&path) == 0 {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => gone += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(io_err(&path)(e));
                }
            }
        }
        if gone > 0 {
            st.freed = true;
        }
        // Also after a failure, and when an earlier restart failed: the front end must
        // not go on naming files that are gone.
        if gone > 0 || st.fe.is_none() {
            // The old front end's open files (and the holder's write fds, which the new
            // one finds stale and drops) are what still keeps the deleted inodes.
            self.restart(&mut st)?;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(gone),
        }
    }

    fn copy_bytes(&self, layers: &[LayerRecord]) -> u64 {
        let blobs: HashSet<&String> = layers.iter().flat_map(|l| l.blobs.iter()).collect();
        blobs
            .into_iter()
            .map(|id| frontend::allocated_bytes(&blobfile::blob_path(&self.opts.cache_dir, id)))
            .sum()
    }

    fn release_blobs(&self, store: &Store) -> Result<u64, MountError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let dir = blobfile::blob_path(&self.opts.cache_dir, "x")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.opts.cache_dir.clone());
        let mut gone = Vec::new();
        match fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd {
                    let e = e.map_err(io_err(&dir))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    let keep = store.has_blob(&name).map_err(|source| MountError::Store {
                        layer: "-".into(),
                        source: Box::new(source),
                    })?;
                    if !keep {
                        gone.push(e.path());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        if gone.is_empty() {
            return Ok(0);
        }
        // The front end keeps the files open: restart it without them, then delete them
        // (the inode goes, and its mark with it).
        self.restart(&mut st)?;
        for p in &gone {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(p)(e)),
            }
        }
        Ok(gone.len() as u64)
    }
}
