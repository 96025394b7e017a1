//! Layout and error tests of the writer, reading images back with a minimal parser of
//! the fields we write (the kernel tests in `kernel-tests/erofs_mount.rs` do the rest).

use std::collections::BTreeMap;
use std::io::Cursor;

use super::format::{self, BLOCK_BYTES};
use super::*;

const BUILD: u64 = 1_000_000;

fn meta(perm: u16) -> Meta {
    Meta {
        mtime: BUILD as i64,
        ..Meta::with_perm(perm)
    }
}

fn dir() -> Node {
    Node {
        meta: meta(0o755),
        kind: Kind::Dir(BTreeMap::new()),
    }
}

fn fifo() -> Node {
    Node {
        meta: meta(0o644),
        kind: Kind::Fifo,
    }
}

fn opts(devices: Vec<Device>) -> ImageOptions {
    ImageOptions {
        chunk_bits: 16,
        devices,
        build_time: BUILD,
    }
}

fn dev(blocks: u32) -> Device {
    Device {
        tag: "blob".into(),
        blocks,
    }
}

fn write(tree: &Tree, o: &ImageOptions) -> Result<Vec<u8>, WriteError> {
    let mut c = Cursor::new(Vec::new());
    let info = write_image(tree, o, &mut c)?;
    let img = c.into_inner();
    assert_eq!(img.len() as u64, info.bytes);
    assert_eq!(info.bytes % BLOCK_BYTES, 0);
    Ok(img)
}

fn unrepresentable(tree: &Tree, o: &ImageOptions) -> String {
    match write(tree, o) {
        Err(WriteError::Unrepresentable(m)) => m,
        Ok(_) => panic!("wrote an image that should have been refused"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The fields of one on-disk inode we check.
#[derive(Debug)]
struct RawInode {
    pos: usize,
    extended: bool,
    layout: u16,
    xattr_icount: u16,
    mode: u16,
    nlink: u32,
    size: u64,
    i_u: u32,
    uid: u32,
}

impl RawInode {
    fn bytes(&self) -> usize {
        if self.extended {
            64
        } else {
            32
        }
    }
    fn xattr_bytes(&self) -> usize {
        if self.xattr_icount == 0 {
            0
        } else {
            12 + 4 * (usize::from(self.xattr_icount) - 1)
        }
    }
}

fn inode(img: &[u8], nid: u64) -> RawInode {
    let pos = (nid * 32) as usize;
    let fmt = le16(img, pos);
    let extended = fmt & 1 == 1;
    RawInode {
        pos,
        extended,
        layout: (fmt >> 1) & 7,
        xattr_icount: le16(img, pos + 2),
        mode: le16(img, pos + 4),
        nlink: if extended {
            le32(img, pos + 44)
        } else {
            u32::from(le16(img, pos + 6))
        },
        size: if extended {
            le64(img, pos + 8)
        } else {
            u64::from(le32(img, pos + 8))
        },
        i_u: le32(img, pos + 16),
        uid: if extended {
            le32(img, pos + 24)
        } else {
            u32::from(le16(img, pos + 24))
        },
    }
}

/// All entries of a FLAT_PLAIN directory, in on-disk order: (name, nid, file type).
fn dirents(img: &[u8], d: &RawInode) -> Vec<(Vec<u8>, u64, u8)> {
    let mut out = Vec::new();
    let blocks = d.size.div_ceil(BLOCK_BYTES);
    for b in 0..blocks {
        let start = match d.layout {
            format::DATALAYOUT_FLAT_PLAIN => ((u64::from(d.i_u) + b) * BLOCK_BYTES) as usize,
            format::DATALAYOUT_FLAT_INLINE => {
                assert_eq!(blocks, 1, "only one-block directories are inline");
                d.pos + d.bytes() + d.xattr_bytes()
            }
            other => panic!("directory layout {other}"),
        };
        let max = (d.size - b * BLOCK_BYTES).min(BLOCK_BYTES) as usize;
        let blk = &img[start..(start + BLOCK_BYTES as usize).min(img.len())];
        let n = usize::from(le16(blk, 8)) / 12;
        for i in 0..n {
            let e = &blk[i * 12..];
            let off = usize::from(le16(e, 8));
            let end = if i + 1 < n {
                usize::from(le16(&blk[(i + 1) * 12..], 8))
            } else {
                off + blk[off..max]
                    .iter()
                    .position(|&c| c == 0)
                    .unwrap_or(max - off)
            };
            out.push((blk[off..end].to_vec(), le64(e, 0), e[10]));
        }
    }
    out
}

fn root(img: &[u8]) -> RawInode {
    inode(img, u64::from(le16(img, 1024 + 14)))
}

fn lookup(img: &[u8], d: &RawInode, name: &[u8]) -> RawInode {
    let nid = dirents(img, d)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no entry {}", String::from_utf8_lossy(name)))
        .1;
    inode(img, nid)
}

#[test]
fn superblock_device_table_and_checksum() {
    let mut t = Tree::new(meta(0o755));
    t.insert(Tree::ROOT, b"f", fifo());
    let img = write(
        &t,
        &opts(vec![
            dev(10),
            Device {
                tag: "x".repeat(64),
                blocks: 3,
            },
        ]),
    )
    .unwrap();
    let sb = &img[1024..];
    assert_eq!(le32(sb, 0), format::SUPER_MAGIC);
    assert_eq!(sb[12], 12, "blkszbits");
    assert_eq!(le32(sb, 8), format::FEATURE_COMPAT_SB_CHKSUM);
    assert_eq!(
        le32(sb, 80),
        format::FEATURE_INCOMPAT_CHUNKED_FILE | format::FEATURE_INCOMPAT_DEVICE_TABLE
    );
    assert_eq!(le64(sb, 16), 2, "inos");
    assert_eq!(le64(sb, 24), BUILD);
    assert_eq!(u64::from(le32(sb, 36)) * BLOCK_BYTES, img.len() as u64);
    assert_eq!(le16(sb, 86), 2, "extra_devices");
    let slotoff = usize::from(le16(sb, 88)) * 128;
    assert_eq!(slotoff, 1152);
    assert_eq!(&img[slotoff..slotoff + 4], b"blob");
    assert_eq!(img[slotoff + 4], 0);
    assert_eq!(le32(&img, slotoff + 64), 10);
    assert_eq!(
        &img[slotoff + 128..slotoff + 192],
        "x".repeat(64).as_bytes()
    );
    assert_eq!(le32(&img, slotoff + 128 + 64), 3);
    // Root right after the device table; nids count 32-byte slots from block 0.
    assert_eq!(le16(sb, 14), (1152 + 256) / 32);
    assert_eq!(le32(sb, 4), format::superblock_checksum(&img[..4096]));
    // The checksum covers the first inodes too.
    let mut bad = img[..4096].to_vec();
    bad[1500] ^= 1;
    assert_ne!(le32(sb, 4), format::superblock_checksum(&bad));
}

#[test]
fn no_device_table_without_devices() {
    let t = Tree::new(meta(0o755));
    let img = write(&t, &opts(vec![])).unwrap();
    assert_eq!(le32(&img, 1024 + 80), format::FEATURE_INCOMPAT_CHUNKED_FILE);
    assert_eq!(le16(&img, 1024 + 86), 0);
    assert_eq!(le16(&img, 1024 + 88), 0);
    let r = root(&img);
    assert_eq!(r.nlink, 2);
    assert_eq!(r.layout, format::DATALAYOUT_FLAT_INLINE);
    assert_eq!(r.size, 2 * 12 + 3);
    let names: Vec<Vec<u8>> = dirents(&img, &r).into_iter().map(|e| e.0).collect();
    assert_eq!(names, vec![b".".to_vec(), b"..".to_vec()]);
}

#[test]
fn images_are_deterministic() {
    let mut t = Tree::new(meta(0o755));
    for i in 0..200u32 {
        let mut m = meta(0o644);
        m.xattrs.insert(
            format!("user.k{}", i % 7).into_bytes(),
            vec![i as u8 % 3; 10],
        );
        t.insert(
            Tree::ROOT,
            format!("n{i}").as_bytes(),
            Node {
                meta: m,
                kind: Kind::File(FileData::default()),
            },
        );
    }
    let o = opts(vec![dev(1)]);
    assert_eq!(write(&t, &o).unwrap(), write(&t, &o).unwrap());
}

#[test]
fn compact_inodes_only_when_every_field_fits() {
    let mut t = Tree::new(meta(0o755));
    let with = |f: &dyn Fn(&mut Meta)| {
        let mut n = fifo();
        f(&mut n.meta);
        n
    };
    t.insert(Tree::ROOT, b"compact", with(&|_| {}));
    t.insert(Tree::ROOT, b"uid", with(&|m| m.uid = 65536));
    t.insert(Tree::ROOT, b"gid", with(&|m| m.gid = 70000));
    t.insert(Tree::ROOT, b"uid-max-compact", with(&|m| m.uid = 65535));
    t.insert(Tree::ROOT, b"nsec", with(&|m| m.mtime_nsec = 1));
    t.insert(Tree::ROOT, b"mtime", with(&|m| m.mtime = -5));
    let img = write(&t, &opts(vec![])).unwrap();
    let r = root(&img);
    for (name, extended) in [
        (&b"compact"[..], false),
        (b"uid", true),
        (b"gid", true),
        (b"uid-max-compact", false),
        (b"nsec", true),
        (b"mtime", true),
    ] {
        let i = lookup(&img, &r, name);
        assert_eq!(i.extended, extended, "{}", String::from_utf8_lossy(name));
        assert_eq!(i.mode, format::s_if::FIFO | 0o644);
    }
    assert_eq!(lookup(&img, &r, b"uid").uid, 65536);
    let m = lookup(&img, &r, b"mtime");
    assert_eq!(le64(&img, m.pos + 32) as i64, -5);
}

#[test]
fn big_files_need_extended_inodes_and_chunks_follow_aligned() {
    let mut t = Tree::new(meta(0o755));
    let size = (5u64 << 30) + 1;
    let n = size.div_ceil(1 << 16) as usize;
    let mut chunks = vec![ChunkAddr::Hole; n];
    chunks[1] = ChunkAddr::Blob {
        device: 2,
        blkaddr: 7,
    };
    chunks[n - 1] = ChunkAddr::Blob {
        device: 1,
        blkaddr: 0,
    };
    let mut m = meta(0o644);
    // 12 + 4-aligned entry of 4 + 1 + 2 = 8 bytes: 20 bytes of xattrs, so the index
    // array needs 4 bytes of padding after a compact inode (32 + 20 = 52 -> 56).
    m.xattrs.insert(b"user.a".to_vec(), b"bc".to_vec());
    t.insert(
        Tree::ROOT,
        b"big",
        Node {
            meta: m,
            kind: Kind::File(FileData { size, chunks }),
        },
    );
    let img = write(&t, &opts(vec![dev(1), dev(24)])).unwrap();
    let f = lookup(&img, &root(&img), b"big");
    assert!(f.extended);
    assert_eq!(f.size, size);
    assert_eq!(f.layout, format::DATALAYOUT_CHUNK_BASED);
    assert_eq!(f.i_u, u32::from(format::CHUNK_FORMAT_INDEXES) | 4);
    assert_eq!(f.xattr_bytes(), 20);
    let idx = (f.pos + f.bytes() + f.xattr_bytes()).next_multiple_of(8);
    let at = |i: usize| (le16(&img, idx + 8 * i + 2), le32(&img, idx + 8 * i + 4));
    assert_eq!(at(0), (0, u32::MAX));
    assert_eq!(at(1), (2, 7));
    assert_eq!(at(2), (0, u32::MAX));
    assert_eq!(at(n - 1), (1, 0));
}

#[test]
fn empty_files_have_no_chunk_indexes() {
    let mut t = Tree::new(meta(0o755));
    t.insert(
        Tree::ROOT,
        b"e",
        Node {
            meta: meta(0o644),
            kind: Kind::File(FileData::default()),
        },
    );
    t.insert(Tree::ROOT, b"g", fifo());
    let img = write(&t, &opts(vec![])).unwrap();
    let r = root(&img);
    let e = lookup(&img, &r, b"e");
    assert!(!e.extended);
    assert_eq!((e.layout, e.size), (format::DATALAYOUT_CHUNK_BASED, 0));
    // Its neighbour follows directly: nothing but the 32-byte inode was written.
    assert_eq!(lookup(&img, &r, b"g").pos.abs_diff(e.pos), 32);
}

#[test]
fn dir_blocks_pack_exactly() {
    // 244-byte names take 256 bytes with their dirent: 16 fill a block exactly.
    let (ends, used) = writer::pack_dir(std::iter::repeat_n(244, 16));
    assert_eq!((ends, used), (vec![16], 4096));
    let (ends, used) = writer::pack_dir(std::iter::repeat_n(244, 17));
    assert_eq!((ends, used), (vec![16, 17], 256));
    let (ends, used) = writer::pack_dir(std::iter::empty());
    assert_eq!((ends, used), (vec![0], 0));
}

#[test]
fn big_directories_span_sorted_blocks() {
    let mut t = Tree::new(meta(0o755));
    let mut expected: Vec<Vec<u8>> = vec![b".".to_vec(), b"..".to_vec(), b".-".to_vec()];
    t.insert(Tree::ROOT, b".-", fifo());
    for i in 0..600u32 {
        let mut name = format!("{i:04}").into_bytes();
        name.resize(10 + (i as usize * 7) % 246, b'q');
        t.insert(Tree::ROOT, &name, if i % 10 == 0 { dir() } else { fifo() });
        expected.push(name);
    }
    expected.sort();
    let img = write(&t, &opts(vec![])).unwrap();
    let r = root(&img);
    assert_eq!(r.nlink, 2 + 60);
    assert_eq!(r.layout, format::DATALAYOUT_FLAT_PLAIN);
    assert!(r.size > 20 * BLOCK_BYTES, "size {}", r.size);
    let got = dirents(&img, &r);
    let names: Vec<Vec<u8>> = got.iter().map(|e| e.0.clone()).collect();
    assert_eq!(names, expected);
    let root_nid = u64::from(le16(&img, 1024 + 14));
    let mut subdirs = 0;
    for (name, nid, ft) in &got {
        if name == b"." || name == b".." {
            assert_eq!((*nid, *ft), (root_nid, format::ft::DIR));
            continue;
        }
        let is_dir = inode(&img, *nid).mode & 0o170000 == format::s_if::DIR;
        subdirs += u32::from(is_dir);
        let want = if is_dir {
            format::ft::DIR
        } else {
            format::ft::FIFO
        };
        assert_eq!(*ft, want);
    }
    assert_eq!(subdirs, 60);
}

#[test]
fn nested_dotdot_points_at_the_parent() {
    let mut t = Tree::new(meta(0o755));
    let a = t.insert(Tree::ROOT, b"a", dir());
    t.insert(a, b"b", dir());
    let img = write(&t, &opts(vec![])).unwrap();
    let r = root(&img);
    let a_ino = lookup(&img, &r, b"a");
    assert_eq!(a_ino.nlink, 3);
    let b_ino = lookup(&img, &a_ino, b"b");
    let dotdot = dirents(&img, &b_ino)
        .into_iter()
        .find(|e| e.0 == b"..")
        .unwrap();
    assert_eq!(dotdot.1 * 32, a_ino.pos as u64);
}

#[test]
fn symlinks_inline_or_in_a_block() {
    let mut t = Tree::new(meta(0o755));
    let target = vec![b't'; 4095];
    t.insert(
        Tree::ROOT,
        b"inline",
        Node {
            meta: meta(0o777),
            kind: Kind::Symlink(b"short".to_vec()),
        },
    );
    // 32 + 4095 > 4096 would cross the block: stored in a data block instead.
    t.insert(
        Tree::ROOT,
        b"plain",
        Node {
            meta: meta(0o777),
            kind: Kind::Symlink(target.clone()),
        },
    );
    let img = write(&t, &opts(vec![])).unwrap();
    let r = root(&img);
    let i = lookup(&img, &r, b"inline");
    assert_eq!(i.layout, format::DATALAYOUT_FLAT_INLINE);
    assert_eq!(&img[i.pos + 32..i.pos + 37], b"short");
    let p = lookup(&img, &r, b"plain");
    assert_eq!(p.layout, format::DATALAYOUT_FLAT_PLAIN);
    let at = (u64::from(p.i_u) * BLOCK_BYTES) as usize;
    assert_eq!(&img[at..at + 4095], &target[..]);
}

#[test]
fn inline_data_never_crosses_a_block() {
    let mut t = Tree::new(meta(0o755));
    for i in 0..40u32 {
        t.insert(
            Tree::ROOT,
            format!("l{i:02}").as_bytes(),
            Node {
                meta: meta(0o777),
                kind: Kind::Symlink(vec![b'x'; 300 + i as usize]),
            },
        );
    }
    let img = write(&t, &opts(vec![])).unwrap();
    let r = root(&img);
    for (name, nid, _) in dirents(&img, &r) {
        if name.starts_with(b"l") {
            let s = inode(&img, nid);
            let start = s.pos as u64;
            let end = start + 32 + s.size;
            assert_eq!(start / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
        }
    }
}

#[test]
fn repeated_xattrs_are_shared() {
    let mut t = Tree::new(meta(0o755));
    for i in 0..3 {
        let mut m = meta(0o644);
        m.xattrs.insert(b"trusted.same".to_vec(), b"v".to_vec());
        m.xattrs.insert(b"user.own".to_vec(), vec![i]);
        t.insert(
            Tree::ROOT,
            &[b'a' + i],
            Node {
                meta: m,
                kind: Kind::File(FileData::default()),
            },
        );
    }
    let img = write(&t, &opts(vec![])).unwrap();
    let xattr_blkaddr = u64::from(le32(&img, 1024 + 44));
    assert!(xattr_blkaddr > 0);
    let shared_at = (xattr_blkaddr * BLOCK_BYTES) as usize;
    // The shared entry: name len 4, index trusted, value len 1, "same", "v", padding.
    assert_eq!(
        &img[shared_at..shared_at + 9],
        &[4, 4, 1, 0, b's', b'a', b'm', b'e', b'v']
    );
    let r = root(&img);
    for name in [b"a", b"b", b"c"] {
        let f = lookup(&img, &r, name);
        let x = f.pos + f.bytes();
        assert_eq!(img[x + 4], 1, "h_shared_count");
        assert_eq!(le32(&img, x + 12), 0, "shared id");
        // Then the inline entry user.own.
        assert_eq!(&img[x + 16..x + 23], &[3, 1, 1, 0, b'o', b'w', b'n']);
        assert_eq!(f.xattr_bytes(), 12 + 4 + 8);
    }
}

#[test]
fn xattr_name_prefixes() {
    use writer::split_xattr_name as s;
    assert_eq!(s(b"user.x"), Some((1, &b"x"[..])));
    assert_eq!(
        s(b"trusted.overlay.opaque"),
        Some((4, &b"overlay.opaque"[..]))
    );
    assert_eq!(s(b"security.capability"), Some((6, &b"capability"[..])));
    assert_eq!(s(b"system.posix_acl_access"), Some((2, &b""[..])));
    assert_eq!(s(b"system.posix_acl_default"), Some((3, &b""[..])));
    assert_eq!(s(b"user."), None);
    assert_eq!(s(b"system.other"), None);
    assert_eq!(s(b"lustre.x"), None);
    assert_eq!(s(b"x"), None);
}

fn single(node: Node) -> Tree {
    let mut t = Tree::new(meta(0o755));
    let d = t.insert(Tree::ROOT, b"d", dir());
    t.insert(d, b"entry", node);
    t
}

#[test]
fn refuses_what_it_cannot_represent() {
    let o = opts(vec![dev(4)]);
    let file = |size: u64, chunks: Vec<ChunkAddr>| Node {
        meta: meta(0o644),
        kind: Kind::File(FileData { size, chunks }),
    };
    let with_xattr = |name: &[u8], value: Vec<u8>, kind: Kind| {
        let mut m = meta(0o644);
        m.xattrs.insert(name.to_vec(), value);
        Node { meta: m, kind }
    };
    let cases: Vec<(Tree, &str)> = vec![
        (
            single(with_xattr(b"os2.x", vec![], Kind::Fifo)),
            "\"os2.x\" has no EROFS name prefix",
        ),
        (
            single(with_xattr(&[b'u'; 256], vec![], Kind::Fifo)),
            "no EROFS name prefix",
        ),
        (
            single(with_xattr(
                &[b"user.".as_slice(), &[b'n'; 251]].concat(),
                vec![],
                Kind::Dir(BTreeMap::new()),
            )),
            "is 256 bytes, over 255",
        ),
        (
            single(with_xattr(
                b"user.v",
                vec![0; 65536],
                Kind::Dir(BTreeMap::new()),
            )),
            "over 65535",
        ),
        (
            single(with_xattr(b"user.s", vec![1], Kind::Symlink(b"t".to_vec()))),
            "user.* xattrs exist only on regular files and directories",
        ),
        (
            single(file(1, vec![])),
            "0 chunk addresses for 1 bytes, want 1",
        ),
        (
            single(file(65537, vec![ChunkAddr::Hole])),
            "1 chunk addresses for 65537 bytes, want 2",
        ),
        (
            single(file(
                1,
                vec![ChunkAddr::Blob {
                    device: 0,
                    blkaddr: 0,
                }],
            )),
            "names device 0",
        ),
        (
            single(file(
                1,
                vec![ChunkAddr::Blob {
                    device: 2,
                    blkaddr: 0,
                }],
            )),
            "names device 2",
        ),
        (
            single(file(
                8192,
                vec![ChunkAddr::Blob {
                    device: 1,
                    blkaddr: 3,
                }],
            )),
            "lies outside device 1 (4 blocks)",
        ),
        (
            single(file(
                1,
                vec![ChunkAddr::Blob {
                    device: 1,
                    blkaddr: u32::MAX,
                }],
            )),
            "lies outside device 1",
        ),
        (
            single(Node {
                meta: meta(0o644),
                kind: Kind::CharDev {
                    major: 4096,
                    minor: 0,
                },
            }),
            "device 4096:0 beyond",
        ),
        (
            single(Node {
                meta: meta(0o644),
                kind: Kind::BlockDev {
                    major: 0,
                    minor: 1 << 20,
                },
            }),
            "beyond the kernel's 12-bit major / 20-bit minor",
        ),
        (
            single(Node {
                meta: meta(0o777),
                kind: Kind::Symlink(Vec::new()),
            }),
            "symlink target of 0 bytes",
        ),
        (
            single(Node {
                meta: meta(0o777),
                kind: Kind::Symlink(vec![b'a'; 4096]),
            }),
            "symlink target of 4096 bytes",
        ),
        (
            single(Node {
                meta: Meta {
                    mtime_nsec: 1_000_000_000,
                    ..meta(0o644)
                },
                kind: Kind::Fifo,
            }),
            "nanoseconds 1000000000",
        ),
        (
            single(Node {
                meta: meta(0o10644),
                kind: Kind::Fifo,
            }),
            "mode bits 10644 beyond 07777",
        ),
        (
            single(Node {
                meta: Meta {
                    uid: u32::MAX,
                    ..meta(0o644)
                },
                kind: Kind::Fifo,
            }),
            "reserved id 4294967295",
        ),
    ];
    for (tree, want) in cases {
        let msg = unrepresentable(&tree, &o);
        assert!(
            msg.starts_with("/d/entry: "),
            "error does not name the path: {msg}"
        );
        assert!(msg.contains(want), "{msg:?} does not contain {want:?}");
    }
}

#[test]
fn refuses_bad_names_and_linked_directories() {
    let o = opts(vec![]);
    let mut t = Tree::new(meta(0o755));
    let d = t.insert(Tree::ROOT, b"d", dir());
    t.insert(d, &[b'n'; 256], fifo());
    let msg = unrepresentable(&t, &o);
    assert!(msg.starts_with("/d: entry \"nnn"), "{msg}");
    assert!(msg.ends_with("name longer than 255 bytes"), "{msg}");

    for bad in [&b"a/b"[..], b"a\0b", b".", b"..", b""] {
        let mut t = Tree::new(meta(0o755));
        t.insert(Tree::ROOT, bad, fifo());
        let msg = unrepresentable(&t, &o);
        assert!(msg.starts_with("/: entry"), "{msg}");
    }

    let mut t = Tree::new(meta(0o755));
    let d = t.insert(Tree::ROOT, b"d", dir());
    let e = t.insert(d, b"e", dir());
    t.link(Tree::ROOT, b"again", e);
    let msg = unrepresentable(&t, &o);
    assert!(msg.contains("directory has 2 names"), "{msg}");

    // A cycle: the root linked under itself.
    let mut t = Tree::new(meta(0o755));
    t.link(Tree::ROOT, b"loop", Tree::ROOT);
    assert!(unrepresentable(&t, &o).contains("directory has 2 names"));
}

#[test]
fn refuses_bad_options() {
    let t = Tree::new(meta(0o755));
    for bits in [11u8, 44] {
        let o = ImageOptions {
            chunk_bits: bits,
            ..opts(vec![])
        };
        assert!(unrepresentable(&t, &o).contains(&format!("chunk_bits {bits} outside")));
    }
    for tag in [String::new(), "x".repeat(65), "a\0b".into()] {
        let o = opts(vec![Device { tag, blocks: 1 }]);
        assert!(unrepresentable(&t, &o).contains("want 1..=64 bytes without NUL"));
    }
}

#[test]
fn hard_links_share_one_inode_with_nlink() {
    let mut t = Tree::new(meta(0o755));
    let d = t.insert(Tree::ROOT, b"d", dir());
    let f = t.insert(
        d,
        b"f",
        Node {
            meta: meta(0o644),
            kind: Kind::File(FileData::default()),
        },
    );
    t.link(Tree::ROOT, b"g", f);
    t.link(d, b"h", f);
    let img = write(&t, &opts(vec![])).unwrap();
    assert_eq!(le64(&img, 1024 + 16), 3, "inos: root, d, f");
    let r = root(&img);
    let g = lookup(&img, &r, b"g");
    let dd = lookup(&img, &r, b"d");
    assert_eq!(g.pos, lookup(&img, &dd, b"f").pos);
    assert_eq!(g.pos, lookup(&img, &dd, b"h").pos);
    assert_eq!(g.nlink, 3);
}

#[test]
fn many_links_need_an_extended_inode() {
    let mut t = Tree::new(meta(0o755));
    let f = t.insert(Tree::ROOT, b"f", fifo());
    for i in 1..70_000u32 {
        t.link(Tree::ROOT, format!("l{i}").as_bytes(), f);
    }
    let img = write(&t, &opts(vec![])).unwrap();
    let i = lookup(&img, &root(&img), b"l69999");
    assert!(i.extended);
    assert_eq!(i.nlink, 70_000);
}

#[test]
fn root_nid_must_fit_16_bits() {
    let t = Tree::new(meta(0o755));
    // Root nid = (1152 + 128 * devices) / 32 = 36 + 4 * devices.
    let fits = opts(vec![dev(1); 16_374]);
    let img = write(&t, &fits).unwrap();
    assert_eq!(le16(&img, 1024 + 14), 65_532);
    let msg = unrepresentable(&t, &opts(vec![dev(1); 16_375]));
    assert!(msg.contains("beyond the 16-bit root_nid"), "{msg}");
}

#[test]
fn one_block_directories_fall_back_to_a_block_when_they_do_not_fit_inline() {
    let mut t = Tree::new(meta(0o755));
    let mut m = meta(0o755);
    m.xattrs.insert(b"trusted.pad".to_vec(), vec![b'p'; 100]);
    let d = t.insert(
        Tree::ROOT,
        b"d",
        Node {
            meta: m,
            kind: Kind::Dir(BTreeMap::new()),
        },
    );
    for i in 0..15u8 {
        t.insert(d, &[b'a' + i; 255], fifo());
    }
    let img = write(&t, &opts(vec![])).unwrap();
    let di = lookup(&img, &root(&img), b"d");
    // 15 * (12 + 255) + 12 + 1 + 12 + 2 = 4032 bytes: one block, but not beside
    // 32 + 12 + 108 bytes of inode and xattrs.
    assert_eq!(di.size, 4032);
    assert_eq!(di.layout, format::DATALAYOUT_FLAT_PLAIN);
    assert_eq!(dirents(&img, &di).len(), 17);
}
