//! Helpers shared by the host-kernel tests: mounting EROFS images with this machine's
//! kernel (unmounted on drop), running `fsck.erofs`, and turning a mounted directory or an
//! `erofs::Tree` into a [`Manifest`] the tests compare.
//!
//! Not every test crate uses every helper.
#![allow(dead_code)]

pub mod registry;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use dedupd::erofs::{ChunkAddr, Kind, NodeId, Tree};
use sha2::{Digest, Sha256};

/// True when running as root (the kernel tests mount).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Returns false, after a loud message, when the test cannot run because we are not root.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!(
        "!!!!!!!! SKIPPED {test}: host-kernel tests must run as root (they mount EROFS) !!!!!!!!"
    );
    false
}

/// A scratch directory on the root filesystem (ext4), not tmpfs: file-backed EROFS
/// mounts and fanotify need a real filesystem under their files.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dedupd-test-")
        .tempdir_in("/var/tmp")
        .expect("creating a scratch dir in /var/tmp")
}

/// A mounted EROFS; unmounted (lazily if busy) when dropped, also on panic.
pub struct MountGuard {
    mnt: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl MountGuard {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Unmounts now, reporting errors. A mount kept busy for a moment (a process forked
    /// by a parallel test holds copies of our descriptors until it execs) is retried,
    /// then detached lazily.
    pub fn unmount(mut self) -> io::Result<()> {
        self.mounted = false;
        const TRIES: u32 = 50;
        for _ in 0..TRIES {
            match nix::mount::umount(&self.mnt) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return Err(e.into()),
            }
        }
        eprintln!(
            "{} still busy after {TRIES} tries: detaching lazily",
            self.mnt.display()
        );
        nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting {}: {e}", self.mnt.display());
            }
        }
    }
}

/// Mounts `image` read-only as EROFS (file-backed, no loop device) on a fresh directory,
/// with `devices` as its extra devices in device-table order (`-o device=`).
pub fn mount_erofs(image: &Path, devices: &[PathBuf]) -> io::Result<MountGuard> {
    let dir = scratch_dir();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let mut data = Vec::new();
    for d in devices {
        let d = d.canonicalize()?;
        let bytes = d.as_os_str().as_bytes();
        if bytes.contains(&b',') {
            return Err(io::Error::other(format!(
                "device path {} contains a comma",
                d.display()
            )));
        }
        if !data.is_empty() {
            data.push(b',');
        }
        data.extend_from_slice(b"device=");
        data.extend_from_slice(bytes);
    }
    let data = OsStr::from_bytes(&data);
    nix::mount::mount(
        Some(image),
        &mnt,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(data),
    )
    .map_err(|e| {
        io::Error::other(format!(
            "mount -t erofs {} (devices {devices:?}): {e}",
            image.display()
        ))
    })?;
    Ok(MountGuard {
        mnt,
        mounted: true,
        _dir: dir,
    })
}

/// Runs `fsck.erofs --device=...` on the image (it reads every file's data too, so the
/// chunk indexes and device table are checked). Err holds its output.
pub fn fsck_erofs(image: &Path, devices: &[PathBuf]) -> Result<(), String> {
    let mut cmd = Command::new("fsck.erofs");
    for d in devices {
        let mut arg = std::ffi::OsString::from("--device=");
        arg.push(d);
        cmd.arg(arg);
    }
    cmd.arg(image);
    let out = cmd
        .output()
        .map_err(|e| format!("running fsck.erofs: {e} (install erofs-utils)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("<E>") {
        Ok(())
    } else {
        Err(format!(
            "fsck.erofs {} failed ({}):\n{text}",
            image.display(),
            out.status
        ))
    }
}

/// What a path is, with its type-specific payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file: size and SHA-256 of the content.
    File {
        /// Bytes.
        size: u64,
        /// SHA-256 of the content, hex.
        sha256: String,
    },
    /// Directory.
    Dir,
    /// Symlink and its target.
    Symlink(Vec<u8>),
    /// Character device.
    CharDev(u32, u32),
    /// Block device.
    BlockDev(u32, u32),
    /// Named pipe.
    Fifo,
    /// Socket.
    Socket,
}

/// Everything compared about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Type and payload.
    pub kind: EntryKind,
    /// `mode & 0o7777`.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime seconds.
    pub mtime: i64,
    /// mtime nanoseconds.
    pub mtime_nsec: u32,
    /// Link count (directories: 2 + subdirectories).
    pub nlink: u64,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The smallest path naming the same inode (hard-link grouping); its own path if
    /// none other does.
    pub link_group: Vec<u8>,
}

/// Path (`/`, `/a/b`, raw bytes) to entry.
pub type Manifest = BTreeMap<Vec<u8>, Entry>;

/// Bound on files walked, so a broken image cannot loop a test forever.
const WALK_MAX_ENTRIES: usize = 1 << 22;

fn sha256_reader(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn path_cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// All xattrs of `path` without following a final symlink.
pub fn read_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = path_cstring(path)?;
    let mut names = vec![0u8; 1 << 16];
    // SAFETY: `c` is NUL-terminated and `names` is a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; 1 << 16];
        // SAFETY: both strings are NUL-terminated; `value` is writable for its length.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if m < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "getxattr {} {}: {e}",
                    path.display(),
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        value.truncate(m as usize);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if p != b"/" {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn set_link_groups<K: std::hash::Hash + Eq>(m: &mut Manifest, keys: &HashMap<Vec<u8>, K>) {
    let mut first: HashMap<&K, Vec<u8>> = HashMap::new();
    // Manifest iteration is sorted, so the first path seen is the smallest.
    for path in m.keys() {
        first.entry(&keys[path]).or_insert_with(|| path.clone());
    }
    let groups: Vec<(Vec<u8>, Vec<u8>)> = m
        .keys()
        .map(|p| (p.clone(), first[&keys[p]].clone()))
        .collect();
    for (p, g) in groups {
        m.get_mut(&p).expect("path from the manifest").link_group = g;
    }
}

/// Walks a mounted directory (without following symlinks) into a manifest.
pub fn walk_mounted(root: &Path) -> io::Result<Manifest> {
    let mut m = Manifest::new();
    let mut inos: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), b"/".to_vec())];
    while let Some((fs_path, rel)) = stack.pop() {
        if m.len() >= WALK_MAX_ENTRIES {
            return Err(io::Error::other("more than WALK_MAX_ENTRIES entries"));
        }
        let md = std::fs::symlink_metadata(&fs_path)?;
        let ft = md.file_type();
        let rdev = md.rdev();
        let dev = || (libc::major(rdev), libc::minor(rdev));
        let kind = if ft.is_file() {
            EntryKind::File {
                size: md.len(),
                sha256: sha256_reader(File::open(&fs_path)?)?,
            }
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&fs_path)? {
                let e = e?;
                stack.push((e.path(), join(&rel, e.file_name().as_bytes())));
            }
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink(
                std::fs::read_link(&fs_path)?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_char_device() {
            let (a, b) = dev();
            EntryKind::CharDev(a, b)
        } else if ft.is_block_device() {
            let (a, b) = dev();
            EntryKind::BlockDev(a, b)
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_socket() {
            EntryKind::Socket
        } else {
            return Err(io::Error::other(format!(
                "{}: unknown file type",
                fs_path.display()
            )));
        };
        let entry = Entry {
            kind,
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            nlink: md.nlink(),
            xattrs: read_xattrs(&fs_path)?,
            link_group: Vec::new(),
        };
        inos.insert(rel.clone(), (md.dev(), md.ino()));
        m.insert(rel, entry);
    }
    set_link_groups(&mut m, &inos);
    Ok(m)
}

/// SHA-256 of a file's logical content as the tree describes it: holes are zeros, blob
/// chunks are read from `devices[device - 1]`.
pub fn tree_file_sha256(
    size: u64,
    chunks: &[ChunkAddr],
    chunk_bits: u8,
    devices: &[File],
) -> io::Result<String> {
    let chunk_bytes = 1u64 << chunk_bits;
    let mut h = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; chunk_bytes.min(1 << 20) as usize];
    for (i, c) in chunks.iter().enumerate() {
        let start = (i as u64) << chunk_bits;
        let mut left = chunk_bytes.min(size - start);
        match *c {
            ChunkAddr::Hole => {
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    h.update(&zeros[..n]);
                    left -= n as u64;
                }
            }
            ChunkAddr::Blob { device, blkaddr } => {
                let f = &devices[usize::from(device) - 1];
                let mut off = u64::from(blkaddr) * 4096;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    f.read_exact_at(&mut buf[..n], off)?;
                    h.update(&buf[..n]);
                    left -= n as u64;
                    off += n as u64;
                }
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The manifest a correct image of `tree` must produce when mounted with `devices`.
pub fn tree_manifest(tree: &Tree, chunk_bits: u8, devices: &[PathBuf]) -> io::Result<Manifest> {
    let files: Vec<File> = devices.iter().map(File::open).collect::<io::Result<_>>()?;
    let links: HashMap<NodeId, u32> = tree.reachable().into_iter().collect();
    let mut m = Manifest::new();
    let mut ids: HashMap<Vec<u8>, NodeId> = HashMap::new();
    let mut stack: Vec<(NodeId, Vec<u8>)> = vec![(Tree::ROOT, b"/".to_vec())];
    while let Some((id, path)) = stack.pop() {
        if m.len() >= WALK_MAX_ENTRIES {
            return Err(io::Error::other("more than WALK_MAX_ENTRIES entries"));
        }
        let node = tree.node(id);
        let mut nlink = u64::from(links[&id]);
        let kind = match &node.kind {
            Kind::File(d) => EntryKind::File {
                size: d.size,
                sha256: tree_file_sha256(d.size, &d.chunks, chunk_bits, &files)?,
            },
            Kind::Dir(children) => {
                nlink = 2;
                for (name, &child) in children {
                    nlink += u64::from(tree.node(child).is_dir());
                    stack.push((child, join(&path, name)));
                }
                EntryKind::Dir
            }
            Kind::Symlink(t) => EntryKind::Symlink(t.clone()),
            Kind::CharDev { major, minor } => EntryKind::CharDev(*major, *minor),
            Kind::BlockDev { major, minor } => EntryKind::BlockDev(*major, *minor),
            Kind::Fifo => EntryKind::Fifo,
            Kind::Socket => EntryKind::Socket,
        };
        let meta = &node.meta;
        m.insert(
            path.clone(),
            Entry {
                kind,
                perm: u32::from(meta.perm),
                uid: meta.uid,
                gid: meta.gid,
                mtime: meta.mtime,
                mtime_nsec: meta.mtime_nsec,
                nlink,
                xattrs: meta.xattrs.clone(),
                link_group: Vec::new(),
            },
        );
        ids.insert(path, id);
    }
    set_link_groups(&mut m, &ids);
    Ok(m)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The fields in which two entries differ, as "field: expected X, actual Y".
pub fn entry_diff(e: &Entry, a: &Entry) -> String {
    let mut out = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{name}: expected {x}, actual {y}"));
        }
    };
    field("kind", format!("{:?}", e.kind), format!("{:?}", a.kind));
    field("perm", format!("{:o}", e.perm), format!("{:o}", a.perm));
    field("uid", e.uid.to_string(), a.uid.to_string());
    field("gid", e.gid.to_string(), a.gid.to_string());
    field(
        "mtime",
        format!("{}.{:09}", e.mtime, e.mtime_nsec),
        format!("{}.{:09}", a.mtime, a.mtime_nsec),
    );
    field("nlink", e.nlink.to_string(), a.nlink.to_string());
    let xattrs = |x: &BTreeMap<Vec<u8>, Vec<u8>>| {
        x.iter()
            .map(|(k, v)| format!("{}={}", lossy(k), hex::encode(v)))
            .collect::<Vec<_>>()
            .join(",")
    };
    field("xattrs", xattrs(&e.xattrs), xattrs(&a.xattrs));
    field("link_group", lossy(&e.link_group), lossy(&a.link_group));
    out.join("; ")
}

/// Panics with a readable list of differences (at most 20) if the manifests differ.
pub fn assert_manifests_equal(expected: &Manifest, actual: &Manifest) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing {}", String::from_utf8_lossy(p))),
            Some(a) if a != e => diffs.push(format!(
                "{}: {}",
                String::from_utf8_lossy(p),
                entry_diff(e, a)
            )),
            Some(_) => {}
        }
    }
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("unexpected {}", String::from_utf8_lossy(p)));
    }
    if !diffs.is_empty() {
        let total = diffs.len();
        diffs.truncate(20);
        panic!(
            "{total} differences between expected and mounted tree:\n{}",
            diffs.join("\n")
        );
    }
}
