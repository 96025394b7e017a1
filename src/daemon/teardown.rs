//! `dedupd teardown`: makes dedupd really gone from a root (an uninstall, or a move to
//! another root). It unmounts every layer mount under the root that nothing uses and
//! ends the front ends' holder processes, which otherwise keep the fanotify group and the
//! cachefiles cache for the next daemon. It refuses, changing nothing that is in use,
//! while a daemon runs on the root or a container still uses a layer.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::frontend::holder::MESSAGE_BYTES;

/// How long a holder has to answer `QUIT`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a free holder takes at most to start its hand-over (it answers a new
/// connection at once unless a daemon is attached).
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(3);

/// Arguments of `dedupd teardown`.
#[derive(clap::Args, Debug)]
pub struct TeardownArgs {
    /// Store root.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
}

/// Runs `dedupd teardown`.
pub fn teardown_cmd(args: &TeardownArgs) -> anyhow::Result<()> {
    let root = &args.root;
    if root.join("dedupd.redb").exists() {
        match crate::store::Store::open(root) {
            Ok(store) => drop(store),
            Err(crate::store::StoreError::InUse { .. }) => bail!(
                "a dedupd daemon is running on {}: stop it first (teardown never pulls \
                 layers from under a running daemon)",
                root.display()
            ),
            Err(e) => return Err(e).context("opening the store to see whether a daemon runs"),
        }
    }
    // The holders first: one that does not hand over at once has a daemon attached
    // (`serve-fanotify`, or a `dedupd run` on another store path). Held from here on,
    // no daemon can attach while layers are unmounted.
    let fanotify_socket = super::fanotify_dir(root).join("holder.sock");
    let cachefiles_socket = root.join("cachefiles").join("holder.sock");
    let fanotify = attach_holder(&fanotify_socket, Greeting::Fanotify)?;
    let cachefiles = attach_holder(&cachefiles_socket, Greeting::Cachefiles)?;
    let mounts = mounts_under(root).context("reading /proc/self/mountinfo")?;
    let mut busy = Vec::new();
    let mut unmounted = 0;
    for m in &mounts {
        match nix::mount::umount2(m, nix::mount::MntFlags::empty()) {
            Ok(()) => {
                unmounted += 1;
                let _ = std::fs::remove_dir(m);
            }
            Err(nix::errno::Errno::EBUSY) => busy.push(m.display().to_string()),
            Err(e) => bail!("unmounting {}: {e}", m.display()),
        }
    }
    if !busy.is_empty() {
        bail!(
            "{} mount(s) under {} are in use (a container or a process still uses the \
             layer; stop it, then run teardown again): {}",
            busy.len(),
            root.display(),
            busy.join(", ")
        );
    }
    let mut ended = Vec::new();
    if let Some(conn) = fanotify {
        quit_holder(&conn, &fanotify_socket)?;
        ended.push("fanotify holder");
    }
    if let Some(conn) = cachefiles {
        quit_holder(&conn, &cachefiles_socket)?;
        ended.push("cachefiles holder");
    }
    println!(
        "teardown of {}: {unmounted} mount(s) unmounted; {}",
        root.display(),
        if ended.is_empty() {
            "no holder was running".to_string()
        } else {
            format!("ended: {}", ended.join(", "))
        }
    );
    Ok(())
}

/// Mount points at or below `root`, deepest first (so a mount inside another goes
/// first).
pub fn mounts_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            PathBuf::from(std::ffi::OsStr::from_bytes(
                &crate::frontend::fanotify::holder::unescape_mount_path(p),
            ))
        })
        .filter(|p| p.starts_with(&root) && *p != root)
        .collect();
    out.sort();
    out.dedup();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(out)
}

/// What a holder sends first on a connection.
#[derive(Clone, Copy)]
enum Greeting {
    /// `GROUP` with fds, `WRITERS ...`s, then `END`.
    Fanotify,
    /// `DEVICE` with the fd, or `EMPTY`.
    Cachefiles,
}

/// Connects to the holder at `socket` and takes (and drops) its hand-over: `None` when
/// no holder listens there. A holder that does not hand over within
/// [`HAND_OVER_TIMEOUT`] serves a daemon (it accepts one connection at a time): an error.
fn attach_holder(socket: &Path, greeting: Greeting) -> anyhow::Result<Option<OwnedFd>> {
    if !socket.exists() {
        return Ok(None);
    }
    let conn = match crate::frontend::holder::connect(socket) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
            ) =>
        {
            // A socket file left by a holder that is gone.
            let _ = std::fs::remove_file(socket);
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    };
    let ctx = || format!("holder at {}", socket.display());
    let mut buf = vec![0u8; MESSAGE_BYTES];
    // The hand-over meant for a daemon: its fds are closed at once.
    let mut timeout = HAND_OVER_TIMEOUT;
    loop {
        let (n, fds) = match crate::frontend::holder::recv_timeout(conn.as_fd(), &mut buf, timeout)
        {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::TimedOut && timeout == HAND_OVER_TIMEOUT => bail!(
                "a dedupd daemon is attached to the {} (it did not hand over within {:?}): \
                 stop the daemon first",
                ctx(),
                HAND_OVER_TIMEOUT
            ),
            Err(e) => return Err(e).with_context(ctx),
        };
        drop(fds);
        if n == 0 {
            bail!("{}: closed the connection before its hand-over", ctx());
        }
        let msg = &buf[..n];
        let done = match greeting {
            Greeting::Fanotify => msg == b"END",
            Greeting::Cachefiles => msg == b"DEVICE" || msg == b"EMPTY",
        };
        if done {
            return Ok(Some(conn));
        }
        timeout = ANSWER_TIMEOUT;
    }
}

/// Tells an attached holder to leave; an error when it refuses (something still uses
/// what it holds).
fn quit_holder(conn: &OwnedFd, socket: &Path) -> anyhow::Result<()> {
    let ctx = || format!("holder at {}", socket.display());
    let mut buf = vec![0u8; MESSAGE_BYTES];
    crate::frontend::holder::send(conn.as_fd(), b"QUIT", &[]).with_context(ctx)?;
    let (n, _) = crate::frontend::holder::recv_timeout(conn.as_fd(), &mut buf, ANSWER_TIMEOUT)
        .with_context(ctx)?;
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    match answer.as_str() {
        "GONE" => Ok(()),
        a => match a.strip_prefix("BUSY ") {
            Some(why) => bail!("{} stays: {why}", ctx()),
            None => bail!("{}: unexpected answer {a:?}", ctx()),
        },
    }
}
