//! Idle lazy layers: the front end's copies of lazily pulled layers that no container
//! uses, for the bounded cache (`crate::daemon::cache_limit`).
//!
//! What the kernel reads of a lazily pulled layer is also kept by the front end: the
//! cachefiles cache files, or the fanotify blob files. The kernel serves those without
//! asking, so they can be freed only while nothing has them open, which for a mounted
//! layer is never. A committed layer stays mounted while its image exists; one that no
//! active or view snapshot stands on is unmounted here (never detached: a busy mount
//! stays), and its copies are freed through the front end's own means. The next
//! Prepare, View or Mounts that needs it mounts it again ([`Snapshotter::mounts_of`]),
//! and its reads are filled again from the store or the registry.
//!
//! [`Snapshotter::create`] and [`Snapshotter::mounts`] hold `mount_use` for reading
//! from the first mount they make to the mounts they return, and a release holds it for
//! writing, so no mount list is ever handed out over a layer being unmounted. Once
//! returned, the list belongs to an active or view snapshot, whose layers are never
//! idle.

use std::collections::HashSet;

use super::{frontend, internal, Kind, SnapError, Snapshotter};
use crate::store::LayerRecord;

/// What one release did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Lazily pulled layers unmounted.
    pub unmounted: u64,
    /// Of the idle ones, those still busy (something holds the mount).
    pub busy: u64,
    /// Front-end files freed.
    pub files: u64,
}

impl Snapshotter {
    /// The layers that lazily pulled committed snapshots name.
    fn lazy_layers(&self) -> Result<Vec<LayerRecord>, SnapError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (_, s) in self.meta.list()? {
            let Some(hex) = s.layer else { continue };
            if !seen.insert(hex.clone()) {
                continue;
            }
            if let Some(r) = self.store.layer(&hex).map_err(internal)? {
                if r.remote.is_some() {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Bytes the front end keeps on disk for lazily pulled layers (mounted or not).
    pub fn lazy_copy_bytes(&self) -> Result<u64, SnapError> {
        Ok(self.mounter.copy_bytes(&self.lazy_layers()?))
    }

    /// Bytes of every file the front end keeps, when it counts them itself (see
    /// [`crate::frontend::LayerMounter::files_bytes`]).
    pub fn front_end_bytes(&self) -> Option<u64> {
        self.mounter.files_bytes()
    }

    /// Unmounts every lazily pulled layer that no active or view snapshot stands on,
    /// and frees the front end's copies of those layers (blobs that a mounted layer also
    /// names are kept).
    pub fn release_idle(&self) -> Result<Released, SnapError> {
        let _use = self.mount_use.write().unwrap_or_else(|p| p.into_inner());
        let _layers = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
        let snaps = self.meta.list()?;
        let mut used = HashSet::new();
        for (_, s) in &snaps {
            if s.kind == Kind::Committed {
                continue;
            }
            for (_, a) in self.meta.ancestors(&s.parent)? {
                used.extend(a.layer);
            }
        }
        let mut r = Released::default();
        let mut idle = Vec::new();
        let mut keep = HashSet::new();
        let mut seen = HashSet::new();
        for (_, s) in &snaps {
            let Some(hex) = &s.layer else { continue };
            if !seen.insert(hex.clone()) {
                continue;
            }
            let Some(record) = self.store.layer(hex).map_err(internal)? else {
                continue;
            };
            let target = self.layer_mountpoint(hex)?;
            let mounted = target.as_deref().is_some_and(frontend::is_mountpoint);
            let lazy = record.remote.is_some();
            let free = match (&target, mounted) {
                _ if !lazy || used.contains(hex) => false,
                (Some(t), true) => match self.mounter.unmount_unused(hex, t) {
                    Ok(true) => {
                        r.unmounted += 1;
                        tracing::info!(layer = %hex, "idle lazily pulled layer unmounted");
                        true
                    }
                    Ok(false) => {
                        r.busy += 1;
                        false
                    }
                    Err(e) => {
                        tracing::warn!(layer = %hex, "unmounting an idle layer: {e}");
                        false
                    }
                },
                _ => true,
            };
            if free {
                idle.push(record);
            } else {
                keep.extend(record.blobs.iter().cloned());
            }
        }
        r.files = self.mounter.free_copies(&idle, &keep).map_err(internal)?;
        Ok(r)
    }
}
