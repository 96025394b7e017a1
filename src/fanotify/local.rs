//! The `local` front end: every data blob materialized completely, up front, as a
//! plain file; layers mounted file-backed with no events at all. Always works (Linux
//! 6.12+ file-backed EROFS), never lazy: the fallback, and the speed limit the lazy
//! front ends are measured against.

use std::fs::{self, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fill::{Filler, PackFiller, Packs};
use super::FanotifyError;
use crate::store::{BlobSource, Registry};

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
