//! Parser of the event buffers `read(2)` returns on a fanotify group fd. Untrusted
//! input in the sense that no length field is believed before it is checked against
//! the buffer: a bad buffer gives an error, never a panic or an out-of-bounds read.

use super::sys::{
    EVENT_METADATA_BYTES, FANOTIFY_METADATA_VERSION, FAN_EVENT_INFO_TYPE_RANGE, INFO_HEADER_BYTES,
    INFO_RANGE_BYTES,
};

/// One event, as far as the front end cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Event bits.
    pub mask: u64,
    /// The event's fd (negative: none or an error).
    pub fd: i32,
    /// The accessing process.
    pub pid: i32,
    /// `(offset, count)` of a pre-content event's range record, if it had one.
    pub range: Option<(u64, u64)>,
}

/// Why a buffer could not be parsed past some point.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes left than an event header.
    #[error("event buffer: {left} bytes left at offset {at}, less than an event header")]
    Short {
        /// Offset in the buffer.
        at: usize,
        /// Bytes left.
        left: usize,
    },
    /// An event's lengths do not fit the buffer or each other.
    #[error("event at offset {at}: event_len {event_len} / metadata_len {metadata_len} do not fit {left} bytes")]
    BadLength {
        /// Offset in the buffer.
        at: usize,
        /// The event's length field.
        event_len: u32,
        /// The metadata length field.
        metadata_len: u16,
        /// Bytes left.
        left: usize,
    },
    /// Metadata version we do not understand.
    #[error("event at offset {at}: metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}")]
    Version {
        /// Offset in the buffer.
        at: usize,
        /// The version found.
        vers: u8,
    },
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Parses every event of `buf` into `out` (appended). On an error the events before the
/// bad one are in `out`; the caller answers them and reports the rest.
///
/// The fanotify ABI is native-endian; this crate only targets little-endian Linux.
pub fn parse(buf: &[u8], out: &mut Vec<Event>) -> Result<(), ParseError> {
    const _: () = assert!(cfg!(target_endian = "little"));
    let mut at = 0usize;
    // Bounded: every iteration consumes at least EVENT_METADATA_BYTES.
    while at < buf.len() {
        let left = buf.len() - at;
        if left < EVENT_METADATA_BYTES {
            return Err(ParseError::Short { at, left });
        }
        let ev = &buf[at..];
        let event_len = u32_at(ev, 0);
        let vers = ev[4];
        let metadata_len = u16_at(ev, 6);
        if (event_len as usize) < EVENT_METADATA_BYTES
            || (event_len as usize) > left
            || (metadata_len as usize) < EVENT_METADATA_BYTES
            || metadata_len as u32 > event_len
        {
            return Err(ParseError::BadLength {
                at,
                event_len,
                metadata_len,
                left,
            });
        }
        if vers != FANOTIFY_METADATA_VERSION {
            return Err(ParseError::Version { at, vers });
        }
        let ev = &ev[..event_len as usize];
        let mask = u64_at(ev, 8);
        let fd = u32_at(ev, 16) as i32;
        let pid = u32_at(ev, 20) as i32;
        let mut range = None;
        // Info records, each bounded by the event; a malformed one ends the walk of this
        // event (the event itself is kept, without a range, and gets denied).
        let mut i = metadata_len as usize;
        while ev.len() - i >= INFO_HEADER_BYTES {
            let info_type = ev[i];
            let len = u16_at(ev, i + 2) as usize;
            if len < INFO_HEADER_BYTES || len > ev.len() - i {
                range = None;
                break;
            }
            if info_type == FAN_EVENT_INFO_TYPE_RANGE && len >= INFO_RANGE_BYTES {
                range = Some((u64_at(ev, i + 8), u64_at(ev, i + 16)));
            }
            i += len;
        }
        out.push(Event {
            mask,
            fd,
            pid,
            range,
        });
        at += event_len as usize;
    }
    Ok(())
}

/// Encodes an event as the kernel would (for tests and fuzzing).
pub fn encode(ev: &Event, out: &mut Vec<u8>) {
    let len = EVENT_METADATA_BYTES
        + if ev.range.is_some() {
            INFO_RANGE_BYTES
        } else {
            0
        };
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(FANOTIFY_METADATA_VERSION);
    out.push(0);
    out.extend_from_slice(&(EVENT_METADATA_BYTES as u16).to_le_bytes());
    out.extend_from_slice(&ev.mask.to_le_bytes());
    out.extend_from_slice(&ev.fd.to_le_bytes());
    out.extend_from_slice(&ev.pid.to_le_bytes());
    if let Some((offset, count)) = ev.range {
        out.push(FAN_EVENT_INFO_TYPE_RANGE);
        out.push(0);
        out.extend_from_slice(&(INFO_RANGE_BYTES as u16).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frontend::fanotify::sys::FAN_PRE_ACCESS;

    fn ev(fd: i32, range: Option<(u64, u64)>) -> Event {
        Event {
            mask: FAN_PRE_ACCESS,
            fd,
            pid: 42,
            range,
        }
    }

    #[test]
    fn parses_a_batch_with_and_without_ranges() {
        let evs = [ev(5, Some((4096, 65536))), ev(6, None), ev(7, Some((0, 1)))];
        let mut buf = Vec::new();
        for e in &evs {
            encode(e, &mut buf);
        }
        let mut out = Vec::new();
        parse(&buf, &mut out).unwrap();
        assert_eq!(out, evs);
    }

    #[test]
    fn skips_unknown_info_records_and_keeps_the_range() {
        let mut buf = Vec::new();
        encode(&ev(9, Some((8192, 100))), &mut buf);
        // Insert an unknown 8-byte record before the range record.
        let unknown = [99u8, 0, 8, 0, 1, 2, 3, 4];
        buf.splice(24..24, unknown);
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_le_bytes());
        let mut out = Vec::new();
        parse(&buf, &mut out).unwrap();
        assert_eq!(out, [ev(9, Some((8192, 100)))]);
    }

    #[test]
    fn refuses_lengths_that_lie() {
        let mut good = Vec::new();
        encode(&ev(3, Some((0, 4096))), &mut good);
        let mut out = Vec::new();

        let mut too_long = good.clone();
        too_long[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            parse(&too_long, &mut out),
            Err(ParseError::BadLength { .. })
        ));

        let mut too_short = good.clone();
        too_short[0..4].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            parse(&too_short, &mut out),
            Err(ParseError::BadLength { .. })
        ));

        let mut meta_past_event = good.clone();
        meta_past_event[6..8].copy_from_slice(&200u16.to_le_bytes());
        assert!(parse(&meta_past_event, &mut out).is_err());

        let mut version = good.clone();
        version[4] = 2;
        assert!(matches!(
            parse(&version, &mut out),
            Err(ParseError::Version { .. })
        ));

        assert!(matches!(
            parse(&good[..10], &mut out),
            Err(ParseError::Short { .. })
        ));

        // An info record whose length runs past the event: the event stays, rangeless.
        let mut bad_info = good.clone();
        bad_info[26..28].copy_from_slice(&64u16.to_le_bytes());
        out.clear();
        parse(&bad_info, &mut out).unwrap();
        assert_eq!(out, [ev(3, None)]);

        // A zero-length info record must not loop forever.
        let mut zero_info = good;
        zero_info[26..28].copy_from_slice(&0u16.to_le_bytes());
        out.clear();
        parse(&zero_info, &mut out).unwrap();
        assert_eq!(out[0].range, None);
    }

    #[test]
    fn events_before_a_bad_one_are_returned() {
        let mut buf = Vec::new();
        encode(&ev(3, Some((0, 1))), &mut buf);
        encode(&ev(4, Some((0, 1))), &mut buf);
        buf.truncate(buf.len() - 5);
        let mut out = Vec::new();
        assert!(parse(&buf, &mut out).is_err());
        assert_eq!(out, [ev(3, Some((0, 1)))]);
    }

    proptest! {
        // Fuzz: arbitrary bytes never panic, and every event returned lies inside the
        // buffer (at most one per 24 bytes).
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            let _ = parse(&buf, &mut out);
            prop_assert!(out.len() <= buf.len() / EVENT_METADATA_BYTES);
        }

        // Mutating one byte of a valid batch never panics either.
        #[test]
        fn mutated_batches_never_panic(
            n in 1usize..6, pos in any::<usize>(), byte in any::<u8>()
        ) {
            let mut buf = Vec::new();
            for i in 0..n {
                encode(&ev(i as i32, Some((i as u64 * 4096, 4096))), &mut buf);
            }
            let p = pos % buf.len();
            buf[p] = byte;
            let mut out = Vec::new();
            let _ = parse(&buf, &mut out);
            prop_assert!(out.len() <= n);
        }

        #[test]
        fn well_formed_batches_round_trip(
            evs in proptest::collection::vec(
                (any::<u64>(), any::<i32>(), any::<i32>(),
                 proptest::option::of((any::<u64>(), any::<u64>()))), 0..20)
        ) {
            let evs: Vec<Event> = evs.into_iter()
                .map(|(mask, fd, pid, range)| Event { mask, fd, pid, range })
                .collect();
            let mut buf = Vec::new();
            for e in &evs { encode(e, &mut buf); }
            let mut out = Vec::new();
            parse(&buf, &mut out).unwrap();
            prop_assert_eq!(out, evs);
        }
    }
}
