//! Fuzzes the data plane's prefix decoder for lz4 blocks. Any bytes decoded as a block
//! either fail with an error or stay within the output; any bytes compressed by
//! `lz4_flex` decode, for every prefix length asked, to exactly those bytes.
#![no_main]

use dedupd::store::lz4prefix::decode_prefix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let want = usize::from(u16::from_le_bytes([a, b])) % (rest.len() + 1);

    // Arbitrary bytes as a block.
    let mut out = vec![0u8; rest.len() * 4 + 64];
    let want_any = want.min(out.len());
    if let Ok(n) = decode_prefix(rest, &mut out, want_any) {
        assert!(n >= want_any && n <= out.len());
    }

    // A real block of these bytes.
    let block = lz4_flex::block::compress(rest);
    let mut out = vec![0u8; rest.len()];
    let n = decode_prefix(&block, &mut out, want).expect("a block from lz4_flex decodes");
    assert!(n >= want && n <= rest.len());
    assert_eq!(out[..n], rest[..n]);
});
