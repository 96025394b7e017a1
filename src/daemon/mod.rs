//! `dedupd run`: one process serving the kernel and containerd. It opens the store once
//! (an `Arc<Store>` shared by everything), picks the front end ([`select`]), starts its
//! data plane and the snapshotter's layer mounter that matches it, serves the containerd
//! snapshots API on the control thread (`--socket`), and writes its counters to
//! `<root>/run/stats.json` until SIGINT/SIGTERM. SIGHUP reloads the blob registry.
//!
//! Front ends, best first: `cachefiles` (EROFS over fscache, served by the io_uring
//! engine; layers committed later become servable by a registry refresh before they
//! are mounted), `fanotify` (file-backed EROFS over sparse blob files filled on
//! pre-content events; its holder process keeps the group across restarts), `local`
//! (blobs materialized, no laziness).
//!
//! `stats.json` first appears once the front end is serving and the snapshotter socket
//! is bound: wait for it (with `running: true`) before mounting.
//!
//! Everything under the root is root's alone ([`crate::perms`]): the daemon runs with
//! umask 077 and, at start, tightens what an earlier version left readable. With
//! `metrics_address`, a Prometheus endpoint ([`crate::metrics`]) serves counters summed
//! at scrape time.

pub mod cache_limit;
pub mod teardown;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::config::{Config, FrontEnd};
use crate::frontend::cachefiles;
use crate::frontend::cachefiles::failover::{self, Acquired, Keeper};
use crate::frontend::cachefiles::front::{CachefilesFront, RegistryHandle};
use crate::frontend::fanotify::mounter::FanotifyMounter;
use crate::frontend::fanotify::Options as FanotifyOptions;
use crate::metrics::CacheUsage;
use crate::remote::{Fetcher, LazyPuller};
use crate::serve::{Engine, EngineConfig, StatsSnapshot, WriteStrategy};
use crate::snapshotter::{
    ControlThread, FscacheMounter, LayerMounter, LocalMounter, RegistryRefresh, Snapshotter,
};
use crate::store::Store;

/// How often `stats.json` is rewritten.
const STATS_PERIOD: Duration = Duration::from_millis(200);
/// Tag given to the cachefiles cache.
const CACHE_TAG: &str = "dedupd";
/// Environment variable naming an inherited `/dev/cachefiles` fd (failover): the daemon
/// writes `restore` instead of binding a new cache.
pub const CACHEFILES_FD_ENV: &str = failover::CACHEFILES_FD_ENV;
/// How long a stopping cachefiles daemon waits for the volumes of layers just unmounted
/// to go before it decides whether the cache is still in use.
const VOLUMES_SETTLE: Duration = Duration::from_secs(3);
/// How long the fanotify holder keeps the group for a restarting daemon before it fails
/// reads with EIO.
const FANOTIFY_GRACE: Duration = Duration::from_secs(30);

/// `dedupd run` arguments; flags override the config file, which overrides defaults.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Config file (TOML).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Store root.
    #[arg(long)]
    pub root: Option<std::path::PathBuf>,
    /// Snapshotter socket.
    #[arg(long)]
    pub socket: Option<std::path::PathBuf>,
    /// Data-plane threads (0: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Front end.
    #[arg(long, value_enum)]
    pub front_end: Option<FrontEnd>,
    /// How cache-file writes are issued.
    #[arg(long, value_enum, default_value = "uring")]
    pub write_strategy: WriteStrategy,
    /// Fill only the requested pages instead of the whole chunks around them.
    #[arg(long)]
    pub no_read_around: bool,
    /// Check every chunk read against its BLAKE3 digest instead of the at-rest checksum
    /// the store keeps for it (see the README's "Verification").
    #[arg(long)]
    pub digest_on_read: bool,
    /// Prometheus endpoint: a unix socket path or 127.0.0.1:PORT (overrides
    /// `metrics_address`).
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// Bound on the lazily pulled data the node keeps: bytes, with a unit (`20GiB`), or
    /// a percentage of the root's filesystem (overrides `[cache] limit`).
    #[arg(long)]
    pub cache_limit: Option<String>,
}

impl RunArgs {
    /// `run --root ROOT --socket SOCKET --front-end local`.
    pub fn local(root: PathBuf, socket: PathBuf) -> RunArgs {
        RunArgs {
            config: None,
            root: Some(root),
            socket: Some(socket),
            threads: None,
            front_end: Some(FrontEnd::Local),
            write_strategy: WriteStrategy::Uring,
            no_read_around: false,
            digest_on_read: false,
            metrics_address: None,
            cache_limit: None,
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(r) = &self.root {
            c.root = r.clone();
        }
        if let Some(s) = &self.socket {
            c.socket = s.clone();
        }
        if let Some(t) = self.threads {
            c.threads = t;
        }
        if let Some(f) = self.front_end {
            c.front_end = f;
        }
        if let Some(m) = &self.metrics_address {
            c.metrics_address = Some(m.clone());
        }
        if let Some(l) = &self.cache_limit {
            c.cache.limit = Some(l.clone());
        }
        Ok(c)
    }
}

/// What `stats.json` holds: the data plane's counters plus who is serving and why.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    /// Process id of the daemon.
    pub pid: u32,
    /// Why this front end was chosen.
    pub front_end_reason: String,
    /// Better front ends that were unavailable, and why.
    #[serde(default)]
    pub front_ends_unavailable: Vec<String>,
    /// The snapshotter's state (snapshot counts, layers converted and mounted).
    #[serde(default)]
    pub snapshotter: serde_json::Value,
    /// Milliseconds since the data plane started.
    pub uptime_ms: u64,
    /// False once the daemon has stopped (the final write).
    pub running: bool,
    /// Blobs in the registry.
    pub registered_blobs: u64,
    /// The lazy-pull fetcher's counters (absent without lazy pull).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<crate::remote::fetch::FetchStatsSnapshot>,
    /// The front end's cache on disk, against its limit.
    #[serde(default)]
    pub cache: CacheUsage,
    /// Bytes of the store's pack files.
    #[serde(default)]
    pub pack_bytes: u64,
    /// The counters.
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

/// Path of the stats file under `root`.
pub fn stats_path(root: &Path) -> PathBuf {
    root.join("run").join("stats.json")
}

/// Allocated bytes of the regular files under `dir` (at most [`MAX_CACHE_FILES`] looked
/// at): what a front end's cache takes on disk.
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut seen = 0;
    let mut stack = vec![dir.to_path_buf()];
    // Bounded by MAX_CACHE_FILES.
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            seen += 1;
            if seen > MAX_CACHE_FILES {
                return total;
            }
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.blocks() * 512;
            }
        }
    }
    total
}

/// Files a cache walk looks at, at most.
pub const MAX_CACHE_FILES: usize = 1 << 20;

/// Where front end `f` keeps its cache files under `root`.
fn cache_dir_of(root: &Path, f: FrontEnd) -> PathBuf {
    match f {
        FrontEnd::Cachefiles => cachefiles_cache_dir(root),
        FrontEnd::Fanotify => fanotify_dir(root).join("blobs"),
        FrontEnd::Local | FrontEnd::Auto => root.join("local"),
    }
}

/// The bounded cache's counters and limit, when there is one.
type Bound = Option<(Arc<cache_limit::EvictStats>, cache_limit::Watermarks)>;

/// The cache on disk (with the bounded cache's limit and counters) and the pack
/// files' bytes.
fn disk_usage(root: &Path, f: FrontEnd, bound: &Bound, snap: &Snapshotter) -> (CacheUsage, u64) {
    let mut cache = CacheUsage {
        bytes: snap
            .front_end_bytes()
            .unwrap_or_else(|| disk_bytes(&cache_dir_of(root, f))),
        ..CacheUsage::default()
    };
    bounded_counters(bound, &mut cache);
    let packs = fs::read_dir(root.join("chunks"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .filter_map(|e| e.metadata().ok())
                // Allocated bytes: records an eviction deallocated take none.
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        })
        .unwrap_or(0);
    (cache, packs)
}

/// Copies the bounded cache's limit and counters (the evictor's atomics) into `cache`.
fn bounded_counters(bound: &Bound, cache: &mut CacheUsage) {
    use std::sync::atomic::Ordering::Relaxed;
    if let Some((stats, marks)) = bound {
        cache.limit_bytes = Some(marks.limit);
        cache.evictions = stats.chunks.load(Relaxed);
        cache.bounded_bytes = stats.bounded_bytes.load(Relaxed);
        cache.copy_bytes = stats.copy_bytes.load(Relaxed);
        cache.layers_released = stats.layers_released.load(Relaxed);
    }
}

fn write_status(path: &Path, status: &DaemonStatus) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    // Serialized first and written once: the serializer writes token by token, and a
    // write per token is hundreds of system calls for every rewrite.
    let mut text = serde_json::to_vec_pretty(status)?;
    text.push(b'\n');
    fs::File::create(&tmp)?.write_all(&text)?;
    fs::rename(&tmp, path)
}

/// Reads the running (or last) daemon's status from `<root>/run/stats.json`.
pub fn read_status(root: &Path) -> anyhow::Result<DaemonStatus> {
    let path = stats_path(root);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no stats (is `dedupd run --root {}` running?)",
            path.display(),
            root.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a stats file", path.display()))
}

/// `dedupd status`: the running (or last) daemon's state for a human, or with `json`
/// the same as JSON for scripts (what `stats.json` holds).
pub fn status(root: &Path, json: bool) -> anyhow::Result<()> {
    let status = read_status(root)?;
    let out = if json {
        let mut t = serde_json::to_string_pretty(&status)?;
        t.push('\n');
        t
    } else {
        render_status(&status)?
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}

/// Bytes for a human: `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Microseconds for a human: `850 us`, `12.5 ms`, `1.20 s`.
pub fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} us")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// The human form of `dedupd status`.
pub fn render_status(status: &DaemonStatus) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let st = &status.stats;
    let mut out = String::new();
    writeln!(
        out,
        "front end: {} ({})",
        st.front_end, status.front_end_reason
    )?;
    for u in &status.front_ends_unavailable {
        writeln!(out, "  {u}")?;
    }
    writeln!(
        out,
        "daemon: pid {} {}, uptime {:.1} s, {} blobs registered",
        status.pid,
        if status.running { "running" } else { "stopped" },
        status.uptime_ms as f64 / 1e3,
        status.registered_blobs
    )?;
    writeln!(
        out,
        "reads: {} ({} ok, {} failed), filled {} ({} from the store, {} from the registry), \
         fill latency p50 {} p99 {}, chunks read {} in {} pack reads",
        st.reads,
        st.reads_ok,
        st.reads_failed,
        human_bytes(st.bytes_written),
        human_bytes(st.served_from_store_bytes),
        human_bytes(st.served_from_registry_bytes),
        human_us(st.latency_us_p50),
        human_us(st.latency_us_p99),
        st.chunks_fetched,
        st.pack_reads
    )?;
    if let Some(f) = &status.fetch {
        writeln!(
            out,
            "registry: {} chunks asked ({} local, {} joined a fetch), {} range requests \
             ({} retried), {} fetched, p50 {} p99 {}, {} failed",
            f.requests,
            f.local,
            f.joined,
            f.range_requests,
            f.retries,
            human_bytes(f.bytes_fetched),
            human_us(f.latency_us_p50),
            human_us(f.latency_us_p99),
            f.failed
        )?;
    }
    let c = &status.cache;
    let limit = match c.limit_bytes {
        Some(l) if l > 0 => format!(
            "lazily pulled data {} of {} limit ({:.0}%; front end copies {}), {} chunks \
             evicted, {} idle layers released",
            human_bytes(c.bounded_bytes),
            human_bytes(l),
            c.bounded_bytes as f64 * 100.0 / l as f64,
            human_bytes(c.copy_bytes),
            c.evictions,
            c.layers_released
        ),
        _ => "no limit".to_string(),
    };
    writeln!(
        out,
        "cache: front end files {}; {limit}; store packs {}",
        human_bytes(c.bytes),
        human_bytes(status.pack_bytes)
    )?;
    if let Some(snap) = status.snapshotter.as_object() {
        let n = |k: &str| snap.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let layers = snap
            .get("layers")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        let flag =
            |l: &serde_json::Value, k: &str| l.get(k).and_then(|v| v.as_bool()) == Some(true);
        writeln!(
            out,
            "snapshots: {} active, {} views, {} committed; layers: {} used, {} converted, \
             {} mounted",
            n("active"),
            n("views"),
            n("committed"),
            layers.len(),
            layers.iter().filter(|l| flag(l, "converted")).count(),
            layers.iter().filter(|l| flag(l, "mounted")).count()
        )?;
        let mounted: Vec<&serde_json::Value> =
            layers.iter().filter(|l| flag(l, "mounted")).collect();
        if !mounted.is_empty() {
            writeln!(
                out,
                "mounted layers (local: its chunks in this node's store):"
            )?;
        }
        for l in mounted {
            let g = |k: &str| l.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let id = l.get("id").and_then(|v| v.as_str()).unwrap_or("?");
            let (data, local) = (g("data_bytes"), g("local_bytes"));
            let pct = if data == 0 {
                100.0
            } else {
                local as f64 * 100.0 / data as f64
            };
            writeln!(
                out,
                "  {}  local {} of {} ({pct:.0}%){}, {} files, {} snapshots",
                &id[..id.len().min(12)],
                human_bytes(local),
                human_bytes(data),
                if flag(l, "remote") {
                    ", pulled lazily"
                } else {
                    ""
                },
                g("files"),
                g("snapshots")
            )?;
        }
    }
    if st.slowest.is_empty() {
        writeln!(
            out,
            "slowest requests: none in the last {} s",
            crate::serve::stats::SLOW_WINDOW.as_secs()
        )?;
    } else {
        writeln!(
            out,
            "slowest requests of the last {} s (waits summed over each request's pieces):",
            crate::serve::stats::SLOW_WINDOW.as_secs()
        )?;
    }
    for r in &st.slowest {
        let blob = &r.blob[..r.blob.len().min(12)];
        writeln!(
            out,
            "  req {:#x}  {} at {} of {}: {}{} = store {}, network {}, kernel write {}",
            r.req,
            human_bytes(r.len),
            r.offset,
            blob,
            human_us(r.total_us),
            if r.ok { "" } else { " (EIO)" },
            human_us(r.store_us),
            human_us(r.fetch_us),
            human_us(r.write_us)
        )?;
    }
    Ok(out)
}

/// The front end `dedupd run` serves with, and why.
pub struct Selection {
    /// The chosen front end (never `Auto`).
    pub front_end: FrontEnd,
    /// One line: why this one.
    pub reason: String,
    /// Better front ends that were unavailable, each with its reason.
    pub unavailable: Vec<String>,
    /// The bound cache device (and who keeps it across restarts), when cachefiles was
    /// chosen.
    pub cachefiles: Option<Acquired>,
}

fn name(f: FrontEnd) -> &'static str {
    match f {
        FrontEnd::Auto => "auto",
        FrontEnd::Cachefiles => "cachefiles",
        FrontEnd::Fanotify => "fanotify",
        FrontEnd::Local => "local",
    }
}

/// Where the fanotify front end keeps its blob files and holder socket.
pub fn fanotify_dir(root: &Path) -> PathBuf {
    root.join("fanotify")
}

/// Picks the front end: a forced one must be available (else a clear error); `auto`
/// takes cachefiles if `/dev/cachefiles` exists and binds, else fanotify if this kernel
/// and the root's filesystem take pre-content marks, else local.
pub fn select(config: &Config) -> anyhow::Result<Selection> {
    let want = config.front_end;
    let mut unavailable = Vec::new();
    if matches!(want, FrontEnd::Auto | FrontEnd::Cachefiles) {
        let dev_path = Path::new(cachefiles::DEVICE_PATH);
        let have = dev_path.exists()
            || std::env::var_os(CACHEFILES_FD_ENV).is_some()
            || std::env::var_os("LISTEN_FDS").is_some();
        let tried = if have {
            open_cachefiles(config).map_err(|e| format!("{e:#}"))
        } else {
            Err(format!(
                "{} does not exist (kernel without CONFIG_CACHEFILES_ONDEMAND, or the \
                 cachefiles module is not loaded)",
                dev_path.display()
            ))
        };
        match tried {
            Ok(acq) => {
                let how = if acq.continued {
                    "cache taken over from a previous daemon"
                } else {
                    "cache bound"
                };
                let reason = if want == FrontEnd::Auto {
                    format!("auto: {} exists and the {how}", dev_path.display())
                } else {
                    format!("forced by configuration ({how})")
                };
                return Ok(Selection {
                    front_end: FrontEnd::Cachefiles,
                    reason,
                    unavailable,
                    cachefiles: Some(acq),
                });
            }
            Err(why) if want == FrontEnd::Cachefiles => {
                bail!("front end cachefiles was forced but is unavailable: {why}")
            }
            Err(why) => {
                // Layers an earlier daemon mounted over its cache read through that cache
                // only: another front end cannot serve them, and they would hang.
                let held = fscache_mounts_under(&config.root).unwrap_or_default();
                if let Some(first) = held.first() {
                    bail!(
                        "cachefiles: {why}; {} layer(s) mounted over an earlier daemon's \
                         cachefiles cache are still in place (first: {}), and no other \
                         front end can serve them, so `auto` does not fall back. Fix the \
                         cause and start again, or stop what uses those layers and run \
                         `dedupd teardown --root {}`",
                        held.len(),
                        first.display(),
                        config.root.display()
                    )
                }
                unavailable.push(format!("cachefiles unavailable: {why}"))
            }
        }
    }
    if matches!(want, FrontEnd::Auto | FrontEnd::Fanotify) {
        let dir = fanotify_dir(&config.root);
        match crate::frontend::fanotify::probe(&dir) {
            Ok(()) => {
                let reason = if want == FrontEnd::Auto {
                    format!(
                        "auto: no cachefiles; this kernel takes fanotify pre-content marks on \
                         {}",
                        dir.display()
                    )
                } else {
                    "forced by configuration".to_string()
                };
                return Ok(Selection {
                    front_end: FrontEnd::Fanotify,
                    reason,
                    unavailable,
                    cachefiles: None,
                });
            }
            Err(why) if want == FrontEnd::Fanotify => {
                bail!("front end fanotify was forced but is unavailable: {why}")
            }
            Err(why) => unavailable.push(format!("fanotify unavailable: {why}")),
        }
    }
    let reason = if want == FrontEnd::Auto {
        "auto: neither cachefiles nor fanotify is available; blobs are materialized".to_string()
    } else {
        "forced by configuration".to_string()
    };
    Ok(Selection {
        front_end: FrontEnd::Local,
        reason,
        unavailable,
        cachefiles: None,
    })
}

/// Mount points under `root` of EROFS mounted over fscache (`fsid=` in the super
/// options, no backing file): what only a cachefiles daemon can serve.
fn fscache_mounts_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(fscache_mounts_in(&info, &root))
}

/// [`fscache_mounts_under`] over mountinfo text.
fn fscache_mounts_in(info: &str, root: &Path) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split(' ');
            let (fstype, _source, opts) = (post.next()?, post.next()?, post.next()?);
            let fscache = fstype == "erofs" && opts.split(',').any(|o| o.starts_with("fsid="));
            fscache.then_some(())?;
            let p = crate::frontend::fanotify::holder::unescape_mount_path(pre.split(' ').nth(4)?);
            Some(PathBuf::from(std::ffi::OsStr::from_bytes(&p)))
        })
        .filter(|p| p.starts_with(root))
        .collect()
}

/// The running data plane.
enum DataPlane {
    Cachefiles(Engine, Keeper),
    Fanotify(Arc<FanotifyMounter>),
    Local,
}

impl DataPlane {
    fn stats(&self) -> StatsSnapshot {
        match self {
            DataPlane::Cachefiles(e, _) => e.stats(),
            DataPlane::Fanotify(m) => fanotify_snapshot(&m.stats()),
            DataPlane::Local => StatsSnapshot {
                front_end: "local".into(),
                ..StatsSnapshot::default()
            },
        }
    }

    fn stop(self) -> StatsSnapshot {
        match self {
            DataPlane::Cachefiles(e, keeper) => {
                // While the engine still answers CLOSEs: layers unmounted a moment ago
                // finish going away.
                let in_use = failover::still_mounted(CACHE_TAG, VOLUMES_SETTLE);
                let st = e.stop();
                keeper.release(in_use);
                st
            }
            DataPlane::Fanotify(m) => fanotify_snapshot(&m.shutdown()),
            DataPlane::Local => DataPlane::Local.stats(),
        }
    }
}

/// The fanotify front end's counters in the daemon's terms: a READ is a permission
/// event, a fill writes `bytes_written`; the rest (errors, latency of fill requests,
/// slowest requests) is the engine's.
fn fanotify_snapshot(s: &crate::frontend::fanotify::Stats) -> StatsSnapshot {
    let e = &s.engine;
    StatsSnapshot {
        front_end: "fanotify".into(),
        reads: s.events,
        reads_ok: s.allowed,
        reads_failed: s.denied,
        bytes_written: s.bytes_filled,
        chunks_fetched: s.chunks_fetched,
        pack_reads: e.pack_reads,
        threads: e.threads,
        write_strategy: e.write_strategy.clone(),
        chunk_errors: e.chunk_errors,
        write_errors: e.write_errors,
        fetch_waits: e.fetch_waits,
        refetches: e.refetches,
        fetch_errors: e.fetch_errors,
        source_errors: e.source_errors,
        in_flight_hwm: e.in_flight_hwm,
        latency_us_p50: crate::serve::stats::percentile(&e.latency.buckets, 0.50),
        latency_us_p99: crate::serve::stats::percentile(&e.latency.buckets, 0.99),
        served_from_store_bytes: e.served_from_store_bytes,
        served_from_registry_bytes: e.served_from_registry_bytes,
        slowest: e.slowest.clone(),
        latency: e.latency.clone(),
        ..StatsSnapshot::default()
    }
}

/// What the metrics endpoint reads of the data plane, from its own thread.
#[derive(Clone)]
enum PlaneView {
    Cachefiles(Arc<[crate::serve::ThreadCounters]>),
    Fanotify(Arc<FanotifyMounter>),
    Local,
}

impl PlaneView {
    fn of(plane: &DataPlane) -> PlaneView {
        match plane {
            DataPlane::Cachefiles(e, _) => PlaneView::Cachefiles(e.shared_counters()),
            DataPlane::Fanotify(m) => PlaneView::Fanotify(m.clone()),
            DataPlane::Local => PlaneView::Local,
        }
    }

    /// Fills the data-plane part of a metrics sample.
    fn sample(&self, out: &mut crate::metrics::Sample) {
        match self {
            PlaneView::Cachefiles(c) => {
                let mut e = crate::serve::stats::snapshot(c);
                e.front_end = "cachefiles".into();
                out.requests = e.reads + e.unknown_objects + e.insane_reads;
                out.requests_failed = e.reads_failed + e.unknown_objects + e.insane_reads;
                out.filled_bytes = e.bytes_written;
                out.engine = e;
            }
            PlaneView::Fanotify(m) => {
                let s = m.stats();
                out.requests = s.events;
                out.requests_failed = s.denied;
                out.filled_bytes = s.bytes_filled;
                out.prefetch_bytes = s.prefetch_bytes;
                out.registered_blobs = m.registered_blobs();
                out.engine = s.engine;
            }
            PlaneView::Local => {}
        }
    }
}

/// Starts the data plane of `sel` and the layer mounter that matches it.
fn start_data_plane(
    config: &Config,
    args: &RunArgs,
    sel: &mut Selection,
    store: &Arc<Store>,
    registry: Arc<RegistryHandle>,
    fetcher: Option<Arc<Fetcher>>,
) -> anyhow::Result<(DataPlane, Arc<dyn LayerMounter>)> {
    match sel.front_end {
        FrontEnd::Cachefiles => {
            let acq = sel.cachefiles.take().context("cachefiles device")?;
            let dev = acq.device;
            let mut ecfg = EngineConfig::new(config.root.join("chunks"));
            ecfg.threads = config.thread_count();
            ecfg.write_strategy = args.write_strategy;
            ecfg.read_around = !args.no_read_around;
            ecfg.digest_on_read = args.digest_on_read;
            ecfg.fetcher = fetcher;
            let dev: Arc<dyn cachefiles::Device> = Arc::new(dev);
            let front = Arc::new(CachefilesFront::new(dev.clone(), registry.clone()));
            let engine = Engine::start(ecfg, front.clone())?;
            let st = store.clone();
            let refresh: RegistryRefresh = Arc::new(move || {
                let reg = st.registry().map_err(|e| e.to_string())?;
                registry.replace(reg);
                Ok(())
            });
            let m = FscacheMounter::new(None, refresh)
                .with_cull(dev, cachefiles_cache_dir(&config.root))
                .with_front(front)
                .continued(acq.continued);
            tracing::info!(
                keeper = acq.keeper.name(),
                continued = acq.continued,
                "the cachefiles cache outlives this daemon"
            );
            Ok((DataPlane::Cachefiles(engine, acq.keeper), Arc::new(m)))
        }
        FrontEnd::Fanotify => {
            let opts = FanotifyOptions {
                cache_dir: fanotify_dir(&config.root),
                workers: config
                    .thread_count()
                    .clamp(1, crate::frontend::fanotify::MAX_WORKERS),
                grace: FANOTIFY_GRACE,
                holder_exe: std::env::current_exe().context("locating the dedupd binary")?,
                unmark_complete: true,
                uring_responses: true,
                prefetch: true,
                packs_dir: config.root.join("chunks"),
                digest_on_read: args.digest_on_read,
                fetcher,
            };
            let m = Arc::new(FanotifyMounter::start(store.clone(), opts)?);
            Ok((DataPlane::Fanotify(m.clone()), m))
        }
        FrontEnd::Local | FrontEnd::Auto => Ok((
            DataPlane::Local,
            Arc::new(LocalMounter::new(store.clone())?),
        )),
    }
}

/// Starts lazy pull when configured and the front end can serve it: the registry
/// client, the fetcher (its runtime also runs discovery), and the puller the
/// snapshotter asks on Prepare.
fn start_lazy(
    config: &Config,
    front_end: FrontEnd,
    store: &Arc<Store>,
) -> anyhow::Result<Option<(Arc<Fetcher>, Arc<LazyPuller>)>> {
    if !config.lazy.enabled {
        tracing::info!("lazy pull is off (lazy.enabled = false)");
        return Ok(None);
    }
    if matches!(front_end, FrontEnd::Local | FrontEnd::Auto) {
        tracing::warn!(
            "lazy pull needs the cachefiles or fanotify front end; with `local` every layer \
             is unpacked and converted"
        );
        return Ok(None);
    }
    let registry = crate::registry::Registry::new(config.registry.options())
        .context("configuring the registry client ([registry])")?;
    let fetcher = Fetcher::start(
        store.clone(),
        Arc::new(registry.clone()),
        config.lazy.fetch_config(),
    )
    .context("starting the fetcher")?;
    let handle = fetcher.handle().context("the fetcher's runtime")?;
    let puller = Arc::new(
        LazyPuller::new(
            registry,
            store.clone(),
            handle,
            Some(fetcher.clone()),
            config.lazy.prefetch,
        )
        .with_stream(config.lazy.stream),
    );
    tracing::info!(
        hosts_dir = %config.registry.hosts_dir.display(),
        fetch_timeout_ms = config.lazy.fetch_timeout_ms,
        "lazy pull on: layers with a published artifact mount from their metadata"
    );
    Ok(Some((fetcher, puller)))
}

/// The directory the cachefiles cache is bound to.
fn cachefiles_cache_dir(root: &Path) -> PathBuf {
    root.join("cache")
}

/// Takes the cache over from whoever keeps it (systemd's fd store, the holder, a
/// supervisor), writing `restore` (the registry is loaded already and nothing has read
/// the device yet), or binds a fresh one and hands a copy to the keeper.
fn open_cachefiles(config: &Config) -> anyhow::Result<Acquired> {
    let opts = failover::Options {
        state_dir: config.root.join("cachefiles"),
        cache_dir: cachefiles_cache_dir(&config.root),
        tag: CACHE_TAG.to_string(),
        exe: std::env::current_exe().context("locating the dedupd binary")?,
    };
    let acq = failover::acquire(&opts)?;
    if acq.continued {
        failover::restore(&acq.device)
            .context("writing `restore` to the taken-over /dev/cachefiles")?;
        tracing::info!(
            keeper = acq.keeper.name(),
            "took over the cachefiles cache of a previous daemon (restore written)"
        );
    }
    Ok(acq)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it spawns later),
/// so that they are taken with `sigtimedwait` by the main loop.
fn block_signals() -> anyhow::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block().context("blocking signals")?;
    Ok(set)
}

/// Waits up to `timeout` for one of `set`; returns its number.
fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is a valid sigset_t, `ts` a valid timespec; no siginfo is requested.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// The cache walk (the bytes of the front end's cache files and of the packs) runs at
/// most this often...
const USAGE_PERIOD: Duration = Duration::from_secs(2);
/// ...and waits this many times its own last duration before the next... A cachefiles
/// cache holds 256 fan-out directories per volume, so after many mounts a walk takes
/// thousands of system calls; its share of a core stays under 1/20 however large the
/// cache grows. Only `cache.bytes` and `pack_bytes` come from the walk: the bounded
/// cache's counters in `stats.json` are read on every rewrite (every [`STATS_PERIOD`]),
/// and the metrics endpoint walks on each scrape.
const USAGE_SPACING: u32 = 20;
/// ...but never longer than this.
const USAGE_MAX_GAP: Duration = Duration::from_secs(10);

/// Makes the root (if it exists) root's alone: removes the group and other bits an
/// earlier version left (0755 directories, 0644 packs, images and stats) and says so.
fn tighten_root(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let t = crate::perms::tighten(root)
        .with_context(|| format!("making {} readable by root only", root.display()))?;
    if t.is_empty() {
        tracing::debug!(root = %root.display(), "permissions under the root are root-only");
    } else {
        tracing::warn!(
            root = %root.display(),
            root_was = t.root_was.map(|m| format!("{m:04o}")).unwrap_or_else(|| "0700".into()),
            dirs = t.dirs,
            files = t.files,
            examples = %t.examples.join(", "),
            "tightened permissions under the root: other users could read what an earlier \
             version stored; now root only"
        );
    }
    Ok(())
}

/// What one scrape reads: the data plane's counters (summed now), the fetcher's, the
/// snapshotter's counts, and the cache directory (walked now).
fn metrics_source(
    plane: PlaneView,
    front_end: &'static str,
    fetcher: Option<Arc<Fetcher>>,
    snap: Arc<Snapshotter>,
    root: PathBuf,
    registered: Arc<std::sync::atomic::AtomicU64>,
    bound: Bound,
) -> crate::metrics::Source {
    Arc::new(move || {
        let mut s = crate::metrics::Sample {
            front_end: front_end.to_string(),
            registered_blobs: registered.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        };
        plane.sample(&mut s);
        s.engine.front_end = front_end.to_string();
        s.fetch = fetcher.as_ref().map(|f| (f.stats(), f.latency()));
        (s.cache, s.store_bytes) = disk_usage(&root, front_end_of(front_end), &bound, &snap);
        if let Ok(st) = snap.status() {
            s.snapshots = crate::metrics::SnapshotCounts {
                active: st.active,
                views: st.views,
                committed: st.committed,
                layers: st.layers.len() as u64,
                mounted: st.layers.iter().filter(|l| l.mounted).count() as u64,
                lazy: st.layers.iter().filter(|l| l.remote).count() as u64,
            };
        }
        s.conversions = snap.conversions();
        s
    })
}

fn front_end_of(name: &str) -> FrontEnd {
    match name {
        "cachefiles" => FrontEnd::Cachefiles,
        "fanotify" => FrontEnd::Fanotify,
        _ => FrontEnd::Local,
    }
}

/// The bounded cache's thread, when `[cache] limit` is set.
fn start_evictor(
    config: &Config,
    store: &Arc<Store>,
    fetcher: Option<&Arc<Fetcher>>,
    snap: &Arc<Snapshotter>,
) -> anyhow::Result<Option<cache_limit::EvictorThread>> {
    let Some(marks) = cache_limit::Watermarks::from_config(&config.cache, &config.root)
        .context("[cache] in the config")?
    else {
        return Ok(None);
    };
    let Some(fetcher) = fetcher else {
        // An evicted chunk would be gone for good: nothing could fetch it again.
        tracing::warn!(
            "[cache] limit is set, but lazy pull is off (or the front end cannot fetch): \
             nothing could fetch an evicted chunk again, so nothing is evicted"
        );
        return Ok(None);
    };
    tracing::info!(
        limit = marks.limit,
        high = marks.high,
        low = marks.low,
        "bounded cache: chunks of lazily pulled layers are evicted above the high watermark"
    );
    let evictor = cache_limit::Evictor::new(
        store.clone(),
        marks,
        Duration::from_millis(config.cache.punch_grace_ms),
        Some(fetcher.touches().clone()),
    )
    .with_copies(snap.clone());
    let period = Duration::from_millis(config.cache.check_period_ms.max(100));
    Ok(Some(
        cache_limit::EvictorThread::spawn(evictor, period).context("starting the evictor")?,
    ))
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    // Before anything is made: every file, directory and socket is root's alone.
    crate::perms::private_umask();
    let config = args.config()?;
    let metrics_address = match &config.metrics_address {
        Some(a) => Some(crate::metrics::Address::parse(a)?),
        None => None,
    };
    let signals = block_signals()?;
    // Where a start's time goes (a restart is what readers wait for).
    let t0 = Instant::now();
    tighten_root(&config.root)?;
    let tightened_ms = t0.elapsed().as_millis() as u64;
    let store = Arc::new(
        Store::open(&config.root)
            .with_context(|| format!("opening the store in {}", config.root.display()))?,
    );
    let opened_ms = t0.elapsed().as_millis() as u64;
    let reg = store.registry().context("loading the blob registry")?;
    tracing::info!(
        root = %config.root.display(),
        blobs = reg.blobs.len(),
        packs = reg.packs.len(),
        tightened_ms,
        store_opened_ms = opened_ms,
        loaded_ms = t0.elapsed().as_millis() as u64,
        "registry loaded"
    );
    let mut registered = reg.blobs.len() as u64;
    let registry = Arc::new(RegistryHandle::new(reg));
    let run_dir = config.root.join("run");
    fs::create_dir_all(&run_dir).with_context(|| format!("{}", run_dir.display()))?;
    let path = stats_path(&config.root);
    // A stats file from an earlier run must not pass for this one: it reappears once the
    // data plane is serving (tests wait for it before mounting).
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    }

    let mut sel = select(&config)?;
    for u in &sel.unavailable {
        tracing::warn!("{u}");
    }
    tracing::info!("front end {}: {}", name(sel.front_end), sel.reason);
    let lazy = start_lazy(&config, sel.front_end, &store)?;
    let fetcher = lazy.as_ref().map(|(f, _)| f.clone());
    let (plane, mounter) = start_data_plane(
        &config,
        args,
        &mut sel,
        &store,
        registry.clone(),
        fetcher.clone(),
    )?;
    let mut snapshotter = Snapshotter::open(&config.root, store.clone(), mounter)
        .context("opening the snapshotter")?;
    if let Some((_, puller)) = &lazy {
        snapshotter = snapshotter.with_lazy(puller.clone());
    }
    let snap = Arc::new(snapshotter);
    let mut evictor = start_evictor(&config, &store, fetcher.as_ref(), &snap)?;
    let bound: Bound = evictor
        .as_ref()
        .map(|t| (t.stats().clone(), t.watermarks()));
    let control = ControlThread::spawn(config.socket.clone(), snap.clone())
        .with_context(|| format!("starting the snapshotter on {}", config.socket.display()))?;
    let front_end = sel.front_end;
    let usage = Arc::new(std::sync::Mutex::new(disk_usage(
        &config.root,
        front_end,
        &bound,
        &snap,
    )));
    let registered_now = Arc::new(std::sync::atomic::AtomicU64::new(registered));
    let metrics = match metrics_address {
        Some(addr) => {
            let source = metrics_source(
                PlaneView::of(&plane),
                name(front_end),
                fetcher.clone(),
                snap.clone(),
                config.root.clone(),
                registered_now.clone(),
                bound.clone(),
            );
            Some(crate::metrics::Server::start(addr, source)?)
        }
        None => None,
    };
    let started = Instant::now();
    // Under systemd (Type=notify): serving now.
    if let Err(e) = crate::systemd::notify("READY=1\nSTATUS=serving", &[]) {
        tracing::warn!("sd_notify READY: {e}");
    }
    let status = |stats: StatsSnapshot, running: bool, registered: u64| {
        let (mut cache, pack_bytes) = usage.lock().unwrap_or_else(|p| p.into_inner()).clone();
        bounded_counters(&bound, &mut cache);
        DaemonStatus {
            pid: std::process::id(),
            front_end_reason: sel.reason.clone(),
            front_ends_unavailable: sel.unavailable.clone(),
            snapshotter: snap
                .status()
                .ok()
                .and_then(|s| serde_json::to_value(s).ok())
                .unwrap_or_default(),
            uptime_ms: started.elapsed().as_millis() as u64,
            running,
            registered_blobs: registered,
            fetch: fetcher.as_ref().map(|f| f.stats()),
            cache,
            pack_bytes,
            stats,
        }
    };
    let mut next_usage = Instant::now() + USAGE_PERIOD;
    // Bounded by the signals: each pass waits at most STATS_PERIOD.
    loop {
        if let DataPlane::Fanotify(m) = &plane {
            // Layers committed since start grow the blob set the front end serves.
            registered = m.registered_blobs();
        }
        registered_now.store(registered, std::sync::atomic::Ordering::Relaxed);
        if Instant::now() >= next_usage {
            let t = Instant::now();
            let u = disk_usage(&config.root, front_end, &bound, &snap);
            *usage.lock().unwrap_or_else(|p| p.into_inner()) = u;
            let gap = (t.elapsed() * USAGE_SPACING).clamp(USAGE_PERIOD, USAGE_MAX_GAP);
            next_usage = Instant::now() + gap;
        }
        if let Err(e) = write_status(&path, &status(plane.stats(), true, registered)) {
            tracing::warn!("{}: {e}", path.display());
        }
        if !control.is_running() {
            tracing::error!("the snapshotter service stopped; stopping");
            break;
        }
        match wait_signal(&signals, STATS_PERIOD) {
            Some(libc::SIGHUP) => match store.registry() {
                Ok(reg) => {
                    registered = reg.blobs.len() as u64;
                    tracing::info!(blobs = registered, "registry reloaded");
                    registry.replace(reg);
                    if let DataPlane::Fanotify(m) = &plane {
                        if let Err(e) = m.reload() {
                            tracing::warn!("fanotify reload failed: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("registry reload failed: {e}"),
            },
            Some(sig) => {
                tracing::info!(signal = sig, "stopping");
                break;
            }
            None => {}
        }
    }
    let _ = crate::systemd::notify("STOPPING=1", &[]);
    if let Some(m) = metrics {
        m.stop();
    }
    let served = control.stop();
    let fin = plane.stop();
    if let Some(f) = &fetcher {
        // After the data plane: its parked reads get their answers (or "stopped").
        f.stop();
    }
    if let Some(e) = &mut evictor {
        // Nothing reads any more: evicted records are deallocated now.
        e.stop();
    }
    write_status(&path, &status(fin, false, registered))
        .with_context(|| format!("{}", path.display()))?;
    served.context("snapshotter service")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fscache_mounts_are_told_from_file_backed_ones() {
        let info = "\
36 25 0:33 / /r/m/1 ro,nodev shared:1 - erofs none ro,fsid=abcd,domain_id=dedupd
37 25 0:34 / /r/m/2 ro,nodev shared:2 - erofs /r/layers/x.erofs ro,device=/r/b
38 25 0:35 / /other/m/3 ro shared:3 - erofs none ro,fsid=ef
39 25 0:36 / /r/m/with\\040space ro shared:4 - erofs none ro,fsid=12
40 25 0:37 / /r/ovl rw shared:5 - overlay overlay rw,lowerdir=/r/m/1
";
        let got = fscache_mounts_in(info, Path::new("/r"));
        assert_eq!(
            got,
            vec![PathBuf::from("/r/m/1"), PathBuf::from("/r/m/with space")]
        );
    }

    fn config(root: &Path, front_end: FrontEnd) -> Config {
        Config {
            root: root.to_path_buf(),
            front_end,
            ..Config::default()
        }
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// An ext4/xfs/btrfs directory (the repo's filesystem), not tmpfs.
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    #[test]
    fn forced_cachefiles_without_the_device_fails_clearly() {
        if Path::new(cachefiles::DEVICE_PATH).exists() {
            eprintln!("SKIPPED: this kernel has {}", cachefiles::DEVICE_PATH);
            return;
        }
        let dir = disk_dir();
        let err = select(&config(dir.path(), FrontEnd::Cachefiles))
            .err()
            .expect("cachefiles cannot be chosen without its device")
            .to_string();
        assert!(err.contains("cachefiles was forced"), "{err}");
        assert!(err.contains(cachefiles::DEVICE_PATH), "{err}");
    }

    #[test]
    fn auto_picks_fanotify_and_names_why_cachefiles_is_missing() {
        if !is_root() || Path::new(cachefiles::DEVICE_PATH).exists() {
            eprintln!("SKIPPED: needs root and a kernel without cachefiles on-demand");
            return;
        }
        let dir = disk_dir();
        let sel = select(&config(dir.path(), FrontEnd::Auto)).unwrap();
        assert_eq!(sel.front_end, FrontEnd::Fanotify, "{}", sel.reason);
        assert!(sel.reason.starts_with("auto:"), "{}", sel.reason);
        assert_eq!(sel.unavailable.len(), 1, "{:?}", sel.unavailable);
        assert!(
            sel.unavailable[0].contains(cachefiles::DEVICE_PATH),
            "{:?}",
            sel.unavailable
        );
        // The probe file is gone.
        let left: Vec<_> = fs::read_dir(fanotify_dir(dir.path())).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn forced_fanotify_on_tmpfs_fails_naming_the_directory_and_auto_falls_back() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() || Path::new(cachefiles::DEVICE_PATH).exists() {
            eprintln!("SKIPPED: needs /dev/shm (tmpfs) and no cachefiles on-demand");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let err = select(&config(dir.path(), FrontEnd::Fanotify))
            .err()
            .expect("fanotify blob files cannot live on tmpfs")
            .to_string();
        assert!(err.contains("fanotify was forced"), "{err}");
        assert!(
            err.contains(&fanotify_dir(dir.path()).display().to_string()),
            "{err}"
        );
        let sel = select(&config(dir.path(), FrontEnd::Auto)).unwrap();
        assert_eq!(sel.front_end, FrontEnd::Local);
        assert_eq!(sel.unavailable.len(), 2, "{:?}", sel.unavailable);
        assert!(sel.unavailable[1].starts_with("fanotify unavailable"));
        let sel = select(&config(dir.path(), FrontEnd::Local)).unwrap();
        assert_eq!(sel.front_end, FrontEnd::Local);
        assert_eq!(sel.reason, "forced by configuration");
    }

    #[test]
    fn status_names_cache_layers_and_slow_requests_for_a_human() {
        let mut s = DaemonStatus {
            pid: 7,
            front_end_reason: "auto: because".into(),
            running: true,
            cache: CacheUsage {
                bytes: 3 << 20,
                limit_bytes: Some(12 << 20),
                evictions: 2,
                bounded_bytes: 5 << 20,
                copy_bytes: 1 << 20,
                layers_released: 1,
            },
            snapshotter: serde_json::json!({
                "active": 1, "views": 0, "committed": 2,
                "layers": [
                    {"id": "ab".repeat(32), "mounted": true, "converted": true, "remote": true,
                     "data_bytes": 4 << 20, "local_bytes": 1 << 20, "files": 3, "snapshots": 1},
                    {"id": "cd".repeat(32), "mounted": false, "converted": true}
                ]
            }),
            ..DaemonStatus::default()
        };
        s.stats.front_end = "fanotify".into();
        s.stats.slowest = vec![crate::serve::stats::SlowRequest {
            req: 0x1_0000_0000_0005,
            blob: "ef".repeat(32),
            offset: 65536,
            len: 65536,
            total_us: 480_000,
            store_us: 900,
            fetch_us: 470_000,
            write_us: 2_000,
            ok: true,
            done_unix_ms: 1,
        }];
        let text = render_status(&s).unwrap();
        assert!(
            text.starts_with("front end: fanotify (auto: because)"),
            "{text}"
        );
        assert!(
            text.contains(
                "cache: front end files 3.0 MiB; lazily pulled data 5.0 MiB of 12.0 MiB limit \
                 (42%; front end copies 1.0 MiB), 2 chunks evicted, 1 idle layers released"
            ),
            "{text}"
        );
        assert!(
            text.contains("abababababab  local 1.0 MiB of 4.0 MiB (25%), pulled lazily"),
            "{text}"
        );
        assert!(
            !text.contains("cdcdcdcdcdcd"),
            "only mounted layers are listed: {text}"
        );
        assert!(
            text.contains("req 0x1000000000005  64.0 KiB at 65536 of efefefefefef: 480.0 ms = store 900 us, network 470.0 ms, kernel write 2.0 ms"),
            "{text}"
        );
    }

    #[test]
    fn stats_file_round_trips_and_flattens_the_counters() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("run")).unwrap();
        let path = stats_path(dir.path());
        let mut s = DaemonStatus {
            pid: 7,
            front_end_reason: "forced".into(),
            running: true,
            ..DaemonStatus::default()
        };
        s.stats.reads = 3;
        s.stats.front_end = "cachefiles".into();
        write_status(&path, &s).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["reads"], 3, "counters sit at the top level: {text}");
        assert_eq!(v["front_end"], "cachefiles");
        let back: DaemonStatus = serde_json::from_str(&text)
            .map_err(|e| format!("{e}: {text}"))
            .unwrap();
        assert_eq!(back, s);
        status(dir.path(), false).unwrap();
        status(dir.path(), true).unwrap();
        assert!(status(&dir.path().join("nothing"), false).is_err());
    }
}
