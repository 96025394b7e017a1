//! Reading fanotify events and writing responses: plain read(2)/write(2)/close(2) per
//! event vs batched through io_uring, on this machine's kernel with real
//! `FAN_PRE_ACCESS` events (reader threads pread a marked file; the bench answers
//! FAN_ALLOW without filling, so only the event path is measured).
//!
//! `cargo bench --bench fanotify` (as root; skips with a message otherwise).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dedupd::frontend::fanotify::journal::{self, Journal};
use dedupd::frontend::fanotify::respond::Responder;
use dedupd::frontend::fanotify::{event, sys};
use io_uring::{opcode, types, IoUring};

const READERS: usize = 4;
const FILE_BYTES: u64 = 64 << 20;

struct Rig {
    group: OwnedFd,
    stop: Arc<AtomicBool>,
    readers: Vec<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Option<Rig> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP bench fanotify: needs root");
            return None;
        }
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).ok()?;
        if let Err(e) = dedupd::frontend::fanotify::probe(dir.path()) {
            eprintln!("SKIP bench fanotify: {e}");
            return None;
        }
        let path = dir.path().join("marked");
        let f = std::fs::File::create(&path).ok()?;
        f.set_len(FILE_BYTES).ok()?;
        let group = sys::init_group().ok()?;
        sys::mark(
            group.as_fd(),
            sys::FAN_MARK_ADD,
            sys::FAN_PRE_ACCESS,
            f.as_fd(),
        )
        .ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let readers = (0..READERS)
            .map(|t| {
                let (stop, path) = (stop.clone(), path.clone());
                std::thread::spawn(move || {
                    let f = std::fs::File::open(&path).unwrap();
                    let mut buf = [0u8; 4096];
                    let mut off = t as u64 * 4096;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = f.read_at(&mut buf, off);
                        off = (off + READERS as u64 * 4096) % FILE_BYTES;
                    }
                })
            })
            .collect();
        Some(Rig {
            group,
            stop,
            readers,
            _dir: dir,
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Answer whatever the readers still wait for, until they are all out.
        let mut buf = vec![0u8; 64 * 24];
        let mut evs = Vec::new();
        for r in self.readers.drain(..) {
            while !r.is_finished() {
                if let Ok(n) = nix::unistd::read(&self.group, &mut buf) {
                    evs.clear();
                    let _ = event::parse(&buf[..n], &mut evs);
                    for e in &evs {
                        let _ = sys::respond(self.group.as_fd(), e.fd, sys::FAN_ALLOW);
                        // SAFETY: the event fd is ours, closed once.
                        drop(unsafe { OwnedFd::from_raw_fd(e.fd) });
                    }
                }
            }
            let _ = r.join();
        }
    }
}

fn wait_readable(group: BorrowedFd<'_>) {
    let mut fds = [nix::poll::PollFd::new(group, nix::poll::PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
}

/// Plain: poll, read a batch, then write(2) and close(2) per event.
fn plain(rig: &Rig, events: u64) -> Duration {
    let mut buf = vec![0u8; 64 * 24];
    let mut evs = Vec::with_capacity(64);
    let t = Instant::now();
    let mut done = 0;
    while done < events {
        wait_readable(rig.group.as_fd());
        let Ok(n) = nix::unistd::read(&rig.group, &mut buf) else {
            continue;
        };
        evs.clear();
        event::parse(&buf[..n], &mut evs).unwrap();
        for e in &evs {
            sys::respond(rig.group.as_fd(), e.fd, sys::FAN_ALLOW).unwrap();
            // SAFETY: the event fd is ours, closed once.
            drop(unsafe { OwnedFd::from_raw_fd(e.fd) });
        }
        done += evs.len() as u64;
    }
    t.elapsed()
}

/// io_uring: one READ of the group, then every response WRITE and event-fd CLOSE of
/// the batch in one submit.
fn uring(rig: &Rig, ring: &mut IoUring, events: u64) -> Duration {
    let mut buf = vec![0u8; 64 * 24];
    let mut evs = Vec::with_capacity(64);
    let mut responses = vec![sys::Response { fd: 0, response: 0 }; 64];
    let gfd = types::Fd(rig.group.as_raw_fd());
    let t = Instant::now();
    let mut done = 0;
    while done < events {
        let read = opcode::Read::new(gfd, buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(u64::MAX);
        // SAFETY: `buf` outlives the operation: we wait for its completion below.
        unsafe { ring.submission().push(&read).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let res = ring.completion().next().unwrap().result();
        if res <= 0 {
            continue;
        }
        evs.clear();
        event::parse(&buf[..res as usize], &mut evs).unwrap();
        for (i, e) in evs.iter().enumerate() {
            responses[i] = sys::Response {
                fd: e.fd,
                response: sys::FAN_ALLOW,
            };
            let w = opcode::Write::new(gfd, (&responses[i] as *const sys::Response).cast(), 8)
                .build()
                .user_data(i as u64)
                .flags(io_uring::squeue::Flags::IO_LINK);
            let c = opcode::Close::new(types::Fd(e.fd))
                .build()
                .user_data(1000 + i as u64);
            // SAFETY: `responses` outlives the operations (all completions are reaped
            // before the next batch reuses it); the ring has room for 2 x 64 entries.
            unsafe {
                ring.submission().push(&w).unwrap();
                ring.submission().push(&c).unwrap();
            }
        }
        ring.submit_and_wait(2 * evs.len()).unwrap();
        let mut reaped = ring.completion().count();
        while reaped < 2 * evs.len() {
            ring.submit_and_wait(1).unwrap();
            reaped += ring.completion().count();
        }
        done += evs.len() as u64;
    }
    t.elapsed()
}

/// The worker's own path: poll + read(2), then [`Responder`] (journal slots cleared
/// between the response and the close, as in the daemon).
fn responder(rig: &Rig, r: &mut Responder, journal: &Journal, events: u64) -> Duration {
    let mut buf = vec![0u8; 64 * 24];
    let mut evs = Vec::with_capacity(64);
    let t = Instant::now();
    let mut done = 0;
    while done < events {
        wait_readable(rig.group.as_fd());
        let Ok(n) = nix::unistd::read(&rig.group, &mut buf) else {
            continue;
        };
        evs.clear();
        event::parse(&buf[..n], &mut evs).unwrap();
        for (i, e) in evs.iter().enumerate() {
            journal.record(
                i,
                &journal::Entry {
                    fd: e.fd,
                    offset: 0,
                    count: 0,
                    blob: [0; 32],
                },
            );
            r.answer(rig.group.as_fd(), journal, i, e.fd, sys::FAN_ALLOW);
        }
        r.finish(rig.group.as_fd(), journal);
        done += evs.len() as u64;
    }
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let Some(rig) = Rig::new() else {
        return;
    };
    let mut ring = IoUring::new(256).expect("io_uring");
    let mut g = c.benchmark_group("fanotify_event_path");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("plain_read_write_close", |b| {
        b.iter_custom(|n| plain(&rig, n))
    });
    g.bench_function("io_uring_batched", |b| {
        b.iter_custom(|n| uring(&rig, &mut ring, n))
    });
    let journal = Journal::map(Journal::create().unwrap()).unwrap();
    let mut plain_r = Responder::new(false);
    g.bench_function("worker_responder_plain", |b| {
        b.iter_custom(|n| responder(&rig, &mut plain_r, &journal, n))
    });
    let mut uring_r = Responder::new(true);
    g.bench_function("worker_responder_io_uring", |b| {
        b.iter_custom(|n| responder(&rig, &mut uring_r, &journal, n))
    });
    g.finish();
    drop(rig);
}

criterion_group!(benches, bench);
criterion_main!(benches);
