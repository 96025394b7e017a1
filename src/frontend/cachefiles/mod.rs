//! The cachefiles on-demand front end (fscache, `/dev/cachefiles`; the VM kernel has it).
//!
//! - Its kernel ABI (`include/uapi/linux/cachefiles.h`): the raw structs ([`abi`]), the
//!   checked message parser ([`msg`]), the text commands the daemon writes, and the
//!   [`Device`] trait that stands for `/dev/cachefiles` (real: [`CachefilesDevice`];
//!   simulated: `serve::sim::Sim`). This file.
//! - The front end the serving engine drives: OPEN, READ, CLOSE ([`front`]).
//! - The snapshotter's way in: `mount -t erofs none -o fsid=...` ([`FscacheMounter`]).
//! - Failover: the holder that keeps the bound device fd across daemons ([`holder`]),
//!   the systemd fd store and the takeover with `restore` ([`failover`]).
//! - Space: culling the cache files of removed layers ([`cull`]).

pub mod abi;
pub mod cull;
pub mod failover;
pub mod front;
pub mod holder;
mod mounter;
pub mod msg;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

pub use self::mounter::FscacheMounter;
pub use self::msg::{parse, Msg, MsgError};

/// Path of the device.
pub const DEVICE_PATH: &str = "/dev/cachefiles";

/// A text command written to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `dir <path>`: the cache directory (once, before bind).
    Dir(PathBuf),
    /// `tag <name>`: the cache's tag.
    Tag(String),
    /// `bind ondemand`: start the cache in on-demand mode.
    BindOndemand,
    /// `copen <msg_id>,<size>`: answers an OPEN with the object's size.
    Copen {
        /// The OPEN's request id.
        msg_id: u32,
        /// Size in bytes, or the errno (positive, 1..=4095) that fails the OPEN.
        size: Result<u64, i32>,
    },
    /// `restore`: a new daemon takes over objects of a previous one.
    Restore,
    /// `cull <name>`: removes the unused cache entry `name` of the writer's current
    /// directory (see [`cull`]).
    Cull(String),
}

/// A command that cannot be expressed (the kernel would refuse it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// A path or tag holds a NUL, newline or (for a tag) whitespace, or is empty.
    #[error("{what} {value:?} cannot be sent to the device (empty, NUL, newline or space)")]
    BadArgument {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// The errno of a failing copen is outside 1..=4095.
    #[error("copen errno {0} is outside 1..=4095")]
    BadErrno(i32),
    /// A size that does not fit the kernel's signed 64-bit parse.
    #[error("copen size {0} exceeds i64::MAX")]
    BadSize(u64),
}

impl Command {
    /// The bytes to write (no NUL; the kernel's parser takes an optional newline).
    pub fn to_bytes(&self) -> Result<Vec<u8>, CommandError> {
        let bad = |what, value: &str| CommandError::BadArgument {
            what,
            value: value.to_string(),
        };
        Ok(match self {
            Command::Dir(p) => {
                let s = p.to_string_lossy();
                if s.is_empty() || s.contains(['\0', '\n']) || p.to_str().is_none() {
                    return Err(bad("cache dir", &s));
                }
                format!("dir {s}").into_bytes()
            }
            Command::Tag(t) => {
                if t.is_empty() || t.contains(|c: char| c == '\0' || c.is_whitespace()) {
                    return Err(bad("tag", t));
                }
                format!("tag {t}").into_bytes()
            }
            Command::BindOndemand => b"bind ondemand".to_vec(),
            Command::Copen { msg_id, size } => match size {
                Ok(n) => {
                    if *n > i64::MAX as u64 {
                        return Err(CommandError::BadSize(*n));
                    }
                    format!("copen {msg_id},{n}").into_bytes()
                }
                Err(e) => {
                    if !(1..=4095).contains(e) {
                        return Err(CommandError::BadErrno(*e));
                    }
                    format!("copen {msg_id},-{e}").into_bytes()
                }
            },
            Command::Restore => b"restore".to_vec(),
            Command::Cull(name) => {
                if name.is_empty()
                    || name == "."
                    || name == ".."
                    || name.contains(|c: char| c == '/' || c == '\0' || c.is_whitespace())
                {
                    return Err(bad("cull name", name));
                }
                format!("cull {name}").into_bytes()
            }
        })
    }
}

/// Parses a `copen` command back (the simulator's side of the protocol).
pub fn parse_copen(cmd: &[u8]) -> Option<(u32, Result<u64, i32>)> {
    let s = std::str::from_utf8(cmd).ok()?.trim_end_matches('\n');
    let args = s.strip_prefix("copen ")?;
    let (id, size) = args.split_once(',')?;
    let id = id.parse().ok()?;
    let size: i64 = size.parse().ok()?;
    Some((
        id,
        if size < 0 {
            Err(i32::try_from(-size).ok().filter(|e| *e <= 4095)?)
        } else {
            Ok(size as u64)
        },
    ))
}

/// What the engine needs from `/dev/cachefiles`: the real device or the simulator. The
/// engine does not know which it talks to.
pub trait Device: Send + Sync {
    /// An fd that polls readable (EPOLLIN) when messages may be queued.
    fn poll_fd(&self) -> RawFd;
    /// Reads one message into `buf` (at least [`abi::CACHEFILES_MSG_MAX_SIZE`] bytes).
    /// `Ok(0)` means nothing is queued. An OPEN installs an fd that the caller owns.
    fn read_msg(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one text command.
    fn write_cmd(&self, cmd: &[u8]) -> io::Result<()>;
    /// Completes READ `msg_id` on the object's anon fd. `EINVAL` means the request is
    /// gone (reader killed, object closed): callers ignore it.
    fn complete_read(&self, anon_fd: RawFd, msg_id: u32) -> io::Result<()>;
}

/// Sends a [`Command`] to a device.
pub fn send(dev: &dyn Device, cmd: &Command) -> io::Result<()> {
    let bytes = cmd
        .to_bytes()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    dev.write_cmd(&bytes)
}

/// The real `/dev/cachefiles`. Needs CAP_SYS_ADMIN; one open system-wide.
pub struct CachefilesDevice {
    file: File,
}

impl CachefilesDevice {
    /// Opens the device (EBUSY if another daemon holds it).
    pub fn open(path: &Path) -> io::Result<CachefilesDevice> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(CachefilesDevice { file })
    }

    /// Wraps an fd handed over by a holder process (failover); write `restore` next.
    pub fn from_file(file: File) -> CachefilesDevice {
        CachefilesDevice { file }
    }

    /// `dir`, `tag`, `bind ondemand`: the set-up sequence of a fresh cache.
    pub fn bind(&self, cache_dir: &Path, tag: &str) -> io::Result<()> {
        send(self, &Command::Dir(cache_dir.to_path_buf()))?;
        send(self, &Command::Tag(tag.to_string()))?;
        send(self, &Command::BindOndemand)
    }
}

impl AsFd for CachefilesDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for CachefilesDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Device for CachefilesDevice {
    fn poll_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn read_msg(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.file).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_cmd(&self, cmd: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(cmd)?;
        if n != cmd.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short command write to /dev/cachefiles",
            ));
        }
        Ok(())
    }

    fn complete_read(&self, anon_fd: RawFd, msg_id: u32) -> io::Result<()> {
        ioctl_read_complete(anon_fd, msg_id)
    }
}

/// `ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)`, the id passed by value.
pub fn ioctl_read_complete(anon_fd: RawFd, msg_id: u32) -> io::Result<()> {
    // SAFETY: this ioctl takes its argument by value (an integer, not a pointer), so no
    // memory is shared with the kernel; an invalid fd only yields EBADF.
    let r = unsafe {
        libc::ioctl(
            anon_fd,
            abi::CACHEFILES_IOC_READ_COMPLETE as libc::Ioctl,
            libc::c_ulong::from(msg_id),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_render_as_the_kernel_parses_them() {
        let b = |c: Command| String::from_utf8(c.to_bytes().unwrap()).unwrap();
        assert_eq!(b(Command::Dir("/var/cache".into())), "dir /var/cache");
        assert_eq!(b(Command::Tag("dedupd".into())), "tag dedupd");
        assert_eq!(b(Command::BindOndemand), "bind ondemand");
        assert_eq!(
            b(Command::Copen {
                msg_id: 5,
                size: Ok(8192)
            }),
            "copen 5,8192"
        );
        assert_eq!(
            b(Command::Copen {
                msg_id: 6,
                size: Err(2)
            }),
            "copen 6,-2"
        );
        assert_eq!(b(Command::Restore), "restore");
        assert_eq!(b(Command::Cull("Dab".into())), "cull Dab");
        for bad in ["", "..", "a/b", "a b", "a\nb"] {
            assert!(Command::Cull(bad.into()).to_bytes().is_err(), "{bad:?}");
        }
        assert!(Command::Tag("a b".into()).to_bytes().is_err());
        assert!(Command::Dir("/a\nb".into()).to_bytes().is_err());
        assert!(Command::Copen {
            msg_id: 1,
            size: Err(0)
        }
        .to_bytes()
        .is_err());
        assert_eq!(parse_copen(b"copen 5,8192"), Some((5, Ok(8192))));
        assert_eq!(parse_copen(b"copen 6,-2"), Some((6, Err(2))));
        assert_eq!(parse_copen(b"copen x,1"), None);
    }

    #[test]
    fn read_complete_on_a_plain_file_is_refused_not_fatal() {
        let f = tempfile::tempfile().unwrap();
        assert!(ioctl_read_complete(f.as_raw_fd(), 1).is_err());
    }
}
