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
    /// Write a converted layer's image and data blobs as plain files.
    Export(dedupd::convert::ExportArgs),
    /// Serve only the containerd snapshotter (`local` front end), for tests and debugging.
    Snapshotter(dedupd::snapshotter::SnapshotterArgs),
    /// Inspect the chunk store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
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
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(a) => dedupd::daemon::run(a),
        Command::Convert(a) => dedupd::convert::convert_cmd(a),
        Command::Export(a) => dedupd::convert::export_cmd(a),
        Command::Snapshotter(a) => dedupd::snapshotter::run_cmd(a),
        Command::Store {
            command: StoreCommand::Stats { root },
        } => store_stats(root),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedupd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn store_stats(root: &std::path::Path) -> anyhow::Result<()> {
    let store = dedupd::store::Store::open(root)?;
    println!("{}", serde_json::to_string(&store.stats()?)?);
    Ok(())
}
