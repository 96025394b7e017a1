//! EROFS file-backed mounts with data blobs as extra devices.
//!
//! The equivalent command line is
//! `mount -t erofs -o ro,device=BLOB1[,device=BLOB2...] IMAGE MNT`, issued as mount(2)
//! on the image file itself (Linux 6.12+ mounts EROFS directly from a regular file;
//! util-linux `mount` would set up a loop device instead).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Mounts image `image` read-only at `mnt` with `devices` as its data blobs, in device
/// table order.
pub fn mount_erofs(image: &Path, devices: &[PathBuf], mnt: &Path) -> io::Result<()> {
    let mut data = String::new();
    for d in devices {
        let s = d.to_str().filter(|s| !s.contains(',')).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("blob path {} cannot be passed as device=", d.display()),
            )
        })?;
        if !data.is_empty() {
            data.push(',');
        }
        data.push_str("device=");
        data.push_str(s);
    }
    std::fs::create_dir_all(mnt)?;
    nix::mount::mount(
        Some(image),
        mnt,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("mounting {} on {}: {e}", image.display(), mnt.display()),
        )
    })
}

/// Whether something is mounted exactly at `mnt`.
pub fn is_mounted(mnt: &Path) -> bool {
    let Ok(mnt) = mnt.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mnt.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| p == want)
}

/// Unmounts `mnt`; with `detach`, lazily (MNT_DETACH).
pub fn unmount(mnt: &Path, detach: bool) -> io::Result<()> {
    let flags = if detach {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    nix::mount::umount2(mnt, flags).map_err(io::Error::from)
}

/// Unmounts `mnt`, retrying while it is busy for up to `tries` x 100 ms.
pub fn unmount_retry(mnt: &Path, tries: u32) -> io::Result<()> {
    let mut last = None;
    for _ in 0..tries.max(1) {
        match unmount(mnt, false) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one try"))
}

/// Unmounts on drop (tests and CLI error paths).
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) && unmount_retry(&self.0, 20).is_err() {
            let _ = unmount(&self.0, true);
        }
    }
}
