//! Lazy pull over the network (issue 13's benchmark): the fio jobs of `bench/fio/`, cold,
//! through a lazily mounted layer whose chunks are in the registry, beside the same
//! layer with its chunks in the local store and beside local EROFS, over loopback and
//! over links shaped inside a network namespace the benchmark creates. See
//! `bench/README.md` ("Lazy pull over the network") for what each number means.
//!
//! ```sh
//! cargo bench --bench lazy                          # loopback, 1 Gbit/s 2 ms, 100 Mbit/s 20 ms
//! cargo bench --bench lazy -- --reps 3 --sweep      # plus the fetcher's window sweep
//! cargo bench --bench lazy -- --links 100m --jobs rand --numjobs 8
//! cargo bench --bench lazy -- --chunk-size 16384 --windows 16K,4M --jobs rand
//! ```
//!
//! Root only (mounts, fanotify, namespaces); needs `docker-registry`, `fio`, `iproute2`,
//! `iptables` (`kernel-tests/install-host-deps` installs them).

#[path = "lazy/cleanup.rs"]
mod cleanup;
#[path = "lazy/daemon.rs"]
mod daemon;
#[path = "lazy/image.rs"]
mod image;
#[path = "lazy/link.rs"]
mod link;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon::{Daemon, Windows};
use image::{Pushed, RegistryProcess};
use link::{Link, Shape};

const DEDUPD: &str = env!("CARGO_BIN_EXE_dedupd");
/// Longest a fio run may take before it is killed and the run counts as failed.
const FIO_TIMEOUT: Duration = Duration::from_secs(900);
/// Free space the data set and its copies need (registry, export, local store, one
/// lazy root at a time).
const NEEDED_BYTES: u64 = 3 << 30;
/// The fetcher's defaults (`FetchConfig::default`, checked at start), the baseline of
/// the tables.
const DEFAULT_WINDOWS: Windows = Windows {
    min: 256 << 10,
    max: 4 << 20,
};

/// A network setting.
#[derive(Clone, Copy, Debug)]
struct Net {
    name: &'static str,
    shape: Option<Shape>,
}

const NETS: [Net; 3] = [
    Net {
        name: "loopback",
        shape: None,
    },
    Net {
        name: "1g",
        shape: Some(Shape {
            rate_bits: 1_000_000_000,
            rtt: Duration::from_millis(2),
        }),
    },
    Net {
        name: "100m",
        shape: Some(Shape {
            rate_bits: 100_000_000,
            rtt: Duration::from_millis(20),
        }),
    },
];

/// Where a run's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    /// Lazily mounted layer, chunks in the registry, fresh dedupd root.
    Lazy,
    /// The same layer, every chunk in the local store, blob files empty.
    Store,
    /// The layer exported and mounted as plain file-backed EROFS.
    Erofs,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Lazy => "lazy",
            Variant::Store => "local store",
            Variant::Erofs => "local EROFS",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Job {
    Seq,
    Rand,
    Small,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Seq => "seq-128k",
            Job::Rand => "rand-4k",
            Job::Small => "small-files",
        }
    }

    fn parse(s: &str) -> Job {
        match s {
            "seq" | "seq-128k" => Job::Seq,
            "rand" | "rand-4k" => Job::Rand,
            "small" | "small-files" => Job::Small,
            _ => panic!("unknown job {s:?} (seq, rand, small)"),
        }
    }
}

struct Opts {
    nets: Vec<Net>,
    jobs: Vec<Job>,
    reps: usize,
    sweep: bool,
    numjobs: usize,
    chunk_size: u64,
    /// The fetcher's windows of the main table (default: the fetcher's defaults).
    windows: Windows,
    /// Divides the data set (big files, number of small files) to shorten a run.
    shrink: usize,
    json: Option<PathBuf>,
}

/// `N`, `NK` or `NM` bytes.
fn parse_bytes(s: &str) -> u64 {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("{s:?}: bytes, as N, NK or NM"))
        * mul
}

fn parse_args() -> Opts {
    let mut o = Opts {
        nets: NETS.to_vec(),
        jobs: vec![Job::Seq, Job::Rand, Job::Small],
        reps: 1,
        sweep: false,
        numjobs: 8,
        chunk_size: 64 << 10,
        windows: DEFAULT_WINDOWS,
        shrink: 1,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    // Bounded by the arguments.
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {} // what `cargo bench` passes
            "--links" => {
                o.nets = val()
                    .split(',')
                    .map(|n| {
                        *NETS
                            .iter()
                            .find(|x| x.name == n)
                            .unwrap_or_else(|| panic!("unknown link {n} (loopback, 1g, 100m)"))
                    })
                    .collect()
            }
            "--jobs" => o.jobs = val().split(',').map(Job::parse).collect(),
            "--reps" => o.reps = val().parse().expect("--reps N"),
            "--sweep" => o.sweep = true,
            "--numjobs" => o.numjobs = val().parse().expect("--numjobs N"),
            "--chunk-size" => o.chunk_size = parse_bytes(&val()),
            "--windows" => {
                let v = val();
                let (min, max) = v.split_once(',').expect("--windows MIN,MAX");
                o.windows = Windows {
                    min: parse_bytes(min),
                    max: parse_bytes(max),
                };
                assert!(
                    o.windows.min <= o.windows.max,
                    "--windows MIN,MAX: MIN <= MAX"
                );
            }
            "--shrink" => o.shrink = val().parse().expect("--shrink N"),
            "--json" => o.json = Some(PathBuf::from(val())),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        o.numjobs >= 1 && 4096 % o.numjobs == 0,
        "--numjobs divides 4096"
    );
    assert!(
        (1..=16).contains(&o.shrink) && 16 % o.shrink == 0,
        "--shrink 1, 2, 4, 8 or 16"
    );
    o
}

/// One measured run.
#[derive(Clone, Debug, serde::Serialize)]
struct Run {
    net: String,
    job: String,
    variant: String,
    min_window: u64,
    max_window: u64,
    rep: usize,
    load1: f64,
    bytes_read: u64,
    mib_s: f64,
    iops: f64,
    runtime_ms: u64,
    clat_p50_us: f64,
    clat_p99_us: f64,
    fetch: serde_json::Value,
}

impl Run {
    fn fetched(&self) -> u64 {
        self.fetch["bytes_fetched"].as_u64().unwrap_or(0)
    }
}

fn loadavg() -> (f64, String) {
    let s = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<&str> = s.split_whitespace().collect();
    (
        v.first().and_then(|x| x.parse().ok()).unwrap_or(0.0),
        v.iter().take(3).copied().collect::<Vec<_>>().join(" "),
    )
}

fn drop_caches() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches (root)");
}

/// Reads files (and directories, recursively, not crossing mounts) into the page cache:
/// each run's source is read from memory, so runs compare paths, not this VM's disk.
fn warm(paths: &[PathBuf]) {
    let mut buf = vec![0u8; 1 << 20];
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            let dev = std::os::unix::fs::MetadataExt::dev(&md);
            for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                let child = e.path();
                let same = fs::symlink_metadata(&child)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) == dev);
                if same {
                    stack.push(child);
                }
            }
        } else if md.is_file() {
            if let Ok(mut f) = fs::File::open(&p) {
                while f.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
        }
    }
}

/// fio's summary of a run.
struct FioOut {
    bytes: u64,
    bw_bytes: f64,
    iops: f64,
    runtime_ms: u64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `job` over the tree at `dir`; the random job with `numjobs` readers in flight.
fn fio(job: Job, dir: &Path, numjobs: usize, scratch: &Path) -> FioOut {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = match job {
        Job::Seq => repo.join("bench/fio/seq-128k.fio"),
        Job::Small => repo.join("bench/fio/small-files.fio"),
        Job::Rand => {
            // bench/fio/rand-4k.fio with the 4,096 reads split over `numjobs` readers:
            // that many reads in flight, the same total.
            let base = fs::read_to_string(repo.join("bench/fio/rand-4k.fio")).unwrap();
            let text = base.replace(
                "number_ios=4096",
                &format!(
                    "number_ios={}\nnumjobs={numjobs}\ngroup_reporting",
                    4096 / numjobs
                ),
            );
            assert_ne!(text, base, "rand-4k.fio no longer sets number_ios=4096");
            let p = scratch.join(format!("rand-4k-x{numjobs}.fio"));
            fs::write(&p, text).unwrap();
            p
        }
    };
    let out_path = scratch.join("fio.json");
    let mut child = Command::new("fio")
        .args(["--readonly", "--output-format=json", "--output"])
        .arg(&out_path)
        .arg(&file)
        .env("FIO_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("fio");
    cleanup::add_pid(child.id());
    let deadline = Instant::now() + FIO_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fio {} did not finish in {FIO_TIMEOUT:?}", job.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    cleanup::remove_pid(child.id());
    assert!(status.success(), "fio {} failed: {status}", job.name());
    // fio puts notes ("fio: ...") before the JSON document in the same file.
    let text = fs::read_to_string(&out_path).unwrap();
    let start = text
        .find("\n{")
        .map(|i| i + 1)
        .filter(|_| !text.starts_with('{'))
        .unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("fio {} output: {e}\n{text}", job.name()));
    let r = &v["jobs"][0]["read"];
    let pct = |k: &str| r["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1e3;
    assert_eq!(
        v["jobs"][0]["error"].as_u64(),
        Some(0),
        "fio {} reported an error",
        job.name()
    );
    FioOut {
        bytes: r["io_bytes"].as_u64().unwrap(),
        bw_bytes: r["bw_bytes"].as_f64().unwrap(),
        iops: r["iops"].as_f64().unwrap(),
        runtime_ms: r["runtime"].as_u64().unwrap(),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    }
}

/// Mounts `image` with `devices` as file-backed EROFS on `at` (mount(2) directly:
/// util-linux would put loop devices under it).
fn mount_erofs(image: &Path, devices: &[PathBuf], at: &Path) {
    fs::create_dir_all(at).unwrap();
    let data: Vec<u8> = devices
        .iter()
        .map(|d| {
            let mut v = b"device=".to_vec();
            v.extend_from_slice(d.as_os_str().as_bytes());
            v
        })
        .collect::<Vec<_>>()
        .join(&b","[..]);
    nix::mount::mount(
        Some(image),
        at,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(OsStr::from_bytes(&data)),
    )
    .unwrap_or_else(|e| panic!("mount -t erofs {}: {e}", image.display()));
    cleanup::add_mount(at);
}

fn umount(at: &Path) {
    nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH).unwrap();
    cleanup::remove_mount(at);
}

/// Everything set up once: the image in the registry, the export, the local-store root.
struct Setup {
    scratch: PathBuf,
    reg_dir: PathBuf,
    img: Pushed,
    /// The registry on 127.0.0.1 (kept for the whole run).
    loopback: RegistryProcess,
    export_image: PathBuf,
    export_devices: Vec<PathBuf>,
    /// Root of the local-store variant: the layer pulled lazily and read once whole.
    store_dir: PathBuf,
    numjobs: usize,
}

fn dedupd(args: &[&OsStr]) -> serde_json::Value {
    let out = Command::new(DEDUPD)
        .args(args)
        .env("DEDUPD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dedupd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() * s.fragment_size()
}

fn setup(scratch: &Path, o: &Opts) -> Setup {
    let t = Instant::now();
    let reg_dir = scratch.join("registry");
    let loopback = RegistryProcess::start(&reg_dir, &format!("127.0.0.1:{}", free_port()), false);
    let files = image::files(o.shrink);
    let (tar, digest) = image::layer_tar(&files);
    let logical: usize = files.iter().map(|(_, d)| d.len()).sum();
    drop(files);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = image::client(scratch);
    let img = rt.block_on(image::push(&client, &loopback.host, tar.clone(), &digest));
    eprintln!(
        "image pushed: one layer, {} MiB of tar, {} MiB of file data ({:.1?})",
        tar.len() >> 20,
        logical >> 20,
        t.elapsed()
    );
    drop(tar);
    let reference = format!("{}/{}", loopback.host, img.path);
    let publisher = scratch.join("publisher");
    let summary = dedupd(&[
        "publish".as_ref(),
        reference.as_ref(),
        "--plain-http".as_ref(),
        "--chunk-size".as_ref(),
        o.chunk_size.to_string().as_ref(),
        "--root".as_ref(),
        publisher.as_os_str(),
    ]);
    eprintln!("published ({:.1?}): {summary}", t.elapsed());
    let export = scratch.join("export");
    let ex = dedupd(&[
        "export".as_ref(),
        "--root".as_ref(),
        publisher.as_os_str(),
        digest.as_ref(),
        export.as_os_str(),
    ]);
    let export_image = PathBuf::from(ex["image"].as_str().unwrap());
    let export_devices: Vec<PathBuf> = ex["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    fs::remove_dir_all(&publisher).unwrap();
    // The local-store variant: the same lazily pulled layer, read whole once so that
    // every chunk is in the store. Before each of its runs the daemon is restarted
    // with the blob files deleted: cold mount, chunks local.
    let store_dir = scratch.join("store-variant");
    let mut d = Daemon::start(&store_dir, o.windows);
    let at = d.mount_view(&reference, &img, "warm");
    let mut stack = vec![at];
    let mut read = 0u64;
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                read += fs::read(e.path()).unwrap().len() as u64;
            }
        }
    }
    let f = d.settled_fetch();
    d.stop();
    eprintln!(
        "local-store root filled: read {} MiB, fetched {:?} ({:.1?})",
        read >> 20,
        f,
        t.elapsed()
    );
    assert_eq!(read as usize, logical, "the lazy layer reads short");
    Setup {
        scratch: scratch.to_path_buf(),
        reg_dir,
        img,
        loopback,
        export_image,
        export_devices,
        store_dir,
        numjobs: o.numjobs,
    }
}

/// The blob files of a fanotify root (deleted to make the local-store variant cold).
fn fanotify_blobs(store: &Path) -> PathBuf {
    store.join("fanotify/blobs")
}

/// One cold run of `job` through `variant` (`image_ref`: the registry to pull from).
fn run_one(
    s: &Setup,
    net: &str,
    image_ref: &str,
    job: Job,
    variant: Variant,
    w: Windows,
    rep: usize,
) -> Run {
    let (fo, fetch) = match variant {
        Variant::Erofs => {
            let at = s.scratch.join("erofs-mnt");
            drop_caches();
            let mut src = s.export_devices.clone();
            src.push(s.export_image.clone());
            warm(&src);
            mount_erofs(&s.export_image, &s.export_devices, &at);
            let fo = fio(job, &at, s.numjobs, &s.scratch);
            umount(&at);
            (fo, serde_json::Value::Null)
        }
        Variant::Store => {
            let blobs = fanotify_blobs(&s.store_dir.join("store"));
            assert!(blobs.exists(), "no {}", blobs.display());
            fs::remove_dir_all(&blobs).unwrap();
            let mut d = Daemon::start(&s.store_dir, w);
            let key = format!("v{}", nonce());
            let at = d.mount_view(image_ref, &s.img, &key);
            drop_caches();
            let st = s.store_dir.join("store");
            warm(&[st.join("chunks"), st.join("layers")]);
            let fo = fio(job, &at, s.numjobs, &s.scratch);
            let fetch = d.settled_fetch();
            d.stop();
            (fo, fetch)
        }
        Variant::Lazy => {
            let dir = s.scratch.join(format!("lazy-{}", nonce()));
            let mut d = Daemon::start(&dir, w);
            let at = d.mount_view(image_ref, &s.img, "v");
            drop_caches();
            warm(&image::storage_files(&s.reg_dir));
            let before = d.settled_fetch();
            let fo = fio(job, &at, s.numjobs, &s.scratch);
            let after = d.settled_fetch();
            d.stop();
            cleanup::detach_under(&dir);
            fs::remove_dir_all(&dir).unwrap();
            (fo, delta(&after, &before))
        }
    };
    let (load1, _) = loadavg();
    let r = Run {
        net: net.to_string(),
        job: job.name().to_string(),
        variant: variant.name().to_string(),
        min_window: w.min,
        max_window: w.max,
        rep,
        load1,
        bytes_read: fo.bytes,
        mib_s: fo.bw_bytes / f64::from(1 << 20),
        iops: fo.iops,
        runtime_ms: fo.runtime_ms,
        clat_p50_us: fo.p50_us,
        clat_p99_us: fo.p99_us,
        fetch,
    };
    eprintln!(
        "  {net} {} {} win {}K/{}K rep {rep}: {:.1} MiB/s {:.0} IOPS p50 {:.0} us, fetched {} MiB ({} requests), load {load1}",
        r.job,
        r.variant,
        w.min >> 10,
        w.max >> 10,
        r.mib_s,
        r.iops,
        r.clat_p50_us,
        r.fetched() >> 20,
        r.fetch["range_requests"],
    );
    r
}

fn nonce() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `a - b` per numeric counter.
fn delta(a: &serde_json::Value, b: &serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(m) = a.as_object() {
        for (k, v) in m {
            if let (Some(x), Some(y)) = (v.as_u64(), b[k].as_u64().or(Some(0))) {
                out.insert(k.clone(), x.saturating_sub(y).into());
            }
        }
    }
    out.into()
}

/// What a link measured before its runs.
#[derive(Clone, Debug, serde::Serialize)]
struct LinkCheck {
    net: String,
    rate_mbit: Option<u64>,
    rtt_ms: Option<f64>,
    connect_rtt_ms_median: Option<f64>,
    connect_rtt_ms_max: Option<f64>,
    /// One HTTP GET of 64 MiB of the layer blob, MiB/s (curl).
    http_get_mib_s: f64,
}

fn http_get_mib_s(host: &str, img: &Pushed) -> f64 {
    let url = format!("http://{host}/v2/bench/fio/blobs/{}", img.layer_digest);
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-r",
            "0-67108863",
            "--max-time",
            "120",
            "-w",
            "%{speed_download}",
            &url,
        ])
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {url}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .unwrap()
        / f64::from(1 << 20)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("lazy bench: needs root (mounts, fanotify, network namespaces); skipped");
        return;
    }
    cleanup::install_signal_watcher();
    let o = parse_args();
    defaults_match();
    let scratch = tempfile::Builder::new()
        .prefix("dedupd-lazybench.")
        .tempdir_in("/var/tmp")
        .unwrap()
        .keep();
    cleanup::add_dir(&scratch);
    let free = free_bytes(&scratch);
    assert!(
        free > NEEDED_BYTES,
        "{} MiB free under /var/tmp; the benchmark needs {} MiB",
        free >> 20,
        NEEDED_BYTES >> 20
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bench(&o, &scratch)));
    cleanup::all();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// The tables' baseline must be the fetcher's real defaults.
fn defaults_match() {
    let d = dedupd::remote::FetchConfig::default();
    assert_eq!(
        (d.min_window_bytes, d.max_window_bytes),
        (DEFAULT_WINDOWS.min, DEFAULT_WINDOWS.max),
        "update DEFAULT_WINDOWS to FetchConfig::default()"
    );
}

fn bench(o: &Opts, scratch: &Path) {
    let started = Instant::now();
    let (_, load) = loadavg();
    println!(
        "lazy bench: {}, {} CPUs, kernel {}, load at start {load}",
        chrono_now(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let s = setup(scratch, o);
    let mut runs: Vec<Run> = Vec::new();
    let mut checks: Vec<LinkCheck> = Vec::new();
    for net in &o.nets {
        let (_link, _ns_registry, host) = match net.shape {
            None => (None, None, s.loopback.host.clone()),
            Some(shape) => {
                let l = Link::up(shape);
                let r =
                    RegistryProcess::start(&s.reg_dir, &format!("{}:5000", link::NS_ADDR), true);
                (Some(l), Some(r), format!("{}:5000", link::NS_ADDR))
            }
        };
        let image_ref = format!("{host}/{}", s.img.path);
        warm(&image::storage_files(&s.reg_dir));
        let (rtt_med, rtt_max) = match &_link {
            Some(l) => {
                let (a, b) = l.connect_rtt_ms(5000, 11);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let check = LinkCheck {
            net: net.name.to_string(),
            rate_mbit: net.shape.map(|s| s.rate_bits / 1_000_000),
            rtt_ms: net.shape.map(|s| s.rtt.as_secs_f64() * 1e3),
            connect_rtt_ms_median: rtt_med,
            connect_rtt_ms_max: rtt_max,
            http_get_mib_s: http_get_mib_s(&host, &s.img),
        };
        eprintln!("link {check:?}");
        checks.push(check);
        let variants = [Variant::Erofs, Variant::Store, Variant::Lazy];
        for rep in 0..o.reps {
            for &job in &o.jobs {
                // The order of the variants turns with each repetition.
                for k in 0..variants.len() {
                    let v = variants[(k + rep) % variants.len()];
                    runs.push(run_one(&s, net.name, &image_ref, job, v, o.windows, rep));
                }
            }
        }
        if o.sweep && net.shape.is_some() {
            for min in [64u64 << 10, 256 << 10, 1 << 20] {
                for max in [1u64 << 20, 4 << 20, 16 << 20] {
                    let w = Windows { min, max };
                    if max < min || w == o.windows {
                        continue;
                    }
                    for &job in &o.jobs {
                        runs.push(run_one(&s, net.name, &image_ref, job, Variant::Lazy, w, 0));
                    }
                }
            }
        }
        if let Some(l) = &_link {
            eprintln!(
                "delay line: (packets, most held) = {:?}",
                l.delayed_packets()
            );
        }
    }
    let report = report(o, &checks, &runs);
    println!("{report}");
    let (_, load) = loadavg();
    println!(
        "finished {} after {:.0?}, load at end {load}",
        chrono_now(),
        started.elapsed()
    );
    if let Some(p) = &o.json {
        fs::write(
            p,
            serde_json::to_string_pretty(&serde_json::json!({
                "links": checks, "runs": runs, "numjobs": o.numjobs, "chunk_size": o.chunk_size,
                "shrink": o.shrink,
            }))
            .unwrap(),
        )
        .unwrap();
    }
}

fn chrono_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The tables: per link and job, medians of the variants, ratios, fetched per read,
/// and the targets.
fn report(o: &Opts, checks: &[LinkCheck], runs: &[Run]) -> String {
    let mut out = String::new();
    let mut groups: BTreeMap<(String, String, String, u64, u64), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((
                r.net.clone(),
                r.job.clone(),
                r.variant.clone(),
                r.min_window,
                r.max_window,
            ))
            .or_default()
            .push(r);
    }
    let med = |k: &(String, String, String, u64, u64), f: &dyn Fn(&Run) -> f64| -> f64 {
        groups.get(k).map_or(f64::NAN, |v| {
            median(&mut v.iter().map(|r| f(r)).collect::<Vec<_>>())
        })
    };
    let _ = writeln!(
        out,
        "\ndata set: seq.bin {} MiB, rand.bin {} MiB, {} small files (shrink {}); random job: {} psync readers (reads in flight), 4,096 reads in all; chunk size {} KiB; fetcher windows {} KiB / {} KiB (min / max); medians of {} repetition(s)\n",
        (image::SEQ_BYTES / o.shrink) >> 20,
        (image::RAND_BYTES / o.shrink) >> 20,
        image::SMALL_FILES / o.shrink,
        o.shrink,
        o.numjobs,
        o.chunk_size >> 10,
        o.windows.min >> 10,
        o.windows.max >> 10,
        o.reps
    );
    let _ = writeln!(
        out,
        "| link | measured RTT (TCP connect, median / max) | one HTTP GET of 64 MiB |\n|---|---:|---:|"
    );
    for c in checks {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} MiB/s |",
            c.net,
            c.connect_rtt_ms_median.map_or("-".into(), |m| format!(
                "{m:.2} / {:.2} ms",
                c.connect_rtt_ms_max.unwrap()
            )),
            c.http_get_mib_s
        );
    }
    let _ = writeln!(
        out,
        "\n| link | job | local EROFS | local store | lazy | lazy / EROFS | lazy / store | fetched / read | range requests | target | met |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    let d = o.windows;
    for c in checks {
        for job in &o.jobs {
            let key = |v: Variant| {
                (
                    c.net.clone(),
                    job.name().to_string(),
                    v.name().to_string(),
                    d.min,
                    d.max,
                )
            };
            let rand = *job == Job::Rand;
            let unit = |v: Variant| {
                if rand {
                    med(&key(v), &|r| r.iops)
                } else {
                    med(&key(v), &|r| r.mib_s)
                }
            };
            let (e, st, lz) = (
                unit(Variant::Erofs),
                unit(Variant::Store),
                unit(Variant::Lazy),
            );
            let per_read = med(&key(Variant::Lazy), &|r| {
                r.fetched() as f64 / r.bytes_read as f64
            });
            let reqs = med(&key(Variant::Lazy), &|r| {
                r.fetch["range_requests"].as_f64().unwrap_or(0.0)
            });
            let (target, met) = target(c, *job, o.numjobs, lz);
            let fmt = |x: f64| {
                if rand {
                    format!("{x:.0} IOPS")
                } else {
                    format!("{x:.1} MiB/s")
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {per_read:.2} | {reqs:.0} | {target} | {met} |",
                c.net,
                job.name(),
                fmt(e),
                fmt(st),
                fmt(lz),
                lz / e,
                lz / st,
            );
        }
    }
    if runs
        .iter()
        .any(|r| r.min_window != d.min || r.max_window != d.max)
    {
        let _ = writeln!(
            out,
            "\nWindow sweep (lazy, one run each; the main table's row is its median)\n\n| link | min / max window | seq-128k MiB/s | seq fetched/read | rand-4k IOPS | rand fetched/read | small-files MiB/s | small fetched/read |\n|---|---|---:|---:|---:|---:|---:|---:|"
        );
        let mut combos: Vec<(String, u64, u64)> = runs
            .iter()
            .filter(|r| r.variant == Variant::Lazy.name() && r.net != "loopback")
            .map(|r| (r.net.clone(), r.min_window, r.max_window))
            .collect();
        combos.sort();
        combos.dedup();
        for (net, min, max) in combos {
            let cell = |job: Job, f: &dyn Fn(&Run) -> f64| {
                med(
                    &(
                        net.clone(),
                        job.name().to_string(),
                        Variant::Lazy.name().to_string(),
                        min,
                        max,
                    ),
                    f,
                )
            };
            let per = |r: &Run| r.fetched() as f64 / r.bytes_read as f64;
            let _ = writeln!(
                out,
                "| {net} | {} K / {} K{} | {:.1} | {:.2} | {:.0} | {:.2} | {:.1} | {:.2} |",
                min >> 10,
                max >> 10,
                if (min, max) == (d.min, d.max) {
                    " (main table)"
                } else {
                    ""
                },
                cell(Job::Seq, &|r| r.mib_s),
                cell(Job::Seq, &per),
                cell(Job::Rand, &|r| r.iops),
                cell(Job::Rand, &per),
                cell(Job::Small, &|r| r.mib_s),
                cell(Job::Small, &per),
            );
        }
    }
    out
}

/// The issue's target for `job` on link `c` and whether `got` meets it.
fn target(c: &LinkCheck, job: Job, numjobs: usize, got: f64) -> (String, &'static str) {
    let (Some(mbit), Some(rtt_ms)) = (c.rate_mbit, c.rtt_ms) else {
        return ("-".into(), "-");
    };
    match job {
        Job::Seq => {
            let link = mbit as f64 * 1e6 / 8.0 / f64::from(1 << 20);
            let t = 0.8 * link;
            (
                format!(">= 0.8 x {link:.1} = {t:.1} MiB/s"),
                if got >= t { "yes" } else { "no" },
            )
        }
        Job::Rand => {
            let t = 0.8 * numjobs as f64 / (rtt_ms / 1e3);
            (
                format!(">= 0.8 x {numjobs} / {rtt_ms} ms = {t:.0} IOPS"),
                if got >= t { "yes" } else { "no" },
            )
        }
        Job::Small => ("-".into(), "-"),
    }
}
