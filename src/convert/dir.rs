//! Converting an unpacked directory (a snapshot's upper dir, where overlayfs already
//! wrote whiteouts as 0:0 character devices and opaque directories as xattrs).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::pieces::{PieceError, PieceSender};
use super::{check_xattr, ConvertError, Parsed, Result};
use crate::erofs::{Kind, Meta, Node, NodeId, Tree};
use crate::store::{LayerRecord, Store, DEFAULT_CHUNK_BYTES};

/// The largest xattr list or value the kernel returns (XATTR_LIST_MAX, XATTR_SIZE_MAX).
const XATTR_MAX_BYTES: usize = 64 * 1024;
/// Overlay bookkeeping xattrs of an upper dir that mean nothing in a read-only layer.
const DROPPED_OVERLAY_XATTRS: [&[u8]; 5] = [
    b"trusted.overlay.origin",
    b"trusted.overlay.impure",
    b"trusted.overlay.nlink",
    b"trusted.overlay.upper",
    b"trusted.overlay.uuid",
];

/// Converts directory `dir` into the store as the layer `key` (`sha256:<64 hex>`, used as
/// both diff_id and digest), with the default chunk size. Symlinks are stored, never
/// followed; hard links (same inode) share a node.
pub fn convert_dir(store: &Store, dir: &Path, key: &str) -> Result<LayerRecord> {
    let valid = key.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !valid {
        return Err(ConvertError::Entry {
            layer: dir.to_path_buf(),
            entry: "(key)".into(),
            rule: format!("layer key {key:?} is not sha256:<64 lower-case hex>"),
        });
    }
    super::run(store, dir, DEFAULT_CHUNK_BYTES, |pieces| {
        let (tree, files) = walk(dir, pieces)?;
        Ok(Parsed {
            tree,
            digest: key.to_string(),
            diff_id: key.to_string(),
            files,
        })
    })?;
    store
        .layer(key)?
        .ok_or_else(|| ConvertError::UnknownLayer(key.to_string()))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn meta_of(path: &Path, md: &fs::Metadata) -> Result<Meta> {
    Ok(Meta {
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs: xattrs_of(path)?,
    })
}

/// Calls a size-returning xattr syscall into `buf`, growing it once if the size changed.
fn xattr_call(path: &Path, buf: &mut Vec<u8>, call: impl Fn(&mut [u8]) -> isize) -> Result<()> {
    for _ in 0..4 {
        let want = call(&mut []);
        if want < 0 {
            return Err(io_err(path)(std::io::Error::last_os_error()));
        }
        buf.resize((want as usize).min(XATTR_MAX_BYTES), 0);
        let got = call(buf);
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(io_err(path)(e));
        }
    }
    Err(io_err(path)(std::io::Error::other(
        "xattrs kept changing while being read",
    )))
}

fn xattrs_of(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| ConvertError::Entry {
        layer: path.to_path_buf(),
        entry: format!("{path:?}"),
        rule: "a path with a NUL byte".into(),
    })?;
    let mut list = Vec::new();
    xattr_call(path, &mut list, |buf| {
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call; `buf` is a
        // valid writable region of `buf.len()` bytes (a null pointer with size 0 asks for
        // the size only).
        unsafe {
            libc::llistxattr(
                c_path.as_ptr(),
                buf.as_mut_ptr().cast::<libc::c_char>(),
                buf.len(),
            )
        }
    })?;
    let mut out = BTreeMap::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if DROPPED_OVERLAY_XATTRS.contains(&name) {
            continue;
        }
        let c_name = CString::new(name).expect("split on NUL");
        let mut value = Vec::new();
        xattr_call(path, &mut value, |buf| {
            // SAFETY: both names are NUL-terminated strings alive for the call; `buf` is
            // writable for `buf.len()` bytes (null with 0 asks for the size).
            unsafe {
                libc::lgetxattr(
                    c_path.as_ptr(),
                    c_name.as_ptr(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            }
        })?;
        check_xattr(name, &value).map_err(|rule| ConvertError::Entry {
            layer: path.to_path_buf(),
            entry: format!("{path:?}"),
            rule,
        })?;
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

/// Builds the tree of `root`, sending file data down `pieces`. Returns it and the number
/// of entries.
fn walk(root: &Path, pieces: &mut PieceSender) -> Result<(Tree, u64)> {
    let md = fs::symlink_metadata(root).map_err(io_err(root))?;
    if !md.is_dir() {
        return Err(ConvertError::Entry {
            layer: root.to_path_buf(),
            entry: "\".\"".into(),
            rule: "not a directory".into(),
        });
    }
    let mut tree = Tree::new(meta_of(root, &md)?);
    let mut inodes: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(root.to_path_buf(), Tree::ROOT)];
    let mut files = 0u64;
    while let Some((dir_path, dir_id)) = stack.pop() {
        let mut names = Vec::new();
        for e in fs::read_dir(&dir_path).map_err(io_err(&dir_path))? {
            names.push(e.map_err(io_err(&dir_path))?.file_name());
        }
        names.sort();
        for name in names {
            let path = dir_path.join(&name);
            let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            files += 1;
            let key = (md.dev(), md.ino());
            if !md.is_dir() && md.nlink() > 1 {
                if let Some(&id) = inodes.get(&key) {
                    tree.link(dir_id, name.as_bytes(), id);
                    continue;
                }
            }
            let meta = meta_of(&path, &md)?;
            let ft = md.file_type();
            let dev = md.rdev();
            let (major, minor) = (
                nix::sys::stat::major(dev) as u32,
                nix::sys::stat::minor(dev) as u32,
            );
            let kind = if ft.is_dir() {
                Kind::Dir(BTreeMap::new())
            } else if ft.is_file() {
                let mut f = File::options()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let data = pieces.file(&mut f, md.len()).map_err(|e| match e {
                    PieceError::Read(e) => io_err(&path)(e),
                    PieceError::Short { got, want } => ConvertError::Entry {
                        layer: root.to_path_buf(),
                        entry: format!("{path:?}"),
                        rule: format!("file shrank while read: {got} of {want} bytes"),
                    },
                    PieceError::StoreGone => ConvertError::StoreStopped,
                    PieceError::TooManyChunks => ConvertError::Entry {
                        layer: root.to_path_buf(),
                        entry: format!("{path:?}"),
                        rule: "the layer has more than 2^32 chunks".into(),
                    },
                    PieceError::TooManyHoleChunks => {
                        unreachable!("a file read whole has no holes")
                    }
                })?;
                Kind::File(data)
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err(&path))?;
                Kind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() {
                Kind::CharDev { major, minor }
            } else if ft.is_block_device() {
                Kind::BlockDev { major, minor }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let is_dir = matches!(kind, Kind::Dir(_));
            let id = tree.insert(dir_id, name.as_bytes(), Node { meta, kind });
            if is_dir {
                stack.push((path, id));
            } else if md.nlink() > 1 {
                inodes.insert(key, id);
            }
        }
    }
    Ok((tree, files))
}
