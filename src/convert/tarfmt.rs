//! A streaming tar reader: ustar, GNU and PAX headers, with every length bounded.
//!
//! Our own rather than the `tar` crate's because its PAX parser splits records on newlines
//! instead of using their lengths, so a binary xattr value (a file capability, say) holding
//! a `0x0a` byte breaks the record, and a crafted value can smuggle in a `path` record that
//! other readers would not see. Here every record is taken by its length.

use std::collections::BTreeMap;
use std::io::{self, Read};

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
    /// Data size in bytes.
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
            if let Some(records) = pax {
                apply_pax(&mut h, records)?;
            }
            if h.kind == EntryKind::Dir || h.kind == EntryKind::HardLink {
                // Their data, if any, is not file content (GNU dumpdir listings).
                self.start_data(h.size);
                self.finish_entry()?;
                h.size = 0;
            } else {
                self.start_data(h.size);
            }
            return Ok(Some(h));
        }
        Err(TarError::Corrupt(
            "too many extension headers for one entry".into(),
        ))
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
        b'S' => {
            return Err(TarError::Corrupt(
                "GNU sparse entries are not supported".into(),
            ))
        }
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

fn apply_pax(h: &mut Header, records: Vec<PaxRecord>) -> Result<(), TarError> {
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
            k if k.starts_with(b"GNU.sparse.") => {
                return Err(TarError::Corrupt(
                    "PAX sparse entries are not supported".into(),
                ))
            }
            k => {
                if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                    h.xattrs.insert(name.to_vec(), value);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
