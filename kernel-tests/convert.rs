//! Layer conversion end to end, with the real kernel: layers are built as tar, tar.gz and
//! tar.zst, converted with `dedupd convert`, exported with `dedupd export`, mounted with
//! `mount -t erofs -o device=...`, checked with `fsck.erofs`, and every path is compared
//! with what the tar says. Runs as root; skips loudly otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const DEDUPD: &str = env!("CARGO_BIN_EXE_dedupd");

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: kernel-tests/convert.rs needs root to mount EROFS images");
            return;
        }
    };
}

/// A scratch directory on the repository's filesystem (the kernel reads the files).
fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kernel-tests");
    fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

// ---------------------------------------------------------------- layer specifications

#[derive(Clone, Debug)]
enum Data {
    Bytes(Vec<u8>),
    /// Read from a file of the host when the tar is written.
    Host(PathBuf, u64),
    /// Zeros, except for the given islands (offset, bytes); generated on the fly.
    Sparse(u64, Vec<(u64, Vec<u8>)>),
}

/// The reader of [`Data::Sparse`].
struct SparseReader<'a> {
    pos: u64,
    size: u64,
    islands: &'a [(u64, Vec<u8>)],
}

impl Read for SparseReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.size - self.pos) as usize;
        let buf = &mut buf[..n];
        buf.fill(0);
        for (at, bytes) in self.islands {
            let (start, end) = (*at, at + bytes.len() as u64);
            let (lo, hi) = (start.max(self.pos), end.min(self.pos + n as u64));
            if lo < hi {
                buf[(lo - self.pos) as usize..(hi - self.pos) as usize]
                    .copy_from_slice(&bytes[(lo - start) as usize..(hi - start) as usize]);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Data {
    fn size(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Host(_, n) | Data::Sparse(n, _) => *n,
        }
    }

    fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            Data::Bytes(b) => Box::new(&b[..]),
            Data::Host(p, _) => Box::new(File::open(p).unwrap()),
            Data::Sparse(size, islands) => Box::new(SparseReader {
                pos: 0,
                size: *size,
                islands,
            }),
        }
    }
}

#[derive(Clone, Debug)]
enum SKind {
    File(Data),
    Dir,
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    /// A hard link to the earlier entry with this index.
    HardLink(usize),
    /// A raw tar entry name that the converter interprets (whiteouts).
    Marker,
}

#[derive(Clone, Debug)]
struct SEntry {
    path: Vec<u8>,
    kind: SKind,
    perm: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Carry the path in a PAX record instead of the header (or a GNU long name).
    pax_path: bool,
}

impl SEntry {
    fn new(path: &[u8], kind: SKind) -> SEntry {
        SEntry {
            path: path.to_vec(),
            kind,
            perm: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            nsec: 0,
            xattrs: vec![],
            pax_path: false,
        }
    }
}

fn os(p: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(p))
}

/// Appends a GNU long name (`L`) or long link (`K`) entry.
fn gnu_long<W: Write>(b: &mut tar::Builder<W>, ty: u8, value: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::new(ty));
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(value.len() as u64 + 1);
    h.set_cksum();
    b.append(&h, &[value, &b"\0"[..]].concat()[..]).unwrap();
}

/// Writes the entries as a tar into `out`. Names are written as bytes: in the header
/// when they fit, else as a GNU long name or (when the entry asks) a PAX `path`.
fn write_tar<W: Write>(entries: &[SEntry], out: W) -> W {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(out);
    for e in entries {
        let mut pax: Vec<(String, Vec<u8>)> = vec![];
        if e.nsec != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", e.mtime, e.nsec).into_bytes(),
            ));
        }
        for (k, v) in &e.xattrs {
            pax.push((
                format!("SCHILY.xattr.{}", String::from_utf8(k.clone()).unwrap()),
                v.clone(),
            ));
        }
        let link: Option<&[u8]> = match &e.kind {
            SKind::Symlink(t) => Some(t),
            SKind::HardLink(i) => Some(&entries[*i].path),
            _ => None,
        };
        if e.pax_path {
            pax.push(("path".into(), e.path.clone()));
            if let Some(l) = link.filter(|l| l.len() > 100) {
                pax.push(("linkpath".into(), l.to_vec()));
            }
        }
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), &v[..])))
                .unwrap();
        }
        if !e.pax_path {
            if e.path.len() > 100 {
                gnu_long(&mut b, b'L', &e.path);
            }
            if let Some(l) = link.filter(|l| l.len() > 100) {
                gnu_long(&mut b, b'K', l);
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.perm);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(0);
        let name: &[u8] = if e.pax_path { b"pax-path" } else { &e.path };
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        if let Some(l) = link {
            let n = l.len().min(100);
            h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
        }
        let mut data: Box<dyn Read> = Box::new(io::empty());
        match &e.kind {
            SKind::File(d) => {
                h.set_entry_type(T::Regular);
                h.set_size(d.size());
                data = d.reader();
            }
            SKind::Dir => h.set_entry_type(T::Directory),
            SKind::Symlink(_) => h.set_entry_type(T::Symlink),
            SKind::HardLink(_) => h.set_entry_type(T::Link),
            SKind::Char(ma, mi) | SKind::Block(ma, mi) => {
                let char_dev = matches!(e.kind, SKind::Char(..));
                h.set_entry_type(if char_dev { T::Char } else { T::Block });
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
            }
            SKind::Fifo => h.set_entry_type(T::Fifo),
            SKind::Marker => h.set_entry_type(T::Regular),
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Compress {
    None,
    Gzip,
    Zstd,
}

/// Writes the layer file in the given compression.
fn write_layer(entries: &[SEntry], c: Compress, path: &Path) {
    let f = io::BufWriter::new(File::create(path).unwrap());
    match c {
        Compress::None => {
            write_tar(entries, f).flush().unwrap();
        }
        Compress::Gzip => {
            let e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            write_tar(entries, e).finish().unwrap().flush().unwrap();
        }
        Compress::Zstd => {
            let e = zstd::stream::write::Encoder::new(f, 1).unwrap();
            write_tar(entries, e).finish().unwrap().flush().unwrap();
        }
    }
}

// ---------------------------------------------------------------- manifests

#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    kind: char,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nsec: i64,
    size: u64,
    sha256: Option<String>,
    target: Option<Vec<u8>>,
    rdev: (u64, u64),
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Manifest {
    items: BTreeMap<Vec<u8>, Item>,
    /// Groups (of two or more paths) that name one inode.
    links: BTreeSet<Vec<Vec<u8>>>,
}

fn sha_reader(mut r: impl Read) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// The expected manifest of a layer built from `entries` (later entries win; no implicit
/// parents are needed because the specs list parents first).
fn expected(entries: &[SEntry]) -> Manifest {
    let mut items = BTreeMap::new();
    items.insert(
        vec![],
        Item {
            kind: 'd',
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            nsec: 0,
            size: 0,
            sha256: None,
            target: None,
            rdev: (0, 0),
            xattrs: BTreeMap::new(),
        },
    );
    let mut group_of: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let (source, src_index) = match e.kind {
            SKind::HardLink(j) => (&entries[j], j),
            _ => (e, i),
        };
        let mut it = Item {
            kind: 'f',
            perm: source.perm & 0o7777,
            uid: source.uid as u32,
            gid: source.gid as u32,
            mtime: source.mtime as i64,
            nsec: i64::from(source.nsec),
            size: 0,
            sha256: None,
            target: None,
            rdev: (0, 0),
            xattrs: source.xattrs.iter().cloned().collect(),
        };
        match &source.kind {
            SKind::File(d) => {
                it.size = d.size();
                it.sha256 = Some(sha_reader(d.reader()));
            }
            SKind::Dir => it.kind = 'd',
            SKind::Symlink(t) => {
                it.kind = 'l';
                it.target = Some(t.clone());
            }
            SKind::Char(a, b) => {
                it.kind = 'c';
                it.rdev = (u64::from(*a), u64::from(*b));
            }
            SKind::Block(a, b) => {
                it.kind = 'b';
                it.rdev = (u64::from(*a), u64::from(*b));
            }
            SKind::Fifo => it.kind = 'p',
            SKind::HardLink(_) | SKind::Marker => unreachable!("handled by the caller"),
        }
        items.insert(e.path.clone(), it);
        if !matches!(source.kind, SKind::Dir) {
            group_of.entry(src_index).or_default().push(e.path.clone());
        }
    }
    let links = group_of
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    Manifest { items, links }
}

fn xattrs_of(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut list = vec![0u8; 1 << 16];
    // SAFETY: `c` is NUL-terminated and `list` is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(
        n >= 0,
        "llistxattr {path:?}: {}",
        io::Error::last_os_error()
    );
    let mut out = BTreeMap::new();
    for name in list[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 1 << 16];
        // SAFETY: both strings are NUL-terminated; `v` is writable for its length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(
            m >= 0,
            "lgetxattr {path:?} {:?} {}: {}",
            fs::symlink_metadata(path).map(|m| m.file_type()),
            show(name),
            io::Error::last_os_error()
        );
        v.truncate(m as usize);
        out.insert(name.to_vec(), v);
    }
    out
}

/// The manifest of a mounted (or any) directory tree.
fn actual(root: &Path) -> Manifest {
    let mut items = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((path, rel)) = stack.pop() {
        let md = fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        let mut it = Item {
            kind: '?',
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            nsec: md.mtime_nsec(),
            size: 0,
            sha256: None,
            target: None,
            rdev: (0, 0),
            xattrs: xattrs_of(&path),
        };
        if ft.is_dir() {
            it.kind = 'd';
            for e in fs::read_dir(&path).unwrap() {
                let e = e.unwrap();
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(e.file_name().as_bytes());
                stack.push((e.path(), r));
            }
        } else {
            inodes.entry(md.ino()).or_default().push(rel.clone());
            if ft.is_file() {
                it.kind = 'f';
                it.size = md.len();
                it.sha256 = Some(sha_reader(File::open(&path).unwrap()));
            } else if ft.is_symlink() {
                it.kind = 'l';
                it.target = Some(
                    fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                );
            } else if ft.is_char_device() || ft.is_block_device() {
                it.kind = if ft.is_char_device() { 'c' } else { 'b' };
                it.rdev = (libc::major(md.rdev()).into(), libc::minor(md.rdev()).into());
            } else if ft.is_fifo() {
                it.kind = 'p';
            } else if ft.is_socket() {
                it.kind = 's';
            }
        }
        items.insert(rel, it);
    }
    let links = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    Manifest { items, links }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Panics with the first differences.
fn assert_same(want: &Manifest, got: &Manifest, what: &str) {
    let mut diffs = vec![];
    for (p, w) in &want.items {
        match got.items.get(p) {
            None => diffs.push(format!("missing {:?}", show(p))),
            Some(g) if g != w => diffs.push(format!("{:?}:\n  want {w:?}\n  got  {g:?}", show(p))),
            _ => {}
        }
    }
    for p in got.items.keys() {
        if !want.items.contains_key(p) {
            diffs.push(format!("unexpected {:?}", show(p)));
        }
    }
    if want.links != got.links {
        diffs.push(format!(
            "hard-link groups differ:\n  want {:?}\n  got  {:?}",
            want.links, got.links
        ));
    }
    if !diffs.is_empty() {
        diffs.truncate(10);
        panic!("{what}: {} differences:\n{}", diffs.len(), diffs.join("\n"));
    }
}

// ---------------------------------------------------------------- dedupd, mount, fsck

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn dedupd(args: &[&std::ffi::OsStr]) -> Output {
    run(Command::new(DEDUPD).env("DEDUPD_LOG", "warn").args(args))
}

fn convert(root: &Path, chunk_bytes: u32, layers: &[&Path]) -> Vec<serde_json::Value> {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["convert".as_ref(), "--root".as_ref(), root.as_os_str()];
    let cs = chunk_bytes.to_string();
    args.push("--chunk-size".as_ref());
    args.push(cs.as_ref());
    args.extend(layers.iter().map(|l| l.as_os_str()));
    let out = dedupd(&args);
    assert!(
        out.status.success(),
        "dedupd convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Exported {
    image: PathBuf,
    devices: Vec<PathBuf>,
}

fn export(root: &Path, layer: &str, outdir: &Path) -> Exported {
    let out = dedupd(&[
        "export".as_ref(),
        "--root".as_ref(),
        root.as_os_str(),
        layer.as_ref(),
        outdir.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "dedupd export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Exported {
        image: v["image"].as_str().unwrap().into(),
        devices: v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().into())
            .collect(),
    }
}

/// An EROFS mount, unmounted on drop (also when a test fails).
struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("umount {:?}: {e}", self.dir);
        }
    }
}

/// Mounts the way `mount -t erofs -o device=BLOB IMAGE MNT` asks the kernel to: a
/// file-backed EROFS mount whose extra devices are files. (util-linux 2.38's mount(8)
/// would put the image on a loop device first, and then the kernel wants block devices
/// for `device=` too; [`mount_cmd`] covers that form.)
fn mount(e: &Exported, dir: &Path) -> Mounted {
    fs::create_dir_all(dir).unwrap();
    let opts = e
        .devices
        .iter()
        .map(|d| format!("device={}", d.display()))
        .collect::<Vec<_>>()
        .join(",");
    nix::mount::mount(
        Some(&e.image),
        dir,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .unwrap_or_else(|err| panic!("mount -t erofs -o {opts} {:?}: {err}", e.image));
    Mounted {
        dir: dir.to_path_buf(),
    }
}

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").arg("-d").arg(&self.0));
    }
}

/// Mounts with the mount(8) command line: `mount -t erofs -o device=D IMAGE MNT`, each
/// blob attached to a loop device as mount(8) does for the image.
fn mount_cmd(e: &Exported, dir: &Path) -> (Mounted, Vec<Loop>) {
    fs::create_dir_all(dir).unwrap();
    let mut loops = vec![];
    let mut opts = vec!["ro".to_string()];
    for d in &e.devices {
        let out = run(Command::new("losetup").args(["-f", "--show", "-r"]).arg(d));
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        opts.push(format!("device={dev}"));
        loops.push(Loop(dev));
    }
    let out = run(Command::new("mount")
        .args(["-t", "erofs", "-o", &opts.join(",")])
        .arg(&e.image)
        .arg(dir));
    assert!(
        out.status.success(),
        "mount {:?}: {}",
        e.image,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        Mounted {
            dir: dir.to_path_buf(),
        },
        loops,
    )
}

fn fsck(e: &Exported) {
    let mut cmd = Command::new("fsck.erofs");
    for d in &e.devices {
        cmd.arg(format!("--device={}", d.display()));
    }
    let out = run(cmd.arg(&e.image));
    assert!(
        out.status.success(),
        "fsck.erofs {:?}: {}{}",
        e.image,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Converts, exports, fscks and mounts one layer file; compares the mount with `want`.
fn check_layer(
    root: &Path,
    work: &Path,
    layer: &Path,
    chunk_bytes: u32,
    want: &Manifest,
) -> serde_json::Value {
    let report = convert(root, chunk_bytes, &[layer]).remove(0);
    let name = layer.file_name().unwrap().to_string_lossy().into_owned();
    let outdir = work.join(format!("{name}.export"));
    let e = export(root, report["digest"].as_str().unwrap(), &outdir);
    fsck(&e);
    let m = mount(&e, &work.join(format!("{name}.mnt")));
    assert_same(want, &actual(&m.dir), &name);
    drop(m);
    fs::remove_dir_all(&outdir).unwrap();
    report
}

// ---------------------------------------------------------------- random trees

fn random_name(rng: &mut StdRng, taken: &BTreeSet<Vec<u8>>) -> Vec<u8> {
    loop {
        let len = match rng.random_range(0..10) {
            0 => rng.random_range(100..=255),
            1 => 255,
            _ => rng.random_range(1..20),
        };
        let name: Vec<u8> = (0..len)
            .map(|_| match rng.random_range(0..8) {
                // Any byte but '/' and NUL, including non-UTF-8.
                0 => loop {
                    let b: u8 = rng.random();
                    if b != 0 && b != b'/' {
                        break b;
                    }
                },
                _ => b"abcdefghijklmnopqrstuvwxyz0123456789._-"[rng.random_range(0..39)],
            })
            .collect();
        if name == b"." || name == b".." || name.starts_with(b".wh.") || taken.contains(&name) {
            continue;
        }
        return name;
    }
}

/// Random xattrs; `user.` only when `user_ok` (Linux hides `user.` xattrs of anything but
/// regular files and directories: getxattr says ENODATA).
fn random_xattrs(rng: &mut StdRng, user_ok: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let n = match rng.random_range(0..4) {
        0 => rng.random_range(1..6),
        _ => 0,
    };
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let ns =
            ["trusted.", "security.", "user."][rng.random_range(0..if user_ok { 3 } else { 2 })];
        let name = format!("{ns}x{}", rng.random_range(0..1000));
        let len = match rng.random_range(0..5) {
            0 => rng.random_range(200..1500),
            _ => rng.random_range(0..40),
        };
        let value: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        out.insert(name.into_bytes(), value);
    }
    out.into_iter().collect()
}

fn random_data(rng: &mut StdRng, chunk_bytes: usize) -> Vec<u8> {
    match rng.random_range(0..8) {
        0 => vec![],
        1 => {
            // Sparse: mostly zeros with a few islands, several chunks long.
            let mut v =
                vec![0u8; chunk_bytes * rng.random_range(2..12) + rng.random_range(0..5000)];
            for _ in 0..rng.random_range(0..3) {
                let at = rng.random_range(0..v.len());
                let end = (at + rng.random_range(1..3000)).min(v.len());
                rng.fill(&mut v[at..end]);
            }
            v
        }
        2 => {
            // Multi-chunk, half compressible.
            let mut v = vec![0u8; chunk_bytes * rng.random_range(1..5) + rng.random_range(0..9000)];
            let half = v.len() / 2;
            rng.fill(&mut v[..half]);
            for (i, b) in v[half..].iter_mut().enumerate() {
                *b = (i % 7) as u8 + 1;
            }
            v
        }
        _ => {
            let mut v = vec![0u8; rng.random_range(1..3000)];
            rng.fill(&mut v[..]);
            v
        }
    }
}

/// A random tree: parents before children, every entry kind, hard links to earlier files.
fn random_tree(seed: u64, chunk_bytes: usize) -> Vec<SEntry> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut entries: Vec<SEntry> = vec![];
    let mut dirs: Vec<(Vec<u8>, BTreeSet<Vec<u8>>)> = vec![(vec![], BTreeSet::new())];
    let n = rng.random_range(5..60);
    for _ in 0..n {
        let d = rng.random_range(0..dirs.len());
        let name = random_name(&mut rng, &dirs[d].1);
        dirs[d].1.insert(name.clone());
        let mut path = dirs[d].0.clone();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&name);
        let files: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, SKind::File(_) | SKind::Symlink(_) | SKind::Fifo))
            .map(|(i, _)| i)
            .collect();
        let kind = match rng.random_range(0..12) {
            0..=3 => SKind::File(Data::Bytes(random_data(&mut rng, chunk_bytes))),
            4 | 5 => SKind::Dir,
            6 => {
                let len = rng.random_range(1..300);
                SKind::Symlink((0..len).map(|_| rng.random_range(1..=255u8)).collect())
            }
            7 => SKind::Char(rng.random_range(0..4096), rng.random_range(0..1 << 20)),
            8 => SKind::Block(rng.random_range(0..4096), rng.random_range(0..256)),
            9 => SKind::Fifo,
            _ if !files.is_empty() => SKind::HardLink(files[rng.random_range(0..files.len())]),
            _ => SKind::Fifo,
        };
        let perm = match kind {
            SKind::Symlink(_) => 0o777,
            _ => rng.random_range(0..=0o7777),
        };
        let big = |rng: &mut StdRng| match rng.random_range(0..4) {
            0 => rng.random_range(0..u32::MAX as u64 - 1),
            _ => rng.random_range(0..70000),
        };
        let mut e = SEntry::new(&path, kind);
        e.perm = perm;
        e.uid = big(&mut rng);
        e.gid = big(&mut rng);
        e.mtime = rng.random_range(0..(1u64 << 33));
        e.nsec = if rng.random_bool(0.3) {
            rng.random_range(1..1_000_000_000)
        } else {
            0
        };
        e.xattrs = if matches!(e.kind, SKind::Symlink(_) | SKind::HardLink(_)) {
            vec![]
        } else {
            let user_ok = matches!(e.kind, SKind::File(_) | SKind::Dir);
            random_xattrs(&mut rng, user_ok)
        };
        e.pax_path = rng.random_bool(0.2);
        if matches!(e.kind, SKind::Dir) {
            dirs.push((path, BTreeSet::new()));
        }
        entries.push(e);
    }
    entries
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    #[test]
    fn random_trees_round_trip_through_the_kernel(seed in any::<u64>(), chunk_pick in 0usize..3) {
        if !is_root() {
            eprintln!("SKIPPED: kernel-tests/convert.rs needs root to mount EROFS images");
            return Ok(());
        }
        let chunk_bytes = [4096u32, 16384, 65536][chunk_pick];
        let entries = random_tree(seed, chunk_bytes as usize);
        let want = expected(&entries);
        let work = scratch();
        let root = work.path().join("store");
        for (c, ext) in [(Compress::None, "tar"), (Compress::Gzip, "tar.gz"), (Compress::Zstd, "tar.zst")] {
            // The compression is found by content: the file names say nothing.
            let layer = work.path().join(format!("layer-{ext}-{seed}"));
            write_layer(&entries, c, &layer);
            let report = check_layer(&root, work.path(), &layer, chunk_bytes, &want);
            prop_assert_eq!(report["compression"].as_str().unwrap(),
                ["tar", "gzip", "zstd"][c as usize]);
        }
    }
}

// ---------------------------------------------------------------- package-like trees

/// Text that compresses about as well as documentation and scripts do.
fn text_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the ",
        "file ",
        "usr/lib/",
        "config ",
        "return ",
        "if [ -n \"$x\" ]; then\n",
        "value ",
        "=",
        "0x00ff ",
        "option ",
        "\n",
        "error: ",
        "int ",
        "static ",
        "const char *",
        "# comment\n",
    ];
    let mut v = Vec::with_capacity(n + 32);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
    }
    v.truncate(n);
    v
}

/// A generated tree shaped like an installed package set: `files` regular files spread
/// over nested directories (sizes from empty to a few chunks, mostly small; text and
/// binary content; whole-file duplicates), with symlinks and hard links among them. The
/// test that uses it gets exactly the shape it asserts on, whatever the host ships.
fn package_like_tree(seed: u64, files: usize) -> Vec<SEntry> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut entries = vec![SEntry::new(b"usr", SKind::Dir)];
    let mut dirs: Vec<Vec<u8>> = vec![];
    for top in ["bin", "lib", "share", "include"] {
        let d = format!("usr/{top}").into_bytes();
        let mut e = SEntry::new(&d, SKind::Dir);
        e.perm = 0o755;
        entries.push(e);
        dirs.push(d);
    }
    // Nested directories, parents first: about one per 40 files, up to four levels deep.
    for i in 0..files.div_ceil(40) {
        let parent = dirs[rng.random_range(0..dirs.len())].clone();
        if parent.iter().filter(|&&b| b == b'/').count() >= 4 {
            continue;
        }
        let d = [&parent[..], format!("/d{i:03}").as_bytes()].concat();
        let mut e = SEntry::new(&d, SKind::Dir);
        e.perm = 0o755;
        entries.push(e);
        dirs.push(d);
    }
    let mut regular: Vec<usize> = vec![];
    for i in 0..files {
        let dir = &dirs[rng.random_range(0..dirs.len())];
        let path = [&dir[..], format!("/f{i:05}").as_bytes()].concat();
        let kind = match rng.random_range(0..40) {
            0 if !regular.is_empty() => {
                SKind::HardLink(regular[rng.random_range(0..regular.len())])
            }
            1 | 2 => SKind::Symlink(format!("../f{:05}", rng.random_range(0..files)).into_bytes()),
            3 if !regular.is_empty() => {
                // A whole-file duplicate under another name.
                let SKind::File(d) = &entries[regular[rng.random_range(0..regular.len())]].kind
                else {
                    unreachable!("regular holds files only")
                };
                SKind::File(d.clone())
            }
            _ => {
                let len = match rng.random_range(0..20) {
                    0 => 0,
                    1 => rng.random_range(65536..200_000),
                    2..=5 => rng.random_range(4096..65536),
                    _ => rng.random_range(1..4096),
                };
                let data = if rng.random_bool(0.6) {
                    text_bytes(&mut rng, len)
                } else {
                    let mut v = vec![0u8; len];
                    rng.fill(&mut v[..]);
                    v
                };
                SKind::File(Data::Bytes(data))
            }
        };
        let is_file = matches!(kind, SKind::File(_));
        let mut e = SEntry::new(&path, kind);
        e.perm = match e.kind {
            SKind::Symlink(_) => 0o777,
            _ if rng.random_bool(0.2) => 0o755,
            _ => 0o644,
        };
        e.mtime = 1_690_000_000 + rng.random_range(0..10_000_000);
        if is_file {
            regular.push(entries.len());
        }
        entries.push(e);
    }
    entries
}

#[test]
fn a_layer_of_thousands_of_files_round_trips_through_the_kernel() {
    require_root!();
    let work = scratch();
    let root = work.path().join("store");
    let entries = package_like_tree(11, 6000);
    assert!(
        entries.len() > 6000,
        "the generator makes what the test needs"
    );
    let want = expected(&entries);
    for (c, name) in [
        (Compress::Gzip, "many.tar.gz"),
        (Compress::None, "many.tar"),
    ] {
        let layer = work.path().join(name);
        write_layer(&entries, c, &layer);
        let report = check_layer(&root, work.path(), &layer, 65536, &want);
        assert_eq!(
            report["files"].as_u64().unwrap(),
            entries.len() as u64,
            "{report}"
        );
        fs::remove_file(&layer).unwrap();
    }
}

// ---------------------------------------------------------------- Debian package layers

/// A layer spec from the files of an installed Debian package, parents included. Real
/// trees as extra coverage: the tests that use them assert nothing about their contents
/// (the archive changes them), only that they round-trip.
fn package_layer(pkg: &str) -> Vec<SEntry> {
    let out = run(Command::new("dpkg").args(["-L", pkg]));
    assert!(
        out.status.success(),
        "dpkg -L {pkg} (kernel-tests/install-host-deps installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut paths = BTreeSet::new();
    for line in out.stdout.split(|&b| b == b'\n') {
        if line.is_empty() || line == b"/." || fs::symlink_metadata(os(line)).is_err() {
            continue;
        }
        // Usr-merged hosts list /bin/x where /bin is a symlink: use the real parent, as
        // a layer must not put entries under a symlink.
        let host = Path::new(os(line));
        let parent = fs::canonicalize(host.parent().unwrap()).unwrap();
        let real = parent.join(host.file_name().unwrap());
        let real = real.as_os_str().as_bytes();
        let rel = real.strip_prefix(b"/").unwrap_or(real);
        // Every ancestor too, so that no parent is implicit.
        let mut p = rel.to_vec();
        loop {
            paths.insert(p.clone());
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p.truncate(i),
                None => break,
            }
        }
    }
    let mut entries: Vec<SEntry> = vec![];
    let mut by_inode: HashMap<(u64, u64), usize> = HashMap::new();
    for rel in paths {
        let host = Path::new("/").join(os(&rel));
        let md = fs::symlink_metadata(&host).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            SKind::Dir
        } else if let Some(&i) = by_inode.get(&(md.dev(), md.ino())) {
            SKind::HardLink(i)
        } else if ft.is_file() {
            SKind::File(Data::Host(host.clone(), md.len()))
        } else if ft.is_symlink() {
            SKind::Symlink(
                fs::read_link(&host)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else {
            continue;
        };
        if !ft.is_dir() && md.nlink() > 1 {
            by_inode
                .entry((md.dev(), md.ino()))
                .or_insert(entries.len());
        }
        let mut e = SEntry::new(&rel, kind);
        e.perm = md.mode() & 0o7777;
        e.uid = md.uid().into();
        e.gid = md.gid().into();
        e.mtime = md.mtime() as u64;
        e.nsec = md.mtime_nsec() as u32;
        entries.push(e);
    }
    entries
}

#[test]
fn debian_package_layers_round_trip_through_the_kernel() {
    require_root!();
    let work = scratch();
    let root = work.path().join("store");
    let pkgs = [
        ("coreutils", Compress::Gzip),
        ("perl-modules-5.36", Compress::Zstd),
        ("libpython3.11-stdlib", Compress::Gzip),
        ("linux-libc-dev", Compress::None),
    ];
    for (pkg, c) in pkgs {
        let entries = package_layer(pkg);
        assert!(
            entries.iter().any(|e| matches!(e.kind, SKind::File(_))),
            "dpkg -L {pkg} lists no regular file: the package is not what this test reads"
        );
        let want = expected(&entries);
        let layer = work.path().join(format!("{pkg}.layer"));
        write_layer(&entries, c, &layer);
        let report = check_layer(&root, work.path(), &layer, 65536, &want);
        eprintln!("{pkg}: {report}");
        assert_eq!(report["files"].as_u64().unwrap(), entries.len() as u64);
        fs::remove_file(&layer).unwrap();
    }
}

#[test]
fn a_sparse_file_over_4_gib_costs_only_its_data() {
    require_root!();
    let work = scratch();
    let root = work.path().join("store");
    let mut island = vec![0u8; 100_000];
    StdRng::seed_from_u64(3).fill(&mut island[..]);
    let size = (4u64 << 30) + (512 << 20) + 12345;
    let islands = vec![
        (0, b"head".to_vec()),
        (4u64 << 30, island),
        (size - 3, b"end".to_vec()),
    ];
    let entries = vec![SEntry::new(
        b"huge",
        SKind::File(Data::Sparse(size, islands)),
    )];
    let want = expected(&entries);
    let layer = work.path().join("huge.tar.zst");
    write_layer(&entries, Compress::Zstd, &layer);
    let report = check_layer(&root, work.path(), &layer, 65536, &want);
    // Zero chunks are stored, not written as EROFS holes (6.12's fscache path zero-fills
    // the rest of a request after a hole), but one all-zero chunk serves them all: the
    // store gains head, two island chunks, the tail and the zero chunk, and stays tiny.
    assert!(report["new_chunks"].as_u64().unwrap() <= 5, "{report}");
    assert!(
        report["stored_bytes"].as_u64().unwrap() < 1 << 20,
        "{report}"
    );
}

// ---------------------------------------------------------------- whiteouts

#[test]
fn whiteouts_and_opaque_directories_become_overlay_markers() {
    require_root!();
    let work = scratch();
    let root = work.path().join("store");
    let mut d = SEntry::new(b"dir", SKind::Dir);
    d.perm = 0o755;
    let lower = vec![
        SEntry::new(b"gone", SKind::File(Data::Bytes(b"lower".to_vec()))),
        d.clone(),
        SEntry::new(b"dir/old", SKind::File(Data::Bytes(b"old".to_vec()))),
        SEntry::new(b"kept", SKind::File(Data::Bytes(b"kept".to_vec()))),
    ];
    let upper = vec![
        SEntry::new(b".wh.gone", SKind::Marker),
        d.clone(),
        SEntry::new(b"dir/.wh..wh..opq", SKind::Marker),
        SEntry::new(b"dir/new", SKind::File(Data::Bytes(b"new".to_vec()))),
    ];
    let mut want = expected(&[
        d.clone(),
        SEntry::new(b"dir/new", SKind::File(Data::Bytes(b"new".to_vec()))),
    ]);
    let whiteout = Item {
        kind: 'c',
        perm: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        nsec: 0,
        size: 0,
        sha256: None,
        target: None,
        rdev: (0, 0),
        xattrs: BTreeMap::new(),
    };
    want.items.insert(b"gone".to_vec(), whiteout);
    want.items
        .get_mut(&b"dir"[..])
        .unwrap()
        .xattrs
        .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());

    let lower_file = work.path().join("lower.tar");
    let upper_file = work.path().join("upper.tar.gz");
    write_layer(&lower, Compress::None, &lower_file);
    write_layer(&upper, Compress::Gzip, &upper_file);
    check_layer(&root, work.path(), &upper_file, 65536, &want);

    // And overlayfs honours them: lower `gone` and `dir/old` are hidden.
    let reports = convert(&root, 65536, &[&lower_file, &upper_file]);
    let mut mounts = vec![];
    let mut dirs = vec![];
    for r in &reports {
        let id = r["diff_id"].as_str().unwrap();
        let e = export(&root, id, &work.path().join(format!("ov-{}", &id[7..19])));
        fsck(&e);
        let mnt = work.path().join(format!("ov-{}.mnt", &id[7..19]));
        mounts.push(mount_cmd(&e, &mnt));
        dirs.push(mnt);
    }
    let merged = work.path().join("merged");
    fs::create_dir_all(&merged).unwrap();
    let out = run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={}:{}",
            dirs[1].display(),
            dirs[0].display()
        ))
        .arg(&merged));
    assert!(
        out.status.success(),
        "overlay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ov = Mounted {
        dir: merged.clone(),
    };
    let names = |p: &Path| -> BTreeSet<String> {
        fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&merged), ["dir", "kept"].map(String::from).into());
    assert_eq!(names(&merged.join("dir")), ["new"].map(String::from).into());
    drop(ov);
    drop(mounts);
}

// ---------------------------------------------------------------- dedup

#[test]
fn shared_files_are_stored_once() {
    require_root!();
    let work = scratch();
    let root = work.path().join("store");
    let base = package_like_tree(5, 400);
    // The same files under other names and times: a different layer, the same data.
    let moved: Vec<SEntry> = base
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.path = [&b"copy/"[..], &e.path].concat();
            e.mtime += 1;
            if let SKind::HardLink(i) = e.kind {
                e.kind = SKind::HardLink(i + 1);
            }
            e
        })
        .collect();
    let mut second = vec![SEntry::new(b"copy", SKind::Dir)];
    second.extend(moved);
    let mut unique = vec![0u8; 3 * 65536];
    StdRng::seed_from_u64(7).fill(&mut unique[..]);
    second.push(SEntry::new(b"unique", SKind::File(Data::Bytes(unique))));
    let a = work.path().join("a.tar.gz");
    let b = work.path().join("b.tar.zst");
    write_layer(&base, Compress::Gzip, &a);
    write_layer(&second, Compress::Zstd, &b);
    let r = convert(&root, 65536, &[&a, &b]);
    assert!(r[0]["new_chunks"].as_u64().unwrap() > 10, "{}", r[0]);
    assert_eq!(
        r[1]["new_chunks"].as_u64().unwrap(),
        3,
        "only the unique file is new: {}",
        r[1]
    );
    assert_eq!(
        r[1]["chunks"].as_u64().unwrap(),
        r[0]["chunks"].as_u64().unwrap() + 3
    );

    // A second conversion stores nothing and says so.
    let again = convert(&root, 65536, &[&b]).remove(0);
    assert_eq!(again["new_chunks"].as_u64(), Some(0), "{again}");
    assert_eq!(again["stored_bytes"].as_u64(), Some(0), "{again}");
    assert_eq!(again["already_converted"].as_bool(), Some(true), "{again}");
    for e in fs::read_dir(root.join("layers")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".erofs") && !name.starts_with('.'),
            "left behind: {name}"
        );
    }

    let stats = store_stats(&root);
    let logical = stats["logical_bytes"].as_u64().unwrap();
    let stored = stats["stored_bytes"].as_u64().unwrap();
    assert!(
        stored * 2 < logical,
        "stored {stored} should be well under logical {logical}"
    );
    // Both layers still mount and match.
    for (layer, entries) in [(&a, &base), (&b, &second)] {
        let want = expected(entries);
        check_layer(&root, work.path(), layer, 65536, &want);
    }
}

fn store_stats(root: &Path) -> serde_json::Value {
    let out = dedupd(&[
        "store".as_ref(),
        "stats".as_ref(),
        "--root".as_ref(),
        root.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

// ---------------------------------------------------------------- convert_dir

#[test]
fn an_unpacked_directory_converts_like_a_layer() {
    require_root!();
    let work = scratch();
    let src = work.path().join("upper");
    fs::create_dir_all(src.join("sub/opaque")).unwrap();
    fs::write(src.join("sub/file"), vec![5u8; 200_000]).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::hard_link(src.join("sub/file"), src.join("hard")).unwrap();
    std::os::unix::fs::symlink("../etc/passwd", src.join("sub/sym")).unwrap();
    nix::sys::stat::mknod(
        &src.join("whiteout"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let c = CString::new(src.join("sub/opaque").as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated strings and a 1-byte value, all alive for the call.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    nix::unistd::chown(&src.join("empty"), Some(1234.into()), Some(5678.into())).unwrap();

    let root = work.path().join("store");
    let key = format!("sha256:{}", "ab".repeat(32));
    let record = {
        let store = dedupd::store::Store::open(&root).unwrap();
        dedupd::convert::convert_dir(&store, &src, &key).unwrap()
    };
    assert_eq!(record.diff_id, key);
    assert_eq!(record.chunks, 4, "200000 bytes in 64 KiB chunks");
    let e = export(&root, &key, &work.path().join("out"));
    fsck(&e);
    let m = mount(&e, &work.path().join("mnt"));
    let mut want = actual(&src);
    let got = actual(&m.dir);
    // The root's own metadata comes from the directory too.
    want.items.get_mut(&b""[..]).unwrap().xattrs.clear();
    assert_same(&want, &got, "convert_dir");
}

// ---------------------------------------------------------------- bad input

/// Everything observable about a store: its files (sizes; content for packs and images)
/// and `store stats`.
fn store_state(root: &Path) -> String {
    let mut lines = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
                continue;
            }
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            // The database is rewritten by every open; its content shows in `store stats`.
            let content = if rel.ends_with(".redb") {
                String::new()
            } else {
                sha_reader(File::open(e.path()).unwrap())
            };
            lines.push(format!(
                "{rel} {} {content}",
                if content.is_empty() { 0 } else { md.len() }
            ));
        }
    }
    lines.sort();
    lines.push(store_stats(root).to_string());
    lines.join("\n")
}

fn raw_tar(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    ty: tar::EntryType,
    link: &[u8],
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn bad_layers_are_refused_and_leave_the_store_unchanged() {
    require_root!();
    use tar::EntryType as T;
    let work = scratch();
    let root = work.path().join("store");
    // A good layer first: it must stay intact.
    let good = package_like_tree(6, 300);
    let good_file = work.path().join("good.tar");
    write_layer(&good, Compress::None, &good_file);
    let good_report = convert(&root, 65536, &[&good_file]).remove(0);

    // Each bad layer shares data with the good one and brings new data before the bad
    // entry, so a half-done conversion would show.
    let fresh = |b: &mut tar::Builder<Vec<u8>>| {
        let mut data = vec![0u8; 300_000];
        StdRng::seed_from_u64(99).fill(&mut data[..]);
        raw_entry(b, b"fresh", T::Regular, b"", &data);
    };
    let good_tar = raw_tar(|b| {
        fresh(b);
        raw_entry(b, b"first", T::Regular, b"", b"1");
        raw_entry(b, b"big", T::Regular, b"", &[7u8; 20000]);
    });
    let n = good_tar.len();
    let header_of_big = 512 + 300_000usize.div_ceil(512) * 512 + 512 + 512;
    let mut bad_sum = good_tar.clone();
    bad_sum[header_of_big + 5] ^= 1;
    let gzipped = gz(&good_tar);
    let mut bad_gz = gzipped.clone();
    for b in &mut bad_gz[100..200] {
        *b ^= 0x33;
    }
    let zst = zstd::stream::encode_all(&good_tar[..], 1).unwrap();
    // GNU tar's own sparse entry after the fresh data, its real size then cut to 1000
    // bytes, below its data region.
    let sparse_dir = work.path().join("sparse-tree");
    let island = vec![(512 << 10, vec![9u8; 100])];
    write_sparse_tree(
        &sparse_dir,
        &[SEntry::new(
            b"holey",
            SKind::File(Data::Sparse(1 << 20, island)),
        )],
    );
    let out = run(Command::new("tar")
        .args(["--sparse", "--format=gnu", "-cf", "-", "-C"])
        .arg(&sparse_dir)
        .arg("holey"));
    assert!(
        out.status.success(),
        "GNU tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut gnu_sparse = out.stdout;
    let at = 512
        * gnu_sparse
            .chunks_exact(512)
            .position(|b| b[156] == b'S')
            .expect("GNU tar wrote an `S` header");
    let header = &mut gnu_sparse[at..at + 512];
    header[483..495].copy_from_slice(b"00000001750\0");
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut past_real_size = raw_tar(fresh);
    past_real_size.truncate(past_real_size.len() - 1024);
    past_real_size.extend_from_slice(&gnu_sparse);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "sparse-past-real-size",
            past_real_size,
            "sparse file \"holey\"",
            "past the real size 1000",
        ),
        (
            "dotdot",
            raw_tar(|b| {
                fresh(b);
                raw_entry(b, b"a/../../etc/shadow", T::Regular, b"", b"x");
            }),
            "a/../../etc/shadow",
            "`..`",
        ),
        (
            "symlink-abs",
            raw_tar(|b| {
                fresh(b);
                raw_entry(b, b"link", T::Symlink, b"/etc", b"");
                raw_entry(b, b"link/passwd", T::Regular, b"", b"x");
            }),
            "link/passwd",
            "symlink",
        ),
        (
            "symlink-rel",
            raw_tar(|b| {
                fresh(b);
                raw_entry(b, b"d/link", T::Symlink, b"../..", b"");
                raw_entry(b, b"d/link/x", T::Regular, b"", b"x");
            }),
            "d/link/x",
            "symlink",
        ),
        (
            "hardlink-missing",
            raw_tar(|b| {
                fresh(b);
                raw_entry(b, b"h", T::Link, b"nowhere", b"");
            }),
            "\"h\"",
            "hard link target",
        ),
        (
            "long-name",
            raw_tar(|b| {
                fresh(b);
                let mut h = tar::Header::new_gnu();
                h.set_size(1);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                b.append_data(&mut h, "d/".to_string() + &"x".repeat(256), &b"1"[..])
                    .unwrap();
            }),
            "xxxx",
            "255",
        ),
        (
            "truncated-data",
            good_tar[..header_of_big + 512 + 7000].to_vec(),
            "\"big\"",
            "truncated",
        ),
        (
            "truncated-at-header",
            good_tar[..header_of_big + 512 + 20480].to_vec(),
            "after \"big\"",
            "truncated",
        ),
        ("checksum", bad_sum, "after \"first\"", "checksum"),
        (
            "gzip-truncated",
            gzipped[..gzipped.len() * 2 / 3].to_vec(),
            "entry",
            "gzip",
        ),
        ("gzip-corrupt", bad_gz, "entry", "gzip"),
        (
            "zstd-truncated",
            zst[..zst.len() * 2 / 3].to_vec(),
            "entry",
            "zstd",
        ),
    ];
    assert!(n > header_of_big + 512 + 20480);
    let before = store_state(&root);
    for (name, bytes, entry, rule) in cases {
        let file = work.path().join(format!("bad-{name}.layer"));
        fs::write(&file, &bytes).unwrap();
        let out = dedupd(&[
            "convert".as_ref(),
            "--root".as_ref(),
            root.as_os_str(),
            file.as_os_str(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(out.stdout.is_empty(), "{name}: printed a report");
        assert!(err.contains(&format!("bad-{name}.layer")), "{name}: {err}");
        assert!(
            err.contains(entry),
            "{name}: {err} should name the entry {entry}"
        );
        assert!(err.contains(rule), "{name}: {err} should say {rule}");
        assert_eq!(store_state(&root), before, "{name}: the store changed");
    }
    // The layer converted before is intact.
    let want = expected(&good);
    let e = export(
        &root,
        good_report["diff_id"].as_str().unwrap(),
        &work.path().join("good-out"),
    );
    fsck(&e);
    let m = mount(&e, &work.path().join("good-mnt"));
    assert_same(&want, &actual(&m.dir), "good layer after bad ones");
}

// ---------------------------------------------------------------- sparse files from GNU tar

/// Writes each file entry as a sparse file under `dir`: the size set first, then each
/// island written at its offset, so the holes stay unallocated; mode and mtime as the
/// entry says.
fn write_sparse_tree(dir: &Path, entries: &[SEntry]) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    fs::create_dir_all(dir).unwrap();
    for e in entries {
        let SKind::File(Data::Sparse(size, islands)) = &e.kind else {
            panic!("{}: only sparse files here", show(&e.path));
        };
        let path = dir.join(os(&e.path));
        let f = File::create(&path).unwrap();
        f.set_len(*size).unwrap();
        for (at, bytes) in islands {
            assert!(
                at + bytes.len() as u64 <= *size,
                "{}: island past the end",
                show(&e.path)
            );
            f.write_all_at(bytes, *at).unwrap();
        }
        f.set_permissions(fs::Permissions::from_mode(e.perm))
            .unwrap();
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.mtime);
        f.set_modified(mtime).unwrap();
    }
}

/// The sparse files of the GNU tar layers: holes at the start, in the middle and at the
/// end, a file that is all hole, an empty one, data not aligned to chunks (islands across
/// chunk boundaries, several islands in one chunk), more regions than an old GNU header
/// and its first extension block hold, and one of over 4 GiB.
fn sparse_tree() -> Vec<SEntry> {
    let mut rng = StdRng::seed_from_u64(12);
    let mut random = |n: usize| {
        let mut b = vec![0u8; n];
        rng.fill(&mut b[..]);
        b
    };
    let file = |name: &[u8], size: u64, islands: Vec<(u64, Vec<u8>)>| {
        SEntry::new(name, SKind::File(Data::Sparse(size, islands)))
    };
    vec![
        file(
            b"hole-first",
            (3 << 20) + 123,
            vec![
                ((2 << 20) + 5, random(70_000)),
                ((3 << 20) + 100, random(23)),
            ],
        ),
        file(
            b"hole-between",
            (2 << 20) + 4097,
            vec![(0, random(10_000)), ((1 << 20) + 777, random(65_536))],
        ),
        file(b"hole-last", 5 << 20, vec![(0, random(100_000))]),
        file(b"all-hole", (2 << 20) + 1, vec![]),
        file(b"empty", 0, vec![]),
        file(b"dense", 50_000, vec![(0, random(50_000))]),
        file(
            b"many-regions",
            4 << 20,
            (0..40u64)
                .map(|i| (i * 100_000 + 4093, random(100)))
                .collect(),
        ),
        file(
            b"over-4-gib",
            (4u64 << 30) + 65_536 + 12345,
            vec![
                (0, b"head".to_vec()),
                ((4u64 << 30) - 7, random(20_000)),
                ((4u64 << 30) + 65_536 + 12340, b"tail!".to_vec()),
            ],
        ),
    ]
}

/// Chunks of `chunk_bytes` that hold file data (any island byte): the rest are holes.
fn data_chunks(entries: &[SEntry], chunk_bytes: u64) -> u64 {
    let mut n = 0;
    for e in entries {
        let SKind::File(Data::Sparse(_, islands)) = &e.kind else {
            unreachable!()
        };
        let mut touched = BTreeSet::new();
        for (at, bytes) in islands {
            touched.extend(at / chunk_bytes..=(at + bytes.len() as u64 - 1) / chunk_bytes);
        }
        n += touched.len() as u64;
    }
    n
}

/// Whether `tar` holds an old GNU sparse header (typeflag `S` with the GNU magic).
fn has_old_gnu_sparse_header(tar: &[u8]) -> bool {
    tar.chunks_exact(512)
        .any(|b| b[156] == b'S' && &b[257..265] == b"ustar  \0")
}

#[test]
fn gnu_tar_sparse_layers_round_trip_through_the_kernel() {
    require_root!();
    let version = run(Command::new("tar").arg("--version"));
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with("tar (GNU tar)"),
        "this test needs GNU tar to write the layers, found: {version}"
    );
    let work = scratch();
    let entries = sparse_tree();
    let tree = work.path().join("tree");
    write_sparse_tree(&tree, &entries);
    let want = expected(&entries);
    let apparent: u64 = entries
        .iter()
        .map(|e| match &e.kind {
            SKind::File(d) => d.size(),
            _ => 0,
        })
        .sum();
    // Each format with its own store and chunk size; the marker proves GNU tar wrote the
    // sparse format asked for rather than plain entries.
    let formats: [(&str, &[&str], &[u8], u32); 4] = [
        ("gnu", &["--format=gnu"], b"", 4096),
        (
            "pax-0.0",
            &["--format=posix", "--sparse-version=0.0"],
            b"GNU.sparse.offset=",
            65536,
        ),
        (
            "pax-0.1",
            &["--format=posix", "--sparse-version=0.1"],
            b"GNU.sparse.map=",
            1 << 20,
        ),
        (
            "pax-1.0",
            &["--format=posix", "--sparse-version=1.0"],
            b"GNU.sparse.major=1",
            65536,
        ),
    ];
    for (name, args, marker, chunk_bytes) in formats {
        let layer = work.path().join(format!("{name}.tar"));
        let out = run(Command::new("tar")
            .arg("--sparse")
            .args(args)
            .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
            .arg(&layer)
            .arg("-C")
            .arg(&tree)
            .args(entries.iter().map(|e| os(&e.path))));
        assert!(
            out.status.success(),
            "tar {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tar_bytes = fs::read(&layer).unwrap();
        if marker.is_empty() {
            assert!(
                has_old_gnu_sparse_header(&tar_bytes),
                "{name}: no `S` header"
            );
        } else {
            assert!(
                tar_bytes.windows(marker.len()).any(|w| w == marker),
                "{name}: GNU tar wrote no {}",
                show(marker)
            );
        }
        assert!(
            (tar_bytes.len() as u64) < apparent / 100,
            "{name}: GNU tar stored the holes"
        );
        drop(tar_bytes);

        let root = work.path().join(format!("{name}.store"));
        let report = convert(&root, chunk_bytes, &[&layer]).remove(0);
        eprintln!("{name}: {report}");
        let e = export(
            &root,
            report["digest"].as_str().unwrap(),
            &work.path().join(format!("{name}.export")),
        );
        fsck(&e);
        let m = mount(&e, &work.path().join(format!("{name}.mnt")));
        assert_same(&want, &actual(&m.dir), name);
        drop(m);

        // The bounds. A chunk holding any data byte is read, hashed and stored like any
        // chunk: at most its bytes plus a record header (48 bytes), since lz4 output
        // that does not shrink is stored raw. Every chunk that is all hole points to one
        // all-zero chunk, stored once: an lz4 record of chunk_bytes zeros, under
        // chunk_bytes / 128 + 64 bytes. So the store grows by the data chunks only.
        let cb = u64::from(chunk_bytes);
        let data = data_chunks(&entries, cb);
        let get = |k: &str| report[k].as_u64().unwrap();
        assert!(get("new_chunks") <= data + 1, "{name}: {report}");
        assert!(get("logical_bytes") <= data * cb, "{name}: {report}");
        let store_bound = data * (cb + 48) + (48 + cb / 128 + 64);
        assert!(
            get("stored_bytes") <= store_bound,
            "{name}: stored {} > {store_bound}",
            get("stored_bytes")
        );
        // The data blob holds each distinct chunk once, the zero chunk once: holes take
        // no blob space.
        let blob_bytes: u64 = e
            .devices
            .iter()
            .map(|d| fs::metadata(d).unwrap().len())
            .sum();
        assert!(
            blob_bytes <= (data + 1) * cb,
            "{name}: blob of {blob_bytes} bytes for {data} data chunks"
        );
        // The image holds metadata and one 8-byte chunk index entry per chunk of each
        // file, holes included (EROFS has no run-length form); 64 KiB covers the
        // superblock, the root directory and these few inodes.
        let index_bytes: u64 = entries
            .iter()
            .map(|e| match &e.kind {
                SKind::File(d) => 8 * d.size().div_ceil(cb),
                _ => 0,
            })
            .sum();
        assert!(
            get("image_bytes") <= index_bytes + (64 << 10),
            "{name}: image of {} bytes, index {index_bytes}",
            get("image_bytes")
        );
        fs::remove_dir_all(e.image.parent().unwrap()).unwrap();
        fs::remove_dir_all(&root).unwrap();
        fs::remove_file(&layer).unwrap();
    }
}
