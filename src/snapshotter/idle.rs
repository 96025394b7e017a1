//! Idle lazy layers: the front end's copies of lazily pulled layers that no container
//! uses, for the bounded cache (`crate::daemon::cache_limit`).
//!
//! What the kernel reads of a lazily pulled layer is also kept by the front end: the
//! cachefiles cache files, or the fanotify blob files. The kernel serves those without
//! asking, so they can be freed only while nothing has them open, which for a mounted
//! layer is never. A committed layer stays mounted while its image exists; one that no
//! active or view snapshot stands on is unmounted here (never detached: a busy mount
//! stays, and so does one that an overlay in this namespace names as a lower layer),
//! and its copies are freed through the front end's own means. The next
//! Prepare, View or Mounts that needs it mounts it again ([`Snapshotter::mounts_of`]),
//! and its reads are filled again from the store or the registry.
//!
//! [`Snapshotter::create`] and [`Snapshotter::mounts`] hold `mount_use` for reading
//! from the first mount they make to the mounts they return, and a release holds it for
//! writing (or does nothing, if it cannot have it at once), so no mount list is ever
//! handed out over a layer being unmounted. Once
//! returned, the list belongs to an active or view snapshot, whose layers are never
//! idle.

use std::collections::HashSet;
use std::path::PathBuf;

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

    /// Grows with every Remove: the set of idle layers may have changed since.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Unmounts every lazily pulled layer that no active or view snapshot stands on,
    /// and frees the front end's copies of those layers (blobs that a mounted layer also
    /// names are kept). Gives up at once (Ok(None)) while a Prepare, View, Mounts,
    /// Commit or Remove is under way: a writer waiting here would hold up every new
    /// Prepare behind a conversion or a download; the next pass tries again.
    pub fn release_idle(&self) -> Result<Option<Released>, SnapError> {
        let Some(_use) = try_guard(self.mount_use.try_write()) else {
            return Ok(None);
        };
        let Some(_layers) = try_guard(self.layers_lock.try_lock()) else {
            return Ok(None);
        };
        // Overlayfs stacks on private clones of its lower mounts, so a layer mount
        // unmounts even while an overlay stands on it: an overlay naming it (one that
        // outlived its snapshot) makes it busy here.
        let stacked = overlay_lowers();
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
                (Some(t), true) if stacked.contains(t) => {
                    r.busy += 1;
                    false
                }
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
        {
            // A layer mounted again is prefetched again.
            let mut p = self.prefetching.lock().unwrap_or_else(|p| p.into_inner());
            for l in &idle {
                p.remove(l.id_hex());
            }
        }
        r.files = self.mounter.free_copies(&idle, &keep).map_err(internal)?;
        Ok(Some(r))
    }
}

/// The guard of a `try_read`/`try_write`/`try_lock`, `None` when it would block (a
/// poisoned lock is taken: its data is `()`).
fn try_guard<G>(r: std::sync::TryLockResult<G>) -> Option<G> {
    match r {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Lower directories of the overlays in this mount namespace (`lowerdir=` of
/// `/proc/self/mountinfo`, absolute paths only; octal escapes undone).
fn overlay_lowers() -> HashSet<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| overlay_lowers_in(&t))
        .unwrap_or_default()
}

fn overlay_lowers_in(info: &str) -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    for line in info.lines() {
        let Some((_, tail)) = line.split_once(" - ") else {
            continue;
        };
        let mut f = tail.split(' ');
        if f.next() != Some("overlay") {
            continue;
        }
        let opts = f.nth(1).unwrap_or("");
        for o in opts.split(',') {
            let Some(dirs) = o.strip_prefix("lowerdir=") else {
                continue;
            };
            for d in dirs.split(':').filter(|d| d.starts_with('/')) {
                out.insert(PathBuf::from(unescape(d)));
            }
        }
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_dirs_of_overlays_are_read_from_mountinfo() {
        let info = "\
36 25 0:33 / /r/m/1 ro,nodev shared:1 - erofs none ro,fsid=abcd
40 25 0:37 / /c/rootfs rw shared:5 - overlay overlay rw,index=off,workdir=/r/s/9/work,upperdir=/r/s/9/fs,lowerdir=/r/m/3:/r/m/1
41 25 0:38 / /c/v ro shared:6 - overlay overlay ro,lowerdir=/r/m/with\\040space:rel/4
42 25 0:39 / /x rw shared:7 - ext4 /dev/vda rw,lowerdir=/not/an/overlay
";
        let got = overlay_lowers_in(info);
        let want: HashSet<PathBuf> = ["/r/m/3", "/r/m/1", "/r/m/with space"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(got, want);
    }
}
