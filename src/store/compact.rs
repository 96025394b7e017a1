//! Pack compaction: reclaims the space of chunks that left the index (see the module
//! doc of [`crate::store`] for the crash-safety argument and the rule for readers).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;

use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::{
    chunk, io_err, read_full_at, record_bytes, ChunkLoc, Ingest, Result, Store, StoreError, CHUNKS,
    CHUNK_LEAVES, CHUNK_SUMS, META_MAX_PACK, PACKS, PACK_LIVE, PACK_ROLL_BYTES, STORE_META,
};
use crate::digest::ChunkDigest;

/// Most pack files [`Store::finish_compaction`] looks at in one call.
const MAX_PACK_FILES: usize = 1 << 20;

/// How much [`Store::compact`] does.
#[derive(Clone, Copy, Debug)]
pub struct CompactOptions {
    /// A pack whose live bytes are under this percentage of its length is rewritten.
    pub live_percent: u8,
    /// Most live bytes copied in one call (whole packs; the first one is always taken).
    pub max_move_bytes: u64,
}

impl CompactOptions {
    /// Retire packs with no live chunk, rewrite nothing: safe while a data plane serves
    /// open objects through tables loaded before (see the module doc of the store).
    pub fn dead_only() -> CompactOptions {
        CompactOptions {
            live_percent: 0,
            ..CompactOptions::default()
        }
    }
}

impl Default for CompactOptions {
    fn default() -> CompactOptions {
        CompactOptions {
            live_percent: 50,
            max_move_bytes: PACK_ROLL_BYTES,
        }
    }
}

/// What [`Store::compact`] did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CompactStats {
    /// Packs whose rows left the index (no live chunk, or rewritten). Their files stay
    /// until [`Store::finish_compaction`].
    pub packs_retired: Vec<u32>,
    /// Of those, packs that held no live chunk.
    pub packs_emptied: u64,
    /// Of those, packs whose live chunks were copied elsewhere.
    pub packs_rewritten: u64,
    /// Chunks copied.
    pub chunks_moved: u64,
    /// Record bytes copied.
    pub bytes_moved: u64,
    /// Chunks found corrupt while copying: dropped from the index, not copied.
    pub corrupt_chunks: u64,
    /// Committed bytes of the retired packs.
    pub retired_bytes: u64,
}

/// What [`Store::finish_compaction`] did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FinishStats {
    /// Pack files unlinked.
    pub files_removed: u64,
    /// Their sizes.
    pub bytes_freed: u64,
}

/// A test hook: stop compaction as a crash would.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CrashPoint {
    /// After the records are copied (and synced), before the index transaction.
    BeforeIndexCommit,
}

impl Store {
    /// Retires dead packs and rewrites sparse ones (see the module doc). Never unlinks a
    /// file: swap every live [`super::Registry`] for a fresh one, then call
    /// [`Store::finish_compaction`]. Waits for a running ingest.
    pub fn compact(&self, opts: CompactOptions) -> Result<CompactStats> {
        self.compact_inner(
            opts,
            #[cfg(test)]
            None,
        )
    }

    pub(super) fn compact_inner(
        &self,
        opts: CompactOptions,
        #[cfg(test)] crash: Option<CrashPoint>,
    ) -> Result<CompactStats> {
        let guard = self.exclusive();
        let mut stats = CompactStats::default();
        // Packs a writer appends to are left alone, and so is the one the next ingest
        // would take (rewriting it into itself gains nothing).
        let held = self.held_packs();
        let active = self.newest_pack()?.0.map(|(p, _)| p);

        // Plan from one snapshot of the index.
        let mut dead = Vec::new();
        let mut sparse = Vec::new();
        let mut drifted: Vec<(u32, u64)> = Vec::new();
        {
            let txn = self.db.begin_read().map_err(self.db_err())?;
            let packs = txn.open_table(PACKS).map_err(self.db_err())?;
            let pack_live = txn.open_table(PACK_LIVE).map_err(self.db_err())?;
            // Files are deleted on what the index says, not on the counters: one pass
            // over the chunk index (bounded by its size) recounts live bytes per pack.
            let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
            let mut counted: HashMap<u32, u64> = HashMap::new();
            for item in chunks.iter().map_err(self.db_err())? {
                let (_, v) = item.map_err(self.db_err())?;
                let (p, _, stored_len, _, _) = v.value();
                *counted.entry(p).or_default() += record_bytes(stored_len);
            }
            for item in packs.iter().map_err(self.db_err())? {
                let (k, v) = item.map_err(self.db_err())?;
                let (pack, len) = (k.value(), v.value());
                let kept = pack_live
                    .get(pack)
                    .map_err(self.db_err())?
                    .map_or(0, |v| v.value());
                let live = counted.get(&pack).copied().unwrap_or(0);
                if kept != live {
                    tracing::warn!("pack {pack}: live-bytes counter {kept} != index {live}; fixed");
                    drifted.push((pack, live));
                }
                if held.contains(&pack) {
                    continue;
                }
                if live == 0 {
                    dead.push((pack, len));
                } else if Some(pack) != active
                    && u128::from(live) * 100 < u128::from(len) * u128::from(opts.live_percent)
                {
                    sparse.push((pack, len, live));
                }
            }
        }
        sparse.sort_by_key(|&(_, _, live)| live);
        let mut budget = 0u64;
        let mut rewrite: Vec<(u32, u64)> = Vec::new();
        for (pack, len, live) in sparse {
            if !rewrite.is_empty() && budget + live > opts.max_move_bytes {
                break;
            }
            budget += live;
            rewrite.push((pack, len));
        }

        // Dead packs: drop their rows (the files go in finish_compaction).
        if !dead.is_empty() || !drifted.is_empty() {
            let result = (|| -> std::result::Result<(), redb::Error> {
                let txn = self.db.begin_write()?;
                {
                    let mut packs = txn.open_table(PACKS)?;
                    let mut pack_live = txn.open_table(PACK_LIVE)?;
                    for &(p, live) in &drifted {
                        pack_live.insert(p, live)?;
                    }
                    for &(p, _) in &dead {
                        packs.remove(p)?;
                        pack_live.remove(p)?;
                    }
                }
                txn.commit()?;
                Ok(())
            })();
            result.map_err(self.db_err())?;
            for &(p, len) in &dead {
                stats.packs_retired.push(p);
                stats.packs_emptied += 1;
                stats.retired_bytes += len;
            }
        }
        if rewrite.is_empty() {
            return Ok(stats);
        }

        // The live chunks of the packs to rewrite, in pack order.
        let wanted: HashSet<u32> = rewrite.iter().map(|&(p, _)| p).collect();
        let mut live: Vec<(ChunkDigest, ChunkLoc)> = Vec::new();
        {
            let txn = self.db.begin_read().map_err(self.db_err())?;
            let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
            for item in chunks.iter().map_err(self.db_err())? {
                let (k, v) = item.map_err(self.db_err())?;
                let (pack, offset, stored_len, raw_len, _) = v.value();
                if !wanted.contains(&pack) {
                    continue;
                }
                let digest = ChunkDigest(
                    k.value()
                        .try_into()
                        .map_err(|_| self.corrupt("chunk key length"))?,
                );
                live.push((
                    digest,
                    ChunkLoc {
                        pack,
                        offset,
                        stored_len,
                        raw_len,
                        leaves: None,
                        // No sum: each copy is verified against its digest below, so
                        // the sum the copy is given vouches for bytes known good.
                        sum: None,
                    },
                ));
            }
        }
        live.sort_by_key(|(_, l)| (l.pack, l.offset));

        // Copy, verifying each record; the ingest holds the lock from here on.
        let mut ing = self.open_ingest(super::IngestGuard::Exclusive(guard))?;
        let mut record = vec![0u8; chunk::MAX_RECORD_BYTES];
        let mut out = vec![0u8; chunk::MAX_CHUNK_BYTES];
        let mut moved: Vec<(ChunkDigest, ChunkLoc)> = Vec::new();
        let mut corrupt: Vec<(ChunkDigest, ChunkLoc)> = Vec::new();
        let mut open: Option<(u32, File)> = None;
        for &(digest, loc) in &live {
            if open.as_ref().is_none_or(|(p, _)| *p != loc.pack) {
                let path = self.pack_path(loc.pack);
                open = Some((loc.pack, File::open(&path).map_err(io_err(&path))?));
            }
            let (_, file) = open.as_ref().expect("opened above");
            if loc.record_len() > record.len() || loc.raw_len as usize > out.len() {
                corrupt.push((digest, loc));
                continue;
            }
            let rec = &mut record[..loc.record_len()];
            let path = self.pack_path(loc.pack);
            let n = read_full_at(file, rec, loc.offset).map_err(io_err(&path))?;
            match chunk::decode_record(&rec[..n], &loc, &digest, &mut out) {
                Ok(()) => {
                    // The chunk's leaves row, keyed by its digest, stays as it is; its sum
                    // is taken again from the copied payload (see commit_moves).
                    // Decoded and hashed just above: the payload is vouched for.
                    ing.append_record(rec, digest, loc.raw_len, None, true)?;
                    moved.push((digest, loc));
                }
                Err(e) => {
                    tracing::warn!(
                        "compaction: chunk {digest} in {}: {e}; dropped from the index",
                        path.display()
                    );
                    corrupt.push((digest, loc));
                }
            }
        }
        ing.file.sync_data().map_err(io_err(&ing.pack_path))?;
        #[cfg(test)]
        if crash == Some(CrashPoint::BeforeIndexCommit) {
            // As a crash: the copied bytes stay past the committed length.
            ing.done = true;
            return Ok(stats);
        }
        let bytes_moved = ing.new_bytes;
        ing.commit_moves(&moved, &corrupt, &rewrite)?;
        stats.chunks_moved = moved.len() as u64;
        stats.bytes_moved = bytes_moved;
        stats.corrupt_chunks = corrupt.len() as u64;
        for &(p, len) in &rewrite {
            stats.packs_retired.push(p);
            stats.packs_rewritten += 1;
            stats.retired_bytes += len;
        }
        Ok(stats)
    }

    /// Unlinks every pack file that has no row in the index (packs retired by
    /// [`Store::compact`], also by one that crashed after its index transaction). Call it
    /// only once no registry built before the compaction is in use.
    pub fn finish_compaction(&self) -> Result<FinishStats> {
        let _guard = self.exclusive();
        let held = self.held_packs();
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let packs = txn.open_table(PACKS).map_err(self.db_err())?;
        let meta = txn.open_table(STORE_META).map_err(self.db_err())?;
        let max_pack = meta
            .get(META_MAX_PACK)
            .map_err(self.db_err())?
            .map_or(0, |v| v.value());
        let dir = self.root.join("chunks");
        let mut stats = FinishStats::default();
        for entry in fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .take(MAX_PACK_FILES)
        {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(num) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .filter(|n| n.len() == 8)
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Numbers above max_pack belong to a writer not committed yet (or crashed):
            // the next one truncates them. A leased pack is being written.
            if u64::from(num) > max_pack
                || held.contains(&num)
                || packs.get(num).map_err(self.db_err())?.is_some()
            {
                continue;
            }
            let path = entry.path();
            let len = entry.metadata().map_or(0, |m| m.len());
            match fs::remove_file(&path) {
                Ok(()) => {
                    stats.files_removed += 1;
                    stats.bytes_freed += len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        if stats.files_removed > 0 {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))?;
        }
        Ok(stats)
    }
}

impl Ingest<'_> {
    /// Commits the records this ingest copied: repoints each moved chunk that still
    /// points at its old record, drops the corrupt ones, and drops the rows of the
    /// rewritten packs, in one transaction.
    fn commit_moves(
        mut self,
        moved: &[(ChunkDigest, ChunkLoc)],
        corrupt: &[(ChunkDigest, ChunkLoc)],
        rewritten: &[(u32, u64)],
    ) -> Result<()> {
        let store = self.store;
        let pending: &HashMap<ChunkDigest, ChunkLoc> = &self.pending;
        let pack = self.pack;
        let len = self.len;
        let result = (|| -> std::result::Result<(), redb::Error> {
            let txn = store.db.begin_write()?;
            {
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut leaves = txn.open_table(CHUNK_LEAVES)?;
                let mut sums = txn.open_table(CHUNK_SUMS)?;
                let mut packs = txn.open_table(PACKS)?;
                let mut pack_live = txn.open_table(PACK_LIVE)?;
                let mut meta = txn.open_table(STORE_META)?;
                let mut added = 0u64;
                for (d, old) in moved {
                    let cur = chunks.get(d.0.as_slice())?.map(|v| v.value());
                    let Some((p, o, _, _, refs)) = cur else {
                        continue;
                    };
                    if (p, o) != (old.pack, old.offset) {
                        continue;
                    }
                    let new = pending.get(d).expect("every moved chunk was appended");
                    chunks.insert(
                        d.0.as_slice(),
                        (new.pack, new.offset, new.stored_len, new.raw_len, refs),
                    )?;
                    // The payload is copied byte for byte, so this is the sum the row
                    // already holds; a chunk stored before sums were kept gains one.
                    if let Some(sum) = new.sum {
                        sums.insert(d.0.as_slice(), sum)?;
                    }
                    added += record_bytes(new.stored_len);
                }
                for (d, old) in corrupt {
                    let cur = chunks.get(d.0.as_slice())?.map(|v| v.value());
                    if cur.is_some_and(|(p, o, ..)| (p, o) == (old.pack, old.offset)) {
                        chunks.remove(d.0.as_slice())?;
                        leaves.remove(d.0.as_slice())?;
                        sums.remove(d.0.as_slice())?;
                    }
                }
                if !moved.is_empty() {
                    let live = pack_live.get(pack)?.map_or(0, |v| v.value());
                    pack_live.insert(pack, live + added)?;
                    packs.insert(pack, len)?;
                    let max_pack = meta.get(META_MAX_PACK)?.map_or(0, |v| v.value());
                    meta.insert(META_MAX_PACK, max_pack.max(u64::from(pack)))?;
                }
                for &(p, _) in rewritten {
                    packs.remove(p)?;
                    pack_live.remove(p)?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|e| StoreError::Db {
            path: store.db_path.clone(),
            source: e,
        })?;
        if moved.is_empty() {
            // Nothing was appended: leave the pack as it was.
            self.len = self.committed;
        }
        self.committed = self.len;
        self.done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use super::*;
    use crate::store::tests::{pack_payload_sum, sum_row};
    use crate::store::BlobSource;

    /// A store whose every ingest starts a new pack, so that packs are not active.
    fn open(dir: &std::path::Path) -> Store {
        let mut s = Store::open(dir).unwrap();
        s.pack_roll_bytes = 1;
        s
    }

    /// Distinct, poorly compressible chunk number `n` of `len` bytes.
    fn chunk(n: u32, len: usize) -> Vec<u8> {
        let mut x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// One layer of `chunks` in one blob; returns the blob id.
    fn commit_layer(store: &Store, diff: &str, chunks: &[Vec<u8>]) -> String {
        crate::store::tests::commit_layer(store, diff, chunks).blobs[0].clone()
    }

    fn pack_files(store: &Store) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = fs::read_dir(store.root().join("chunks"))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                let n = e.file_name().to_string_lossy()[..8].parse().unwrap();
                (n, e.metadata().unwrap().len())
            })
            .collect();
        v.sort();
        v
    }

    /// Every chunk of `chunks` reads back through `read_chunk`, and blob `id` of a fresh
    /// registry reads back byte-exact from its locations.
    fn check_reads(store: &Store, id: &str, chunks: &[Vec<u8>]) {
        let mut out = Vec::new();
        for c in chunks {
            store.read_chunk(&ChunkDigest::of(c), &mut out).unwrap();
            assert_eq!(&out, c);
        }
        let reg = store.registry().unwrap();
        let BlobSource::Chunked(table) = &*reg.blobs[id] else {
            panic!("blob {id} is not chunked");
        };
        let table: &Arc<_> = table;
        assert_eq!(table.entries().len(), chunks.len());
        for (e, c) in table.entries().iter().zip(chunks) {
            let loc = e.loc.expect("located");
            assert!(reg.packs.iter().any(|(p, _)| *p == loc.pack));
            let f = File::open(store.pack_path(loc.pack)).unwrap();
            let mut rec = vec![0u8; loc.record_len()];
            f.read_exact_at(&mut rec, loc.offset).unwrap();
            let mut got = vec![0u8; loc.raw_len as usize];
            chunk::decode_record(&rec, &loc, &e.digest, &mut got).unwrap();
            assert_eq!(&got, c);
            // The leaves stay with the chunk wherever its record moves, and the sum
            // is the moved payload's.
            assert_eq!(loc.leaves, crate::digest::Leaves::digest_of(c).1);
            assert_eq!(
                loc.sum,
                Some(chunk::payload_sum(&rec[chunk::RECORD_HEADER_BYTES..]))
            );
            got.fill(0);
            let head =
                if chunk::decode_record_range(&rec, &loc, &e.digest, &mut got, 0, 100).unwrap() {
                    &rec[chunk::RECORD_HEADER_BYTES..][..100]
                } else {
                    &got[..100]
                };
            assert_eq!(head, &c[..100]);
        }
    }

    #[test]
    fn compaction_frees_dead_packs_and_rewrites_sparse_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // a[0], which compaction moves, is compressible and of two leaves: stored as lz4
        // with its leaves.
        let text: Vec<u8> = (0..20_000u32).map(|i| (i % 89) as u8).collect();
        let a: Vec<Vec<u8>> = (0..4)
            .map(|n| {
                if n == 0 {
                    text.clone()
                } else {
                    chunk(n, 20_000)
                }
            })
            .collect();
        let b: Vec<Vec<u8>> = (10..14).map(|n| chunk(n, 20_000)).collect();
        // Layer c keeps one chunk of a's pack alive.
        let c = vec![a[0].clone(), chunk(20, 30_000)];
        commit_layer(&store, "aa", &a);
        commit_layer(&store, "bb", &b);
        let id_c = commit_layer(&store, "cc", &c);
        assert_eq!(pack_files(&store).len(), 3);
        let before = store.stats().unwrap();
        assert_eq!(before.dead_bytes, 0);

        store.remove_layer("aa").unwrap().unwrap();
        store.remove_layer("bb").unwrap().unwrap();
        let st = store.stats().unwrap();
        assert!(st.dead_bytes > 6 * 20_000, "{st:?}");

        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!((stats.packs_emptied, stats.packs_rewritten), (1, 1));
        assert_eq!(stats.chunks_moved, 1);
        assert_eq!(stats.corrupt_chunks, 0);
        let mut retired = stats.packs_retired.clone();
        retired.sort();
        assert_eq!(retired, vec![1, 2]);
        // Nothing unlinked yet: old registries may still name these packs.
        assert_eq!(pack_files(&store).len(), 4);
        check_reads(&store, &id_c, &c);

        let fin = store.finish_compaction().unwrap();
        assert_eq!(fin.files_removed, 2);
        let files = pack_files(&store);
        assert!(files.iter().all(|(p, _)| *p > 2), "{files:?}");
        check_reads(&store, &id_c, &c);
        let after = store.stats().unwrap();
        assert_eq!(after.dead_bytes, 0, "{after:?}");
        assert!(after.stored_bytes < before.stored_bytes / 2, "{after:?}");
        let on_disk: u64 = files.iter().map(|(_, l)| l).sum();
        assert_eq!(on_disk, after.stored_bytes);

        // Removing the last layer leaves every pack dead, the active one included.
        store.remove_layer("cc").unwrap().unwrap();
        store.compact(CompactOptions::default()).unwrap();
        store.finish_compaction().unwrap();
        assert!(pack_files(&store).is_empty());
        assert_eq!(store.stats().unwrap().stored_bytes, 0);
        // Pack numbers are not reused.
        let d = vec![chunk(30, 1000)];
        let id_d = commit_layer(&store, "dd", &d);
        assert!(pack_files(&store)[0].0 > 4);
        check_reads(&store, &id_d, &d);
    }

    #[test]
    fn a_crash_before_the_index_commit_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a: Vec<Vec<u8>> = (0..4).map(|n| chunk(n, 20_000)).collect();
        let c = vec![a[1].clone()];
        commit_layer(&store, "aa", &a);
        let id_c = commit_layer(&store, "cc", &c);
        store.remove_layer("aa").unwrap().unwrap();
        let before = pack_files(&store);
        let stats = store
            .compact_inner(
                CompactOptions::default(),
                Some(CrashPoint::BeforeIndexCommit),
            )
            .unwrap();
        assert_eq!(stats.chunks_moved, 0);
        // The copy is in the active pack, past its committed length.
        let crashed = pack_files(&store);
        assert!(crashed.iter().map(|f| f.1).sum::<u64>() > before.iter().map(|f| f.1).sum());
        drop(store);

        let store = open(dir.path());
        check_reads(&store, &id_c, &c);
        assert_eq!(store.finish_compaction().unwrap().files_removed, 0);
        check_reads(&store, &id_c, &c);
        // The next compaction repairs it (the ingest truncates the stray copy first).
        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!((stats.packs_rewritten, stats.chunks_moved), (1, 1));
        store.finish_compaction().unwrap();
        check_reads(&store, &id_c, &c);
        let files = pack_files(&store);
        let on_disk: u64 = files.iter().map(|(_, l)| l).sum();
        assert_eq!(on_disk, store.stats().unwrap().stored_bytes, "{files:?}");
    }

    #[test]
    fn a_crash_after_the_index_commit_leaves_orphans_for_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a: Vec<Vec<u8>> = (0..4).map(|n| chunk(n, 20_000)).collect();
        let c = vec![a[2].clone(), chunk(9, 5000)];
        commit_layer(&store, "aa", &a);
        let id_c = commit_layer(&store, "cc", &c);
        store.remove_layer("aa").unwrap().unwrap();
        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!(stats.packs_retired, vec![1]);
        // Crash: the process dies before finish_compaction.
        drop(store);
        let store = open(dir.path());
        check_reads(&store, &id_c, &c);
        assert!(store.pack_path(1).exists());
        // A new ingest does not touch the orphan, nor reuse its number.
        let d = vec![chunk(40, 3000)];
        let id_d = commit_layer(&store, "dd", &d);
        let fin = store.finish_compaction().unwrap();
        assert_eq!(fin.files_removed, 1);
        assert!(!store.pack_path(1).exists());
        check_reads(&store, &id_c, &c);
        check_reads(&store, &id_d, &d);
    }

    #[test]
    fn a_corrupt_record_is_dropped_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a: Vec<Vec<u8>> = (0..5).map(|n| chunk(n, 20_000)).collect();
        let c = vec![a[0].clone(), a[3].clone()];
        commit_layer(&store, "aa", &a);
        let id_c = commit_layer(&store, "cc", &c);
        store.remove_layer("aa").unwrap().unwrap();
        let bad = store.locate(&ChunkDigest::of(&a[3])).unwrap().unwrap();
        assert_eq!(bad.pack, 1);
        let f = OpenOptions::new()
            .write(true)
            .open(store.pack_path(1))
            .unwrap();
        f.write_all_at(b"\xff\xff\xff\xff", bad.offset + 100)
            .unwrap();
        drop(f);

        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!((stats.chunks_moved, stats.corrupt_chunks), (1, 1));
        store.finish_compaction().unwrap();
        assert!(store.locate(&ChunkDigest::of(&a[3])).unwrap().is_none());
        assert_eq!(sum_row(&store, &ChunkDigest::of(&a[3])), None);
        let mut out = Vec::new();
        store.read_chunk(&ChunkDigest::of(&a[0]), &mut out).unwrap();
        assert_eq!(out, a[0]);
        // The blob's corrupt chunk now has no location: readers get EIO, never bytes.
        let reg = store.registry().unwrap();
        let BlobSource::Chunked(t) = &*reg.blobs[&id_c] else {
            panic!("not chunked")
        };
        assert!(t.entries()[0].loc.is_some());
        assert!(t.entries()[1].loc.is_none());
        // No byte of the corrupt record was copied anywhere.
        for (p, _) in pack_files(&store) {
            let bytes = fs::read(store.pack_path(p)).unwrap();
            assert!(!bytes
                .windows(32)
                .any(|w| w == ChunkDigest::of(&a[3]).0.as_slice()));
        }
    }

    #[test]
    fn a_moved_chunk_keeps_its_payload_sum() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // a[0] is stored as lz4, a[1] raw; both stay live and are moved.
        let text: Vec<u8> = (0..20_000u32).map(|i| (i % 89) as u8).collect();
        let mut a: Vec<Vec<u8>> = (1..4).map(|n| chunk(n, 20_000)).collect();
        a.insert(0, text);
        let c = vec![a[0].clone(), a[1].clone()];
        commit_layer(&store, "aa", &a);
        let id_c = commit_layer(&store, "cc", &c);
        let (d0, d1) = (ChunkDigest::of(&a[0]), ChunkDigest::of(&a[1]));
        let before = store.locate(&d0).unwrap().unwrap();
        assert!(before.stored_len < before.raw_len);
        assert!(before.sum.is_some());
        // a[1] as a chunk stored before the index kept sums.
        let txn = store.db.begin_write().unwrap();
        txn.open_table(CHUNK_SUMS)
            .unwrap()
            .remove(d1.0.as_slice())
            .unwrap();
        txn.commit().unwrap();
        store.remove_layer("aa").unwrap().unwrap();

        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!((stats.packs_rewritten, stats.chunks_moved), (1, 2));
        let after = store.locate(&d0).unwrap().unwrap();
        assert_ne!((after.pack, after.offset), (before.pack, before.offset));
        assert_eq!(after.sum, before.sum);
        assert_eq!(after.sum, Some(pack_payload_sum(&store, &after)));
        // Verified against its digest on the way, the unsummed chunk gains its sum.
        let moved = store.locate(&d1).unwrap().unwrap();
        assert_eq!(moved.sum, Some(pack_payload_sum(&store, &moved)));
        assert_eq!(sum_row(&store, &d1), moved.sum);
        store.finish_compaction().unwrap();
        check_reads(&store, &id_c, &c);
    }

    #[test]
    fn packs_above_the_threshold_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a: Vec<Vec<u8>> = (0..4).map(|n| chunk(n, 20_000)).collect();
        commit_layer(&store, "aa", &a);
        commit_layer(&store, "cc", &a[..3]);
        store.remove_layer("aa").unwrap().unwrap();
        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!(stats, CompactStats::default());
        assert!(store.stats().unwrap().dead_bytes > 20_000);
        // dead_only never rewrites, even a pack that is mostly dead.
        commit_layer(&store, "ee", &a[..1]);
        store.remove_layer("cc").unwrap().unwrap();
        let stats = store.compact(CompactOptions::dead_only()).unwrap();
        assert_eq!(stats, CompactStats::default());
        let stats = store.compact(CompactOptions::default()).unwrap();
        assert_eq!((stats.packs_rewritten, stats.chunks_moved), (1, 1));
    }

    #[test]
    fn a_drifted_counter_never_deletes_a_live_pack() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a: Vec<Vec<u8>> = (0..3).map(|n| chunk(n, 20_000)).collect();
        let id = commit_layer(&store, "aa", &a);
        commit_layer(&store, "bb", &[chunk(7, 100)]);
        let txn = store.db.begin_write().unwrap();
        txn.open_table(PACK_LIVE).unwrap().insert(1, 0).unwrap();
        txn.commit().unwrap();
        let stats = store.compact(CompactOptions::default()).unwrap();
        assert!(stats.packs_retired.is_empty(), "{stats:?}");
        store.finish_compaction().unwrap();
        check_reads(&store, &id, &a);
        assert_eq!(store.stats().unwrap().dead_bytes, 0);
    }
}
