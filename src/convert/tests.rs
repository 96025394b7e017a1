//! Unit tests of the parser side: tar semantics and bad input, without the writer.

use std::io::Write;
use std::path::Path;

use super::pieces;
use super::tar::{parse_layer, Compression, OPAQUE_XATTR};
use super::ConvertError;
use crate::erofs::{ChunkAddr, Kind, NodeId, Tree};

/// Builds tars entry by entry, including entries the `tar` crate's checks would refuse.
pub(crate) struct TarWriter {
    b: ::tar::Builder<Vec<u8>>,
}

impl TarWriter {
    pub(crate) fn new() -> TarWriter {
        TarWriter {
            b: ::tar::Builder::new(Vec::new()),
        }
    }

    fn header(ty: ::tar::EntryType, size: u64) -> ::tar::Header {
        let mut h = ::tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// An entry whose name is written as is (at most 100 bytes).
    pub(crate) fn raw(&mut self, name: &[u8], ty: ::tar::EntryType, link: &[u8], data: &[u8]) {
        let mut h = Self::header(ty, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
    }

    pub(crate) fn file(&mut self, name: &str, data: &[u8]) {
        let mut h = Self::header(::tar::EntryType::Regular, data.len() as u64);
        self.b.append_data(&mut h, name, data).unwrap();
    }

    pub(crate) fn dir(&mut self, name: &str, mode: u32) {
        let mut h = Self::header(::tar::EntryType::Directory, 0);
        h.set_mode(mode);
        self.b.append_data(&mut h, name, &[][..]).unwrap();
    }

    pub(crate) fn link(&mut self, ty: ::tar::EntryType, name: &str, target: &str) {
        let mut h = Self::header(ty, 0);
        self.b.append_link(&mut h, name, target).unwrap();
    }

    pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

struct Out {
    tree: Tree,
    digest: String,
    diff_id: String,
    compression: Compression,
    files: u64,
}

fn parse_file(path: &Path) -> Result<Out, ConvertError> {
    let (mut sender, receiver) = pieces::pipeline(4096);
    std::thread::scope(|s| {
        let drain = s.spawn(move || receiver.drain());
        let r = parse_layer(path, &mut sender);
        sender.flush().unwrap();
        drop(sender);
        let addrs = drain.join().unwrap();
        r.map(|(mut p, compression)| {
            pieces::resolve_addrs(&mut p.tree, &addrs);
            Out {
                tree: p.tree,
                digest: p.digest,
                diff_id: p.diff_id,
                compression,
                files: p.files,
            }
        })
    })
}

fn parse(bytes: &[u8]) -> Result<Out, ConvertError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.bin");
    std::fs::write(&path, bytes).unwrap();
    parse_file(&path)
}

fn lookup(t: &Tree, path: &str) -> Option<NodeId> {
    let mut id = Tree::ROOT;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        id = t.child(id, c.as_bytes())?;
    }
    Some(id)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 1).unwrap()
}

fn sha(data: &[u8]) -> String {
    let mut h = crate::digest::OciHasher::new();
    h.update(data);
    h.finish()
}

#[test]
fn tar_semantics_build_the_expected_tree() {
    use ::tar::EntryType as T;
    let mut w = TarWriter::new();
    w.dir("./", 0o700);
    w.file("./a/b/file", b"hello");
    w.dir("a", 0o750);
    w.raw(b"/abs", T::Regular, b"", b"x");
    w.file("later", b"first");
    w.file("later", b"second wins");
    w.link(T::Link, "a/hard", "a/b/file");
    w.link(T::Symlink, "sym", "/etc/passwd");
    let long = "d/".to_string() + &"n".repeat(200);
    w.file(&long, b"gnu long name");
    w.pax(&[
        ("path", b"p/pax-name-that-is-long"),
        ("mtime", b"1700000000.25"),
        ("SCHILY.xattr.user.k", b"v\0binary"),
        ("uid", b"4000000000"),
    ]);
    w.file("short", b"pax file");
    w.raw(b".wh.gone", T::Regular, b"", b"");
    w.raw(b"a/.wh..wh..opq", T::Regular, b"", b"");
    w.raw(b"zero", T::Regular, b"", &[0u8; 9000]);
    let tar = w.finish();
    let out = parse(&tar).unwrap();
    let t = &out.tree;
    assert_eq!(out.compression, Compression::None);
    assert_eq!(out.digest, out.diff_id);
    assert_eq!(out.diff_id, sha(&tar));
    assert_eq!(out.files, 13);
    assert_eq!(t.node(Tree::ROOT).meta.perm, 0o700);
    let a = lookup(t, "a").unwrap();
    assert_eq!(
        t.node(a).meta.perm,
        0o750,
        "re-declared dir takes new metadata"
    );
    assert!(t.child(a, b"b").is_some(), "and keeps its children");
    assert_eq!(
        t.node(a).meta.xattrs.get(OPAQUE_XATTR).map(|v| &v[..]),
        Some(&b"y"[..])
    );
    assert_eq!(lookup(t, "a/hard"), lookup(t, "a/b/file"));
    assert!(lookup(t, "abs").is_some());
    match &t.node(lookup(t, "later").unwrap()).kind {
        Kind::File(f) => assert_eq!(f.size, 11),
        k => panic!("{k:?}"),
    }
    assert_eq!(
        t.node(lookup(t, "sym").unwrap()).kind,
        Kind::Symlink(b"/etc/passwd".to_vec())
    );
    assert!(lookup(t, &long).is_some());
    let p = t.node(lookup(t, "p/pax-name-that-is-long").unwrap());
    assert_eq!(
        (p.meta.mtime, p.meta.mtime_nsec),
        (1_700_000_000, 250_000_000)
    );
    assert_eq!(p.meta.uid, 4_000_000_000);
    assert_eq!(p.meta.xattrs.get(&b"user.k"[..]).unwrap(), b"v\0binary");
    assert_eq!(
        t.node(lookup(t, "gone").unwrap()).kind,
        Kind::CharDev { major: 0, minor: 0 }
    );
    match &t.node(lookup(t, "zero").unwrap()).kind {
        Kind::File(f) => {
            assert_eq!(f.chunks.len(), 3);
            assert!(
                !f.chunks.contains(&ChunkAddr::Hole),
                "no holes: {:?}",
                f.chunks
            );
        }
        k => panic!("{k:?}"),
    }
    // Implicit parents are 0755 root.
    assert_eq!(t.node(lookup(t, "d").unwrap()).meta.perm, 0o755);
}

#[test]
fn gzip_and_zstd_give_the_tar_diff_id() {
    let mut w = TarWriter::new();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    w.file("big", &big);
    let tar = w.finish();
    for (bytes, c) in [
        (gzip(&tar), Compression::Gzip),
        (zstd(&tar), Compression::Zstd),
    ] {
        let out = parse(&bytes).unwrap();
        assert_eq!(out.compression, c);
        assert_eq!(out.diff_id, sha(&tar));
        assert_eq!(out.digest, sha(&bytes));
        match &out.tree.node(lookup(&out.tree, "big").unwrap()).kind {
            Kind::File(f) => {
                assert_eq!(f.size, 300_000);
                assert_eq!(f.chunks.len(), 74);
            }
            k => panic!("{k:?}"),
        }
    }
}

fn assert_refused(bytes: &[u8], entry: &str, rule: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-layer.tar");
    std::fs::write(&path, bytes).unwrap();
    let e = parse_file(&path).err().expect("refused").to_string();
    assert!(e.contains("bad-layer.tar"), "{e}");
    assert!(e.contains(entry), "{e} should name {entry}");
    assert!(e.contains(rule), "{e} should say {rule}");
}

#[test]
fn bad_input_is_refused_with_the_entry_named() {
    use ::tar::EntryType as T;
    let mut w = TarWriter::new();
    w.raw(b"a/../../etc/x", T::Regular, b"", b"x");
    assert_refused(&w.finish(), "a/../../etc/x", "`..`");

    for target in [&b"/etc"[..], b"../.."] {
        let mut w = TarWriter::new();
        w.raw(b"link", T::Symlink, target, b"");
        w.raw(b"link/x", T::Regular, b"", b"x");
        assert_refused(&w.finish(), "link/x", "symlink");
    }

    let mut w = TarWriter::new();
    w.raw(b"h", T::Link, b"missing", b"");
    assert_refused(&w.finish(), "\"h\"", "hard link target");

    let mut w = TarWriter::new();
    w.file(&"n".repeat(256), b"x");
    assert_refused(&w.finish(), "nnnn", "255");

    let mut w = TarWriter::new();
    w.file("first", b"1");
    w.file("big", &[7u8; 20000]);
    let tar = w.finish();
    assert_refused(&tar[..512 + 512 + 512 + 8000], "big", "truncated");
    // Cut at a header boundary: no end-of-archive marker.
    assert_refused(
        &tar[..512 + 512 + 512 + 20480],
        "after \"big\"",
        "truncated",
    );

    let mut bad_sum = tar.clone();
    bad_sum[1024 + 10] ^= 1;
    assert_refused(&bad_sum, "after \"first\"", "checksum");

    let gz = gzip(&tar);
    assert_refused(&gz[..gz.len() / 2], "#", "gzip");
    let mut corrupt = gz.clone();
    for b in &mut corrupt[20..60] {
        *b ^= 0x5a;
    }
    assert_refused(&corrupt, "#", "gzip");
    let zs = zstd(&tar);
    assert_refused(&zs[..zs.len() / 2], "#", "zstd");
    assert_refused(
        &[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0],
        "#1",
        "xz-compressed",
    );
    assert_refused(b"BZh91AY&SY", "#1", "bzip2-compressed");
    // Binary PAX values with newlines inside are fine; a PAX length that lies is not.
    let mut w = TarWriter::new();
    w.pax(&[("SCHILY.xattr.security.capability", b"\x01\n\x0a7 path=x\n")]);
    w.file("cap", b"x");
    assert_eq!(parse(&w.finish()).unwrap().files, 1);
    let mut w = TarWriter::new();
    w.raw(
        b"././@PaxHeader",
        ::tar::EntryType::XHeader,
        b"",
        b"99 path=x\n",
    );
    w.file("after-bad-pax", b"x");
    assert_refused(&w.finish(), "#1", "malformed PAX record");
}

fn sample_tar() -> Vec<u8> {
    use ::tar::EntryType as T;
    let mut w = TarWriter::new();
    w.dir("d", 0o755);
    w.file("d/f", &[3u8; 5000]);
    w.pax(&[("path", b"d/pax"), ("SCHILY.xattr.user.x", b"1\n2")]);
    w.file("ignored", b"pax data");
    w.file(&"l".repeat(150), b"long");
    w.link(T::Link, "d/h", "d/f");
    w.link(T::Symlink, "s", "d");
    w.finish()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Corrupt archives and compressed streams give errors, never panics.
    #[test]
    fn mutated_archives_never_panic(
        flips in proptest::collection::vec((0usize..8192, proptest::prelude::any::<u8>()), 1..6),
        cut in proptest::prelude::any::<Option<u16>>(),
        compress in 0u8..3,
        post_flip in proptest::prelude::any::<Option<(usize, u8)>>(),
    ) {
        let mut tar = sample_tar();
        for (at, v) in flips {
            let i = at % tar.len();
            tar[i] = v;
        }
        if let Some(c) = cut {
            tar.truncate(c as usize % (tar.len() + 1));
        }
        let mut bytes = match compress {
            0 => tar,
            1 => gzip(&tar),
            _ => zstd(&tar),
        };
        if let Some((at, v)) = post_flip.filter(|_| !bytes.is_empty()) {
            let i = at % bytes.len();
            bytes[i] ^= v;
        }
        let _ = parse(&bytes);
    }
}
