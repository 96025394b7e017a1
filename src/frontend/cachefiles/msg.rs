//! The checked parser of on-demand messages, and their encoder (used by the simulator
//! and the fuzz target). The parser trusts no length field: the header's `len` must equal
//! the bytes read, every key size must fit the payload exactly, and the volume key must
//! end with its NUL.

use super::abi::{
    CACHEFILES_MSG_MAX_SIZE, CACHEFILES_OP_CLOSE, CACHEFILES_OP_OPEN, CACHEFILES_OP_READ,
    MSG_HEADER_BYTES, OPEN_HEADER_BYTES, READ_BYTES,
};

/// One message from `/dev/cachefiles`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Open an object: answer with `copen msg_id,size` (or a negative errno).
    Open {
        /// Request id for the `copen` reply.
        msg_id: u32,
        /// The object later READs and the CLOSE name.
        object_id: u32,
        /// Volume key without its NUL, e.g. `erofs,<domain or fsid>`.
        volume_key: String,
        /// Cookie key: the blob name.
        cookie_key: String,
        /// The anon fd the kernel installed in our fd table for this object.
        fd: u32,
        /// Reserved flags.
        flags: u32,
    },
    /// Fill `[off, off + len)` of the object's cache file, then READ_COMPLETE `msg_id`.
    Read {
        /// Request id for READ_COMPLETE.
        msg_id: u32,
        /// The object.
        object_id: u32,
        /// Offset of the range.
        off: u64,
        /// Length of the range.
        len: u64,
    },
    /// The object is gone: close its fds.
    Close {
        /// The object.
        object_id: u32,
    },
}

/// Why bytes from the device are not a valid message. Each variant is one rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsgError {
    /// Fewer bytes than the 16-byte header.
    #[error("message of {got} bytes is shorter than its 16-byte header")]
    ShortHeader {
        /// Bytes read.
        got: usize,
    },
    /// More bytes than any message can have.
    #[error("message of {got} bytes exceeds CACHEFILES_MSG_MAX_SIZE")]
    TooLong {
        /// Bytes read.
        got: usize,
    },
    /// The header's `len` is not the number of bytes read.
    #[error("message header says {claimed} bytes but {got} were read")]
    LenMismatch {
        /// The header's `len`.
        claimed: u32,
        /// Bytes read.
        got: usize,
    },
    /// An opcode this daemon does not know.
    #[error("message {msg_id} has unknown opcode {opcode}")]
    UnknownOpcode {
        /// Request id.
        msg_id: u32,
        /// The opcode.
        opcode: u32,
    },
    /// The payload is not the size the opcode defines.
    #[error("{op} message {msg_id} has a payload of {got} bytes, the opcode needs {want}")]
    BadPayload {
        /// Opcode name.
        op: &'static str,
        /// Request id.
        msg_id: u32,
        /// Payload bytes.
        got: usize,
        /// Bytes the opcode needs (a minimum for OPEN).
        want: usize,
    },
    /// OPEN key sizes do not add up to the payload.
    #[error(
        "OPEN {msg_id}: volume key {volume} + cookie key {cookie} bytes != {rest} bytes of keys"
    )]
    KeySizes {
        /// Request id.
        msg_id: u32,
        /// Claimed volume key size.
        volume: u32,
        /// Claimed cookie key size.
        cookie: u32,
        /// Bytes actually present after the OPEN header.
        rest: usize,
    },
    /// The volume key is empty, lacks its trailing NUL, or has one inside.
    #[error("OPEN {msg_id}: volume key is not a NUL-terminated string")]
    VolumeKeyNul {
        /// Request id.
        msg_id: u32,
    },
    /// A key is not UTF-8 (or the cookie key is empty or holds a NUL).
    #[error("OPEN {msg_id}: {which} key is not a valid name")]
    BadKey {
        /// Request id.
        msg_id: u32,
        /// "volume" or "cookie".
        which: &'static str,
    },
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_ne_bytes(w)
}

/// The request id and opcode of `buf`, if it holds a whole header.
pub fn peek_header(buf: &[u8]) -> Option<(u32, u32)> {
    (buf.len() >= MSG_HEADER_BYTES).then(|| (u32_at(buf, 0), u32_at(buf, 4)))
}

/// Parses exactly one message: `buf` is what one `read(2)` returned.
pub fn parse(buf: &[u8]) -> Result<Msg, MsgError> {
    let got = buf.len();
    if got < MSG_HEADER_BYTES {
        return Err(MsgError::ShortHeader { got });
    }
    if got > CACHEFILES_MSG_MAX_SIZE {
        return Err(MsgError::TooLong { got });
    }
    let msg_id = u32_at(buf, 0);
    let opcode = u32_at(buf, 4);
    let claimed = u32_at(buf, 8);
    let object_id = u32_at(buf, 12);
    if claimed as usize != got {
        return Err(MsgError::LenMismatch { claimed, got });
    }
    let payload = &buf[MSG_HEADER_BYTES..];
    let exact = |op, want: usize| {
        if payload.len() == want {
            Ok(())
        } else {
            Err(MsgError::BadPayload {
                op,
                msg_id,
                got: payload.len(),
                want,
            })
        }
    };
    match opcode {
        CACHEFILES_OP_OPEN => {
            if payload.len() < OPEN_HEADER_BYTES {
                return Err(MsgError::BadPayload {
                    op: "OPEN",
                    msg_id,
                    got: payload.len(),
                    want: OPEN_HEADER_BYTES,
                });
            }
            let volume = u32_at(payload, 0);
            let cookie = u32_at(payload, 4);
            let fd = u32_at(payload, 8);
            let flags = u32_at(payload, 12);
            let keys = &payload[OPEN_HEADER_BYTES..];
            let rest = keys.len();
            let sizes_fit = (volume as usize)
                .checked_add(cookie as usize)
                .is_some_and(|sum| sum == rest);
            if !sizes_fit {
                return Err(MsgError::KeySizes {
                    msg_id,
                    volume,
                    cookie,
                    rest,
                });
            }
            let (vkey, ckey) = keys.split_at(volume as usize);
            let Some((&0, vbody)) = vkey.split_last() else {
                return Err(MsgError::VolumeKeyNul { msg_id });
            };
            if vbody.contains(&0) {
                return Err(MsgError::VolumeKeyNul { msg_id });
            }
            let volume_key = std::str::from_utf8(vbody).map_err(|_| MsgError::BadKey {
                msg_id,
                which: "volume",
            })?;
            if ckey.is_empty() || ckey.contains(&0) {
                return Err(MsgError::BadKey {
                    msg_id,
                    which: "cookie",
                });
            }
            let cookie_key = std::str::from_utf8(ckey).map_err(|_| MsgError::BadKey {
                msg_id,
                which: "cookie",
            })?;
            Ok(Msg::Open {
                msg_id,
                object_id,
                volume_key: volume_key.to_string(),
                cookie_key: cookie_key.to_string(),
                fd,
                flags,
            })
        }
        CACHEFILES_OP_CLOSE => {
            exact("CLOSE", 0)?;
            Ok(Msg::Close { object_id })
        }
        CACHEFILES_OP_READ => {
            exact("READ", READ_BYTES)?;
            Ok(Msg::Read {
                msg_id,
                object_id,
                off: u64_at(payload, 0),
                len: u64_at(payload, 8),
            })
        }
        _ => Err(MsgError::UnknownOpcode { msg_id, opcode }),
    }
}

fn header(out: &mut Vec<u8>, msg_id: u32, opcode: u32, len: usize, object_id: u32) {
    out.clear();
    out.extend_from_slice(&msg_id.to_ne_bytes());
    out.extend_from_slice(&opcode.to_ne_bytes());
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&object_id.to_ne_bytes());
}

/// Encodes an OPEN exactly as the kernel lays it out: `volume_key` gets its NUL appended.
/// Returns `None` when the keys do not fit in [`CACHEFILES_MSG_MAX_SIZE`].
pub fn encode_open(
    msg_id: u32,
    object_id: u32,
    volume_key: &str,
    cookie_key: &[u8],
    fd: u32,
    flags: u32,
) -> Option<Vec<u8>> {
    let vlen = volume_key.len() + 1;
    let len = MSG_HEADER_BYTES + OPEN_HEADER_BYTES + vlen + cookie_key.len();
    if len > CACHEFILES_MSG_MAX_SIZE {
        return None;
    }
    let mut out = Vec::with_capacity(len);
    header(&mut out, msg_id, CACHEFILES_OP_OPEN, len, object_id);
    out.extend_from_slice(&(vlen as u32).to_ne_bytes());
    out.extend_from_slice(&(cookie_key.len() as u32).to_ne_bytes());
    out.extend_from_slice(&fd.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(volume_key.as_bytes());
    out.push(0);
    out.extend_from_slice(cookie_key);
    Some(out)
}

/// Byte offset of the fd field in an encoded OPEN (the kernel fills it at read time).
pub const OPEN_FD_OFFSET: usize = MSG_HEADER_BYTES + 8;

/// Encodes a READ.
pub fn encode_read(msg_id: u32, object_id: u32, off: u64, len: u64) -> Vec<u8> {
    let total = MSG_HEADER_BYTES + READ_BYTES;
    let mut out = Vec::with_capacity(total);
    header(&mut out, msg_id, CACHEFILES_OP_READ, total, object_id);
    out.extend_from_slice(&off.to_ne_bytes());
    out.extend_from_slice(&len.to_ne_bytes());
    out
}

/// Encodes a CLOSE (the kernel gives it a msg_id too, though nothing answers it).
pub fn encode_close(msg_id: u32, object_id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(MSG_HEADER_BYTES);
    header(
        &mut out,
        msg_id,
        CACHEFILES_OP_CLOSE,
        MSG_HEADER_BYTES,
        object_id,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_messages_parse_back() {
        let open = encode_open(7, 3, "erofs,dom", b"abc", 42, 0).unwrap();
        assert_eq!(open.len(), 16 + 16 + 10 + 3);
        assert_eq!(
            parse(&open).unwrap(),
            Msg::Open {
                msg_id: 7,
                object_id: 3,
                volume_key: "erofs,dom".into(),
                cookie_key: "abc".into(),
                fd: 42,
                flags: 0
            }
        );
        assert_eq!(
            parse(&encode_read(9, 3, 4096, 65536)).unwrap(),
            Msg::Read {
                msg_id: 9,
                object_id: 3,
                off: 4096,
                len: 65536
            }
        );
        assert_eq!(
            parse(&encode_close(1, 3)).unwrap(),
            Msg::Close { object_id: 3 }
        );
    }

    #[test]
    fn every_rule_is_enforced() {
        assert_eq!(parse(&[0; 15]), Err(MsgError::ShortHeader { got: 15 }));
        assert!(matches!(
            parse(&[0; 1025]),
            Err(MsgError::TooLong { got: 1025 })
        ));
        let mut read = encode_read(1, 1, 0, 4096);
        read[8] = 64; // claims 64 bytes, 32 read
        assert!(matches!(parse(&read), Err(MsgError::LenMismatch { .. })));
        let mut bad_op = encode_close(1, 1);
        bad_op[4] = 9;
        assert!(matches!(
            parse(&bad_op),
            Err(MsgError::UnknownOpcode { opcode: 9, .. })
        ));
        let mut short_read = encode_read(1, 1, 0, 4096);
        short_read.truncate(24);
        short_read[8] = 24;
        assert!(matches!(
            parse(&short_read),
            Err(MsgError::BadPayload { .. })
        ));
        let mut close_payload = encode_close(1, 1);
        close_payload.extend_from_slice(&[0; 4]);
        close_payload[8] = 20;
        assert!(matches!(
            parse(&close_payload),
            Err(MsgError::BadPayload { .. })
        ));
        // Key sizes that overflow or overrun the payload.
        let mut open = encode_open(1, 1, "erofs,x", b"blob", 5, 0).unwrap();
        open[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse(&open), Err(MsgError::KeySizes { .. })));
        let mut open = encode_open(1, 1, "erofs,x", b"blob", 5, 0).unwrap();
        open[20..24].copy_from_slice(&5u32.to_ne_bytes());
        assert!(matches!(parse(&open), Err(MsgError::KeySizes { .. })));
        // Volume key without NUL (shift one byte from cookie to volume).
        let mut open = encode_open(1, 1, "erofs,x", b"blob", 5, 0).unwrap();
        open[16..20].copy_from_slice(&9u32.to_ne_bytes());
        open[20..24].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(parse(&open), Err(MsgError::VolumeKeyNul { .. })));
        // Interior NUL.
        let mut open = encode_open(1, 1, "erofs,x", b"blob", 5, 0).unwrap();
        open[32 + 2] = 0;
        assert!(matches!(parse(&open), Err(MsgError::VolumeKeyNul { .. })));
        // Empty cookie key.
        let open = encode_open(1, 1, "erofs,x", b"", 5, 0).unwrap();
        assert!(matches!(parse(&open), Err(MsgError::BadKey { .. })));
        // Non-UTF-8 cookie key.
        let open = encode_open(1, 1, "erofs,x", &[0xff, 0xfe], 5, 0).unwrap();
        assert!(matches!(parse(&open), Err(MsgError::BadKey { .. })));
        // Keys too long for one message.
        assert!(encode_open(1, 1, "v", &[b'a'; 1000], 5, 0).is_none());
    }
}
