//! Lays a [`Tree`] out as an EROFS image and writes it in one sequential pass.
//!
//! Planning walks the reachable nodes once, validates every limit and fixes each inode's
//! byte position (hence its nid), the shared xattr area and the directory/symlink data
//! blocks. Writing then streams block after block; only block 0 (superblock, device
//! table, first inodes) is held back until complete so its checksum can be computed.

use std::collections::HashMap;
use std::io::{self, Write};

use super::format::{self, align_up, ft, s_if, InodeCore, BLOCK_BYTES};
use super::tree::{ChunkAddr, Kind, Node, NodeId, Tree};
use super::{ImageInfo, ImageOptions, WriteError};

/// Smallest and largest chunk size (log2) the chunk format can express.
const CHUNK_BITS_MIN: u8 = format::BLOCK_BITS;
const CHUNK_BITS_MAX: u8 = format::BLOCK_BITS + format::CHUNK_FORMAT_BLKBITS_MASK as u8;
/// `h_shared_count` is a u8.
const SHARED_PER_INODE_MAX: usize = u8::MAX as usize;
/// `i_xattr_icount` is a u16: header + (icount - 1) * 4 bytes.
const XATTR_IBODY_MAX_BYTES: usize = format::XATTR_IBODY_HEADER_BYTES + 4 * (u16::MAX as usize - 1);
/// `XATTR_NAME_MAX`: longest full xattr name the VFS accepts.
const XATTR_NAME_MAX_BYTES: usize = 255;
const _: () = assert!(XATTR_NAME_MAX_BYTES <= u8::MAX as usize);
/// `PATH_MAX` including the terminating NUL: the longest symlink target is one less.
const SYMLINK_MAX_BYTES: usize = 4095;
/// Device tags are the 64-byte `tag` of a device slot.
const DEVICE_TAG_MAX_BYTES: usize = 64;
/// Where the device table starts: right after the 128-byte superblock.
const DEVT_OFFSET: u64 = (format::SUPER_OFFSET + format::SUPER_BYTES) as u64;
const _: () = assert!(DEVT_OFFSET.is_multiple_of(format::DEVICE_SLOT_BYTES as u64));

/// One xattr split into its EROFS name index and the name suffix after the prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Xattr<'t> {
    index: u8,
    suffix: &'t [u8],
    value: &'t [u8],
}

impl Xattr<'_> {
    fn entry_bytes(&self) -> usize {
        format::xattr_entry_bytes(self.suffix.len(), self.value.len())
    }
}

/// Splits an xattr name into (index, suffix), or None if EROFS has no prefix for it.
pub(crate) fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((format::XATTR_INDEX_POSIX_ACL_ACCESS, b"")),
        b"system.posix_acl_default" => return Some((format::XATTR_INDEX_POSIX_ACL_DEFAULT, b"")),
        _ => {}
    }
    const PREFIXES: [(&[u8], u8); 3] = [
        (b"user.", format::XATTR_INDEX_USER),
        (b"trusted.", format::XATTR_INDEX_TRUSTED),
        (b"security.", format::XATTR_INDEX_SECURITY),
    ];
    PREFIXES.iter().find_map(|&(prefix, index)| {
        // The VFS refuses a bare prefix ("user."), so such a name cannot be read back.
        (name.len() > prefix.len() && name.starts_with(prefix))
            .then(|| (index, &name[prefix.len()..]))
    })
}

/// What follows an inode's core and xattrs, or where its data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// Devices, fifos, sockets.
    None,
    /// Chunk-based regular file with this many 8-byte indexes.
    Chunks(u64),
    /// All the data (a symlink target, a one-block directory) stored right after the
    /// xattrs, in the same block as the inode (FLAT_INLINE).
    Inline(usize),
    /// Data in `count` blocks of the data area (directories, long symlinks); FLAT_PLAIN.
    Blocks { count: u64 },
}

struct Planned<'t> {
    id: NodeId,
    core: InodeCore,
    shared: Vec<u32>,
    inline_xattrs: Vec<Xattr<'t>>,
    xattr_bytes: usize,
    body: Body,
    /// Byte offset of the inode in the image.
    pos: u64,
    /// First data block for `Body::Blocks`.
    blkaddr: u32,
}

/// Parent links used to name nodes in errors and to fill `..`.
struct Names<'t> {
    /// For each node: the directory and name it was first reached through.
    first: Vec<Option<(NodeId, &'t [u8])>>,
}

impl Names<'_> {
    fn path(&self, id: NodeId) -> String {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = id;
        // Bounded: a path has at most one component per node.
        for _ in 0..self.first.len() {
            match self.first[cur as usize] {
                Some((parent, name)) if cur != Tree::ROOT => {
                    parts.push(name);
                    cur = parent;
                }
                _ => break,
            }
        }
        if parts.is_empty() {
            return "/".into();
        }
        let mut s = String::new();
        for p in parts.iter().rev() {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(p));
        }
        s
    }

    fn err(&self, id: NodeId, rule: impl std::fmt::Display) -> WriteError {
        WriteError::Unrepresentable(format!("{}: {rule}", self.path(id)))
    }

    fn parent(&self, id: NodeId) -> NodeId {
        self.first[id as usize].map_or(Tree::ROOT, |(p, _)| p)
    }
}

/// A directory's entries in on-disk order: `.` and `..` merged into the sorted children.
fn dir_entries(tree: &Tree, dir: NodeId, parent: NodeId) -> Vec<(&[u8], NodeId)> {
    let mut v: Vec<(&[u8], NodeId)> = tree.children(dir).collect();
    let dot: &'static [u8] = b".";
    let dotdot: &'static [u8] = b"..";
    // Names such as ".-" sort between "." and "..": place each by search.
    let at = v.partition_point(|(n, _)| *n < dot);
    v.insert(at, (dot, dir));
    let at = v.partition_point(|(n, _)| *n < dotdot);
    v.insert(at, (dotdot, parent));
    v
}

/// Splits directory entries (given by name length) into blocks: returns the exclusive end
/// index of each block's entries, and the bytes used in the last block.
pub(super) fn pack_dir(name_lens: impl Iterator<Item = usize>) -> (Vec<usize>, u64) {
    let mut ends = Vec::new();
    let mut used = 0u64;
    let mut i = 0usize;
    for len in name_lens {
        let need = (format::DIRENT_BYTES + len) as u64;
        if used + need > BLOCK_BYTES {
            ends.push(i);
            used = 0;
        }
        used += need;
        i += 1;
    }
    ends.push(i);
    (ends, used)
}

fn file_type(node: &Node) -> u8 {
    match node.kind {
        Kind::File(_) => ft::REG_FILE,
        Kind::Dir(_) => ft::DIR,
        Kind::Symlink(_) => ft::SYMLINK,
        Kind::CharDev { .. } => ft::CHRDEV,
        Kind::BlockDev { .. } => ft::BLKDEV,
        Kind::Fifo => ft::FIFO,
        Kind::Socket => ft::SOCK,
    }
}

fn type_bits(node: &Node) -> u16 {
    match node.kind {
        Kind::File(_) => s_if::REG,
        Kind::Dir(_) => s_if::DIR,
        Kind::Symlink(_) => s_if::LNK,
        Kind::CharDev { .. } => s_if::CHR,
        Kind::BlockDev { .. } => s_if::BLK,
        Kind::Fifo => s_if::FIFO,
        Kind::Socket => s_if::SOCK,
    }
}

/// Checks a directory entry name: 1..=255 bytes, no `/` or NUL, not `.` or `..`.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > format::NAME_MAX_BYTES {
        return Err("name longer than 255 bytes");
    }
    if name == b"." || name == b".." {
        return Err("entry named . or ..");
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err("name contains '/' or NUL");
    }
    Ok(())
}

struct Layout<'t> {
    inodes: Vec<Planned<'t>>,
    /// nid of each node, by NodeId (u64::MAX: not written).
    nids: Vec<u64>,
    shared_area: Vec<Xattr<'t>>,
    xattr_blkaddr: u32,
    total_blocks: u64,
}

fn plan<'t>(
    tree: &'t Tree,
    opts: &ImageOptions,
    names: &Names<'t>,
) -> Result<Layout<'t>, WriteError> {
    let reachable = tree.reachable();
    let chunk_bits = opts.chunk_bits;
    let build_time = opts.build_time;

    // Shared xattrs: every (name, value) pair that more than one inode carries.
    let mut counts: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
    for &(id, _) in &reachable {
        for (name, value) in &tree.node(id).meta.xattrs {
            if split_xattr_name(name).is_none() {
                return Err(names.err(
                    id,
                    format!(
                        "xattr {:?} has no EROFS name prefix (user., trusted., security., system.posix_acl_*)",
                        String::from_utf8_lossy(name)
                    ),
                ));
            }
            // The VFS reads names of at most XATTR_NAME_MAX (255) bytes, prefix included;
            // that also keeps the suffix within the u8 `e_name_len`.
            if name.len() > XATTR_NAME_MAX_BYTES {
                return Err(names.err(
                    id,
                    format!(
                        "xattr name {:?} is {} bytes, over 255",
                        String::from_utf8_lossy(name),
                        name.len()
                    ),
                ));
            }
            if value.len() > usize::from(u16::MAX) {
                return Err(names.err(
                    id,
                    format!(
                        "xattr {:?} value is {} bytes, over 65535",
                        String::from_utf8_lossy(name),
                        value.len()
                    ),
                ));
            }
            // The VFS serves user.* only on regular files and directories (ENODATA
            // elsewhere), so such an xattr on another type would be listed but unreadable.
            if name.starts_with(b"user.")
                && !matches!(tree.node(id).kind, Kind::File(_) | Kind::Dir(_))
            {
                return Err(names.err(
                    id,
                    format!(
                        "xattr {:?}: user.* xattrs exist only on regular files and directories",
                        String::from_utf8_lossy(name)
                    ),
                ));
            }
            *counts
                .entry((name.as_slice(), value.as_slice()))
                .or_default() += 1;
        }
    }
    let mut shared_ids: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
    let mut shared_area: Vec<Xattr<'t>> = Vec::new();
    let mut shared_bytes = 0u64;

    let mut inodes = Vec::with_capacity(reachable.len());
    for (ordinal, &(id, links)) in reachable.iter().enumerate() {
        let node = tree.node(id);
        let meta = &node.meta;
        if meta.perm & !0o7777 != 0 {
            return Err(names.err(id, format!("mode bits {:o} beyond 07777", meta.perm)));
        }
        if meta.uid == u32::MAX || meta.gid == u32::MAX {
            // (uid_t)-1 is the kernel's invalid id: it would read back as the overflow id.
            return Err(names.err(
                id,
                format!(
                    "uid/gid {}/{} uses the reserved id 4294967295",
                    meta.uid, meta.gid
                ),
            ));
        }
        if meta.mtime_nsec >= 1_000_000_000 {
            return Err(names.err(
                id,
                format!("mtime nanoseconds {} over 999999999", meta.mtime_nsec),
            ));
        }

        // Xattrs: shared ones by id (up to 255), the rest inline, in name order.
        let mut shared = Vec::new();
        let mut inline_xattrs = Vec::new();
        for (name, value) in &meta.xattrs {
            let (index, suffix) = split_xattr_name(name).expect("checked above");
            let x = Xattr {
                index,
                suffix,
                value,
            };
            let key = (name.as_slice(), value.as_slice());
            if counts[&key] >= 2 && shared.len() < SHARED_PER_INODE_MAX {
                let sid = match shared_ids.get(&key) {
                    Some(&sid) => sid,
                    None => {
                        let sid = u32::try_from(shared_bytes / 4)
                            .map_err(|_| names.err(id, "shared xattr area beyond 16 GiB"))?;
                        shared_bytes += x.entry_bytes() as u64;
                        shared_ids.insert(key, sid);
                        shared_area.push(x);
                        sid
                    }
                };
                shared.push(sid);
            } else {
                inline_xattrs.push(x);
            }
        }
        let xattr_bytes = if shared.is_empty() && inline_xattrs.is_empty() {
            0
        } else {
            format::XATTR_IBODY_HEADER_BYTES
                + 4 * shared.len()
                + inline_xattrs.iter().map(Xattr::entry_bytes).sum::<usize>()
        };
        if xattr_bytes > XATTR_IBODY_MAX_BYTES {
            return Err(names.err(
                id,
                format!("xattrs take {xattr_bytes} bytes, over the inode limit of {XATTR_IBODY_MAX_BYTES}"),
            ));
        }
        let xattr_icount = if xattr_bytes == 0 {
            0
        } else {
            ((xattr_bytes - format::XATTR_IBODY_HEADER_BYTES) / 4 + 1) as u16
        };

        let (nlink, size, body, datalayout, i_u) = match &node.kind {
            Kind::Dir(children) => {
                if links != 1 {
                    return Err(names.err(
                        id,
                        format!("directory has {links} names (hard-linked directory)"),
                    ));
                }
                let mut subdirs = 0u64;
                for (name, &child) in children {
                    check_name(name).map_err(|rule| {
                        names.err(
                            id,
                            format!("entry {:?}: {rule}", String::from_utf8_lossy(name)),
                        )
                    })?;
                    subdirs += u64::from(tree.node(child).is_dir());
                }
                let nlink = u32::try_from(2 + subdirs)
                    .map_err(|_| names.err(id, "more than 2^32 subdirectories"))?;
                let entries = dir_entries(tree, id, names.parent(id));
                let (ends, last_used) = pack_dir(entries.iter().map(|(n, _)| n.len()));
                let count = ends.len() as u64;
                let size = (count - 1) * BLOCK_BYTES + last_used;
                // A directory of one block is stored inline when it fits next to its
                // inode (checked below); bigger ones take whole blocks.
                let (body, layout) = if count == 1 {
                    (Body::Inline(size as usize), format::DATALAYOUT_FLAT_INLINE)
                } else {
                    (Body::Blocks { count }, format::DATALAYOUT_FLAT_PLAIN)
                };
                (nlink, size, body, layout, 0)
            }
            Kind::File(data) => {
                let chunk_bytes = 1u64 << chunk_bits;
                let want = data.size.div_ceil(chunk_bytes);
                if data.chunks.len() as u64 != want {
                    return Err(names.err(
                        id,
                        format!(
                            "{} chunk addresses for {} bytes, want {want} ({} KiB chunks)",
                            data.chunks.len(),
                            data.size,
                            chunk_bytes / 1024
                        ),
                    ));
                }
                if data.size > i64::MAX as u64 {
                    return Err(names.err(id, "file size beyond 2^63"));
                }
                for (i, chunk) in data.chunks.iter().enumerate() {
                    if let ChunkAddr::Blob { device, blkaddr } = *chunk {
                        let dev = usize::from(device);
                        if dev == 0 || dev > opts.devices.len() {
                            return Err(names.err(
                                id,
                                format!("chunk {i} names device {device}, but the image has devices 1..={}", opts.devices.len()),
                            ));
                        }
                        let start = (i as u64) << chunk_bits;
                        let blocks = chunk_bytes.min(data.size - start).div_ceil(BLOCK_BYTES);
                        let dev_blocks = u64::from(opts.devices[dev - 1].blocks);
                        if blkaddr == format::NULL_ADDR || u64::from(blkaddr) + blocks > dev_blocks
                        {
                            return Err(names.err(
                                id,
                                format!(
                                    "chunk {i} at block {blkaddr} (+{blocks}) lies outside device {device} ({dev_blocks} blocks)"
                                ),
                            ));
                        }
                    }
                }
                let format =
                    format::CHUNK_FORMAT_INDEXES | u16::from(chunk_bits - format::BLOCK_BITS);
                (
                    links,
                    data.size,
                    Body::Chunks(want),
                    format::DATALAYOUT_CHUNK_BASED,
                    u32::from(format),
                )
            }
            Kind::Symlink(target) => {
                if target.is_empty() || target.len() > SYMLINK_MAX_BYTES {
                    return Err(names.err(
                        id,
                        format!("symlink target of {} bytes (want 1..=4095)", target.len()),
                    ));
                }
                if target.contains(&0) {
                    return Err(names.err(id, "symlink target contains NUL"));
                }
                (
                    links,
                    target.len() as u64,
                    Body::Inline(target.len()),
                    format::DATALAYOUT_FLAT_INLINE,
                    0,
                )
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                let rdev = format::encode_dev(*major, *minor).ok_or_else(|| {
                    names.err(id, format!("device {major}:{minor} beyond the kernel's 12-bit major / 20-bit minor"))
                })?;
                (links, 0, Body::None, format::DATALAYOUT_FLAT_PLAIN, rdev)
            }
            Kind::Fifo | Kind::Socket => (links, 0, Body::None, format::DATALAYOUT_FLAT_PLAIN, 0),
        };

        let compact_ok = meta.uid <= u32::from(u16::MAX)
            && meta.gid <= u32::from(u16::MAX)
            && nlink <= u32::from(u16::MAX)
            && size <= u64::from(u32::MAX)
            && i64::try_from(build_time) == Ok(meta.mtime)
            && meta.mtime_nsec == 0;
        let core = InodeCore {
            extended: !compact_ok,
            datalayout,
            xattr_icount,
            mode: type_bits(node) | meta.perm,
            nlink,
            size,
            i_u,
            // i_ino is only for 32-bit stat; wrapping past 2^32 inodes is harmless.
            ino: (ordinal as u32).wrapping_add(1),
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            mtime_nsec: meta.mtime_nsec,
        };
        let mut p = Planned {
            id,
            core,
            shared,
            inline_xattrs,
            xattr_bytes,
            body,
            pos: 0,
            blkaddr: 0,
        };
        // Inline data must not cross a block: what cannot sit in one block with its
        // inode and xattrs goes to a data block of its own.
        if let Body::Inline(len) = p.body {
            if p.core.bytes() + p.xattr_bytes + len > BLOCK_BYTES as usize {
                p.body = Body::Blocks { count: 1 };
                p.core.datalayout = format::DATALAYOUT_FLAT_PLAIN;
            }
        }
        inodes.push(p);
    }

    // Place the inodes after the superblock and the device table.
    let ndev = opts.devices.len() as u64;
    let mut pos = align_up(
        DEVT_OFFSET + ndev * format::DEVICE_SLOT_BYTES as u64,
        format::INODE_SLOT_BYTES,
    );
    let mut nids = vec![u64::MAX; tree.arena_len()];
    for p in &mut inodes {
        let core = p.core.bytes() as u64;
        let inline_tail = match p.body {
            Body::Inline(len) => len as u64,
            _ => 0,
        };
        let head = core + p.xattr_bytes as u64 + inline_tail;
        let in_block = pos % BLOCK_BYTES;
        // Keep inode, xattrs and inline data in one block when they fit (inline data must
        // not cross a block); a larger head starts its core in one block at least.
        if (head <= BLOCK_BYTES && in_block + head > BLOCK_BYTES) || in_block + core > BLOCK_BYTES {
            pos = align_up(pos, BLOCK_BYTES);
        }
        p.pos = pos;
        nids[p.id as usize] = pos / format::INODE_SLOT_BYTES;
        let mut end = pos + core + p.xattr_bytes as u64;
        match p.body {
            Body::Chunks(n) => {
                end = align_up(end, format::CHUNK_INDEX_BYTES as u64)
                    + n * format::CHUNK_INDEX_BYTES as u64
            }
            Body::Inline(len) => end += len as u64,
            Body::None | Body::Blocks { .. } => {}
        }
        pos = align_up(end, format::INODE_SLOT_BYTES);
    }
    let root_nid = nids[Tree::ROOT as usize];
    if root_nid > u64::from(u16::MAX) {
        return Err(WriteError::Unrepresentable(format!(
            "{} devices push the root inode to nid {root_nid}, beyond the 16-bit root_nid",
            opts.devices.len()
        )));
    }

    let mut next_block = pos.div_ceil(BLOCK_BYTES);
    let xattr_blkaddr = if shared_area.is_empty() {
        0
    } else {
        let at = next_block;
        next_block += shared_bytes.div_ceil(BLOCK_BYTES);
        at
    };
    for p in &mut inodes {
        if let Body::Blocks { count } = p.body {
            p.blkaddr = u32::try_from(next_block)
                .map_err(|_| names.err(p.id, "image larger than 2^32 blocks"))?;
            p.core.i_u = p.blkaddr;
            next_block += count;
        }
    }
    if next_block > u64::from(u32::MAX) {
        return Err(WriteError::Unrepresentable(format!(
            "image of {next_block} blocks exceeds the 32-bit block count"
        )));
    }
    Ok(Layout {
        inodes,
        nids,
        shared_area,
        xattr_blkaddr: xattr_blkaddr as u32,
        total_blocks: next_block,
    })
}

/// Encodes one directory block (`BLOCK_BYTES`, zero-padded) into `buf`: the dirents,
/// then the names, each name ending where the next begins (the last at the first NUL or
/// the directory size).
fn dir_block(buf: &mut Vec<u8>, block: &[(&[u8], NodeId)], tree: &Tree, nids: &[u64]) {
    buf.clear();
    let mut nameoff = block.len() * format::DIRENT_BYTES;
    for &(name, child) in block {
        let nid = nids[child as usize];
        debug_assert_ne!(nid, u64::MAX);
        buf.extend_from_slice(&format::encode_dirent(
            nid,
            nameoff as u16,
            file_type(tree.node(child)),
        ));
        nameoff += name.len();
    }
    for &(name, _) in block {
        buf.extend_from_slice(name);
    }
    debug_assert!(buf.len() <= BLOCK_BYTES as usize);
    buf.resize(BLOCK_BYTES as usize, 0);
}

/// Streams the image block by block; holds block 0 until full to checksum it.
struct Sink<W: Write> {
    out: W,
    block: Vec<u8>,
    block_no: u64,
    fill: usize,
}

impl<W: Write> Sink<W> {
    fn new(out: W) -> Self {
        Sink {
            out,
            block: vec![0; BLOCK_BYTES as usize],
            block_no: 0,
            fill: 0,
        }
    }

    fn pos(&self) -> u64 {
        self.block_no * BLOCK_BYTES + self.fill as u64
    }

    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(self.block.len() - self.fill);
            self.block[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == self.block.len() {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn pad_to(&mut self, pos: u64) -> io::Result<()> {
        debug_assert!(
            pos >= self.pos(),
            "writer went backwards: {} > {pos}",
            self.pos()
        );
        // Bounded by the image size, which planning capped at 2^32 blocks.
        while self.pos() < pos {
            let n = (pos - self.pos()).min((self.block.len() - self.fill) as u64) as usize;
            self.block[self.fill..self.fill + n].fill(0);
            self.fill += n;
            if self.fill == self.block.len() {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block_no == 0 {
            let crc = format::superblock_checksum(&self.block);
            let at = format::SUPER_OFFSET + format::SUPER_CHECKSUM_OFFSET;
            self.block[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
        self.out.write_all(&self.block)?;
        self.block_no += 1;
        self.fill = 0;
        Ok(())
    }

    fn finish(mut self) -> io::Result<u64> {
        if self.fill != 0 {
            let end = align_up(self.pos(), BLOCK_BYTES);
            self.pad_to(end)?;
        }
        self.out.flush()?;
        Ok(self.pos())
    }
}

pub(super) fn write<W: Write>(
    tree: &Tree,
    opts: &ImageOptions,
    out: W,
) -> Result<ImageInfo, WriteError> {
    if !(CHUNK_BITS_MIN..=CHUNK_BITS_MAX).contains(&opts.chunk_bits) {
        return Err(WriteError::Unrepresentable(format!(
            "chunk_bits {} outside {CHUNK_BITS_MIN}..={CHUNK_BITS_MAX}",
            opts.chunk_bits
        )));
    }
    if opts.devices.len() >= usize::from(u16::MAX) {
        return Err(WriteError::Unrepresentable(format!(
            "{} devices, over 65534",
            opts.devices.len()
        )));
    }
    for (i, dev) in opts.devices.iter().enumerate() {
        let tag = dev.tag.as_bytes();
        if tag.is_empty() || tag.len() > DEVICE_TAG_MAX_BYTES || tag.contains(&0) {
            return Err(WriteError::Unrepresentable(format!(
                "device {} tag {:?}: want 1..=64 bytes without NUL",
                i + 1,
                dev.tag
            )));
        }
    }
    if !tree.node(Tree::ROOT).is_dir() {
        return Err(WriteError::Unrepresentable(
            "/: the root is not a directory".into(),
        ));
    }

    // First names of every node, for `..` and error messages (memory: one slot per node).
    let mut first: Vec<Option<(NodeId, &[u8])>> = vec![None; tree.arena_len()];
    for (id, _) in tree.reachable() {
        for (name, child) in tree.children(id) {
            if first[child as usize].is_none() && child != Tree::ROOT {
                first[child as usize] = Some((id, name));
            }
        }
    }
    let names = Names { first };
    let layout = plan(tree, opts, &names)?;

    let mut sink = Sink::new(io::BufWriter::with_capacity(1 << 16, out));
    let sb = format::SuperBlock {
        feature_compat: format::FEATURE_COMPAT_SB_CHKSUM,
        feature_incompat: format::FEATURE_INCOMPAT_CHUNKED_FILE
            | if opts.devices.is_empty() {
                0
            } else {
                format::FEATURE_INCOMPAT_DEVICE_TABLE
            },
        root_nid: layout.nids[Tree::ROOT as usize] as u16,
        inos: layout.inodes.len() as u64,
        build_time: opts.build_time,
        blocks: layout.total_blocks as u32,
        meta_blkaddr: 0,
        xattr_blkaddr: layout.xattr_blkaddr,
        extra_devices: opts.devices.len() as u16,
        devt_slotoff: if opts.devices.is_empty() {
            0
        } else {
            (DEVT_OFFSET / format::DEVICE_SLOT_BYTES as u64) as u16
        },
    };
    sink.pad_to(format::SUPER_OFFSET as u64)?;
    sink.write(&sb.encode())?;
    for dev in &opts.devices {
        sink.write(&format::encode_device_slot(dev.tag.as_bytes(), dev.blocks))?;
    }

    let mut buf = Vec::new();
    for p in &layout.inodes {
        sink.pad_to(p.pos)?;
        buf.clear();
        buf.resize(p.core.bytes(), 0);
        p.core.encode(&mut buf);
        if p.xattr_bytes > 0 {
            buf.extend_from_slice(&format::encode_xattr_ibody_header(p.shared.len() as u8));
            for sid in &p.shared {
                buf.extend_from_slice(&sid.to_le_bytes());
            }
            for x in &p.inline_xattrs {
                format::encode_xattr_entry(&mut buf, x.index, x.suffix, x.value);
            }
            debug_assert_eq!(buf.len(), p.core.bytes() + p.xattr_bytes);
        }
        sink.write(&buf)?;
        let node = tree.node(p.id);
        match (p.body, &node.kind) {
            (Body::Chunks(_), Kind::File(data)) => {
                sink.pad_to(align_up(sink.pos(), format::CHUNK_INDEX_BYTES as u64))?;
                for chunk in &data.chunks {
                    let idx = match *chunk {
                        ChunkAddr::Hole => format::encode_chunk_index(0, format::NULL_ADDR),
                        ChunkAddr::Blob { device, blkaddr } => {
                            format::encode_chunk_index(device, blkaddr)
                        }
                    };
                    sink.write(&idx)?;
                }
            }
            (Body::Inline(_), Kind::Symlink(target)) => sink.write(target)?,
            (Body::Inline(len), Kind::Dir(_)) => {
                let entries = dir_entries(tree, p.id, names.parent(p.id));
                dir_block(&mut buf, &entries, tree, &layout.nids);
                sink.write(&buf[..len])?;
            }
            _ => {}
        }
    }

    if !layout.shared_area.is_empty() {
        sink.pad_to(u64::from(layout.xattr_blkaddr) * BLOCK_BYTES)?;
        for x in &layout.shared_area {
            buf.clear();
            format::encode_xattr_entry(&mut buf, x.index, x.suffix, x.value);
            sink.write(&buf)?;
        }
    }

    for p in &layout.inodes {
        let Body::Blocks { count } = p.body else {
            continue;
        };
        sink.pad_to(u64::from(p.blkaddr) * BLOCK_BYTES)?;
        match &tree.node(p.id).kind {
            Kind::Dir(_) => {
                let entries = dir_entries(tree, p.id, names.parent(p.id));
                let (ends, _) = pack_dir(entries.iter().map(|(n, _)| n.len()));
                debug_assert_eq!(ends.len() as u64, count);
                let mut start = 0;
                for end in ends {
                    dir_block(&mut buf, &entries[start..end], tree, &layout.nids);
                    sink.write(&buf)?;
                    start = end;
                }
            }
            Kind::Symlink(target) => {
                sink.write(target)?;
                sink.pad_to(align_up(sink.pos(), BLOCK_BYTES))?;
            }
            _ => unreachable!("only directories and symlinks have data blocks"),
        }
    }
    let bytes = sink.finish()?;
    debug_assert_eq!(bytes, layout.total_blocks * BLOCK_BYTES);
    Ok(ImageInfo {
        bytes,
        inodes: layout.inodes.len() as u64,
    })
}
