//! The in-flight journal: a small shared-memory table (a memfd created by the holder,
//! mapped by the holder and by every daemon in turn) where a worker records each
//! permission event it has read and not yet answered: the event's fd number, the blob
//! and the range.
//!
//! Why: the kernel matches a response to a pending event by the fd *number* the reader
//! got, whichever process writes it, and a pending event stays pending while any fd of
//! the group lives. When a daemon dies between reading an event and answering it, its
//! successor (or the holder, failing closed) reads this table and answers each entry:
//! it fills the range and allows, or denies with EIO. Events read but not yet journaled
//! (a window of a few instructions after `read(2)`) are found by probing every fd number
//! below the dead daemon's fd limit with a deny; the kernel answers ENOENT for numbers
//! with no pending event.
//!
//! Layout: a 64-byte header, then [`SLOTS`] slots of 8 little-endian u64 words:
//! `[state | fd << 32, offset, count, blob id (4 words), 0]`. A slot is written with
//! its state word last (release) and cleared after the response is written, before the
//! event fd is closed, so live slots always have distinct fd numbers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Number of slots: workers x events per read.
pub const SLOTS: usize = 1024;
/// Words per slot.
const SLOT_WORDS: usize = 8;
/// Header words.
const HEADER_WORDS: usize = 8;
/// Total bytes of the shared table.
pub const JOURNAL_BYTES: usize = (HEADER_WORDS + SLOTS * SLOT_WORDS) * 8;
/// Header magic ("DDFJRNL1").
const MAGIC: u64 = u64::from_le_bytes(*b"DDFJRNL1");
/// Slot state: free.
const FREE: u64 = 0;
/// Slot state: an event is in flight.
const LIVE: u64 = 1;

/// A journaled in-flight event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The event's fd number in the reader's table.
    pub fd: i32,
    /// Range offset.
    pub offset: u64,
    /// Range length.
    pub count: u64,
    /// Blob id (BLAKE3, binary); all zeros when the blob was not identified.
    pub blob: [u8; 32],
}

/// The mapped journal.
pub struct Journal {
    words: *const AtomicU64,
    _fd: OwnedFd,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the pointer stays
// valid until Drop unmaps it, and the struct owns the mapping.
unsafe impl Send for Journal {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Journal {}

impl Journal {
    /// Creates a new zeroed journal memfd (the holder does this once per group).
    pub fn create() -> io::Result<OwnedFd> {
        // SAFETY: the name is a NUL-terminated literal; on success the fd is new.
        let fd =
            unsafe { libc::memfd_create(c"dedupd-fanotify-journal".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a valid fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), JOURNAL_BYTES as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let j = Journal::map(fd.try_clone()?)?;
        j.word(0).store(MAGIC, Ordering::Release);
        Ok(fd)
    }

    /// Maps the journal memfd `fd`.
    pub fn map(fd: OwnedFd) -> io::Result<Journal> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes into `st` on success; fd is valid.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded, so `st` is initialized.
        let size = unsafe { st.assume_init() }.st_size;
        if size != JOURNAL_BYTES as i64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("journal memfd is {size} bytes, expected {JOURNAL_BYTES}"),
            ));
        }
        // SAFETY: mapping a file of exactly JOURNAL_BYTES, shared, read-write; the result
        // is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                JOURNAL_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let j = Journal {
            words: p as *const AtomicU64,
            _fd: fd,
        };
        let magic = j.word(0).load(Ordering::Acquire);
        if magic != MAGIC && magic != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "journal has a bad magic",
            ));
        }
        Ok(j)
    }

    /// The memfd, to pass on.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._fd.as_fd()
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < JOURNAL_BYTES / 8);
        // SAFETY: `i` is inside the mapping (checked above); the mapping is page-aligned
        // so every word is 8-byte aligned, and lives as long as `self`.
        unsafe { &*self.words.add(i) }
    }

    fn slot_word(&self, slot: usize, w: usize) -> &AtomicU64 {
        assert!(slot < SLOTS && w < SLOT_WORDS);
        self.word(HEADER_WORDS + slot * SLOT_WORDS + w)
    }

    /// Highest fd number (exclusive) any daemon of this group may have had; raised by
    /// each daemon at start (never lowered), read by whoever recovers.
    pub fn probe_fd_limit(&self) -> u64 {
        self.word(1).load(Ordering::Acquire)
    }

    /// Raises the probe limit to at least `limit`.
    pub fn raise_probe_fd_limit(&self, limit: u64) {
        self.word(1).fetch_max(limit, Ordering::AcqRel);
    }

    /// Records an in-flight event in `slot`.
    pub fn record(&self, slot: usize, e: &Entry) {
        self.slot_word(slot, 1).store(e.offset, Ordering::Relaxed);
        self.slot_word(slot, 2).store(e.count, Ordering::Relaxed);
        for k in 0..4 {
            let w = u64::from_le_bytes(e.blob[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            self.slot_word(slot, 3 + k).store(w, Ordering::Relaxed);
        }
        self.slot_word(slot, 0)
            .store(LIVE | (u64::from(e.fd as u32) << 32), Ordering::Release);
    }

    /// Frees `slot` (after its response was written).
    pub fn clear(&self, slot: usize) {
        self.slot_word(slot, 0).store(FREE, Ordering::Release);
    }

    /// Every live slot.
    pub fn live(&self) -> Vec<(usize, Entry)> {
        let mut out = Vec::new();
        for slot in 0..SLOTS {
            let s = self.slot_word(slot, 0).load(Ordering::Acquire);
            if s & 0xffff_ffff != LIVE {
                continue;
            }
            let mut blob = [0u8; 32];
            for k in 0..4 {
                let w = self.slot_word(slot, 3 + k).load(Ordering::Relaxed);
                blob[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            out.push((
                slot,
                Entry {
                    fd: (s >> 32) as u32 as i32,
                    offset: self.slot_word(slot, 1).load(Ordering::Relaxed),
                    count: self.slot_word(slot, 2).load(Ordering::Relaxed),
                    blob,
                },
            ));
        }
        out
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives
        // `self` (all accessors borrow `self`).
        unsafe {
            libc::munmap(self.words as *mut libc::c_void, JOURNAL_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_second_mapping() {
        let fd = Journal::create().unwrap();
        let a = Journal::map(fd.try_clone().unwrap()).unwrap();
        let e = Entry {
            fd: 1234,
            offset: 1 << 40,
            count: 65536,
            blob: [7u8; 32],
        };
        a.record(3, &e);
        a.record(SLOTS - 1, &Entry { fd: -5, ..e });
        a.raise_probe_fd_limit(4096);
        a.raise_probe_fd_limit(100);
        drop(a);
        let b = Journal::map(fd).unwrap();
        assert_eq!(b.live(), vec![(3, e), (SLOTS - 1, Entry { fd: -5, ..e })]);
        assert_eq!(b.probe_fd_limit(), 4096);
        b.clear(3);
        assert_eq!(b.live().len(), 1);
    }
}
