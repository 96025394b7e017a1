//! GNU tar's sparse files: the four ways GNU tar stores where a file's data lies (the
//! old GNU `S` header with its extension blocks, and the PAX formats 0.0, 0.1 and 1.0),
//! each read into one [`SparseMap`], and the rules every map must follow.
//!
//! The layouts are those of the GNU tar manual, appendix "Sparse Formats". Whatever the
//! format, the entry's data is the bytes of the data regions back to back; everything
//! else in the file reads as zeros.

/// The most data regions one sparse file may have. Bounds the memory of a map (16 bytes
/// a region); GNU tar writes one region per extent of data, so only a file fragmented
/// into over a million extents is refused.
pub const MAX_SPARSE_REGIONS: usize = 1 << 20;
/// Map slots in an old GNU sparse header (at byte 386, 24 bytes each).
pub const OLD_GNU_HEADER_SLOTS: usize = 4;
/// Map slots in an old GNU extension block (at byte 0, 24 bytes each).
pub const OLD_GNU_EXTENSION_SLOTS: usize = 21;
/// The longest decimal number of a 1.0 map (u64::MAX has 20 digits).
const MAX_DECIMAL_DIGITS: usize = 20;

const _: () = assert!(OLD_GNU_EXTENSION_SLOTS * 24 <= 504);
const _: () = assert!(386 + OLD_GNU_HEADER_SLOTS * 24 == 482);

/// Where a sparse file's data lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseMap {
    /// The file's size, holes included.
    pub real_size: u64,
    /// Data regions as (offset, length), in file order. Once [`SparseMap::check`]ed they do
    /// not overlap and end within `real_size`; zero-length regions are allowed (GNU tar
    /// ends every map with one at the real size).
    pub regions: Vec<(u64, u64)>,
}

impl SparseMap {
    /// Checks the rules of a map whose entry holds `data_bytes` bytes of data: regions
    /// in order and not overlapping, inside the real size, adding up to the data.
    pub fn check(&self, data_bytes: u64) -> Result<(), String> {
        let mut end = 0u64;
        let mut sum = 0u64;
        for (i, &(offset, len)) in self.regions.iter().enumerate() {
            if offset < end {
                return Err(format!(
                    "region {i} (offset {offset}, {len} bytes) starts before the end of the \
                     region before it ({end}): regions must be in order and must not overlap"
                ));
            }
            end = offset
                .checked_add(len)
                .filter(|&e| e <= self.real_size)
                .ok_or_else(|| {
                    format!(
                        "region {i} (offset {offset}, {len} bytes) ends past the real size {}",
                        self.real_size
                    )
                })?;
            // Cannot overflow: the regions are disjoint within real_size.
            sum += len;
        }
        if sum != data_bytes {
            return Err(format!(
                "the entry holds {data_bytes} data bytes but its map's regions add up to {sum}"
            ));
        }
        Ok(())
    }
}

/// How a sparse entry's map is stored, once its headers are read.
#[derive(Debug, PartialEq, Eq)]
pub enum Layout {
    /// The map is complete (old GNU, PAX 0.0 and 0.1).
    Map(SparseMap),
    /// PAX 1.0: the map opens the entry's data (see [`DataMapParser`]).
    InData {
        /// The file's size, holes included.
        real_size: u64,
    },
}

/// Reads a decimal number of a PAX record or a 1.0 map.
fn decimal(what: &str, text: &[u8]) -> Result<u64, String> {
    let ok = !text.is_empty()
        && text.len() <= MAX_DECIMAL_DIGITS
        && text.iter().all(|b| b.is_ascii_digit());
    ok.then(|| std::str::from_utf8(text).ok()?.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            format!(
                "{what} {:?} is not a decimal number below 2^64",
                String::from_utf8_lossy(text)
            )
        })
}

/// Adds a region to a map being read, refusing more than [`MAX_SPARSE_REGIONS`].
fn push_region(regions: &mut Vec<(u64, u64)>, region: (u64, u64)) -> Result<(), String> {
    if regions.len() == MAX_SPARSE_REGIONS {
        return Err(format!(
            "the map has more than {MAX_SPARSE_REGIONS} regions"
        ));
    }
    regions.push(region);
    Ok(())
}

/// Reads the 24-byte slots (12-byte offset, 12-byte length, octal or base-256) of an old
/// GNU sparse header or extension block into `regions`. Returns whether the map went on
/// to the last slot: an empty slot (its length field starts with NUL) ends the map.
pub fn old_gnu_slots(
    slots: &[u8],
    regions: &mut Vec<(u64, u64)>,
    number: impl Fn(&[u8], &str) -> Result<i64, String>,
) -> Result<bool, String> {
    for slot in slots.chunks_exact(24) {
        if slot[12] == 0 {
            return Ok(false);
        }
        let offset = number(&slot[..12], "sparse offset")?;
        let len = number(&slot[12..], "sparse length")?;
        let (Ok(offset), Ok(len)) = (u64::try_from(offset), u64::try_from(len)) else {
            return Err(format!(
                "region {} has a negative offset or length ({offset}, {len})",
                regions.len()
            ));
        };
        push_region(regions, (offset, len))?;
    }
    Ok(true)
}

/// The `GNU.sparse.*` records of one PAX header, taken in order.
#[derive(Debug, Default)]
pub struct PaxSparse {
    major: Option<u64>,
    minor: Option<u64>,
    real_size: Option<u64>,
    numblocks: Option<u64>,
    /// 0.1: `GNU.sparse.map`.
    map: Option<Vec<u8>>,
    /// 0.0: the `GNU.sparse.offset` / `GNU.sparse.numbytes` pairs, in record order.
    pairs: Vec<(u64, u64)>,
    /// 0.0: an offset waiting for its length.
    offset: Option<u64>,
}

impl PaxSparse {
    /// Takes one record whose key starts with `GNU.sparse.`.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let shown = String::from_utf8_lossy(key).into_owned();
        let num = |v: &[u8]| decimal(&shown, v);
        match key {
            b"GNU.sparse.major" => self.major = Some(num(value)?),
            b"GNU.sparse.minor" => self.minor = Some(num(value)?),
            b"GNU.sparse.size" | b"GNU.sparse.realsize" => self.real_size = Some(num(value)?),
            b"GNU.sparse.numblocks" => self.numblocks = Some(num(value)?),
            // The real name (0.1 and 1.0 put a made-up one in the header): the caller
            // applies it.
            b"GNU.sparse.name" => {}
            b"GNU.sparse.map" => self.map = Some(value.to_vec()),
            b"GNU.sparse.offset" => {
                if self.offset.is_some() {
                    return Err("two GNU.sparse.offset records without a \
                                GNU.sparse.numbytes between them"
                        .into());
                }
                self.offset = Some(num(value)?);
            }
            b"GNU.sparse.numbytes" => {
                let offset = self
                    .offset
                    .take()
                    .ok_or("a GNU.sparse.numbytes record without a GNU.sparse.offset before it")?;
                push_region(&mut self.pairs, (offset, num(value)?))?;
            }
            _ => return Err(format!("unknown PAX record {shown}")),
        }
        Ok(())
    }

    /// The layout the records describe.
    pub fn finish(self) -> Result<Layout, String> {
        if self.offset.is_some() {
            return Err("the last GNU.sparse.offset has no GNU.sparse.numbytes".into());
        }
        let real_size = self
            .real_size
            .ok_or("no GNU.sparse.size or GNU.sparse.realsize gives the real size")?;
        let regions = match (self.major, self.minor) {
            (None, None) => match (self.map, self.pairs.is_empty()) {
                (Some(map), true) => parse_map_list(&map)?,
                (None, false) => self.pairs,
                (Some(_), false) => {
                    return Err("both GNU.sparse.map (0.1) and GNU.sparse.offset (0.0) \
                                records"
                        .into())
                }
                (None, true) => {
                    return Err("no sparse map (GNU.sparse.map, GNU.sparse.offset or \
                                GNU.sparse.major)"
                        .into())
                }
            },
            (Some(1), Some(0)) => {
                if self.map.is_some() || !self.pairs.is_empty() || self.numblocks.is_some() {
                    return Err("a 1.0 sparse header also carries a 0.x map".into());
                }
                return Ok(Layout::InData { real_size });
            }
            (major, minor) => {
                let show = |v: Option<u64>| v.map_or("(none)".into(), |v| v.to_string());
                return Err(format!(
                    "sparse format version {}.{} is not one GNU tar writes (0.0, 0.1, 1.0)",
                    show(major),
                    show(minor)
                ));
            }
        };
        if let Some(n) = self.numblocks {
            if n != regions.len() as u64 {
                return Err(format!(
                    "GNU.sparse.numblocks says {n} regions but the map has {}",
                    regions.len()
                ));
            }
        }
        Ok(Layout::Map(SparseMap { real_size, regions }))
    }
}

/// Parses a 0.1 `GNU.sparse.map` value: `offset,length,offset,length,...`.
fn parse_map_list(map: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    if map.is_empty() {
        return Ok(vec![]);
    }
    let mut numbers = map.split(|&b| b == b',');
    let mut regions = Vec::new();
    while let Some(offset) = numbers.next() {
        let offset = decimal("a GNU.sparse.map offset", offset)?;
        let len = numbers.next().ok_or_else(|| {
            format!("GNU.sparse.map has an odd count of numbers (offset {offset} has no length)")
        })?;
        push_region(
            &mut regions,
            (offset, decimal("a GNU.sparse.map length", len)?),
        )?;
    }
    Ok(regions)
}

/// Reads a PAX 1.0 map, fed the entry's data one block at a time: decimal numbers each
/// ending in a newline (the count of regions, then an offset and a length per region),
/// padded to the end of its last block.
#[derive(Debug, Default)]
pub struct DataMapParser {
    /// The regions' count, once read.
    count: Option<u64>,
    /// An offset waiting for its length.
    offset: Option<u64>,
    regions: Vec<(u64, u64)>,
    /// Digits of the number being read.
    digits: Vec<u8>,
}

impl DataMapParser {
    /// Takes the next block of data; returns the regions once the map is complete (the
    /// rest of that block is padding).
    pub fn feed(&mut self, block: &[u8]) -> Result<Option<Vec<(u64, u64)>>, String> {
        for &b in block {
            if b != b'\n' {
                if self.digits.len() == MAX_DECIMAL_DIGITS || !b.is_ascii_digit() {
                    self.digits.push(b);
                    return Err(format!(
                        "the 1.0 map holds {:?} where a decimal number below 2^64 and its \
                         newline belong",
                        String::from_utf8_lossy(&self.digits)
                    ));
                }
                self.digits.push(b);
                continue;
            }
            let what = match (self.count, self.offset) {
                (None, _) => "the 1.0 map's count",
                (Some(_), None) => "a 1.0 map offset",
                (Some(_), Some(_)) => "a 1.0 map length",
            };
            let n = decimal(what, &self.digits)?;
            self.digits.clear();
            match (self.count, self.offset.take()) {
                (None, _) => {
                    if n > MAX_SPARSE_REGIONS as u64 {
                        return Err(format!(
                            "the 1.0 map's count {n} is over the limit of \
                             {MAX_SPARSE_REGIONS} regions"
                        ));
                    }
                    self.count = Some(n);
                }
                (Some(_), None) => self.offset = Some(n),
                (Some(_), Some(offset)) => push_region(&mut self.regions, (offset, n))?,
            }
            if self.count == Some(self.regions.len() as u64) {
                return Ok(Some(std::mem::take(&mut self.regions)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn octal(field: &[u8], _: &str) -> Result<i64, String> {
        let text = std::str::from_utf8(field).unwrap().trim_end_matches('\0');
        i64::from_str_radix(text, 8).map_err(|e| e.to_string())
    }

    fn slot(offset: u64, len: u64) -> Vec<u8> {
        format!("{offset:011o}\0{len:011o}\0").into_bytes()
    }

    fn map(real_size: u64, regions: &[(u64, u64)]) -> SparseMap {
        SparseMap {
            real_size,
            regions: regions.to_vec(),
        }
    }

    #[test]
    fn maps_follow_the_rules() {
        let m = map(100, &[(0, 10), (10, 5), (50, 0), (60, 40), (100, 0)]);
        assert_eq!(m.check(55), Ok(()));
        assert_eq!(map(0, &[]).check(0), Ok(()));
        assert_eq!(map(7, &[(7, 0)]).check(0), Ok(()), "all hole, GNU style");
        let err = |m: SparseMap, data: u64| m.check(data).unwrap_err();
        assert!(err(map(100, &[(10, 5), (0, 5)]), 10).contains("must be in order"));
        assert!(err(map(100, &[(0, 10), (5, 10)]), 20).contains("must not overlap"));
        assert!(err(map(100, &[(90, 11)]), 11).contains("past the real size 100"));
        assert!(err(map(100, &[(101, 0)]), 0).contains("past the real size"));
        assert!(err(map(u64::MAX, &[(u64::MAX, 1)]), 1).contains("past the real size"));
        assert!(err(map(100, &[(0, 10)]), 11).contains("add up to 10"));
    }

    #[test]
    fn old_gnu_slots_end_at_an_empty_one() {
        let mut regions = vec![];
        let mut slots = [slot(0, 4096), slot(65536, 10)].concat();
        slots.resize(4 * 24, 0);
        assert_eq!(old_gnu_slots(&slots, &mut regions, octal), Ok(false));
        assert_eq!(regions, vec![(0, 4096), (65536, 10)]);
        let full: Vec<u8> = (0..4).flat_map(|i| slot(i * 10, 1)).collect();
        assert_eq!(old_gnu_slots(&full, &mut regions, octal), Ok(true));
        assert_eq!(regions.len(), 6);
        let mut bad = slot(0, 1);
        bad[3] = b'9';
        assert!(old_gnu_slots(&bad, &mut regions, octal)
            .unwrap_err()
            .contains("invalid digit"));
        let negative = |_: &[u8], _: &str| Ok(-1);
        assert!(old_gnu_slots(&slot(0, 1), &mut vec![], negative)
            .unwrap_err()
            .contains("negative"));
    }

    fn pax(records: &[(&str, &str)]) -> Result<Layout, String> {
        let mut p = PaxSparse::default();
        for (k, v) in records {
            p.record(k.as_bytes(), v.as_bytes())?;
        }
        p.finish()
    }

    #[test]
    fn pax_0_0_pairs_are_taken_in_order() {
        let l = pax(&[
            ("GNU.sparse.size", "70000"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "4096"),
            ("GNU.sparse.offset", "70000"),
            ("GNU.sparse.numbytes", "0"),
        ]);
        assert_eq!(l, Ok(Layout::Map(map(70000, &[(0, 4096), (70000, 0)]))));
    }

    #[test]
    fn pax_0_1_maps_are_lists() {
        let l = pax(&[
            ("GNU.sparse.size", "100000"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.name", "./mid"),
            ("GNU.sparse.map", "49152,4096,100000,0"),
        ]);
        assert_eq!(
            l,
            Ok(Layout::Map(map(100000, &[(49152, 4096), (100000, 0)])))
        );
        assert_eq!(
            pax(&[("GNU.sparse.size", "5"), ("GNU.sparse.map", "")]),
            Ok(Layout::Map(map(5, &[])))
        );
    }

    #[test]
    fn pax_1_0_says_the_map_is_in_the_data() {
        let l = pax(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "x"),
            ("GNU.sparse.realsize", "9663676416"),
        ]);
        assert_eq!(
            l,
            Ok(Layout::InData {
                real_size: 9663676416
            })
        );
    }

    #[test]
    fn bad_pax_sparse_records_are_refused() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("GNU.sparse.size", "1"), ("GNU.sparse.numbytes", "1")],
                "without a GNU.sparse.offset before it",
            ),
            (
                &[
                    ("GNU.sparse.size", "9"),
                    ("GNU.sparse.offset", "1"),
                    ("GNU.sparse.offset", "2"),
                ],
                "two GNU.sparse.offset",
            ),
            (
                &[("GNU.sparse.size", "9"), ("GNU.sparse.offset", "1")],
                "has no GNU.sparse.numbytes",
            ),
            (
                &[("GNU.sparse.offset", "1"), ("GNU.sparse.numbytes", "1")],
                "real size",
            ),
            (
                &[("GNU.sparse.size", "-1")],
                "GNU.sparse.size \"-1\" is not a decimal number",
            ),
            (&[("GNU.sparse.size", "18446744073709551616")], "below 2^64"),
            (
                &[("GNU.sparse.size", "9"), ("GNU.sparse.map", "1,2,3")],
                "odd count",
            ),
            (
                &[("GNU.sparse.size", "9"), ("GNU.sparse.map", "1,x")],
                "GNU.sparse.map length \"x\"",
            ),
            (
                &[("GNU.sparse.size", "9"), ("GNU.sparse.map", "1,2,")],
                "GNU.sparse.map offset \"\"",
            ),
            (
                &[
                    ("GNU.sparse.size", "9"),
                    ("GNU.sparse.numblocks", "3"),
                    ("GNU.sparse.map", "1,2"),
                ],
                "numblocks says 3 regions but the map has 1",
            ),
            (
                &[
                    ("GNU.sparse.size", "9"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.offset", "1"),
                    ("GNU.sparse.numbytes", "1"),
                ],
                "numblocks says 2",
            ),
            (
                &[
                    ("GNU.sparse.size", "9"),
                    ("GNU.sparse.map", "1,2"),
                    ("GNU.sparse.offset", "1"),
                    ("GNU.sparse.numbytes", "1"),
                ],
                "both",
            ),
            (&[("GNU.sparse.size", "9")], "no sparse map"),
            (
                &[
                    ("GNU.sparse.major", "2"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.size", "9"),
                ],
                "version 2.0",
            ),
            (
                &[("GNU.sparse.major", "1"), ("GNU.sparse.realsize", "9")],
                "version 1.(none)",
            ),
            (
                &[
                    ("GNU.sparse.major", "1"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.realsize", "9"),
                    ("GNU.sparse.map", "0,1"),
                ],
                "also carries a 0.x map",
            ),
            (
                &[("GNU.sparse.frob", "1")],
                "unknown PAX record GNU.sparse.frob",
            ),
        ];
        for (records, rule) in cases {
            let e = pax(records).expect_err(rule);
            assert!(e.contains(rule), "{records:?}: {e} should say {rule}");
        }
    }

    fn data_map(text: &[u8]) -> Result<Option<Vec<(u64, u64)>>, String> {
        let mut p = DataMapParser::default();
        for block in text.chunks(512) {
            if let Some(r) = p.feed(block)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    #[test]
    fn pax_1_0_maps_are_read_across_blocks() {
        let mut text = b"2\n49152\n4096\n100000\n0\n".to_vec();
        text.resize(512, 0);
        assert_eq!(data_map(&text), Ok(Some(vec![(49152, 4096), (100000, 0)])));
        // A map of many regions spans blocks, and numbers span block boundaries.
        let n = 100u64;
        let mut text = format!("{n}\n").into_bytes();
        for i in 0..n {
            text.extend_from_slice(format!("{}\n{}\n", i * 1_000_000_007, 4096).as_bytes());
        }
        assert!(text.len() > 1024);
        text.resize(text.len().next_multiple_of(512), 0);
        let regions = data_map(&text).unwrap().unwrap();
        assert_eq!(regions.len(), n as usize);
        assert_eq!(regions[99], (99 * 1_000_000_007, 4096));
        assert_eq!(data_map(b"0\n"), Ok(Some(vec![])));
        // Not complete yet: the caller reads on (and refuses a map past the data).
        assert_eq!(data_map(b"2\n0\n1\n"), Ok(None));
    }

    #[test]
    fn bad_pax_1_0_maps_are_refused() {
        for (text, rule) in [
            (&b"x\n"[..], "\"x\" where a decimal number"),
            (b"1\n0\n\0\0", "\"\\0\" where"),
            (b"1\n-1\n1\n", "\"-\" where"),
            (b"\n", "count \"\" is not a decimal"),
            (b"1\n\n", "offset \"\""),
            (b"1\n5\n\n", "length \"\""),
            (
                b"1\n99999999999999999999\n1\n",
                "offset \"99999999999999999999\"",
            ),
            (
                b"1\n000000000000000000001\n",
                "where a decimal number below 2^64",
            ),
            (b"2000000\n", "over the limit"),
        ] {
            let e = data_map(text).expect_err(rule);
            assert!(e.contains(rule), "{text:?}: {e} should say {rule}");
        }
    }
}
