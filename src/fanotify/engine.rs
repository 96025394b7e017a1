//! The fanotify front end as a [`crate::serve::FrontEnd`]: the serving engine's threads
//! read the group, and its workers (registered buffers, `decode_record` verification,
//! io_uring or synchronous writes, bounded in-flight requests) do every fill, for this
//! front end as for cachefiles.
//!
//! Per engine thread ([`Local`]): a slice of [`SLOTS_PER_THREAD`] journal slots, a queue
//! of events read but not yet handed out, a [`Responder`] that batches the answers of
//! events needing no fill through the thread's io_uring, and a queue of prefetch ranges.
//!
//! - `next`: hands out queued events first. One whose range is filled already (per the
//!   page map) is answered at once, without touching the store; one that needs data
//!   becomes a [`FillRequest`] for the slot-aligned cover of its missing chunks, into
//!   the event's fd. With the queue empty, a pending prefetch becomes a fill request
//!   into the blob's kept write fd (no event, no answer). Otherwise one `read(2)` of at
//!   most as many events as there are free slots; each event is journaled at once.
//! - `complete`: on success the page map gets the request's pages (only now: the
//!   writes have landed) and a complete blob is unmarked; the event is answered
//!   `FAN_ALLOW`, or `FAN_DENY_ERRNO(EIO)` on failure, its journal slot cleared, and
//!   then the engine drops the request, closing the event fd: response -> slot cleared
//!   -> fd closed, the order recovery relies on.
//! - When an engine thread ends, events it read but did not hand out are filled
//!   synchronously ([`super::fill::PackFiller`], the same `decode_record` step) and
//!   answered, so that nothing read is left unanswered.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::blobfile::PAGE_BYTES;
use super::event::{self, Event};
use super::fill::PackFiller;
use super::journal::Entry;
use super::respond::Responder;
use super::{
    sys, Answer, Shared, EVENTS_PER_READ, MAX_WORKERS, PREFETCH_BYTES, PREFETCH_QUEUE,
    SLOTS_PER_THREAD,
};
use crate::serve::{FillOutcome, FillRequest, FillSource, FrontEnd, Next, ThreadCounters};

/// Completion token of a fill request.
pub enum Token {
    /// A permission event waiting for `[start, stop)` of blob `bi`.
    Event {
        /// Its journal slot.
        slot: usize,
        /// Blob index.
        bi: usize,
        /// Slot-aligned range the request writes.
        start: u64,
        /// End of it.
        stop: u64,
    },
    /// A prefetch of `[start, stop)` of blob `bi` through its kept write fd.
    Prefetch {
        /// Blob index.
        bi: usize,
        /// Slot-aligned range the request writes.
        start: u64,
        /// End of it.
        stop: u64,
    },
}

/// One event read and journaled, not yet handed to the engine.
struct Queued {
    slot: usize,
    ev: Event,
    blob: Option<usize>,
}

/// Per engine thread state.
pub struct Local {
    shared: Arc<Shared>,
    buf: Vec<u8>,
    evs: Vec<Event>,
    queue: VecDeque<Queued>,
    /// Free journal slots of this thread.
    free: Vec<usize>,
    /// Slots of answers queued in the responder (freed once it finished).
    answered: Vec<usize>,
    responder: Responder,
    prefetch: VecDeque<(usize, u64, u64)>,
}

impl Local {
    /// Writes the queued answers, clears their slots, closes their fds.
    fn flush_answers(&mut self) {
        if self.answered.is_empty() {
            return;
        }
        self.responder
            .finish(self.shared.group.as_fd(), &self.shared.journal);
        self.free.append(&mut self.answered);
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.flush_answers();
        if self.queue.is_empty() {
            return;
        }
        let mut filler = PackFiller::new(self.shared.packs.clone());
        for q in std::mem::take(&mut self.queue) {
            self.shared.answer_now(q.slot, &q.ev, q.blob, &mut filler);
        }
    }
}

impl Shared {
    /// The slot-aligned cover of the chunks of `[offset, offset + count)` of blob `bi`
    /// that have a missing page; None when every page of the range is filled.
    fn missing_cover(&self, bi: usize, offset: u64, count: u64) -> Option<(u64, u64)> {
        let b = &self.blobs[bi];
        let end = offset.saturating_add(count).min(b.table.size_bytes());
        if offset >= end || b.map.all(offset / PAGE_BYTES, end.div_ceil(PAGE_BYTES)) {
            return None;
        }
        let entries = b.table.overlapping(offset, end - offset);
        let missing = |e: &&crate::store::BlobEntry| {
            !b.map.all(
                e.blob_offset / PAGE_BYTES,
                (e.blob_offset + e.slot_len()) / PAGE_BYTES,
            )
        };
        let first = entries.iter().find(missing)?;
        let last = entries.iter().rev().find(missing)?;
        Some((first.blob_offset, last.blob_offset + last.slot_len()))
    }

    /// Records `[start, stop)` of blob `bi` as written (after the writes landed).
    fn mark_filled(&self, bi: usize, start: u64, stop: u64) {
        self.blobs[bi]
            .map
            .set(start / PAGE_BYTES, stop.div_ceil(PAGE_BYTES));
        self.counters
            .bytes_filled
            .fetch_add(stop - start, Ordering::Relaxed);
        self.unmark_if_complete(bi);
    }

    /// Removes the mark of blob `bi` once every page is filled.
    pub(super) fn unmark_if_complete(&self, bi: usize) {
        let b = &self.blobs[bi];
        if self.unmark_complete && b.map.complete() && b.marked.swap(false, Ordering::AcqRel) {
            match sys::mark(
                self.group.as_fd(),
                sys::FAN_MARK_REMOVE,
                sys::FAN_PRE_ACCESS,
                b.file.as_fd(),
            ) {
                Ok(()) => {
                    self.counters.unmarked.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(blob = %b.id, "blob complete; unmarked");
                }
                Err(e) => tracing::warn!(blob = %b.id, "unmarking a complete blob: {e}"),
            }
        }
    }

    /// Notes the event range; when it continues the previous one, queues the range
    /// after it (up to [`PREFETCH_BYTES`] ahead) for prefetching.
    fn note_sequential(&self, bi: usize, offset: u64, count: u64, local: &mut Local) {
        if !self.prefetch {
            return;
        }
        let b = &self.blobs[bi];
        let size = b.table.size_bytes();
        let end = offset.saturating_add(count).min(size);
        let prev = b.next_seq.swap(end, Ordering::AcqRel);
        if prev != offset || end >= size {
            return;
        }
        let ahead = b.prefetched_to.load(Ordering::Acquire);
        // Continue from what was handed out already when it is within this window.
        let from = if ahead > end && ahead < end + PREFETCH_BYTES {
            ahead
        } else {
            end
        };
        let to = (end + PREFETCH_BYTES).min(size);
        // In halves of the window, so that requests are large.
        if to <= from || (to - from < PREFETCH_BYTES / 2 && to < size) {
            return;
        }
        if local.prefetch.len() < PREFETCH_QUEUE {
            b.prefetched_to.fetch_max(to, Ordering::AcqRel);
            local.prefetch.push_back((bi, from, to - from));
        }
    }

    /// The answer of an event that needs no fill, or its fill request.
    fn classify(&self, q: &Queued, local: &mut Local) -> Result<u32, FillRequest<Token>> {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        let (Some(bi), Some((offset, count)), true) =
            (q.blob, q.ev.range, q.ev.mask & sys::FAN_PRE_ACCESS != 0)
        else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return Ok(sys::FAN_DENY_EIO);
        };
        // SAFETY: the fd was installed for us by our read and stays open until the
        // event is answered.
        let fd = unsafe { BorrowedFd::borrow_raw(q.ev.fd) };
        self.adopt_writer(bi, fd);
        self.note_sequential(bi, offset, count, local);
        match self.missing_cover(bi, offset, count) {
            None => {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                self.counters.cached.fetch_add(1, Ordering::Relaxed);
                Ok(sys::FAN_ALLOW)
            }
            Some((start, stop)) => Err(FillRequest {
                source: FillSource::Chunked(self.blobs[bi].table.clone()),
                offset: start,
                len: stop - start,
                // SAFETY: the event fd is ours (installed by our read); from here the
                // request owns it, and the engine closes it after `complete`.
                target: Arc::new(unsafe { OwnedFd::from_raw_fd(q.ev.fd) }),
                token: Token::Event {
                    slot: q.slot,
                    bi,
                    start,
                    stop,
                },
            }),
        }
    }

    /// A fill request for a queued prefetch range, if anything of it is missing.
    fn prefetch_request(&self, bi: usize, offset: u64, len: u64) -> Option<FillRequest<Token>> {
        let b = &self.blobs[bi];
        let writer = b.writer.get()?.clone();
        let (start, stop) = self.missing_cover(bi, offset, len)?;
        Some(FillRequest {
            source: FillSource::Chunked(b.table.clone()),
            offset: start,
            len: stop - start,
            target: writer,
            token: Token::Prefetch { bi, start, stop },
        })
    }

    /// Reads one batch of events (at most the thread's free slots) and journals each.
    fn read_batch(&self, local: &mut Local) -> Next<Token> {
        let n_max = local.free.len().min(EVENTS_PER_READ);
        if n_max == 0 {
            return Next::Empty;
        }
        let want = n_max * sys::EVENT_METADATA_BYTES;
        let n = match nix::unistd::read(&self.group, &mut local.buf[..want]) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => return Next::Empty,
            Err(nix::errno::Errno::EINTR) => return Next::Handled,
            Err(e) => return Next::Error(e.into()),
            Ok(n) => n,
        };
        local.evs.clear();
        if let Err(e) = event::parse(&local.buf[..n], &mut local.evs) {
            tracing::error!("fanotify event buffer: {e}");
        }
        for ev in local.evs.drain(..) {
            if ev.fd < 0 {
                // No fd: the kernel already denied it (or it is an overflow notice).
                continue;
            }
            let Some(slot) = local.free.pop() else {
                // Cannot happen (the buffer holds at most `n_max` events); never leave
                // an event unanswered.
                let _ = sys::respond(self.group.as_fd(), ev.fd, sys::FAN_DENY_EIO);
                // SAFETY: the event fd is ours and closed once, after its response.
                drop(unsafe { OwnedFd::from_raw_fd(ev.fd) });
                continue;
            };
            // SAFETY: installed for us by this read; open until answered.
            let blob = self.blob_of_fd(unsafe { BorrowedFd::borrow_raw(ev.fd) });
            let (offset, count) = ev.range.unwrap_or((0, 0));
            self.journal.record(
                slot,
                &Entry {
                    fd: ev.fd,
                    offset,
                    count,
                    blob: blob.map(|b| self.blobs[b].id_bin).unwrap_or([0; 32]),
                },
            );
            local.queue.push_back(Queued { slot, ev, blob });
        }
        Next::Handled
    }

    /// Fills (synchronously) and answers one journaled event, clears its slot and
    /// closes its fd: for events an engine thread read but could not hand out, and for
    /// the queue drained at shutdown.
    fn answer_now(&self, slot: usize, ev: &Event, blob: Option<usize>, filler: &mut PackFiller) {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        let answer = match (blob, ev.range) {
            _ if ev.mask & sys::FAN_PRE_ACCESS == 0 => Answer::Deny,
            (Some(bi), Some((offset, count))) => {
                // SAFETY: the event fd is ours until closed below.
                let fd = unsafe { BorrowedFd::borrow_raw(ev.fd) };
                self.adopt_writer(bi, fd);
                self.fill_range(bi, offset, count, fd, filler)
            }
            _ => Answer::Deny,
        };
        let response = match answer {
            Answer::Allow { cached } => {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                if cached {
                    self.counters.cached.fetch_add(1, Ordering::Relaxed);
                }
                sys::FAN_ALLOW
            }
            Answer::Deny => {
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
                sys::FAN_DENY_EIO
            }
        };
        if let Err(e) = sys::respond(self.group.as_fd(), ev.fd, response) {
            tracing::error!(fd = ev.fd, "fanotify response: {e}");
        }
        self.journal.clear(slot);
        // SAFETY: ours, answered, slot cleared; closed exactly once.
        drop(unsafe { OwnedFd::from_raw_fd(ev.fd) });
    }

    /// After the engine stopped: answers every event still queued in the group
    /// (bounded rounds), filling synchronously, in the first thread's journal slots.
    pub(super) fn drain_sync(&self) {
        let mut filler: Option<PackFiller> = None;
        let mut buf = vec![0u8; EVENTS_PER_READ * sys::EVENT_METADATA_BYTES];
        let mut evs = Vec::with_capacity(EVENTS_PER_READ);
        for _ in 0..1024 {
            let n = match nix::unistd::read(&self.group, &mut buf) {
                Ok(n) if n > 0 => n,
                Err(nix::errno::Errno::EINTR) => continue,
                _ => return,
            };
            evs.clear();
            if let Err(e) = event::parse(&buf[..n], &mut evs) {
                tracing::error!("fanotify event buffer: {e}");
            }
            let filler = filler.get_or_insert_with(|| PackFiller::new(self.packs.clone()));
            for (slot, ev) in evs.iter().enumerate().filter(|(_, e)| e.fd >= 0) {
                // SAFETY: installed for us by this read; open until answered.
                let blob = self.blob_of_fd(unsafe { BorrowedFd::borrow_raw(ev.fd) });
                let (offset, count) = ev.range.unwrap_or((0, 0));
                self.journal.record(
                    slot,
                    &Entry {
                        fd: ev.fd,
                        offset,
                        count,
                        blob: blob.map(|b| self.blobs[b].id_bin).unwrap_or([0; 32]),
                    },
                );
                self.answer_now(slot, ev, blob, filler);
            }
        }
    }
}

impl FrontEnd for Shared {
    type Token = Token;
    type Local = Local;

    fn name(&self) -> &'static str {
        "fanotify"
    }

    fn new_local(&self) -> Local {
        let t = self.threads_started.fetch_add(1, Ordering::AcqRel) % MAX_WORKERS;
        let shared = self
            .me
            .upgrade()
            .expect("the engine runs on a live front end");
        Local {
            shared,
            buf: vec![0u8; EVENTS_PER_READ * sys::EVENT_METADATA_BYTES],
            evs: Vec::with_capacity(EVENTS_PER_READ),
            queue: VecDeque::with_capacity(EVENTS_PER_READ),
            free: (t * SLOTS_PER_THREAD..(t + 1) * SLOTS_PER_THREAD)
                .rev()
                .collect(),
            answered: Vec::with_capacity(EVENTS_PER_READ),
            responder: Responder::new(self.uring_responses),
            prefetch: VecDeque::with_capacity(PREFETCH_QUEUE),
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.group.as_raw_fd()
    }

    fn next(&self, local: &mut Local, _c: &ThreadCounters) -> Next<Token> {
        // Bounded by the queue (at most one read batch).
        while let Some(q) = local.queue.pop_front() {
            match self.classify(&q, local) {
                Ok(response) => {
                    local.responder.answer(
                        self.group.as_fd(),
                        &self.journal,
                        q.slot,
                        q.ev.fd,
                        response,
                    );
                    local.answered.push(q.slot);
                }
                Err(req) => {
                    // Readers answered so far must not wait for this fill.
                    local.flush_answers();
                    return Next::Fill(req);
                }
            }
        }
        local.flush_answers();
        if let Some((bi, offset, len)) = local.prefetch.pop_front() {
            return match self.prefetch_request(bi, offset, len) {
                Some(req) => Next::Fill(req),
                None => Next::Handled,
            };
        }
        self.read_batch(local)
    }

    fn complete(
        &self,
        local: &mut Local,
        token: Token,
        target: &OwnedFd,
        outcome: FillOutcome,
        _c: &ThreadCounters,
    ) {
        match token {
            Token::Event {
                slot,
                bi,
                start,
                stop,
            } => {
                let response = if outcome == FillOutcome::Ok {
                    self.mark_filled(bi, start, stop);
                    self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                    sys::FAN_ALLOW
                } else {
                    tracing::error!(blob = %self.blobs[bi].id, start, stop, ?outcome, "fill failed, answering EIO");
                    self.counters.denied.fetch_add(1, Ordering::Relaxed);
                    sys::FAN_DENY_EIO
                };
                if let Err(e) = sys::respond(self.group.as_fd(), target.as_raw_fd(), response) {
                    tracing::error!(fd = target.as_raw_fd(), "fanotify response: {e}");
                }
                self.journal.clear(slot);
                local.free.push(slot);
            }
            Token::Prefetch { bi, start, stop } => {
                if outcome == FillOutcome::Ok {
                    self.mark_filled(bi, start, stop);
                }
            }
        }
    }
}
