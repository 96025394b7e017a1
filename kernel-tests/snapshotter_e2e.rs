//! Runs `kernel-tests/snapshotter-e2e` (registry + containerd + dedupd, natively, as root)
//! against the dedupd binary of this build, so that `cargo test` covers the end-to-end
//! flow: first `dedupd run` with the automatic front end (fanotify on a kernel with
//! pre-content events and no cachefiles on-demand, `DEDUPD_E2E_FRONT_END` to name another
//! expectation), then a short run with `--front-end local`. The script skips loudly when
//! not root.

fn e2e(cmd: &str, expect: &str, big_mib: &str, small_files: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/kernel-tests/snapshotter-e2e");
    let status = std::process::Command::new(script)
        .env("DEDUPD", env!("CARGO_BIN_EXE_dedupd"))
        .env("DEDUPD_CMD", cmd)
        .env("EXPECT_FRONT_END", expect)
        .env("BIG_MIB", big_mib)
        .env("SMALL_FILES", small_files)
        .status()
        .expect("kernel-tests/snapshotter-e2e runs");
    assert!(
        status.success(),
        "kernel-tests/snapshotter-e2e with `dedupd {cmd}` failed: {status}"
    );
}

#[test]
fn containerd_pulls_and_runs_through_the_dedup_snapshotter() {
    let expect = std::env::var("DEDUPD_E2E_FRONT_END").unwrap_or_else(|_| "fanotify".into());
    e2e("run", &expect, "256", "3000");
    e2e("run --front-end local", "local", "16", "300");
}
