//! A streaming tar reader: ustar, GNU and PAX headers, with every length bounded.
//!
//! Our own rather than the `tar` crate's because its PAX parser splits records on newlines
//! instead of using their lengths, so a binary xattr value (a file capability, say) holding
//! a `0x0a` byte breaks the record, and a crafted value can smuggle in a `path` record that
//! other readers would not see. Here every record is taken by its length.

use std::collections::BTreeMap;
use std::io::{self, Read};

use super::sparse::{
    self, DataMapParser, Layout, PaxSparse, SparseMap, OLD_GNU_EXTENSION_SLOTS,
    OLD_GNU_HEADER_SLOTS,
};

/// The tar block size.
pub const BLOCK_BYTES: u64 = 512;
/// The largest PAX extended header we accept.
const MAX_PAX_BYTES: u64 = 1 << 20;
/// The largest GNU long name or long link name we accept.
const MAX_LONG_NAME_BYTES: u64 = 64 * 1024;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file (`0`, NUL, `7`).
    File,
    /// Hard link (`1`).
    HardLink,
    /// Symbolic link (`2`).
    Symlink,
    /// Character device (`3`).
    Char,
    /// Block device (`4`).
    Block,
    /// Directory (`5`, GNU `D`).
    Dir,
    /// Named pipe (`6`).
    Fifo,
}

/// One entry's header, with every extension (PAX, GNU long names) applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Path as stored.
    pub path: Vec<u8>,
    /// Link target (symlinks and hard links).
    pub link: Vec<u8>,
    /// Type.
    pub kind: EntryKind,
    /// Mode bits as stored.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Data size in bytes: for a sparse file, the bytes of its data regions.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Nanoseconds (from a PAX `mtime`).
    pub mtime_nsec: u32,
    /// Device major.
    pub dev_major: u32,
    /// Device minor.
    pub dev_minor: u32,
    /// `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For a sparse file (GNU `S`, or PAX `GNU.sparse.*`): where its data lies, checked
    /// against `size`.
    pub sparse: Option<SparseMap>,
}

/// Why the archive could not be read.
#[derive(Debug)]
pub enum TarError {
    /// Reading the stream failed (decompression errors included).
    Io(io::Error),
    /// The stream ended inside the archive.
    Truncated(String),
    /// A header is invalid.
    Corrupt(String),
}

impl From<io::Error> for TarError {
    fn from(e: io::Error) -> TarError {
        if e.kind() == io::ErrorKind::UnexpectedEof && e.get_ref().is_none() {
            TarError::Truncated("the stream ends inside the archive".into())
        } else {
            TarError::Io(e)
        }
    }
}

/// Reads a tar stream entry by entry.
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    scratch: Vec<u8>,
}

fn read_exact_or_truncated<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), TarError> {
    let got = super::pieces::read_full(r, buf)?;
    if got < buf.len() {
        return Err(TarError::Truncated(format!(
            "the stream ends inside {what} ({got} of {} bytes)",
            buf.len()
        )));
    }
    Ok(())
}

impl<R: Read> TarReader<R> {
    /// Reads from `inner`.
    pub fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            scratch: vec![0u8; 64 * 1024],
        }
    }

    /// Gives the stream back (after the end-of-archive block once `next` returned `None`).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        while n > 0 {
            let len = n.min(self.scratch.len() as u64) as usize;
            let got = super::pieces::read_full(&mut self.inner, &mut self.scratch[..len])?;
            if got < len {
                return Err(TarError::Truncated(
                    "the stream ends inside an entry's data".into(),
                ));
            }
            n -= len as u64;
        }
        Ok(())
    }

    /// Skips whatever is left of the current entry.
    fn finish_entry(&mut self) -> Result<(), TarError> {
        let n = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.skip(n)
    }

    fn start_data(&mut self, size: u64) {
        self.remaining = size;
        self.padding = size.next_multiple_of(BLOCK_BYTES) - size;
    }

    fn read_extension(&mut self, size: u64, cap: u64, what: &str) -> Result<Vec<u8>, TarError> {
        if size > cap {
            return Err(TarError::Corrupt(format!(
                "{what} of {size} bytes is over the limit of {cap}"
            )));
        }
        let mut data = vec![0u8; size as usize];
        read_exact_or_truncated(&mut self.inner, &mut data, what)?;
        self.skip(size.next_multiple_of(BLOCK_BYTES) - size)?;
        Ok(data)
    }

    /// The next entry, or `None` at the end-of-archive block. A stream that ends without
    /// that block is truncated.
    pub fn next(&mut self) -> Result<Option<Header>, TarError> {
        self.finish_entry()?;
        let mut pax: Option<Vec<PaxRecord>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        // Bounded: each extension kind may appear once before its entry.
        for _ in 0..8 {
            let mut block = [0u8; BLOCK_BYTES as usize];
            let got = super::pieces::read_full(&mut self.inner, &mut block)?;
            if got == 0 {
                return Err(TarError::Truncated(
                    "the archive ends without its end-of-archive block".into(),
                ));
            }
            if got < block.len() {
                return Err(TarError::Truncated(format!(
                    "the stream ends inside a header ({got} of 512 bytes)"
                )));
            }
            if block.iter().all(|&b| b == 0) {
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(TarError::Corrupt(
                        "an extension header is not followed by its entry".into(),
                    ));
                }
                return Ok(None);
            }
            check_checksum(&block)?;
            let size = numeric(&block[124..136], "size")?;
            let size = u64::try_from(size)
                .map_err(|_| TarError::Corrupt(format!("negative size {size}")))?;
            let typeflag = block[156];
            match typeflag {
                b'x' => {
                    if pax.is_some() {
                        return Err(TarError::Corrupt("two PAX headers for one entry".into()));
                    }
                    let data = self.read_extension(size, MAX_PAX_BYTES, "a PAX header")?;
                    pax = Some(parse_pax(&data)?);
                    continue;
                }
                b'g' => {
                    // Global PAX records: nothing in them changes what we store.
                    self.read_extension(size, MAX_PAX_BYTES, "a global PAX header")?;
                    continue;
                }
                b'L' | b'K' => {
                    let slot = if typeflag == b'L' {
                        &mut long_name
                    } else {
                        &mut long_link
                    };
                    if slot.is_some() {
                        return Err(TarError::Corrupt("two GNU long names for one entry".into()));
                    }
                    let mut data =
                        self.read_extension(size, MAX_LONG_NAME_BYTES, "a GNU long name")?;
                    while data.last() == Some(&0) {
                        data.pop();
                    }
                    if typeflag == b'L' {
                        long_name = Some(data);
                    } else {
                        long_link = Some(data);
                    }
                    continue;
                }
                b'V' => {
                    // A GNU volume label names the archive, not a file.
                    self.read_extension(size, MAX_PAX_BYTES, "a volume label")?;
                    continue;
                }
                _ => {}
            }
            let mut h = parse_header(&block, size)?;
            if let Some(n) = long_name {
                h.path = n;
            }
            if let Some(l) = long_link {
                h.link = l;
            }
            let mut layout = None;
            if typeflag == b'S' {
                // Its extension blocks come before the data.
                layout = Some(Layout::Map(self.read_old_gnu_map(&block, &h.path)?));
            }
            if let Some(records) = pax {
                if let Some(l) = apply_pax(&mut h, records)? {
                    if layout.is_some() {
                        return Err(sparse_error(
                            &h.path,
                            "both an old GNU sparse header and PAX sparse records",
                        ));
                    }
                    layout = Some(l);
                }
            }
            if layout.is_some() && h.kind != EntryKind::File {
                return Err(sparse_error(
                    &h.path,
                    format!("a sparse map on a {:?} entry", h.kind),
                ));
            }
            self.start_data(h.size);
            if h.kind == EntryKind::Dir || h.kind == EntryKind::HardLink {
                // Their data, if any, is not file content (GNU dumpdir listings).
                self.finish_entry()?;
                h.size = 0;
            }
            h.sparse = match layout {
                None => None,
                Some(Layout::Map(map)) => Some(map),
                Some(Layout::InData { real_size }) => Some(SparseMap {
                    real_size,
                    regions: self.read_data_map(&h.path)?,
                }),
            };
            if let Some(map) = &h.sparse {
                h.size = self.remaining;
                map.check(h.size)
                    .map_err(|rule| sparse_error(&h.path, rule))?;
            }
            return Ok(Some(h));
        }
        Err(TarError::Corrupt(
            "too many extension headers for one entry".into(),
        ))
    }
}

impl<R: Read> TarReader<R> {
    /// Reads the map of an old GNU sparse header (`block`): four slots in the header, then
    /// 21 in each extension block while the one before sets its `isextended` byte.
    fn read_old_gnu_map(&mut self, block: &[u8; 512], path: &[u8]) -> Result<SparseMap, TarError> {
        let number = |field: &[u8], what: &str| numeric(field, what).map_err(|e| e.to_string());
        let bad = |rule: String| sparse_error(path, rule);
        let real_size = numeric(&block[483..495], "sparse real size")?;
        let real_size =
            u64::try_from(real_size).map_err(|_| bad(format!("negative real size {real_size}")))?;
        let mut regions = Vec::new();
        let slots = &block[386..386 + OLD_GNU_HEADER_SLOTS * 24];
        let mut open = sparse::old_gnu_slots(slots, &mut regions, number).map_err(bad)?;
        let mut extended = block[482] != 0;
        // Bounded: each block adds 21 regions, and the map takes MAX_SPARSE_REGIONS at most.
        while extended {
            if !open {
                return Err(bad(
                    "an extension block follows a map that ended at an empty slot".into(),
                ));
            }
            let mut ext = [0u8; BLOCK_BYTES as usize];
            read_exact_or_truncated(&mut self.inner, &mut ext, "a sparse extension block")?;
            open =
                sparse::old_gnu_slots(&ext[..OLD_GNU_EXTENSION_SLOTS * 24], &mut regions, number)
                    .map_err(bad)?;
            extended = ext[504] != 0;
        }
        Ok(SparseMap { real_size, regions })
    }

    /// Reads a PAX 1.0 map from the start of the entry's data (whole blocks), leaving
    /// `remaining` at the data regions.
    fn read_data_map(&mut self, path: &[u8]) -> Result<Vec<(u64, u64)>, TarError> {
        let mut parser = DataMapParser::default();
        // Bounded: the parser refuses a map of more than MAX_SPARSE_REGIONS regions, each
        // number at most 20 digits.
        loop {
            if self.remaining < BLOCK_BYTES {
                return Err(sparse_error(path, "the 1.0 map runs past the entry's data"));
            }
            let mut block = [0u8; BLOCK_BYTES as usize];
            read_exact_or_truncated(&mut self.inner, &mut block, "a sparse map")?;
            self.remaining -= BLOCK_BYTES;
            if let Some(regions) = parser
                .feed(&block)
                .map_err(|rule| sparse_error(path, rule))?
            {
                return Ok(regions);
            }
        }
    }
}

/// A bad sparse entry, named by its path.
fn sparse_error(path: &[u8], rule: impl std::fmt::Display) -> TarError {
    TarError::Corrupt(format!(
        "sparse file {:?}: {rule}",
        String::from_utf8_lossy(path)
    ))
}

impl std::fmt::Display for TarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TarError::Io(e) => write!(f, "{e}"),
            TarError::Truncated(why) | TarError::Corrupt(why) => f.write_str(why),
        }
    }
}

impl<R: Read> Read for TarReader<R> {
    /// Reads the current entry's data.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = (buf.len() as u64).min(self.remaining) as usize;
        if len == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..len])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn check_checksum(block: &[u8; 512]) -> Result<(), TarError> {
    let stored = numeric(&block[148..156], "checksum")?;
    let mut unsigned = 0i64;
    let mut signed = 0i64;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    if stored != unsigned && stored != signed {
        return Err(TarError::Corrupt(format!(
            "header checksum mismatch (stored {stored}, computed {unsigned})"
        )));
    }
    Ok(())
}

/// Parses a numeric field: octal text, or GNU base-256 (high bit of the first byte set).
fn numeric(field: &[u8], what: &str) -> Result<i64, TarError> {
    let bad = || {
        TarError::Corrupt(format!(
            "bad {what} field {:?}",
            String::from_utf8_lossy(field)
        ))
    };
    if field[0] & 0x80 != 0 {
        let negative = field[0] & 0x40 != 0;
        let mut v: i128 = if negative { -1 } else { 0 };
        for (i, &b) in field.iter().enumerate() {
            let b = if i == 0 {
                b & 0x7f | if negative { 0x80 } else { 0 }
            } else {
                b
            };
            v = v.checked_mul(256).ok_or_else(bad)? | i128::from(b);
            if v > i128::from(i64::MAX) || v < i128::from(i64::MIN) {
                return Err(bad());
            }
        }
        return i64::try_from(v).map_err(|_| bad());
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad());
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(i64::from(b - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(v)
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn parse_header(b: &[u8; 512], size: u64) -> Result<Header, TarError> {
    let name = cstr(&b[0..100]);
    let posix = &b[257..263] == b"ustar\0";
    let mut path = Vec::with_capacity(256);
    if posix {
        let prefix = cstr(&b[345..500]);
        if !prefix.is_empty() {
            path.extend_from_slice(prefix);
            path.push(b'/');
        }
    }
    path.extend_from_slice(name);
    let kind = match b[156] {
        b'0' | 0 | b'7' if path.ends_with(b"/") => EntryKind::Dir,
        b'0' | 0 | b'7' => EntryKind::File,
        b'1' => EntryKind::HardLink,
        b'2' => EntryKind::Symlink,
        b'3' => EntryKind::Char,
        b'4' => EntryKind::Block,
        b'5' | b'D' => EntryKind::Dir,
        b'6' => EntryKind::Fifo,
        // Old GNU sparse: the caller reads its map.
        b'S' => EntryKind::File,
        t => {
            return Err(TarError::Corrupt(format!(
                "unsupported entry type {:?}",
                t as char
            )))
        }
    };
    let u32_field = |range: std::ops::Range<usize>, what: &str| -> Result<u32, TarError> {
        let v = numeric(&b[range], what)?;
        u32::try_from(v).map_err(|_| TarError::Corrupt(format!("{what} {v} out of range")))
    };
    let u64_field = |range: std::ops::Range<usize>, what: &str| -> Result<u64, TarError> {
        let v = numeric(&b[range], what)?;
        u64::try_from(v).map_err(|_| TarError::Corrupt(format!("{what} {v} out of range")))
    };
    let is_dev = matches!(kind, EntryKind::Char | EntryKind::Block);
    Ok(Header {
        path,
        link: cstr(&b[157..257]).to_vec(),
        kind,
        mode: u32_field(100..108, "mode")?,
        uid: u64_field(108..116, "uid")?,
        gid: u64_field(116..124, "gid")?,
        size,
        mtime: numeric(&b[136..148], "mtime")?,
        mtime_nsec: 0,
        dev_major: if is_dev {
            u32_field(329..337, "devmajor")?
        } else {
            0
        },
        dev_minor: if is_dev {
            u32_field(337..345, "devminor")?
        } else {
            0
        },
        xattrs: BTreeMap::new(),
        sparse: None,
    })
}

/// One PAX record: key and value.
pub type PaxRecord = (Vec<u8>, Vec<u8>);

/// Parses PAX records (`<len> <key>=<value>\n`), each taken by its length.
pub fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord>, TarError> {
    let bad = |why: &str| TarError::Corrupt(format!("malformed PAX record: {why}"));
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("no length"))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad length"))?;
        if len <= space + 1 || len > data.len() {
            return Err(bad("length out of range"));
        }
        let record = &data[space + 1..len];
        let Some((&b'\n', kv)) = record.split_last() else {
            return Err(bad("no newline at its end"));
        };
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("no '='"))?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// Applies PAX records to a header; returns the sparse layout their `GNU.sparse.*`
/// records describe, if any.
fn apply_pax(h: &mut Header, records: Vec<PaxRecord>) -> Result<Option<Layout>, TarError> {
    let num = |key: &[u8], v: &[u8]| -> Result<u64, TarError> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                TarError::Corrupt(format!(
                    "bad PAX {} {:?}",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(v)
                ))
            })
    };
    let mut sparse_records = Vec::new();
    for (key, value) in records {
        match &key[..] {
            b"path" => h.path = value,
            b"linkpath" => h.link = value,
            b"size" => h.size = num(&key, &value)?,
            b"uid" => h.uid = num(&key, &value)?,
            b"gid" => h.gid = num(&key, &value)?,
            b"mtime" => {
                let v = String::from_utf8_lossy(&value);
                (h.mtime, h.mtime_nsec) = super::tar::parse_pax_time(&v)
                    .ok_or_else(|| TarError::Corrupt(format!("bad PAX mtime {v:?}")))?;
            }
            k if k.starts_with(b"GNU.sparse.") => sparse_records.push((key, value)),
            k => {
                if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                    h.xattrs.insert(name.to_vec(), value);
                }
            }
        }
    }
    if sparse_records.is_empty() {
        return Ok(None);
    }
    // The real name wins over `path`, which 0.1 and 1.0 set to a made-up one (and an
    // error should name the real one).
    if let Some((_, name)) = sparse_records
        .iter()
        .rev()
        .find(|(k, _)| k == b"GNU.sparse.name")
    {
        h.path = name.clone();
    }
    // In order: 0.0 maps are repeated offset and length records.
    let mut sparse = PaxSparse::default();
    for (key, value) in &sparse_records {
        sparse
            .record(key, value)
            .map_err(|rule| sparse_error(&h.path, rule))?;
    }
    let layout = sparse
        .finish()
        .map_err(|rule| sparse_error(&h.path, rule))?;
    Ok(Some(layout))
}

#[cfg(test)]
mod tests {
    use super::super::tests::gnu_sparse::{self, header, num12, seal};
    use super::*;

    /// Reads every entry with its data.
    fn read_all(tar: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, TarError> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(h) = r.next()? {
            let mut data = Vec::new();
            r.read_to_end(&mut data)?;
            out.push((h, data));
        }
        Ok(out)
    }

    fn ended(mut tar: Vec<u8>) -> Vec<u8> {
        tar.extend_from_slice(&[0u8; 1024]);
        tar
    }

    #[test]
    fn sparse_headers_give_the_real_name_size_and_map() {
        let regions = [(4096, 10), (8192, 0)];
        let (_, data) = gnu_sparse::content(8192, &regions);
        for (format, write) in gnu_sparse::FORMATS {
            let mut tar = Vec::new();
            write(&mut tar, "dir/real", 8192, &regions, &data);
            let entries = read_all(&ended(tar)).unwrap_or_else(|e| panic!("{format}: {e}"));
            let (h, got) = &entries[0];
            assert_eq!(h.path, b"dir/real", "{format}");
            assert_eq!(h.kind, EntryKind::File, "{format}");
            assert_eq!(h.size, 10, "{format}: the data regions' bytes");
            assert_eq!(*got, data, "{format}");
            let map = h.sparse.as_ref().unwrap();
            assert_eq!((map.real_size, &map.regions[..]), (8192, &regions[..]));
        }
    }

    #[test]
    fn old_gnu_maps_take_base256_numbers_and_extension_blocks() {
        // Past 8 GiB GNU tar writes base-256; 4 + 21 + 2 regions take two extension blocks.
        let base = 9u64 << 30;
        let regions: Vec<(u64, u64)> = (0..27).map(|i| (base + i * 100, 1)).collect();
        let mut tar = Vec::new();
        gnu_sparse::old_gnu(&mut tar, "big", base + 10_000, &regions, &[7; 27]);
        assert_eq!(tar.len(), 512 * 4, "header, two extension blocks, data");
        let entries = read_all(&ended(tar)).unwrap();
        let map = entries[0].0.sparse.as_ref().unwrap();
        assert_eq!(map.real_size, base + 10_000);
        assert_eq!(map.regions, regions);
        assert_eq!(entries[0].1, vec![7; 27]);
    }

    /// Parses `tar` and checks that it is refused naming `entry` and `rule`.
    fn refused(tar: Vec<u8>, entry: &str, rule: &str) {
        let e = read_all(&ended(tar))
            .err()
            .unwrap_or_else(|| panic!("{rule}: accepted"));
        let e = e.to_string();
        assert!(
            e.contains(&format!("sparse file \"{entry}\"")),
            "{e} should name {entry}"
        );
        assert!(e.contains(rule), "{e} should say {rule}");
    }

    #[test]
    fn malformed_sparse_maps_are_refused() {
        use gnu_sparse::{old_gnu, pax_0_0, pax_0_1, pax_1_0};
        let build = |write: gnu_sparse::Writer, real: u64, regions: &[(u64, u64)], data: usize| {
            let mut tar = Vec::new();
            write(&mut tar, "f", real, regions, &vec![1; data]);
            tar
        };
        refused(
            build(old_gnu, 99, &[(50, 1), (10, 1)], 2),
            "f",
            "must be in order",
        );
        refused(
            build(pax_0_1, 99, &[(0, 10), (9, 1)], 11),
            "f",
            "must not overlap",
        );
        refused(
            build(pax_0_0, 99, &[(0, 10), (90, 10)], 20),
            "f",
            "past the real size 99",
        );
        refused(
            build(pax_1_0, 9, &[(0, 10)], 10),
            "f",
            "past the real size 9",
        );
        refused(build(old_gnu, 99, &[(0, 10)], 9), "f", "holds 9 data bytes");
        refused(
            build(pax_1_0, 99, &[(0, 10)], 11),
            "f",
            "regions add up to 10",
        );
        // Lengths past 2^64 overflow.
        refused(
            build(
                pax_0_1,
                u64::MAX,
                &[(u64::MAX - 1, 1), (u64::MAX, u64::MAX)],
                1,
            ),
            "f",
            "past the real size",
        );

        // Numbers that do not parse.
        let mut tar = build(old_gnu, 99, &[(0, 1)], 1);
        tar[386 + 3] = b'9';
        seal((&mut tar[..512]).try_into().unwrap());
        refused(tar, "f", "bad sparse offset field");
        let mut tar = build(old_gnu, 99, &[(0, 1)], 1);
        tar[398..410].copy_from_slice(&[0xff; 12]);
        seal((&mut tar[..512]).try_into().unwrap());
        refused(tar, "f", "negative");
        let mut tar = Vec::new();
        gnu_sparse::pax(
            &mut tar,
            &[
                ("GNU.sparse.size", "9".into()),
                ("GNU.sparse.map", "0,1x".into()),
            ],
        );
        gnu_sparse::padded(&mut tar, &header(b"f", b'0', 1, false));
        refused(
            seal_last(tar, 1),
            "f",
            "GNU.sparse.map length \"1x\" is not a decimal number",
        );
        let mut tar = Vec::new();
        gnu_sparse::pax(
            &mut tar,
            &[
                ("GNU.sparse.size", "99999999999999999999".into()),
                ("GNU.sparse.map", "".into()),
            ],
        );
        gnu_sparse::padded(&mut tar, &header(b"f", b'0', 0, false));
        refused(seal_last(tar, 0), "f", "below 2^64");

        // Counts that do not match.
        let mut tar = Vec::new();
        gnu_sparse::pax(
            &mut tar,
            &[
                ("GNU.sparse.size", "9".into()),
                ("GNU.sparse.numblocks", "2".into()),
                ("GNU.sparse.offset", "0".into()),
                ("GNU.sparse.numbytes", "1".into()),
            ],
        );
        gnu_sparse::padded(&mut tar, &header(b"f", b'0', 1, false));
        refused(
            seal_last(tar, 1),
            "f",
            "numblocks says 2 regions but the map has 1",
        );
        // A 1.0 count of 3 with two regions: the padding is read where numbers belong.
        let mut tar = pax_1_0_raw("f", 99, b"3\n0\n1\n5\n1\n", &[1, 1]);
        refused(tar.clone(), "f", "\"\\0\" where a decimal number");
        // The same map with no block of data left for it.
        tar.truncate(tar.len() - 1024);
        let at = tar.len() - 512;
        let h: &mut [u8; 512] = (&mut tar[at..]).try_into().unwrap();
        h[124..136].copy_from_slice(&num12(0));
        seal(h);
        refused(tar, "f", "the 1.0 map runs past the entry's data");
    }

    /// Re-seals the last header of `tar`, followed by `data_blocks` zero blocks of data.
    fn seal_last(mut tar: Vec<u8>, data: u64) -> Vec<u8> {
        let at = tar.len() - 512;
        let h: &mut [u8; 512] = (&mut tar[at..]).try_into().unwrap();
        seal(h);
        tar.resize(tar.len() + data.next_multiple_of(512) as usize, 0);
        tar
    }

    /// A 1.0 entry with a map given as text.
    fn pax_1_0_raw(name: &str, real_size: u64, map: &[u8], data: &[u8]) -> Vec<u8> {
        let mut tar = Vec::new();
        gnu_sparse::pax(
            &mut tar,
            &[
                ("GNU.sparse.major", "1".into()),
                ("GNU.sparse.minor", "0".into()),
                ("GNU.sparse.name", name.into()),
                ("GNU.sparse.realsize", real_size.to_string()),
            ],
        );
        let mut body = map.to_vec();
        body.resize(body.len().next_multiple_of(512), 0);
        body.extend_from_slice(data);
        let mut h = header(b"GNUSparseFile.1/x", b'0', body.len() as u64, false);
        seal(&mut h);
        tar.extend_from_slice(&h);
        gnu_sparse::padded(&mut tar, &body);
        tar
    }

    #[test]
    fn sparse_records_where_they_do_not_belong_are_refused() {
        // An extension block after a map that ended at an empty slot.
        let mut tar = Vec::new();
        gnu_sparse::old_gnu(&mut tar, "f", 99, &[(0, 1)], &[1]);
        tar[482] = 1;
        seal((&mut tar[..512]).try_into().unwrap());
        refused(tar, "f", "an extension block follows a map that ended");
        // A sparse map on a directory.
        let mut tar = Vec::new();
        gnu_sparse::pax(
            &mut tar,
            &[
                ("GNU.sparse.size", "9".into()),
                ("GNU.sparse.map", "".into()),
            ],
        );
        let mut h = header(b"d", b'5', 0, false);
        seal(&mut h);
        tar.extend_from_slice(&h);
        refused(tar, "d", "a sparse map on a Dir entry");
        // Both an old GNU map and PAX records.
        let mut tar = Vec::new();
        gnu_sparse::pax(
            &mut tar,
            &[
                ("GNU.sparse.size", "9".into()),
                ("GNU.sparse.map", "".into()),
            ],
        );
        gnu_sparse::old_gnu(&mut tar, "f", 99, &[(0, 1)], &[1]);
        refused(
            tar,
            "f",
            "both an old GNU sparse header and PAX sparse records",
        );
    }

    #[test]
    fn a_stream_ending_inside_the_sparse_map_is_truncated() {
        let regions: Vec<(u64, u64)> = (0..10).map(|i| (i * 10, 1)).collect();
        let mut tar = Vec::new();
        gnu_sparse::old_gnu(&mut tar, "f", 99, &regions, &[1; 10]);
        tar.truncate(512 + 100);
        assert!(
            matches!(read_all(&tar), Err(TarError::Truncated(why)) if why.contains("sparse extension block"))
        );
        let mut tar = pax_1_0_raw("f", 99, b"1\n0\n1\n", &[1]);
        let cut = tar.len() - 1024 + 10;
        tar.truncate(cut);
        assert!(matches!(read_all(&tar), Err(TarError::Truncated(_))));
    }

    #[test]
    fn pax_records_are_taken_by_length_even_with_newlines_inside() {
        let mut data = Vec::new();
        for (k, v) in [
            (
                &b"SCHILY.xattr.user.a"[..],
                &b"x\n21 path=/etc/shadow\n"[..],
            ),
            (b"path", b"ok"),
        ] {
            let body = [k, b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            while format!("{len} ").len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(&body);
        }
        let r = parse_pax(&data).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, b"x\n21 path=/etc/shadow\n");
        assert_eq!(r[1], (b"path".to_vec(), b"ok".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"5 a=b\n").is_err());
    }

    #[test]
    fn numeric_fields_parse_octal_and_base256() {
        assert_eq!(numeric(b"0000644\0", "m").unwrap(), 0o644);
        assert_eq!(numeric(b"   17 \0\0", "m").unwrap(), 0o17);
        assert_eq!(numeric(b"\0\0\0\0\0\0\0\0", "m").unwrap(), 0);
        assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 1, 0], "m").unwrap(), 256);
        assert_eq!(numeric(&[0xff; 8], "m").unwrap(), -1);
        assert!(numeric(b"0000948\0", "m").is_err());
    }
}
