//! Fuzzes the cachefiles message parser: any bytes either fail with an error or parse
//! into a message that re-encodes to exactly the same bytes.
#![no_main]

use dedupd::frontend::cachefiles::msg::{encode_close, encode_open, encode_read, parse, Msg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = parse(data) else {
        return;
    };
    let msg_id = u32::from_ne_bytes(data[0..4].try_into().unwrap());
    let again = match &msg {
        Msg::Open {
            msg_id,
            object_id,
            volume_key,
            cookie_key,
            fd,
            flags,
        } => encode_open(
            *msg_id,
            *object_id,
            volume_key,
            cookie_key.as_bytes(),
            *fd,
            *flags,
        )
        .expect("a parsed OPEN fits in a message"),
        Msg::Read {
            msg_id,
            object_id,
            off,
            len,
        } => encode_read(*msg_id, *object_id, *off, *len),
        Msg::Close { object_id } => encode_close(msg_id, *object_id),
    };
    assert_eq!(again, data, "{msg:?} does not re-encode to its bytes");
});
