//! Evicting chunks that can be fetched again: the store's side of the bounded cache.
//!
//! A chunk is *evictable* when the packs hold it, a lazily pulled blob (one with a
//! [`super::REMOTE_BLOBS`] row, so the registry keeps a copy) names it, and no converted
//! layer does. A chunk of a converted layer is never evictable, since nothing could
//! bring it back (even when a lazily pulled layer shares its blob); that
//! holds whichever pack its record lies in (a conversion that meets a chunk fetched
//! earlier keeps the fetched record, see [`super::remote`]).
//!
//! Eviction is the fetch commit run backwards, in one transaction under the store's
//! exclusive lock (no ingest can be naming the chunk meanwhile): the chunk leaves the
//! index (and its leaves and payload sum), its count of naming blobs moves to `remote_refs`, and its
//! pack's live bytes drop by its record. Its record's bytes stay in the pack until
//! [`Store::punch`] deallocates them (`FALLOC_FL_PUNCH_HOLE`): the caller waits a grace
//! period first, so that a reader holding the old location from just before the
//! transaction still reads the record. A reader with an older location (a blob table
//! built before the eviction) reads a hole, which fails verification; the serving
//! engine then asks the fetcher, which finds the chunk absent and fetches it again.
//! Never a wrong byte: every record is verified against its digest when read.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use redb::{ReadableDatabase, ReadableTable};

use super::{
    blob, record_bytes, LayerRecord, Result, Store, StoreError, BLOBS, CHUNKS, CHUNK_LEAVES,
    CHUNK_SUMS, LAYERS, PACK_LIVE, REMOTE_BLOBS, REMOTE_REFS,
};
use crate::digest::ChunkDigest;

/// A chunk the packs hold that only lazily pulled blobs name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evictable {
    /// The chunk.
    pub digest: ChunkDigest,
    /// Its pack.
    pub pack: u32,
    /// Offset of its record in the pack.
    pub offset: u64,
    /// Bytes of its record (header and payload).
    pub record_bytes: u64,
}

/// Record bytes to deallocate once no reader can hold their location any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hole {
    /// Pack number.
    pub pack: u32,
    /// Offset of the record.
    pub offset: u64,
    /// Record length.
    pub len: u64,
}

/// What [`Store::punch`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Punched {
    /// Bytes deallocated.
    pub bytes: u64,
    /// Holes that could not be punched.
    pub failed: u64,
    /// The first failure, naming the pack.
    pub first_error: Option<String>,
}

impl Punched {
    fn fail(&mut self, why: String) {
        self.failed += 1;
        self.first_error.get_or_insert(why);
    }
}

/// What [`Store::evict`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Chunks that left the index.
    pub chunks: u64,
    /// Their record bytes.
    pub bytes: u64,
    /// Chunks asked for that were not evictable (gone already, or a converted blob
    /// names them now).
    pub kept: u64,
    /// The records, for [`Store::punch`] after the grace period.
    pub holes: Vec<Hole>,
}

/// Digests that no registry is known to keep: those named by converted layers (layer
/// records with no remote source) and those of blobs with no remote row. Both, since a
/// blob is named by its table alone: a converted layer and a lazily pulled one may
/// share a blob that has a remote row (the lazy one registered it first), or one that
/// has none (the converted one did, and may since have been removed).
fn converted_chunks(
    layers: &impl ReadableTable<&'static str, &'static [u8]>,
    blobs: &impl ReadableTable<&'static str, &'static [u8]>,
    remote_blobs: &impl ReadableTable<&'static str, &'static [u8]>,
) -> std::result::Result<std::result::Result<HashSet<ChunkDigest>, String>, redb::Error> {
    let mut out = HashSet::new();
    let mut done = HashSet::new();
    for row in blobs.iter()? {
        let (id, table) = row?;
        if remote_blobs.get(id.value())?.is_some() {
            continue;
        }
        let Some(entries) = blob::decode_table(table.value()) else {
            return Ok(Err(format!("blob {}: malformed chunk table", id.value())));
        };
        out.extend(entries.iter().map(|e| e.digest));
        done.insert(id.value().to_string());
    }
    for row in layers.iter()? {
        let (diff_id, json) = row?;
        let Ok(record) = serde_json::from_slice::<LayerRecord>(json.value()) else {
            return Ok(Err(format!("layer {}: malformed record", diff_id.value())));
        };
        if record.remote.is_some() {
            continue;
        }
        for id in record.blobs {
            if !done.insert(id.clone()) {
                continue;
            }
            let Some(table) = blobs.get(id.as_str())? else {
                return Ok(Err(format!(
                    "layer {}: blob {id} is missing",
                    record.diff_id
                )));
            };
            let Some(entries) = blob::decode_table(table.value()) else {
                return Ok(Err(format!("blob {id}: malformed chunk table")));
            };
            out.extend(entries.iter().map(|e| e.digest));
        }
    }
    Ok(Ok(out))
}

impl Store {
    /// Every evictable chunk (see the module doc), in pack order: oldest record first,
    /// since packs are numbered in the order they were started and appended to.
    pub fn evictable(&self) -> Result<Vec<Evictable>> {
        let txn = self.db.begin_read().map_err(self.db_err())?;
        let blobs = txn.open_table(BLOBS).map_err(self.db_err())?;
        let remote_blobs = txn.open_table(REMOTE_BLOBS).map_err(self.db_err())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.db_err())?;
        let layers = txn.open_table(LAYERS).map_err(self.db_err())?;
        let converted = converted_chunks(&layers, &blobs, &remote_blobs)
            .map_err(self.db_err())?
            .map_err(|m| self.corrupt(m))?;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for row in remote_blobs.iter().map_err(self.db_err())? {
            let (id, _) = row.map_err(self.db_err())?;
            let Some(table) = blobs.get(id.value()).map_err(self.db_err())? else {
                continue;
            };
            let entries = blob::decode_table(table.value()).ok_or_else(|| {
                self.corrupt(format!("blob {}: malformed chunk table", id.value()))
            })?;
            for e in entries {
                if converted.contains(&e.digest) || !seen.insert(e.digest) {
                    continue;
                }
                let here = chunks.get(e.digest.0.as_slice()).map_err(self.db_err())?;
                if let Some(v) = here {
                    let (pack, offset, stored_len, _, _) = v.value();
                    out.push(Evictable {
                        digest: e.digest,
                        pack,
                        offset,
                        record_bytes: record_bytes(stored_len),
                    });
                }
            }
        }
        out.sort_by_key(|e| (e.pack, e.offset));
        Ok(out)
    }

    /// Takes `digests` out of the index (each only if it is still evictable), in one
    /// transaction under the exclusive lock; see the module doc. Their records are left
    /// for [`Store::punch`].
    pub fn evict(&self, digests: &[ChunkDigest]) -> Result<Evicted> {
        let _guard = self.exclusive();
        let mut done = Evicted::default();
        let result = (|| -> std::result::Result<std::result::Result<(), String>, redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let blobs = txn.open_table(BLOBS)?;
                let layers = txn.open_table(LAYERS)?;
                let remote_blobs = txn.open_table(REMOTE_BLOBS)?;
                let converted = match converted_chunks(&layers, &blobs, &remote_blobs)? {
                    Ok(c) => c,
                    Err(m) => return Ok(Err(m)),
                };
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut leaves = txn.open_table(CHUNK_LEAVES)?;
                let mut sums = txn.open_table(CHUNK_SUMS)?;
                let mut remote_refs = txn.open_table(REMOTE_REFS)?;
                let mut pack_live = txn.open_table(PACK_LIVE)?;
                let mut seen = HashSet::new();
                for d in digests {
                    if !seen.insert(*d) {
                        continue;
                    }
                    let key = d.0.as_slice();
                    if converted.contains(d) {
                        done.kept += 1;
                        continue;
                    }
                    let Some((pack, offset, stored_len, _, refs)) =
                        chunks.remove(key)?.map(|v| v.value())
                    else {
                        done.kept += 1;
                        continue;
                    };
                    leaves.remove(key)?;
                    sums.remove(key)?;
                    let before = remote_refs.get(key)?.map_or(0, |v| v.value());
                    remote_refs.insert(key, before + refs)?;
                    let len = record_bytes(stored_len);
                    let live = pack_live.get(pack)?.map_or(0, |v| v.value());
                    pack_live.insert(pack, live.saturating_sub(len))?;
                    done.chunks += 1;
                    done.bytes += len;
                    done.holes.push(Hole { pack, offset, len });
                }
            }
            txn.commit()?;
            Ok(Ok(()))
        })();
        match result {
            Ok(Ok(())) => Ok(done),
            Ok(Err(m)) => Err(self.corrupt(m)),
            Err(e) => Err(StoreError::Db {
                path: self.db_path.clone(),
                source: e,
            }),
        }
    }

    /// Deallocates the records of evicted chunks (their pack keeps its length; the
    /// range reads as zeros). A pack that is gone (retired by compaction) is skipped; a
    /// hole that cannot be punched is counted and the rest still are (its bytes stay as
    /// dead pack space, which compaction reclaims).
    pub fn punch(&self, holes: &[Hole]) -> Punched {
        let mut by_pack: Vec<&Hole> = holes.iter().collect();
        by_pack.sort_by_key(|h| (h.pack, h.offset));
        let mut done = Punched::default();
        let mut open: Option<(u32, std::fs::File)> = None;
        for h in by_pack {
            if open.as_ref().is_none_or(|(p, _)| *p != h.pack) {
                let path = self.pack_path(h.pack);
                open = match OpenOptions::new().write(true).open(&path) {
                    Ok(f) => Some((h.pack, f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        done.fail(format!("{}: {e}", path.display()));
                        None
                    }
                };
            }
            let Some((_, f)) = &open else { continue };
            // SAFETY: fallocate(2) on an fd we own, with plain integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    h.offset as libc::off_t,
                    h.len as libc::off_t,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                done.fail(format!(
                    "{}: punching a hole: {e}",
                    self.pack_path(h.pack).display()
                ));
                continue;
            }
            done.bytes += h.len;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::digest::Leaves;
    use crate::store::chunk;
    use crate::store::remote::store_tests::{record_of, remote_layer};
    use crate::store::tests::{commit_layer, pack_payload_sum, sum_row};

    fn chunk_of(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(n) ^ n).collect()
    }

    fn fetch(store: &Arc<Store>, data: &[&Vec<u8>]) {
        let mut w = store.fetch_writer().unwrap();
        for c in data {
            let (d, l, r): (ChunkDigest, Option<Leaves>, Vec<u8>) = record_of(c);
            w.append(&r, d, c.len() as u32, l).unwrap();
        }
        w.commit().unwrap();
    }

    #[test]
    fn only_chunks_no_converted_blob_names_are_evicted_and_come_back_as_remote() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (a, b, c) = (chunk_of(1, 65536), chunk_of(2, 40_000), chunk_of(3, 65536));
        // `a` is converted; the lazy layer names a, b, c; b and c get fetched.
        commit_layer(&store, "11", std::slice::from_ref(&a));
        remote_layer(&store, "22", &[a.clone(), b.clone(), c.clone()]);
        fetch(&store, &[&b, &c]);
        let ev = store.evictable().unwrap();
        let (db, dc) = (ChunkDigest::of(&b), ChunkDigest::of(&c));
        assert_eq!(
            ev.iter().map(|e| e.digest).collect::<Vec<_>>(),
            vec![db, dc],
            "fetch order, and never the converted chunk"
        );
        let pack = ev[0].pack;
        let live_before = store.stats().unwrap();

        let done = store.evict(&[db, ChunkDigest::of(&a)]).unwrap();
        assert_eq!((done.chunks, done.kept), (1, 1));
        assert_eq!(done.bytes, ev[0].record_bytes);
        assert!(store.locate(&db).unwrap().is_none());
        assert!(store.locate(&ChunkDigest::of(&a)).unwrap().is_some());
        assert_eq!(store.remote_chunks().unwrap(), 1, "b is remote again");
        let live_after = store.stats().unwrap();
        assert_eq!(
            live_after.dead_bytes,
            live_before.dead_bytes + done.bytes,
            "the pack's live bytes drop by the record"
        );

        // The record still reads until punched; then it reads as zeros, and the pack
        // keeps its length.
        let path = store.pack_path(pack);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(store.punch(&done.holes).bytes, done.bytes);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let mut rec = vec![0u8; done.holes[0].len as usize];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&path).unwrap(),
            &mut rec,
            done.holes[0].offset,
        )
        .unwrap();
        assert!(rec.iter().all(|&x| x == 0));
        // `c`, its neighbour in the pack, is untouched.
        let mut out = vec![];
        store.read_chunk(&dc, &mut out).unwrap();
        assert_eq!(out, c);

        // Fetched again, b is indexed with the count it had.
        fetch(&store, &[&b]);
        store.read_chunk(&db, &mut out).unwrap();
        assert_eq!(out, b);
        assert_eq!(store.remote_chunks().unwrap(), 0);
        // A punch of a pack that compaction retired is skipped.
        let gone = Hole {
            pack: 999,
            offset: 0,
            len: chunk::RECORD_HEADER_BYTES as u64,
        };
        assert_eq!(store.punch(&[gone]), Punched::default());
    }

    #[test]
    fn an_evicted_chunk_loses_its_sum_and_a_refetch_brings_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = chunk_of(8, 30_000);
        let da = ChunkDigest::of(&a);
        remote_layer(&store, "99", std::slice::from_ref(&a));
        fetch(&store, &[&a]);
        let first = store.locate(&da).unwrap().unwrap();
        assert_eq!(first.sum, Some(pack_payload_sum(&store, &first)));
        assert_eq!(store.evict(&[da]).unwrap().chunks, 1);
        assert_eq!(sum_row(&store, &da), None);
        // Fetched again into a new record: the row is that record's.
        fetch(&store, &[&a]);
        let again = store.locate(&da).unwrap().unwrap();
        assert_ne!((again.pack, again.offset), (first.pack, first.offset));
        assert_eq!(again.sum, Some(pack_payload_sum(&store, &again)));
        assert_eq!(sum_row(&store, &da), again.sum);
    }

    #[test]
    fn a_chunk_a_conversion_names_after_it_was_listed_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = chunk_of(4, 65536);
        let lazy = remote_layer(&store, "33", std::slice::from_ref(&a));
        fetch(&store, &[&a]);
        assert_eq!(store.evictable().unwrap().len(), 1);
        // A converted layer comes to name it between the listing and the eviction.
        commit_layer(&store, "44", std::slice::from_ref(&a));
        let done = store.evict(&[ChunkDigest::of(&a)]).unwrap();
        assert_eq!((done.chunks, done.kept), (0, 1));
        assert!(done.holes.is_empty());
        // Removing both layers still frees it (the counts stayed exact).
        store.remove_layer(&lazy.diff_id).unwrap().unwrap();
        store.remove_layer("sha256:44").unwrap().unwrap();
        assert!(store.locate(&ChunkDigest::of(&a)).unwrap().is_none());
        assert_eq!(store.remote_chunks().unwrap(), 0);
    }

    /// A converted layer registers a blob first; a lazily pulled layer with the same
    /// table shares it (no remote row), and another lazily pulled blob names its chunk
    /// too. With the converted layer gone, the shared blob still has no registry copy:
    /// its chunk must stay.
    #[test]
    fn a_chunk_of_a_blob_with_no_remote_row_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (a, b) = (chunk_of(6, 65536), chunk_of(7, 20_000));
        commit_layer(&store, "66", std::slice::from_ref(&a));
        let shared = remote_layer(&store, "77", std::slice::from_ref(&a));
        assert!(store.remote_blob(&shared.blobs[0]).unwrap().is_none());
        remote_layer(&store, "88", &[a.clone(), b.clone()]);
        fetch(&store, &[&b]);
        store.remove_layer("sha256:66").unwrap().unwrap();
        let ev: Vec<ChunkDigest> = store
            .evictable()
            .unwrap()
            .iter()
            .map(|e| e.digest)
            .collect();
        assert_eq!(ev, vec![ChunkDigest::of(&b)]);
        let done = store
            .evict(&[ChunkDigest::of(&a), ChunkDigest::of(&b)])
            .unwrap();
        assert_eq!((done.chunks, done.kept), (1, 1));
        assert!(store.locate(&ChunkDigest::of(&a)).unwrap().is_some());
    }

    #[test]
    fn removing_a_lazy_layer_after_an_eviction_forgets_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = chunk_of(5, 30_000);
        let lazy = remote_layer(&store, "55", std::slice::from_ref(&a));
        fetch(&store, &[&a]);
        assert_eq!(store.evict(&[ChunkDigest::of(&a)]).unwrap().chunks, 1);
        assert_eq!(store.remote_chunks().unwrap(), 1);
        store.remove_layer(&lazy.diff_id).unwrap().unwrap();
        assert_eq!(store.remote_chunks().unwrap(), 0);
        assert!(store.evictable().unwrap().is_empty());
    }
}
