//! The commands of this front end: `serve-fanotify`, `serve-local`, the internal
//! `fanotify-holder`, and `fanotify-import` (tests and benches).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};

use super::mount::{is_mounted, mount_erofs, unmount, unmount_retry};
use super::{FanotifyFrontEnd, Options};
use crate::frontend::local;
use crate::store::{LayerRecord, Store};

/// `dedupd serve-fanotify` / `serve-local` arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Store root (layers are served from its converted layers).
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Each layer is mounted at `<mount-dir>/<diff_id hex>`.
    #[arg(long)]
    pub mount_dir: PathBuf,
    /// Serving-engine threads (read events and fill).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// How long the holder keeps the group for a successor before failing reads with EIO.
    #[arg(long, default_value_t = 30_000)]
    pub grace_ms: u64,
    /// Keep complete blobs marked (benchmarks: the cost of events on filled ranges).
    #[arg(long, hide = true)]
    pub keep_marks: bool,
    /// Answer events with write(2) each instead of batching through io_uring.
    #[arg(long, hide = true)]
    pub plain_responses: bool,
    /// Do not fill ahead of sequential readers.
    #[arg(long, hide = true)]
    pub no_prefetch: bool,
}

/// `dedupd fanotify-holder` arguments (started by `serve-fanotify`).
#[derive(clap::Args, Debug)]
pub struct HolderArgs {
    /// Socket to listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// Grace period for a successor daemon.
    #[arg(long, default_value_t = 30_000)]
    pub grace_ms: u64,
    /// Take the group from the first daemon that connects (replaces a dead holder).
    #[arg(long)]
    pub adopt: bool,
}

/// `dedupd fanotify-import` arguments.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Store root.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Chunk size the blob is cut into.
    #[arg(long, default_value_t = crate::store::DEFAULT_CHUNK_BYTES)]
    pub chunk_bytes: u32,
    /// EROFS image made with `mkfs.erofs --blobdev`.
    pub image: PathBuf,
    /// Its blob device.
    pub blob: PathBuf,
}

fn block_termination() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked in this thread before any other starts, so every thread inherits it and
    // only `wait` below sees the signal.
    set.thread_block().context("blocking SIGTERM/SIGINT")?;
    Ok(set)
}

fn load(root: &Path) -> anyhow::Result<(crate::store::Registry, Vec<LayerRecord>)> {
    let store = Store::open(root)?;
    Ok((store.registry()?, store.layers()?))
}

fn mountpoint(dir: &Path, layer: &LayerRecord) -> PathBuf {
    dir.join(layer.id_hex())
}

fn unmount_all(mounted: &[PathBuf]) -> bool {
    let mut all = true;
    for m in mounted {
        if let Err(e) = unmount_retry(m, 50) {
            tracing::error!("unmounting {}: {e}", m.display());
            all = false;
        }
    }
    all
}

/// Runs `dedupd serve-fanotify`: prepares, marks and serves every layer of the store,
/// mounted under `--mount-dir`; prints `READY` when mounted, and the counters as JSON
/// on exit (SIGTERM/SIGINT).
pub fn serve_fanotify(args: &ServeArgs) -> anyhow::Result<()> {
    let signals = block_termination()?;
    let (registry, layers) = load(&args.root)?;
    let opts = Options {
        cache_dir: args.root.join("fanotify"),
        workers: args.workers,
        grace: Duration::from_millis(args.grace_ms),
        holder_exe: std::env::current_exe().context("locating the dedupd binary")?,
        unmark_complete: !args.keep_marks,
        uring_responses: !args.plain_responses,
        prefetch: !args.no_prefetch,
        packs_dir: args.root.join("chunks"),
        digest_on_read: false,
        fetcher: None,
    };
    let fe = FanotifyFrontEnd::start(&registry, &opts)?;
    let st = fe.stats();
    tracing::info!(
        continued = st.continued,
        journaled = st.recovered_journaled,
        orphans = st.recovered_orphans,
        "fanotify front end started"
    );
    // For tests and operators: what was left pending by a previous daemon.
    println!(
        "RECOVERED journaled={} orphans={}",
        st.recovered_journaled, st.recovered_orphans
    );
    let mut mounted = Vec::new();
    for layer in &layers {
        let mnt = mountpoint(&args.mount_dir, layer);
        if is_mounted(&mnt) {
            if fe.continued() {
                // Mounted by an earlier daemon of this same group: it keeps working.
                mounted.push(mnt);
                continue;
            }
            // A mount whose group is gone may have read holes as zeros: never reuse it.
            tracing::warn!(
                "{} was mounted under a lost group; detaching it",
                mnt.display()
            );
            let _ = unmount(&mnt, true);
        }
        let devices: Vec<PathBuf> = layer
            .blobs
            .iter()
            .map(|id| {
                fe.blob_path(id)
                    .map(Path::to_path_buf)
                    .with_context(|| format!("layer {}: blob {id} is not served", layer.diff_id))
            })
            .collect::<anyhow::Result<_>>()?;
        let image = args
            .root
            .join("layers")
            .join(format!("{}.erofs", layer.id_hex()));
        if let Err(e) = mount_erofs(&image, &devices, &mnt) {
            unmount_all(&mounted);
            let _ = fe.shutdown(false);
            return Err(e.into());
        }
        mounted.push(mnt);
    }
    println!("READY");
    std::io::stdout().flush()?;
    let sig = signals.wait().context("waiting for SIGTERM")?;
    tracing::info!("{sig:?}: unmounting and stopping");
    let all = unmount_all(&mounted);
    let stats = fe.shutdown(all);
    println!("{}", serde_json::to_string(&stats)?);
    if !all {
        anyhow::bail!("some mounts are busy; the holder keeps the group and fails reads after its grace period");
    }
    Ok(())
}

/// Runs `dedupd serve-local`: materializes every blob, mounts every layer, prints
/// `READY`, unmounts on SIGTERM/SIGINT.
pub fn serve_local(args: &ServeArgs) -> anyhow::Result<()> {
    let signals = block_termination()?;
    let (registry, layers) = load(&args.root)?;
    let blobs: std::collections::HashMap<String, PathBuf> =
        local::materialize(&registry, &args.root.join("local"))?
            .into_iter()
            .collect();
    let mut mounted = Vec::new();
    for layer in &layers {
        let mnt = mountpoint(&args.mount_dir, layer);
        if is_mounted(&mnt) {
            let _ = unmount(&mnt, true);
        }
        let devices: Vec<PathBuf> = layer.blobs.iter().map(|id| blobs[id].clone()).collect();
        let image = args
            .root
            .join("layers")
            .join(format!("{}.erofs", layer.id_hex()));
        if let Err(e) = mount_erofs(&image, &devices, &mnt) {
            unmount_all(&mounted);
            return Err(e.into());
        }
        mounted.push(mnt);
    }
    println!("READY");
    std::io::stdout().flush()?;
    signals.wait().context("waiting for SIGTERM")?;
    if !unmount_all(&mounted) {
        anyhow::bail!("some mounts are busy");
    }
    Ok(())
}

/// Runs `dedupd fanotify-holder`.
pub fn holder_cmd(args: &HolderArgs) -> anyhow::Result<()> {
    super::holder::run(
        &args.socket,
        Duration::from_millis(args.grace_ms),
        args.adopt,
    )
    .with_context(|| format!("fanotify holder on {}", args.socket.display()))
}

/// Runs `dedupd fanotify-import`: prints the layer record as JSON.
pub fn import_cmd(args: &ImportArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.root)?;
    let rec = super::import::import_erofs(&store, &args.image, &args.blob, args.chunk_bytes)?;
    println!("{}", serde_json::to_string(&rec)?);
    Ok(())
}
