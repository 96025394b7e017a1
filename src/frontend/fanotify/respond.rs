//! Writing a batch's responses and closing its event fds: plain syscalls, or batched
//! through a private io_uring of the engine thread (measured in `bench/fanotify.rs`:
//! about half the cost per event on this machine).
//!
//! Order, for crash safety (see [`super::journal`]): a journal slot is cleared only
//! after its response was written, and its event fd is closed only after the slot was
//! cleared. So live slots never share an fd number.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use io_uring::{opcode, types, IoUring};

use super::journal::Journal;
use super::sys;
use super::EVENTS_PER_READ;

/// One answered event waiting for its write to complete.
#[derive(Clone, Copy)]
struct Pending {
    slot: usize,
    fd: i32,
}

/// Answers events, one worker's worth.
pub struct Responder {
    ring: Option<IoUring>,
    /// Response structs the in-flight writes point at: stable until [`Responder::finish`].
    bufs: Box<[sys::Response; EVENTS_PER_READ]>,
    pending: Vec<Pending>,
    /// Writes pushed but not yet submitted.
    unsubmitted: usize,
}

impl Responder {
    /// With `uring`, batches through a private io_uring (plain syscalls if the kernel
    /// refuses one).
    pub fn new(uring: bool) -> Responder {
        let ring = if uring {
            match IoUring::new(2 * EVENTS_PER_READ as u32) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}); answering with write(2)");
                    None
                }
            }
        } else {
            None
        };
        Responder {
            ring,
            bufs: Box::new(
                [sys::Response {
                    fd: -1,
                    response: 0,
                }; EVENTS_PER_READ],
            ),
            pending: Vec::with_capacity(EVENTS_PER_READ),
            unsubmitted: 0,
        }
    }

    /// Answers the event with fd `fd`, journaled in `slot`. Plain: at once. io_uring:
    /// queued until [`Responder::flush`] or [`Responder::finish`].
    pub fn answer(
        &mut self,
        group: BorrowedFd<'_>,
        journal: &Journal,
        slot: usize,
        fd: i32,
        response: u32,
    ) {
        let Some(ring) = self.ring.as_mut() else {
            if let Err(e) = sys::respond(group, fd, response) {
                tracing::error!(fd, "fanotify response: {e}");
            }
            journal.clear(slot);
            // SAFETY: the event fd is ours (installed by our read) and closed once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            return;
        };
        let k = self.pending.len();
        assert!(k < EVENTS_PER_READ, "more answers than events per read");
        self.bufs[k] = sys::Response { fd, response };
        let sqe = opcode::Write::new(
            types::Fd(group.as_raw_fd()),
            (&self.bufs[k] as *const sys::Response).cast(),
            std::mem::size_of::<sys::Response>() as u32,
        )
        .build()
        .user_data(k as u64);
        // SAFETY: `bufs[k]` stays in place (boxed, not touched) until `finish` reaped
        // this write; the ring has 2 x EVENTS_PER_READ entries and at most
        // EVENTS_PER_READ writes are queued.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            let _ = ring.submit();
            // SAFETY: as above; the queue was just drained by submit.
            let _ = unsafe { ring.submission().push(&sqe) };
        }
        self.pending.push(Pending { slot, fd });
        self.unsubmitted += 1;
    }

    /// Submits the queued writes without waiting (before a long fill, so that readers
    /// answered so far are not delayed by it).
    pub fn flush(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            if self.unsubmitted > 0 && ring.submit().is_ok() {
                self.unsubmitted = 0;
            }
        }
    }

    /// Waits for every queued write, clears the journal slots, closes the event fds.
    pub fn finish(&mut self, group: BorrowedFd<'_>, journal: &Journal) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let n = self.pending.len();
        if n == 0 {
            return;
        }
        let mut done = vec![false; n];
        let mut reaped = 0;
        // Bounded: each round reaps at least one completion or gives up.
        while reaped < n {
            if let Err(e) = ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!("io_uring wait: {e}");
                break;
            }
            for cqe in ring.completion() {
                let k = cqe.user_data() as usize;
                if k < n && !done[k] {
                    done[k] = true;
                    reaped += 1;
                    let r = cqe.result();
                    if r < 0 && r != -libc::ENOENT {
                        // Retry synchronously; an unanswered event would hang a reader.
                        let b = self.bufs[k];
                        if let Err(e) = sys::respond(group, b.fd, b.response) {
                            tracing::error!(fd = b.fd, "fanotify response: {e}");
                        }
                    }
                }
            }
        }
        for (k, p) in self.pending.iter().enumerate() {
            if !done[k] {
                let b = self.bufs[k];
                let _ = sys::respond(group, b.fd, b.response);
            }
            journal.clear(p.slot);
            // SAFETY: the event fd is ours (installed by our read), its response is
            // written and its slot cleared; closed exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(p.fd) });
        }
        self.pending.clear();
        self.unsubmitted = 0;
    }
}
