//! The benchmark's image and registry: the fio data set as one uncompressed layer,
//! pushed to Debian's `docker-registry` with the project's registry client, and the
//! registry process itself, on 127.0.0.1 or inside the shaped link's namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dedupd::registry::{ImageRef, Registry, RegistryOptions, OCI_MANIFEST};
use sha2::{Digest as _, Sha256};

use crate::cleanup;

/// Size of `big/seq.bin` (the sequential job's file).
pub const SEQ_BYTES: usize = 128 << 20;
/// Size of `big/rand.bin` (the random job's file).
pub const RAND_BYTES: usize = 64 << 20;
/// Files in `small/`.
pub const SMALL_FILES: usize = 2000;
/// Sizes of the small files: uniform in this range.
pub const SMALL_MIN_BYTES: usize = 4 << 10;
/// See [`SMALL_MIN_BYTES`].
pub const SMALL_MAX_BYTES: usize = 70 << 10;

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// xorshift64*: incompressible enough for lz4 (nothing is saved), fast to make.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The data set as (path, content), in tar order (sorted by path); with `shrink` > 1
/// the big files and the number of small files are divided by it.
pub fn files(shrink: usize) -> Vec<(String, Vec<u8>)> {
    let mut n = Noise(0x5eed_0f10_2026_1125);
    let mut out = vec![
        ("big/rand.bin".to_string(), n.bytes(RAND_BYTES / shrink)),
        ("big/seq.bin".to_string(), n.bytes(SEQ_BYTES / shrink)),
    ];
    for i in 0..SMALL_FILES / shrink {
        let span = (SMALL_MAX_BYTES - SMALL_MIN_BYTES + 1) as u64;
        let len = SMALL_MIN_BYTES + (n.next() % span) as usize;
        out.push((format!("small/f{i:04}"), n.bytes(len)));
    }
    out
}

/// The layer tar (uncompressed: the data is incompressible) and its digest, which is
/// also its diff_id.
pub fn layer_tar(files: &[(String, Vec<u8>)]) -> (Bytes, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for d in ["big", "small"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, format!("{d}/"), &[][..]).unwrap();
    }
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, p, &data[..]).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let d = sha256(&tar);
    (Bytes::from(tar), d)
}

/// What the snapshotter's Prepare needs to know about the pushed image.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// Repository and tag, without the registry host (`bench/fio:1`).
    pub path: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Digest of the one layer, which is also its diff_id and chain id.
    pub layer_digest: String,
}

/// A registry client for plain HTTP.
pub fn client(dir: &Path) -> Registry {
    Registry::new(RegistryOptions {
        hosts_dir: dir.join("no-certs.d"),
        plain_http: true,
        docker_config: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(120),
        max_requests_per_host: 4,
    })
    .unwrap()
}

/// Pushes a one-layer image of `tar` to `host` as `bench/fio:1`.
pub async fn push(reg: &Registry, host: &str, tar: Bytes, digest: &str) -> Pushed {
    let path = "bench/fio:1".to_string();
    let r = ImageRef::parse(&format!("{host}/{path}")).unwrap();
    reg.push_blob(&r, digest, tar.clone()).await.unwrap();
    let config = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest]},
        }))
        .unwrap(),
    );
    reg.push_blob(&r, &sha256(&config), config.clone())
        .await
        .unwrap();
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digest, "size": tar.len()}],
        }))
        .unwrap(),
    );
    let manifest_digest = reg.push_manifest(&r, OCI_MANIFEST, manifest).await.unwrap();
    Pushed {
        path,
        manifest_digest,
        layer_digest: digest.to_string(),
    }
}

/// A `docker-registry serve` on `addr`, in the shaped link's namespace or not; killed
/// on drop. The storage outlives it, so the same images are served by the next one.
pub struct RegistryProcess {
    /// `host:port` clients use.
    pub host: String,
    child: Option<Child>,
    log: PathBuf,
}

impl RegistryProcess {
    /// Starts a registry on `addr` with its storage (and config, log) under `dir`.
    pub fn start(dir: &Path, addr: &str, in_netns: bool) -> RegistryProcess {
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let config = dir.join("config.yml");
        // Access logs off: a line per range request would cost CPU on the path measured.
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: dedupd-lazybench\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = if in_netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", crate::link::NETNS, "docker-registry"]);
            c
        } else {
            Command::new("docker-registry")
        };
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        // `ip netns exec` execs the registry: the pid is the registry's.
        cleanup::add_pid(child.id());
        let mut r = RegistryProcess {
            host: addr.to_string(),
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let sa: std::net::SocketAddr = addr.parse().unwrap();
        while std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)).is_err() {
            if let Some(s) = r.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited ({s}):\n{}", r.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            cleanup::remove_pid(c.id());
        }
    }
}

/// The files of a registry's storage (to read them into the page cache).
pub fn storage_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("storage")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Labels of containerd's CRI plugin on the Prepare of the layer (what makes dedupd
/// pull it lazily).
pub fn cri_labels(image_ref: &str, img: &Pushed) -> HashMap<String, String> {
    HashMap::from([
        (
            "containerd.io/snapshot.ref".to_string(),
            img.layer_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.image-ref".into(),
            image_ref.to_string(),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".into(),
            img.manifest_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.layer-digest".into(),
            img.layer_digest.clone(),
        ),
    ])
}
