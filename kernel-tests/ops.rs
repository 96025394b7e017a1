//! Operating dedupd on a node (issue 16, parts 2-5), against the real daemon: `dedupd run`
//! with the fanotify front end (this host's kernel), as root.
//!
//! 1. A first daemon unpacks and commits a layer over gRPC (as containerd does) holding a
//!    0600 `etc/shadow` and an 8 MiB file. It stops, and its root is loosened the way an
//!    earlier version left it (directories 0755, files 0644).
//! 2. A second daemon, with the metrics endpoint on 127.0.0.1, must tighten that root at
//!    start and say so in its log. While a reader makes cold reads of the layer, `/metrics`
//!    is scraped and parsed with the Python `prometheus_client` parsers (text 0.0.4 and
//!    OpenMetrics): every family is there, with sane values, and nothing names a path.
//! 3. As `nobody` (setpriv): no file under the root can be opened, no directory listed and
//!    no socket connected; with the snapshotter socket's mode loosened on purpose, its
//!    `SO_PEERCRED` check still closes the connection. As root: nothing under the root has
//!    a group or other bit but the stated exception (`snapshots/<id>/fs`).
//! 4. `dedupd status --json` has the front end, the cache, the mounted layer with its
//!    local bytes and the slowest requests with their waits; the human form says the same.
//! 5. A second layer committed while serving restarts the front end: the counters do not
//!    go back, and a conversion is counted with its time.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dedupd::snapshotter::proto::snapshots as pb;
use dedupd::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

const PYTHON: &str = "/usr/bin/python3";

fn skip(why: &str) -> bool {
    eprintln!("SKIPPED: {why}");
    true
}

fn prerequisites_missing() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root");
    }
    let py = Command::new(PYTHON)
        .args([
            "-c",
            "import prometheus_client.parser, prometheus_client.openmetrics.parser",
        ])
        .status();
    if !py.is_ok_and(|s| s.success()) {
        return skip("needs python3-prometheus-client (kernel-tests/install-host-deps)");
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        return skip("needs setpriv (util-linux)");
    }
    false
}

/// A scratch area under /var/tmp (fanotify blob files need ext4/xfs/btrfs) whose mounts,
/// daemon and holder are undone on drop, pass or fail.
struct Scratch {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Scratch {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("dedupd.sock")
    }
    fn log(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("dedupd-{n}.log"))
    }

    /// Starts `dedupd run` (fanotify) and waits until it serves.
    fn start(&mut self, n: u32, metrics: Option<&str>) {
        let _ = fs::remove_file(self.root().join("run").join("stats.json"));
        let log = fs::File::create(self.log(n)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dedupd"));
        cmd.args(["run", "--front-end", "fanotify", "--threads", "2", "--root"])
            .arg(self.root())
            .arg("--socket")
            .arg(self.socket())
            .env("DEDUPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(m) = metrics {
            // With a cache limit, so that its families are there too.
            cmd.args(["--metrics-address", m, "--cache-limit", "1GiB"]);
        }
        self.daemon = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = fs::read_to_string(self.root().join("run").join("stats.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v["running"] == true);
            if running {
                return;
            }
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "dedupd exited ({st}): {}",
                    fs::read_to_string(self.log(n)).unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dedupd did not start: {}",
                fs::read_to_string(self.log(n)).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits.
    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(d.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while d.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = d.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.stop();
        if let Ok(rd) = fs::read_dir(self.root().join("m")) {
            for e in rd.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // The holder our daemons started keeps the group while layers were mounted.
        if let Ok(pid) = fs::read_to_string(self.root().join("fanotify").join("holder.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

async fn connect(socket: &Path) -> SnapshotsClient<Channel> {
    let path = socket.to_path_buf();
    let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    SnapshotsClient::new(ch)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Prepares `key` on `parent`, lets `fill` write its files into the returned directory
/// (the bind mount's source, as containerd's unpacker would), and commits it as `name`.
fn unpack_layer(socket: &Path, key: &str, parent: &str, name: &str, fill: impl FnOnce(&Path)) {
    runtime().block_on(async {
        let mut c = connect(socket).await;
        let mounts = c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "dedup".into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        let m = &mounts[0];
        let upper = if m.r#type == "bind" {
            PathBuf::from(&m.source)
        } else {
            let up = m
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap();
            PathBuf::from(up)
        };
        fill(&upper);
        c.commit(pb::CommitSnapshotRequest {
            snapshotter: "dedup".into(),
            name: name.into(),
            key: key.into(),
            labels: [("containerd.io/gc.root".to_string(), "x".to_string())].into(),
            parent: String::new(),
        })
        .await
        .unwrap();
    });
}

/// Prepares an active snapshot (a container's) on `parent`: its upper dir is the
/// exception to root-only modes.
fn prepare_container(socket: &Path, key: &str, parent: &str) {
    runtime().block_on(async {
        let mut c = connect(socket).await;
        c.prepare(pb::PrepareSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap();
    });
}

fn remove(socket: &Path, keys: &[&str]) {
    runtime().block_on(async {
        let mut c = connect(socket).await;
        for k in keys {
            c.remove(pb::RemoveSnapshotRequest {
                snapshotter: "dedup".into(),
                key: k.to_string(),
            })
            .await
            .unwrap();
        }
    });
}

/// Loosens every mode under `root` (not crossing mounts) the way dedupd before issue 16
/// left them: 0755 directories, 0644 files and sockets.
fn loosen_like_an_old_version(root: &Path) {
    let dev = fs::metadata(root).unwrap().dev();
    let mut stack = vec![root.to_path_buf()];
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let md = e.path().symlink_metadata().unwrap();
            if md.dev() != dev || md.file_type().is_symlink() {
                continue;
            }
            let mode = if md.is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(e.path(), fs::Permissions::from_mode(mode)).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// Every path under `root` on its filesystem (no mounted layer), root included.
fn all_paths(root: &Path) -> Vec<PathBuf> {
    let dev = fs::metadata(root).unwrap().dev();
    let mut out = vec![root.to_path_buf()];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.dev() != dev {
                continue;
            }
            out.push(e.path());
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

const SCRAPE_PY: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
url = sys.argv[1]
out = {}
for om in (False, True):
    req = urllib.request.Request(url)
    if om:
        req.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    body = urllib.request.urlopen(req, timeout=10).read().decode()
    fams = om_families(body) if om else text_string_to_metric_families(body)
    got = {}
    for f in fams:
        got[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
    out["openmetrics" if om else "text"] = got
    out["body_" + ("openmetrics" if om else "text")] = body
print(json.dumps(out))
"#;

/// Scrapes `/metrics` in both formats and parses each with its own Python parser.
fn scrape(port: u16) -> serde_json::Value {
    let out = Command::new(PYTHON)
        .args(["-c", SCRAPE_PY, &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scrape failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of sample `name` with `labels` in a parsed scrape.
fn value(fams: &serde_json::Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = &fams[family];
    assert!(!f.is_null(), "no family {family}");
    for s in f["samples"].as_array().unwrap() {
        if s[0] != name {
            continue;
        }
        if labels.iter().all(|(k, v)| s[1][*k] == *v) {
            return s[2].as_f64().unwrap();
        }
    }
    panic!("no sample {name}{labels:?} in {f}");
}

const NOBODY_PY: &str = r#"
import json, os, socket, stat, sys
paths = json.load(open(sys.argv[1]))
got = []
for p in paths:
    try:
        st = os.lstat(p)
    except OSError:
        continue  # not even visible: fine
    if stat.S_ISDIR(st.st_mode):
        try:
            os.listdir(p); got.append("listed " + p)
        except OSError:
            pass
    elif stat.S_ISSOCK(st.st_mode):
        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(p); got.append("connected " + p)
            except OSError:
                pass
            finally:
                s.close()
    else:
        try:
            open(p, "rb").close(); got.append("opened " + p)
        except OSError:
            pass
for walked, dirs, files in os.walk(sys.argv[2]):
    for f in files:
        try:
            open(os.path.join(walked, f), "rb").close(); got.append("walked to " + f)
        except OSError:
            pass
print(json.dumps({"uid": os.getuid(), "got": got}))
"#;

const PEERCRED_PY: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers SETTINGS.
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    data = s.recv(64)
except (BrokenPipeError, ConnectionResetError):
    data = b""  # closed by the server
print("uid %d got %d bytes" % (os.getuid(), len(data)))
"#;

fn as_nobody(script: &str, args: &[&str]) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            PYTHON,
            "-c",
            script,
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn metrics_status_and_root_only_permissions_on_a_running_daemon() {
    if prerequisites_missing() {
        return;
    }
    let mut s = Scratch {
        dir: tempfile::Builder::new()
            .prefix("dops")
            .tempdir_in("/var/tmp")
            .unwrap(),
        daemon: None,
    };
    let root = s.root();
    let sock = s.socket();

    // --- 1. a layer from a first daemon; then the root as an old version left it ------
    s.start(1, None);
    // Random: 8 MiB of distinct chunks.
    let mut big = vec![0u8; 8 << 20];
    rand::Rng::fill(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(16),
        &mut big[..],
    );
    unpack_layer(&sock, "extract-1", "", "layer-1", |fs_dir| {
        fs::create_dir_all(fs_dir.join("etc")).unwrap();
        fs::create_dir_all(fs_dir.join("data")).unwrap();
        fs::write(fs_dir.join("etc/shadow"), b"root:$6$secret:19000::::::\n").unwrap();
        fs::set_permissions(fs_dir.join("etc/shadow"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(fs_dir.join("data/big.bin"), &big).unwrap();
    });
    s.stop();
    loosen_like_an_old_version(&root);
    assert!(!dedupd::perms::exposed(&root).unwrap().is_empty());

    // --- 2. a second daemon tightens it, and serves metrics while cold reads go on ----
    let port = free_port();
    s.start(2, Some(&format!("127.0.0.1:{port}")));
    let log = fs::read_to_string(s.log(2)).unwrap();
    assert!(
        log.contains("tightened permissions under the root") && log.contains("root_was=\"0755\""),
        "no log line about tightening: {log}"
    );
    let exposed = dedupd::perms::exposed(&root).unwrap();
    assert!(exposed.is_empty(), "still open to other users: {exposed:?}");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&sock), 0o600, "snapshotter socket");
    assert_eq!(
        mode(&root.join("fanotify/holder.sock")),
        0o600,
        "holder socket"
    );
    assert_eq!(mode(&root.join("run/stats.json")), 0o600);
    for dir in ["chunks", "layers", "fanotify/blobs"] {
        for e in fs::read_dir(root.join(dir)).unwrap().flatten() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
    }
    let layer_mnt = fs::read_dir(root.join("m"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("data/big.bin").exists())
        .expect("layer-1 is mounted under m/");
    // A container on layer-1: its upper dir keeps 0755 (the exception), below 0700 dirs.
    prepare_container(&sock, "container-1", "layer-1");

    let reader = {
        let path = layer_mnt.join("data/big.bin");
        let want = big.clone();
        std::thread::spawn(move || {
            let mut f = fs::File::open(&path).unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            // Bounded by the file's size.
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(got == want, "cold read of big.bin differs");
        })
    };
    let during = scrape(port);
    reader.join().unwrap();
    let after = scrape(port);
    for scraped in [&during, &after] {
        for body in ["body_text", "body_openmetrics"] {
            let b = scraped[body].as_str().unwrap();
            assert!(
                !b.contains(root.to_str().unwrap()) && !b.contains("/var/"),
                "a path in /metrics"
            );
        }
    }
    // Families, as each parser names them (counters without `_total`), and their types.
    let text = &after["text"];
    let om = &after["openmetrics"];
    for (fam, ty) in [
        ("dedupd_requests", "counter"),
        ("dedupd_request_failures", "counter"),
        ("dedupd_fill_requests", "counter"),
        ("dedupd_fill_latency_seconds", "histogram"),
        ("dedupd_filled_bytes", "counter"),
        ("dedupd_store_served_bytes", "counter"),
        ("dedupd_registry_served_bytes", "counter"),
        ("dedupd_prefetched_bytes", "counter"),
        ("dedupd_fill_errors", "counter"),
        ("dedupd_registry_fetch_latency_seconds", "histogram"),
        ("dedupd_registry_fetched_bytes", "counter"),
        ("dedupd_registry_single_flight_joins", "counter"),
        ("dedupd_registry_retries", "counter"),
        ("dedupd_registry_fetch_errors", "counter"),
        ("dedupd_cache_bytes", "gauge"),
        ("dedupd_cache_evictions", "counter"),
        ("dedupd_cache_limit_bytes", "gauge"),
        ("dedupd_cache_bounded_bytes", "gauge"),
        ("dedupd_cache_copies_bytes", "gauge"),
        ("dedupd_cache_layers_released", "counter"),
        ("dedupd_refetches", "counter"),
        ("dedupd_store_bytes", "gauge"),
        ("dedupd_snapshots", "gauge"),
        ("dedupd_layers", "gauge"),
        ("dedupd_layers_mounted", "gauge"),
        ("dedupd_conversions", "counter"),
        ("dedupd_conversion_duration_seconds", "histogram"),
    ] {
        assert_eq!(text[fam]["type"], ty, "text format: {fam}");
        assert_eq!(om[fam]["type"], ty, "OpenMetrics: {fam}");
    }
    assert_eq!(om["dedupd_front_end"]["type"], "info");
    let fe = [("front_end", "fanotify")];
    let requests = value(text, "dedupd_requests", "dedupd_requests_total", &fe);
    assert!(requests > 0.0, "no kernel requests counted");
    let fills = value(
        text,
        "dedupd_fill_latency_seconds",
        "dedupd_fill_latency_seconds_count",
        &fe,
    );
    assert!(fills > 0.0, "no fill latencies");
    let filled = value(
        text,
        "dedupd_filled_bytes",
        "dedupd_filled_bytes_total",
        &fe,
    );
    assert!(
        filled >= big.len() as f64,
        "filled {filled} bytes for an 8 MiB cold read"
    );
    let from_store = value(
        text,
        "dedupd_store_served_bytes",
        "dedupd_store_served_bytes_total",
        &fe,
    );
    assert!(from_store > 0.0);
    assert!(value(text, "dedupd_cache_bytes", "dedupd_cache_bytes", &fe) >= big.len() as f64);
    assert_eq!(
        value(text, "dedupd_layers_mounted", "dedupd_layers_mounted", &[]),
        1.0
    );
    assert_eq!(
        value(
            text,
            "dedupd_snapshots",
            "dedupd_snapshots",
            &[("kind", "active")]
        ),
        1.0
    );
    assert!(
        value(
            om,
            "dedupd_fill_latency_seconds",
            "dedupd_fill_latency_seconds_bucket",
            &[("le", "+Inf")]
        ) == fills
    );

    // --- 3. nobody reads, lists or connects to nothing ---------------------------------
    let mut paths: Vec<String> = all_paths(&root)
        .into_iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    paths.push(sock.to_string_lossy().into_owned());
    let (shadow_in_upper, shadow_in_layer) = (
        root.join("snapshots").to_string_lossy().into_owned(),
        layer_mnt.join("etc/shadow").to_string_lossy().into_owned(),
    );
    paths.push(shadow_in_layer);
    paths.push(
        layer_mnt
            .join("data/big.bin")
            .to_string_lossy()
            .into_owned(),
    );
    assert!(paths.len() > 20, "{paths:?}");
    let list = s.dir.path().join("paths.json");
    fs::write(&list, serde_json::to_vec(&paths).unwrap()).unwrap();
    fs::set_permissions(&list, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(NOBODY_PY, &[list.to_str().unwrap(), root.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_ne!(v["uid"], 0);
    assert_eq!(
        v["got"],
        serde_json::json!([]),
        "nobody could use: {}",
        v["got"]
    );
    // The stated exception exists and is out of reach: a 0755 upper dir under 0700 dirs.
    let uppers: Vec<PathBuf> = fs::read_dir(&shadow_in_upper)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .filter(|p| p.exists())
        .collect();
    assert!(uppers.iter().any(|p| mode(p) == 0o755), "{uppers:?}");
    assert_eq!(mode(&root.join("snapshots")), 0o700);
    assert_eq!(mode(&root.join("m")), 0o700);
    // SO_PEERCRED: even on a socket loosened by hand, nobody's connection is closed.
    let sock_dir = sock.parent().unwrap();
    assert_eq!(
        mode(sock_dir),
        0o700,
        "the socket's directory, made by dedupd"
    );
    fs::set_permissions(sock_dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = as_nobody(PEERCRED_PY, &[sock.to_str().unwrap()]);
    let root_got = Command::new(PYTHON)
        .args(["-c", PEERCRED_PY, sock.to_str().unwrap()])
        .output()
        .unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(sock_dir, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(nobody.trim().ends_with("got 0 bytes"), "{nobody}");
    let root_got = String::from_utf8_lossy(&root_got.stdout);
    assert!(
        !root_got.trim().ends_with("got 0 bytes"),
        "root gets SETTINGS: {root_got}"
    );
    let log = fs::read_to_string(s.log(2)).unwrap();
    assert!(
        log.contains("snapshotter: connection refused: peer uid"),
        "{log}"
    );

    // --- 4. status: front end, cache, mounted layer with its local bytes, slow requests -
    // The cache's bytes come from a walk that runs every 2 s or more: polled.
    let deadline = Instant::now() + Duration::from_secs(20);
    let st: serde_json::Value = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_dedupd"))
            .args(["status", "--json", "--root"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(out.status.success());
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let walked = st["cache"]["bytes"].as_u64().unwrap_or(0) >= big.len() as u64;
        if walked || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(st["front_end"], "fanotify");
    assert!(st["front_end_reason"].as_str().unwrap().contains("forced"));
    assert!(
        st["cache"]["bytes"].as_u64().unwrap() >= big.len() as u64,
        "{}",
        st["cache"]
    );
    assert!(st["cache"].get("limit_bytes").is_some());
    let layers = st["snapshotter"]["layers"].as_array().unwrap();
    let l = layers
        .iter()
        .find(|l| l["mounted"] == true)
        .expect("a mounted layer");
    assert!(l["data_bytes"].as_u64().unwrap() >= big.len() as u64, "{l}");
    assert_eq!(
        l["local_bytes"], l["data_bytes"],
        "a converted layer is all local: {l}"
    );
    let slow = st["slowest"].as_array().unwrap();
    assert!(!slow.is_empty(), "no slow requests listed");
    for r in slow {
        for k in [
            "req", "blob", "offset", "len", "total_us", "store_us", "fetch_us", "write_us", "ok",
        ] {
            assert!(r.get(k).is_some(), "slow request without {k}: {r}");
        }
    }
    assert!(slow
        .windows(2)
        .all(|w| w[0]["total_us"].as_u64() >= w[1]["total_us"].as_u64()));
    let human = Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args(["status", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let human = String::from_utf8(human.stdout).unwrap();
    for want in [
        "front end: fanotify (forced",
        "cache: ",
        "mounted layers",
        "local ",
        "slowest requests",
        "kernel write",
    ] {
        assert!(human.contains(want), "no {want:?} in:\n{human}");
    }

    // --- 5. a commit restarts the front end: totals do not go back --------------------
    unpack_layer(&sock, "extract-2", "layer-1", "layer-2", |fs_dir| {
        fs::write(fs_dir.join("two.txt"), b"two\n").unwrap();
    });
    let later = scrape(port);
    let text2 = &later["text"];
    assert!(value(text2, "dedupd_requests", "dedupd_requests_total", &fe) >= requests);
    assert!(
        value(
            text2,
            "dedupd_filled_bytes",
            "dedupd_filled_bytes_total",
            &fe
        ) >= filled
    );
    assert_eq!(
        value(
            text2,
            "dedupd_conversions",
            "dedupd_conversions_total",
            &[("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            text2,
            "dedupd_conversion_duration_seconds",
            "dedupd_conversion_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(text2, "dedupd_layers_mounted", "dedupd_layers_mounted", &[]),
        2.0
    );

    // Everything removed, so that the daemon releases the fanotify group at stop.
    remove(&sock, &["container-1", "layer-2", "layer-1"]);
    s.stop();
}

#[test]
fn run_refuses_a_metrics_address_other_hosts_can_reach() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args([
            "run",
            "--front-end",
            "local",
            "--metrics-address",
            "0.0.0.0:9464",
            "--root",
        ])
        .arg(dir.path().join("root"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_address \"0.0.0.0:9464\"") && err.contains("loopback"),
        "{err}"
    );
}
