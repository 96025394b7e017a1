//! Configuration: embedded defaults, overridden by a TOML file and then by flags.

use std::path::PathBuf;

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
}

impl Default for Config {
    fn default() -> Config {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            socket: PathBuf::from(DEFAULT_SOCKET),
            threads: 0,
            front_end: FrontEnd::Auto,
            chunk_bytes: crate::store::DEFAULT_CHUNK_BYTES,
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
