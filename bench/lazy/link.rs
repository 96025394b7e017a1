//! A shaped link to a network namespace the benchmark creates: a veth pair, `tc` HTB on
//! both ends for the rate, and a delay line for the round trip.
//!
//! This machine's kernel has no `sch_netem` (nor `sch_fq`, which would honour
//! BPF-set departure times), so the delay is added in user space: inside the namespace,
//! iptables (legacy, `CONFIG_IP_NF_IPTABLES`) sends every packet that enters it through
//! the namespace's veth to NFQUEUE queue 0, and [`DelayLine`] accepts each one a whole
//! round trip after it arrived (one FIFO: equal delays keep arrival order, so one batch
//! verdict releases every packet due). Only the packets' metadata is copied to user
//! space; GSO packets are queued whole (`NFQA_CFG_F_GSO`), as netem would see them on a
//! veth. The rate is HTB's, in the kernel, before the delay.
//!
//! The whole round trip is on the way in (the dedupd -> registry direction: requests and
//! ACKs), none on the way out (the registry's data). For TCP and for a request and its
//! answer only the sum matters. Half of it on the registry's OUTPUT, as first written,
//! held data packets that were still charged to the registry's socket: TCP small queues
//! then let about a millisecond of data be in flight below the socket, and a 100 Mbit/s
//! 20 ms link carried 0.5 MiB/s. On the way in a packet is orphaned (`ip_rcv`) before
//! INPUT, so holding it there costs the sender nothing but the round trip.
//!
//! Everything is undone on drop (also when the benchmark panics); a namespace left by
//! a killed run is removed at the next start ([`Link::up`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The namespace's name (one shaped link at a time).
pub const NETNS: &str = "dedupd-lazybench";
/// Host end of the veth pair.
const VETH_HOST: &str = "dlb-host";
/// Namespace end of the veth pair.
const VETH_NS: &str = "dlb-ns";
/// Host address (198.18.0.0/15 is reserved for benchmarks, RFC 2544).
pub const HOST_ADDR: &str = "198.18.0.1";
/// Namespace address: where the registry listens.
pub const NS_ADDR: &str = "198.18.0.2";

/// A link's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Bits per second, each direction.
    pub rate_bits: u64,
    /// Round trip added to every exchange.
    pub rtt: Duration,
}

/// Runs a command; panics with its output on failure.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`sh`], ignoring failure (cleanup of what may not exist).
fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// Runs `args` inside the namespace.
pub fn in_ns(args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        NETNS.into(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// The namespace, its veth pair, shaping and delay line.
pub struct Link {
    delay: Option<DelayLine>,
}

impl Link {
    /// Creates the namespace and a veth pair shaped to `shape`.
    pub fn up(shape: Shape) -> Link {
        Self::remove_leftovers();
        let mut link = Link { delay: None };
        sh(&["ip", "netns", "add", NETNS]);
        sh(&[
            "ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS,
        ]);
        sh(&["ip", "link", "set", VETH_NS, "netns", NETNS]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_ADDR}/30"),
            "dev",
            VETH_HOST,
        ]);
        sh(&["ip", "link", "set", VETH_HOST, "up"]);
        let ns = |a: &[&str]| {
            let v = in_ns(a);
            sh(&v.iter().map(String::as_str).collect::<Vec<_>>());
        };
        ns(&[
            "ip",
            "addr",
            "add",
            &format!("{NS_ADDR}/30"),
            "dev",
            VETH_NS,
        ]);
        ns(&["ip", "link", "set", VETH_NS, "up"]);
        ns(&["ip", "link", "set", "lo", "up"]);
        // Nothing may leave the machine: the namespace's address must be reached
        // through our veth only, never by a default route.
        let route = Command::new("ip")
            .args(["-o", "route", "get", NS_ADDR])
            .output()
            .expect("ip route get");
        let route = String::from_utf8_lossy(&route.stdout);
        assert!(
            route.contains(&format!("dev {VETH_HOST} ")),
            "{NS_ADDR} is not routed through {VETH_HOST}: {route}"
        );
        let rate = format!("{}bit", shape.rate_bits);
        // HTB at the rate; a burst of one GSO packet (64 KiB) so that large packets
        // are not held back, and a queue of 1000 packets behind it.
        let htb = |dev: &str, ns_side: bool| {
            let cmds: [Vec<&str>; 2] = [
                vec![
                    "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
                ],
                vec![
                    "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                    "rate", &rate, "ceil", &rate, "burst", "64k", "cburst", "64k",
                ],
            ];
            for c in &cmds {
                if ns_side {
                    ns(c);
                } else {
                    sh(c);
                }
            }
        };
        htb(VETH_HOST, false);
        htb(VETH_NS, true);
        if !shape.rtt.is_zero() {
            link.delay = Some(DelayLine::start(shape.rtt));
            ns(&[
                "iptables-legacy",
                "-A",
                "INPUT",
                "-i",
                VETH_NS,
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
            ]);
        }
        link
    }

    /// Packets the delay line passed, and how many it held when it was busiest.
    pub fn delayed_packets(&self) -> (u64, u64) {
        self.delay.as_ref().map_or((0, 0), |d| {
            (
                d.passed.load(Ordering::Relaxed),
                d.max_held.load(Ordering::Relaxed),
            )
        })
    }

    /// Round trips measured as TCP connect times to `port` in the namespace (a SYN
    /// and its SYN-ACK: one round trip), `n` times: (median, max) in milliseconds.
    pub fn connect_rtt_ms(&self, port: u16, n: usize) -> (f64, f64) {
        let addr: std::net::SocketAddr = format!("{NS_ADDR}:{port}").parse().unwrap();
        let mut v: Vec<f64> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
                let ms = t.elapsed().as_secs_f64() * 1e3;
                drop(s);
                std::thread::sleep(Duration::from_millis(20));
                ms
            })
            .collect();
        v.sort_by(f64::total_cmp);
        (v[n / 2], v[n - 1])
    }

    fn remove_leftovers() {
        sh_quiet(&["ip", "netns", "del", NETNS]);
        sh_quiet(&["ip", "link", "del", VETH_HOST]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth end, which removes the pair, its
        // qdiscs and the iptables rules; the delay line's socket goes with the thread.
        Self::remove_leftovers();
        if let Some(d) = self.delay.take() {
            d.stop();
        }
    }
}

// nfnetlink_queue ABI (linux/netfilter/nfnetlink_queue.h, nfnetlink.h, netlink.h).
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQA_CFG_F_GSO: u32 = 4;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR_BYTES: usize = 16;
const NFGENMSG_BYTES: usize = 4;
/// Packets the kernel may hold for us (at 1 Gbit/s and 2 ms, a few hundred).
const QUEUE_MAXLEN: u32 = 8192;

/// Releases each queued packet a fixed delay after it arrived.
struct DelayLine {
    stop: Arc<AtomicBool>,
    passed: Arc<AtomicU64>,
    max_held: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl DelayLine {
    /// Starts the thread (which enters the namespace) and waits until it is bound.
    fn start(delay: Duration) -> DelayLine {
        let stop = Arc::new(AtomicBool::new(false));
        let passed = Arc::new(AtomicU64::new(0));
        let max_held = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, p, m) = (stop.clone(), passed.clone(), max_held.clone());
        let thread = std::thread::Builder::new()
            .name("delay-line".into())
            .spawn(move || {
                let sock = match bind_queue() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if let Err(e) = run(&sock, delay, &s, &p, &m) {
                    if !s.load(Ordering::Relaxed) {
                        panic!("delay line: {e}");
                    }
                }
            })
            .expect("spawning the delay line");
        ready_rx
            .recv()
            .expect("delay line thread")
            .unwrap_or_else(|e| panic!("binding NFQUEUE 0 in {NETNS}: {e}"));
        DelayLine {
            stop,
            passed,
            max_held,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// One nfnetlink queue message: header, nfgenmsg (family, version 0, queue 0), attrs.
fn message(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut b = vec![0u8; NLMSG_HDR_BYTES];
    b.extend_from_slice(&[family, 0, 0, 0]);
    for (k, p) in attrs {
        attr(&mut b, *k, p);
    }
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    b[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sends `msg.len()` bytes from a live buffer on our socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends a config message and waits for its ack.
fn configure(sock: &OwnedFd, seq: u32, attrs: &[(u16, Vec<u8>)]) -> io::Result<()> {
    send(
        sock,
        &message(
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            seq,
            libc::AF_UNSPEC as u8,
            attrs,
        ),
    )?;
    let mut buf = vec![0u8; 8192];
    // SAFETY: receives into a live buffer of the given length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == NLMSG_ERROR {
        let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
        if err != 0 {
            return Err(io::Error::from_raw_os_error(-err));
        }
    }
    Ok(())
}

/// Enters the namespace (this thread only) and binds NFQUEUE queue 0, metadata only.
fn bind_queue() -> io::Result<OwnedFd> {
    let ns = File::open(format!("/run/netns/{NETNS}"))?;
    // SAFETY: setns(2) on an open namespace fd; it changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let rcvbuf: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&rcvbuf as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    // SAFETY: an all-zero sockaddr_nl is valid; family set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: binds our socket to a live sockaddr_nl of the given size.
    if unsafe {
        libc::bind(
            raw,
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut cmd = vec![NFQNL_CFG_CMD_BIND, 0];
    cmd.extend_from_slice(&(libc::AF_INET as u16).to_be_bytes());
    configure(&sock, 1, &[(NFQA_CFG_CMD, cmd)])?;
    let mut params = 0u32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    configure(
        &sock,
        2,
        &[
            (NFQA_CFG_PARAMS, params),
            (NFQA_CFG_QUEUE_MAXLEN, QUEUE_MAXLEN.to_be_bytes().to_vec()),
            (NFQA_CFG_MASK, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
            (NFQA_CFG_FLAGS, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
        ],
    )?;
    Ok(sock)
}

/// Packet ids from the messages in `buf`.
fn packet_ids(buf: &[u8], out: &mut Vec<u32>) {
    let mut at = 0;
    // Bounded by the buffer: every step advances by at least a header.
    while at + NLMSG_HDR_BYTES <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < NLMSG_HDR_BYTES || at + len > buf.len() {
            break;
        }
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            let mut a = at + NLMSG_HDR_BYTES + NFGENMSG_BYTES;
            while a + 4 <= at + len {
                let alen = u16::from_ne_bytes([buf[a], buf[a + 1]]) as usize;
                let akind = u16::from_ne_bytes([buf[a + 2], buf[a + 3]]) & 0x3fff;
                if alen < 4 {
                    break;
                }
                if akind == NFQA_PACKET_HDR && alen >= 8 {
                    out.push(u32::from_be_bytes(buf[a + 4..a + 8].try_into().unwrap()));
                }
                a += alen.next_multiple_of(4);
            }
        }
        at += len.next_multiple_of(4);
    }
}

/// The loop: read queued packets, accept each `delay` after it arrived.
fn run(
    sock: &OwnedFd,
    delay: Duration,
    stop: &AtomicBool,
    passed: &AtomicU64,
    max_held: &AtomicU64,
) -> io::Result<()> {
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut ids = Vec::new();
    let mut seq = 10u32;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Release every packet due, with one batch verdict (ids are in arrival order).
        let mut last = None;
        while let Some(&(due, id)) = held.front() {
            if due > now {
                break;
            }
            last = Some(id);
            held.pop_front();
            passed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(id) = last {
            seq = seq.wrapping_add(1);
            let mut v = NF_ACCEPT.to_be_bytes().to_vec();
            v.extend_from_slice(&id.to_be_bytes());
            send(
                sock,
                &message(
                    NFQNL_MSG_VERDICT_BATCH,
                    0,
                    seq,
                    libc::AF_UNSPEC as u8,
                    &[(NFQA_VERDICT_HDR, v)],
                ),
            )?;
        }
        let wait = held.front().map_or(Duration::from_millis(50), |&(due, _)| {
            due.saturating_duration_since(Instant::now())
        });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, a live timespec, no signal mask.
        let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        // Drain what is there without blocking.
        loop {
            // SAFETY: receives into a live buffer of the given length.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // The kernel dropped packets for want of socket buffer: TCP
                    // retransmits them; counted by the kernel, not fatal.
                    Some(libc::ENOBUFS) => continue,
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            let arrived = Instant::now();
            ids.clear();
            packet_ids(&buf[..n as usize], &mut ids);
            for &id in &ids {
                held.push_back((arrived + delay, id));
            }
            max_held.fetch_max(held.len() as u64, Ordering::Relaxed);
        }
    }
    // Let the rest through so that nothing waits on a dead queue.
    if let Some(&(_, id)) = held.back() {
        let mut v = NF_ACCEPT.to_be_bytes().to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        let _ = send(
            sock,
            &message(
                NFQNL_MSG_VERDICT_BATCH,
                0,
                seq.wrapping_add(1),
                libc::AF_UNSPEC as u8,
                &[(NFQA_VERDICT_HDR, v)],
            ),
        );
    }
    Ok(())
}
