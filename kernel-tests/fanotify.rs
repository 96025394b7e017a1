//! The fanotify front end on this machine's kernel (6.14+), natively, as root: real
//! EROFS file-backed mounts over sparse blob files filled on `FAN_PRE_ACCESS` events.
//!
//! Layers are converted from tars with `dedupd convert` (and, for coverage of another
//! EROFS writer, made with `mkfs.erofs --chunksize=65536 --blobdev` and imported); the
//! daemon is the real binary (`dedupd serve-fanotify`), so that it can be killed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

const DEDUPD: &str = env!("CARGO_BIN_EXE_dedupd");

/// None (and a loud message) when this machine cannot run these tests.
fn can_run(name: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {name}: not root; fanotify pre-content tests need root");
        return false;
    }
    let dir = scratch();
    if let Err(e) = dedupd::frontend::fanotify::probe(dir.path()) {
        eprintln!("SKIP {name}: {e}");
        return false;
    }
    if Command::new("mkfs.erofs").arg("--help").output().is_err() {
        eprintln!("SKIP {name}: mkfs.erofs missing (kernel-tests/install-host-deps)");
        return false;
    }
    true
}

/// A temporary directory on the repository's filesystem (ext4, not tmpfs).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir")
}

/// A layer's source tree: relative path -> content.
type Files = BTreeMap<String, Vec<u8>>;

fn random_bytes(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Layer `k` of the standard set: random and compressible data, holes of zeros, a file
/// shared with another layer, many small files.
fn layer_files(k: u64) -> Files {
    let mut rng = rand::rngs::StdRng::seed_from_u64(k);
    let mut f = Files::new();
    match k {
        0 => {
            f.insert("random.bin".into(), random_bytes(&mut rng, 3_000_000 + 123));
            let text: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
            f.insert("dir/text.txt".into(), text.into_bytes());
            f.insert("empty".into(), vec![]);
            f.insert("dir/sub/small".into(), b"hello".to_vec());
            let mut z = vec![0u8; 1 << 20];
            z.extend_from_slice(&random_bytes(&mut rng, 70_000));
            f.insert("zeros-then-data".into(), z);
            f.insert(
                "shared.bin".into(),
                random_bytes(&mut rand::rngs::StdRng::seed_from_u64(99), 500_000),
            );
        }
        1 => {
            f.insert("big.bin".into(), random_bytes(&mut rng, 5 << 20));
            f.insert(
                "shared.bin".into(),
                random_bytes(&mut rand::rngs::StdRng::seed_from_u64(99), 500_000),
            );
            f.insert("exact-chunk".into(), random_bytes(&mut rng, 65536));
        }
        3 => {
            // Big enough that blobs stay incomplete while the kill loop runs.
            for i in 0..4 {
                f.insert(format!("cold/{i}"), random_bytes(&mut rng, 24 << 20));
            }
        }
        _ => {
            for i in 0..150 {
                let n = rng.random_range(1..20_000);
                f.insert(format!("many/{i:03}"), random_bytes(&mut rng, n));
            }
        }
    }
    f
}

fn write_tree(src: &Path, files: &Files) {
    for (rel, data) in files {
        let p = src.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
}

/// Writes `files` under `dir/src`, tars them, runs `dedupd convert`; returns the
/// diff_id hex.
fn convert_layer(root: &Path, dir: &Path, files: &Files) -> String {
    let src = dir.join("src");
    write_tree(&src, files);
    let tar = dir.join("layer.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(st.success());
    let out = Command::new(DEDUPD)
        .arg("convert")
        .arg("--root")
        .arg(root)
        .arg(&tar)
        .env("DEDUPD_LOG", "warn")
        .output()
        .expect("dedupd convert runs");
    assert!(
        out.status.success(),
        "dedupd convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    let diff_id = v["diff_id"].as_str().unwrap();
    diff_id.strip_prefix("sha256:").unwrap().to_string()
}

/// Writes `files` under `dir/src`, runs `mkfs.erofs --blobdev`, imports the image and
/// blob; returns the diff_id hex. Keeps images from another EROFS writer covered.
fn mkfs_layer(root: &Path, dir: &Path, files: &Files) -> String {
    let src = dir.join("src");
    write_tree(&src, files);
    let (image, blob) = (dir.join("image.erofs"), dir.join("blob"));
    let out = Command::new("mkfs.erofs")
        .arg("--chunksize=65536")
        .arg(format!("--blobdev={}", blob.display()))
        .arg(&image)
        .arg(&src)
        .output()
        .expect("mkfs.erofs runs");
    assert!(
        out.status.success(),
        "mkfs.erofs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = dedupd::store::Store::open(root).unwrap();
    let rec =
        dedupd::frontend::fanotify::import::import_erofs(&store, &image, &blob, 65536).unwrap();
    rec.id_hex().to_string()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    mnt: PathBuf,
    /// diff_id hex -> files.
    layers: Vec<(String, Files)>,
}

/// Layers of the standard set: `converted` through `dedupd convert`, `mkfs` through
/// mkfs.erofs and an import.
fn setup_with(converted: &[u64], mkfs: &[u64]) -> Setup {
    let dir = scratch();
    let root = dir.path().join("root");
    let mnt = dir.path().join("mnt");
    let mut layers = Vec::new();
    for &k in converted {
        let files = layer_files(k);
        let id = convert_layer(&root, &dir.path().join(format!("layer{k}")), &files);
        layers.push((id, files));
    }
    for &k in mkfs {
        let files = layer_files(k);
        let id = mkfs_layer(&root, &dir.path().join(format!("mkfs{k}")), &files);
        layers.push((id, files));
    }
    Setup {
        _dir: dir,
        root,
        mnt,
        layers,
    }
}

fn setup(converted: &[u64]) -> Setup {
    setup_with(converted, &[])
}

/// A running `dedupd serve-fanotify`.
struct Daemon {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Events a previous daemon left, answered at start: (journaled, orphans).
    recovered: (u64, u64),
}

impl Daemon {
    fn start(s: &Setup, extra: &[&str]) -> Daemon {
        let mut child = Command::new(DEDUPD)
            .arg("serve-fanotify")
            .arg("--root")
            .arg(&s.root)
            .arg("--mount-dir")
            .arg(&s.mnt)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("DEDUPD_LOG", "warn")
            .spawn()
            .expect("dedupd runs");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child: Some(child),
            lines,
            recovered: (0, 0),
        };
        let l = d
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("daemon said RECOVERED");
        let nums: Vec<u64> = l
            .strip_prefix("RECOVERED ")
            .unwrap_or_else(|| panic!("unexpected line {l:?}"))
            .split(' ')
            .map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap())
            .collect();
        d.recovered = (nums[0], nums[1]);
        let l = d
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("daemon said READY");
        assert_eq!(l, "READY");
        d
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM; returns the counters it printed.
    fn stop(mut self) -> serde_json::Value {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "daemon exit: {status}");
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("stats line");
        serde_json::from_str(&l).expect("stats JSON")
    }

    fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Unmount everything first, then end the holder (closing the group is safe only
        // once no mount uses the blobs).
        if let Ok(rd) = fs::read_dir(&self.mnt) {
            for e in rd.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Ok(pid) = fs::read_to_string(self.root.join("fanotify/holder.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn mounted(p: &Path) -> bool {
    dedupd::frontend::fanotify::mount::is_mounted(p)
}

fn holder_alive(s: &Setup) -> bool {
    let Ok(pid) = fs::read_to_string(s.root.join("fanotify/holder.pid")) else {
        return false;
    };
    let pid = pid.trim();
    // A zombie is gone for our purpose (its fds are closed).
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|st| st.split(' ').nth(2).is_some_and(|state| state != "Z"))
}

/// Reads every file of every layer through the mounts and compares.
fn check_all(s: &Setup) {
    for (id, files) in &s.layers {
        for (rel, want) in files {
            let got = fs::read(s.mnt.join(id).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert!(got == *want, "layer {id} file {rel}: content differs");
        }
    }
}

fn drop_caches() {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("stats has no {k}: {v}"))
}

/// Asserts that every event was answered.
fn all_answered(v: &serde_json::Value) {
    assert_eq!(
        num(v, "events"),
        num(v, "allowed") + num(v, "denied"),
        "{v}"
    );
}

/// Joins the reader threads, stops the daemon, and checks that every event was answered
/// and none denied; returns the counters.
fn join_readers_and_stop(
    threads: Vec<std::thread::JoinHandle<()>>,
    d: Daemon,
) -> serde_json::Value {
    for t in threads {
        t.join().expect("reader");
    }
    let st = d.stop();
    all_answered(&st);
    assert_eq!(num(&st, "denied"), 0, "{st}");
    st
}

#[test]
fn every_file_of_several_layers_reads_back_and_remount_does_no_refetch() {
    if !can_run("every_file_of_several_layers_reads_back") {
        return;
    }
    let s = setup_with(&[0, 1, 2], &[0, 2]);
    let d = Daemon::start(&s, &[]);
    for (id, _) in &s.layers {
        assert!(mounted(&s.mnt.join(id)));
    }
    drop_caches();
    check_all(&s);
    // Read again from a cold page cache: blobs are complete now (or almost), so no
    // chunk is fetched again.
    drop_caches();
    check_all(&s);
    let first = d.stop();
    all_answered(&first);
    assert_eq!(num(&first, "denied"), 0, "{first}");
    assert!(num(&first, "chunks_fetched") > 0, "{first}");
    assert!(
        num(&first, "unmarked") >= 3,
        "every blob was read whole: {first}"
    );
    for (id, _) in &s.layers {
        assert!(!mounted(&s.mnt.join(id)), "unmounted on SIGTERM");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while holder_alive(&s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!holder_alive(&s), "the holder exits after BYE");

    // Remount: the blob files are complete, so nothing is fetched and no event fires.
    let d = Daemon::start(&s, &[]);
    drop_caches();
    check_all(&s);
    let second = d.stop();
    assert_eq!(
        num(&second, "chunks_fetched"),
        0,
        "remount refetched: {second}"
    );
    assert_eq!(
        num(&second, "events"),
        0,
        "complete blobs are not marked: {second}"
    );
}

#[test]
fn concurrent_readers_at_random_offsets() {
    if !can_run("concurrent_readers_at_random_offsets") {
        return;
    }
    let s = Arc::new(setup(&[0, 1]));
    let d = Daemon::start(&s, &["--workers", "2"]);
    drop_caches();
    let files: Vec<(PathBuf, Arc<Vec<u8>>)> = s
        .layers
        .iter()
        .flat_map(|(id, files)| {
            files
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(rel, v)| (s.mnt.join(id).join(rel), Arc::new(v.clone())))
                .collect::<Vec<_>>()
        })
        .collect();
    let files = Arc::new(files);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let files = files.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + t);
                for _ in 0..300 {
                    let (path, want) = &files[rng.random_range(0..files.len())];
                    let off = rng.random_range(0..want.len());
                    let len = rng.random_range(1..=200_000).min(want.len() - off);
                    let f = fs::File::open(path).unwrap();
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(
                        buf == want[off..off + len],
                        "{} at {off}+{len}",
                        path.display()
                    );
                }
            })
        })
        .collect();
    join_readers_and_stop(threads, d);
}

/// Several readers walk the same files front to back at once, with prefetch on: events
/// that land on a range a request in flight is writing wait for it instead of filling
/// it again, so no slot of any blob is read from the store twice.
#[test]
fn concurrent_sequential_readers_fill_each_slot_once() {
    if !can_run("concurrent_sequential_readers_fill_each_slot_once") {
        return;
    }
    let s = Arc::new(setup(&[0, 1]));
    let slots: u64 = {
        let store = dedupd::store::Store::open(&s.root).unwrap();
        let mut blobs = std::collections::BTreeSet::new();
        for (id, _) in &s.layers {
            blobs.extend(store.layer(id).unwrap().unwrap().blobs);
        }
        blobs
            .iter()
            .map(|b| store.blob_table(b).unwrap().unwrap().entries().len() as u64)
            .sum()
    };
    let d = Daemon::start(&s, &["--workers", "2"]);
    drop_caches();
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                for (id, files) in &s.layers {
                    for (rel, want) in files.iter().filter(|(_, v)| !v.is_empty()) {
                        let path = s.mnt.join(id).join(rel);
                        let f = fs::File::open(&path).unwrap();
                        let mut off = 0;
                        // Bounded by the file's length.
                        while off < want.len() {
                            let len = (128 << 10).min(want.len() - off);
                            let mut buf = vec![0u8; len];
                            f.read_exact_at(&mut buf, off as u64).unwrap();
                            assert!(
                                buf == want[off..off + len],
                                "{} at {off}+{len}",
                                path.display()
                            );
                            off += len;
                        }
                    }
                }
            })
        })
        .collect();
    let st = join_readers_and_stop(threads, d);
    assert!(
        num(&st, "chunks_fetched") <= slots,
        "{} chunks fetched for {slots} slots: some were filled twice; {st}",
        num(&st, "chunks_fetched")
    );
}

#[test]
fn a_corrupt_chunk_gives_eio_and_everything_else_is_served() {
    if !can_run("a_corrupt_chunk_gives_eio") {
        return;
    }
    let s = setup(&[1]);
    // Corrupt one chunk record of big.bin's data in its pack (a payload byte).
    let victim = {
        let store = dedupd::store::Store::open(&s.root).unwrap();
        let layer = store.layer(&s.layers[0].0).unwrap().unwrap();
        let table = store.blob_table(&layer.blobs[0]).unwrap().unwrap();
        let e = table.entries()[20];
        let loc = e.loc.unwrap();
        let pack = store.pack_path(loc.pack);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .unwrap();
        let at = loc.offset + 48 + u64::from(loc.stored_len) / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
        e.blob_offset
    };
    let d = Daemon::start(&s, &[]);
    drop_caches();
    let (id, files) = &s.layers[0];
    // mkfs.erofs places file chunks at 4 KiB-aligned blob offsets and the import cuts
    // the blob every 64 KiB, so one corrupt stored chunk touches one or two adjacent
    // 64 KiB windows of one file.
    let mut failed = Vec::new();
    for (rel, want) in files {
        let f = fs::File::open(s.mnt.join(id).join(rel)).unwrap();
        // Read chunk by chunk, so that exactly the corrupt chunk's window fails.
        for (w, window) in want.chunks(65536).enumerate() {
            let mut buf = vec![0u8; window.len()];
            match f.read_exact_at(&mut buf, (w * 65536) as u64) {
                Ok(()) => assert!(buf == window, "{rel} window {w}: wrong bytes"),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{rel} window {w}: {e}");
                    failed.push((rel.clone(), w));
                }
            }
        }
    }
    let ok = match failed.as_slice() {
        [_] => true,
        [(a, x), (b, y)] => a == b && x + 1 == *y,
        _ => false,
    };
    assert!(
        ok,
        "only the corrupt chunk (blob offset {victim}) fails: {failed:?}"
    );
    let st = d.stop();
    all_answered(&st);
    assert!(num(&st, "denied") >= 1, "{st}");
}

#[test]
fn marks_come_before_mounts_and_shutdown_unmounts_first() {
    if !can_run("marks_come_before_mounts") {
        return;
    }
    let s = setup(&[0]);
    let d = Daemon::start(&s, &[]);
    let (id, files) = &s.layers[0];
    // At READY the blob is mounted but still (almost) all holes: only the priming
    // read's chunk is there. Reading through the mount must fill it, not see zeros.
    let store_blob = {
        let dir = s.root.join("fanotify/blobs");
        fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path()
    };
    let f = fs::File::open(&store_blob).unwrap();
    let size = f.metadata().unwrap().len();
    // SAFETY: lseek on an open fd.
    let first_hole =
        unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_HOLE) };
    assert!((first_hole as u64) < size, "blob is sparse at mount time");
    drop(f);
    let want = &files["random.bin"];
    let got = fs::read(s.mnt.join(id).join("random.bin")).unwrap();
    assert!(got == *want);
    // A reader holds the mount open: SIGTERM cannot unmount it, so the daemon keeps
    // the group with the holder (exits with an error), and the mount keeps working.
    let busy = fs::File::open(s.mnt.join(id).join("dir/text.txt")).unwrap();
    let pid = d.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut d = d;
    let status = d.child.take().unwrap().wait().unwrap();
    assert!(!status.success(), "a busy mount makes shutdown fail loudly");
    assert!(
        holder_alive(&s),
        "the holder keeps the group while a mount is busy"
    );
    assert!(mounted(&s.mnt.join(id)));
    // A successor takes over the live mount and serves it.
    let d = Daemon::start(&s, &[]);
    let mut buf = vec![0u8; 100_000];
    busy.read_exact_at(&mut buf, 50_000).unwrap();
    assert!(buf == files["dir/text.txt"][50_000..150_000]);
    drop(busy);
    let st = d.stop();
    all_answered(&st);
    assert_eq!(st["continued"], serde_json::Value::Bool(true), "{st}");
    assert!(!mounted(&s.mnt.join(id)));
}

#[test]
fn without_a_successor_the_holder_fails_reads_with_eio_not_zeros() {
    if !can_run("without_a_successor_the_holder_fails_closed") {
        return;
    }
    let s = setup(&[1]);
    let d = Daemon::start(&s, &["--grace-ms", "500"]);
    let (id, files) = &s.layers[0];
    d.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    drop_caches();
    // The blob is unfilled past the priming chunk: reads fail loudly.
    let f = fs::File::open(s.mnt.join(id).join("big.bin")).unwrap();
    let mut buf = vec![0u8; 65536];
    let r = f.read_exact_at(&mut buf, 3 << 20);
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        Ok(()) => panic!("read an unfilled range with no daemon: got bytes, want EIO"),
    }
    // A daemon that comes back serves again.
    let d = Daemon::start(&s, &[]);
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert!(buf == files["big.bin"][3 << 20..(3 << 20) + 65536]);
    drop(f);
    let st = d.stop();
    all_answered(&st);
}

#[test]
fn kill_9_loop_never_shows_wrong_bytes() {
    if !can_run("kill_9_loop_never_shows_wrong_bytes") {
        return;
    }
    let s = Arc::new(setup(&[3, 2]));
    let mut d = Daemon::start(&s, &["--grace-ms", "60000"]);
    let (mut journaled, mut orphans) = (0u64, 0u64);
    let files: Arc<Vec<(PathBuf, Vec<u8>)>> = Arc::new(
        s.layers
            .iter()
            .flat_map(|(id, files)| {
                files
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(rel, v)| (s.mnt.join(id).join(rel), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mismatches = Arc::new(AtomicU64::new(0));
    let eio = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
    let round_max_us = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let readers: Vec<_> = (0..8usize)
        .map(|t| {
            let (files, stop, mismatches, eio, reads, progress, round_max_us) = (
                files.clone(),
                stop.clone(),
                mismatches.clone(),
                eio.clone(),
                reads.clone(),
                progress.clone(),
                round_max_us.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                while !stop.load(Ordering::Relaxed) {
                    let (path, want) = &files[rng.random_range(0..files.len())];
                    let off = rng.random_range(0..want.len());
                    let len = rng.random_range(1..=131_072).min(want.len() - off);
                    let mut buf = vec![0u8; len];
                    let began = Instant::now();
                    let f = fs::File::open(path).unwrap();
                    let r = f.read_exact_at(&mut buf, off as u64);
                    round_max_us.fetch_max(began.elapsed().as_micros() as u64, Ordering::Relaxed);
                    match r {
                        Ok(()) => {
                            if buf != want[off..off + len] {
                                mismatches.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            eio.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    progress[t].store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Issue 15 asks for 100 kills; DEDUPD_KILL_ROUNDS to change it.
    let rounds: usize = std::env::var("DEDUPD_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (mut restarts, mut waits) = (Vec::new(), Vec::new());
    for _round in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        let killed = Instant::now();
        d.kill9();
        waits.push(Duration::from_micros(
            round_max_us.swap(0, Ordering::Relaxed),
        ));
        // Keep the readers cold: events must be in flight when the next kill lands.
        drop_caches();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
        d = Daemon::start(&s, &["--grace-ms", "60000"]);
        restarts.push(killed.elapsed());
        journaled += d.recovered.0;
        orphans += d.recovered.1;
    }
    std::thread::sleep(Duration::from_millis(500));
    waits.push(Duration::from_micros(
        round_max_us.swap(0, Ordering::Relaxed),
    ));
    stop.store(true, Ordering::Relaxed);
    restarts.sort();
    waits.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() - 1) * p / 100];
    eprintln!(
        "kill -9 loop: {rounds} kills; kill to ready p50 {:?} p99 {:?}; longest read per round p50 {:?} p99 {:?} max {:?}",
        pct(&restarts, 50),
        pct(&restarts, 99),
        pct(&waits, 50),
        pct(&waits, 99),
        pct(&waits, 100)
    );
    // No reader stuck for good: each finishes its current read within a bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    for r in readers {
        while !r.is_finished() {
            assert!(
                Instant::now() < deadline,
                "a reader is stuck: {:?}",
                progress
                    .iter()
                    .map(|p| p.load(Ordering::Relaxed))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r.join().unwrap();
    }
    eprintln!(
        "kill -9 loop: {} reads, {} EIO, {} mismatches; successors answered {journaled} journaled and {orphans} orphaned events",
        reads.load(Ordering::Relaxed),
        eio.load(Ordering::Relaxed),
        mismatches.load(Ordering::Relaxed)
    );
    assert_eq!(
        mismatches.load(Ordering::Relaxed),
        0,
        "a reader saw wrong bytes"
    );
    assert!(reads.load(Ordering::Relaxed) > 0);
    // After the storm, everything reads back exactly.
    drop_caches();
    check_all(&s);
    let st = d.stop();
    all_answered(&st);
}

/// The kernel facts the crash design rests on, checked on this kernel: a permission
/// event stays pending after the fd it was delivered with is closed (as when its reader
/// dies), any holder of the group can answer it by that fd *number*, and the orphan
/// probe answers it with EIO.
#[test]
fn pending_events_outlive_their_reader_and_are_answered_by_fd_number() {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use dedupd::frontend::fanotify::{event, holder, journal::Journal, sys};
    if !can_run("pending_events_outlive_their_reader") {
        return;
    }
    let dir = scratch();
    let path = dir.path().join("marked");
    let f = fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    let group = sys::init_group().unwrap();
    sys::mark(
        group.as_fd(),
        sys::FAN_MARK_ADD,
        sys::FAN_PRE_ACCESS,
        f.as_fd(),
    )
    .unwrap();
    let read_one = |g: &OwnedFd| -> event::Event {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "no event");
            if let Ok(n) = nix::unistd::read(g, &mut buf) {
                let mut evs = Vec::new();
                event::parse(&buf[..n], &mut evs).unwrap();
                assert_eq!(evs.len(), 1);
                return evs[0];
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for (response, want_ok) in [(sys::FAN_ALLOW, true), (sys::FAN_DENY_EIO, false)] {
        let p = path.clone();
        let reader = std::thread::spawn(move || {
            let f = fs::File::open(&p).unwrap();
            let mut b = [0u8; 10];
            f.read_at(&mut b, 8192).map_err(|e| e.raw_os_error())
        });
        let ev = read_one(&group);
        assert_eq!(ev.range.map(|r| r.0), Some(8192));
        // The "dead daemon" closes its event fd without answering.
        // SAFETY: the fd was installed for us by the read; closed once.
        drop(unsafe { OwnedFd::from_raw_fd(ev.fd) });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !reader.is_finished(),
            "the event stays pending after its fd closed"
        );
        if want_ok {
            assert!(sys::respond(group.as_fd(), ev.fd, response).unwrap());
            assert_eq!(reader.join().unwrap(), Ok(10));
        } else {
            let journal = Journal::map(Journal::create().unwrap()).unwrap();
            journal.raise_probe_fd_limit(1024);
            assert_eq!(holder::probe_orphans(group.as_fd(), &journal), 1);
            assert_eq!(reader.join().unwrap(), Err(Some(libc::EIO)));
        }
    }
}

#[test]
fn a_dead_holder_is_replaced_and_the_group_survives_a_daemon_crash() {
    if !can_run("a_dead_holder_is_replaced") {
        return;
    }
    let s = setup(&[1]);
    let d = Daemon::start(&s, &["--grace-ms", "60000"]);
    let pid_file = s.root.join("fanotify/holder.pid");
    let old = fs::read_to_string(&pid_file).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.trim().parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let adopted = || {
        fs::read_to_string(s.root.join("fanotify/holder.log"))
            .is_ok_and(|l| l.contains("adopted a running daemon's group"))
    };
    while !(fs::read_to_string(&pid_file).unwrap() != old && holder_alive(&s) && adopted()) {
        assert!(
            Instant::now() < deadline,
            "no replacement holder adopted the group"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Now the daemon dies too: the replacement holder must still hold the group.
    d.kill9();
    let d = Daemon::start(&s, &[]);
    drop_caches();
    check_all(&s);
    let st = d.stop();
    all_answered(&st);
    assert_eq!(
        st["continued"],
        serde_json::Value::Bool(true),
        "the group survived: {st}"
    );
}

/// A blob file deleted and made again (its layer removed and pulled again) while the
/// holder still keeps a write fd of the old file: the new daemon must not adopt that fd.
/// Prefetch through it would fill the dead inode and mark the new file's pages as
/// filled, and they would read as zeros.
#[test]
fn a_blob_file_made_again_never_gets_the_old_files_writer() {
    if !can_run("a_blob_file_made_again_never_gets_the_old_files_writer") {
        return;
    }
    let s = setup(&[11, 12]);
    let d = Daemon::start(&s, &[]);
    check_all(&s);
    // A crash: the holder keeps the group and every blob's write fd.
    d.kill9();
    assert!(holder_alive(&s), "the holder outlives the daemon");
    for e in fs::read_dir(&s.mnt).unwrap().flatten() {
        nix::mount::umount2(&e.path(), nix::mount::MntFlags::empty()).unwrap();
    }
    let blobs = s.root.join("fanotify/blobs");
    let mut deleted = 0;
    for e in fs::read_dir(&blobs).unwrap().flatten() {
        fs::remove_file(e.path()).unwrap();
        deleted += 1;
    }
    assert!(deleted >= 2, "{deleted} blob files in {}", blobs.display());
    drop_caches();
    let d = Daemon::start(&s, &[]);
    check_all(&s);
    all_answered(&d.stop());
}

/// Waits up to `bound` for the holder to be gone.
fn holder_gone_within(s: &Setup, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while holder_alive(s) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Issue 15.3: a holder stays while mounts use its blobs, and leaves on its own once
/// they are gone, even when the root itself was removed meanwhile (the blob files then
/// have no path: the holder finds them by their file handles).
#[test]
fn a_holder_leaves_once_no_mount_uses_its_blobs_even_with_the_root_gone() {
    if !can_run("a_holder_leaves_once_no_mount_uses_its_blobs") {
        return;
    }
    let s = setup(&[1, 2]);
    let d = Daemon::start(&s, &["--grace-ms", "60000"]);
    // Fill part of one blob only: the others stay marked (never read through a daemon,
    // so the holder keeps no write fd for them).
    let (id, files) = &s.layers[0];
    let mut buf = vec![0u8; 4096];
    let f = fs::File::open(s.mnt.join(id).join("big.bin")).unwrap();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == files["big.bin"][..4096]);
    drop(f);
    d.kill9();
    let pid = fs::read_to_string(s.root.join("fanotify/holder.pid")).unwrap();
    std::thread::sleep(dedupd::frontend::fanotify::holder::IDLE_EXIT + Duration::from_secs(2));
    assert!(
        holder_alive(&s),
        "the holder left while mounts still use its blobs"
    );
    for e in fs::read_dir(&s.mnt).unwrap().flatten() {
        nix::mount::umount2(&e.path(), nix::mount::MntFlags::empty()).unwrap();
    }
    // The root goes too (a test harness or an operator cleaning up): blob files lose
    // their paths while the group's marks still pin them.
    fs::remove_dir_all(&s.root).unwrap();
    let bound = dedupd::frontend::fanotify::holder::IDLE_EXIT + Duration::from_secs(10);
    let deadline = Instant::now() + bound;
    while dedupd::frontend::holder::process_alive(pid.trim().parse().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the holder (pid {}) still runs {bound:?} after the last mount went",
            pid.trim()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 15.3: `dedupd teardown` refuses while a daemon runs on the root or a file of a
/// layer is open, changing nothing in use; once nothing uses the layers it unmounts
/// them and ends the holder.
#[test]
fn teardown_refuses_while_a_layer_is_used_and_then_ends_everything() {
    if !can_run("teardown_refuses_while_a_layer_is_used") {
        return;
    }
    let mut s = setup(&[1, 2]);
    // Layer mounts under the root, as the snapshotter makes them.
    s.mnt = s.root.join("m");
    let teardown = |s: &Setup| {
        Command::new(DEDUPD)
            .args(["teardown", "--root"])
            .arg(&s.root)
            .env("DEDUPD_LOG", "warn")
            .output()
            .expect("dedupd teardown runs")
    };
    let d = Daemon::start(&s, &["--grace-ms", "60000"]);
    let out = teardown(&s);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "teardown with a daemon running");
    assert!(
        err.contains("stop the daemon first") || err.contains("stop it first"),
        "{err}"
    );
    assert!(
        s.layers.iter().all(|(id, _)| mounted(&s.mnt.join(id))),
        "teardown unmounted a layer under a running daemon"
    );
    let (id0, files0) = &s.layers[0];
    let (id1, _) = &s.layers[1];
    let mut buf = vec![0u8; 4096];
    let held = fs::File::open(s.mnt.join(id0).join("big.bin")).unwrap();
    held.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == files0["big.bin"][..4096]);
    d.kill9();
    let out = teardown(&s);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "teardown with a file of a layer open"
    );
    assert!(
        err.contains("in use") && err.contains(id0.as_str()),
        "{err}"
    );
    assert!(mounted(&s.mnt.join(id0)), "a layer in use stays mounted");
    assert!(
        !mounted(&s.mnt.join(id1)),
        "a layer nothing uses is unmounted"
    );
    assert!(holder_alive(&s), "the holder stays while a layer is in use");
    drop(held);
    let out = teardown(&s);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ended: fanotify holder"), "{text}");
    assert!(!mounted(&s.mnt.join(id0)));
    assert!(
        holder_gone_within(&s, Duration::from_secs(5)),
        "holder still runs"
    );
    // Nothing left to do: a second teardown succeeds and ends nothing.
    let out = teardown(&s);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no holder was running"));
}
