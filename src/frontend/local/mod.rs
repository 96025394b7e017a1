//! The `local` front end: every data blob materialized completely, up front, as a
//! plain file; layers mounted file-backed with no events at all. Always works (Linux
//! 6.12+ file-backed EROFS), never lazy: the fallback, and the speed limit the lazy
//! front ends are measured against. No kernel ABI and nothing to fail over: a mount
//! reads plain files, whether a daemon runs or not.
//!
//! [`materialize`] writes a whole registry's blobs (`dedupd fanotify local`, the
//! benches); [`LocalMounter`] is the snapshotter's way in, one layer at a time. Both
//! read through the fanotify front end's [`PackFiller`], which verifies every chunk.

use std::fs::{self, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::frontend::fanotify::fill::{Filler, PackFiller, Packs};
use crate::frontend::fanotify::FanotifyError;
use crate::store::{BlobSource, Registry};

mod mounter;

pub use self::mounter::LocalMounter;

/// Writes every data blob of `registry` to `<dir>/<blob id>` (write to a temporary,
/// fsync, rename; blobs already there with the right size are kept). Every chunk is
/// verified; a corrupt or missing one fails the blob, by name. Returns the blob paths
/// by id.
pub fn materialize(
    registry: &Registry,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>, FanotifyError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FanotifyError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let packs: Arc<Packs> = Packs::open(registry).map_err(io_err(dir))?;
    let mut filler = PackFiller::new(packs);
    let mut out = Vec::new();
    let mut ids: Vec<&String> = registry.blobs.keys().collect();
    ids.sort();
    for id in ids {
        let BlobSource::Chunked(table) = &*registry.blobs[id] else {
            continue;
        };
        let path = dir.join(id);
        let done = fs::metadata(&path).is_ok_and(|m| m.len() == table.size_bytes());
        if !done {
            let tmp = dir.join(format!("{id}.tmp"));
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.set_len(table.size_bytes()).map_err(io_err(&tmp))?;
            filler
                .fill(table, 0, table.size_bytes(), f.as_fd())
                .map_err(|e| FanotifyError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            f.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        out.push((id.clone(), path));
    }
    Ok(out)
}
