//! The `dedupd` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dedupd",
    version,
    about = "Lazy, deduplicated container images: a containerd snapshotter and kernel cache daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: data plane and snapshotter service.
    Run(dedupd::daemon::RunArgs),
    /// Convert OCI layer files into EROFS images and stored chunks.
    Convert(dedupd::convert::ConvertArgs),
    /// Publish a dedupd artifact beside an image in its registry (for lazy pull), as JSON.
    Publish(dedupd::remote::publish::PublishArgs),
    /// Write a converted layer's image and data blobs as plain files.
    Export(dedupd::convert::ExportArgs),
    /// Serve every converted layer through fanotify pre-content events (Linux 6.14+),
    /// mounted under --mount-dir; prints READY, then the counters on SIGTERM.
    ServeFanotify(dedupd::frontend::fanotify::cli::ServeArgs),
    /// Materialize every blob and mount every layer locally (no lazy loading).
    ServeLocal(dedupd::frontend::fanotify::cli::ServeArgs),
    /// Internal: the process that keeps the fanotify group alive across daemon restarts.
    #[command(hide = true)]
    FanotifyHolder(dedupd::frontend::fanotify::cli::HolderArgs),
    /// Internal: the process that keeps the bound `/dev/cachefiles` fd alive across daemon
    /// restarts (when no systemd fd store keeps it).
    #[command(hide = true)]
    CachefilesHolder {
        /// Socket to listen on.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// The cache's tag (its fscache volumes tell whether layers are still mounted).
        #[arg(long)]
        tag: String,
        /// How long to keep a cache with mounted layers for a daemon that does not come
        /// back, before withdrawing it (readers then get EIO).
        #[arg(long, default_value_t = dedupd::frontend::cachefiles::holder::GRACE.as_millis() as u64)]
        grace_ms: u64,
    },
    /// Unmount every layer nothing uses under a root and end dedupd's holder processes
    /// (before an uninstall or a move to another root); refuses while a daemon runs on
    /// the root or a container still uses a layer.
    Teardown(dedupd::daemon::teardown::TeardownArgs),
    /// Import an image made by `mkfs.erofs --blobdev` into the store (tests, benches).
    #[command(hide = true)]
    FanotifyImport(dedupd::frontend::fanotify::cli::ImportArgs),
    /// Pull an image into containerd through the dedup snapshotter, lazily where the
    /// image has a published artifact (`ctr image pull` downloads every layer first).
    Pull(dedupd::ctrclient::pull::PullArgs),
    /// Pull an image through containerd's CRI image service, as the kubelet does (for
    /// tests and debugging on nodes without crictl); prints the image reference.
    #[command(hide = true)]
    CriPull {
        /// containerd's socket.
        #[arg(
            short = 'a',
            long,
            env = "CONTAINERD_ADDRESS",
            default_value = "/run/containerd/containerd.sock"
        )]
        address: std::path::PathBuf,
        /// The image.
        image: String,
    },
    /// Which front end serves and why, cache use, mounted layers and how much of each is
    /// local, the slowest recent requests: the running (or last) daemon's
    /// `<root>/run/stats.json`, for a human (or as JSON with --json).
    Status {
        /// Store root.
        #[arg(long, default_value = dedupd::config::DEFAULT_ROOT)]
        root: std::path::PathBuf,
        /// Print the same as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Old name of `run --front-end local` (kept for scripts).
    #[command(hide = true)]
    Snapshotter(dedupd::snapshotter::SnapshotterArgs),
    /// Inspect the chunk store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Reclaim pack space of removed chunks (no daemon may have the store open), as JSON.
    Compact {
        /// Store root.
        #[arg(long, default_value = dedupd::config::DEFAULT_ROOT)]
        root: std::path::PathBuf,
        /// Rewrite packs whose live bytes are under this percentage.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
        live_percent: u8,
    },
    /// Logical, unique and stored bytes, and the dedup ratio, as JSON.
    Stats {
        /// Store root.
        #[arg(long, default_value = dedupd::config::DEFAULT_ROOT)]
        root: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEDUPD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A log that cannot be written (a full disk under the log file) is dropped
        // silently. With the default, the subscriber reports the failure with eprintln!,
        // which panics on the same stderr: a daemon or holder died of its own log line,
        // and a dead fanotify holder lets the kernel allow every pending read of a hole
        // (zeros).
        .log_internal_errors(false)
        // Colors only on a terminal: a log file or the journal gets plain `key=value`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // Whatever writes under a root writes it for root alone (see dedupd::perms); export
    // writes where the user asks, status writes nothing.
    if !matches!(cli.command, Command::Export(_) | Command::Status { .. }) {
        dedupd::perms::private_umask();
    }
    let result = match &cli.command {
        Command::Run(a) => dedupd::daemon::run(a),
        Command::Convert(a) => dedupd::convert::convert_cmd(a),
        Command::Export(a) => dedupd::convert::export_cmd(a),
        Command::Publish(a) => dedupd::remote::publish::publish_cmd(a),
        Command::ServeFanotify(a) => dedupd::frontend::fanotify::cli::serve_fanotify(a),
        Command::ServeLocal(a) => dedupd::frontend::fanotify::cli::serve_local(a),
        Command::FanotifyHolder(a) => dedupd::frontend::fanotify::cli::holder_cmd(a),
        Command::CachefilesHolder {
            socket,
            tag,
            grace_ms,
        } => dedupd::frontend::cachefiles::holder::run(
            socket,
            tag,
            std::time::Duration::from_millis(*grace_ms),
        )
        .map_err(|e| anyhow::anyhow!("cachefiles holder on {}: {e}", socket.display())),
        Command::Teardown(a) => dedupd::daemon::teardown::teardown_cmd(a),
        Command::FanotifyImport(a) => dedupd::frontend::fanotify::cli::import_cmd(a),
        Command::Pull(a) => dedupd::ctrclient::pull::pull_cmd(a),
        Command::CriPull { address, image } => cri_pull(address, image),
        Command::Status { root, json } => dedupd::daemon::status(root, *json),
        Command::Snapshotter(a) => dedupd::daemon::run(&dedupd::daemon::RunArgs::local(
            a.root.clone(),
            a.socket.clone(),
        )),
        Command::Store {
            command: StoreCommand::Stats { root },
        } => store_stats(root),
        Command::Store {
            command: StoreCommand::Compact { root, live_percent },
        } => store_compact(root, *live_percent),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedupd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cri_pull(address: &std::path::Path, image: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let image_ref = rt.block_on(async {
        let c = dedupd::ctrclient::Client::connect(address, "k8s.io").await?;
        c.cri_pull(image).await
    })?;
    println!("{image_ref}");
    Ok(())
}

fn store_compact(root: &std::path::Path, live_percent: u8) -> anyhow::Result<()> {
    let store = dedupd::store::Store::open(root)?;
    let opts = dedupd::store::CompactOptions {
        live_percent,
        ..Default::default()
    };
    // A whole-store lock (no daemon running): no registry is live, unlink at once.
    let compact = store.compact(opts)?;
    let finish = store.finish_compaction()?;
    println!(
        "{}",
        serde_json::json!({"compact": compact, "finish": finish, "stats": store.stats()?})
    );
    Ok(())
}

fn store_stats(root: &std::path::Path) -> anyhow::Result<()> {
    let store = dedupd::store::Store::open(root)?;
    println!("{}", serde_json::to_string(&store.stats()?)?);
    Ok(())
}
