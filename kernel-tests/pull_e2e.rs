//! `dedupd pull` and the CRI plugin's `PullImage`, end to end, natively, as root: a real
//! registry (`docker-registry` on 127.0.0.1), containerd 1.6 with its CRI plugin on its
//! own socket and state directories (no CNI: image calls need none), and `dedupd run` as
//! the `dedup` proxy snapshotter, with lazy pull on.
//!
//! - Without an artifact, `dedupd pull` falls back to a full pull of each layer (blob
//!   into the content store, containerd's diff service, commit), the image lists, runs,
//!   and `ctr image rm` plus GC free it; `ctr image pull --snapshotter=dedup` still works.
//! - With an artifact (`dedupd publish`, when this tree has it), every layer's Prepare
//!   answers ALREADY_EXISTS: the daemon logs "layer pulled lazily", containerd's content
//!   store holds no layer blob, and the image runs.
//! - The CRI: `runtime.v1.ImageService/PullImage` over gRPC as the kubelet calls it, with
//!   `snapshotter = "dedup"` and `disable_snapshot_annotations = false`: the CRI labels
//!   reach the snapshotter (the daemon's log names the image and each layer), and
//!   `ctr -n k8s.io run --snapshotter=dedup` runs the image.
//!
//! Tests run one at a time (each has its own registry, containerd and dedupd); every
//! process is killed and every mount undone on drop, pass or fail. `KEEP=1` keeps the
//! scratch directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::registry::{hosts_toml, TestRegistry};

/// The CRI (`runtime.v1`), client side.
#[allow(clippy::all)]
mod cri {
    tonic::include_proto!("runtime.v1");
}

/// One test at a time: each runs a containerd, its shims and a dedupd.
static SERIAL: Mutex<()> = Mutex::new(());
/// Longest wait for a daemon to start, a GC to happen or a log line to appear.
const WAIT: Duration = Duration::from_secs(30);
/// Longest a single command (a pull, a `ctr run`) may take.
const COMMAND_TIMEOUT_S: &str = "120";
const TOOLS: [&str; 10] = [
    "containerd",
    "ctr",
    "runc",
    "docker-registry",
    "skopeo",
    "umoci",
    "busybox",
    "tar",
    "timeout",
    "script",
];

fn dedupd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dedupd")
}

/// A registry, a containerd (CRI on) and a dedupd, in one scratch directory.
struct Env {
    dir: tempfile::TempDir,
    registry: TestRegistry,
    hosts: PathBuf,
    csock: PathBuf,
    dedupd: Option<Child>,
    containerd: Option<Child>,
}

/// `Some(env)`, or `None` after a loud message when this machine cannot run the test.
fn env(test: &str) -> Option<Env> {
    env_with(test, "")
}

/// [`env`] with `toml` added to dedupd's config: `[lazy] stream = false` keeps the
/// fallback a `ctr`-style pull (containerd downloads and unpacks, dedupd converts at
/// Commit) for layers without an artifact.
fn env_with(test: &str, toml: &str) -> Option<Env> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("!!!!!!!! SKIPPED {test}: needs root (mounts, containerd) !!!!!!!!");
        return None;
    }
    for t in TOOLS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{t} missing: run kernel-tests/install-host-deps");
    }
    Some(Env::start(toml))
}

/// dedupd's config for the tests of the full-pull fallback.
const NO_STREAM: &str = "[lazy]\nstream = false\n";

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Text without terminal colour sequences (the daemon's log has them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Env {
    fn start(extra_config: &str) -> Env {
        // Under /var/tmp: the store, file-backed EROFS and overlay uppers want ext4, not
        // tmpfs; short, as the snapshotter's layer mountpoints sit under it.
        let dir = tempfile::Builder::new()
            .prefix("dpull")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path().to_path_buf();
        let registry = TestRegistry::plain();
        let h = &registry.host;
        // One host configuration for everyone: containerd's CRI plugin, the daemon's
        // lazy puller, `dedupd pull` and `dedupd publish`.
        let hosts = hosts_toml(
            &d.join("hosts"),
            h,
            &format!(
                "server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n"
            ),
        );
        std::fs::write(
            d.join("dedupd.toml"),
            format!(
                "[registry]\nhosts_dir = \"{}\"\n{extra_config}",
                hosts.display()
            ),
        )
        .unwrap();
        let sock = d.join("run/dedupd.sock");
        let dedupd = spawn_logged(
            Command::new(dedupd_bin())
                .arg("run")
                .arg("--root")
                .arg(d.join("dd"))
                .arg("--socket")
                .arg(&sock)
                .arg("--config")
                .arg(d.join("dedupd.toml"))
                .env("DEDUPD_LOG", "info"),
            &d.join("dedupd.log"),
        );
        let mut env = Env {
            registry,
            hosts,
            csock: d.join("containerd/containerd.sock"),
            dedupd: Some(dedupd),
            containerd: None,
            dir,
        };
        wait_until("dedupd's socket", || sock.exists());
        let c = d.join("containerd");
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                r#"version = 2
root = "{c}/root"
state = "{c}/state"
[grpc]
  address = "{c}/containerd.sock"
[ttrpc]
  address = "{c}/containerd.sock.ttrpc"
[debug]
  address = "{c}/debug.sock"
[proxy_plugins]
  [proxy_plugins.dedup]
    type = "snapshot"
    address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "dedup"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#,
                c = c.display(),
                sock = sock.display(),
                hosts = env.hosts.display(),
                d = d.display(),
            ),
        )
        .unwrap();
        env.containerd = Some(spawn_logged(
            Command::new("containerd")
                .arg("--config")
                .arg(d.join("containerd.toml")),
            &d.join("containerd.log"),
        ));
        wait_until("containerd", || {
            env.csock.exists()
                && Command::new("ctr")
                    .arg("-a")
                    .arg(&env.csock)
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
        let plugins = env.ctr_ok("default", &["plugins", "ls"]);
        assert!(
            plugins
                .lines()
                .any(|l| l.contains(" dedup ") && l.trim_end().ends_with("ok")),
            "containerd did not load the dedup proxy plugin:\n{plugins}"
        );
        env
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.path().join("dedupd.log")).unwrap_or_default())
    }

    /// Lines of the daemon's log holding every one of `parts`.
    fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.path().join("containerd.log")).unwrap_or_default()
    }

    /// `timeout ... ctr -a SOCK -n NS ARGS`.
    fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg(COMMAND_TIMEOUT_S)
            .arg("ctr")
            .arg("-a")
            .arg(&self.csock)
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap()
    }

    fn ctr_ok(&self, ns: &str, args: &[&str]) -> String {
        let o = self.ctr(ns, args);
        assert!(
            o.status.success(),
            "ctr -n {ns} {}: {}\n{}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// `ctr run --rm --snapshotter=dedup IMAGE ID sh -c SCRIPT`, its output. ctr 1.6 can
    /// lose all output of a task that exits at once (see `kernel-tests/snapshotter-e2e`):
    /// a run that succeeds with no output runs once more.
    fn run_out(&self, ns: &str, image: &str, id: &str, script: &str) -> String {
        let args = [
            "run",
            "--rm",
            "--snapshotter=dedup",
            image,
            id,
            "sh",
            "-c",
            script,
        ];
        let out = self.ctr_ok(ns, &args);
        if !out.is_empty() {
            return out;
        }
        eprintln!("note: ctr run {image} succeeded with no output; running it once more");
        self.ctr_ok(ns, &args)
    }

    /// `dedupd pull` with `-a` and `-n`, or (`by_env`) `CONTAINERD_ADDRESS` and
    /// `CONTAINERD_NAMESPACE`.
    fn dedupd_pull(&self, ns: &str, image: &str, by_env: bool) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg(COMMAND_TIMEOUT_S)
            .arg(dedupd_bin())
            .arg("pull")
            .arg("--hosts-dir")
            .arg(&self.hosts);
        if by_env {
            cmd.env("CONTAINERD_ADDRESS", &self.csock)
                .env("CONTAINERD_NAMESPACE", ns);
        } else {
            cmd.arg("-a").arg(&self.csock).args(["-n", ns]);
        }
        cmd.arg(image).output().unwrap()
    }

    fn dedupd_pull_ok(&self, ns: &str, image: &str, by_env: bool) -> String {
        let o = self.dedupd_pull(ns, image, by_env);
        assert!(
            o.status.success(),
            "dedupd pull {image}: {}\n{}\ndaemon log tail:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            tail(&self.log(), 15)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// The digests in namespace `ns`'s content store.
    fn content(&self, ns: &str) -> Vec<String> {
        self.ctr_ok(ns, &["content", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The `dedup` snapshots of namespace `ns` (names).
    fn snapshots(&self, ns: &str) -> Vec<String> {
        self.ctr_ok(ns, &["snapshots", "--snapshotter", "dedup", "ls"])
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
            .collect()
    }

    /// Removes `image` from `ns` and waits for GC to free its blobs and snapshots.
    fn remove_and_wait_empty(&self, ns: &str, image: &str) {
        self.ctr_ok(ns, &["image", "rm", "--sync", image]);
        wait_until(&format!("GC to empty namespace {ns}"), || {
            self.content(ns).is_empty() && self.snapshots(ns).is_empty()
        });
    }

    /// Builds an image from layer directories (base first) and pushes it as
    /// `REGISTRY/name:1`; returns that reference.
    fn push_image(&self, name: &str, layers: &[PathBuf]) -> String {
        let oci = self.path().join("oci").join(name);
        let image = format!("{}:{name}", oci.display());
        run(Command::new("umoci").args(["init", "--layout"]).arg(&oci));
        run(Command::new("umoci").args(["new", "--image", &image]));
        for (i, l) in layers.iter().enumerate() {
            let t = self.path().join(format!("oci/{name}-{i}.tar"));
            run(Command::new("tar")
                .args([
                    "--numeric-owner",
                    "--owner=0",
                    "--group=0",
                    "--sort=name",
                    "--mtime=@1700000000",
                    "-C",
                ])
                .arg(l)
                .arg("-cf")
                .arg(&t)
                .arg("."));
            run(Command::new("umoci")
                .args(["raw", "add-layer", "--image", &image])
                .arg(&t));
        }
        run(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "sh"]));
        let reference = format!("{}/{name}:1", self.registry.host);
        run(Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{image}"))
            .arg(format!("docker://{reference}")));
        reference
    }

    /// A base layer: static busybox with the applets the checks use (made once; the
    /// same tree, hence the same layer, each time).
    fn base_layer(&self) -> PathBuf {
        let l = self.path().join("layers/base");
        if l.exists() {
            return l;
        }
        std::fs::create_dir_all(l.join("bin")).unwrap();
        std::fs::create_dir_all(l.join("etc")).unwrap();
        let busybox =
            String::from_utf8(run(Command::new("sh").args(["-c", "command -v busybox"]))).unwrap();
        std::fs::copy(busybox.trim(), l.join("bin/busybox")).unwrap();
        for a in ["sh", "cat", "ls", "wc", "sha256sum", "cut"] {
            std::os::unix::fs::symlink("busybox", l.join("bin").join(a)).unwrap();
        }
        std::fs::write(l.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        l
    }

    /// A layer with `/data/NAME.txt` ("NAME content") and 2 MiB of random bytes.
    fn data_layer(&self, name: &str) -> PathBuf {
        let l = self.path().join("layers").join(name);
        std::fs::create_dir_all(l.join("data")).unwrap();
        std::fs::write(
            l.join(format!("data/{name}.txt")),
            format!("{name} content\n"),
        )
        .unwrap();
        let mut noise = vec![0u8; 2 << 20];
        rand::fill(&mut noise[..]);
        std::fs::write(l.join("data/noise.bin"), noise).unwrap();
        l
    }

    /// Whether this dedupd has `publish` (a later change may add it).
    fn has_publish(&self) -> bool {
        Command::new(dedupd_bin())
            .args(["publish", "--help"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// `dedupd publish IMAGE` into a store of its own (the daemon holds its store).
    fn publish(&self, image: &str) {
        let out = run(Command::new("timeout")
            .arg(COMMAND_TIMEOUT_S)
            .arg(dedupd_bin())
            .arg("publish")
            .arg(image)
            .arg("--root")
            .arg(self.path().join("publish-root"))
            .arg("--hosts-dir")
            .arg(&self.hosts));
        let summary: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        eprintln!(
            "published {image}: {} blobs, {} bytes uploaded",
            summary["blobs_uploaded"], summary["bytes_uploaded"]
        );
    }

    /// Pushes an OCI index naming `image`'s manifest for this platform as
    /// `REGISTRY/name:index`; returns that reference.
    fn push_index(&self, image: &str, name: &str) -> String {
        use dedupd::registry::{ImageRef, Registry, RegistryOptions, OCI_INDEX};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let registry = Registry::new(RegistryOptions {
            hosts_dir: self.hosts.clone(),
            docker_config: None,
            ..RegistryOptions::default()
        })
        .unwrap();
        let m = rt
            .block_on(registry.get_manifest(&ImageRef::parse(image).unwrap()))
            .unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": m.media_type,
                "digest": m.digest,
                "size": m.bytes.len(),
                "platform": {"architecture": dedupd::remote::image::this_arch(), "os": "linux"},
            }],
        });
        let reference = format!("{}/{name}:index", self.registry.host);
        rt.block_on(registry.push_manifest(
            &ImageRef::parse(&reference).unwrap(),
            OCI_INDEX,
            serde_json::to_vec(&index).unwrap().into(),
        ))
        .unwrap();
        reference
    }

    /// The layer digests of `image`'s manifest.
    fn layer_digests(&self, image: &str) -> Vec<String> {
        let raw = run(Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{image}")));
        let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Tasks first (a `ctr run --rm` that failed may leave one), then the daemons.
        for ns in ["pull", "lazy", "k8s.io", "default"] {
            if let Ok(o) = Command::new("ctr")
                .arg("-a")
                .arg(&self.csock)
                .args(["-n", ns, "tasks", "ls", "-q"])
                .output()
            {
                for t in String::from_utf8_lossy(&o.stdout).lines() {
                    let _ = Command::new("ctr")
                        .arg("-a")
                        .arg(&self.csock)
                        .args(["-n", ns, "tasks", "kill", "-s", "KILL", t])
                        .output();
                }
            }
        }
        for child in [self.containerd.take(), self.dedupd.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        // Shims of this containerd: their command line names its socket.
        let csock = self.csock.to_string_lossy().into_owned();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("containerd-shim") && cmdline.contains(&csock) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let holder = self.path().join("dd/fanotify/holder.pid");
        if let Ok(pid) = std::fs::read_to_string(&holder) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        // Everything mounted under the scratch dir, deepest first.
        let root = self.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&root))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            if nix::mount::umount(m).is_err() {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if std::env::var_os("KEEP").is_some_and(|v| v == "1") {
            let d = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept {}", d.keep().display());
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited within 20 s.
fn stop(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn dedupd_pull_without_an_artifact_pulls_in_full_and_gc_frees_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(env) = env_with(
        "dedupd_pull_without_an_artifact_pulls_in_full_and_gc_frees_it",
        NO_STREAM,
    ) else {
        return;
    };
    let started = Instant::now();
    let base = env.base_layer();
    let data = env.data_layer("full");
    let image = env.push_image("full", &[base, data]);
    // Pulled through an index: the image record names it, the manifest is its entry.
    let index = env.push_index(&image, "full");
    let layers = env.layer_digests(&image);
    let ns = "pull";

    // A reference that does not exist fails, naming the image, and leaves nothing.
    let missing = format!("{}/nope:1", env.registry.host);
    let o = env.dedupd_pull(ns, &missing, false);
    assert!(!o.status.success(), "pull of {missing} succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("nope"),
        "the error does not name the image: {err}"
    );

    // Not a terminal: one summary line. No artifact: both layers pulled in full.
    let out = env.dedupd_pull_ok(ns, &index, false);
    assert_eq!(out.lines().count(), 1, "want one summary line, got:\n{out}");
    assert!(
        out.starts_with(&format!("pulled {index} ")) && out.contains("2 downloaded"),
        "summary: {out}"
    );
    eprintln!("dedupd pull (no artifact): {}", out.trim());
    // The Prepare labels reached the snapshotter, which found no artifact.
    for l in &layers {
        let lines = env.log_lines(&["no dedupd artifact covers the layer", l]);
        assert_eq!(lines.len(), 1, "daemon log for layer {l}: {lines:?}");
    }
    assert_eq!(env.log_lines(&["layer converted"]).len(), 2);
    let ls = env.ctr_ok(ns, &["image", "ls"]);
    let row = ls
        .lines()
        .find(|l| l.starts_with(&format!("{index} ")))
        .unwrap_or_else(|| panic!("ctr image ls does not list {index}:\n{ls}"));
    assert!(
        row.contains("image.index"),
        "the record's target is not the index: {row}"
    );
    // Like `ctr image pull`: the blobs (index, manifest, config, both layers), with the
    // uncompressed label on the layers; and the lease is gone.
    let content = env.content(ns);
    assert_eq!(content.len(), 5, "content store: {content:?}");
    for l in &layers {
        let info = env.ctr_ok(ns, &["content", "ls"]);
        let row = info.lines().find(|r| r.starts_with(l.as_str())).unwrap();
        assert!(row.contains("containerd.io/uncompressed="), "{row}");
    }
    assert_eq!(env.ctr_ok(ns, &["leases", "ls", "-q"]).trim(), "");
    let out = env.run_out(ns, &index, "t1", "cat /data/full.txt");
    assert_eq!(out, "full content\n");

    // Again, by the environment variables: everything is there.
    let out = env.dedupd_pull_ok(ns, &index, true);
    assert!(out.contains("2 present"), "second pull: {out}");

    // On a terminal: a line per layer. Another image on the same base: the base is
    // present, its own layer is downloaded and applied.
    let other = env.push_image("other", &[env.base_layer(), env.data_layer("other")]);
    let cmd = format!(
        "{} pull -a {} -n {ns} --hosts-dir {} {other}",
        dedupd_bin(),
        env.csock.display(),
        env.hosts.display()
    );
    let tty = String::from_utf8(run(Command::new("timeout").arg(COMMAND_TIMEOUT_S).args([
        "script",
        "-qec",
        &cmd,
        "/dev/null",
    ])))
    .unwrap();
    // The terminal's view: each line as last redrawn.
    let shown: Vec<String> = strip_ansi(&tty)
        .lines()
        .map(|l| {
            l.rsplit('\r')
                .find(|p| !p.is_empty())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    eprintln!("dedupd pull on a terminal:\n{}", shown.join("\n"));
    assert!(
        shown[0].starts_with(&format!("{other}: manifest sha256:")),
        "{shown:?}"
    );
    assert!(
        shown[1].contains("layer 1/2 ") && shown[1].ends_with("present"),
        "{shown:?}"
    );
    assert!(
        shown[2].contains("layer 2/2 ")
            && shown[2].contains(" downloaded ")
            && shown[2].ends_with(", applied"),
        "{shown:?}"
    );
    assert!(
        shown[3].contains("1 downloaded") && shown[3].contains("1 present"),
        "{shown:?}"
    );
    env.ctr_ok(ns, &["image", "rm", "--sync", &other]);

    env.remove_and_wait_empty(ns, &index);
    assert!(env.snapshots(ns).is_empty());

    // `ctr image pull --snapshotter=dedup` works as before.
    env.ctr_ok(
        ns,
        &[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter=dedup",
            &image,
        ],
    );
    let out = env.run_out(ns, &image, "t2", "cat /data/full.txt");
    assert_eq!(out, "full content\n");
    env.remove_and_wait_empty(ns, &image);
    eprintln!(
        "dedupd_pull_without_an_artifact: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn dedupd_pull_mounts_published_layers_lazily() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(env) = env("dedupd_pull_mounts_published_layers_lazily") else {
        return;
    };
    if !env.has_publish() {
        eprintln!(
            "!!!!!!!! SKIPPED dedupd_pull_mounts_published_layers_lazily: this dedupd has no `publish` command !!!!!!!!"
        );
        return;
    }
    let started = Instant::now();
    let base = env.base_layer();
    let data = env.data_layer("lazy");
    let image = env.push_image("lazy", &[base, data]);
    let layers = env.layer_digests(&image);
    env.publish(&image);
    let ns = "lazy";
    let out = env.dedupd_pull_ok(ns, &image, false);
    assert!(out.contains("2 lazy"), "summary: {out}");
    eprintln!("dedupd pull (artifact): {}", out.trim());
    for l in &layers {
        let lines = env.log_lines(&["layer pulled lazily", l]);
        assert_eq!(lines.len(), 1, "daemon log for layer {l}: {lines:?}");
    }
    assert!(env.log_lines(&["layer converted"]).is_empty());
    // containerd downloaded no layer: its store has the manifest and config only.
    let content = env.content(ns);
    assert_eq!(content.len(), 2, "content store: {content:?}");
    for l in &layers {
        assert!(!content.contains(l), "layer blob {l} in the content store");
    }
    let out = env.run_out(
        ns,
        &image,
        "t1",
        "cat /data/lazy.txt; cat /data/noise.bin | wc -c",
    );
    assert_eq!(out, format!("lazy content\n{}\n", 2 << 20));
    env.remove_and_wait_empty(ns, &image);
    eprintln!(
        "dedupd_pull_mounts_published_layers_lazily: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A CRI client on containerd's socket.
async fn cri_channel(sock: &Path) -> tonic::transport::Channel {
    let path = sock.to_path_buf();
    tonic::transport::Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

#[test]
fn cri_pull_image_goes_through_the_dedup_snapshotter() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(env) = env_with(
        "cri_pull_image_goes_through_the_dedup_snapshotter",
        NO_STREAM,
    ) else {
        return;
    };
    let started = Instant::now();
    let base = env.base_layer();
    let data = env.data_layer("kube");
    let image = env.push_image("kube", &[base.clone(), data]);
    let layers = env.layer_digests(&image);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(cri_channel(&env.csock));
    let version = rt
        .block_on(
            cri::runtime_service_client::RuntimeServiceClient::new(channel.clone()).version(
                cri::VersionRequest {
                    version: "v1".into(),
                },
            ),
        )
        .unwrap_or_else(|s| {
            let log = env.containerd_log();
            let cri_log: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("cri") && (l.contains("error") || l.contains("fail")))
                .map(|l| &l[..l.len().min(400)])
                .collect::<Vec<_>>();
            panic!(
                "the CRI plugin does not answer: {s:?}\ncontainerd's CRI errors:\n{}",
                cri_log.join("\n")
            )
        })
        .into_inner();
    eprintln!(
        "CRI: {} {} (API {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);
    let spec = |image: &str| cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    };
    // As the kubelet asks for an image.
    let pull = |images: &mut cri::image_service_client::ImageServiceClient<_>, image: &str| {
        rt.block_on(images.pull_image(cri::PullImageRequest {
            image: Some(spec(image)),
        }))
        .unwrap_or_else(|s| panic!("PullImage {image}: {s:?}\n{}", tail(&env.log(), 10)))
        .into_inner()
        .image_ref
    };
    let t = Instant::now();
    let image_ref = pull(&mut images, &image);
    eprintln!(
        "CRI PullImage {image} (no artifact): {image_ref} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(image_ref.starts_with("sha256:"), "image_ref {image_ref}");
    // Each layer's Prepare carried the CRI labels (image, manifest, layer): the
    // snapshotter looked for an artifact, found none, and let containerd unpack.
    for l in &layers {
        let lines = env.log_lines(&[
            "no dedupd artifact covers the layer",
            l,
            // (The daemon names the image by its manifest digest.)
            &format!("{}@sha256:", image.trim_end_matches(":1")),
        ]);
        assert_eq!(lines.len(), 1, "daemon log for layer {l}: {lines:?}");
    }
    assert_eq!(env.log_lines(&["layer converted"]).len(), 2);
    let out = env.run_out("k8s.io", &image, "k1", "cat /data/kube.txt");
    assert_eq!(out, "kube content\n");

    let mut pulled = vec![image.clone()];
    if env.has_publish() {
        let data = env.data_layer("kubelazy");
        let lazy = env.push_image("kubelazy", &[base, data]);
        let lazy_layers = env.layer_digests(&lazy);
        env.publish(&lazy);
        let t = Instant::now();
        pull(&mut images, &lazy);
        eprintln!(
            "CRI PullImage {lazy} (artifact): {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // The base layer is shared with the first image (already present: no Prepare);
        // the other answered ALREADY_EXISTS, and containerd fetched no blob for it.
        let lines = env.log_lines(&["layer pulled lazily", &lazy_layers[1]]);
        assert_eq!(lines.len(), 1, "daemon log: {lines:?}");
        let content = env.content("k8s.io");
        assert!(
            !content.contains(&lazy_layers[1]),
            "the lazily pulled layer's blob is in the content store"
        );
        let out = env.run_out("k8s.io", &lazy, "k2", "cat /data/kubelazy.txt");
        assert_eq!(out, "kubelazy content\n");
        pulled.push(lazy);
    } else {
        eprintln!(
            "!!!!!!!! SKIPPED the CRI lazy pull: this dedupd has no `publish` command !!!!!!!!"
        );
    }
    for image in &pulled {
        rt.block_on(images.remove_image(cri::RemoveImageRequest {
            image: Some(spec(image)),
        }))
        .unwrap();
        let status = rt
            .block_on(images.image_status(cri::ImageStatusRequest {
                image: Some(spec(image)),
                verbose: false,
            }))
            .unwrap()
            .into_inner();
        assert!(
            status.image.is_none(),
            "{image} still there after RemoveImage"
        );
    }
    wait_until("GC to free k8s.io's snapshots", || {
        env.snapshots("k8s.io").is_empty()
    });
    eprintln!(
        "cri_pull_image_goes_through_the_dedup_snapshotter: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn unpublished_layers_stream_from_the_registry_into_the_converter() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(env) = env("unpublished_layers_stream_from_the_registry_into_the_converter") else {
        return;
    };
    let started = Instant::now();
    let base = env.base_layer();
    let data = env.data_layer("stream");
    let image = env.push_image("stream", &[base.clone(), data]);
    let layers = env.layer_digests(&image);
    let ns = "stream";
    // `dedupd pull`: no artifact, so each layer's Prepare streams the blob into the
    // converter and answers ALREADY_EXISTS; containerd downloads no layer.
    let out = env.dedupd_pull_ok(ns, &image, false);
    eprintln!("dedupd pull (no artifact, streamed): {}", out.trim());
    for l in &layers {
        let lines = env.log_lines(&["layer streamed from the registry into the converter", l]);
        assert_eq!(lines.len(), 1, "daemon log for layer {l}: {lines:?}");
    }
    assert!(env.log_lines(&["layer converted"]).is_empty());
    let content = env.content(ns);
    assert_eq!(content.len(), 2, "content store: {content:?}");
    for l in &layers {
        assert!(!content.contains(l), "layer blob {l} in the content store");
    }
    let out = env.run_out(
        ns,
        &image,
        "s1",
        "cat /data/stream.txt; cat /data/noise.bin | wc -c",
    );
    assert_eq!(out, format!("stream content\n{}\n", 2 << 20));

    // The CRI path, as the kubelet pulls: a second unpublished image sharing the base;
    // only its own layer streams.
    let data = env.data_layer("kubestream");
    let kube = env.push_image("kubestream", &[base, data]);
    let kube_layers = env.layer_digests(&kube);
    let o = run(Command::new("timeout")
        .arg(COMMAND_TIMEOUT_S)
        .arg(dedupd_bin())
        .arg("cri-pull")
        .arg("-a")
        .arg(&env.csock)
        .arg(&kube));
    let image_ref = String::from_utf8_lossy(&o).trim().to_string();
    assert!(
        image_ref.starts_with("sha256:"),
        "cri-pull printed {image_ref:?}"
    );
    let lines = env.log_lines(&[
        "layer streamed from the registry into the converter",
        &kube_layers[1],
    ]);
    assert_eq!(lines.len(), 1, "daemon log: {lines:?}");
    let content = env.content("k8s.io");
    assert!(
        !content.contains(&kube_layers[1]),
        "the streamed layer's blob is in the content store"
    );
    let out = env.run_out("k8s.io", &kube, "s2", "cat /data/kubestream.txt");
    assert_eq!(out, "kubestream content\n");

    env.remove_and_wait_empty(ns, &image);
    eprintln!(
        "unpublished_layers_stream_from_the_registry_into_the_converter: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
