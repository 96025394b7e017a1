//! Freeing the cache files of layers and blobs that are gone, through the device's `cull`
//! command.
//!
//! The kernel lays the cache out as `<dir>/cache/I<volume key>/@<xx>/D<cookie key>`:
//! one volume per mount (`erofs,<fsid>`, or `erofs,<domain_id>` shared by a domain), 256
//! fan-out directories, and one file per cookie (the layer's image under its fsid, each
//! data blob under its id). Only the daemon may remove them while the cache is bound:
//! `cull <name>` removes `name` from the daemon's *current directory*, and answers
//! `EBUSY` for an object in use. A culled directory goes to `<dir>/graveyard`, which the
//! daemon empties.
//!
//! The current directory belongs to the process, so culling runs on a thread of its own
//! that first unshares its filesystem context (`unshare(CLONE_FS)`): the daemon's other
//! threads never see the directory change.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{send, Command, Device};

/// Volume key prefix of EROFS mounts.
const EROFS_VOLUME_PREFIX: &str = "Ierofs,";
/// Entries looked at per directory, so that a huge or hostile cache cannot stall us.
const MAX_ENTRIES_PER_DIR: usize = 1 << 20;

/// What one pass freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CullReport {
    /// Whole volume directories of layers that are gone.
    pub volumes: u64,
    /// Cache files of blobs that are gone, inside volumes still in use.
    pub files: u64,
    /// Dead entries the kernel still uses (`EBUSY`); a later pass frees them.
    pub busy: u64,
    /// Entries removed from the graveyard.
    pub graveyard: u64,
}

/// Culls, under the cache directory `cache_dir` (the one given to `dir`), every volume
/// of a layer and every file of a blob for which `live` is false. Names that are not a
/// 64-digit hex id are never touched.
pub fn cull_dead(
    dev: &dyn Device,
    cache_dir: &Path,
    live: &(dyn Fn(&str) -> bool + Sync),
) -> io::Result<CullReport> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) with CLONE_FS only gives this thread a private copy of
            // its cwd/root/umask; no memory is involved.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(io::Error::last_os_error());
            }
            cull_on_own_cwd(dev, cache_dir, live)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the cull thread panicked")))
    })
}

fn cull_on_own_cwd(
    dev: &dyn Device,
    cache_dir: &Path,
    live: &(dyn Fn(&str) -> bool + Sync),
) -> io::Result<CullReport> {
    let mut r = CullReport::default();
    let volumes = cache_dir.join("cache");
    for vol in entries(&volumes)? {
        let Some(name) = vol.file_name().and_then(OsStr::to_str) else {
            continue;
        };
        let Some(key) = name.strip_prefix(EROFS_VOLUME_PREFIX) else {
            continue;
        };
        if is_id(key) && !live(key) {
            if cull(dev, &volumes, name, &mut r)? {
                r.volumes += 1;
            }
            continue;
        }
        // A live layer's volume, or a domain's: only dead blobs go.
        for fan in entries(&vol)? {
            if !fan
                .file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with('@'))
            {
                continue;
            }
            for f in entries(&fan)? {
                let Some(fname) = f.file_name().and_then(OsStr::to_str) else {
                    continue;
                };
                let dead = fname
                    .strip_prefix('D')
                    .is_some_and(|k| is_id(k) && !live(k));
                if dead && cull(dev, &fan, fname, &mut r)? {
                    r.files += 1;
                }
            }
        }
    }
    for g in entries(&cache_dir.join("graveyard"))? {
        let gone = match fs::symlink_metadata(&g) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&g),
            Ok(_) => fs::remove_file(&g),
            Err(e) => Err(e),
        };
        match gone {
            Ok(()) => r.graveyard += 1,
            Err(e) => tracing::warn!(path = %g.display(), "emptying the cache graveyard: {e}"),
        }
    }
    Ok(r)
}

/// Allocated bytes of the cache files under `cache_dir` whose cookie key `wanted`
/// accepts, summed by key over every EROFS volume. Only files the kernel has linked into
/// the directory are seen: the objects of a mounted layer are not, until it is
/// unmounted (see `CachefilesFront::open_data_bytes`). `listings` keeps what the walk
/// listed, so that the next one reads only the directories that changed.
pub fn file_bytes_by_key(
    cache_dir: &Path,
    wanted: &dyn Fn(&str) -> bool,
    listings: &mut Listings,
) -> io::Result<std::collections::HashMap<String, u64>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::HashMap::new();
    let mut seen = Listings::default();
    for vol in entries(&cache_dir.join("cache"))? {
        let erofs = vol
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|n| n.starts_with(EROFS_VOLUME_PREFIX));
        if !erofs {
            continue;
        }
        let fans = listings.list(&vol, &mut seen)?;
        for fan in fans.iter().map(|n| vol.join(n)) {
            for name in listings.list(&fan, &mut seen)?.iter() {
                let Some(key) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix('D'))
                    .filter(|k| is_id(k) && wanted(k))
                else {
                    continue;
                };
                let Ok(m) = fs::symlink_metadata(fan.join(name)) else {
                    continue;
                };
                if m.is_file() {
                    *out.entry(key.to_string()).or_default() += m.blocks() * 512;
                }
            }
        }
    }
    // Directories gone since (a culled volume) are forgotten.
    *listings = seen;
    Ok(out)
}

/// The names in directories a walk listed, each with the directory's change stamp: a
/// directory whose stamp has not moved is not read again, only stat'ed. A cachefiles
/// cache has 256 fan-out directories per volume, nearly all empty and unchanging, and
/// reading each means four system calls where a stat is one.
#[derive(Default)]
pub struct Listings {
    dirs: std::collections::HashMap<PathBuf, Listing>,
}

struct Listing {
    /// Inode, mtime and ctime (seconds and nanoseconds) of the directory when listed.
    stamp: [i64; 5],
    names: std::sync::Arc<[std::ffi::OsString]>,
}

/// A listing is reused only when its directory had not changed for this long when it
/// was read: an entry added within the same timestamp tick would leave the stamp as it
/// was (the racy-timestamp rule; 2 s covers filesystems that keep whole seconds).
const LISTING_SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

impl Listings {
    /// The names in `dir` (sorted; none if it does not exist), from the last listing
    /// when `dir` has not changed since; the listing moves (or goes) to `seen`.
    fn list(
        &mut self,
        dir: &Path,
        seen: &mut Listings,
    ) -> io::Result<std::sync::Arc<[std::ffi::OsString]>> {
        use std::os::unix::fs::MetadataExt;
        // The directory's age is taken as of its stat: a listing read slowly after a
        // change in the same tick must not pass for settled.
        let now = std::time::SystemTime::now();
        let md = match fs::metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new().into()),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        let stamp = [
            md.ino() as i64,
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec(),
        ];
        if let Some((path, l)) = self.dirs.remove_entry(dir) {
            if l.stamp == stamp {
                let names = l.names.clone();
                seen.dirs.insert(path, l);
                return Ok(names);
            }
        }
        let names: std::sync::Arc<[std::ffi::OsString]> = entries(dir)?
            .into_iter()
            .filter_map(|p| p.file_name().map(OsStr::to_os_string))
            .collect();
        let settled = md
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= LISTING_SETTLED);
        if settled {
            seen.dirs.insert(
                dir.to_path_buf(),
                Listing {
                    stamp,
                    names: names.clone(),
                },
            );
        }
        Ok(names)
    }
}

/// `cull name` from `dir`. Ok(false) when the kernel still uses it or it is already gone.
fn cull(dev: &dyn Device, dir: &Path, name: &str, r: &mut CullReport) -> io::Result<bool> {
    std::env::set_current_dir(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    match send(dev, &Command::Cull(name.to_string())) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), name, "culled a cache entry nothing uses");
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            r.busy += 1;
            Ok(false)
        }
        Err(e) if e.raw_os_error() == Some(libc::ESTALE) => Ok(false),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cull {name} in {}: {e}", dir.display()),
        )),
    }
}

/// The entries of `dir` (none if it does not exist), bounded.
fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut out = Vec::new();
    for e in rd.take(MAX_ENTRIES_PER_DIR) {
        out.push(e?.path());
    }
    out.sort();
    Ok(out)
}

/// A layer or blob id: 64 lower-case hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::RawFd;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;

    /// Stands in for the kernel's side of `cull`: removes the named entry from the
    /// caller's current directory (a directory goes to the graveyard), or EBUSY.
    struct FakeKernel {
        graveyard: PathBuf,
        busy: Vec<String>,
        log: Mutex<Vec<String>>,
    }

    impl Device for FakeKernel {
        fn poll_fd(&self) -> RawFd {
            -1
        }
        fn read_msg(&self, _buf: &mut [u8]) -> io::Result<usize> {
            Ok(0)
        }
        fn write_cmd(&self, cmd: &[u8]) -> io::Result<()> {
            let text = std::str::from_utf8(cmd).unwrap();
            let name = text.strip_prefix("cull ").expect("only cull is sent");
            assert!(!name.contains('/'), "{text}");
            if self.busy.iter().any(|b| b == name) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            let cwd = std::env::current_dir()?;
            let victim = cwd.join(name);
            let m = fs::symlink_metadata(&victim)
                .map_err(|_| io::Error::from_raw_os_error(libc::ESTALE))?;
            if m.is_dir() {
                fs::rename(&victim, self.graveyard.join(format!("x{name}")))?;
            } else {
                fs::remove_file(&victim)?;
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{name}", cwd.display()));
            Ok(())
        }
        fn complete_read(&self, _fd: RawFd, _msg_id: u32) -> io::Result<()> {
            Ok(())
        }
    }

    fn id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    #[test]
    fn dead_volumes_and_blob_files_go_live_ones_and_strangers_stay() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let (l1, l2, b1, b2, b3) = (id(1), id(2), id(0xb1), id(0xb2), id(0xb3));
        let file = |p: PathBuf| {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
            p
        };
        // Layer 1 is gone (its volume goes whole), layer 2 lives; a domain volume holds a
        // live blob b1, a dead b2 and a dead-but-busy b3; a foreign volume stays.
        let v1 = file(cache.join(format!("Ierofs,{l1}/@3a/D{b1}")));
        let v2 = file(cache.join(format!("Ierofs,{l2}/@10/D{l2}")));
        let live_b1 = file(cache.join(format!("Ierofs,dom/@01/D{b1}")));
        let dead_b2 = file(cache.join(format!("Ierofs,dom/@02/D{b2}")));
        let busy_b3 = file(cache.join(format!("Ierofs,dom/@03/D{b3}")));
        let odd = file(cache.join("Ierofs,dom/@04/Dnot-an-id"));
        let foreign = file(cache.join(format!("Infs,x/@00/D{b2}")));
        fs::create_dir_all(d.path().join("graveyard")).unwrap();
        let k = FakeKernel {
            graveyard: d.path().join("graveyard"),
            busy: vec![format!("D{b3}")],
            log: Mutex::default(),
        };
        // Counted by key over the EROFS volumes only (b2 is also in a foreign one).
        let bytes = file_bytes_by_key(
            d.path(),
            &|k: &str| k == b1 || k == b2,
            &mut Listings::default(),
        )
        .unwrap();
        let one = fs::symlink_metadata(&v1).unwrap().blocks() * 512;
        assert_eq!(bytes.len(), 2, "{bytes:?}");
        assert_eq!((bytes[&b1], bytes[&b2]), (2 * one, one));
        let before = std::env::current_dir().unwrap();
        let live = |s: &str| s == l2 || s == b1;
        let r = cull_dead(&k, d.path(), &live).unwrap();
        assert_eq!(
            r,
            CullReport {
                volumes: 1,
                files: 1,
                busy: 1,
                graveyard: 1
            }
        );
        assert!(!v1.exists() && !dead_b2.exists());
        assert!(v2.exists() && live_b1.exists() && busy_b3.exists() && odd.exists());
        assert!(foreign.exists());
        assert_eq!(fs::read_dir(d.path().join("graveyard")).unwrap().count(), 0);
        // The process's current directory never moved.
        assert_eq!(std::env::current_dir().unwrap(), before);
        assert_eq!(k.log.lock().unwrap().len(), 2);
    }

    /// Sets the times of `p` to a minute ago: a directory the walk may trust unchanged.
    fn age(p: &Path) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let times = fs::FileTimes::new().set_accessed(t).set_modified(t);
        fs::File::open(p).unwrap().set_times(times).unwrap();
    }

    #[test]
    fn the_walk_reuses_unchanged_listings_and_sees_changes() {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("cache/Ierofs,dom");
        let (b1, b2) = (id(0xb1), id(0xb2));
        for fan in ["@01", "@02"] {
            fs::create_dir_all(vol.join(fan)).unwrap();
        }
        fs::write(vol.join(format!("@01/D{b1}")), vec![1u8; 8192]).unwrap();
        for p in [vol.join("@01"), vol.join("@02"), vol.clone()] {
            age(&p);
        }
        let all = |_: &str| true;
        let alloc = |p: PathBuf| fs::symlink_metadata(p).unwrap().blocks() * 512;
        let mut listings = Listings::default();
        let first = file_bytes_by_key(d.path(), &all, &mut listings).unwrap();
        assert_eq!(
            first[&b1],
            alloc(vol.join(format!("@01/D{b1}"))),
            "{first:?}"
        );
        // The volume and both fan-out directories were listed long after they changed.
        assert_eq!(listings.dirs.len(), 3);
        // A file linked into a listed directory changes its stamp: the walk reads it.
        fs::write(vol.join(format!("@02/D{b2}")), b"x").unwrap();
        let second = file_bytes_by_key(d.path(), &all, &mut listings).unwrap();
        assert!(second.contains_key(&b2), "{second:?}");
        // A file's growth needs no listing: its size is read on every walk.
        fs::write(vol.join(format!("@01/D{b1}")), vec![1u8; 65536]).unwrap();
        let third = file_bytes_by_key(d.path(), &all, &mut listings).unwrap();
        assert_eq!(
            third[&b1],
            alloc(vol.join(format!("@01/D{b1}"))),
            "{third:?}"
        );
        // A volume culled away is forgotten.
        fs::remove_dir_all(&vol).unwrap();
        assert!(file_bytes_by_key(d.path(), &all, &mut listings)
            .unwrap()
            .is_empty());
        assert!(listings.dirs.is_empty());
    }

    #[test]
    fn a_missing_cache_is_nothing_to_do() {
        let d = tempfile::tempdir().unwrap();
        let k = FakeKernel {
            graveyard: d.path().join("graveyard"),
            busy: Vec::new(),
            log: Mutex::default(),
        };
        assert_eq!(
            cull_dead(&k, d.path(), &|_| false).unwrap(),
            CullReport::default()
        );
    }
}
