//! Deleting unpacked trees off the Commit path.
//!
//! After a layer is converted, its unpacked tree is garbage, but deleting thousands of
//! files can take seconds, and containerd waits for Commit. [`Trash::discard`] renames
//! the tree into `<root>/trash` (one rename on the same filesystem) and a background
//! thread deletes it. Whatever a crash leaves there is deleted at the next start and by
//! Cleanup ([`Trash::empty`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Sender, TrySendError};

/// Trees queued for the deleting thread; beyond this, [`Trash::discard`] deletes inline.
const MAX_QUEUED: usize = 256;

/// The trash directory and its deleting thread.
pub struct Trash {
    dir: PathBuf,
    tx: Option<Sender<PathBuf>>,
    seq: AtomicU64,
}

impl Trash {
    /// Opens `<root>/trash`, deletes what an earlier run left in it, and starts the
    /// deleting thread.
    pub fn open(root: &Path) -> io::Result<Trash> {
        let dir = root.join("trash");
        fs::create_dir_all(&dir)?;
        let (tx, rx) = crossbeam_channel::bounded::<PathBuf>(MAX_QUEUED);
        let t = Trash {
            dir,
            tx: None,
            seq: AtomicU64::new(0),
        };
        t.empty();
        let spawned = std::thread::Builder::new()
            .name("dedupd-trash".into())
            .spawn(move || {
                // Ends when the Trash (the only sender) is dropped.
                for p in rx {
                    delete(&p);
                }
            });
        Ok(Trash {
            tx: spawned.ok().map(|_| tx),
            ..t
        })
    }

    /// Gets `tree` out of the way now and deletes it soon. Falls back to deleting it
    /// here when it cannot be moved (another filesystem) or the queue is full.
    pub fn discard(&self, tree: &Path) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{n}",
            tree.file_name()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        );
        let dest = self.dir.join(name);
        match fs::rename(tree, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::debug!(
                    "moving {} to the trash: {e}; deleting it here",
                    tree.display()
                );
                delete(tree);
                return;
            }
        }
        let queued = match &self.tx {
            Some(tx) => match tx.try_send(dest) {
                Ok(()) => None,
                Err(TrySendError::Full(p) | TrySendError::Disconnected(p)) => Some(p),
            },
            None => Some(dest),
        };
        if let Some(p) = queued {
            delete(&p);
        }
    }

    /// Deletes everything in the trash now (a crash's leftovers; Cleanup).
    pub fn empty(&self) -> u64 {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            delete(&e.path());
            n += 1;
        }
        n
    }
}

/// Deletes a tree, quietly when something else already did.
fn delete(p: &Path) {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("deleting {}: {e} (Cleanup will retry)", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarded_trees_disappear_and_leftovers_go_at_open() {
        let d = tempfile::tempdir().unwrap();
        let leftover = d.path().join("trash/old-1/a");
        fs::create_dir_all(&leftover).unwrap();
        fs::write(leftover.join("f"), b"x").unwrap();
        let t = Trash::open(d.path()).unwrap();
        assert!(
            !d.path().join("trash/old-1").exists(),
            "leftover deleted at open"
        );
        let tree = d.path().join("snap/fs");
        for i in 0..50 {
            fs::create_dir_all(tree.join(format!("d{i}"))).unwrap();
            fs::write(tree.join(format!("d{i}/f")), b"data").unwrap();
        }
        t.discard(&d.path().join("snap"));
        assert!(!d.path().join("snap").exists(), "moved away at once");
        // The thread deletes it soon; bounded wait.
        for _ in 0..500 {
            if fs::read_dir(d.path().join("trash"))
                .unwrap()
                .next()
                .is_none()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the trash was not emptied in 5 s");
    }

    #[test]
    fn a_missing_tree_is_nothing_to_do() {
        let d = tempfile::tempdir().unwrap();
        let t = Trash::open(d.path()).unwrap();
        t.discard(&d.path().join("absent"));
        assert_eq!(t.empty(), 0);
    }
}
