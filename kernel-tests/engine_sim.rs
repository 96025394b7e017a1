//! The data plane against the cachefiles simulator: every byte of several stored layers
//! served under random concurrent READs, with 1 and 2 engine threads and both write
//! strategies; corrupt and missing chunks give unfilled ranges and error counts, never
//! wrong bytes; malformed messages are counted and survived.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dedupd::digest::ChunkDigest;
use dedupd::frontend::cachefiles::front::{CachefilesFront, RegistryHandle};
use dedupd::frontend::cachefiles::msg::{encode_open, encode_read};
use dedupd::serve::sim::{ReadOutcome, Sim, SimError};
use dedupd::serve::{Engine, EngineConfig, StatsSnapshot, WriteStrategy};
use dedupd::store::blob::{blob_id, BlobBuilder, BlobTable};
use dedupd::store::{BlobSource, LayerCommit, LayerRecord, Leaves, Registry, Store, BLOCK_BYTES};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(120);

/// One stored blob and what it must read as.
struct Blob {
    name: String,
    expected: Arc<[u8]>,
    /// Slot ranges that can never be served (corrupt or missing chunk).
    bad: Vec<(u64, u64)>,
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    registry: Registry,
    blobs: Vec<Blob>,
}

fn tmp_base() -> PathBuf {
    // Integration tests get a scratch dir inside target/ (the repo's filesystem, ext4
    // here): the simulator's O_DIRECT cache files need a real filesystem, not tmpfs.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

fn compressible(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let words = [
        "alpha ",
        "beta ",
        "gamma ",
        "/usr/lib/",
        "libc.so.6 ",
        "\0\0\0\0",
    ];
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.extend_from_slice(words[rng.random_range(0..words.len())].as_bytes());
    }
    v.truncate(n);
    v
}

/// Chunk contents of one layer: varied sizes and kinds.
fn layer_chunks(rng: &mut StdRng, layer: usize, shared: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let chunk = if layer == 2 { 1 << 20 } else { 64 << 10 };
    let n = match layer {
        0 => 40, // ~2.5 MiB
        1 => 24,
        2 => 3, // 3 MiB of 1 MiB chunks
        _ => 12,
    };
    for i in 0..n {
        let data = match i % 4 {
            0 => random_bytes(rng, chunk),
            1 => compressible(rng, chunk),
            2 => vec![0u8; chunk],
            _ => {
                let mut v = random_bytes(rng, chunk / 2);
                v.extend(compressible(rng, chunk / 2));
                v
            }
        };
        // Mostly distinct: mix the layer and index in.
        let mut data = data;
        data[0] = layer as u8;
        data[1] = i as u8;
        out.push(data);
    }
    // Files' tails: odd sizes whose slots are zero-padded.
    for len in [1usize, 100, 4095, 4097, 60000, 65535] {
        out.push(random_bytes(rng, len));
    }
    out.extend(shared.iter().cloned());
    out
}

fn commit_layer(store: &Store, layer: usize, chunks: &[Vec<u8>], image: &[u8]) -> (String, String) {
    let mut ing = store.ingest().unwrap();
    let mut b = BlobBuilder::new();
    for c in chunks {
        let put = ing.put_chunk(c).unwrap();
        b.add(put.digest, c.len() as u32);
    }
    let id = blob_id(&b.encode());
    let tmp = store
        .root()
        .join("layers")
        .join(format!("layer{layer}.tmp"));
    fs::write(&tmp, image).unwrap();
    let diff = format!("{:064x}", layer + 1);
    let record = LayerRecord {
        diff_id: format!("sha256:{diff}"),
        digests: vec![],
        blobs: vec![id.clone()],
        chunk_bytes: 65536,
        image_bytes: image.len() as u64,
        files: chunks.len() as u64,
        chunks: chunks.len() as u64,
        new_chunks: 0,
        logical_bytes: chunks.iter().map(|c| c.len() as u64).sum(),
        stored_bytes: 0,
        remote: None,
    };
    ing.commit(LayerCommit {
        record,
        image_tmp: &tmp,
        blobs: vec![(id.clone(), b.entries().to_vec())],
    })
    .unwrap();
    (diff, id)
}

fn expected_of(table: &BlobTable, data: &HashMap<ChunkDigest, Vec<u8>>) -> Arc<[u8]> {
    let mut v = vec![0u8; table.size_bytes() as usize];
    for e in table.entries() {
        let d = &data[&e.digest];
        v[e.blob_offset as usize..e.blob_offset as usize + d.len()].copy_from_slice(d);
    }
    v.into()
}

/// Builds four layers in a fresh store, corrupts two chunk records in their pack, and
/// removes one chunk from a blob's table. `read_around`: whether the engine under test
/// widens READs to whole chunks, which decides what of the second corrupt chunk (bad in
/// its last leaf only) reads as EIO.
fn fixture(read_around: bool) -> Fixture {
    let dir = tempfile::tempdir_in(tmp_base()).unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let shared = vec![random_bytes(&mut rng, 65536), compressible(&mut rng, 30000)];
    let mut data: HashMap<ChunkDigest, Vec<u8>> = HashMap::new();
    let mut names = Vec::new();
    let mut images = HashMap::new();
    for layer in 0..4 {
        let chunks = layer_chunks(&mut rng, layer, &shared);
        for c in &chunks {
            data.insert(ChunkDigest::of(c), c.clone());
        }
        let image = random_bytes(&mut rng, 10_000 + layer * 7777);
        let (fsid, blob) = commit_layer(&store, layer, &chunks, &image);
        images.insert(fsid.clone(), image);
        names.push((fsid, blob));
    }
    let mut registry = store.registry().unwrap();
    assert_eq!(registry.blobs.len(), 8);

    // Corrupt a chunk of layer 0 that no other blob holds: flip one payload byte.
    let t0 = store.blob_table(&names[0].1).unwrap().unwrap();
    let victim = t0.entries()[4];
    let loc = victim.loc.unwrap();
    let pack = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.pack_path(loc.pack))
        .unwrap();
    let at = loc.offset + 48 + u64::from(loc.stored_len / 2);
    let mut byte = [0u8; 1];
    pack.read_exact_at(&mut byte, at).unwrap();
    pack.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
    // And two lz4 chunks in one literal byte each, so that they still decode: entry 5 in
    // its last byte (the chunk's last byte, so only its last leaf decodes wrong), entry 9
    // in its first literal (copied on by later matches, so several leaves may go
    // wrong). Without read-around, READs are decoded and verified leaf by leaf: those
    // of good leaves are served, those of wrong leaves and of the last leaf (which needs
    // the whole chunk, which does not verify) are refused.
    let mut partly_bad = Vec::new();
    for (i, first_literal) in [(5usize, false), (9, true)] {
        let e = t0.entries()[i];
        let l = e.loc.unwrap();
        assert!(l.leaves.is_some(), "entry {i}: a chunk of several leaves");
        let mut rec = vec![0u8; l.record_len()];
        pack.read_exact_at(&mut rec, l.offset).unwrap();
        assert_eq!(rec[4] & 1, 1, "entry {i}: stored as lz4");
        let payload = &mut rec[48..];
        let at = if first_literal {
            assert!(payload[0] >> 4 > 0, "entry {i}: starts with literals");
            // Past the literal length's extra bytes, if any.
            let mut p = 1;
            if payload[0] >> 4 == 15 {
                while payload[p] == 255 {
                    p += 1;
                }
                p += 1;
            }
            p
        } else {
            payload.len() - 1
        };
        payload[at] ^= 0x01;
        pack.write_all_at(&payload[at..at + 1], l.offset + 48 + at as u64)
            .unwrap();
        let decoded = lz4_flex::block::decompress(payload, e.raw_len as usize).unwrap();
        let original = &data[&e.digest];
        assert_ne!(&decoded, original);
        let raw_len = e.raw_len as usize;
        let leaf = Leaves::leaf_bytes(raw_len);
        let leaves = raw_len.div_ceil(leaf);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for k in 0..leaves {
            let (a, b) = (k * leaf, ((k + 1) * leaf).min(raw_len));
            let bad = read_around || k == leaves - 1 || decoded[a..b] != original[a..b];
            if !bad {
                continue;
            }
            let (a, b) = (e.blob_offset + a as u64, e.blob_offset + b as u64);
            let b = if k == leaves - 1 {
                e.blob_offset + e.slot_len()
            } else {
                b
            };
            match ranges.last_mut() {
                Some(r) if r.1 == a => r.1 = b,
                _ => ranges.push((a, b)),
            }
        }
        partly_bad.extend(ranges);
    }
    // Remove a chunk from layer 1's table: the store no longer resolves it.
    let raw1 = store.blob_entries(&names[1].1).unwrap().unwrap();
    let missing = raw1[7].digest;
    let t1 = BlobTable::new(names[1].1.clone(), &raw1, |d| {
        if *d == missing {
            None
        } else {
            store.locate(d).unwrap()
        }
    });
    let missing_entry = t1.entries()[7];
    registry.blobs.insert(
        names[1].1.clone(),
        Arc::new(BlobSource::Chunked(Arc::new(t1))),
    );

    let mut blobs = Vec::new();
    for (i, (fsid, blob)) in names.iter().enumerate() {
        let table = match &*registry.blobs[blob] {
            BlobSource::Chunked(t) => t.clone(),
            _ => unreachable!(),
        };
        let mut bad = Vec::new();
        if i == 0 {
            bad.push((victim.blob_offset, victim.blob_offset + victim.slot_len()));
            bad.extend(partly_bad.iter().copied());
        }
        if i == 1 {
            bad.push((
                missing_entry.blob_offset,
                missing_entry.blob_offset + missing_entry.slot_len(),
            ));
        }
        blobs.push(Blob {
            name: blob.clone(),
            expected: expected_of(&table, &data),
            bad,
        });
        let img = &images[fsid];
        let size = match &*registry.blobs[fsid] {
            BlobSource::Image { size_bytes, .. } => *size_bytes,
            _ => unreachable!(),
        };
        let mut padded = img.clone();
        padded.resize(size as usize, 0);
        blobs.push(Blob {
            name: fsid.clone(),
            expected: padded.into(),
            bad: vec![],
        });
    }
    drop(store);
    Fixture {
        _dir: dir,
        root,
        registry,
        blobs,
    }
}

fn registry_copy(r: &Registry) -> Registry {
    Registry {
        blobs: r.blobs.clone(),
        packs: r.packs.clone(),
    }
}

struct Running {
    sim: Arc<Sim>,
    engine: Engine,
    front: Arc<CachefilesFront>,
    _cache: tempfile::TempDir,
}

fn start(f: &Fixture, threads: usize, strategy: WriteStrategy, read_around: bool) -> Running {
    let cache = tempfile::tempdir_in(tmp_base()).unwrap();
    let sim = Arc::new(Sim::new(cache.path(), "test", true).unwrap());
    for b in &f.blobs {
        sim.add_blob(&b.name, b.expected.clone()).unwrap();
    }
    let front = Arc::new(CachefilesFront::new(
        sim.clone(),
        Arc::new(RegistryHandle::new(registry_copy(&f.registry))),
    ));
    let mut cfg = EngineConfig::new(f.root.join("chunks"));
    cfg.threads = threads;
    cfg.write_strategy = strategy;
    cfg.read_around = read_around;
    cfg.buffers_per_thread = 8; // small, so that running out of buffers is exercised
    cfg.max_requests_per_thread = 16;
    let engine = Engine::start(cfg, front.clone()).unwrap();
    Running {
        sim,
        engine,
        front,
        _cache: cache,
    }
}

fn overlaps_bad(b: &Blob, off: u64, len: u64) -> bool {
    b.bad.iter().any(|&(s, e)| off < e && s < off + len)
}

fn check_outcome(b: &Blob, off: u64, len: u64, got: ReadOutcome) {
    let want = if overlaps_bad(b, off, len) {
        ReadOutcome::Eio
    } else {
        ReadOutcome::Served
    };
    assert_eq!(got, want, "blob {} [{off}, +{len})", &b.name[..12]);
}

/// Random concurrent READs from many readers, then a full sequential sweep.
fn serve_everything(f: &Fixture, r: &Running, seed: u64) -> StatsSnapshot {
    let mut objects = BTreeMap::new();
    for b in &f.blobs {
        let (id, size) = r.sim.open(&b.name, T).unwrap();
        assert_eq!(size, b.expected.len() as u64);
        objects.insert(b.name.clone(), id);
    }
    let readers = 8;
    std::thread::scope(|s| {
        for t in 0..readers {
            let objects = &objects;
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 100 + t);
                for _ in 0..60 {
                    let b = &f.blobs[rng.random_range(0..f.blobs.len())];
                    let size = b.expected.len() as u64;
                    let pages = size / BLOCK_BYTES;
                    let want = [1u64, 4, 32, 256, rng.random_range(1..64)][rng.random_range(0..5)];
                    let first = rng.random_range(0..pages);
                    let n = want.min(pages - first);
                    let (off, len) = (first * BLOCK_BYTES, n * BLOCK_BYTES);
                    let got = r.sim.read(objects[&b.name], off, len, T).unwrap();
                    check_outcome(b, off, len, got);
                }
            });
        }
    });
    // Every byte: sweep each blob in 128 KiB READs, several in flight.
    for b in &f.blobs {
        let size = b.expected.len() as u64;
        let mut tickets = Vec::new();
        let mut off = 0;
        while off < size {
            let len = (128 << 10).min(size - off);
            tickets.push((
                off,
                len,
                r.sim.submit_read(objects[&b.name], off, len).unwrap(),
            ));
            off += len;
        }
        for (off, len, t) in tickets {
            let (got, _) = t.wait(T).expect("READ completed");
            check_outcome(b, off, len, got);
        }
        // A failed request stops at its bad chunk; the good pages around it come in
        // READs of their own, as the kernel would send them.
        for &(s, e) in &b.bad {
            let from = s / (128 << 10) * (128 << 10);
            let to = e.div_ceil(128 << 10) * (128 << 10);
            for p in (from..to.min(size)).step_by(BLOCK_BYTES as usize) {
                if p >= s && p < e {
                    continue;
                }
                let got = r.sim.read(objects[&b.name], p, BLOCK_BYTES, T).unwrap();
                check_outcome(b, p, BLOCK_BYTES, got);
            }
        }
    }
    // Close every object: the daemon must let go of every anon fd at once, including
    // fds other (idle) threads have seen; the kernel frees the object, and the volume a
    // later mount of the domain waits for, only then.
    for id in objects.values() {
        r.sim.close(*id).unwrap();
    }
    for name in objects.keys() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let held = r.sim.daemon_fds(name).unwrap();
            if held == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "blob {name}: the daemon still holds {held} anon fd(s) 10 s after CLOSE"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Reopen every object: new object ids and fds over the same cache files.
    for (name, id) in &objects {
        let (id2, _) = r.sim.open(name, T).unwrap();
        assert_ne!(id2, *id);
        let b = f.blobs.iter().find(|b| &b.name == name).unwrap();
        let got = r.sim.read(id2, 0, BLOCK_BYTES, T).unwrap();
        check_outcome(b, 0, BLOCK_BYTES, got);
    }
    assert_eq!(r.sim.violations(), Vec::<String>::new());
    assert_eq!(r.sim.check_all(), Vec::<String>::new());
    // Everything but the bad slots is cached.
    for b in &f.blobs {
        let bad: u64 = b.bad.iter().map(|(s, e)| e - s).sum();
        assert_eq!(
            r.sim.cached_bytes(&b.name),
            b.expected.len() as u64 - bad,
            "blob {}",
            b.name
        );
    }
    r.engine.stats()
}

fn assert_counts(s: &StatsSnapshot, threads: u64) {
    assert_eq!(s.threads, threads);
    assert!(s.reads > 0 && s.reads_ok > 0, "{s:?}");
    assert!(s.reads_failed > 0, "bad chunks must fail requests: {s:?}");
    // At least the corrupt and the missing chunk were counted.
    assert!(s.chunk_errors >= 2, "{s:?}");
    assert_eq!(s.write_errors, 0, "{s:?}");
    assert_eq!(s.source_errors, 0, "{s:?}");
    assert_eq!(s.distinct_blobs_opened, 8, "{s:?}");
    assert!(s.opens >= 16, "{s:?}");
    assert!(s.bytes_written > 0 && s.chunks_fetched > 0, "{s:?}");
    // Chunks adjacent in a blob and in its pack are read as runs, one read each.
    assert!(s.pack_reads > 0 && s.pack_reads < s.chunks_fetched, "{s:?}");
    assert!(
        s.in_flight_hwm >= 1 && s.latency_us_p99 >= s.latency_us_p50,
        "{s:?}"
    );
}

fn run_config(threads: usize, strategy: WriteStrategy, read_around: bool, seed: u64) {
    let f = fixture(read_around);
    let r = start(&f, threads, strategy, read_around);
    let s = serve_everything(&f, &r, seed);
    assert_counts(&s, threads as u64);
    let fin = r.engine.stop();
    assert_eq!(fin.reads, fin.reads_ok + fin.reads_failed, "{fin:?}");
    drop(r.front);
}

#[test]
fn one_thread_uring_writes_serve_every_byte() {
    run_config(1, WriteStrategy::Uring, false, 1);
}

#[test]
fn two_threads_uring_writes_serve_every_byte() {
    run_config(2, WriteStrategy::Uring, false, 2);
}

#[test]
fn one_thread_sync_writes_serve_every_byte() {
    run_config(1, WriteStrategy::Sync, false, 3);
}

#[test]
fn two_threads_sync_writes_serve_every_byte() {
    run_config(2, WriteStrategy::Sync, false, 4);
}

#[test]
fn read_around_serves_every_byte() {
    run_config(2, WriteStrategy::Uring, true, 5);
}

#[test]
fn a_corrupt_tail_spoils_only_the_leaf_it_is_in() {
    // Without read-around a 4 KiB READ decodes its chunk only up to the end of the leaf
    // it needs and verifies that leaf: the second victim's head is served (the simulator
    // checks the bytes), its last leaf gives EIO.
    let f = fixture(false);
    let r = start(&f, 1, WriteStrategy::Uring, false);
    let b = &f.blobs[0];
    let (bad, end) = b.bad[1];
    let head = end - (64 << 10);
    assert!(bad > head, "only the last leaf is bad");
    let (id, _) = r.sim.open(&b.name, T).unwrap();
    for p in (head..end).step_by(BLOCK_BYTES as usize) {
        let want = if p < bad {
            ReadOutcome::Served
        } else {
            ReadOutcome::Eio
        };
        assert_eq!(
            r.sim.read(id, p, BLOCK_BYTES, T).unwrap(),
            want,
            "page at {p}"
        );
    }
    // Reaching into the last leaf refuses the whole READ.
    assert_eq!(r.sim.read(id, head, 64 << 10, T).unwrap(), ReadOutcome::Eio);
    assert_eq!(r.sim.violations(), Vec::<String>::new());
    assert_eq!(r.sim.check_all(), Vec::<String>::new());
    assert_eq!(r.sim.cached_bytes(&b.name), bad - head);
    let s = r.engine.stop();
    assert_eq!(s.chunk_errors, 5, "{s:?}");
}

#[test]
fn malformed_messages_are_counted_and_survived() {
    let f = fixture(false);
    let r = start(&f, 2, WriteStrategy::Uring, false);
    let b = &f.blobs[2]; // layer 1's image... any blob without bad ranges
    let b = if b.bad.is_empty() { b } else { &f.blobs[3] };
    let (id, _) = r.sim.open(&b.name, T).unwrap();

    // Shorter than a header; unknown opcode; length field lying both ways.
    r.sim.inject(vec![1, 2, 3]).unwrap();
    let mut bad_op = encode_read(900_001, id, 0, 4096);
    bad_op[4] = 77;
    r.sim.inject(bad_op).unwrap();
    let mut long = encode_read(900_002, id, 0, 4096);
    long[8] = 200;
    r.sim.inject(long).unwrap();
    let mut short = encode_read(900_003, id, 0, 4096);
    short[8] = 16;
    r.sim.inject(short).unwrap();
    // An OPEN whose key sizes overrun the message: refused, not trusted.
    let mut open = encode_open(900_004, 4242, "erofs,test", b"x", u32::MAX, 0).unwrap();
    open[20..24].copy_from_slice(&500u32.to_ne_bytes());
    r.sim.inject(open).unwrap();
    // A READ for an object that was never opened.
    r.sim.inject(encode_read(900_005, 31337, 0, 4096)).unwrap();
    // An insane READ on a real object: completed with nothing written.
    let insane = r.sim.submit_read_unchecked(id, 0, 1 << 40).unwrap();
    assert_eq!(insane.wait(T).unwrap().0, ReadOutcome::Eio);
    // A READ that starts past the object's end.
    let past = r.sim.submit_read_unchecked(id, 1 << 30, 4096).unwrap();
    assert_eq!(past.wait(T).unwrap().0, ReadOutcome::Eio);
    // An unaligned READ is widened to pages and served.
    let odd = r.sim.submit_read_unchecked(id, 100, 5000).unwrap();
    assert_eq!(odd.wait(T).unwrap().0, ReadOutcome::Served);
    // A reader killed before completion: the engine's READ_COMPLETE gets EINVAL.
    for _ in 0..20 {
        let len = (128 << 10).min(b.expected.len() as u64);
        let t = r.sim.submit_read(id, 0, len).unwrap();
        r.sim.cancel(&t);
    }
    // An OPEN of a blob the registry does not have.
    let unknown = "0".repeat(64);
    r.sim.add_blob(&unknown, vec![0u8; 4096].into()).unwrap();
    assert_eq!(
        r.sim.open(&unknown, T),
        Err(SimError::OpenRefused(libc::ENOENT))
    );

    // Still serving, on every thread.
    for i in 0..16u64 {
        let size = b.expected.len() as u64;
        let off = (i * 3 * BLOCK_BYTES) % size;
        let got = r.sim.read(id, off, BLOCK_BYTES, T).unwrap();
        check_outcome(b, off, BLOCK_BYTES, got);
    }
    // Let the cancelled READs drain.
    for _ in 0..1000 {
        if r.sim.outstanding() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = r.engine.stats();
    assert!(s.malformed_messages >= 5, "{s:?}");
    assert!(s.unknown_objects >= 1, "{s:?}");
    assert!(s.insane_reads >= 2, "{s:?}");
    assert!(s.opens_failed >= 1, "{s:?}");
    assert_eq!(s.complete_errors, 0, "{s:?}");
    let (_, einval) = r.sim.completion_counts();
    assert_eq!(einval, s.complete_einval, "{s:?}");
    assert!(r.sim.copens().iter().any(|(_, c)| *c == Err(libc::ENOENT)));
    assert_eq!(r.sim.violations(), Vec::<String>::new());
    assert_eq!(r.sim.check_all(), Vec::<String>::new());
    let fin = r.engine.stop();
    assert_eq!(fin.reads, fin.reads_ok + fin.reads_failed);
}

#[test]
fn a_full_disk_fails_requests_without_wrong_bytes() {
    // Writes that fail (here: the engine's target is a read-only fd) are counted and
    // complete the READ with nothing written.
    let f = fixture(false);
    let cache = tempfile::tempdir_in(tmp_base()).unwrap();
    let sim = Arc::new(Sim::new(cache.path(), "test", true).unwrap());
    let b = &f.blobs[4];
    assert!(b.bad.is_empty() && b.expected.len() > 64 << 10);
    sim.add_blob(&b.name, b.expected.clone()).unwrap();
    struct ReadOnly(Arc<Sim>);
    impl dedupd::frontend::cachefiles::Device for ReadOnly {
        fn poll_fd(&self) -> std::os::fd::RawFd {
            self.0.poll_fd()
        }
        fn read_msg(&self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read_msg(buf)?;
            if let Ok(dedupd::frontend::cachefiles::Msg::Open { fd, .. }) =
                dedupd::frontend::cachefiles::parse(&buf[..n])
            {
                // Swap the anon fd for a read-only one on the same file: writes get EBADF.
                let path = format!("/proc/self/fd/{fd}");
                let ro = fs::File::open(Path::new(&path)).unwrap();
                let ro = std::os::fd::IntoRawFd::into_raw_fd(ro);
                // SAFETY: both fds are ours; dup2 replaces `fd` atomically.
                unsafe {
                    libc::dup2(ro, fd as i32);
                    libc::close(ro);
                }
            }
            Ok(n)
        }
        fn write_cmd(&self, cmd: &[u8]) -> std::io::Result<()> {
            self.0.write_cmd(cmd)
        }
        fn complete_read(&self, fd: std::os::fd::RawFd, id: u32) -> std::io::Result<()> {
            self.0.complete_read(fd, id)
        }
    }
    let front = Arc::new(CachefilesFront::new(
        Arc::new(ReadOnly(sim.clone())),
        Arc::new(RegistryHandle::new(registry_copy(&f.registry))),
    ));
    for strategy in [WriteStrategy::Uring, WriteStrategy::Sync] {
        let mut cfg = EngineConfig::new(f.root.join("chunks"));
        cfg.threads = 1;
        cfg.write_strategy = strategy;
        let engine = Engine::start(cfg, front.clone()).unwrap();
        let (id, _) = sim.open(&b.name, T).unwrap();
        assert_eq!(sim.read(id, 0, 64 << 10, T).unwrap(), ReadOutcome::Eio);
        let s = engine.stop();
        assert!(s.write_errors >= 1 && s.reads_failed >= 1, "{s:?}");
        assert_eq!(sim.cached_bytes(&b.name), 0);
        sim.close(id).unwrap();
    }
    assert_eq!(sim.violations(), Vec::<String>::new());
}

/// Writes a tar layer with files of varied sizes and kinds; `shared` appears in every
/// layer, so that the store deduplicates it.
fn write_layer_tar(path: &Path, seed: u64, shared: &[u8]) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("bin/random", &random_bytes(&mut rng, 3 << 20));
    add("lib/text.so", &compressible(&mut rng, (1 << 20) + 12345));
    add("etc/zeros", &vec![0u8; 200_000]);
    add("shared/blob", shared);
    for i in 0..20 {
        let n = rng.random_range(1..70_000);
        add(&format!("small/f{i}"), &random_bytes(&mut rng, n));
    }
    b.into_inner().unwrap();
}

#[test]
fn converted_layers_are_served_byte_for_byte() {
    let dir = tempfile::tempdir_in(tmp_base()).unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut rng = StdRng::seed_from_u64(99);
    let shared = random_bytes(&mut rng, 300_000);
    let mut layers = Vec::new();
    for (i, chunk_bytes) in [(0u64, 65536u32), (1, 16384), (2, 1 << 20)] {
        let tar = dir.path().join(format!("layer{i}.tar"));
        write_layer_tar(&tar, i, &shared);
        let report = dedupd::convert::convert_layer(&store, &tar, chunk_bytes).unwrap();
        layers.push(report.diff_id);
    }
    // The expected bytes come from `export`, the slow path (files a stock kernel mounts).
    let registry = store.registry().unwrap();
    let mut blobs = Vec::new();
    for diff_id in &layers {
        let out = dir.path().join("export");
        let ex = dedupd::convert::export(&store, diff_id, &out).unwrap();
        let record = store.layer(diff_id).unwrap().unwrap();
        let mut image = fs::read(&ex.image).unwrap();
        image.resize(registry.blobs[record.id_hex()].size_bytes() as usize, 0);
        blobs.push(Blob {
            name: record.id_hex().to_string(),
            expected: image.into(),
            bad: vec![],
        });
        for (id, path) in record.blobs.iter().zip(&ex.devices) {
            if blobs.iter().any(|b| &b.name == id) {
                continue;
            }
            let data = fs::read(path).unwrap();
            assert_eq!(data.len() as u64, registry.blobs[id].size_bytes());
            blobs.push(Blob {
                name: id.clone(),
                expected: data.into(),
                bad: vec![],
            });
        }
    }
    assert_eq!(blobs.len(), registry.blobs.len());
    drop(store);
    let f = Fixture {
        _dir: dir,
        root,
        registry,
        blobs,
    };
    for (threads, strategy, read_around) in [
        (1, WriteStrategy::Uring, true),
        (2, WriteStrategy::Sync, false),
    ] {
        let r = start(&f, threads, strategy, read_around);
        let mut objects = BTreeMap::new();
        for b in &f.blobs {
            objects.insert(b.name.clone(), r.sim.open(&b.name, T).unwrap().0);
        }
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let objects = &objects;
                let f = &f;
                let r = &r;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    for _ in 0..40 {
                        let b = &f.blobs[rng.random_range(0..f.blobs.len())];
                        let pages = b.expected.len() as u64 / BLOCK_BYTES;
                        let first = rng.random_range(0..pages);
                        let n = rng.random_range(1..=32).min(pages - first);
                        let (off, len) = (first * BLOCK_BYTES, n * BLOCK_BYTES);
                        let got = r
                            .sim
                            .read_like_kernel(objects[&b.name], off, len, T)
                            .unwrap();
                        assert_eq!(got, ReadOutcome::Served, "{} [{off}, +{len})", b.name);
                    }
                });
            }
        });
        for b in &f.blobs {
            let size = b.expected.len() as u64;
            for off in (0..size).step_by(128 << 10) {
                let len = (128 << 10).min(size - off);
                let got = r.sim.read(objects[&b.name], off, len, T).unwrap();
                assert_eq!(got, ReadOutcome::Served, "{} [{off}, +{len})", b.name);
            }
            assert_eq!(r.sim.cached_bytes(&b.name), size);
        }
        assert_eq!(r.sim.violations(), Vec::<String>::new());
        assert_eq!(r.sim.check_all(), Vec::<String>::new());
        let s = r.engine.stop();
        assert_eq!(s.reads_failed + s.chunk_errors + s.write_errors, 0, "{s:?}");
    }
}

#[test]
fn dedupd_run_says_why_it_cannot_serve_without_the_device() {
    if Path::new("/dev/cachefiles").exists() {
        eprintln!("SKIP: this kernel has /dev/cachefiles; the VM suite runs the daemon on it");
        return;
    }
    let dir = tempfile::tempdir_in(tmp_base()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args(["run", "--front-end", "cachefiles", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/dev/cachefiles does not exist") && err.contains("CACHEFILES_ONDEMAND"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args(["status", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stats"));
}
