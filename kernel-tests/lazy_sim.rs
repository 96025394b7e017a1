//! Lazily pulled blobs through the data plane, against the cachefiles simulator and an
//! in-memory registry with faults: every byte served right under concurrent readers with
//! each chunk fetched once; a silent registry fails its readers with EIO in bounded time
//! while local blobs keep being served; damaged bytes are fetched again and then fail,
//! and never reach a cache file; reads succeed again once the registry is back.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dedupd::digest::{ChunkDigest, Leaves};
use dedupd::frontend::cachefiles::front::{CachefilesFront, RegistryHandle};
use dedupd::remote::fetch::RangeFuture;
use dedupd::remote::{FetchConfig, Fetcher, RangeError, RangeSource};
use dedupd::serve::sim::{ReadOutcome, Sim};
use dedupd::serve::{Engine, EngineConfig, WriteStrategy};
use dedupd::store::blob::{blob_id, BlobBuilder};
use dedupd::store::chunk::encode_record;
use dedupd::store::{
    LayerCommit, LayerRecord, Locator, RemoteBlob, RemoteLayer, RemoteLayerCommit, RemoteSource,
    Store, BLOCK_BYTES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(60);

/// A registry in memory: data blobs by digest, with faults switched at run time.
#[derive(Default)]
struct FakeRegistry {
    blobs: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// 0 serve, 1 never answer, 2 flip a byte of every answer.
    mode: AtomicU32,
    /// Delay of every answer, in milliseconds.
    delay_ms: AtomicU64,
    /// While set, answers wait (a registry that is slow for as long as a test needs).
    held: Arc<std::sync::atomic::AtomicBool>,
    requests: AtomicU64,
}

impl RangeSource for FakeRegistry {
    fn get_range(&self, _s: &RemoteSource, blob: &str, offset: u64, len: u64) -> RangeFuture {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode.load(Ordering::SeqCst);
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst));
        let data = self.blobs.lock().unwrap().get(blob).cloned();
        let held = self.held.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            while held.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if mode == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let data = data.ok_or_else(|| RangeError {
                retryable: false,
                message: "no such blob".into(),
            })?;
            let mut b = data[offset as usize..(offset + len) as usize].to_vec();
            if mode == 2 {
                let mid = b.len() / 2;
                b[mid] ^= 0x10;
            }
            Ok(Bytes::from(b))
        })
    }
}

fn tmp_base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Chunks of one blob: incompressible, compressible, zero, odd-sized tails.
fn chunks(rng: &mut StdRng, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut c = match i % 5 {
            0 | 1 => random_bytes(rng, 65536),
            2 => {
                let mut v = random_bytes(rng, 65536);
                for b in v.iter_mut().skip(1000) {
                    *b &= 3;
                }
                v
            }
            3 => vec![0u8; 65536],
            _ => {
                let n = rng.random_range(1..65536);
                random_bytes(rng, n)
            }
        };
        if i % 5 != 3 {
            c[0] = i as u8;
            c[1] = (i >> 8) as u8;
        }
        out.push(c);
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    fake: Arc<FakeRegistry>,
    /// Kernel name (blob id) and expected bytes of the remote blob and the local one.
    remote: (String, Arc<[u8]>),
    local: (String, Arc<[u8]>),
    /// Distinct chunks of the remote blob that are not all zeros.
    remote_chunks: u64,
}

fn expected(
    entries: &[dedupd::store::BlobEntry],
    data: &HashMap<ChunkDigest, Vec<u8>>,
) -> Arc<[u8]> {
    let end = entries.last().map_or(0, |e| e.blob_offset + e.slot_len());
    let mut v = vec![0u8; end as usize];
    for e in entries {
        let d = &data[&e.digest];
        v[e.blob_offset as usize..e.blob_offset as usize + d.len()].copy_from_slice(d);
    }
    v.into()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir_in(tmp_base()).unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let mut rng = StdRng::seed_from_u64(0x1a2b);
    let mut data = HashMap::new();

    // A local (converted) layer.
    let local_chunks = chunks(&mut rng, 20);
    let mut ing = store.ingest().unwrap();
    let mut b = BlobBuilder::new();
    for c in &local_chunks {
        let put = ing.put_chunk(c).unwrap();
        b.add(put.digest, c.len() as u32);
        data.insert(put.digest, c.clone());
    }
    let local_id = blob_id(&b.encode());
    let tmp = store.root().join("layers").join("local.tmp");
    fs::write(&tmp, b"image").unwrap();
    let record = |n: u8, id: &str, remote: Option<RemoteLayer>| LayerRecord {
        diff_id: format!("sha256:{:064x}", n),
        digests: vec![],
        blobs: vec![id.to_string()],
        chunk_bytes: 65536,
        image_bytes: 5,
        files: 1,
        chunks: 0,
        new_chunks: 0,
        logical_bytes: 0,
        stored_bytes: 0,
        remote,
    };
    ing.commit(LayerCommit {
        record: record(1, &local_id, None),
        image_tmp: &tmp,
        blobs: vec![(local_id.clone(), b.entries().to_vec())],
    })
    .unwrap();
    let local_entries = store.blob_table(&local_id).unwrap().unwrap();
    let local = expected(local_entries.entries(), &data);

    // A lazily pulled layer: its records published in one data blob.
    let remote_chunks = chunks(&mut rng, 60);
    let mut b = BlobBuilder::new();
    let mut blob = Vec::new();
    let mut locators = Vec::new();
    for c in &remote_chunks {
        let (d, _) = Leaves::digest_of(c);
        let before = b.len();
        b.add(d, c.len() as u32);
        data.insert(d, c.clone());
        if b.len() > before {
            let mut rec = Vec::new();
            encode_record(c, &d, &mut rec);
            locators.push(Locator::Record {
                data: 0,
                offset: blob.len() as u64,
                len: rec.len() as u32,
            });
            blob.extend_from_slice(&rec);
        }
    }
    let fake = Arc::new(FakeRegistry::default());
    fake.blobs
        .lock()
        .unwrap()
        .insert("sha256:data".into(), Arc::new(blob));
    let remote_id = blob_id(&b.encode());
    let source = RemoteSource {
        registry: "registry.test".into(),
        repository: "lazy".into(),
    };
    let tmp = store.root().join("layers").join("remote.tmp");
    fs::write(&tmp, b"image").unwrap();
    store
        .commit_remote_layer(RemoteLayerCommit {
            record: record(
                2,
                &remote_id,
                Some(RemoteLayer {
                    source: source.clone(),
                    artifact: "sha256:00".into(),
                }),
            ),
            image_tmp: &tmp,
            blobs: vec![(
                remote_id.clone(),
                b.entries().to_vec(),
                RemoteBlob {
                    source,
                    data_blobs: vec!["sha256:data".into()],
                    locators,
                },
            )],
        })
        .unwrap();
    let table = store.blob_table(&remote_id).unwrap().unwrap();
    let zero = ChunkDigest::of(&[0u8; 65536]);
    let remote_chunks = table
        .entries()
        .iter()
        .filter(|e| e.loc.is_none() && e.digest != zero)
        .count() as u64;
    let remote = expected(table.entries(), &data);
    Fixture {
        _dir: dir,
        store,
        fake,
        remote: (remote_id, remote),
        local: (local_id, local),
        remote_chunks,
    }
}

struct Running {
    sim: Arc<Sim>,
    engine: Engine,
    fetcher: Arc<Fetcher>,
    _cache: tempfile::TempDir,
}

fn start(f: &Fixture, threads: usize, timeout: Duration, min_window: u64) -> Running {
    let cache = tempfile::tempdir_in(tmp_base()).unwrap();
    let sim = Arc::new(Sim::new(cache.path(), "test", true).unwrap());
    sim.add_blob(&f.remote.0, f.remote.1.clone()).unwrap();
    sim.add_blob(&f.local.0, f.local.1.clone()).unwrap();
    let fetcher = Fetcher::start(
        f.store.clone(),
        f.fake.clone(),
        FetchConfig {
            timeout,
            min_window_bytes: min_window,
            ..FetchConfig::default()
        },
    )
    .unwrap();
    let front = Arc::new(CachefilesFront::new(
        sim.clone(),
        Arc::new(RegistryHandle::new(f.store.registry().unwrap())),
    ));
    let mut cfg = EngineConfig::new(f.store.root().join("chunks"));
    cfg.threads = threads;
    cfg.write_strategy = WriteStrategy::Uring;
    cfg.buffers_per_thread = 8;
    cfg.max_requests_per_thread = 16;
    cfg.fetcher = Some(fetcher.clone());
    let engine = Engine::start(cfg, front).unwrap();
    Running {
        sim,
        engine,
        fetcher,
        _cache: cache,
    }
}

#[test]
fn every_byte_of_a_lazy_blob_is_served_and_each_chunk_fetched_once() {
    for threads in [1, 2] {
        let f = fixture();
        // A one-byte minimum window: every miss fetches only what it needs, so that the
        // count of fetched chunks says whether anything was fetched twice.
        let r = start(&f, threads, T, 1);
        let (id, size) = r.sim.open(&f.remote.0, T).unwrap();
        assert_eq!(size, f.remote.1.len() as u64);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let sim = &r.sim;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    let pages = size / BLOCK_BYTES;
                    for _ in 0..40 {
                        let first = rng.random_range(0..pages);
                        let n = [1u64, 8, 32][rng.random_range(0..3)].min(pages - first);
                        let got = sim
                            .read(id, first * BLOCK_BYTES, n * BLOCK_BYTES, T)
                            .unwrap();
                        assert_eq!(got, ReadOutcome::Served);
                    }
                });
            }
        });
        // Then every byte, in 128 KiB READs.
        let mut off = 0;
        while off < size {
            let len = (128 << 10).min(size - off);
            assert_eq!(r.sim.read(id, off, len, T).unwrap(), ReadOutcome::Served);
            off += len;
        }
        assert_eq!(r.sim.violations(), Vec::<String>::new());
        assert_eq!(r.sim.check_all(), Vec::<String>::new());
        let fs = r.fetcher.stats();
        assert_eq!(
            fs.chunks_fetched, f.remote_chunks,
            "{threads} threads: {fs:?}"
        );
        assert_eq!(fs.failed, 0, "{fs:?}");
        let es = r.engine.stop();
        assert_eq!((es.fetch_errors, es.chunk_errors), (0, 0), "{es:?}");
        assert!(es.fetch_waits >= f.remote_chunks, "{es:?}");
        r.fetcher.stop();
        // All of it is in the store now: a new engine serves it with no fetch.
        let fs0 = f.fake.requests.load(Ordering::SeqCst);
        let r2 = start(&f, threads, T, 1);
        let (id2, _) = r2.sim.open(&f.remote.0, T).unwrap();
        assert_eq!(r2.sim.read(id2, 0, size, T).unwrap(), ReadOutcome::Served);
        assert_eq!(f.fake.requests.load(Ordering::SeqCst), fs0, "fetched again");
        assert_eq!(f.store.remote_chunks().unwrap(), 0);
    }
}

#[test]
fn a_silent_registry_fails_its_readers_in_bounded_time_and_local_reads_go_on() {
    let f = fixture();
    let r = start(&f, 2, Duration::from_millis(800), 64 << 10);
    let (rid, _) = r.sim.open(&f.remote.0, T).unwrap();
    let (lid, lsize) = r.sim.open(&f.local.0, T).unwrap();
    f.fake.mode.store(1, Ordering::SeqCst);
    std::thread::scope(|s| {
        let sim = &r.sim;
        let stuck = s.spawn(move || {
            let t = Instant::now();
            let got = sim.read(rid, 0, 4 * BLOCK_BYTES, T).unwrap();
            (got, t.elapsed())
        });
        // While the remote read waits, the whole local blob is served (that it does not
        // wait behind the network is checked, without a clock, by
        // a_slow_registry_costs_remote_readers_only).
        assert_eq!(r.sim.read(lid, 0, lsize, T).unwrap(), ReadOutcome::Served);
        let (got, took) = stuck.join().unwrap();
        assert_eq!(got, ReadOutcome::Eio);
        assert!(took >= Duration::from_millis(700), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    });
    // The registry is back: the same range reads.
    f.fake.mode.store(0, Ordering::SeqCst);
    // A failed fetch stands for a moment (the kernel's immediate retries fail fast).
    std::thread::sleep(dedupd::remote::fetch::FAILURE_HOLD);
    assert_eq!(
        r.sim.read(rid, 0, 4 * BLOCK_BYTES, T).unwrap(),
        ReadOutcome::Served
    );
    assert_eq!(r.sim.violations(), Vec::<String>::new());
}

#[test]
fn damaged_bytes_give_eio_and_never_reach_the_cache_file() {
    let f = fixture();
    let r = start(&f, 2, T, 64 << 10);
    let (rid, size) = r.sim.open(&f.remote.0, T).unwrap();
    f.fake.mode.store(2, Ordering::SeqCst);
    assert_eq!(
        r.sim.read(rid, 0, BLOCK_BYTES, T).unwrap(),
        ReadOutcome::Eio
    );
    let fs = r.fetcher.stats();
    assert!(fs.corrupt >= 2 && fs.chunks_fetched == 0, "{fs:?}");
    assert_eq!(r.sim.cached_bytes(&f.remote.0), 0);
    assert_eq!(r.sim.violations(), Vec::<String>::new());
    // Repaired: the read succeeds and the blob reads whole.
    f.fake.mode.store(0, Ordering::SeqCst);
    // A failed fetch stands for a moment (the kernel's immediate retries fail fast).
    std::thread::sleep(dedupd::remote::fetch::FAILURE_HOLD);
    assert_eq!(r.sim.read(rid, 0, size, T).unwrap(), ReadOutcome::Served);
    assert_eq!(r.sim.check_all(), Vec::<String>::new());
}

#[test]
fn a_slow_registry_costs_remote_readers_only() {
    let f = fixture();
    let r = start(&f, 1, T, 64 << 10);
    let (rid, rsize) = r.sim.open(&f.remote.0, T).unwrap();
    let (lid, lsize) = r.sim.open(&f.local.0, T).unwrap();
    // The registry answers nothing until the local reads are done.
    f.fake.held.store(true, Ordering::SeqCst);
    // Many remote READs in flight on one thread, then local ones: they are not queued
    // behind the network.
    let tickets: Vec<_> = (0..8)
        .map(|i| {
            let off = (i * 7 * 65536) % (rsize - BLOCK_BYTES);
            r.sim
                .submit_read(rid, off / BLOCK_BYTES * BLOCK_BYTES, BLOCK_BYTES)
                .unwrap()
        })
        .collect();
    assert_eq!(r.sim.read(lid, 0, lsize, T).unwrap(), ReadOutcome::Served);
    let fs = r.fetcher.stats();
    assert_eq!(
        fs.chunks_fetched, 0,
        "the registry answered while held: {fs:?}"
    );
    f.fake.held.store(false, Ordering::SeqCst);
    for tk in tickets {
        assert_eq!(tk.wait(T).unwrap().0, ReadOutcome::Served);
    }
}
