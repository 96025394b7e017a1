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

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::cachefiles::failover::{self, Acquired, Keeper};
use crate::cachefiles;
use crate::config::{Config, FrontEnd};
use crate::fanotify::layer_mounter::FanotifyMounter;
use crate::fanotify::Options as FanotifyOptions;
use crate::remote::{Fetcher, LazyPuller};
use crate::serve::cachefiles_front::{CachefilesFront, RegistryHandle};
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
    /// The counters.
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

/// Path of the stats file under `root`.
pub fn stats_path(root: &Path) -> PathBuf {
    root.join("run").join("stats.json")
}

fn write_status(path: &Path, status: &DaemonStatus) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, status)?;
    f.write_all(b"\n")?;
    drop(f);
    fs::rename(&tmp, path)
}

/// `dedupd status`: prints the running (or last) daemon's counters.
pub fn status(root: &Path) -> anyhow::Result<()> {
    let path = stats_path(root);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no stats (is `dedupd run --root {}` running?)",
            path.display(),
            root.display()
        )
    })?;
    let status: DaemonStatus = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a stats file", path.display()))?;
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
        "daemon: pid {} {}, uptime {} ms, {} blobs registered",
        status.pid,
        if status.running { "running" } else { "stopped" },
        status.uptime_ms,
        status.registered_blobs
    )?;
    writeln!(
        out,
        "reads: {} ({} ok, {} failed), bytes filled: {}, chunks fetched: {}",
        st.reads, st.reads_ok, st.reads_failed, st.bytes_written, st.chunks_fetched
    )?;
    if let Some(snap) = status.snapshotter.as_object() {
        let n = |k: &str| snap.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let layers = snap.get("layers").and_then(|v| v.as_array());
        let count = |k: &str| {
            layers.map_or(0, |l| {
                l.iter()
                    .filter(|x| x.get(k).and_then(|v| v.as_bool()) == Some(true))
                    .count()
            })
        };
        writeln!(
            out,
            "snapshots: {} active, {} views, {} committed; layers: {} used, {} converted, \
             {} mounted",
            n("active"),
            n("views"),
            n("committed"),
            layers.map_or(0, |l| l.len()),
            count("converted"),
            count("mounted")
        )?;
    }
    writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(())
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
            Err(why) => unavailable.push(format!("cachefiles unavailable: {why}")),
        }
    }
    if matches!(want, FrontEnd::Auto | FrontEnd::Fanotify) {
        let dir = fanotify_dir(&config.root);
        match crate::fanotify::probe(&dir) {
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
/// event, a fill writes `bytes_written`.
fn fanotify_snapshot(s: &crate::fanotify::Stats) -> StatsSnapshot {
    StatsSnapshot {
        front_end: "fanotify".into(),
        reads: s.events,
        reads_ok: s.allowed,
        reads_failed: s.denied,
        bytes_written: s.bytes_filled,
        chunks_fetched: s.chunks_fetched,
        ..StatsSnapshot::default()
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
            ecfg.fetcher = fetcher;
            let dev: Arc<dyn cachefiles::Device> = Arc::new(dev);
            let front = Arc::new(CachefilesFront::new(dev.clone(), registry.clone()));
            let engine = Engine::start(ecfg, front)?;
            let st = store.clone();
            let refresh: RegistryRefresh = Arc::new(move || {
                let reg = st.registry().map_err(|e| e.to_string())?;
                registry.replace(reg);
                Ok(())
            });
            let m = FscacheMounter::new(None, refresh)
                .with_cull(dev, cachefiles_cache_dir(&config.root))
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
                workers: config.thread_count().clamp(1, crate::fanotify::MAX_WORKERS),
                grace: FANOTIFY_GRACE,
                holder_exe: std::env::current_exe().context("locating the dedupd binary")?,
                unmark_complete: true,
                uring_responses: true,
                prefetch: true,
                packs_dir: config.root.join("chunks"),
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
    let puller = Arc::new(LazyPuller::new(
        registry,
        store.clone(),
        handle,
        Some(fetcher.clone()),
        config.lazy.prefetch,
    ));
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

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let signals = block_signals()?;
    let store = Arc::new(
        Store::open(&config.root)
            .with_context(|| format!("opening the store in {}", config.root.display()))?,
    );
    let reg = store.registry().context("loading the blob registry")?;
    tracing::info!(
        root = %config.root.display(),
        blobs = reg.blobs.len(),
        packs = reg.packs.len(),
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
    let control = ControlThread::spawn(config.socket.clone(), snap.clone())
        .with_context(|| format!("starting the snapshotter on {}", config.socket.display()))?;
    let started = Instant::now();
    // Under systemd (Type=notify): serving now.
    if let Err(e) = crate::systemd::notify("READY=1\nSTATUS=serving", &[]) {
        tracing::warn!("sd_notify READY: {e}");
    }
    let status = |stats: StatsSnapshot, running: bool, registered: u64| DaemonStatus {
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
        stats,
    };
    // Bounded by the signals: each pass waits at most STATS_PERIOD.
    loop {
        if let DataPlane::Fanotify(m) = &plane {
            // Layers committed since start grow the blob set the front end serves.
            registered = m.registered_blobs();
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
    let served = control.stop();
    let fin = plane.stop();
    if let Some(f) = &fetcher {
        // After the data plane: its parked reads get their answers (or "stopped").
        f.stop();
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
        assert_eq!(serde_json::from_str::<DaemonStatus>(&text).unwrap(), s);
        status(dir.path()).unwrap();
        assert!(status(&dir.path().join("nothing")).is_err());
    }
}
