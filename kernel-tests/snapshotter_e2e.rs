//! Runs `kernel-tests/snapshotter-e2e` (registry + containerd + dedupd, natively, as root)
//! against the dedupd binary of this build, so that `cargo test` covers the end-to-end
//! flow. The script skips loudly when not root.

#[test]
fn containerd_pulls_and_runs_through_the_dedup_snapshotter() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/kernel-tests/snapshotter-e2e");
    let status = std::process::Command::new(script)
        .env("DEDUPD", env!("CARGO_BIN_EXE_dedupd"))
        .status()
        .expect("kernel-tests/snapshotter-e2e runs");
    assert!(
        status.success(),
        "kernel-tests/snapshotter-e2e failed: {status}"
    );
}
