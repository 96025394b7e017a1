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
    /// The bytes of every piece sent, by address (4 KiB chunks).
    pieces: Vec<Vec<u8>>,
}

fn parse_file(path: &Path) -> Result<Out, ConvertError> {
    let (mut sender, receiver) = pieces::pipeline(4096);
    std::thread::scope(|s| {
        let drain = s.spawn(move || receiver.drain());
        let r = parse_layer(path, &mut sender);
        sender.flush().unwrap();
        drop(sender);
        let pieces = drain.join().unwrap();
        let addrs: Vec<u32> = (0..pieces.len() as u32).collect();
        r.map(|(mut p, compression)| {
            pieces::resolve_addrs(&mut p.tree, &addrs);
            Out {
                tree: p.tree,
                digest: p.digest,
                diff_id: p.diff_id,
                compression,
                files: p.files,
                pieces,
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
    // Sparse entries first, one per format, with an extension block for the old GNU one.
    let mut tar = Vec::new();
    let regions: Vec<(u64, u64)> = (0..6).map(|i| (i * 700 + 3, 200)).collect();
    let (_, data) = gnu_sparse::content(5000, &regions);
    for (i, (_, write)) in gnu_sparse::FORMATS.iter().enumerate() {
        write(&mut tar, &format!("sparse{i}"), 5000, &regions, &data);
    }
    let mut w = TarWriter::new();
    w.dir("d", 0o755);
    w.file("d/f", &[3u8; 5000]);
    w.pax(&[("path", b"d/pax"), ("SCHILY.xattr.user.x", b"1\n2")]);
    w.file("ignored", b"pax data");
    w.file(&"l".repeat(150), b"long");
    w.link(T::Link, "d/h", "d/f");
    w.link(T::Symlink, "s", "d");
    tar.extend_from_slice(&w.finish());
    tar
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Corrupt archives and compressed streams give errors, never panics.
    #[test]
    fn mutated_archives_never_panic(
        flips in proptest::collection::vec((0usize..16384, proptest::prelude::any::<u8>()), 1..6),
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

/// Sparse entries laid out as GNU tar writes them (GNU tar manual, "Sparse Formats"),
/// byte by byte, for the formats the `tar` crate cannot write.
pub(crate) mod gnu_sparse {
    /// A sparse map: (offset, length) of each data region.
    pub(crate) type Regions = [(u64, u64)];

    /// A 12-byte number field: octal when it fits, else GNU base-256.
    pub(crate) fn num12(v: u64) -> [u8; 12] {
        let mut f = [0u8; 12];
        if v < 1 << 33 {
            f[..11].copy_from_slice(format!("{v:011o}").as_bytes());
        } else {
            f[0] = 0x80;
            f[4..].copy_from_slice(&v.to_be_bytes());
        }
        f
    }

    /// A header block; `gnu` picks the old GNU magic (else POSIX ustar).
    pub(crate) fn header(name: &[u8], typeflag: u8, size: u64, gnu: bool) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..name.len()].copy_from_slice(name);
        b[100..108].copy_from_slice(b"0000644\0");
        b[108..116].copy_from_slice(b"0000000\0");
        b[116..124].copy_from_slice(b"0000000\0");
        b[124..136].copy_from_slice(&num12(size));
        b[136..148].copy_from_slice(b"13200000000\0");
        b[156] = typeflag;
        b[257..265].copy_from_slice(if gnu { b"ustar  \0" } else { b"ustar\x0000" });
        b
    }

    /// Sets the checksum of a header block.
    pub(crate) fn seal(b: &mut [u8; 512]) {
        b[148..156].fill(b' ');
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    /// Appends bytes padded to a block.
    pub(crate) fn padded(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(bytes);
        out.resize(out.len().next_multiple_of(512), 0);
    }

    /// A PAX `x` entry holding `records` in order.
    pub(crate) fn pax(out: &mut Vec<u8>, records: &[(&str, String)]) {
        let mut body = Vec::new();
        for (k, v) in records {
            let kv = format!(" {k}={v}\n");
            let mut len = kv.len() + 1;
            while len.to_string().len() + kv.len() != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len}{kv}").as_bytes());
        }
        let mut h = header(b"PaxHeaders/x", b'x', body.len() as u64, false);
        seal(&mut h);
        out.extend_from_slice(&h);
        padded(out, &body);
    }

    /// The file a map describes (regions filled with a pattern, zeros elsewhere) and
    /// the entry data (the regions back to back).
    pub(crate) fn content(real_size: u64, regions: &Regions) -> (Vec<u8>, Vec<u8>) {
        let mut file = vec![0u8; real_size as usize];
        let mut data = Vec::new();
        for &(offset, len) in regions {
            for i in offset..offset + len {
                let b = (i % 251) as u8 + 1;
                file[i as usize] = b;
                data.push(b);
            }
        }
        (file, data)
    }

    /// An old GNU `S` entry: four slots in the header, 21 in each extension block.
    pub(crate) fn old_gnu(
        out: &mut Vec<u8>,
        name: &str,
        real_size: u64,
        regions: &Regions,
        data: &[u8],
    ) {
        let mut h = header(name.as_bytes(), b'S', data.len() as u64, true);
        let slot = |b: &mut [u8], at: usize, (offset, len): (u64, u64)| {
            b[at..at + 12].copy_from_slice(&num12(offset));
            b[at + 12..at + 24].copy_from_slice(&num12(len));
        };
        for (i, &r) in regions.iter().take(4).enumerate() {
            slot(&mut h, 386 + 24 * i, r);
        }
        h[482] = u8::from(regions.len() > 4);
        h[483..495].copy_from_slice(&num12(real_size));
        seal(&mut h);
        out.extend_from_slice(&h);
        let mut rest = &regions[regions.len().min(4)..];
        while !rest.is_empty() {
            let n = rest.len().min(21);
            let mut e = [0u8; 512];
            for (i, &r) in rest[..n].iter().enumerate() {
                slot(&mut e, 24 * i, r);
            }
            rest = &rest[n..];
            e[504] = u8::from(!rest.is_empty());
            out.extend_from_slice(&e);
        }
        padded(out, data);
    }

    /// The file entry after a PAX sparse header (its header names a made-up path, as
    /// GNU tar's do for 0.1 and 1.0).
    fn posix_file(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        let mut h = header(name.as_bytes(), b'0', data.len() as u64, false);
        seal(&mut h);
        out.extend_from_slice(&h);
        padded(out, data);
    }

    /// A PAX 0.0 entry: repeated offset and length records.
    pub(crate) fn pax_0_0(
        out: &mut Vec<u8>,
        name: &str,
        real_size: u64,
        regions: &Regions,
        data: &[u8],
    ) {
        let mut records = vec![
            ("GNU.sparse.size", real_size.to_string()),
            ("GNU.sparse.numblocks", regions.len().to_string()),
        ];
        for &(offset, len) in regions {
            records.push(("GNU.sparse.offset", offset.to_string()));
            records.push(("GNU.sparse.numbytes", len.to_string()));
        }
        pax(out, &records);
        posix_file(out, name, data);
    }

    /// A PAX 0.1 entry: one `GNU.sparse.map` list.
    pub(crate) fn pax_0_1(
        out: &mut Vec<u8>,
        name: &str,
        real_size: u64,
        regions: &Regions,
        data: &[u8],
    ) {
        let map: Vec<String> = regions
            .iter()
            .flat_map(|&(o, l)| [o.to_string(), l.to_string()])
            .collect();
        pax(
            out,
            &[
                ("GNU.sparse.size", real_size.to_string()),
                ("GNU.sparse.numblocks", regions.len().to_string()),
                ("GNU.sparse.name", name.to_string()),
                ("GNU.sparse.map", map.join(",")),
            ],
        );
        posix_file(out, &format!("GNUSparseFile.1/{name}"), data);
    }

    /// The text of a 1.0 map, padded to a block.
    pub(crate) fn map_1_0(regions: &Regions) -> Vec<u8> {
        let mut text = format!("{}\n", regions.len());
        for &(o, l) in regions {
            text.push_str(&format!("{o}\n{l}\n"));
        }
        let mut text = text.into_bytes();
        text.resize(text.len().next_multiple_of(512), 0);
        text
    }

    /// A PAX 1.0 entry: the map opens the data.
    pub(crate) fn pax_1_0(
        out: &mut Vec<u8>,
        name: &str,
        real_size: u64,
        regions: &Regions,
        data: &[u8],
    ) {
        pax(
            out,
            &[
                ("GNU.sparse.major", "1".into()),
                ("GNU.sparse.minor", "0".into()),
                ("GNU.sparse.name", name.to_string()),
                ("GNU.sparse.realsize", real_size.to_string()),
                ("path", format!("GNUSparseFile.1/{name}")),
            ],
        );
        let body = [map_1_0(regions), data.to_vec()].concat();
        posix_file(out, &format!("GNUSparseFile.1/{name}"), &body);
    }

    /// One writer per format GNU tar writes.
    pub(crate) type Writer = fn(&mut Vec<u8>, &str, u64, &Regions, &[u8]);

    /// The four formats, named.
    pub(crate) const FORMATS: [(&str, Writer); 4] = [
        ("old GNU", old_gnu),
        ("PAX 0.0", pax_0_0),
        ("PAX 0.1", pax_0_1),
        ("PAX 1.0", pax_1_0),
    ];
}

/// A regular file's bytes as the tree and the pieces sent give them.
fn content_of(out: &Out, path: &str) -> Vec<u8> {
    let Kind::File(f) = &out.tree.node(lookup(&out.tree, path).unwrap()).kind else {
        panic!("{path} is not a file");
    };
    let mut bytes = Vec::new();
    for (i, c) in f.chunks.iter().enumerate() {
        let ChunkAddr::Blob { blkaddr, .. } = c else {
            panic!("{path}: chunk {i} is an EROFS hole");
        };
        let want = (f.size - i as u64 * 4096).min(4096) as usize;
        bytes.extend_from_slice(&out.pieces[*blkaddr as usize][..want]);
    }
    assert_eq!(bytes.len() as u64, f.size);
    bytes
}

/// A sparse file to write: name, real size, data regions.
type SparseSample = (&'static str, u64, Vec<(u64, u64)>);

/// The sparse files of [`every_gnu_sparse_format_reads_back_the_same_files`].
fn sparse_samples() -> Vec<SparseSample> {
    vec![
        // Holes at the start, in the middle (whole chunks and parts of chunks) and at the
        // end (the last, partial chunk too), and a region across a chunk boundary.
        (
            "holes",
            5 * 4096 + 100,
            vec![(5000, 3000), (12288, 4096), (20580, 0)],
        ),
        // Data at both ends only.
        ("ends", 3 * 4096 + 1, vec![(0, 10), (3 * 4096 - 5, 6)]),
        // All hole, the way GNU tar stores it: one empty region at the real size.
        ("all-hole", 1 << 20, vec![(1 << 20, 0)]),
        ("empty", 0, vec![(0, 0)]),
        // More regions than the old GNU header and its first extension block hold,
        // several in one chunk.
        (
            "many",
            40 * 1000,
            (0..30).map(|i| (i * 1000 + 7, 300)).collect(),
        ),
    ]
}

#[test]
fn every_gnu_sparse_format_reads_back_the_same_files() {
    for (format, write) in gnu_sparse::FORMATS {
        let mut tar = Vec::new();
        let mut want = Vec::new();
        for (name, real_size, regions) in sparse_samples() {
            let (file, data) = gnu_sparse::content(real_size, &regions);
            write(&mut tar, name, real_size, &regions, &data);
            want.push((name, file));
        }
        // A plain file after them: the stream is in step after the sparse entries.
        let mut w = TarWriter::new();
        w.file("after", b"plain");
        tar.extend_from_slice(&w.finish());
        let out = parse(&tar).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(out.files, want.len() as u64 + 1, "{format}");
        for (name, file) in &want {
            assert!(content_of(&out, name) == *file, "{format}: {name} differs");
        }
        assert_eq!(content_of(&out, "after"), b"plain");
        // Every chunk that is all hole points to one all-zero piece, sent once; the
        // others were read: 2 chunks of "holes", 3 of "ends", 8 of "many", "after".
        let zero_addr = match &out.tree.node(lookup(&out.tree, "all-hole").unwrap()).kind {
            Kind::File(f) => {
                assert_eq!(f.chunks.len(), 256);
                assert!(f.chunks.iter().all(|c| *c == f.chunks[0]));
                f.chunks[0]
            }
            k => panic!("{k:?}"),
        };
        let ChunkAddr::Blob { blkaddr, .. } = zero_addr else {
            panic!("{zero_addr:?}")
        };
        assert_eq!(out.pieces[blkaddr as usize], vec![0u8; 4096]);
        assert_eq!(out.pieces.len(), 1 + 2 + 3 + 8 + 1, "{format}");
        match &out.tree.node(lookup(&out.tree, "holes").unwrap()).kind {
            Kind::File(f) => {
                let holes: Vec<bool> = f.chunks.iter().map(|c| *c == zero_addr).collect();
                assert_eq!(holes, [true, false, true, false, true, true], "{format}");
            }
            k => panic!("{k:?}"),
        }
    }
}

#[test]
fn a_huge_sparse_file_costs_its_chunk_index_only() {
    // 64 GiB of hole and a few bytes at its end: no byte of the hole is read or sent.
    let real_size = 64u64 << 30;
    let regions = [(real_size - 3, 3)];
    let mut tar = Vec::new();
    gnu_sparse::old_gnu(&mut tar, "huge", real_size, &regions, b"end");
    tar.extend_from_slice(&[0u8; 1024]);
    let out = parse(&tar).unwrap();
    assert_eq!(out.pieces.len(), 2, "the zero chunk and the last chunk");
    match &out.tree.node(lookup(&out.tree, "huge").unwrap()).kind {
        Kind::File(f) => {
            assert_eq!(f.size, real_size);
            assert_eq!(f.chunks.len() as u64, real_size / 4096);
        }
        k => panic!("{k:?}"),
    }
    // That is 2^24 - 1 chunks of hole, within the limit of a layer; 2^24 + 1 are not.
    assert_eq!(real_size / 4096, pieces::MAX_HOLE_CHUNKS);
    let mut tar = Vec::new();
    let real_size = real_size + 2 * 4096;
    gnu_sparse::old_gnu(&mut tar, "huger", real_size, &[(real_size - 3, 3)], b"end");
    tar.extend_from_slice(&[0u8; 1024]);
    assert_refused(&tar, "\"huger\"", "more than 16777216 chunks of holes");
}

#[test]
fn bad_sparse_entries_are_refused_with_the_entry_named() {
    let mut tar = Vec::new();
    gnu_sparse::old_gnu(&mut tar, "overlap", 100, &[(0, 10), (5, 10)], &[1; 20]);
    assert_refused(&tar, "sparse file \"overlap\"", "must not overlap");

    let mut tar = Vec::new();
    gnu_sparse::pax_1_0(&mut tar, "real/name", 10, &[(5, 10)], &[1; 10]);
    assert_refused(&tar, "sparse file \"real/name\"", "past the real size 10");

    // The layer holds the one bad entry, after a good one.
    let mut tar = Vec::new();
    let (_, data) = gnu_sparse::content(9000, &[(100, 5)]);
    gnu_sparse::pax_0_1(&mut tar, "good", 9000, &[(100, 5)], &data);
    gnu_sparse::pax_0_0(&mut tar, "short", 100, &[(0, 10)], &[1; 9]);
    assert_refused(&tar, "after \"good\"", "regions add up to 10");
}

/// A reader that gives `data` and then fails, as a registry stream cut off midway.
struct Failing {
    data: std::io::Cursor<Vec<u8>>,
}

impl std::io::Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match std::io::Read::read(&mut self.data, buf)? {
            0 => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the stream broke",
            )),
            n => Ok(n),
        }
    }
}

/// What a failed conversion must leave: the store exactly as before.
fn store_state(store: &crate::store::Store) -> (crate::store::StoreStats, Vec<(String, u64)>) {
    let mut packs: Vec<(String, u64)> = std::fs::read_dir(store.root().join("chunks"))
        .unwrap()
        .flatten()
        .map(|e| {
            let len = e.metadata().unwrap().len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    packs.sort();
    (store.stats().unwrap(), packs)
}

#[test]
fn streamed_layers_are_checked_against_both_digests_before_the_commit() {
    use super::{convert_reader, Expected};
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut w = TarWriter::new();
    w.dir("etc", 0o755);
    w.file("etc/a", &vec![7u8; 70_000]);
    w.file("etc/b", b"hello");
    let tar = w.finish();
    let gz = gzip(&tar);
    let key = format!("sha256:{}", "c".repeat(64));
    let good = Expected {
        key: &key,
        digest: &sha(&gz),
        diff_id: &sha(&tar),
    };
    // A first layer, so that "unchanged" is checked against a store that has content.
    let mut w = TarWriter::new();
    w.file("x", &vec![1u8; 5000]);
    let other = w.finish();
    let other_key = format!("sha256:{}", "d".repeat(64));
    let (od, oi) = (sha(&other), sha(&other));
    convert_reader(
        &store,
        "other",
        Box::new(std::io::Cursor::new(other.clone())),
        4096,
        Expected {
            key: &other_key,
            digest: &od,
            diff_id: &oi,
        },
    )
    .unwrap();
    let before = store_state(&store);
    let refused = |input: Box<dyn std::io::Read + Send>, expected: Expected<'_>| {
        let e = convert_reader(&store, "img@layer", input, 4096, expected).unwrap_err();
        assert_eq!(store_state(&store), before, "{e}: the store changed");
        assert!(store.layer(&key).unwrap().is_none());
        e.to_string()
    };
    let wrong = format!("sha256:{}", "e".repeat(64));
    // The blob's digest (other bytes under the digest).
    let e = refused(
        Box::new(std::io::Cursor::new(gz.clone())),
        Expected {
            digest: &wrong,
            ..good
        },
    );
    assert!(
        e.contains("the blob's digest is") && e.contains(&wrong) && e.contains(good.digest),
        "{e}"
    );
    // The config's diff_id.
    let e = refused(
        Box::new(std::io::Cursor::new(gz.clone())),
        Expected {
            diff_id: &wrong,
            ..good
        },
    );
    assert!(
        e.contains("the tar's diff_id is") && e.contains(&wrong) && e.contains(good.diff_id),
        "{e}"
    );
    // Cut off: cleanly (EOF) and with an error.
    let half = gz[..gz.len() / 2].to_vec();
    refused(Box::new(std::io::Cursor::new(half.clone())), good);
    let e = refused(
        Box::new(Failing {
            data: std::io::Cursor::new(half),
        }),
        good,
    );
    assert!(e.contains("the stream broke"), "{e}");
    // The right bytes: stored under the key, the blob's digest an alias.
    let r = convert_reader(
        &store,
        "img@layer",
        Box::new(std::io::Cursor::new(gz.clone())),
        4096,
        good,
    )
    .unwrap();
    assert_eq!(r.diff_id, key);
    assert_eq!(store.layer(good.digest).unwrap().unwrap().diff_id, key);
    assert_eq!((r.files, r.chunks), (3, 19));
}
