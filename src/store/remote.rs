//! Chunks that live in a registry until they are read: where each chunk of a lazily
//! pulled blob is published ([`RemoteBlob`]), and the writer that keeps fetched chunks
//! ([`FetchWriter`]).
//!
//! A lazily pulled layer is registered like a converted one (its image, its blob table,
//! a layer record), except that its chunks need not be in the packs. Each chunk a
//! registered blob names is either in the chunk index (`chunks`, with a count of the
//! blobs naming it) or absent with its count in `remote_refs`. A fetched chunk moves
//! from the second to the first when the fetch writer commits it; removing a layer
//! decrements whichever holds the chunk. So a chunk is counted exactly once, present or
//! not, and nothing that a registered blob names is lost when another blob goes.
//!
//! Fetched chunks are appended to a pack of their own (leased, see the store's module
//! doc), never to an ingest's: an ingest holds its lock for a whole layer, and a reader
//! waiting on the network must not wait for a conversion too. The records are the same
//! `DDC1` records the packs hold (see [`super::chunk`]), which is also the format of the
//! published data blobs: a verified record is appended as it arrived. Appended records
//! are readable at once (the page cache), and become part of the index only at
//! [`FetchWriter::commit`], after an `fdatasync`: a crash before it loses the fetch, not
//! the index's promise.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{
    blob, chunk, io_err, record_bytes, ChunkLoc, LayerRecord, RawEntry, Result, Store, StoreError,
    BLOBS, BLOB_REFS, CHUNKS, CHUNK_LEAVES, CHUNK_SUMS, LAYERS, LAYER_ALIASES, META_MAX_PACK,
    PACKS, PACK_LIVE, REMOTE_BLOBS, REMOTE_REFS, STORE_META,
};
use crate::digest::{ChunkDigest, Leaves};

/// Encoding version of a [`RemoteBlob`] as the store keeps it.
const REMOTE_BLOB_VERSION: u8 = 1;
/// Bytes of one encoded [`Locator`].
pub const LOCATOR_BYTES: usize = 16;
/// Most data blobs one remote blob may name.
pub const MAX_DATA_BLOBS: usize = 1 << 16;

/// Where one chunk is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locator {
    /// A whole `DDC1` record at `offset` in data blob `data`, `len` bytes long.
    Record {
        /// Index of the data blob in [`RemoteBlob::data_blobs`].
        data: u16,
        /// Byte offset of the record's header in the data blob.
        offset: u64,
        /// Record length (header and payload).
        len: u32,
    },
}

/// Locator kind byte of [`Locator::Record`]. Kinds are never reused; a reader refuses a
/// kind it does not know (a later format may add, say, offsets into a gzip layer).
const KIND_RECORD: u8 = 1;

impl Locator {
    /// The 16-byte encoding: kind (u8), 0 (u8), data (u16 LE), offset (u64 LE),
    /// len (u32 LE).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Locator::Record { data, offset, len } => {
                out.push(KIND_RECORD);
                out.push(0);
                out.extend_from_slice(&data.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }

    /// Decodes one locator; `None` for an unknown kind or a record length outside
    /// what a chunk record can be.
    pub fn decode(b: &[u8; LOCATOR_BYTES]) -> Option<Locator> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        match (b[0], b[1]) {
            (KIND_RECORD, 0) => {
                let len = u32_at(12);
                let ok = (chunk::RECORD_HEADER_BYTES as u32 + 1..=chunk::MAX_RECORD_BYTES as u32)
                    .contains(&len);
                ok.then(|| Locator::Record {
                    data: u16_at(2),
                    offset: u64_at(4),
                    len,
                })
            }
            _ => None,
        }
    }
}

/// Where the chunks of one blob are published: the repository, its data blobs, and one
/// [`Locator`] per entry of the blob's table (same order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteBlob {
    /// The repository the data blobs live in.
    pub source: RemoteSource,
    /// Digests (`sha256:<hex>`) of the data blobs the locators index into.
    pub data_blobs: Vec<String>,
    /// One per chunk of the blob, in table order.
    pub locators: Vec<Locator>,
}

/// A repository of a registry: `registry` is the host (and port) as the image reference
/// names it, `repository` its path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteSource {
    /// Registry host\[:port\].
    pub registry: String,
    /// Repository path.
    pub repository: String,
}

#[derive(Serialize, Deserialize)]
struct RemoteBlobHeader {
    source: RemoteSource,
    data_blobs: Vec<String>,
}

impl RemoteBlob {
    /// The stored form: version byte, u32 LE header length, JSON header (source and data
    /// blobs), then the locators.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&RemoteBlobHeader {
            source: self.source.clone(),
            data_blobs: self.data_blobs.clone(),
        })
        .expect("serializable");
        let mut out = Vec::with_capacity(5 + header.len() + self.locators.len() * LOCATOR_BYTES);
        out.push(REMOTE_BLOB_VERSION);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for l in &self.locators {
            l.encode(&mut out);
        }
        out
    }

    /// Parses [`RemoteBlob::encode`]'s output, checking every locator against the data
    /// blobs it names.
    pub fn decode(b: &[u8]) -> Option<RemoteBlob> {
        let (&version, rest) = b.split_first()?;
        if version != REMOTE_BLOB_VERSION || rest.len() < 4 {
            return None;
        }
        let hlen = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        let header: RemoteBlobHeader = serde_json::from_slice(rest.get(4..4 + hlen)?).ok()?;
        let body = &rest[4 + hlen..];
        if !body.len().is_multiple_of(LOCATOR_BYTES) || header.data_blobs.len() > MAX_DATA_BLOBS {
            return None;
        }
        let locators = body
            .chunks_exact(LOCATOR_BYTES)
            .map(|c| Locator::decode(c.try_into().expect("exact chunks")))
            .collect::<Option<Vec<_>>>()?;
        let n = header.data_blobs.len();
        if locators
            .iter()
            .any(|Locator::Record { data, .. }| usize::from(*data) >= n)
        {
            return None;
        }
        Some(RemoteBlob {
            source: header.source,
            data_blobs: header.data_blobs,
            locators,
        })
    }
}

/// Appends verified fetched records to a leased pack and commits them to the index in
/// groups (see the module doc). One per process: the fetcher owns it.
pub struct FetchWriter {
    store: Arc<Store>,
    pack: u32,
    path: PathBuf,
    file: File,
    committed: u64,
    len: u64,
    pending: HashMap<ChunkDigest, ChunkLoc>,
    /// Commits that settled something, so far (see [`FetchWriter::commits`]).
    commits: u64,
}

/// What [`FetchWriter::commit`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchCommit {
    /// Every chunk the commit settled (indexed or dropped): none of them is pending.
    pub digests: Vec<ChunkDigest>,
    /// Chunks that entered the index.
    pub indexed: u64,
    /// Chunks left out: stored meanwhile by someone else, or named by no blob any more
    /// (their bytes are dead space of the pack).
    pub dropped: u64,
}

/// A lazily pulled layer to register: its record (with `remote` set), its image, and
/// per blob the table and where its chunks are published.
pub struct RemoteLayerCommit<'a> {
    /// The record.
    pub record: LayerRecord,
    /// The image, in a temporary file on the root's filesystem; renamed into place.
    pub image_tmp: &'a Path,
    /// Blobs in device order: id, table, locators.
    pub blobs: Vec<(String, Vec<RawEntry>, RemoteBlob)>,
}

impl Store {
    /// Registers a lazily pulled layer: renames its image into place and, in one
    /// transaction, its blobs (each chunk counted in `chunks` if the packs hold it, else
    /// in `remote_refs`), their locators, the record and its aliases. A layer already
    /// registered (lazily or converted) keeps its first registration and gains the
    /// record's digests as aliases. Stores no chunk.
    pub fn commit_remote_layer(&self, commit: RemoteLayerCommit<'_>) -> Result<LayerRecord> {
        let record = commit.record;
        if record.remote.is_none() || record.blobs.len() != commit.blobs.len() {
            return Err(self.corrupt(format!(
                "remote layer {}: record and blobs disagree",
                record.diff_id
            )));
        }
        for (id, entries, remote) in &commit.blobs {
            if remote.locators.len() != entries.len() {
                return Err(self.corrupt(format!(
                    "remote layer {}: blob {id} has {} locators for {} chunks",
                    record.diff_id,
                    remote.locators.len(),
                    entries.len()
                )));
            }
        }
        let previous = self.layer(&record.diff_id)?;
        let image = self.image_path(record.id_hex());
        if previous.is_none() {
            fs::rename(commit.image_tmp, &image).map_err(io_err(&image))?;
            let layers_dir = self.root.join("layers");
            File::open(&layers_dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&layers_dir))?;
        }
        let result = (|| -> std::result::Result<LayerRecord, redb::Error> {
            let txn = self.db.begin_write()?;
            let kept;
            {
                let mut layers = txn.open_table(LAYERS)?;
                let mut aliases = txn.open_table(LAYER_ALIASES)?;
                let prev = layers
                    .get(record.diff_id.as_str())?
                    .map(|v| v.value().to_vec());
                if let Some(prev) = prev {
                    let mut prev: LayerRecord = serde_json::from_slice(&prev)
                        .map_err(|_| redb::Error::Corrupted(format!("layer {}", record.diff_id)))?;
                    for d in &record.digests {
                        if !prev.digests.contains(d) {
                            prev.digests.push(d.clone());
                        }
                    }
                    let json = serde_json::to_vec(&prev).expect("serializable");
                    layers.insert(record.diff_id.as_str(), json.as_slice())?;
                    kept = prev;
                } else {
                    let mut blobs = txn.open_table(BLOBS)?;
                    let mut blob_refs = txn.open_table(BLOB_REFS)?;
                    let mut remote_blobs = txn.open_table(REMOTE_BLOBS)?;
                    let mut chunks = txn.open_table(CHUNKS)?;
                    let mut remote_refs = txn.open_table(REMOTE_REFS)?;
                    for (id, entries, remote) in &commit.blobs {
                        let refs = blob_refs.get(id.as_str())?.map_or(0, |v| v.value());
                        if refs == 0 {
                            blobs.insert(id.as_str(), blob::encode_table(entries).as_slice())?;
                            remote_blobs.insert(id.as_str(), remote.encode().as_slice())?;
                            let mut seen = HashSet::new();
                            for e in entries {
                                if !seen.insert(e.digest) {
                                    continue;
                                }
                                let key = e.digest.0.as_slice();
                                let here = chunks.get(key)?.map(|v| v.value());
                                if let Some((p, o, s, r, n)) = here {
                                    chunks.insert(key, (p, o, s, r, n + 1))?;
                                } else {
                                    let n = remote_refs.get(key)?.map_or(0, |v| v.value());
                                    remote_refs.insert(key, n + 1)?;
                                }
                            }
                        }
                        blob_refs.insert(id.as_str(), refs + 1)?;
                    }
                    let json = serde_json::to_vec(&record).expect("serializable");
                    layers.insert(record.diff_id.as_str(), json.as_slice())?;
                    kept = record.clone();
                }
                for d in &record.digests {
                    aliases.insert(d.as_str(), record.diff_id.as_str())?;
                }
            }
            txn.commit()?;
            Ok(kept)
        })();
        result.map_err(|e| StoreError::Db {
            path: self.db_path.clone(),
            source: e,
        })
    }

    /// The writer of fetched chunks, on a pack of its own.
    pub fn fetch_writer(self: &Arc<Self>) -> Result<FetchWriter> {
        let pack = self.lease_new_pack()?;
        let path = self.pack_path(pack);
        let file = match OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                self.release_pack(pack);
                return Err(io_err(&path)(e));
            }
        };
        Ok(FetchWriter {
            store: self.clone(),
            pack,
            path,
            file,
            committed: 0,
            len: 0,
            pending: HashMap::new(),
            commits: 0,
        })
    }
}

impl FetchWriter {
    /// Appends `record`, a `DDC1` record already verified to hold chunk `digest` of
    /// `raw_len` bytes (with its `leaves`), and returns where it is readable from now on.
    /// It enters the index at the next [`FetchWriter::commit`].
    pub fn append(
        &mut self,
        record: &[u8],
        digest: ChunkDigest,
        raw_len: u32,
        leaves: Option<Leaves>,
    ) -> Result<ChunkLoc> {
        debug_assert!(record.len() > chunk::RECORD_HEADER_BYTES);
        if let Some(loc) = self.pending.get(&digest) {
            return Ok(*loc);
        }
        if self.len >= self.store.pack_roll_bytes {
            self.roll()?;
        }
        self.file
            .write_all_at(record, self.len)
            .map_err(io_err(&self.path))?;
        let loc = ChunkLoc {
            pack: self.pack,
            offset: self.len,
            stored_len: (record.len() - chunk::RECORD_HEADER_BYTES) as u32,
            raw_len,
            leaves,
            // The record was verified against its digest before it came here.
            sum: Some(chunk::payload_sum(&record[chunk::RECORD_HEADER_BYTES..])),
        };
        self.len += record.len() as u64;
        self.pending.insert(digest, loc);
        Ok(loc)
    }

    /// Chunks appended since the last commit.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Commits that settled chunks so far (a roll's included). A chunk appended when
    /// this was `n` is settled (indexed or dropped) once it passes `n`.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Syncs the pack, then moves every pending chunk that some blob still names from
    /// `remote_refs` into the chunk index, in one transaction.
    pub fn commit(&mut self) -> Result<FetchCommit> {
        if self.pending.is_empty() {
            return Ok(FetchCommit::default());
        }
        self.file.sync_data().map_err(io_err(&self.path))?;
        let store = &self.store;
        let mut done = FetchCommit::default();
        let result = (|| -> std::result::Result<(), redb::Error> {
            let txn = store.db.begin_write()?;
            {
                let mut chunks = txn.open_table(CHUNKS)?;
                let mut leaves = txn.open_table(CHUNK_LEAVES)?;
                let mut sums = txn.open_table(CHUNK_SUMS)?;
                let mut refs = txn.open_table(REMOTE_REFS)?;
                let mut added = 0u64;
                for (d, l) in &self.pending {
                    let key = d.0.as_slice();
                    let wanted = refs.remove(key)?.map_or(0, |v| v.value());
                    if wanted == 0 || chunks.get(key)?.is_some() {
                        done.dropped += 1;
                        continue;
                    }
                    chunks.insert(key, (l.pack, l.offset, l.stored_len, l.raw_len, wanted))?;
                    if let Some(lv) = &l.leaves {
                        leaves.insert(key, lv.as_bytes())?;
                    }
                    if let Some(sum) = l.sum {
                        sums.insert(key, sum)?;
                    }
                    added += record_bytes(l.stored_len);
                    done.indexed += 1;
                }
                // The row exists even when nothing was indexed: readers were told where
                // the records are, and a pack file without a row is compaction's to
                // unlink.
                let mut pack_live = txn.open_table(PACK_LIVE)?;
                let live = pack_live.get(self.pack)?.map_or(0, |v| v.value());
                pack_live.insert(self.pack, live + added)?;
                let mut packs = txn.open_table(PACKS)?;
                packs.insert(self.pack, self.len)?;
                let mut meta = txn.open_table(STORE_META)?;
                let max_pack = meta.get(META_MAX_PACK)?.map_or(0, |v| v.value());
                meta.insert(META_MAX_PACK, max_pack.max(u64::from(self.pack)))?;
            }
            txn.commit()?;
            Ok(())
        })();
        result.map_err(|e| StoreError::Db {
            path: store.db_path.clone(),
            source: e,
        })?;
        self.committed = self.len;
        self.commits += 1;
        done.digests = self.pending.drain().map(|(d, _)| d).collect();
        Ok(done)
    }

    /// Commits what is pending and continues on a new pack.
    fn roll(&mut self) -> Result<()> {
        self.commit()?;
        let pack = self.store.lease_new_pack()?;
        let path = self.store.pack_path(pack);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                self.store.release_pack(pack);
                io_err(&path)(e)
            })?;
        self.store.release_pack(self.pack);
        (self.pack, self.path, self.file) = (pack, path, file);
        (self.committed, self.len) = (0, 0);
        Ok(())
    }
}

impl Drop for FetchWriter {
    fn drop(&mut self) {
        if self.len != self.committed {
            // Uncommitted records are never named by the index: drop them.
            let _ = self.file.set_len(self.committed);
        }
        self.store.release_pack(self.pack);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_round_trip_and_unknown_kinds_are_refused() {
        let l = Locator::Record {
            data: 3,
            offset: 1 << 40,
            len: 70_000,
        };
        let mut b = vec![];
        l.encode(&mut b);
        assert_eq!(b.len(), LOCATOR_BYTES);
        assert_eq!(Locator::decode(b.as_slice().try_into().unwrap()), Some(l));
        let mut other = b.clone();
        other[0] = 2;
        assert_eq!(Locator::decode(other.as_slice().try_into().unwrap()), None);
        let mut huge = b.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Locator::decode(huge.as_slice().try_into().unwrap()), None);
    }

    #[test]
    fn remote_blobs_round_trip_and_bad_indexes_are_refused() {
        let r = RemoteBlob {
            source: RemoteSource {
                registry: "127.0.0.1:5000".into(),
                repository: "a/b".into(),
            },
            data_blobs: vec!["sha256:00".into(), "sha256:11".into()],
            locators: vec![
                Locator::Record {
                    data: 0,
                    offset: 0,
                    len: 100,
                },
                Locator::Record {
                    data: 1,
                    offset: 100,
                    len: 65584,
                },
            ],
        };
        let enc = r.encode();
        assert_eq!(RemoteBlob::decode(&enc), Some(r.clone()));
        let mut bad = r;
        bad.data_blobs.pop();
        assert_eq!(RemoteBlob::decode(&bad.encode()), None);
        assert_eq!(RemoteBlob::decode(&enc[..enc.len() - 1]), None);
        assert_eq!(RemoteBlob::decode(&[]), None);
    }
}

#[cfg(test)]
pub(crate) mod store_tests {
    use super::*;
    use crate::store::blob::{blob_id, BlobBuilder};
    use crate::store::tests::{commit_layer, pack_payload_sum, sum_row};
    use crate::store::DEFAULT_CHUNK_BYTES;

    fn chunk(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(n) ^ n).collect()
    }

    pub(crate) fn record_of(data: &[u8]) -> (ChunkDigest, Option<Leaves>, Vec<u8>) {
        let (d, leaves) = Leaves::digest_of(data);
        let mut rec = vec![];
        chunk::encode_record(data, &d, &mut rec);
        (d, leaves, rec)
    }

    /// Registers a remote layer over `chunks` (locators are made up: nothing fetches).
    pub(crate) fn remote_layer(store: &Store, diff: &str, chunks: &[Vec<u8>]) -> LayerRecord {
        let mut b = BlobBuilder::new();
        for c in chunks {
            b.add(ChunkDigest::of(c), c.len() as u32);
        }
        let id = blob_id(&b.encode());
        let tmp = store.root().join("layers").join(format!("{diff}.tmp"));
        fs::write(&tmp, b"image").unwrap();
        let source = RemoteSource {
            registry: "127.0.0.1:1".into(),
            repository: "r".into(),
        };
        let locators = b
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| Locator::Record {
                data: 0,
                offset: i as u64 * 100_000,
                len: e.raw_len + chunk::RECORD_HEADER_BYTES as u32,
            })
            .collect();
        let record = LayerRecord {
            diff_id: format!("sha256:{diff}"),
            digests: vec![format!("sha256:{diff}00")],
            blobs: vec![id.clone()],
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            image_bytes: 5,
            files: 1,
            chunks: chunks.len() as u64,
            new_chunks: 0,
            logical_bytes: chunks.iter().map(|c| c.len() as u64).sum(),
            stored_bytes: 0,
            remote: Some(crate::store::RemoteLayer {
                source: source.clone(),
                artifact: "sha256:aa".into(),
            }),
        };
        store
            .commit_remote_layer(RemoteLayerCommit {
                record,
                image_tmp: &tmp,
                blobs: vec![(
                    id,
                    b.entries().to_vec(),
                    RemoteBlob {
                        source,
                        data_blobs: vec!["sha256:bb".into()],
                        locators,
                    },
                )],
            })
            .unwrap()
    }

    #[test]
    fn a_remote_layer_counts_absent_chunks_until_they_are_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (a, b, c) = (chunk(1, 65536), chunk(2, 4000), chunk(3, 70_000));
        // `a` is local already (a converted layer has it).
        commit_layer(&store, "11", std::slice::from_ref(&a));
        let rec = remote_layer(&store, "22", &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(store.remote_chunks().unwrap(), 2);
        let table = store.blob_table(&rec.blobs[0]).unwrap().unwrap();
        let remote = table
            .remote()
            .expect("the table knows where its chunks are");
        assert_eq!(remote.locators.len(), 3);
        let present: Vec<bool> = table.entries().iter().map(|e| e.loc.is_some()).collect();
        assert_eq!(present, [true, false, false]);

        // Fetch `b`: readable at once, indexed at commit with the remote count.
        let mut w = store.fetch_writer().unwrap();
        let (db, lb, rb) = record_of(&b);
        let loc = w.append(&rb, db, b.len() as u32, lb).unwrap();
        let mut out = vec![];
        assert!(store.read_chunk(&db, &mut out).is_err(), "not indexed yet");
        let done = w.commit().unwrap();
        assert_eq!((done.indexed, done.dropped, done.digests), (1, 0, vec![db]));
        assert_eq!(store.locate(&db).unwrap(), Some(loc));
        store.read_chunk(&db, &mut out).unwrap();
        assert_eq!(out, b);
        assert_eq!(store.remote_chunks().unwrap(), 1);

        // A second remote layer naming `b` and `c`, then removing the first: `b` stays
        // (named by the second), `a` stays (the converted layer), `c` stays counted.
        let rec2 = remote_layer(&store, "33", &[b.clone(), c.clone()]);
        store.remove_layer(&rec.diff_id).unwrap().unwrap();
        assert!(store.locate(&db).unwrap().is_some());
        assert!(store.locate(&ChunkDigest::of(&a)).unwrap().is_some());
        assert_eq!(store.remote_chunks().unwrap(), 1);
        // Removing the second frees `b` and forgets `c`.
        store.remove_layer(&rec2.diff_id).unwrap().unwrap();
        assert!(store.locate(&db).unwrap().is_none());
        assert_eq!(store.remote_chunks().unwrap(), 0);
        assert!(store.remote_blob(&rec2.blobs[0]).unwrap().is_none());
    }

    #[test]
    fn fetched_chunks_nobody_names_or_already_stored_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (a, b) = (chunk(4, 65536), chunk(5, 9000));
        let rec = remote_layer(&store, "44", std::slice::from_ref(&a));
        let mut w = store.fetch_writer().unwrap();
        let (da, la, ra) = record_of(&a);
        let (dbb, lb, rb) = record_of(&b);
        w.append(&ra, da, a.len() as u32, la).unwrap();
        w.append(&rb, dbb, b.len() as u32, lb).unwrap();
        // The layer goes before the commit: `a` is named by nobody now.
        store.remove_layer(&rec.diff_id).unwrap();
        let done = w.commit().unwrap();
        assert_eq!((done.indexed, done.dropped), (0, 2));
        assert!(store.locate(&da).unwrap().is_none());
    }

    #[test]
    fn a_converted_layer_absorbs_the_remote_count_of_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = chunk(6, 65536);
        let remote = remote_layer(&store, "55", std::slice::from_ref(&a));
        commit_layer(&store, "66", std::slice::from_ref(&a));
        assert_eq!(store.remote_chunks().unwrap(), 0);
        // Both layers name it: it survives either removal alone.
        store.remove_layer("sha256:66").unwrap().unwrap();
        assert!(store.locate(&ChunkDigest::of(&a)).unwrap().is_some());
        store.remove_layer(&remote.diff_id).unwrap().unwrap();
        assert!(store.locate(&ChunkDigest::of(&a)).unwrap().is_none());
    }

    /// A chunk fetched (and indexed) while an ingest that also stored it runs: the
    /// ingest's commit keeps the fetched record, counts both blobs, and leaves its own
    /// copy as dead space (before, it overwrote the row and lost the remote count).
    #[test]
    fn an_ingest_keeps_a_chunk_the_fetch_writer_indexed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = chunk(9, 65536);
        let remote = remote_layer(&store, "88", std::slice::from_ref(&a));
        let mut ing = store.ingest().unwrap();
        let put = ing.put_chunk(&a).unwrap();
        assert!(put.new);
        let mut w = store.fetch_writer().unwrap();
        let (da, la, ra) = record_of(&a);
        let fetched = w.append(&ra, da, a.len() as u32, la).unwrap();
        assert_eq!(w.commit().unwrap().indexed, 1);
        let mut b = BlobBuilder::new();
        b.add(put.digest, a.len() as u32);
        let id = blob_id(&b.encode());
        let tmp = store.root().join("layers").join("99.tmp");
        fs::write(&tmp, b"image").unwrap();
        let rec = ing
            .commit(crate::store::LayerCommit {
                record: LayerRecord {
                    diff_id: "sha256:99".into(),
                    digests: vec![],
                    blobs: vec![id.clone()],
                    chunk_bytes: DEFAULT_CHUNK_BYTES,
                    image_bytes: 5,
                    files: 1,
                    chunks: 1,
                    new_chunks: 0,
                    logical_bytes: a.len() as u64,
                    stored_bytes: 0,
                    remote: None,
                },
                image_tmp: &tmp,
                blobs: vec![(id, b.entries().to_vec())],
            })
            .unwrap();
        assert_eq!((rec.new_chunks, rec.stored_bytes), (0, 0));
        assert_eq!(store.locate(&da).unwrap(), Some(fetched));
        let stats = store.stats().unwrap();
        assert_eq!(stats.chunks, 1);
        assert_eq!(
            stats.dead_bytes,
            ra.len() as u64,
            "the ingest's copy is dead"
        );
        // Named by both layers: it survives either removal alone.
        store.remove_layer(&remote.diff_id).unwrap().unwrap();
        assert!(store.locate(&da).unwrap().is_some());
        store.remove_layer("sha256:99").unwrap().unwrap();
        assert!(store.locate(&da).unwrap().is_none());
        assert_eq!(store.stats().unwrap().chunks, 0);
    }

    /// A `DDC1` record of `data` stored raw, as a publisher may have written one where
    /// this node would compress.
    fn raw_record_of(data: &[u8]) -> Vec<u8> {
        let len = (data.len() as u32).to_le_bytes();
        let mut rec = Vec::with_capacity(chunk::RECORD_HEADER_BYTES + data.len());
        rec.extend_from_slice(&chunk::RECORD_MAGIC.to_le_bytes());
        rec.extend_from_slice(&0u32.to_le_bytes());
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&ChunkDigest::of(data).0);
        rec.extend_from_slice(data);
        rec
    }

    /// The index keeps the sum of the record it points at: a record fetched raw (where
    /// a conversion here compresses) keeps its own, also when an ingest that stored the
    /// chunk meanwhile commits after the fetch.
    #[test]
    fn a_fetched_chunk_keeps_the_sum_of_the_record_it_arrived_as() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = chunk(10, 65536);
        let da = ChunkDigest::of(&a);
        let remote = remote_layer(&store, "aa", std::slice::from_ref(&a));
        let mut ing = store.ingest().unwrap();
        assert!(ing.put_chunk(&a).unwrap().new);
        let raw = raw_record_of(&a);
        let mut out = vec![0u8; a.len()];
        let leaves = chunk::verify_foreign_record(&raw, a.len() as u32, &da, &mut out).unwrap();
        let mut w = store.fetch_writer().unwrap();
        let fetched = w.append(&raw, da, a.len() as u32, leaves).unwrap();
        assert_eq!(fetched.sum, Some(chunk::payload_sum(&a)), "raw: the chunk");
        assert_eq!(w.commit().unwrap().indexed, 1);
        assert_eq!(store.locate(&da).unwrap(), Some(fetched));
        assert_eq!(fetched.sum, Some(pack_payload_sum(&store, &fetched)));

        // The ingest's compressed copy is dead space, and its sum is not indexed.
        let mut b = BlobBuilder::new();
        b.add(da, a.len() as u32);
        let id = blob_id(&b.encode());
        let tmp = store.root().join("layers").join("bb.tmp");
        fs::write(&tmp, b"image").unwrap();
        let rec = ing
            .commit(crate::store::LayerCommit {
                record: LayerRecord {
                    diff_id: "sha256:bb".into(),
                    digests: vec![],
                    blobs: vec![id.clone()],
                    chunk_bytes: DEFAULT_CHUNK_BYTES,
                    image_bytes: 5,
                    files: 1,
                    chunks: 1,
                    new_chunks: 0,
                    logical_bytes: a.len() as u64,
                    stored_bytes: 0,
                    remote: None,
                },
                image_tmp: &tmp,
                blobs: vec![(id, b.entries().to_vec())],
            })
            .unwrap();
        assert_eq!(rec.new_chunks, 0);
        assert!(store.stats().unwrap().dead_bytes < raw.len() as u64, "lz4");
        assert_eq!(store.locate(&da).unwrap(), Some(fetched));
        assert_eq!(sum_row(&store, &da), fetched.sum);

        // The row goes with the chunk.
        store.remove_layer(&remote.diff_id).unwrap().unwrap();
        assert_eq!(sum_row(&store, &da), fetched.sum);
        store.remove_layer("sha256:bb").unwrap().unwrap();
        assert!(store.locate(&da).unwrap().is_none());
        assert_eq!(sum_row(&store, &da), None);
    }

    #[test]
    fn the_fetch_writer_and_an_ingest_never_share_a_pack() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        commit_layer(&store, "77", &[chunk(7, 1000)]);
        let mut w = store.fetch_writer().unwrap();
        let ing = store.ingest().unwrap();
        assert_ne!(w.pack, ing.pack);
        drop(ing);
        // A fetched chunk nobody names: the writer's pack has a row and no live byte,
        // yet compaction leaves it alone while the writer holds it.
        let c = chunk(8, 3000);
        let (d, l, r) = record_of(&c);
        w.append(&r, d, c.len() as u32, l).unwrap();
        w.commit().unwrap();
        let stats = store
            .compact(crate::store::CompactOptions::dead_only())
            .unwrap();
        assert!(!stats.packs_retired.contains(&w.pack), "{stats:?}");
        store.finish_compaction().unwrap();
        assert!(store.pack_path(w.pack).exists());
        let pack = w.pack;
        drop(w);
        let stats = store
            .compact(crate::store::CompactOptions::dead_only())
            .unwrap();
        assert!(stats.packs_retired.contains(&pack), "{stats:?}");
    }
}
