//! `dedupd run` on a root of its own (fanotify front end), driven as containerd's CRI
//! plugin would: Prepare with the image labels (the layer is pulled lazily and the
//! answer is ALREADY_EXISTS), then a View, mounted here. Killed and unmounted on drop.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dedupd::snapshotter::proto::snapshots as pb;
use dedupd::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

use crate::cleanup;
use crate::image::{cri_labels, Pushed};

const DEDUPD: &str = env!("CARGO_BIN_EXE_dedupd");

/// The fetcher's settings under test (`[lazy]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// `min_window_bytes`.
    pub min: u64,
    /// `max_window_bytes`.
    pub max: u64,
}

/// A running `dedupd run`.
pub struct Daemon {
    /// Its directory: config, log, socket, `store/` (the root), view mountpoints.
    pub dir: PathBuf,
    child: Option<Child>,
    mounts: Vec<PathBuf>,
}

impl Daemon {
    /// Starts dedupd on `dir` (created if missing; an existing root is reused).
    pub fn start(dir: &Path, w: Windows) -> Daemon {
        fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        // No background prefetch: the benchmark measures reads that fetch on demand.
        fs::write(
            &config,
            format!(
                "root = {:?}\nsocket = {:?}\nfront_end = \"fanotify\"\n\n[registry]\nplain_http = true\nhosts_dir = {:?}\n\n[lazy]\nprefetch = \"none\"\nfetch_timeout_ms = 30000\nmin_window_bytes = {}\nmax_window_bytes = {}\n",
                dir.join("store"),
                dir.join("dedupd.sock"),
                dir.join("certs.d"),
                w.min,
                w.max,
            ),
        )
        .unwrap();
        let _ = fs::remove_file(dir.join("store/run/stats.json"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dedupd.log"))
            .unwrap();
        let child = Command::new(DEDUPD)
            .args(["run", "--config"])
            .arg(&config)
            .env("DEDUPD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        cleanup::add_pid(child.id());
        let d = Daemon {
            dir: dir.to_path_buf(),
            child: Some(child),
            mounts: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.stats_path().exists() || !d.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "dedupd did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("dedupd.sock")
    }

    fn stats_path(&self) -> PathBuf {
        self.dir.join("store/run/stats.json")
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dedupd.log")).unwrap_or_default()
    }

    /// stats.json now.
    pub fn stats(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(t) = fs::read_to_string(self.stats_path()) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "no stats");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The fetcher's counters once they have stopped moving (stats.json is rewritten
    /// every 200 ms).
    pub fn settled_fetch(&self) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        // Bounded: 40 x 450 ms.
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(450));
            let v = self.stats()["fetch"].clone();
            if v == last {
                return v;
            }
            last = v;
        }
        last
    }

    /// Prepares the layer as the CRI plugin does (must be ALREADY_EXISTS), takes a View
    /// of it and mounts that; returns the mountpoint.
    pub fn mount_view(&mut self, image_ref: &str, img: &Pushed, key: &str) -> PathBuf {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mounts = rt.block_on(async {
            let mut c = connect(&self.socket()).await;
            let r = c
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: "dedup".into(),
                    key: format!("extract-{key} {}", img.layer_digest),
                    parent: String::new(),
                    labels: cri_labels(image_ref, img),
                })
                .await;
            let code = r.as_ref().err().map(|s| s.code());
            assert_eq!(
                code,
                Some(tonic::Code::AlreadyExists),
                "Prepare: {r:?}\n{}",
                self.log()
            );
            c.view(pb::ViewSnapshotRequest {
                snapshotter: "dedup".into(),
                key: key.into(),
                parent: img.layer_digest.clone(),
                labels: HashMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts
        });
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        let target = self.dir.join(format!("view-{key}"));
        fs::create_dir_all(&target).unwrap();
        let mut flags = nix::mount::MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= nix::mount::MsFlags::MS_RDONLY,
                "rbind" => flags |= nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                "bind" => flags |= nix::mount::MsFlags::MS_BIND,
                other => data.push(other.to_string()),
            }
        }
        let data = data.join(",");
        nix::mount::mount(
            Some(m.source.as_str()),
            &target,
            Some(m.r#type.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting {m:?}: {e}"));
        cleanup::add_mount(&target);
        self.mounts.push(target.clone());
        target
    }

    /// Unmounts the views and stops the daemon (SIGTERM, bounded wait, then SIGKILL).
    pub fn stop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            cleanup::remove_mount(&m);
        }
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            cleanup::remove_pid(c.id());
        }
        // Layer mounts the daemon left (it unmounts them itself when it can).
        if let Ok(rd) = fs::read_dir(self.dir.join("store/m")) {
            for e in rd.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // The fanotify holder leaves when told BYE; one still there after a while (a
        // daemon killed above) is stopped here, if the pid is still a dedupd.
        let pid_file = self.dir.join("store/fanotify/holder.pid");
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            let is_dedupd = || {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("dedupd"))
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_dedupd() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if is_dedupd() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
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
