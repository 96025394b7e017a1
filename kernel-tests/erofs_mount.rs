//! The EROFS writer against the real kernel: trees built in code are written as images
//! whose file data sits in blob files we write ourselves, checked by `fsck.erofs`,
//! mounted file-backed with `-o device=` and compared path by path with the tree.
//! Run as root; skipped loudly otherwise.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use dedupd::erofs::{
    write_image, ChunkAddr, Device, FileData, ImageOptions, Kind, Meta, Node, NodeId, Tree,
};
use proptest::prelude::*;

const BUILD_TIME: u64 = 1_700_000_000;

/// A data blob being filled: chunks are appended block-aligned.
struct Blob {
    device: u16,
    file: File,
    path: PathBuf,
    next_block: u32,
}

impl Blob {
    fn create(dir: &Path, device: u16) -> Blob {
        let path = dir.join(format!("blob{device}"));
        Blob {
            device,
            file: File::create_new(&path).expect("creating blob"),
            path,
            next_block: 0,
        }
    }

    /// Appends `data` at the next free block and returns its address.
    fn put(&mut self, data: &[u8]) -> ChunkAddr {
        let blkaddr = self.next_block;
        self.file
            .write_all_at(data, u64::from(blkaddr) * 4096)
            .expect("writing blob");
        self.next_block += u32::try_from(data.len().div_ceil(4096)).unwrap();
        ChunkAddr::Blob {
            device: self.device,
            blkaddr,
        }
    }

    fn finish(&self, tag: &str) -> Device {
        // The last chunk may end mid-block; the device still covers whole blocks.
        self.file
            .set_len(u64::from(self.next_block) * 4096)
            .expect("sizing blob");
        Device {
            tag: tag.into(),
            blocks: self.next_block,
        }
    }
}

/// A deterministic, position-dependent byte pattern (so misplaced chunks show).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A file of `size` bytes: chunk `i` is a hole when `hole(i)`, else pattern data in `blob`.
fn file_data(
    blob: &mut Blob,
    chunk_bits: u8,
    size: u64,
    seed: u64,
    hole: impl Fn(u64) -> bool,
) -> FileData {
    let chunk = 1u64 << chunk_bits;
    let n = size.div_ceil(chunk);
    let chunks = (0..n)
        .map(|i| {
            if hole(i) {
                ChunkAddr::Hole
            } else {
                let len = chunk.min(size - i * chunk) as usize;
                blob.put(&pattern(seed ^ i, len))
            }
        })
        .collect();
    FileData { size, chunks }
}

fn meta(perm: u16, uid: u32, gid: u32, mtime: i64, nsec: u32) -> Meta {
    Meta {
        perm,
        uid,
        gid,
        mtime,
        mtime_nsec: nsec,
        xattrs: BTreeMap::new(),
    }
}

fn dir_node(m: Meta) -> Node {
    Node {
        meta: m,
        kind: Kind::Dir(BTreeMap::new()),
    }
}

/// Writes the image, fscks it, mounts it and compares the mount with the tree.
fn check_tree(tree: &Tree, chunk_bits: u8, blobs: &[Blob], scratch: &Path) {
    let devices: Vec<Device> = blobs
        .iter()
        .map(|b| b.finish(&format!("blob-{}", b.device)))
        .collect();
    let device_paths: Vec<PathBuf> = blobs.iter().map(|b| b.path.clone()).collect();
    let opts = ImageOptions {
        chunk_bits,
        devices,
        build_time: BUILD_TIME,
    };
    let image = scratch.join("image.erofs");
    let mut out = File::create(&image).expect("creating image");
    let info = write_image(tree, &opts, &mut out).expect("writing image");
    drop(out);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), info.bytes);

    // Same tree, same bytes.
    let mut again = std::io::Cursor::new(Vec::new());
    write_image(tree, &opts, &mut again).expect("writing image again");
    assert!(
        again.into_inner() == std::fs::read(&image).unwrap(),
        "image is not deterministic"
    );

    common::fsck_erofs(&image, &device_paths).unwrap_or_else(|e| panic!("{e}"));
    let expected =
        common::tree_manifest(tree, chunk_bits, &device_paths).expect("expected manifest");
    let mnt = common::mount_erofs(&image, &device_paths).unwrap_or_else(|e| panic!("{e}"));
    let actual = common::walk_mounted(mnt.path()).expect("walking the mount");
    common::assert_manifests_equal(&expected, &actual);
    eprintln!(
        "image of {} inodes, {} bytes: {} paths match",
        info.inodes,
        info.bytes,
        actual.len()
    );
    mnt.unmount().expect("unmounting");
}

/// A valid POSIX ACL xattr value: user::rw-, user:1000:rwx, group::r--, mask::rwx, other::r--.
fn sample_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 7, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 7, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

#[test]
fn every_kind_mounts_and_matches() {
    if !common::require_root("every_kind_mounts_and_matches") {
        return;
    }
    let scratch = common::scratch_dir();
    let chunk_bits = 16;
    let mut b1 = Blob::create(scratch.path(), 1);
    let mut b2 = Blob::create(scratch.path(), 2);

    let mut root_meta = meta(0o755, 0, 0, BUILD_TIME as i64, 0);
    root_meta.xattrs.insert(
        b"trusted.shared".to_vec(),
        b"same value on many inodes".to_vec(),
    );
    let mut t = Tree::new(root_meta);
    let shared = |mut m: Meta| {
        m.xattrs.insert(
            b"trusted.shared".to_vec(),
            b"same value on many inodes".to_vec(),
        );
        m
    };

    // Regular files: empty, small, multi-chunk over two devices, partially sparse, huge sparse.
    let files = t.insert(Tree::ROOT, b"files", dir_node(meta(0o755, 0, 0, 1, 1)));
    let empty = Node {
        meta: meta(0o644, 0, 0, BUILD_TIME as i64, 0),
        kind: Kind::File(FileData::default()),
    };
    t.insert(files, b"empty", empty);
    let small = file_data(&mut b1, chunk_bits, 100, 1, |_| false);
    t.insert(
        files,
        b"small",
        Node {
            meta: shared(meta(0o600, 1000, 1000, 1_600_000_000, 123_456_789)),
            kind: Kind::File(small),
        },
    );
    let mut multi = file_data(&mut b1, chunk_bits, 3 * 65536 + 777, 2, |_| false);
    // Move one chunk to the second device to exercise device ids.
    let len = 65536;
    multi.chunks[1] = b2.put(&pattern(99, len));
    t.insert(
        files,
        b"multi",
        Node {
            meta: meta(0o644, 0, 0, 1, 0),
            kind: Kind::File(multi),
        },
    );
    let partial = file_data(&mut b2, chunk_bits, 5 * 65536, 3, |i| i == 1 || i == 3);
    t.insert(
        files,
        b"partial-sparse",
        Node {
            meta: meta(0o640, 0, 0, 2, 0),
            kind: Kind::File(partial),
        },
    );
    let huge_size = (4u64 << 30) + 5000;
    let last = huge_size.div_ceil(65536) - 1;
    let huge = file_data(&mut b1, chunk_bits, huge_size, 4, |i| {
        !(i == 0 || i == 40_000 || i == last)
    });
    t.insert(
        files,
        b"huge-sparse",
        Node {
            meta: meta(0o644, 0, 0, 3, 0),
            kind: Kind::File(huge),
        },
    );
    let all_holes = file_data(&mut b1, chunk_bits, 3 * 65536, 5, |_| true);
    t.insert(
        files,
        b"all-holes",
        Node {
            meta: meta(0o644, 0, 0, 3, 0),
            kind: Kind::File(all_holes),
        },
    );

    // Hard links: one inode under three names in two directories.
    let linked = file_data(&mut b1, chunk_bits, 70_000, 6, |_| false);
    let l = t.insert(
        files,
        b"linked",
        Node {
            meta: meta(0o755, 5, 6, 7, 8),
            kind: Kind::File(linked),
        },
    );
    t.link(files, b"linked-again", l);
    t.link(Tree::ROOT, b"linked-from-root", l);

    // Permissions, owners, times.
    let perms = t.insert(Tree::ROOT, b"perms", dir_node(meta(0o1777, 0, 0, -1, 0)));
    for (i, perm) in [0o7777u16, 0o4755, 0o2755, 0o1777, 0o0, 0o4000, 0o444]
        .into_iter()
        .enumerate()
    {
        t.insert(
            perms,
            format!("p{perm:04o}").as_bytes(),
            Node {
                meta: meta(perm, i as u32, 0, 10, 0),
                kind: Kind::Fifo,
            },
        );
    }
    for (name, uid, gid) in [
        ("u65535", 65535u32, 65535u32),
        ("u65536", 65536, 1),
        ("ubig", 4_000_000_000, 3_999_999_999),
    ] {
        t.insert(
            perms,
            name.as_bytes(),
            Node {
                meta: meta(0o644, uid, gid, BUILD_TIME as i64, 0),
                kind: Kind::Socket,
            },
        );
    }
    for (name, mtime, nsec) in [
        ("t-negative", -1_000_000_000i64, 999_999_999u32),
        ("t-pre-epoch", -1, 1),
        ("t-build", BUILD_TIME as i64, 0),
        ("t-build-nsec", BUILD_TIME as i64, 1),
        ("t-far", 1 << 40, 5),
    ] {
        t.insert(
            perms,
            name.as_bytes(),
            Node {
                meta: meta(0o644, 0, 0, mtime, nsec),
                kind: Kind::Fifo,
            },
        );
    }

    // Devices, fifos, sockets, an overlay whiteout and an opaque directory.
    let dev = t.insert(Tree::ROOT, b"dev", dir_node(meta(0o755, 0, 0, 0, 0)));
    for (name, node) in [
        ("null", Kind::CharDev { major: 1, minor: 3 }),
        (
            "bigminor",
            Kind::CharDev {
                major: 4095,
                minor: (1 << 20) - 1,
            },
        ),
        ("sda", Kind::BlockDev { major: 8, minor: 0 }),
        (
            "blk-wide",
            Kind::BlockDev {
                major: 259,
                minor: 0x12345,
            },
        ),
        ("fifo", Kind::Fifo),
        ("sock", Kind::Socket),
        ("whiteout", Kind::CharDev { major: 0, minor: 0 }),
    ] {
        t.insert(
            dev,
            name.as_bytes(),
            Node {
                meta: shared(meta(0o600, 0, 0, 9, 9)),
                kind: node,
            },
        );
    }
    let mut opaque_meta = meta(0o755, 0, 0, 0, 0);
    opaque_meta
        .xattrs
        .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    t.insert(dev, b"opaque", dir_node(opaque_meta));

    // Symlinks: short, 4095-byte inline, and one pushed to a data block by its xattrs.
    let links = t.insert(Tree::ROOT, b"links", dir_node(meta(0o755, 0, 0, 0, 0)));
    t.insert(
        links,
        b"short",
        Node {
            meta: meta(0o777, 0, 0, 11, 0),
            kind: Kind::Symlink(b"../files/small".to_vec()),
        },
    );
    let long_target: Vec<u8> = (0..4000).map(|i| b'a' + (i % 26) as u8).collect();
    t.insert(
        links,
        b"long-inline",
        Node {
            meta: meta(0o777, 0, 0, BUILD_TIME as i64, 0),
            kind: Kind::Symlink(long_target[..4000].to_vec()),
        },
    );
    let mut max_target = long_target.clone();
    max_target.resize(4095, b'z');
    let mut xm = meta(0o777, 0, 0, 12, 0);
    xm.xattrs.insert(b"trusted.pad".to_vec(), vec![b'p'; 200]);
    t.insert(
        links,
        b"long-plain",
        Node {
            meta: xm,
            kind: Kind::Symlink(max_target),
        },
    );

    // Xattrs: inline and shared, every prefix, binary values, an ACL, a big value.
    let x = t.insert(
        Tree::ROOT,
        b"xattrs",
        dir_node(shared(meta(0o755, 0, 0, 0, 0))),
    );
    let mut xm = shared(meta(0o644, 0, 0, 13, 0));
    xm.xattrs
        .insert(b"user.inline".to_vec(), b"only here".to_vec());
    xm.xattrs.insert(b"user.empty-value".to_vec(), Vec::new());
    xm.xattrs.insert(b"trusted.t".to_vec(), vec![0, 1, 2, 255]);
    xm.xattrs
        .insert(b"security.dedupd".to_vec(), b"label".to_vec());
    xm.xattrs
        .insert(b"system.posix_acl_access".to_vec(), sample_acl());
    xm.xattrs.insert(b"user.big".to_vec(), pattern(7, 16_000));
    xm.xattrs.insert(
        vec![b'u', b's', b'e', b'r', b'.']
            .into_iter()
            .chain(std::iter::repeat_n(b'n', 250))
            .collect(),
        b"v".to_vec(),
    );
    t.insert(
        x,
        b"many",
        Node {
            meta: xm,
            kind: Kind::File(FileData::default()),
        },
    );
    let mut dm = shared(meta(0o755, 0, 0, 0, 0));
    dm.xattrs
        .insert(b"system.posix_acl_default".to_vec(), sample_acl());
    t.insert(x, b"acl-default-dir", dir_node(dm));

    // Names: 255 bytes, non-UTF-8, ones that sort around "." and "..".
    let names = t.insert(Tree::ROOT, b"names", dir_node(meta(0o755, 0, 0, 0, 0)));
    for name in [
        vec![b'n'; 255],
        vec![0xff, 0xfe, b'x'],
        b"-".to_vec(),
        b"!".to_vec(),
        b".hidden".to_vec(),
        b"...".to_vec(),
        b"-.".to_vec(),
        b".-".to_vec(),
        vec![b'.', 1],
        vec![b'.', 0xff],
    ] {
        t.insert(
            names,
            &name,
            Node {
                meta: meta(0o644, 0, 0, 0, 0),
                kind: Kind::Fifo,
            },
        );
    }

    // One block of entries that no longer fits beside its inode and xattrs: FLAT_PLAIN.
    let mut fm = meta(0o755, 0, 0, 0, 0);
    fm.xattrs.insert(b"trusted.pad".to_vec(), vec![b'p'; 100]);
    let fallback = t.insert(Tree::ROOT, b"one-block-plain", dir_node(fm));
    for i in 0..15u8 {
        let mut name = vec![b'a' + i; 255];
        name[0] = b'f';
        t.insert(
            fallback,
            &name,
            Node {
                meta: meta(0o644, 0, 0, 0, 0),
                kind: Kind::Fifo,
            },
        );
    }

    // A directory spanning many blocks.
    let big = t.insert(Tree::ROOT, b"bigdir", dir_node(meta(0o755, 0, 0, 0, 0)));
    for i in 0..3000 {
        let name = format!("entry-{i:05}-{}", "x".repeat(i % 200));
        let kind = if i % 50 == 0 {
            Kind::Dir(BTreeMap::new())
        } else {
            Kind::Fifo
        };
        t.insert(
            big,
            name.as_bytes(),
            Node {
                meta: meta(0o644, 0, 0, 0, 0),
                kind,
            },
        );
    }

    // A deep tree.
    let mut d = t.insert(Tree::ROOT, b"deep", dir_node(meta(0o755, 0, 0, 0, 0)));
    for depth in 0..100 {
        d = t.insert(
            d,
            format!("level{depth}").as_bytes(),
            dir_node(meta(0o755, 0, 0, depth, 0)),
        );
    }
    let leaf = file_data(&mut b2, chunk_bits, 10, 8, |_| false);
    t.insert(
        d,
        b"leaf",
        Node {
            meta: meta(0o644, 0, 0, 0, 0),
            kind: Kind::File(leaf),
        },
    );

    check_tree(&t, chunk_bits, &[b1, b2], scratch.path());
}

// ---- random trees ----

#[derive(Clone, Debug)]
enum SpecKind {
    File { size: u64, holes: u64 },
    Dir,
    Symlink(Vec<u8>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
    Socket,
    HardLink(usize),
}

#[derive(Clone, Debug)]
struct Spec {
    parent: usize,
    name: Vec<u8>,
    kind: SpecKind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u8>().prop_filter("no NUL or /", |b| *b != 0 && *b != b'/');
    prop_oneof![
        4 => proptest::collection::vec(byte.clone(), 1..24),
        1 => proptest::collection::vec(byte, 250..=255),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn xattr_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let prefix = prop_oneof![Just("user."), Just("trusted."), Just("security.")];
    let suffix = prop_oneof![
        Just("a".to_string()),
        Just("shared".to_string()),
        "[a-z][a-z0-9._-]{0,40}".prop_map(|s| format!("dd-{s}")),
    ];
    let value = prop_oneof![
        Just(b"common".to_vec()),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ];
    (prefix, suffix, value).prop_map(|(p, s, v)| (format!("{p}{s}").into_bytes(), v))
}

fn kind_strategy() -> impl Strategy<Value = SpecKind> {
    prop_oneof![
        4 => (0u64..300_000, any::<u64>()).prop_map(|(size, holes)| SpecKind::File { size, holes }),
        3 => Just(SpecKind::Dir),
        1 => proptest::collection::vec(1u8..=255, 1..300).prop_map(SpecKind::Symlink),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| SpecKind::CharDev(a, b)),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| SpecKind::BlockDev(a, b)),
        1 => Just(SpecKind::Fifo),
        1 => Just(SpecKind::Socket),
        2 => any::<usize>().prop_map(SpecKind::HardLink),
    ]
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        any::<usize>(),
        name_strategy(),
        kind_strategy(),
        0u16..=0o7777,
        prop_oneof![0u32..70_000, 0u32..u32::MAX],
        prop_oneof![0u32..70_000, 0u32..u32::MAX],
        prop_oneof![
            Just((BUILD_TIME as i64, 0u32)),
            (-(1i64 << 40)..(1i64 << 40), 0u32..1_000_000_000),
        ],
        proptest::collection::vec(xattr_strategy(), 0..4),
    )
        .prop_map(|(parent, name, kind, perm, uid, gid, mtime, xattrs)| Spec {
            parent,
            name,
            kind,
            perm,
            uid,
            gid,
            mtime,
            xattrs,
        })
}

fn build_random(specs: &[Spec], chunk_bits: u8, blobs: &mut [Blob]) -> Tree {
    let mut t = Tree::new(meta(0o755, 0, 0, 0, 0));
    let mut dirs: Vec<NodeId> = vec![Tree::ROOT];
    let mut files: Vec<NodeId> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let parent = dirs[s.parent % dirs.len()];
        let mut m = meta(s.perm, s.uid, s.gid, s.mtime.0, s.mtime.1);
        // user.* xattrs exist only on regular files and directories.
        let user_ok = matches!(s.kind, SpecKind::File { .. } | SpecKind::Dir);
        m.xattrs = s
            .xattrs
            .iter()
            .filter(|(n, _)| user_ok || !n.starts_with(b"user."))
            .cloned()
            .collect();
        let kind = match &s.kind {
            SpecKind::HardLink(k) if !files.is_empty() => {
                let target = files[k % files.len()];
                // Only link targets still reachable (not replaced by a later entry).
                if t.reachable().iter().any(|&(id, _)| id == target) {
                    t.link(parent, &s.name, target);
                }
                continue;
            }
            SpecKind::HardLink(_) | SpecKind::Fifo => Kind::Fifo,
            SpecKind::File { size, holes } => {
                let blob = &mut blobs[i % blobs.len()];
                let holes = *holes;
                Kind::File(file_data(blob, chunk_bits, *size, i as u64, |c| {
                    holes >> (c % 64) & 1 == 1
                }))
            }
            SpecKind::Dir => Kind::Dir(BTreeMap::new()),
            SpecKind::Symlink(target) => Kind::Symlink(target.clone()),
            SpecKind::CharDev(a, b) => Kind::CharDev {
                major: *a,
                minor: *b,
            },
            SpecKind::BlockDev(a, b) => Kind::BlockDev {
                major: *a,
                minor: *b,
            },
            SpecKind::Socket => Kind::Socket,
        };
        // A later entry of the same name wins, as in a layer; a replaced directory's
        // subtree becomes unreachable and is not written.
        let is_dir = matches!(kind, Kind::Dir(_));
        let is_file = matches!(kind, Kind::File(_));
        let id = t.insert(parent, &s.name, Node { meta: m, kind });
        if is_dir {
            dirs.push(id);
        }
        if is_file {
            files.push(id);
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_mount_and_match(
        specs in proptest::collection::vec(spec_strategy(), 0..60),
        chunk_bits in prop_oneof![Just(12u8), Just(14u8), Just(16u8)],
    ) {
        if !common::require_root("random_trees_mount_and_match") {
            return Ok(());
        }
        let scratch = common::scratch_dir();
        let mut blobs = vec![Blob::create(scratch.path(), 1), Blob::create(scratch.path(), 2)];
        let tree = build_random(&specs, chunk_bits, &mut blobs);
        check_tree(&tree, chunk_bits, &blobs, scratch.path());
    }
}
