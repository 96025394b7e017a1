//! Sparse blob files and the map of which of their pages hold data.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::FanotifyError;
use crate::store::BLOCK_BYTES;

/// Page size of the fill bitmap: the EROFS block, and the unit of every write.
pub const PAGE_BYTES: u64 = BLOCK_BYTES;

/// Filesystems whose regular files accept pre-content marks and back EROFS file mounts.
const SUPPORTED_FS: [(i64, &str); 3] = [
    (0xef53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683e_u32 as i32 as i64, "btrfs"),
];

/// Name of a filesystem magic, for messages.
fn fs_name(magic: i64) -> String {
    match magic {
        0x0102_1994 => "tmpfs".into(),
        0x6969 => "nfs".into(),
        0x794c_7630 => "overlayfs".into(),
        m => SUPPORTED_FS
            .iter()
            .find(|(x, _)| *x == m)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("filesystem magic {m:#x}")),
    }
}

/// Refuses a cache directory that is not on ext4, xfs or btrfs (tmpfs refuses the
/// marks; other filesystems are untested).
pub fn check_cache_fs(dir: &Path) -> Result<(), FanotifyError> {
    let st = nix::sys::statfs::statfs(dir).map_err(|e| FanotifyError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let magic = st.filesystem_type().0 as i64;
    let magic32 = magic as u32 as i32 as i64;
    if SUPPORTED_FS
        .iter()
        .any(|(m, _)| *m == magic || *m == magic32)
    {
        return Ok(());
    }
    Err(FanotifyError::UnsupportedFs {
        dir: dir.to_path_buf(),
        fs: fs_name(magic),
    })
}

/// Creates (or keeps) the sparse blob file `path` of exactly `size_bytes`. An existing
/// file of another size is emptied first: its bytes belong to some other table.
pub fn prepare(path: &Path, size_bytes: u64) -> Result<File, FanotifyError> {
    let io_err = |source| FanotifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| FanotifyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len != size_bytes {
        file.set_len(0).map_err(io_err)?;
        file.set_len(size_bytes).map_err(io_err)?;
    }
    Ok(file)
}

/// Which pages of a blob file hold data. Shared by the workers; bits are only ever set
/// (a hole never comes back while the daemon runs).
#[derive(Debug)]
pub struct PageMap {
    bits: Vec<AtomicU64>,
    pages: u64,
    filled: AtomicU64,
}

impl PageMap {
    /// An empty map for `size_bytes` (rounded up to a page).
    pub fn new(size_bytes: u64) -> PageMap {
        let pages = size_bytes.div_ceil(PAGE_BYTES);
        PageMap {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            filled: AtomicU64::new(0),
        }
    }

    /// Rebuilds the map of `file` from its data extents (SEEK_DATA / SEEK_HOLE). Pages a
    /// crashed daemon wrote are whole, verified pages: a write never puts a partial page
    /// of data where a hole was, since every fill writes whole pages.
    pub fn from_file(file: &File, size_bytes: u64, path: &Path) -> Result<PageMap, FanotifyError> {
        let map = PageMap::new(size_bytes);
        let fd = file.as_fd().as_raw_fd();
        let mut pos: u64 = 0;
        // Bounded: each iteration moves past at least one data extent.
        while pos < size_bytes {
            // SAFETY: lseek on a valid fd owned by `file`; no memory is involved.
            let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(FanotifyError::Io {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(FanotifyError::Io {
                    path: path.to_path_buf(),
                    source: io::Error::last_os_error(),
                });
            }
            let (data, hole) = (data as u64, (hole as u64).min(size_bytes));
            // Only whole pages count: a partial page at an extent edge is a hole.
            let first = data.div_ceil(PAGE_BYTES);
            let end = if hole == size_bytes {
                size_bytes.div_ceil(PAGE_BYTES)
            } else {
                hole / PAGE_BYTES
            };
            if end > first {
                map.set(first, end);
            }
            if hole <= pos {
                break;
            }
            pos = hole;
        }
        Ok(map)
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages with data.
    pub fn filled(&self) -> u64 {
        self.filled.load(Ordering::Acquire)
    }

    /// True when every page holds data.
    pub fn complete(&self) -> bool {
        self.filled() == self.pages
    }

    /// Whether page `p` holds data.
    pub fn get(&self, p: u64) -> bool {
        p < self.pages
            && self.bits[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    /// True when every page of `[first, end)` holds data.
    pub fn all(&self, first: u64, end: u64) -> bool {
        let end = end.min(self.pages);
        let mut p = first;
        while p < end {
            let word = self.bits[(p / 64) as usize].load(Ordering::Acquire);
            let lo = p % 64;
            let hi = (end - (p - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if word & mask != mask {
                return false;
            }
            p = p - lo + 64;
        }
        true
    }

    /// Marks `[first, end)` as holding data.
    pub fn set(&self, first: u64, end: u64) {
        let end = end.min(self.pages);
        let mut p = first;
        while p < end {
            let lo = p % 64;
            let hi = (end - (p - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.bits[(p / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            let new_bits = (mask & !old).count_ones() as u64;
            if new_bits > 0 {
                self.filled.fetch_add(new_bits, Ordering::AcqRel);
            }
            p = p - lo + 64;
        }
    }
}

/// Where blob files live under the cache directory.
pub fn blob_path(cache_dir: &Path, blob_id: &str) -> PathBuf {
    cache_dir.join("blobs").join(blob_id)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn set_and_all_agree_with_a_naive_model() {
        let m = PageMap::new(300 * PAGE_BYTES);
        let mut model = vec![false; 300];
        for (a, b) in [
            (0u64, 1u64),
            (5, 70),
            (63, 65),
            (128, 192),
            (250, 300),
            (70, 70),
        ] {
            m.set(a, b);
            for x in model.iter_mut().take(b as usize).skip(a as usize) {
                *x = true;
            }
            for first in (0..300).step_by(7) {
                for end in [first, first + 1, first + 63, first + 64, first + 130, 300] {
                    let end = end.min(300);
                    let want = model[first as usize..end as usize].iter().all(|&x| x);
                    assert_eq!(m.all(first, end), want, "{first}..{end}");
                }
            }
        }
        assert_eq!(m.filled(), model.iter().filter(|&&x| x).count() as u64);
        m.set(0, 300);
        assert!(m.complete());
    }

    #[test]
    fn rebuilds_from_data_extents() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("b");
        let size = 64 * PAGE_BYTES;
        let f = prepare(&path, size).unwrap();
        assert_eq!(PageMap::from_file(&f, size, &path).unwrap().filled(), 0);
        f.write_all_at(&vec![1u8; 2 * PAGE_BYTES as usize], 8 * PAGE_BYTES)
            .unwrap();
        f.write_all_at(&[1u8; PAGE_BYTES as usize], 63 * PAGE_BYTES)
            .unwrap();
        f.sync_all().unwrap();
        let m = PageMap::from_file(&f, size, &path).unwrap();
        // ext4 may report data at a coarser grain than we wrote, but never less.
        assert!(m.all(8, 10) && m.get(63), "{m:?}");
        assert!(!m.get(0) && !m.get(30));
        // Same size: kept; other size: emptied.
        drop(f);
        let f = prepare(&path, size).unwrap();
        assert!(PageMap::from_file(&f, size, &path).unwrap().get(63));
        let f = prepare(&path, size * 2).unwrap();
        assert_eq!(PageMap::from_file(&f, size * 2, &path).unwrap().filled(), 0);
    }

    #[test]
    fn tmpfs_is_refused_by_name() {
        if !Path::new("/dev/shm").exists() {
            eprintln!("SKIP: no /dev/shm");
            return;
        }
        let err = check_cache_fs(Path::new("/dev/shm")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/dev/shm") && msg.contains("tmpfs"), "{msg}");
        check_cache_fs(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
    }
}
