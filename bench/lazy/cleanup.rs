//! What the benchmark must undo however it ends: processes it started, mounts, the
//! shaped link's namespace and its scratch directory. Drop impls undo their own part
//! and take it off the list; a panic unwinds through them; SIGINT and SIGTERM (blocked
//! in every thread and taken by one watcher thread) undo whatever is still listed, then
//! exit.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Default)]
struct List {
    pids: Vec<u32>,
    mounts: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

static LIST: Mutex<List> = Mutex::new(List {
    pids: Vec::new(),
    mounts: Vec::new(),
    dirs: Vec::new(),
});

fn with<R>(f: impl FnOnce(&mut List) -> R) -> R {
    f(&mut LIST.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A child process to kill.
pub fn add_pid(pid: u32) {
    with(|l| l.pids.push(pid));
}

/// It was stopped.
pub fn remove_pid(pid: u32) {
    with(|l| l.pids.retain(|&p| p != pid));
}

/// A mountpoint to detach.
pub fn add_mount(p: &Path) {
    with(|l| l.mounts.push(p.to_path_buf()));
}

/// It was unmounted.
pub fn remove_mount(p: &Path) {
    with(|l| l.mounts.retain(|m| m != p));
}

/// A directory to remove at the end.
pub fn add_dir(p: &Path) {
    with(|l| l.dirs.push(p.to_path_buf()));
}

/// Undoes everything still listed: mounts (lazily), processes (SIGKILL), the
/// namespace, dedupd layer mounts under the directories, then the directories.
pub fn all() {
    let l = with(std::mem::take);
    for m in l.mounts.iter().rev() {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    for &p in &l.pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", crate::link::NETNS])
        .output();
    for d in &l.dirs {
        detach_under(d);
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Detaches every mount at or below `dir` (deepest first), from /proc/self/mounts.
pub fn detach_under(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut below: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in below {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and every thread started after it) and
/// starts the watcher that cleans up and exits when one arrives. Call first in main.
pub fn install_signal_watcher() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().expect("blocking signals");
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("lazy bench: {sig:?}: cleaning up");
            all();
            std::process::exit(130);
        }
    });
}
