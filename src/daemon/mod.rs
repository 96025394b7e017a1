//! `dedupd run`: loads the blob registry from the store, picks the front end, starts the
//! data plane, and writes its counters to `<root>/run/stats.json` until SIGINT/SIGTERM.
//!
//! `stats.json` first appears once the front end is bound and the engine threads are
//! serving: wait for it (with `running: true`) before mounting.
//!
//! Front ends: `cachefiles` is served here. `fanotify` and `local` plug in at
//! [`start_front_end`] (their modules are separate work); until then, asking for them,
//! or `auto` on a kernel without `/dev/cachefiles`, fails with a message saying so.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::cachefiles::{self, CachefilesDevice, Command};
use crate::config::{Config, FrontEnd};
use crate::serve::cachefiles_front::{CachefilesFront, RegistryHandle};
use crate::serve::{Engine, EngineConfig, StatsSnapshot, WriteStrategy};
use crate::store::Store;

/// How often `stats.json` is rewritten.
const STATS_PERIOD: Duration = Duration::from_millis(200);
/// Tag given to the cachefiles cache.
const CACHE_TAG: &str = "dedupd";
/// Environment variable naming an inherited `/dev/cachefiles` fd (failover): the daemon
/// writes `restore` instead of binding a new cache.
pub const CACHEFILES_FD_ENV: &str = "DEDUPD_CACHEFILES_FD";

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
    /// Milliseconds since the data plane started.
    pub uptime_ms: u64,
    /// False once the daemon has stopped (the final write).
    pub running: bool,
    /// Blobs in the registry.
    pub registered_blobs: u64,
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
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(())
}

/// A started front end and its engine.
struct Serving {
    engine: Engine,
    reason: String,
}

/// Picks and starts the front end. The hook where fanotify and local front ends plug in.
fn start_front_end(
    config: &Config,
    args: &RunArgs,
    registry: Arc<RegistryHandle>,
) -> anyhow::Result<Serving> {
    let dev_path = Path::new(cachefiles::DEVICE_PATH);
    let have_cachefiles = dev_path.exists() || std::env::var_os(CACHEFILES_FD_ENV).is_some();
    let (front, reason) = match config.front_end {
        FrontEnd::Cachefiles => {
            if !have_cachefiles {
                bail!(
                    "front end cachefiles was forced but {} does not exist: this kernel lacks \
                     CONFIG_CACHEFILES_ONDEMAND (or the cachefiles module is not loaded)",
                    dev_path.display()
                );
            }
            (FrontEnd::Cachefiles, "forced by configuration".to_string())
        }
        FrontEnd::Auto if have_cachefiles => (
            FrontEnd::Cachefiles,
            format!("auto: {} is present", dev_path.display()),
        ),
        FrontEnd::Auto => {
            tracing::warn!(
                "cachefiles unavailable: {} does not exist (kernel without \
                 CONFIG_CACHEFILES_ONDEMAND); trying fanotify",
                dev_path.display()
            );
            (
                FrontEnd::Fanotify,
                format!("auto: {} missing", dev_path.display()),
            )
        }
        other => (other, "forced by configuration".to_string()),
    };
    let mut ecfg = EngineConfig::new(config.root.join("chunks"));
    ecfg.threads = config.thread_count();
    ecfg.write_strategy = args.write_strategy;
    ecfg.read_around = !args.no_read_around;
    match front {
        FrontEnd::Cachefiles => {
            let dev = open_cachefiles(config)?;
            let front = Arc::new(CachefilesFront::new(Arc::new(dev), registry));
            let engine = Engine::start(ecfg, front)?;
            tracing::info!(front_end = "cachefiles", reason = %reason, "serving");
            Ok(Serving { engine, reason })
        }
        FrontEnd::Fanotify | FrontEnd::Local => bail!(
            "front end {:?} is not built into this daemon yet ({reason}); only cachefiles \
             is served by `dedupd run` so far",
            front
        ),
        FrontEnd::Auto => unreachable!("resolved above"),
    }
}

fn open_cachefiles(config: &Config) -> anyhow::Result<CachefilesDevice> {
    if let Some(fd) = std::env::var_os(CACHEFILES_FD_ENV) {
        let fd: i32 = fd
            .to_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{CACHEFILES_FD_ENV} must be an fd number"))?;
        // SAFETY: the supervisor that set the variable handed us this open fd of
        // /dev/cachefiles and no longer uses it through this number.
        let file = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let dev = CachefilesDevice::from_file(file);
        cachefiles::send(&dev, &Command::Restore)
            .context("writing `restore` to the inherited /dev/cachefiles fd")?;
        tracing::info!(fd, "took over an existing cachefiles cache (restore)");
        return Ok(dev);
    }
    let dev = CachefilesDevice::open(Path::new(cachefiles::DEVICE_PATH)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            anyhow::anyhow!(
                "{}: busy; another daemon (cachefilesd, nydusd, dedupd) holds it",
                cachefiles::DEVICE_PATH
            )
        } else {
            anyhow::anyhow!("{}: {e}", cachefiles::DEVICE_PATH)
        }
    })?;
    let cache_dir = config.root.join("cache");
    fs::create_dir_all(&cache_dir).with_context(|| format!("{}", cache_dir.display()))?;
    dev.bind(&cache_dir, CACHE_TAG).with_context(|| {
        format!(
            "binding the cachefiles cache in {} (needs ext4/xfs with user xattrs)",
            cache_dir.display()
        )
    })?;
    tracing::info!(cache_dir = %cache_dir.display(), "cachefiles cache bound (on-demand)");
    Ok(dev)
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
    let store = Store::open(&config.root)
        .with_context(|| format!("opening the store in {}", config.root.display()))?;
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

    let serving = start_front_end(&config, args, registry.clone())?;
    let started = Instant::now();
    let status = |stats: StatsSnapshot, running: bool, registered: u64| DaemonStatus {
        pid: std::process::id(),
        front_end_reason: serving.reason.clone(),
        uptime_ms: started.elapsed().as_millis() as u64,
        running,
        registered_blobs: registered,
        stats,
    };
    // Bounded by the signals: each pass waits at most STATS_PERIOD.
    loop {
        if let Err(e) = write_status(&path, &status(serving.engine.stats(), true, registered)) {
            tracing::warn!("{}: {e}", path.display());
        }
        match wait_signal(&signals, STATS_PERIOD) {
            Some(libc::SIGHUP) => match store.registry() {
                Ok(reg) => {
                    registered = reg.blobs.len() as u64;
                    tracing::info!(blobs = registered, "registry reloaded");
                    registry.replace(reg);
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
    let Serving { engine, reason } = serving;
    let fin = engine.stop();
    let final_status = DaemonStatus {
        pid: std::process::id(),
        front_end_reason: reason,
        uptime_ms: started.elapsed().as_millis() as u64,
        running: false,
        registered_blobs: registered,
        stats: fin,
    };
    write_status(&path, &final_status).with_context(|| format!("{}", path.display()))?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
