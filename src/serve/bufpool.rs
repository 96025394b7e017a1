//! A thread's fixed set of page-aligned buffers, mapped once at start and registered
//! with its io_uring. The mapping is anonymous and faulted in only where a slot is used
//! (an aligned zeroed allocation would be written whole, and so resident, at start).
//! Slot `count` (the last) is a read-only zero buffer for zero-fill writes, of which only
//! the first [`ZERO_BYTES`] are used; it is never handed out.

use std::ptr::NonNull;

/// Alignment of every slot: a page, as O_DIRECT writes to the cache file need.
pub const ALIGN_BYTES: usize = 4096;
/// The zero slot's usable (and registered) bytes at most. Registering pins, and so makes
/// resident, what it covers, so the zero slot is kept small: a zero-fill is written in
/// pieces of this size.
pub const ZERO_BYTES: usize = 128 << 10;

/// Fixed, page-aligned buffer slots with a free list.
pub struct BufPool {
    base: NonNull<u8>,
    /// Bytes mapped.
    total: usize,
    slot_bytes: usize,
    count: usize,
    free: Vec<u16>,
}

// SAFETY: the pool exclusively owns its allocation; it is moved to, and used by, one
// engine thread.
unsafe impl Send for BufPool {}

impl BufPool {
    /// Allocates `count` slots of `slot_bytes` (rounded up to a page) plus the zero slot.
    /// Panics on configuration errors checked by the engine before calling, and when the
    /// memory cannot be mapped.
    pub fn new(count: usize, slot_bytes: usize) -> BufPool {
        assert!(
            count >= 2 && count < u16::MAX as usize,
            "buffer count {count}"
        );
        let slot_bytes = slot_bytes.div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        let total = slot_bytes
            .checked_mul(count + 1)
            .expect("buffer pool size overflows");
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        // Zero-filled and page-aligned by mmap; a failure is out of memory.
        let base = match NonNull::new(ptr.cast::<u8>()) {
            Some(b) if ptr != libc::MAP_FAILED => b,
            _ => panic!(
                "mapping {total} bytes of buffers: {}",
                std::io::Error::last_os_error()
            ),
        };
        BufPool {
            base,
            total,
            slot_bytes,
            count,
            free: (0..count as u16).rev().collect(),
        }
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Index of the zero slot (also its registered buffer index).
    pub fn zero_index(&self) -> u16 {
        self.count as u16
    }

    /// Bytes of the zero slot a write may use.
    pub fn zero_bytes(&self) -> usize {
        self.slot_bytes.min(ZERO_BYTES)
    }

    /// Free slots.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Takes a free slot.
    pub fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns a slot; the caller no longer uses it and no I/O targets it.
    pub fn give(&mut self, i: u16) {
        debug_assert!((i as usize) < self.count && !self.free.contains(&i));
        self.free.push(i);
    }

    /// Start address of slot `i` (the zero slot included), for SQEs.
    pub fn ptr(&self, i: u16) -> *mut u8 {
        assert!((i as usize) <= self.count);
        // SAFETY: i <= count, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(i as usize * self.slot_bytes) }
    }

    /// One iovec per slot, the zero slot last, for `register_buffers`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..=self.count as u16).map(|i| self.iovec(i)).collect()
    }

    /// The iovec of slot `i` (`i == zero_index()` for the zero slot: its first
    /// [`BufPool::zero_bytes`] only).
    pub fn iovec(&self, i: u16) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr(i).cast(),
            iov_len: if i == self.zero_index() {
                self.zero_bytes()
            } else {
                self.slot_bytes
            },
        }
    }

    /// Slot `i` mutably. The caller must own the slot (taken, no I/O in flight on it).
    pub fn slot_mut(&mut self, i: u16) -> &mut [u8] {
        assert!((i as usize) < self.count);
        // SAFETY: the slot lies inside the allocation; `&mut self` excludes any other
        // reference made through the pool; the caller owns the slot and no SQE targets
        // it while the borrow lives (the engine only borrows slots between CQEs).
        unsafe { std::slice::from_raw_parts_mut(self.ptr(i), self.slot_bytes) }
    }

    /// Two distinct owned slots: `a` to read, `b` to write.
    pub fn pair_mut(&mut self, a: u16, b: u16) -> (&[u8], &mut [u8]) {
        assert!(a != b && (a as usize) < self.count && (b as usize) < self.count);
        // SAFETY: a != b so the two slices do not overlap; both lie inside the
        // allocation; ownership as for `slot_mut`.
        unsafe {
            (
                std::slice::from_raw_parts(self.ptr(a), self.slot_bytes),
                std::slice::from_raw_parts_mut(self.ptr(b), self.slot_bytes),
            )
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; the engine drops the pool only after
        // its ring (and every operation on these buffers) is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.total) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_distinct_and_recycled() {
        let mut p = BufPool::new(3, 5000);
        assert_eq!(p.slot_bytes(), 8192);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_ne!(a, b);
        assert_eq!(p.ptr(a) as usize % ALIGN_BYTES, 0);
        let (ra, wb) = p.pair_mut(a, b);
        wb[0] = ra[0] + 1;
        assert_eq!(p.slot_mut(b)[0], 1);
        p.give(a);
        assert_eq!(p.available(), 2);
        assert_eq!(p.iovecs().len(), 4);
        assert_eq!(p.iovec(p.zero_index()).iov_len, 8192);
        let big = BufPool::new(3, 1 << 20);
        assert_eq!(big.iovec(big.zero_index()).iov_len, ZERO_BYTES);
        assert_eq!(big.iovec(0).iov_len, 1 << 20);
    }
}
