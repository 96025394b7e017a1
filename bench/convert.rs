//! Conversion throughput (MiB of uncompressed tar per second): `cargo bench --bench convert`.
//!
//! A synthetic 64 MiB layer (text-like, random and sparse files, as tar, tar.gz and
//! tar.zst) is converted into a fresh store per iteration (every chunk is new), and once
//! more into a store that has it (the already-converted path: hashing, no storing).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dedupd::convert::convert_layer;
use dedupd::store::{Store, DEFAULT_CHUNK_BYTES};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LAYER_BYTES: usize = 64 << 20;

fn text(rng: &mut StdRng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "int ", "return ", "static ", "void ", "struct ", "{\n", "}\n", "if (", ") ", "0x1f",
        "buffer", "len",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
    }
    v.truncate(len);
    v
}

/// A deterministic layer of about `LAYER_BYTES` of file data.
fn layer_tar() -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut b = tar::Builder::new(Vec::new());
    let mut total = 0usize;
    let mut i = 0u32;
    while total < LAYER_BYTES {
        let len = match i % 10 {
            0 => rng.random_range(1 << 20..4 << 20),
            _ => rng.random_range(100..60_000),
        };
        let data = match i % 5 {
            0..=2 => text(&mut rng, len),
            3 => {
                let mut v = vec![0u8; len];
                rng.fill(&mut v[..]);
                v
            }
            _ => {
                let mut v = vec![0u8; len];
                let n = v.len().min(300);
                rng.fill(&mut v[..n]);
                v
            }
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, format!("d{}/f{i}", i % 50), &data[..])
            .unwrap();
        total += data.len();
        i += 1;
    }
    b.into_inner().unwrap()
}

fn convert_fresh(layer: &Path, scratch: &Path) -> Duration {
    let root = tempfile::tempdir_in(scratch).unwrap();
    let store = Store::open(root.path()).unwrap();
    let t = Instant::now();
    let r = convert_layer(&store, layer, DEFAULT_CHUNK_BYTES).unwrap();
    let elapsed = t.elapsed();
    assert!(r.new_chunks > 0);
    elapsed
}

fn bench(c: &mut Criterion) {
    let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-convert");
    std::fs::create_dir_all(&scratch).unwrap();
    let dir = tempfile::tempdir_in(&scratch).unwrap();
    let tar = layer_tar();
    let files = [
        ("tar", tar.clone()),
        ("gzip", {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        }),
        ("zstd", zstd::stream::encode_all(&tar[..], 3).unwrap()),
    ];
    let mut g = c.benchmark_group("convert");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(tar.len() as u64));
    for (name, bytes) in &files {
        let path = dir.path().join(format!("layer.{name}"));
        std::fs::write(&path, bytes).unwrap();
        g.bench_function(format!("new/{name}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| convert_fresh(&path, &scratch)).sum())
        });
    }
    let path = dir.path().join("layer.tar");
    let root = tempfile::tempdir_in(&scratch).unwrap();
    let store = Store::open(root.path()).unwrap();
    convert_layer(&store, &path, DEFAULT_CHUNK_BYTES).unwrap();
    g.bench_function("again/tar", |b| {
        b.iter(|| {
            let r = convert_layer(&store, &path, DEFAULT_CHUNK_BYTES).unwrap();
            assert!(r.already_converted && r.new_chunks == 0);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
