//! The READ path through the cachefiles simulator: engine (1 and 2 threads, both write
//! strategies) at 4 KiB, 16 KiB, 128 KiB and 1 MiB requests; the "limit" (lz4
//! decompression + pwrite of the same bytes, no engine); and a synchronous
//! one-request-at-a-time loop like nydusd's fscache handler, for requests/s at 4 KiB.
//!
//! Run: `cargo bench --bench engine`. A summary table (throughput, reader-side latency
//! p50/p99, ratios) is printed at the end.
//!
//! CPU per MiB (issue 17): `DEDUPD_BENCH_ONLY=cpu cargo bench --bench engine` runs only
//! [`bench_cpu`]: 128 KiB random READs, requests/s and the serving threads' CPU per MiB.
//!
//! Metrics on versus off (issue 16): `DEDUPD_BENCH_ONLY=metrics cargo bench --bench engine`
//! runs only that comparison ([`bench_metrics`]): one engine at 4 KiB, with and without a
//! thread that renders the whole `/metrics` text from its counters every 10 ms.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dedupd::frontend::cachefiles::front::{CachefilesFront, RegistryHandle};
use dedupd::frontend::cachefiles::{self, Command, Device, Msg};
use dedupd::serve::sim::{ReadTicket, Sim};
use dedupd::serve::{Engine, EngineConfig, WriteStrategy};
use dedupd::store::blob::{blob_id, BlobBuilder, BlobTable, RawEntry};
use dedupd::store::chunk::{decode_record, ChunkLoc};
use dedupd::store::{BlobSource, LayerCommit, LayerRecord, Registry, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOB_BYTES: usize = 64 << 20;
const CHUNK_BYTES: usize = 64 << 10;
const SIZES: [u64; 4] = [4 << 10, 16 << 10, 128 << 10, 1 << 20];
const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    name: String,
    table: Arc<BlobTable>,
    registry: Registry,
    /// Chunk records in memory, by slot index, for the limit bench.
    records: Vec<Vec<u8>>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut ing = store.ingest().unwrap();
    let mut b = BlobBuilder::new();
    let words: [&[u8]; 5] = [
        b"usr/lib/x86_64 ",
        b"libssl.so.3 ",
        b"\0\0\0\0\0\0",
        b"ELF",
        b"main ",
    ];
    for i in 0..BLOB_BYTES / CHUNK_BYTES {
        // Half random, half text-like: about 2:1 overall, like binaries and libraries.
        let mut c = vec![0u8; CHUNK_BYTES / 2];
        rng.fill(&mut c[..]);
        while c.len() < CHUNK_BYTES {
            c.extend_from_slice(words[rng.random_range(0..words.len())]);
        }
        c.truncate(CHUNK_BYTES);
        c[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let put = ing.put_chunk(&c).unwrap();
        b.add(put.digest, c.len() as u32);
    }
    let name = blob_id(&b.encode());
    let tmp = root.join("layers").join("bench.tmp");
    std::fs::write(&tmp, b"img").unwrap();
    ing.commit(LayerCommit {
        record: LayerRecord {
            diff_id: format!("sha256:{}", "b".repeat(64)),
            digests: vec![],
            blobs: vec![name.clone()],
            chunk_bytes: CHUNK_BYTES as u32,
            image_bytes: 3,
            files: 1,
            chunks: b.len() as u64,
            new_chunks: 0,
            logical_bytes: BLOB_BYTES as u64,
            stored_bytes: 0,
            remote: None,
        },
        image_tmp: &tmp,
        blobs: vec![(name.clone(), b.entries().to_vec())],
    })
    .unwrap();
    let registry = store.registry().unwrap();
    let table = match &*registry.blobs[&name] {
        BlobSource::Chunked(t) => t.clone(),
        _ => unreachable!(),
    };
    let mut records = Vec::new();
    for e in table.entries() {
        let loc = e.loc.unwrap();
        let mut r = vec![0u8; loc.record_len()];
        File::open(store.pack_path(loc.pack))
            .unwrap()
            .read_exact_at(&mut r, loc.offset)
            .unwrap();
        records.push(r);
    }
    let stats = store.stats().unwrap();
    eprintln!(
        "bench blob: {} MiB in {} chunks of {} KiB, stored {:.1} MiB (ratio {:.2})",
        BLOB_BYTES >> 20,
        table.entries().len(),
        CHUNK_BYTES >> 10,
        stats.stored_bytes as f64 / (1 << 20) as f64,
        stats.total_ratio
    );
    drop(store);
    Setup {
        _dir: dir,
        root,
        name,
        table,
        registry,
        records,
    }
}

/// Results gathered across the run for the summary.
#[derive(Default)]
struct Acc {
    bytes: u64,
    requests: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

type Results = Arc<Mutex<HashMap<String, Acc>>>;

fn record(results: &Results, key: &str, bytes: u64, n: u64, elapsed: Duration, lat: &[u64]) {
    let mut m = results.lock().unwrap();
    let a = m.entry(key.to_string()).or_default();
    a.bytes += bytes;
    a.requests += n;
    a.elapsed += elapsed;
    a.latencies_us.extend_from_slice(lat);
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Drives `iters` READs of `len` bytes with up to `depth` outstanding; returns the
/// elapsed time and reader-side latencies.
fn drive(
    sim: &Sim,
    object: u32,
    len: u64,
    iters: u64,
    depth: usize,
    rng: &mut StdRng,
) -> (Duration, Vec<u64>) {
    let slots = BLOB_BYTES as u64 / len;
    let mut q: std::collections::VecDeque<ReadTicket> = Default::default();
    let mut lat = Vec::with_capacity(iters as usize);
    let start = Instant::now();
    for _ in 0..iters {
        if q.len() >= depth {
            let t = q.pop_front().unwrap();
            lat.push(t.wait(WAIT).expect("READ completed").1.as_micros() as u64);
        }
        let off = rng.random_range(0..slots) * len;
        q.push_back(sim.submit_read(object, off, len).unwrap());
    }
    for t in q {
        lat.push(t.wait(WAIT).expect("READ completed").1.as_micros() as u64);
    }
    (start.elapsed(), lat)
}

fn depth_for(len: u64) -> usize {
    if len >= 1 << 20 {
        8
    } else {
        32
    }
}

fn new_sim(s: &Setup) -> (tempfile::TempDir, Arc<Sim>) {
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let sim = Arc::new(Sim::new(cache.path(), "bench", false).unwrap());
    let mut expected = vec![0u8; s.table.size_bytes() as usize];
    expected[0] = 0; // verification is off; only the size matters
    sim.add_blob(&s.name, expected.into()).unwrap();
    (cache, sim)
}

fn prefill(sim: &Sim, object: u32) {
    // Allocate the whole cache file once, so every run overwrites (as the limit does).
    let mut tickets = Vec::new();
    for off in (0..BLOB_BYTES as u64).step_by(1 << 20) {
        tickets.push(sim.submit_read(object, off, 1 << 20).unwrap());
    }
    for t in tickets {
        t.wait(WAIT).unwrap();
    }
}

/// A running engine behind its own simulator.
struct Served {
    key: String,
    sim: Arc<Sim>,
    object: u32,
    engine: Option<Engine>,
    _cache: tempfile::TempDir,
}

/// `whole`: the blob's table without leaves (a store converted before they were kept),
/// so every chunk is decoded and verified whole, as the limit and the sync loop do;
/// kept beside the default to show what decoding and verifying only part is worth.
fn start_engine(s: &Setup, threads: usize, strategy: WriteStrategy, whole: bool) -> Served {
    start_engine_with(s, threads, strategy, whole, |_| {})
}

/// [`start_engine`], with `tweak` applied to the engine's configuration last.
fn start_engine_with(
    s: &Setup,
    threads: usize,
    strategy: WriteStrategy,
    whole: bool,
    tweak: impl FnOnce(&mut EngineConfig),
) -> Served {
    let (cache, sim) = new_sim(s);
    let mut blobs = s.registry.blobs.clone();
    if whole {
        let raw: Vec<RawEntry> = s
            .table
            .entries()
            .iter()
            .map(|e| RawEntry {
                raw_len: e.raw_len,
                digest: e.digest,
            })
            .collect();
        let locs: HashMap<_, _> = s
            .table
            .entries()
            .iter()
            .map(|e| (e.digest, e.loc))
            .collect();
        let stripped = BlobTable::new(s.name.clone(), &raw, |d| {
            locs[d].map(|l| ChunkLoc { leaves: None, ..l })
        });
        blobs.insert(
            s.name.clone(),
            Arc::new(BlobSource::Chunked(Arc::new(stripped))),
        );
    }
    let front = Arc::new(CachefilesFront::new(
        sim.clone(),
        Arc::new(RegistryHandle::new(Registry {
            blobs,
            packs: s.registry.packs.clone(),
        })),
    ));
    let mut cfg = EngineConfig::new(s.root.join("chunks"));
    cfg.threads = threads;
    cfg.write_strategy = strategy;
    cfg.read_around = false; // the same bytes as the limit and the sync loop
    tweak(&mut cfg);
    let engine = Engine::start(cfg, front).unwrap();
    let (object, _) = sim.open(&s.name, WAIT).unwrap();
    prefill(&sim, object);
    Served {
        key: format!(
            "engine/{}/{}t{}",
            strategy.name(),
            threads,
            if whole { "/whole" } else { "" }
        ),
        sim,
        object,
        engine: Some(engine),
        _cache: cache,
    }
}

/// Per request size, side by side: the limit, the sync loop, and the four engines.
fn bench_sizes(c: &mut Criterion, s: &Setup, results: &Results) {
    let mut served = Vec::new();
    for strategy in [WriteStrategy::Uring, WriteStrategy::Sync] {
        for threads in [1usize, 2] {
            served.push(start_engine(s, threads, strategy, false));
        }
    }
    served.push(start_engine(s, 2, WriteStrategy::Uring, true));
    let (_loop_cache, loop_sim) = new_sim(s);
    let stop = Arc::new(AtomicBool::new(false));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let f = direct_file(dir.path());
    let mut buf = Aligned::new(2 << 20);
    std::thread::scope(|scope| {
        let (sim2, stop2) = (loop_sim.clone(), stop.clone());
        scope.spawn(move || sync_loop(sim2, s, stop2));
        let (loop_object, _) = loop_sim.open(&s.name, WAIT).unwrap();
        prefill(&loop_sim, loop_object);
        for len in SIZES {
            let mut g = c.benchmark_group(format!("read_{}", kib(len)));
            g.throughput(Throughput::Bytes(len));
            let mut rng = StdRng::seed_from_u64(len);
            g.bench_function("limit", |b| {
                b.iter_custom(|iters| {
                    let el = limit_run(s, &f, &mut buf, len, iters, &mut rng);
                    record(
                        results,
                        &format!("limit/{}", kib(len)),
                        iters * len,
                        iters,
                        el,
                        &[],
                    );
                    el
                })
            });
            g.bench_function("sync_loop/1t", |b| {
                b.iter_custom(|iters| {
                    let (el, lat) =
                        drive(&loop_sim, loop_object, len, iters, depth_for(len), &mut rng);
                    record(
                        results,
                        &format!("sync_loop/1t/{}", kib(len)),
                        iters * len,
                        iters,
                        el,
                        &lat,
                    );
                    el
                })
            });
            for sv in &served {
                g.bench_function(&sv.key, |b| {
                    b.iter_custom(|iters| {
                        let (el, lat) =
                            drive(&sv.sim, sv.object, len, iters, depth_for(len), &mut rng);
                        record(
                            results,
                            &format!("{}/{}", sv.key, kib(len)),
                            iters * len,
                            iters,
                            el,
                            &lat,
                        );
                        el
                    })
                });
            }
            g.finish();
        }
        interleaved(s, &f, &mut buf, &loop_sim, loop_object, &served);
        stop.store(true, Ordering::Relaxed);
    });
    for mut sv in served {
        let st = sv.engine.take().unwrap().stop();
        assert_eq!(st.reads_failed, 0, "{st:?}");
    }
}

/// Rounds of the interleaved comparison.
const ROUNDS: usize = 5;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The machine is shared, so load drifts over minutes: compare the runs that a ratio
/// needs in rounds, each round running every contender once, and take medians.
fn interleaved(
    s: &Setup,
    f: &File,
    buf: &mut Aligned,
    loop_sim: &Sim,
    loop_object: u32,
    served: &[Served],
) {
    println!("\ninterleaved: {ROUNDS} rounds per size, median requests/s (GiB/s)");
    println!(
        "| size | limit | sync_loop/1t | {} |",
        served
            .iter()
            .map(|x| x.key.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---:|---:|{}", "---:|".repeat(served.len()));
    let mut ratios = Vec::new();
    for len in SIZES {
        let n: u64 = match len {
            l if l <= 4096 => 3000,
            l if l <= 16384 => 2000,
            l if l <= 131072 => 600,
            _ => 100,
        };
        let mut rng = StdRng::seed_from_u64(len ^ 0xabc);
        let mut rps: Vec<Vec<f64>> = vec![Vec::new(); served.len() + 2];
        for _ in 0..ROUNDS {
            let el = limit_run(s, f, buf, len, n, &mut rng);
            rps[0].push(n as f64 / el.as_secs_f64());
            let (el, _) = drive(loop_sim, loop_object, len, n, depth_for(len), &mut rng);
            rps[1].push(n as f64 / el.as_secs_f64());
            for (i, sv) in served.iter().enumerate() {
                let (el, _) = drive(&sv.sim, sv.object, len, n, depth_for(len), &mut rng);
                rps[i + 2].push(n as f64 / el.as_secs_f64());
            }
        }
        let med: Vec<f64> = rps.iter_mut().map(|v| median(v)).collect();
        let cell = |r: f64| format!("{r:.0} ({:.3})", r * len as f64 / (1u64 << 30) as f64);
        println!(
            "| {} | {} |",
            kib(len),
            med.iter().map(|&r| cell(r)).collect::<Vec<_>>().join(" | ")
        );
        ratios.push((len, med));
    }
    // Ratio tables: every engine over the limit (column 0), then over the sync loop (1).
    for (base, name) in [(0, "limit"), (1, "sync_loop")] {
        println!(
            "\n| size | {} |",
            served
                .iter()
                .map(|x| format!("{}/{name}", x.key))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|{}", "---:|".repeat(served.len()));
        for (len, med) in &ratios {
            println!(
                "| {} | {} |",
                kib(*len),
                med[2..]
                    .iter()
                    .map(|r| format!("{:.2}", r / med[base]))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
}

fn kib(len: u64) -> String {
    if len >= 1 << 20 {
        format!("{}MiB", len >> 20)
    } else {
        format!("{}KiB", len >> 10)
    }
}

/// Page-aligned heap buffer for O_DIRECT writes.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `layout.size()` bytes and exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn direct_file(dir: &std::path::Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("limit.cache"))
        .unwrap();
    let mut buf = Aligned::new(1 << 20);
    for off in (0..BLOB_BYTES as u64).step_by(1 << 20) {
        f.write_all_at(buf.slice(), off).unwrap();
    }
    f
}

/// lz4-decompress the chunks of each request and pwrite the requested bytes: the work
/// with nothing around it (records already in memory, no verification, no messages).
fn limit_run(
    s: &Setup,
    f: &File,
    buf: &mut Aligned,
    len: u64,
    iters: u64,
    rng: &mut StdRng,
) -> Duration {
    let slots = BLOB_BYTES as u64 / len;
    let start = Instant::now();
    for _ in 0..iters {
        let off = rng.random_range(0..slots) * len;
        let first = (off / CHUNK_BYTES as u64) as usize;
        let last = ((off + len - 1) / CHUNK_BYTES as u64) as usize;
        let out = buf.slice();
        for (k, i) in (first..=last).enumerate() {
            let rec = &s.records[i];
            let dst = &mut out[k * CHUNK_BYTES..(k + 1) * CHUNK_BYTES];
            lz4_flex::block::decompress_into(&rec[48..], dst).unwrap();
        }
        let at = (off - first as u64 * CHUNK_BYTES as u64) as usize;
        f.write_all_at(&out[at..at + len as usize], off).unwrap();
    }
    start.elapsed()
}

/// One thread, one request at a time: read a message, read each chunk record, verify
/// and decompress it, pwrite it, complete. The way nydusd's fscache handler works.
fn sync_loop(dev: Arc<Sim>, s: &Setup, stop: Arc<AtomicBool>) {
    let packs: HashMap<u32, File> = s
        .registry
        .packs
        .iter()
        .map(|(n, p)| (*n, File::open(p).unwrap()))
        .collect();
    let mut objects: HashMap<u32, OwnedFd> = HashMap::new();
    let mut msg = vec![0u8; 1024];
    let mut rec = vec![0u8; 2 << 20];
    let mut out = Aligned::new(2 << 20);
    let mut pfd = libc::pollfd {
        fd: dev.poll_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        loop {
            let n = dev.read_msg(&mut msg).unwrap();
            if n == 0 {
                break;
            }
            match cachefiles::parse(&msg[..n]).unwrap() {
                Msg::Open {
                    msg_id,
                    object_id,
                    fd,
                    ..
                } => {
                    // SAFETY: the simulator dup'ed this fd for us.
                    objects.insert(object_id, unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
                    let size = s.table.size_bytes();
                    cachefiles::send(
                        &*dev,
                        &Command::Copen {
                            msg_id,
                            size: Ok(size),
                        },
                    )
                    .unwrap();
                }
                Msg::Close { object_id } => {
                    objects.remove(&object_id);
                }
                Msg::Read {
                    msg_id,
                    object_id,
                    off,
                    len,
                } => {
                    let fd = &objects[&object_id];
                    for e in s.table.overlapping(off, len) {
                        let loc = e.loc.unwrap();
                        let r = &mut rec[..loc.record_len()];
                        packs[&loc.pack].read_exact_at(r, loc.offset).unwrap();
                        let o = out.slice();
                        decode_record(r, &loc, &e.digest, &mut o[..e.raw_len as usize]).unwrap();
                        let a = off.max(e.blob_offset);
                        let b = (off + len).min(e.blob_offset + e.slot_len());
                        let src = &o[(a - e.blob_offset) as usize..(b - e.blob_offset) as usize];
                        nix::sys::uio::pwrite(fd.as_fd(), src, a as i64).unwrap();
                    }
                    let _ = dev.complete_read(fd.as_raw_fd(), msg_id);
                }
            }
        }
    }
}

/// A reader reading the blob sequentially in 4 KiB reads, served by the kernel from the
/// cache file when cached (no message): read-around off vs on, engine uring 1 thread.
fn bench_read_around(c: &mut Criterion, s: &Setup, results: &Results) {
    let mut g = c.benchmark_group("reader_seq");
    g.throughput(Throughput::Bytes(4096));
    for ra in [false, true] {
        let (_cache, sim) = new_sim(s);
        let front = Arc::new(CachefilesFront::new(
            sim.clone(),
            Arc::new(RegistryHandle::new(Registry {
                blobs: s.registry.blobs.clone(),
                packs: s.registry.packs.clone(),
            })),
        ));
        let mut cfg = EngineConfig::new(s.root.join("chunks"));
        cfg.threads = 1;
        cfg.read_around = ra;
        let engine = Engine::start(cfg, front).unwrap();
        let (object, _) = sim.open(&s.name, WAIT).unwrap();
        let key = format!("4KiB/read_around_{}", if ra { "on" } else { "off" });
        let mut cursor = 0u64;
        g.bench_function(&key, |b| {
            b.iter_custom(|iters| {
                let mut el = Duration::ZERO;
                for _ in 0..iters {
                    if cursor >= BLOB_BYTES as u64 {
                        sim.punch(&s.name).unwrap(); // start cold again, untimed
                        cursor = 0;
                    }
                    let t = Instant::now();
                    sim.read_like_kernel(object, cursor, 4096, WAIT).unwrap();
                    el += t.elapsed();
                    cursor += 4096;
                }
                record(
                    results,
                    &format!("reader_seq/{key}"),
                    iters * 4096,
                    iters,
                    el,
                    &[],
                );
                el
            })
        });
        engine.stop();
    }
    g.finish();
}

fn summary(results: &Results) {
    let mut m = results.lock().unwrap();
    let gib = |a: &Acc| a.bytes as f64 / a.elapsed.as_secs_f64() / (1u64 << 30) as f64;
    let rps = |a: &Acc| a.requests as f64 / a.elapsed.as_secs_f64();
    let mut keys: Vec<String> = m.keys().cloned().collect();
    keys.sort();
    println!("\n| run | GiB/s | requests/s | p50 us | p99 us |");
    println!("|---|---:|---:|---:|---:|");
    for k in &keys {
        let a = m.get_mut(k).unwrap();
        let (g, r) = (gib(a), rps(a));
        let (p50, p99) = (
            pct(&mut a.latencies_us, 0.5),
            pct(&mut a.latencies_us, 0.99),
        );
        println!("| {k} | {g:.3} | {r:.0} | {p50} | {p99} |");
    }
    println!("\n| size | engine/limit uring 1t | uring 2t | sync 1t | sync 2t |");
    println!("|---|---:|---:|---:|---:|");
    for len in SIZES {
        let lim = m
            .get(&format!("limit/{}", kib(len)))
            .map(gib)
            .unwrap_or(f64::NAN);
        let e = |st: &str, t: u32| {
            m.get(&format!("engine/{st}/{t}t/{}", kib(len)))
                .map(gib)
                .unwrap_or(f64::NAN)
                / lim
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            kib(len),
            e("uring", 1),
            e("uring", 2),
            e("sync", 1),
            e("sync", 2)
        );
    }
    let sl = m.get("sync_loop/1t/4KiB").map(rps).unwrap_or(f64::NAN);
    println!("\nrequests/s at 4 KiB, engine / sync loop (1 thread, one request at a time):");
    for st in ["uring", "sync"] {
        for t in [1, 2] {
            let e = m
                .get(&format!("engine/{st}/{t}t/4KiB"))
                .map(rps)
                .unwrap_or(f64::NAN);
            println!("  {st} {t}t: {:.0} / {:.0} = {:.2}x", e, sl, e / sl);
        }
    }
}

/// Scrape period of the "metrics on" runs: far more often than Prometheus (15 s or
/// more), so that the cost of a scrape, if any, shows.
const SCRAPE_EVERY: Duration = Duration::from_millis(10);
/// Rounds of the metrics comparison (each runs off, then on).
const METRICS_ROUNDS: usize = 15;
/// 4 KiB READs per run of the metrics comparison.
const METRICS_READS: u64 = 20_000;

/// Requests/s at 4 KiB, the daemon's defaults (uring writes, 2 threads), with the metrics
/// endpoint's work off and on: the same engine, and a thread that renders the full
/// `/metrics` text (every family, the engine's per-thread blocks summed) every
/// [`SCRAPE_EVERY`] while "on". Interleaved rounds, medians; criterion runs beside them.
fn bench_metrics(c: &mut Criterion, s: &Setup) {
    let sv = start_engine(s, 2, WriteStrategy::Uring, false);
    let counters = sv.engine.as_ref().unwrap().shared_counters();
    let source: dedupd::metrics::Source = Arc::new(move || {
        let mut e = dedupd::serve::stats::snapshot(&counters);
        e.front_end = "cachefiles".into();
        dedupd::metrics::Sample {
            front_end: "cachefiles".into(),
            requests: e.reads,
            filled_bytes: e.bytes_written,
            engine: e,
            ..Default::default()
        }
    });
    let on = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let scraper = {
        let (on, stop, scrapes) = (on.clone(), stop.clone(), scrapes.clone());
        std::thread::spawn(move || {
            // Bounded by `stop`.
            while !stop.load(Ordering::Relaxed) {
                if on.load(Ordering::Relaxed) {
                    let (body, _) = dedupd::metrics::render(&source, false);
                    assert!(body.contains("dedupd_fill_latency_seconds_count"));
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(SCRAPE_EVERY);
            }
        })
    };
    let len = 4096;
    let mut rng = StdRng::seed_from_u64(16);
    let mut rps = [Vec::new(), Vec::new()];
    for _ in 0..METRICS_ROUNDS {
        for (i, metrics) in [false, true].into_iter().enumerate() {
            on.store(metrics, Ordering::Relaxed);
            let (el, _) = drive(
                &sv.sim,
                sv.object,
                len,
                METRICS_READS,
                depth_for(len),
                &mut rng,
            );
            rps[i].push(METRICS_READS as f64 / el.as_secs_f64());
        }
    }
    on.store(false, Ordering::Relaxed);
    let rounds_off = rps[0].clone();
    let rounds_on = rps[1].clone();
    let (off, on_med) = (median(&mut rps[0]), median(&mut rps[1]));
    println!(
        "
metrics off vs on, 4 KiB, engine/uring/2t, {METRICS_ROUNDS} interleaved rounds of \
         {METRICS_READS} READs (median requests/s): off {off:.0}, on {on_med:.0}, on/off \
         {:.3}; {} scrapes while on",
        on_med / off,
        scrapes.load(Ordering::Relaxed)
    );
    println!(
        "  rounds off: {:?}",
        rounds_off.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!(
        "  rounds on:  {:?}",
        rounds_on.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    let mut g = c.benchmark_group("metrics/4k");
    g.throughput(Throughput::Elements(1));
    for metrics in [false, true] {
        let name = if metrics { "on" } else { "off" };
        g.bench_function(name, |b| {
            on.store(metrics, Ordering::Relaxed);
            b.iter_custom(|iters| {
                drive(&sv.sim, sv.object, len, iters, depth_for(len), &mut rng).0
            });
        });
    }
    g.finish();
    stop.store(true, Ordering::Relaxed);
    scraper.join().unwrap();
}

/// Rounds of the CPU comparison (each runs every engine once).
const CPU_ROUNDS: usize = 5;
/// Passes over the whole blob per engine per round of the CPU comparison (64 MiB each).
const CPU_PASSES: usize = 8;

/// CPU seconds (user + system) so far of this process's tasks that serve: the engine
/// threads and their io_uring workers (io-wq threads belong to the process that owns
/// the ring).
fn serving_cpu_seconds() -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ..." — comm may hold spaces; the fields follow the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if !(comm.starts_with("dedupd-serve") || comm.starts_with("iou-wrk")) {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the state.
        total += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    total as f64 / tick
}

/// Requests/s and the serving threads' CPU per MiB at 128 KiB random READs (issue 17's
/// native check): engines side by side, interleaved rounds, medians. Run:
/// `DEDUPD_BENCH_ONLY=cpu cargo bench --bench engine`.
fn bench_cpu(s: &Setup) {
    let len = 128 << 10;
    let mut served = vec![
        start_engine(s, 1, WriteStrategy::Uring, false),
        start_engine(s, 2, WriteStrategy::Uring, false),
    ];
    let mut digest = start_engine_with(s, 2, WriteStrategy::Uring, false, |c| {
        c.digest_on_read = true;
    });
    digest.key.push_str("/digest-on-read");
    served.push(digest);
    let mut rng = StdRng::seed_from_u64(17);
    let mut rps = vec![Vec::new(); served.len()];
    let mut cpu = vec![Vec::new(); served.len()];
    let slots = BLOB_BYTES as u64 / len;
    let reads = slots * CPU_PASSES as u64;
    for _ in 0..CPU_ROUNDS {
        for (i, sv) in served.iter().enumerate() {
            let (mut el, mut used) = (Duration::ZERO, 0.0);
            for _ in 0..CPU_PASSES {
                // The front end answers a READ of a range the cache file already holds
                // without the engine (a READ re-sent after a restart): every pass starts
                // from an empty cache file and reads each slot once, in random order.
                sv.sim.punch(&s.name).unwrap();
                let mut order: Vec<u64> = (0..slots).collect();
                for k in (1..order.len()).rev() {
                    order.swap(k, rng.random_range(0..=k));
                }
                let c0 = serving_cpu_seconds();
                let t0 = Instant::now();
                let mut q = std::collections::VecDeque::new();
                for slot in order {
                    if q.len() >= depth_for(len) {
                        let t: ReadTicket = q.pop_front().unwrap();
                        t.wait(WAIT).expect("READ completed");
                    }
                    q.push_back(sv.sim.submit_read(sv.object, slot * len, len).unwrap());
                }
                for t in q {
                    t.wait(WAIT).expect("READ completed");
                }
                el += t0.elapsed();
                used += serving_cpu_seconds() - c0;
            }
            let mib = (reads * len) as f64 / f64::from(1 << 20);
            rps[i].push(reads as f64 / el.as_secs_f64());
            cpu[i].push(used * 1000.0 / mib);
        }
    }
    println!(
        "\nCPU at 128 KiB random READs, {CPU_ROUNDS} interleaved rounds of {CPU_PASSES} passes \
         over the {} MiB blob (medians; CPU of the serving threads and their io-wq workers):",
        BLOB_BYTES >> 20
    );
    println!("| engine | requests/s | CPU ms per MiB |\n|---|---|---|");
    for (i, sv) in served.iter().enumerate() {
        let st = sv.engine.as_ref().unwrap().stats();
        assert_eq!(st.reads_failed, 0, "{}: failed fills: {st:?}", sv.key);
        // Every READ was served by the engine, none answered from the cache file.
        assert!(
            st.bytes_written >= reads * len * CPU_ROUNDS as u64,
            "{}: {st:?}",
            sv.key
        );
        println!(
            "| {} | {:.0} | {:.3} |",
            sv.key,
            median(&mut rps[i]),
            median(&mut cpu[i])
        );
    }
}

fn benches(c: &mut Criterion) {
    let s = setup();
    match std::env::var("DEDUPD_BENCH_ONLY").as_deref() {
        Ok("metrics") => {
            bench_metrics(c, &s);
            return;
        }
        Ok("cpu") => {
            bench_cpu(&s);
            return;
        }
        _ => {}
    }
    let results: Results = Arc::default();
    bench_sizes(c, &s, &results);
    bench_read_around(c, &s, &results);
    bench_metrics(c, &s);
    summary(&results);
}

criterion_group! {
    name = engine;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(engine);
