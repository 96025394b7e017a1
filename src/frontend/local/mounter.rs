//! The snapshotter's [`LayerMounter`] for the `local` front end.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::frontend::{io_err, is_mountpoint, unmount_dir, LayerMounter, MountError};
use crate::store::{LayerRecord, Store};

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

    fn unmount_unused(&self, _hex: &str, target: &Path) -> Result<bool, MountError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        crate::frontend::unmount_if_unused(target)
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
