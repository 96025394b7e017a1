//! `dedupd export`: a converted layer as plain files a stock kernel mounts with
//! `mount -t erofs -o device=BLOB IMAGE MNT`.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{ConvertError, Result};
use crate::store::{Store, BLOCK_BYTES};

/// The files `export` wrote.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Exported {
    /// The metadata image.
    pub image: PathBuf,
    /// The data blobs in device order.
    pub devices: Vec<PathBuf>,
}

/// Writes layer `key`'s image and its data blobs (chunks in slot order, each padded with
/// zeros to a block) into `outdir`, which is created if missing.
pub fn export(store: &Store, key: &str, outdir: &Path) -> Result<Exported> {
    let record = store
        .layer(key)?
        .ok_or_else(|| ConvertError::UnknownLayer(key.to_string()))?;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { path, source }
    };
    fs::create_dir_all(outdir).map_err(io_err(outdir))?;
    let image = outdir.join(format!("{}.erofs", record.id_hex()));
    fs::copy(store.image_path(record.id_hex()), &image).map_err(io_err(&image))?;
    let mut devices = Vec::with_capacity(record.blobs.len());
    let mut chunk = Vec::new();
    let zeros = [0u8; BLOCK_BYTES as usize];
    for id in &record.blobs {
        let entries = store
            .blob_entries(id)?
            .ok_or_else(|| ConvertError::UnknownLayer(format!("{key} (its blob {id})")))?;
        let path = outdir.join(format!("{id}.blob"));
        let file = File::create(&path).map_err(io_err(&path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        for e in &entries {
            store.read_chunk(&e.digest, &mut chunk)?;
            out.write_all(&chunk).map_err(io_err(&path))?;
            let pad = (BLOCK_BYTES - chunk.len() as u64 % BLOCK_BYTES) % BLOCK_BYTES;
            out.write_all(&zeros[..pad as usize])
                .map_err(io_err(&path))?;
        }
        out.flush().map_err(io_err(&path))?;
        devices.push(path);
    }
    Ok(Exported { image, devices })
}
