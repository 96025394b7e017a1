//! The one place the snapshotter turns a committed directory into a converted layer:
//! [`convert_layer`] hands the tree to the layer conversion of [`crate::convert`]
//! (`convert_dir`: EROFS metadata image plus deduplicated chunks in the store).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::store::{LayerRecord, Store};

/// Most directory entries a tree may hold for [`disk_usage`] (bounds the walk).
pub const MAX_LAYER_ENTRIES: u64 = 16 << 20;

/// Errors of conversion. Messages name the layer or path.
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
    /// The conversion failed.
    #[error("layer {layer}: {source}")]
    Convert {
        /// Layer hex id.
        layer: String,
        /// The cause.
        #[source]
        source: Box<crate::convert::ConvertError>,
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

/// Converts the tree at `dir` (overlay whiteouts and opaque xattrs included) into layer
/// `hex` of `store` (diff_id `sha256:<hex>`) and returns its record.
pub fn convert_layer(store: &Store, dir: &Path, hex: &str) -> Result<LayerRecord, ConvertError> {
    crate::convert::convert_dir(store, dir, &format!("sha256:{hex}")).map_err(|source| {
        ConvertError::Convert {
            layer: hex.to_string(),
            source: Box::new(source),
        }
    })
}
