//! Who may read what dedupd keeps: root only.
//!
//! Packs, layer images, blob files and cache files hold every byte of every image,
//! including files the image itself keeps at 0600 (keys, shadow files), so nothing under
//! the root may be readable, writable or traversable by another user, and no socket of
//! ours may talk to one:
//!
//! - every command that writes the root runs with umask 077 ([`private_umask`]): files
//!   0600, directories 0700, unix sockets 0600 from the moment they are bound (no window
//!   between bind and chmod);
//! - at start, `dedupd run` removes the group and other bits of everything an earlier
//!   version left under the root ([`tighten`]) and logs what it changed;
//! - sockets that hand out fds or serve containerd also check the peer's credentials
//!   (`SO_PEERCRED`, [`check_peer`]): root, or the daemon's own user.
//!
//! **The exception**, and why it is safe. Two kinds of directory under the root keep the
//! mode a container needs, because the kernel shows their mode to processes inside the
//! container, which may run as any uid:
//! - `snapshots/<id>/fs`, the overlay upper directory of a container (or the whole
//!   root of a container with no layers): overlayfs gives the container's `/` the mode
//!   and owner of its upper directory, so it stays 0755 (as containerd's own overlayfs
//!   snapshotter makes it). Its contents are the container's files, with the modes the
//!   container gave them.
//! - `m/<slot>` while a layer is mounted there: the mount shows the layer's own root
//!   directory, with the mode the image gave it (read-only EROFS, not ours to change).
//!
//! Both sit below `ROOT`, `ROOT/snapshots` and `ROOT/m`, which are 0700: no other user
//! of the node can reach them by path. Container processes never traverse those parents:
//! overlayfs and bind mounts reach lower and upper directories through paths resolved once,
//! by root, at mount time, and check permissions on the layers' own inodes with the
//! mounter's credentials. Nothing else needs an exception: containerd and runc run as
//! root, the kernel opens blob files and images with the mounter's credentials at mount
//! time (fanotify, local) or with cachefiles' own (cachefiles).

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The umask of everything that writes under the root.
pub const UMASK: u32 = 0o077;
/// Entries [`tighten`] looks at, at most (a root holds packs, images and blob files,
/// thousands, not millions; unpacked trees are not walked).
pub const MAX_ENTRIES: usize = 1 << 22;

/// Sets the process umask to [`UMASK`]; returns the previous one. Call before any file,
/// directory or socket is made (the umask is per process: every thread and child
/// inherits it).
pub fn private_umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(UMASK as _));
    old.bits() as u32
}

/// True for a path (relative to the root) that keeps its own mode: a snapshot's overlay
/// upper directory `snapshots/<id>/fs`, and everything in it. See the module docs.
pub fn is_exception(rel: &Path) -> bool {
    let c: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect();
    c.len() >= 3
        && c[0] == "snapshots"
        && c[1]
            .to_str()
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        && c[2] == "fs"
}

/// An entry some other user could use, and its mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    /// Its path.
    pub path: PathBuf,
    /// Its mode bits (permissions only).
    pub mode: u32,
}

/// Entries under `root` (and `root` itself) with any group or other permission bit,
/// outside the exception: on the root's filesystem only (mounted layers are skipped),
/// not inside `snapshots/<id>/fs` nor inside `trash/` entries (trees being deleted; the
/// entries themselves are looked at), symlinks skipped (their mode means nothing).
pub fn exposed(root: &Path) -> io::Result<Vec<Exposed>> {
    let top = fs::symlink_metadata(root)?;
    let mut out = Vec::new();
    if top.mode() & 0o077 != 0 {
        out.push(Exposed {
            path: root.to_path_buf(),
            mode: top.mode() & 0o7777,
        });
    }
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0usize;
    // Bounded by MAX_ENTRIES.
    while let Some(dir) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        for entry in rd {
            let entry = entry?;
            seen += 1;
            if seen > MAX_ENTRIES {
                return Err(io::Error::other(format!(
                    "{}: more than {MAX_ENTRIES} entries",
                    root.display()
                )));
            }
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            if is_exception(rel) {
                continue;
            }
            let md = match fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if md.file_type().is_symlink() || md.dev() != top.dev() {
                continue;
            }
            if md.mode() & 0o077 != 0 {
                out.push(Exposed {
                    path: path.clone(),
                    mode: md.mode() & 0o7777,
                });
            }
            let in_trash = rel.components().count() >= 2
                && rel
                    .components()
                    .next()
                    .is_some_and(|c| c.as_os_str() == "trash");
            if md.is_dir() && !in_trash {
                stack.push(path);
            }
        }
    }
    Ok(out)
}

/// What [`tighten`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tightened {
    /// The root's mode before, if it changed.
    pub root_was: Option<u32>,
    /// Directories whose group/other bits were removed.
    pub dirs: u64,
    /// Files (and sockets) whose group/other bits were removed.
    pub files: u64,
    /// Up to five of them (relative to the root) with their old modes, for the log.
    pub examples: Vec<String>,
}

impl Tightened {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.root_was.is_none() && self.dirs == 0 && self.files == 0
    }
}

/// Removes the group and other bits of everything [`exposed`] finds under `root` (a
/// root made by an earlier version: 0755 directories, 0644 files).
pub fn tighten(root: &Path) -> io::Result<Tightened> {
    let mut t = Tightened::default();
    for e in exposed(root)? {
        let new = e.mode & !0o077;
        match fs::set_permissions(&e.path, fs::Permissions::from_mode(new)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("{}: {err}", e.path.display()),
                ))
            }
        }
        let rel = e.path.strip_prefix(root).unwrap_or(&e.path);
        if rel.as_os_str().is_empty() {
            t.root_was = Some(e.mode);
            continue;
        }
        if e.path.is_dir() {
            t.dirs += 1;
        } else {
            t.files += 1;
        }
        if t.examples.len() < 5 {
            t.examples
                .push(format!("{} {:04o}->{new:04o}", rel.display(), e.mode));
        }
    }
    Ok(t)
}

/// The uid of the process at the other end of unix socket `fd`.
pub fn peer_uid(fd: impl AsFd) -> io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid())
}

/// Accepts a peer that is root or runs as the daemon's own user; anyone else is refused
/// with the reason (for the log).
pub fn check_peer(fd: impl AsFd) -> Result<(), String> {
    let uid = peer_uid(fd).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    allowed_uid(uid)
}

/// The rule of [`check_peer`] for `uid`.
pub fn allowed_uid(uid: u32) -> Result<(), String> {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(format!("peer uid {uid} is neither root nor dedupd's user"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exception_is_only_snapshot_upper_dirs() {
        assert!(is_exception(Path::new("snapshots/12/fs")));
        assert!(is_exception(Path::new("snapshots/12/fs/etc/shadow")));
        assert!(!is_exception(Path::new("snapshots/12/work")));
        assert!(!is_exception(Path::new("snapshots/12")));
        assert!(!is_exception(Path::new("snapshots/x/fs")));
        assert!(!is_exception(Path::new("chunks/00000001.pack")));
        assert!(!is_exception(Path::new("fanotify/blobs/fs")));
    }

    #[test]
    fn an_old_root_is_tightened_and_upper_dirs_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let mk = |p: &str, mode: u32, is_dir: bool| {
            let path = root.join(p);
            if is_dir {
                fs::create_dir_all(&path).unwrap();
            } else {
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(&path, b"x").unwrap();
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        mk("chunks/00000001.pack", 0o644, false);
        mk("layers/a.erofs", 0o644, false);
        mk("run/stats.json", 0o644, false);
        mk("snapshots/3/fs/etc/passwd", 0o644, false);
        mk("snapshots/3/fs", 0o755, true);
        mk("snapshots/3/work", 0o711, true);
        mk("trash/t-1/deep/file", 0o644, false);
        for d in [
            "chunks",
            "layers",
            "run",
            "snapshots",
            "snapshots/3",
            "trash",
            "trash/t-1",
        ] {
            mk(d, 0o755, true);
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let t = tighten(&root).unwrap();
        assert_eq!(t.root_was, Some(0o755));
        // chunks layers run snapshots snapshots/3 snapshots/3/work trash trash/t-1
        assert_eq!(t.dirs, 8, "{t:?}");
        assert_eq!(t.files, 3, "{t:?}");
        assert_eq!(t.examples.len(), 5);
        assert!(exposed(&root).unwrap().is_empty());
        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("chunks/00000001.pack"), 0o600);
        assert_eq!(
            mode("snapshots/3/fs"),
            0o755,
            "the container's / keeps its mode"
        );
        assert_eq!(mode("snapshots/3/fs/etc/passwd"), 0o644);
        assert_eq!(
            mode("trash/t-1/deep/file"),
            0o644,
            "trees being deleted are not walked"
        );
        assert!(
            tighten(&root).unwrap().is_empty(),
            "a second pass changes nothing"
        );
    }

    #[test]
    fn peers_are_root_or_our_user() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), nix::unistd::geteuid().as_raw());
        assert!(check_peer(&a).is_ok());
        assert!(allowed_uid(0).is_ok());
        let e = allowed_uid(65534).unwrap_err();
        assert!(e.contains("65534"), "{e}");
    }
}
