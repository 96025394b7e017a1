//! OCI layer tar streams (plain, gzip, zstd) into a [`Tree`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use super::pieces::{PieceError, PieceSender, MAX_HOLE_CHUNKS};
use super::tarfmt::{EntryKind, Header, TarError, TarReader};
use super::{check_xattr, ConvertError, Parsed, MAX_NAME_BYTES};
use crate::digest::HashingReader;
use crate::erofs::{Kind, Meta, Node, NodeId, Tree};

/// Read buffer for the layer file.
const INPUT_BUFFER_BYTES: usize = 256 * 1024;
/// Overlay whiteout prefix (OCI image spec, "Whiteouts").
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The xattr overlayfs reads to make a directory opaque.
pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// How a layer file is compressed, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Compression {
    /// Detects the compression from the first bytes of a file.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Marks errors of the decompressor so that they are reported as a bad stream.
#[derive(Debug)]
struct DecodeError {
    format: &'static str,
    cause: io::Error,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad {} stream: {}", self.format, self.cause)
    }
}

impl std::error::Error for DecodeError {}

/// The layer's bytes as given: a file, or a registry stream.
type Input = HashingReader<BufReader<Box<dyn Read + Send>>>;

/// The decompressor, kept concrete so that the input (and its digest) can be taken back.
enum Decoder {
    Plain(Input),
    Gzip(Box<flate2::read::MultiGzDecoder<Input>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, BufReader<Input>>>),
}

impl Decoder {
    fn into_input(self) -> Input {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl Read for Decoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (format, r) = match self {
            Decoder::Plain(r) => return r.read(buf),
            Decoder::Gzip(d) => ("gzip", d.read(buf)),
            Decoder::Zstd(d) => ("zstd", d.read(buf)),
        };
        r.map_err(|cause| {
            io::Error::new(
                cause.kind(),
                DecodeError {
                    format,
                    cause: io::Error::new(cause.kind(), cause.to_string()),
                },
            )
        })
    }
}

/// The uncompressed tar stream, hashed for the diff_id unless it is the file itself.
enum TarStream {
    Plain(Decoder),
    Hashed(HashingReader<Decoder>),
}

impl Read for TarStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TarStream::Plain(d) => d.read(buf),
            TarStream::Hashed(h) => h.read(buf),
        }
    }
}

/// Which entry an error is about.
struct Position {
    index: u64,
    last_path: Option<String>,
}

impl Position {
    fn next_entry(&self) -> String {
        match &self.last_path {
            Some(p) => format!("#{} (the header after {p:?})", self.index + 1),
            None => format!("#{} (the first header)", self.index + 1),
        }
    }
}

/// Turns an I/O error while reading the archive into the error to report.
fn stream_error(layer: &Path, entry: String, e: io::Error) -> ConvertError {
    let rule = if let Some(d) = e.get_ref().and_then(|r| r.downcast_ref::<DecodeError>()) {
        d.to_string()
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        format!("truncated archive: {e}")
    } else {
        format!("corrupt archive: {e}")
    };
    ConvertError::Entry {
        layer: layer.to_path_buf(),
        entry,
        rule,
    }
}

fn tar_error(layer: &Path, entry: String, e: TarError) -> ConvertError {
    match e {
        TarError::Io(e) => stream_error(layer, entry, e),
        TarError::Truncated(why) => ConvertError::Entry {
            layer: layer.to_path_buf(),
            entry,
            rule: format!("truncated archive: {why}"),
        },
        TarError::Corrupt(why) => ConvertError::Entry {
            layer: layer.to_path_buf(),
            entry,
            rule: format!("corrupt archive: {why}"),
        },
    }
}

/// Converts one layer file into a tree, sending file data down `pieces`.
pub(crate) fn parse_layer(
    layer: &Path,
    pieces: &mut PieceSender,
) -> Result<(Parsed, Compression), ConvertError> {
    let file = File::open(layer).map_err(|source| ConvertError::Io {
        path: layer.to_path_buf(),
        source,
    })?;
    parse_reader(layer, Box::new(file), pieces)
}

/// Converts the layer read from `input` (named `layer` in errors) into a tree, sending
/// file data down `pieces`. Reads `input` to its end: its digest covers every byte.
pub(crate) fn parse_reader(
    layer: &Path,
    input: Box<dyn Read + Send>,
    pieces: &mut PieceSender,
) -> Result<(Parsed, Compression), ConvertError> {
    let mut buffered = BufReader::with_capacity(INPUT_BUFFER_BYTES, input);
    let head = buffered.fill_buf().map_err(|source| ConvertError::Io {
        path: layer.to_path_buf(),
        source,
    })?;
    let compression = Compression::detect(head);
    let unsupported = [
        (&b"BZh"[..], "bzip2"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0][..], "xz"),
    ];
    if let Some((_, name)) = unsupported.iter().find(|(m, _)| head.starts_with(m)) {
        return Err(ConvertError::Entry {
            layer: layer.to_path_buf(),
            entry: "#1 (the first header)".into(),
            rule: format!(
                "the layer is {name}-compressed; OCI layers are tar, tar+gzip or tar+zstd"
            ),
        });
    }
    let input = HashingReader::new(buffered);
    let decoder = match compression {
        Compression::None => Decoder::Plain(input),
        Compression::Gzip => Decoder::Gzip(Box::new(flate2::read::MultiGzDecoder::new(input))),
        Compression::Zstd => Decoder::Zstd(Box::new(
            zstd::stream::read::Decoder::new(input).map_err(|e| ConvertError::Entry {
                layer: layer.to_path_buf(),
                entry: "#1 (the first header)".into(),
                rule: format!("bad zstd stream: {e}"),
            })?,
        )),
    };
    // For a plain tar the file is the tar: one hash gives both digests.
    let tar_stream = match decoder {
        Decoder::Plain(_) => TarStream::Plain(decoder),
        _ => TarStream::Hashed(HashingReader::new(decoder)),
    };
    let mut tar = TarReader::new(tar_stream);
    let mut builder = TreeBuilder::new(layer);
    let mut pos = Position {
        index: 0,
        last_path: None,
    };
    loop {
        let header = match tar.next() {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Err(tar_error(layer, pos.next_entry(), e)),
        };
        let shown = String::from_utf8_lossy(&header.path).into_owned();
        builder.entry(&header, &shown, &mut tar, pieces)?;
        pos.index += 1;
        pos.last_path = Some(shown);
    }
    let mut tar_reader = tar.into_inner();
    // Hash what follows the marker (padding) so that diff_id covers the whole tar.
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        match tar_reader.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(stream_error(layer, pos.next_entry(), e)),
        }
    }
    let (diff_id, decoder) = match tar_reader {
        TarStream::Plain(d) => (None, d),
        TarStream::Hashed(h) => {
            let (diff_id, d) = h.finish();
            (Some(diff_id), d)
        }
    };
    let mut input = decoder.into_input();
    // Anything after the compressed stream still belongs to the file as given.
    io::copy(&mut input, &mut io::sink()).map_err(|source| ConvertError::Io {
        path: layer.to_path_buf(),
        source,
    })?;
    let (digest, _) = input.finish();
    let diff_id = diff_id.unwrap_or_else(|| digest.clone());
    let files = builder.files;
    Ok((
        Parsed {
            tree: builder.tree,
            digest,
            diff_id,
            files,
        },
        compression,
    ))
}

/// Splits a tar path into its components: `./` and empty components dropped, a leading
/// `/` ignored (OCI paths are relative to the layer root), `..` refused.
pub(crate) fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("a `..` component would escape the layer root".into()),
            c if c.contains(&0) => return Err("a name component holds a NUL byte".into()),
            c if c.len() > MAX_NAME_BYTES => {
                return Err(format!(
                    "a name component is {} bytes, over the limit of {MAX_NAME_BYTES}",
                    c.len()
                ))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Builds the tree entry by entry with tar extraction semantics.
struct TreeBuilder<'a> {
    layer: &'a Path,
    tree: Tree,
    files: u64,
}

impl<'a> TreeBuilder<'a> {
    fn new(layer: &'a Path) -> TreeBuilder<'a> {
        TreeBuilder {
            layer,
            tree: Tree::new(Meta::with_perm(0o755)),
            files: 0,
        }
    }

    fn err(&self, entry: &str, rule: impl Into<String>) -> ConvertError {
        ConvertError::Entry {
            layer: self.layer.to_path_buf(),
            entry: format!("{entry:?}"),
            rule: rule.into(),
        }
    }

    /// Walks to the directory holding `components`' last element, creating missing
    /// directories (0755 root:root) and refusing to go through anything else.
    fn parent(&mut self, components: &[&[u8]], shown: &str) -> Result<NodeId, ConvertError> {
        let mut dir = Tree::ROOT;
        for (i, &c) in components.iter().enumerate() {
            dir = match self.tree.child(dir, c) {
                Some(id) => match &self.tree.node(id).kind {
                    Kind::Dir(_) => id,
                    Kind::Symlink(_) => {
                        let via = components[..=i]
                            .iter()
                            .map(|c| String::from_utf8_lossy(c))
                            .collect::<Vec<_>>()
                            .join("/");
                        return Err(self.err(
                            shown,
                            format!(
                                "the path goes through the symlink {via:?} this layer created, \
                                 which could lead outside the layer root"
                            ),
                        ));
                    }
                    _ => return Err(self.err(shown, "a parent of this path is not a directory")),
                },
                None => self.tree.insert(
                    dir,
                    c,
                    Node {
                        meta: Meta::with_perm(0o755),
                        kind: Kind::Dir(BTreeMap::new()),
                    },
                ),
            };
        }
        Ok(dir)
    }

    fn meta(&self, h: &Header, shown: &str) -> Result<Meta, ConvertError> {
        let uid = u32::try_from(h.uid)
            .map_err(|_| self.err(shown, format!("uid {} over 2^32", h.uid)))?;
        let gid = u32::try_from(h.gid)
            .map_err(|_| self.err(shown, format!("gid {} over 2^32", h.gid)))?;
        for (name, value) in &h.xattrs {
            check_xattr(name, value).map_err(|rule| self.err(shown, rule))?;
        }
        Ok(Meta {
            perm: (h.mode & 0o7777) as u16,
            uid,
            gid,
            mtime: h.mtime,
            mtime_nsec: h.mtime_nsec,
            xattrs: h.xattrs.clone(),
        })
    }

    fn entry<R: Read>(
        &mut self,
        h: &Header,
        shown: &str,
        data: &mut R,
        pieces: &mut PieceSender,
    ) -> Result<(), ConvertError> {
        self.files += 1;
        let components = split_path(&h.path).map_err(|rule| self.err(shown, rule))?;
        let meta = self.meta(h, shown)?;
        let Some((&name, parents)) = components.split_last() else {
            // The root itself: only its metadata can change.
            if h.kind != EntryKind::Dir {
                return Err(self.err(shown, "the layer root can only be a directory"));
            }
            self.tree.node_mut(Tree::ROOT).meta = meta;
            return Ok(());
        };
        let dir = self.parent(parents, shown)?;
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if name == OPAQUE_MARKER {
                self.tree
                    .node_mut(dir)
                    .meta
                    .xattrs
                    .insert(OPAQUE_XATTR.to_vec(), b"y".to_vec());
                return Ok(());
            }
            if hidden.starts_with(WHITEOUT_PREFIX) {
                // Other `.wh..wh.` names are aufs bookkeeping with no meaning here.
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.err(shown, "a whiteout must name an entry"));
            }
            self.tree.insert(
                dir,
                hidden,
                Node {
                    meta,
                    kind: Kind::CharDev { major: 0, minor: 0 },
                },
            );
            return Ok(());
        }
        let kind = match h.kind {
            EntryKind::Dir => {
                if let Some(id) = self.tree.child(dir, name) {
                    if self.tree.node(id).is_dir() {
                        // Re-declared: new metadata, same children.
                        self.tree.node_mut(id).meta = meta;
                        return Ok(());
                    }
                }
                Kind::Dir(BTreeMap::new())
            }
            EntryKind::File => {
                let sent = match &h.sparse {
                    Some(map) => pieces.sparse_file(data, map.real_size, &map.regions),
                    None => pieces.file(data, h.size),
                };
                let file = sent.map_err(|e| match e {
                    PieceError::Read(e) => stream_error(self.layer, format!("{shown:?}"), e),
                    PieceError::Short { got, want } => self.err(
                        shown,
                        format!("truncated archive: file data ends after {got} of {want} bytes"),
                    ),
                    PieceError::StoreGone => ConvertError::StoreStopped,
                    PieceError::TooManyChunks => {
                        self.err(shown, "the layer has more than 2^32 chunks")
                    }
                    PieceError::TooManyHoleChunks => self.err(
                        shown,
                        format!(
                            "the layer's sparse files have more than {MAX_HOLE_CHUNKS} chunks \
                             of holes; a larger chunk size needs fewer"
                        ),
                    ),
                })?;
                Kind::File(file)
            }
            EntryKind::Symlink => {
                if h.link.is_empty() || h.link.contains(&0) {
                    return Err(self.err(shown, "a symlink target is empty or holds a NUL byte"));
                }
                Kind::Symlink(h.link.clone())
            }
            EntryKind::HardLink => {
                let id = self.hard_link_target(&h.link, shown)?;
                self.tree.link(dir, name, id);
                return Ok(());
            }
            EntryKind::Char => Kind::CharDev {
                major: h.dev_major,
                minor: h.dev_minor,
            },
            EntryKind::Block => Kind::BlockDev {
                major: h.dev_major,
                minor: h.dev_minor,
            },
            EntryKind::Fifo => Kind::Fifo,
        };
        self.tree.insert(dir, name, Node { meta, kind });
        Ok(())
    }

    /// The node an earlier entry created at `target`, which must not be a directory.
    fn hard_link_target(&self, target: &[u8], shown: &str) -> Result<NodeId, ConvertError> {
        let target_shown = String::from_utf8_lossy(target);
        let components = split_path(target).map_err(|rule| {
            self.err(shown, format!("hard link target {target_shown:?}: {rule}"))
        })?;
        let mut id = Tree::ROOT;
        for (i, &c) in components.iter().enumerate() {
            if i > 0 {
                match &self.tree.node(id).kind {
                    Kind::Dir(_) => {}
                    Kind::Symlink(_) => {
                        return Err(self.err(
                            shown,
                            format!(
                                "hard link target {target_shown:?} goes through a symlink \
                                 this layer created"
                            ),
                        ))
                    }
                    _ => {
                        return Err(self.err(
                            shown,
                            format!("hard link target {target_shown:?} does not exist"),
                        ))
                    }
                }
            }
            id = self.tree.child(id, c).ok_or_else(|| {
                self.err(
                    shown,
                    format!("hard link target {target_shown:?} is not an earlier entry"),
                )
            })?;
        }
        if self.tree.node(id).is_dir() {
            return Err(self.err(
                shown,
                format!("hard link target {target_shown:?} is a directory"),
            ));
        }
        Ok(id)
    }
}

/// Parses a PAX time (`[-]seconds[.fraction]`) into seconds and nanoseconds.
pub(crate) fn parse_pax_time(v: &str) -> Option<(i64, u32)> {
    let (neg, body) = match v.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, v),
    };
    let (secs, frac) = match body.split_once('.') {
        Some((s, f)) => (s, f),
        None => (body, ""),
    };
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nsec = 0u32;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_with_fractions_and_signs() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12.123456789123"), Some((12, 123_456_789)));
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time("-3"), Some((-3, 0)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.x"), None);
        assert_eq!(parse_pax_time(""), None);
    }

    #[test]
    fn paths_split_and_refuse_escapes() {
        assert_eq!(split_path(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert_eq!(split_path(b"/etc/x").unwrap(), vec![&b"etc"[..], b"x"]);
        assert!(split_path(b"./").unwrap().is_empty());
        assert!(split_path(b"a/../../b").is_err());
        assert!(split_path(&[b'a'; 256]).is_err());
        assert!(split_path(&[b'a'; 255]).is_ok());
        assert!(split_path(b"a/b\0c").is_err());
    }

    #[test]
    fn compression_is_detected_by_magic() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"usr/"), Compression::None);
        assert_eq!(Compression::Gzip.name(), "gzip");
    }
}
