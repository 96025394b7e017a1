//! On-disk structures of EROFS (`fs/erofs/erofs_fs.h`), as little-endian encoders.
//!
//! Only what the writer emits is here: the superblock, compact and extended inodes,
//! xattr headers and entries, chunk indexes, directory entries and device slots. Each
//! encoder writes exactly the struct's on-disk size; the sizes are checked at compile
//! time against the header's `BUILD_BUG_ON`s.

/// Block size: 4 KiB, the only size fscache and file-backed mounts accept on x86.
pub const BLOCK_BITS: u8 = 12;
/// Block size in bytes.
pub const BLOCK_BYTES: u64 = 1 << BLOCK_BITS;
/// The superblock lives at this byte offset of block 0.
pub const SUPER_OFFSET: usize = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;

/// `EROFS_FEATURE_COMPAT_SB_CHKSUM`: crc32c of the superblock block.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// `EROFS_FEATURE_INCOMPAT_CHUNKED_FILE`.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `EROFS_FEATURE_INCOMPAT_DEVICE_TABLE`.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;

/// Sizes of the structs, as the kernel header asserts them.
pub const SUPER_BYTES: usize = 128;
/// `struct erofs_inode_compact`.
pub const INODE_COMPACT_BYTES: usize = 32;
/// `struct erofs_inode_extended`.
pub const INODE_EXTENDED_BYTES: usize = 64;
/// `struct erofs_xattr_ibody_header`.
pub const XATTR_IBODY_HEADER_BYTES: usize = 12;
/// `struct erofs_xattr_entry` (without name and value).
pub const XATTR_ENTRY_BYTES: usize = 4;
/// `struct erofs_inode_chunk_index`.
pub const CHUNK_INDEX_BYTES: usize = 8;
/// `struct erofs_dirent`.
pub const DIRENT_BYTES: usize = 12;
/// `struct erofs_deviceslot`.
pub const DEVICE_SLOT_BYTES: usize = 128;
/// Inodes are addressed in 32-byte slots: `nid = byte offset / 32` (meta_blkaddr 0).
pub const INODE_SLOT_BYTES: u64 = 32;

const _: () = assert!(INODE_SLOT_BYTES as usize == INODE_COMPACT_BYTES);
const _: () = assert!(INODE_EXTENDED_BYTES == 2 * INODE_COMPACT_BYTES);
const _: () = assert!(SUPER_OFFSET + SUPER_BYTES <= BLOCK_BYTES as usize);
const _: () = assert!(DIRENT_BYTES + NAME_MAX_BYTES <= BLOCK_BYTES as usize);

/// `EROFS_NAME_LEN`.
pub const NAME_MAX_BYTES: usize = 255;
/// `EROFS_NULL_ADDR`: a chunk index with this block address is a hole.
pub const NULL_ADDR: u32 = u32::MAX;

/// `i_format` version bit: 0 compact, 1 extended.
pub const INODE_LAYOUT_EXTENDED: u16 = 1;
/// `EROFS_I_DATALAYOUT_BIT`.
pub const INODE_DATALAYOUT_BIT: u16 = 1;
/// `EROFS_INODE_FLAT_PLAIN`: data in consecutive blocks at `raw_blkaddr`.
pub const DATALAYOUT_FLAT_PLAIN: u16 = 0;
/// `EROFS_INODE_FLAT_INLINE`: the tail (here: all) of the data follows the inode.
pub const DATALAYOUT_FLAT_INLINE: u16 = 2;
/// `EROFS_INODE_CHUNK_BASED`: an array of chunk indexes follows the inode.
pub const DATALAYOUT_CHUNK_BASED: u16 = 4;
/// `EROFS_CHUNK_FORMAT_INDEXES`: 8-byte indexes carrying a device id.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// `EROFS_CHUNK_FORMAT_BLKBITS_MASK`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;

/// Xattr name indexes (`EROFS_XATTR_INDEX_*`).
pub const XATTR_INDEX_USER: u8 = 1;
/// `system.posix_acl_access` (the whole name; the suffix is empty).
pub const XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
/// `system.posix_acl_default` (the whole name; the suffix is empty).
pub const XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
/// `trusted.`.
pub const XATTR_INDEX_TRUSTED: u8 = 4;
/// `security.`.
pub const XATTR_INDEX_SECURITY: u8 = 6;

/// Directory entry file types (`EROFS_FT_*`, the generic `FT_*` values).
pub mod ft {
    /// Regular file.
    pub const REG_FILE: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHRDEV: u8 = 3;
    /// Block device.
    pub const BLKDEV: u8 = 4;
    /// Named pipe.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

/// `S_IF*` file type bits of `i_mode`.
pub mod s_if {
    /// Socket.
    pub const SOCK: u16 = 0o140000;
    /// Symbolic link.
    pub const LNK: u16 = 0o120000;
    /// Regular file.
    pub const REG: u16 = 0o100000;
    /// Block device.
    pub const BLK: u16 = 0o060000;
    /// Directory.
    pub const DIR: u16 = 0o040000;
    /// Character device.
    pub const CHR: u16 = 0o020000;
    /// Named pipe.
    pub const FIFO: u16 = 0o010000;
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The fields of `struct erofs_super_block` the writer sets; the rest are zero.
#[derive(Clone, Debug, Default)]
pub struct SuperBlock {
    /// `feature_compat`.
    pub feature_compat: u32,
    /// `feature_incompat`.
    pub feature_incompat: u32,
    /// `root_nid`.
    pub root_nid: u16,
    /// `inos`: number of inodes.
    pub inos: u64,
    /// `build_time`: the mtime of compact inodes.
    pub build_time: u64,
    /// `blocks`: size of the primary device (the image) in blocks.
    pub blocks: u32,
    /// `meta_blkaddr`: where nid 0 lives.
    pub meta_blkaddr: u32,
    /// `xattr_blkaddr`: start of the shared xattr area.
    pub xattr_blkaddr: u32,
    /// `extra_devices`.
    pub extra_devices: u16,
    /// `devt_slotoff`: device table byte offset / 128.
    pub devt_slotoff: u16,
}

impl SuperBlock {
    /// Encodes the 128-byte superblock with a zero checksum.
    pub fn encode(&self) -> [u8; SUPER_BYTES] {
        let mut b = [0u8; SUPER_BYTES];
        put32(&mut b, 0, SUPER_MAGIC);
        // 4: checksum, filled in over the whole block once it is complete.
        put32(&mut b, 8, self.feature_compat);
        b[12] = BLOCK_BITS;
        b[13] = 0; // sb_extslots
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.build_time);
        put32(&mut b, 32, 0); // build_time_nsec
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        // 48..64 uuid, 64..80 volume_name: zero (reproducible images).
        put32(&mut b, 80, self.feature_incompat);
        // 84: available_compr_algs / lz4_max_distance: zero, nothing is compressed.
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        b[90] = 0; // dirblkbits: directory blocks are filesystem blocks
        b
    }
}

/// Byte offset of the checksum field inside the superblock.
pub const SUPER_CHECKSUM_OFFSET: usize = 4;

/// Everything an inode core needs (compact or extended).
#[derive(Clone, Debug, Default)]
pub struct InodeCore {
    /// Extended (64 B) rather than compact (32 B).
    pub extended: bool,
    /// One of the `DATALAYOUT_*` values.
    pub datalayout: u16,
    /// `i_xattr_icount`.
    pub xattr_icount: u16,
    /// `i_mode`: file type and permission bits.
    pub mode: u16,
    /// `i_nlink`.
    pub nlink: u32,
    /// `i_size`.
    pub size: u64,
    /// `i_u`: raw_blkaddr, rdev or chunk format, by type.
    pub i_u: u32,
    /// `i_ino`: a 32-bit inode number for old stat calls.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Extended only: mtime seconds.
    pub mtime: i64,
    /// Extended only: mtime nanoseconds.
    pub mtime_nsec: u32,
}

impl InodeCore {
    /// On-disk size of this inode core.
    pub fn bytes(&self) -> usize {
        if self.extended {
            INODE_EXTENDED_BYTES
        } else {
            INODE_COMPACT_BYTES
        }
    }

    /// Encodes the inode into `b` (`self.bytes()` long). The caller has checked that the
    /// values fit the chosen version: compact truncation here would be a writer bug.
    pub fn encode(&self, b: &mut [u8]) {
        debug_assert_eq!(b.len(), self.bytes());
        b.fill(0);
        let version = u16::from(self.extended) * INODE_LAYOUT_EXTENDED;
        put16(b, 0, version | (self.datalayout << INODE_DATALAYOUT_BIT));
        put16(b, 2, self.xattr_icount);
        put16(b, 4, self.mode);
        if self.extended {
            // 6: i_reserved (startblk_hi in newer kernels): zero.
            put64(b, 8, self.size);
            put32(b, 16, self.i_u);
            put32(b, 20, self.ino);
            put32(b, 24, self.uid);
            put32(b, 28, self.gid);
            put64(b, 32, self.mtime as u64);
            put32(b, 40, self.mtime_nsec);
            put32(b, 44, self.nlink);
        } else {
            debug_assert!(self.nlink <= u32::from(u16::MAX));
            debug_assert!(self.size <= u64::from(u32::MAX));
            put16(b, 6, self.nlink as u16);
            put32(b, 8, self.size as u32);
            // 12: i_reserved (mtime delta from build_time in newer kernels): zero.
            put32(b, 16, self.i_u);
            put32(b, 20, self.ino);
            put16(b, 24, self.uid as u16);
            put16(b, 26, self.gid as u16);
        }
    }
}

/// `new_encode_dev()`: 12-bit major, 20-bit minor, as the kernel's `new_decode_dev` reads.
/// None if the numbers do not fit the kernel's `dev_t`.
pub fn encode_dev(major: u32, minor: u32) -> Option<u32> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Encodes an 8-byte chunk index.
pub fn encode_chunk_index(device_id: u16, blkaddr: u32) -> [u8; CHUNK_INDEX_BYTES] {
    let mut b = [0u8; CHUNK_INDEX_BYTES];
    // 0: advise, always 0.
    put16(&mut b, 2, device_id);
    put32(&mut b, 4, blkaddr);
    b
}

/// Encodes a 12-byte directory entry.
pub fn encode_dirent(nid: u64, nameoff: u16, file_type: u8) -> [u8; DIRENT_BYTES] {
    let mut b = [0u8; DIRENT_BYTES];
    put64(&mut b, 0, nid);
    put16(&mut b, 8, nameoff);
    b[10] = file_type;
    b
}

/// Encodes a 128-byte device slot (`mapped_blkaddr` 0: the blob is its own device).
pub fn encode_device_slot(tag: &[u8], blocks: u32) -> [u8; DEVICE_SLOT_BYTES] {
    let mut b = [0u8; DEVICE_SLOT_BYTES];
    b[..tag.len()].copy_from_slice(tag);
    put32(&mut b, 64, blocks);
    b
}

/// Encodes the 12-byte inline xattr body header (`h_name_filter` 0: no filter feature).
pub fn encode_xattr_ibody_header(shared_count: u8) -> [u8; XATTR_IBODY_HEADER_BYTES] {
    let mut b = [0u8; XATTR_IBODY_HEADER_BYTES];
    b[4] = shared_count;
    b
}

/// Bytes of one xattr entry with its name suffix and value, padded to 4.
pub fn xattr_entry_bytes(suffix_len: usize, value_len: usize) -> usize {
    align_up((XATTR_ENTRY_BYTES + suffix_len + value_len) as u64, 4) as usize
}

/// Appends one xattr entry (header, suffix, value, zero padding to 4) to `out`.
pub fn encode_xattr_entry(out: &mut Vec<u8>, index: u8, suffix: &[u8], value: &[u8]) {
    debug_assert!(suffix.len() <= usize::from(u8::MAX));
    debug_assert!(value.len() <= usize::from(u16::MAX));
    let start = out.len();
    out.push(suffix.len() as u8);
    out.push(index);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(start + xattr_entry_bytes(suffix.len(), value.len()), 0);
}

/// The kernel's `crc32c(seed, data)`: reflected Castagnoli polynomial, no final inversion.
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = seed;
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The superblock checksum over block 0 (`bytes[1024..4096]`, checksum field zeroed):
/// `crc32c(~0, ...)` exactly as `erofs_superblock_csum_verify` computes it.
pub fn superblock_checksum(block0: &[u8]) -> u32 {
    debug_assert_eq!(block0.len(), BLOCK_BYTES as usize);
    let mut copy = block0[SUPER_OFFSET..].to_vec();
    copy[SUPER_CHECKSUM_OFFSET..SUPER_CHECKSUM_OFFSET + 4].fill(0);
    crc32c(!0, &copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The standard CRC-32C check value is the inverted register after "123456789".
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(!0, b""), !0);
    }

    #[test]
    fn dev_encoding_matches_new_encode_dev() {
        assert_eq!(encode_dev(0, 0), Some(0));
        assert_eq!(encode_dev(1, 3), Some(0x103));
        // minor 0x12345: low byte stays low, the rest goes above the major.
        assert_eq!(
            encode_dev(8, 0x12345),
            Some(0x45 | (8 << 8) | (0x123 << 20))
        );
        assert_eq!(encode_dev(4095, (1 << 20) - 1), Some(0xffff_ffff));
        assert_eq!(encode_dev(4096, 0), None);
        assert_eq!(encode_dev(0, 1 << 20), None);
    }

    #[test]
    fn inode_encodings_have_the_header_layout() {
        let core = InodeCore {
            extended: true,
            datalayout: DATALAYOUT_CHUNK_BASED,
            xattr_icount: 3,
            mode: s_if::REG | 0o4755,
            nlink: 70000,
            size: 5 << 30,
            i_u: u32::from(CHUNK_FORMAT_INDEXES | 4),
            ino: 7,
            uid: 100_000,
            gid: 200_000,
            mtime: -2,
            mtime_nsec: 999_999_999,
        };
        let mut b = vec![0u8; core.bytes()];
        core.encode(&mut b);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 1 | (4 << 1));
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 5 << 30);
        assert_eq!(i64::from_le_bytes(b[32..40].try_into().unwrap()), -2);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 70000);
        let compact = InodeCore {
            extended: false,
            nlink: 2,
            size: 4096,
            uid: 65535,
            ..core
        };
        let mut c = vec![0u8; compact.bytes()];
        compact.encode(&mut c);
        assert_eq!(c.len(), 32);
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), 4 << 1);
        assert_eq!(u16::from_le_bytes([c[24], c[25]]), 65535);
    }

    #[test]
    fn xattr_entries_are_padded_to_four() {
        let mut out = Vec::new();
        encode_xattr_entry(&mut out, XATTR_INDEX_USER, b"ab", b"c");
        assert_eq!(out, vec![2, 1, 1, 0, b'a', b'b', b'c', 0]);
        assert_eq!(xattr_entry_bytes(2, 1), 8);
        assert_eq!(xattr_entry_bytes(0, 0), 4);
    }
}
