//! `dedupd run`: picks the front end, loads the blob registry, starts the data plane and
//! the control thread.

use crate::config::{Config, FrontEnd};

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

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    anyhow::bail!(
        "dedupd run is not implemented yet (root {})",
        config.root.display()
    )
}
