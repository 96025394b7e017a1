//! OCI layer conversion: tar (plain, gzip or zstd, detected by content) to an EROFS
//! metadata image plus deduplicated chunks in the store.

/// `dedupd convert` arguments.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Store root.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: std::path::PathBuf,
    /// Layer files (OCI layer blobs).
    #[arg(required = true)]
    pub layers: Vec<std::path::PathBuf>,
}

/// `dedupd export` arguments.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Store root.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: std::path::PathBuf,
    /// Layer digest or diff_id.
    pub layer: String,
    /// Output directory.
    pub outdir: std::path::PathBuf,
}

/// Runs `dedupd convert`.
pub fn convert_cmd(_args: &ConvertArgs) -> anyhow::Result<()> {
    anyhow::bail!("convert is not implemented yet")
}

/// Runs `dedupd export`.
pub fn export_cmd(_args: &ExportArgs) -> anyhow::Result<()> {
    anyhow::bail!("export is not implemented yet")
}
