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
//!   page map) is answered at once, without touching the store. One that needs data
//!   claims (see [`Claims`]) the first run of its missing chunks that no request in
//!   flight writes, and becomes a [`FillRequest`] for that run into the event's fd; if
//!   every missing chunk of it is claimed already (a prefetch, or another reader's
//!   fill, is writing it), the event is *parked* on the blob instead of filling the
//!   same bytes twice. Then events handed back by other threads (`redrive`), then one
//!   `read(2)` of at most as many events as there are free slots (each journaled at
//!   once), and only when the group has nothing queued, a prefetch piece from the
//!   shared queue: claimed the same way, filled into the blob's kept write fd.
//! - `written` (after each write of a request landed): its pages are set in the page
//!   map (verified bytes are in the file) and the blob's parked events are looked at
//!   again, so a reader waits for its own chunks, not for a whole prefetch piece.
//! - `complete`: on success the page map gets the request's pages, then its claims are
//!   released and the blob's parked events are looked at again: filled ones are answered `FAN_ALLOW` (by whichever thread
//!   completed the fill), ones that need a chunk nobody writes any more (a failed
//!   request) go to the shared `redrive` queue for a fill of their own. An event's own
//!   request that succeeded is settled the same way (allowed, parked, or redriven); one
//!   that failed is answered `FAN_DENY_ERRNO(EIO)`. Each answer: response, journal slot
//!   cleared, fd closed (the engine drops its reference after `complete`), in that
//!   order, which recovery relies on; the slot goes back to the thread that owns it.
//! - Prefetch: a sequential event queues the [`PREFETCH_BYTES`] after it, in pieces of
//!   [`PREFETCH_PIECE_BYTES`], on a queue shared by the engine threads, and writes the
//!   front end's wake eventfd ([`crate::serve::FrontEnd::wake_fd`]) so that an idle
//!   thread on the other core takes pieces too: fills run ahead of the reader on both
//!   cores while the reader copies.
//! - When an engine thread ends, events it read but did not hand out are filled
//!   synchronously ([`super::fill::PackFiller`], the same `decode_record` step) and
//!   answered, so that nothing read is left unanswered; parked and redriven events
//!   left when the engine stopped are answered the same way ([`Shared::answer_leftovers`]).

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
    sys, Answer, Shared, EVENTS_PER_READ, MAX_WORKERS, PREFETCH_BYTES, PREFETCH_PIECE_BYTES,
    PREFETCH_QUEUE, SLOTS_PER_THREAD,
};
use crate::serve::{FillOutcome, FillRequest, FillSource, FrontEnd, Next, ThreadCounters};

/// An event that needs data: its journal slot, its fd (owned from here on; closed when
/// the last reference goes, after the answer) and its range of blob `bi`.
pub(super) struct Waiter {
    slot: usize,
    fd: Arc<OwnedFd>,
    bi: usize,
    offset: u64,
    end: u64,
}

/// Completion token of a fill request.
pub enum Token {
    /// A permission event's fill of `[start, stop)` (slot-aligned, claimed).
    Event {
        /// The event.
        w: Waiter,
        /// Slot-aligned range the request writes.
        start: u64,
        /// End of it.
        stop: u64,
    },
    /// A prefetch of `[start, stop)` of blob `bi` through its kept write fd.
    Prefetch {
        /// Blob index.
        bi: usize,
        /// Slot-aligned range the request writes (claimed).
        start: u64,
        /// End of it.
        stop: u64,
    },
}

/// Pages of one blob that fill requests in flight are writing, and the events waiting
/// for them. Guarded by the blob's mutex; a claim covers whole slots and lasts from the
/// moment a request is handed to the engine until its `complete`.
#[derive(Default)]
pub(super) struct Claims {
    /// One bit per page (allocated on first use).
    bits: Vec<u64>,
    /// Events whose missing chunks are all claimed.
    parked: Vec<Waiter>,
}

impl Claims {
    fn get(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    fn set(&mut self, first: u64, end: u64, on: bool, pages: u64) {
        if self.bits.is_empty() {
            self.bits = vec![0; pages.div_ceil(64) as usize];
        }
        for p in first..end.min(pages) {
            let w = &mut self.bits[(p / 64) as usize];
            if on {
                *w |= 1 << (p % 64);
            } else {
                *w &= !(1 << (p % 64));
            }
        }
    }
}

/// What a range needs, as seen under the blob's claims lock.
enum Plan {
    /// Every page is filled.
    Ready,
    /// Every missing chunk is being written by a request in flight.
    Wait,
    /// `[start, stop)`, a run of missing, unclaimed slots (claimed by `plan` when asked
    /// to claim).
    Fill(u64, u64),
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
    /// This thread's index: its journal slots are `t * SLOTS_PER_THREAD..`.
    t: usize,
    buf: Vec<u8>,
    evs: Vec<Event>,
    queue: VecDeque<Queued>,
    /// Free journal slots of this thread.
    free: Vec<usize>,
    /// Slots of answers queued in the responder (freed once it finished).
    answered: Vec<usize>,
    responder: Responder,
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
    /// Journals event `ev` in `slot` (before any answer) and returns its blob, if any
    /// of ours.
    fn journal_event(&self, slot: usize, ev: &Event) -> Option<usize> {
        // SAFETY: installed for us by the read that produced `ev`; open until answered.
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
        blob
    }

    /// What `[offset, end)` of blob `bi` needs: scans its slots for the first run of
    /// missing slots no request in flight writes (skipping claimed ones), and with
    /// `claim` claims that run. Call with the blob's claims lock held.
    fn plan(&self, bi: usize, claims: &mut Claims, offset: u64, end: u64, claim: bool) -> Plan {
        let b = &self.blobs[bi];
        let end = end.min(b.table.size_bytes());
        if offset >= end || b.map.all(offset / PAGE_BYTES, end.div_ceil(PAGE_BYTES)) {
            return Plan::Ready;
        }
        let mut waiting = false;
        let mut run: Option<(u64, u64)> = None;
        for e in b.table.overlapping(offset, end - offset) {
            let first = e.blob_offset / PAGE_BYTES;
            let missing = !b
                .map
                .all(first, (e.blob_offset + e.slot_len()) / PAGE_BYTES);
            let claimed = claims.get(first);
            let slot_end = e.blob_offset + e.slot_len();
            match run {
                None if !missing => {}
                None if claimed => waiting = true,
                None => run = Some((e.blob_offset, slot_end)),
                Some((s, _)) if missing && !claimed => run = Some((s, slot_end)),
                Some(_) => break,
            }
        }
        match run {
            Some((s, t)) => {
                if claim {
                    claims.set(s / PAGE_BYTES, t.div_ceil(PAGE_BYTES), true, b.map.pages());
                }
                Plan::Fill(s, t)
            }
            None if waiting => Plan::Wait,
            None => Plan::Ready,
        }
    }

    /// Releases the claim on `[start, stop)` of blob `bi` (after its request completed
    /// and, on success, the page map was set) and answers or redrives the parked events
    /// that no longer wait for anything.
    fn release(&self, bi: usize, start: u64, stop: u64, local: &mut Local) {
        self.recheck_parked(bi, Some((start, stop)), local);
    }

    /// Looks at the parked events of blob `bi` again (after releasing the claim on
    /// `release`, if given): answers those whose range is filled, redrives those that
    /// need a chunk nobody writes, keeps the rest parked.
    fn recheck_parked(&self, bi: usize, release: Option<(u64, u64)>, local: &mut Local) {
        let b = &self.blobs[bi];
        let mut ready = Vec::new();
        let mut redrive = Vec::new();
        {
            let mut claims = b.claims.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((start, stop)) = release {
                claims.set(
                    start / PAGE_BYTES,
                    stop.div_ceil(PAGE_BYTES),
                    false,
                    b.map.pages(),
                );
            }
            if claims.parked.is_empty() {
                return;
            }
            let parked = std::mem::take(&mut claims.parked);
            for w in parked {
                match self.plan(bi, &mut claims, w.offset, w.end, false) {
                    Plan::Ready => ready.push(w),
                    Plan::Wait => claims.parked.push(w),
                    Plan::Fill(..) => redrive.push(w),
                }
            }
        }
        for w in ready {
            self.finish_waiter(w, sys::FAN_ALLOW, local);
        }
        if !redrive.is_empty() {
            self.redrive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(redrive);
            self.wake();
        }
    }

    /// Wakes every engine thread (their multishot polls on the wake eventfd). The
    /// counter is never read back: each write is one wake-up.
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&self.wake, &one);
    }

    /// Answers `w` (response, journal slot cleared, then its fd dropped: closed now, or
    /// when the engine drops the request holding it) and gives its slot back.
    fn finish_waiter(&self, w: Waiter, response: u32, local: &mut Local) {
        if response == sys::FAN_ALLOW {
            self.counters.allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = sys::respond(self.group.as_fd(), w.fd.as_raw_fd(), response) {
            tracing::error!(fd = w.fd.as_raw_fd(), "fanotify response: {e}");
        }
        self.journal.clear(w.slot);
        drop(w.fd);
        self.free_slot(w.slot, local);
    }

    /// Gives journal slot `slot` back to the thread that owns it.
    fn free_slot(&self, slot: usize, local: &mut Local) {
        let owner = slot / SLOTS_PER_THREAD;
        if owner == local.t {
            local.free.push(slot);
        } else if let Some(r) = self.returned.get(owner) {
            r.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        }
    }

    /// An event that needs data: allowed at once, parked, or (with `may_fill`) a fill
    /// request for the first run of its missing, unclaimed chunks. Without `may_fill`
    /// an event that needs such a run goes to the redrive queue.
    fn drive(&self, w: Waiter, may_fill: bool, local: &mut Local) -> Option<FillRequest<Token>> {
        let bi = w.bi;
        let b = &self.blobs[bi];
        let plan = {
            let mut claims = b.claims.lock().unwrap_or_else(|p| p.into_inner());
            let plan = self.plan(bi, &mut claims, w.offset, w.end, may_fill);
            if let Plan::Wait = plan {
                self.counters.parked.fetch_add(1, Ordering::Relaxed);
                claims.parked.push(w);
                return None;
            }
            plan
        };
        match plan {
            Plan::Ready | Plan::Wait => {
                self.finish_waiter(w, sys::FAN_ALLOW, local);
                None
            }
            Plan::Fill(start, stop) if may_fill => Some(FillRequest {
                source: FillSource::Chunked(b.table.clone()),
                offset: start,
                len: stop - start,
                target: w.fd.clone(),
                token: Token::Event { w, start, stop },
            }),
            Plan::Fill(..) => {
                self.redrive
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(w);
                self.wake();
                None
            }
        }
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

    /// Notes the event range; when it continues the previous one, queues the
    /// [`PREFETCH_BYTES`] after it (from where earlier prefetches stopped) in pieces on
    /// the shared prefetch queue, and wakes the engine threads.
    fn note_sequential(&self, bi: usize, offset: u64, count: u64) {
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
        let to = (end + PREFETCH_BYTES).min(size);
        let ahead = b.prefetched_to.load(Ordering::Acquire);
        if ahead >= to {
            return;
        }
        let mut from = ahead.max(end);
        // Whole pieces, so that requests are large (the blob's tail excepted).
        if to - from < PREFETCH_PIECE_BYTES && to < size {
            return;
        }
        {
            let mut q = self.prefetch_q.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded by the window: at most PREFETCH_BYTES / PREFETCH_PIECE_BYTES pieces.
            while from < to && q.len() < PREFETCH_QUEUE {
                let len = PREFETCH_PIECE_BYTES.min(to - from);
                q.push_back((bi, from, len));
                from += len;
            }
        }
        b.prefetched_to.fetch_max(from, Ordering::AcqRel);
        self.wake();
    }

    /// Handles one queued event: its answer when it needs no fill (batched by the
    /// caller), else it is driven (see [`Shared::drive`]): a fill request, or parked.
    fn classify(&self, q: &Queued, local: &mut Local) -> Result<u32, Option<FillRequest<Token>>> {
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
        let b = &self.blobs[bi];
        if b.priming.load(Ordering::Acquire) && q.ev.pid == std::process::id() as i32 {
            // Our own priming read, for the write fd adopted above: it drops the byte it
            // reads, so it is allowed unfilled (filling would fetch a lazily pulled
            // blob's first chunk at mount). The page map stays clear: the first real
            // reader of that page gets it filled, and the fill's write replaces the
            // cached hole.
            self.counters.allowed.fetch_add(1, Ordering::Relaxed);
            return Ok(sys::FAN_ALLOW);
        }
        self.note_sequential(bi, offset, count);
        let end = offset.saturating_add(count).min(b.table.size_bytes());
        if offset >= end || b.map.all(offset / PAGE_BYTES, end.div_ceil(PAGE_BYTES)) {
            self.counters.allowed.fetch_add(1, Ordering::Relaxed);
            self.counters.cached.fetch_add(1, Ordering::Relaxed);
            return Ok(sys::FAN_ALLOW);
        }
        let w = Waiter {
            slot: q.slot,
            // SAFETY: the event fd is ours (installed by our read); from here the waiter
            // owns it, and it is closed once, after the answer.
            fd: Arc::new(unsafe { OwnedFd::from_raw_fd(q.ev.fd) }),
            bi,
            offset,
            end,
        };
        Err(self.drive(w, true, local))
    }

    /// A fill request for a prefetch piece: its first run of missing, unclaimed slots
    /// (claimed here); the rest of the piece goes back to the queue's front.
    fn prefetch_request(&self, bi: usize, offset: u64, len: u64) -> Option<FillRequest<Token>> {
        let b = &self.blobs[bi];
        let writer = b.writer.get()?.clone();
        let end = offset + len;
        let plan = {
            let mut claims = b.claims.lock().unwrap_or_else(|p| p.into_inner());
            self.plan(bi, &mut claims, offset, end, true)
        };
        let Plan::Fill(start, stop) = plan else {
            return None;
        };
        if stop < end {
            self.prefetch_q
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_front((bi, stop, end - stop));
        }
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
            let blob = self.journal_event(slot, &ev);
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
                let blob = self.journal_event(slot, ev);
                self.answer_now(slot, ev, blob, filler);
            }
        }
    }
}

impl Shared {
    /// After the engine stopped: answers events still parked or queued for a redrive
    /// (none should be parked: every claim's request completed), filling synchronously.
    pub(super) fn answer_leftovers(&self) {
        let mut left: Vec<Waiter> = self
            .redrive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for b in &self.blobs {
            let mut claims = b.claims.lock().unwrap_or_else(|p| p.into_inner());
            left.append(&mut claims.parked);
            claims.bits.clear();
        }
        if left.is_empty() {
            return;
        }
        let mut filler = PackFiller::new(self.packs.clone());
        for w in left {
            let answer =
                self.fill_range(w.bi, w.offset, w.end - w.offset, w.fd.as_fd(), &mut filler);
            let response = match answer {
                Answer::Allow { .. } => {
                    self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                    sys::FAN_ALLOW
                }
                Answer::Deny => {
                    self.counters.denied.fetch_add(1, Ordering::Relaxed);
                    sys::FAN_DENY_EIO
                }
            };
            if let Err(e) = sys::respond(self.group.as_fd(), w.fd.as_raw_fd(), response) {
                tracing::error!(fd = w.fd.as_raw_fd(), "fanotify response: {e}");
            }
            self.journal.clear(w.slot);
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
            t,
            buf: vec![0u8; EVENTS_PER_READ * sys::EVENT_METADATA_BYTES],
            evs: Vec::with_capacity(EVENTS_PER_READ),
            queue: VecDeque::with_capacity(EVENTS_PER_READ),
            free: (t * SLOTS_PER_THREAD..(t + 1) * SLOTS_PER_THREAD)
                .rev()
                .collect(),
            answered: Vec::with_capacity(EVENTS_PER_READ),
            responder: Responder::new(self.uring_responses),
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.group.as_raw_fd()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.wake.as_raw_fd())
    }

    fn next(&self, local: &mut Local, _c: &ThreadCounters) -> Next<Token> {
        if let Some(r) = self.returned.get(local.t) {
            local
                .free
                .append(&mut r.lock().unwrap_or_else(|p| p.into_inner()));
        }
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
                Err(Some(req)) => {
                    // Readers answered so far must not wait for this fill.
                    local.flush_answers();
                    return Next::Fill(req);
                }
                Err(None) => {}
            }
        }
        local.flush_answers();
        let redriven = self
            .redrive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        if let Some(w) = redriven {
            return match self.drive(w, true, local) {
                Some(req) => Next::Fill(req),
                None => Next::Handled,
            };
        }
        match self.read_batch(local) {
            Next::Empty => {}
            other => return other,
        }
        // The group has nothing queued: fill ahead of sequential readers. Bounded by
        // the queue's length.
        for _ in 0..PREFETCH_QUEUE {
            let piece = self
                .prefetch_q
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            let Some((bi, offset, len)) = piece else {
                break;
            };
            if let Some(req) = self.prefetch_request(bi, offset, len) {
                return Next::Fill(req);
            }
        }
        Next::Empty
    }

    fn written(&self, local: &mut Local, token: &Token, offset: u64, len: u64) {
        // The write landed, of verified bytes (or the zeros past the data): its pages
        // hold data now, and an event parked on them need not wait for the rest of the
        // request (a whole prefetch piece).
        let bi = match token {
            Token::Event { w, .. } => w.bi,
            Token::Prefetch { bi, .. } => *bi,
        };
        self.blobs[bi]
            .map
            .set(offset / PAGE_BYTES, (offset + len) / PAGE_BYTES);
        self.recheck_parked(bi, None, local);
    }

    fn complete(
        &self,
        local: &mut Local,
        token: Token,
        _target: &OwnedFd,
        outcome: FillOutcome,
        _c: &ThreadCounters,
    ) {
        match token {
            Token::Event { w, start, stop } => {
                let bi = w.bi;
                if outcome == FillOutcome::Ok {
                    self.mark_filled(bi, start, stop);
                    self.release(bi, start, stop, local);
                    // Its range may hold further runs (another request's, or unclaimed).
                    let _ = self.drive(w, false, local);
                } else {
                    tracing::error!(blob = %self.blobs[bi].id, start, stop, ?outcome, "fill failed, answering EIO");
                    self.release(bi, start, stop, local);
                    self.finish_waiter(w, sys::FAN_DENY_EIO, local);
                }
            }
            Token::Prefetch { bi, start, stop } => {
                if outcome == FillOutcome::Ok {
                    self.mark_filled(bi, start, stop);
                    self.counters
                        .prefetched
                        .fetch_add(stop - start, Ordering::Relaxed);
                }
                self.release(bi, start, stop, local);
            }
        }
    }
}
