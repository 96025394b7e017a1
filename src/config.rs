//! Configuration: embedded defaults, overridden by a TOML file and then by flags.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default root of everything dedupd stores.
pub const DEFAULT_ROOT: &str = "/var/lib/dedupd";
/// Default snapshotter socket.
pub const DEFAULT_SOCKET: &str = "/run/dedupd/dedupd.sock";

/// Which kernel front end serves page-cache misses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FrontEnd {
    /// Pick the best the kernel offers: cachefiles, else fanotify, else local.
    Auto,
    /// EROFS over fscache through `/dev/cachefiles` on-demand mode.
    Cachefiles,
    /// EROFS file-backed mounts filled on fanotify pre-content events.
    Fanotify,
    /// Blobs materialized eagerly; plain EROFS mounts.
    Local,
}

/// The daemon's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Root directory of the store, images, caches and snapshot metadata.
    pub root: PathBuf,
    /// Unix socket of the snapshotter gRPC service.
    pub socket: PathBuf,
    /// Data-plane threads; 0 means one per online CPU.
    pub threads: usize,
    /// Front end to use.
    pub front_end: FrontEnd,
    /// Chunk size for conversions, a power of two from 4 KiB to 1 MiB.
    pub chunk_bytes: u32,
    /// How registries are reached (lazy pull).
    pub registry: RegistryConfig,
    /// Lazy pull of layers that have a published dedupd artifact.
    pub lazy: LazyConfig,
    /// `[cache]`: how much lazily pulled data the node keeps.
    pub cache: CacheConfig,
    /// Where the Prometheus endpoint (`GET /metrics`) listens: a unix socket path
    /// (`/run/dedupd/metrics.sock`, root only) or `127.0.0.1:PORT`. Off when unset.
    pub metrics_address: Option<String>,
}

/// `[registry]`: how dedupd reaches registries.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// containerd's host configuration directory (`<dir>/<host>/hosts.toml`: mirrors,
    /// CAs, `skip_verify`, plain `http://` hosts).
    pub hosts_dir: PathBuf,
    /// Reach registries without a `hosts.toml` over plain HTTP (as `ctr --plain-http`).
    pub plain_http: bool,
    /// docker's `config.json` with `auths` (default: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// Longest wait for a connection, milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for an answer, milliseconds.
    pub request_timeout_ms: u64,
    /// Most requests in flight to one host.
    pub max_requests_per_host: usize,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        let d = crate::registry::RegistryOptions::default();
        RegistryConfig {
            hosts_dir: d.hosts_dir,
            plain_http: d.plain_http,
            docker_config: None,
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            max_requests_per_host: d.max_requests_per_host,
        }
    }
}

impl RegistryConfig {
    /// The registry client's options.
    pub fn options(&self) -> crate::registry::RegistryOptions {
        let d = crate::registry::RegistryOptions::default();
        crate::registry::RegistryOptions {
            hosts_dir: self.hosts_dir.clone(),
            plain_http: self.plain_http,
            docker_config: self.docker_config.clone().or(d.docker_config),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_requests_per_host: self.max_requests_per_host.max(1),
        }
    }
}

/// `[lazy]`: lazy pull.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LazyConfig {
    /// Mount layers with a published artifact from their metadata, fetching data on
    /// demand (needs the cachefiles or fanotify front end).
    pub enabled: bool,
    /// How long a read may wait for a chunk from the registry before it fails with
    /// EIO, milliseconds.
    pub fetch_timeout_ms: u64,
    /// Bytes fetched around a random miss.
    pub min_window_bytes: u64,
    /// Largest fetch, reached while a blob is read in order.
    pub max_window_bytes: u64,
    /// Range requests in flight.
    pub max_fetches: usize,
    /// What is fetched in the background after a lazy mount: `all` (the access trace
    /// first, then the rest), `trace` (only the trace), `none`.
    pub prefetch: crate::remote::PrefetchMode,
    /// Prefetch bandwidth cap, bytes per second (0: none).
    pub prefetch_bytes_per_sec: u64,
    /// A layer with no published artifact (CRI pulls and `dedupd pull`) is streamed
    /// from the registry straight into the converter, instead of containerd
    /// downloading and unpacking it for a conversion at Commit.
    pub stream: bool,
}

/// `[cache]`: the bounded cache. What it bounds is the data of lazily pulled layers
/// that can be fetched again: their chunks in the store (see
/// [`crate::store::evict`]). Layers pulled the classic way are never evicted.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// The limit: bytes (`1073741824`), with a unit (`500MiB`, `20GiB`, `2TB`), or a
    /// share of the root's filesystem (`25%`). Unset: unbounded.
    pub limit: Option<String>,
    /// Eviction starts when the data passes this percentage of the limit.
    pub high_watermark_percent: u8,
    /// ... and evicts down to this percentage of it.
    pub low_watermark_percent: u8,
    /// How often usage is checked, milliseconds.
    pub check_period_ms: u64,
    /// How long an evicted chunk's record stays readable before its bytes are
    /// deallocated (a fill that looked the chunk up just before still reads it),
    /// milliseconds; at least 100.
    pub punch_grace_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            limit: None,
            high_watermark_percent: 90,
            low_watermark_percent: 80,
            check_period_ms: 2000,
            punch_grace_ms: 5000,
        }
    }
}

/// A cache limit as configured: bytes, or a share of the root's filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSpec {
    /// That many bytes.
    Bytes(u64),
    /// This percentage (1..=100) of the filesystem's size.
    Percent(u8),
}

impl LimitSpec {
    /// Parses `limit` (see [`CacheConfig::limit`]).
    pub fn parse(s: &str) -> Result<LimitSpec, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(n) if (1..=100).contains(&n) => Ok(LimitSpec::Percent(n)),
                _ => Err(format!("cache limit {s:?}: a percentage is 1% to 100%")),
            };
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("cache limit {s:?}: not a number of bytes"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            u => {
                return Err(format!(
                    "cache limit {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %)"
                ))
            }
        };
        match n.checked_mul(mult) {
            Some(0) => Err(format!("cache limit {s:?}: must be more than 0")),
            Some(b) => Ok(LimitSpec::Bytes(b)),
            None => Err(format!("cache limit {s:?}: too large")),
        }
    }
}

impl CacheConfig {
    /// The limit, checked with its watermarks; `None` when unbounded.
    pub fn spec(&self) -> Result<Option<LimitSpec>, String> {
        let Some(l) = &self.limit else {
            return Ok(None);
        };
        let spec = LimitSpec::parse(l)?;
        let (lo, hi) = (self.low_watermark_percent, self.high_watermark_percent);
        if !(lo < hi && hi <= 100 && lo > 0) {
            return Err(format!(
                "cache watermarks: need 0 < low ({lo}%) < high ({hi}%) <= 100%"
            ));
        }
        Ok(Some(spec))
    }
}

impl Default for LazyConfig {
    fn default() -> LazyConfig {
        let d = crate::remote::FetchConfig::default();
        LazyConfig {
            enabled: true,
            fetch_timeout_ms: d.timeout.as_millis() as u64,
            min_window_bytes: d.min_window_bytes,
            max_window_bytes: d.max_window_bytes,
            max_fetches: d.max_fetches,
            prefetch: crate::remote::PrefetchMode::All,
            prefetch_bytes_per_sec: d.prefetch_bytes_per_sec,
            stream: true,
        }
    }
}

impl LazyConfig {
    /// The fetcher's settings.
    pub fn fetch_config(&self) -> crate::remote::FetchConfig {
        crate::remote::FetchConfig {
            timeout: Duration::from_millis(self.fetch_timeout_ms),
            min_window_bytes: self.min_window_bytes,
            max_window_bytes: self.max_window_bytes.max(self.min_window_bytes),
            max_fetches: self.max_fetches.max(1),
            prefetch_bytes_per_sec: self.prefetch_bytes_per_sec,
            ..crate::remote::FetchConfig::default()
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            socket: PathBuf::from(DEFAULT_SOCKET),
            threads: 0,
            front_end: FrontEnd::Auto,
            chunk_bytes: crate::store::DEFAULT_CHUNK_BYTES,
            registry: RegistryConfig::default(),
            lazy: LazyConfig::default(),
            cache: CacheConfig::default(),
            metrics_address: None,
        }
    }
}

impl Config {
    /// Reads a TOML config file; keys it omits keep their defaults.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// Data-plane thread count with 0 resolved to the number of online CPUs.
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}
