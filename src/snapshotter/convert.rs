//! The one place the snapshotter turns a committed directory into a converted layer.
//!
//! The layer conversion module (`crate::convert`) is being written in parallel; until its
//! `convert_dir` lands, this adapter builds the layer's EROFS image with `mkfs.erofs`
//! (erofs-utils) and records it in the store as a layer whose file data is inline in the
//! image (no data blobs, no chunks). Everything around it (store record, mounts, GC) is
//! the final code path; swapping in `convert_dir` changes only [`convert_layer`].

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::store::{LayerCommit, LayerRecord, Store};

/// Most directory entries one layer may hold (bounds the walks).
pub const MAX_LAYER_ENTRIES: u64 = 16 << 20;

/// Errors of conversion. Messages name the layer.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// I/O on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image builder failed.
    #[error("layer {layer}: mkfs.erofs failed: {why}")]
    Mkfs {
        /// Layer hex id.
        layer: String,
        /// Its exit status and output.
        why: String,
    },
    /// The store refused the layer.
    #[error("layer {layer}: {source}")]
    Store {
        /// Layer hex id.
        layer: String,
        /// The cause.
        #[source]
        source: Box<crate::store::StoreError>,
    },
    /// The tree exceeds [`MAX_LAYER_ENTRIES`].
    #[error("{path}: more than {MAX_LAYER_ENTRIES} entries")]
    TooLarge {
        /// The directory.
        path: std::path::PathBuf,
    },
}

/// Bytes (allocated, each inode once) and inodes of the tree at `dir`, as containerd's
/// `fs.DiskUsage` counts them.
pub fn disk_usage(dir: &Path) -> Result<(u64, u64), ConvertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { path, source }
    };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut inodes) = (0u64, 0u64);
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).map_err(io(&p))?;
        if seen.insert((m.dev(), m.ino())) {
            bytes += m.blocks() * 512;
            inodes += 1;
            if inodes > MAX_LAYER_ENTRIES {
                return Err(ConvertError::TooLarge {
                    path: dir.to_path_buf(),
                });
            }
        }
        if m.is_dir() {
            for e in fs::read_dir(&p).map_err(io(&p))? {
                stack.push(e.map_err(io(&p))?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Logical bytes of regular files and the entry count of the tree at `dir`.
fn file_totals(dir: &Path) -> Result<(u64, u64), ConvertError> {
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut entries) = (0u64, 0u64);
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).map_err(|source| ConvertError::Io {
            path: p.clone(),
            source,
        })?;
        entries += 1;
        if entries > MAX_LAYER_ENTRIES {
            return Err(ConvertError::TooLarge {
                path: dir.to_path_buf(),
            });
        }
        if m.is_file() {
            bytes += m.len();
        } else if m.is_dir() {
            let rd = fs::read_dir(&p).map_err(|source| ConvertError::Io {
                path: p.clone(),
                source,
            })?;
            for e in rd {
                stack.push(
                    e.map_err(|source| ConvertError::Io {
                        path: p.clone(),
                        source,
                    })?
                    .path(),
                );
            }
        }
    }
    Ok((bytes, entries))
}

/// Converts the tree at `dir` (overlay whiteouts and opaque xattrs included) into layer
/// `hex` of `store` and returns its record.
pub fn convert_layer(
    store: &Store,
    dir: &Path,
    hex: &str,
    chunk_bytes: u32,
) -> Result<LayerRecord, ConvertError> {
    let (logical_bytes, files) = file_totals(dir)?;
    let tmp = store.root().join("layers").join(format!("{hex}.tmp"));
    let out = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg("--preserve-mtime")
        .arg(&tmp)
        .arg(dir)
        .output()
        .map_err(|source| ConvertError::Io {
            path: "mkfs.erofs".into(),
            source,
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(ConvertError::Mkfs {
            layer: hex.to_string(),
            why: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let image_bytes = fs::metadata(&tmp)
        .map_err(|source| ConvertError::Io {
            path: tmp.clone(),
            source,
        })?
        .len();
    let store_err = |source| ConvertError::Store {
        layer: hex.to_string(),
        source: Box::new(source),
    };
    let ingest = store.ingest().map_err(store_err)?;
    let record = LayerRecord {
        diff_id: format!("sha256:{hex}"),
        digests: Vec::new(),
        blobs: Vec::new(),
        chunk_bytes,
        image_bytes,
        files,
        chunks: 0,
        new_chunks: 0,
        logical_bytes,
        stored_bytes: 0,
    };
    ingest
        .commit(LayerCommit {
            record,
            image_tmp: &tmp,
            blobs: Vec::new(),
        })
        .map_err(store_err)
}
