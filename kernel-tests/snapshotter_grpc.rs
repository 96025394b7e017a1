//! The snapshotter's gRPC server, tested as containerd uses it: a tonic client over a
//! real unix socket, real conversions, real EROFS and overlay mounts (root only).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dedupd::snapshotter::proto::snapshots as pb;
use dedupd::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use dedupd::snapshotter::{LayerMounter, LocalMounter, Snapshotter};
use dedupd::store::Store;
use tonic::transport::Channel;
use tonic::Code;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A scratch root whose mounts are all undone on drop, pass or fail.
struct Root {
    dir: tempfile::TempDir,
    extra_mounts: Vec<PathBuf>,
}

impl Root {
    fn new() -> Root {
        // Under /var/tmp: EROFS file-backed mounts and overlay uppers want a real disk fs.
        // Short, but no shorter than the default root (`/var/tmp/dsnapXXXXXX`, 20 bytes):
        // what mounts here mounts there.
        let dir = tempfile::Builder::new()
            .prefix("dsnap")
            .tempdir_in("/var/tmp")
            .unwrap();
        assert!(dir.path().as_os_str().len() >= dedupd::config::DEFAULT_ROOT.len());
        Root {
            dir,
            extra_mounts: Vec::new(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for m in self.extra_mounts.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        for dir in ["m", "mnt"] {
            if let Ok(rd) = fs::read_dir(self.path().join(dir)) {
                for e in rd.flatten() {
                    let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

/// One running server: the runtime task serving, and a client.
struct Server {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    client: SnapshotsClient<Channel>,
    socket: PathBuf,
    store: Arc<Store>,
    snap: Arc<Snapshotter>,
}

async fn start(root: &Path) -> Server {
    let store = Arc::new(Store::open(root).unwrap());
    let mounter: Arc<dyn LayerMounter> = Arc::new(LocalMounter::new(store.clone()).unwrap());
    let snap = Arc::new(Snapshotter::open(root, store.clone(), mounter).unwrap());
    let socket = root.join("run").join("dedupd.sock");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let sock = socket.clone();
    let served = snap.clone();
    let task = tokio::spawn(async move {
        dedupd::snapshotter::serve(&sock, served, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let channel = connect(&socket).await;
    Server {
        shutdown: Some(tx),
        task,
        client: SnapshotsClient::new(channel),
        socket,
        store,
        snap,
    }
}

impl Server {
    async fn stop(mut self) {
        drop(self.client);
        drop(self.store);
        drop(self.snap);
        let _ = self.shutdown.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
    l: HashMap<String, String>,
) -> Result<Vec<dedupd::snapshotter::proto::types::Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "dedup".into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn commit(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    name: &str,
) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "dedup".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(&[("containerd.io/gc.root", "x")]),
        parent: String::new(),
    })
    .await
    .map(|_| ())
}

async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "dedup".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.unwrap())
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "dedup".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<Vec<String>, tonic::Status> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "dedup".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(msg) = stream.message().await? {
        names.extend(msg.info.into_iter().map(|i| i.name));
    }
    names.sort();
    Ok(names)
}

fn chain(n: u8) -> String {
    format!("sha256:{}", hex::encode([n; 32]))
}

fn option<'a>(m: &'a dedupd::snapshotter::proto::types::Mount, key: &str) -> Option<&'a str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(&format!("{key}=")))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Unpacks two layers the way containerd does (bind mount for the first, overlay upper
/// for the second, with a whiteout and an opaque directory), then checks every RPC, the
/// overlay a container would mount, restart persistence, and that removal frees it all.
#[test]
fn every_rpc_over_a_unix_socket() {
    if !is_root() {
        eprintln!("SKIPPED every_rpc_over_a_unix_socket: needs root for EROFS and overlay mounts");
        return;
    }
    let mut root = Root::new();
    let rt = runtime();
    rt.block_on(async {
        let server = start(root.path()).await;
        let mode = fs::metadata(&server.socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "socket mode");
        let mut c = server.client.clone();

        // Layer 1: bind mount, files written into its source, as containerd's applier does.
        let m = prepare(
            &mut c,
            "extract-1",
            "",
            labels(&[("containerd.io/snapshot.ref", &chain(1))]),
        )
        .await
        .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        let l1 = PathBuf::from(&m[0].source);
        fs::create_dir_all(l1.join("etc/conf.d")).unwrap();
        fs::write(l1.join("etc/passwd"), b"root:x:0:0\n").unwrap();
        fs::write(l1.join("etc/conf.d/a"), b"a").unwrap();
        fs::write(l1.join("gone"), b"deleted later").unwrap();
        std::os::unix::fs::chown(&l1, Some(1234), Some(4321)).unwrap();
        commit(&mut c, "extract-1", "layer1").await.unwrap();
        assert!(
            !l1.exists(),
            "unpacked files of a committed layer are removed"
        );
        let i = stat(&mut c, "layer1").await.unwrap();
        assert_eq!(i.kind, pb::Kind::Committed as i32);
        assert_eq!(
            i.labels.get("containerd.io/gc.root").map(String::as_str),
            Some("x")
        );
        let layer1_mnt = server
            .snap
            .layer_mountpoint(&hex::encode([1u8; 32]))
            .unwrap()
            .unwrap();
        assert_eq!(layer1_mnt, root.path().join("m/1"), "the first mount slot");
        // The remote-snapshot fast path: the same chain again is AlreadyExists, and
        // containerd's follow-up List filter finds the committed snapshot.
        let again = prepare(
            &mut c,
            "extract-1b",
            "",
            labels(&[("containerd.io/snapshot.ref", &chain(1))]),
        )
        .await;
        assert_eq!(again.unwrap_err().code(), Code::AlreadyExists);
        let f = format!(
            "labels.\"containerd.io/snapshot.ref\"=={},parent==\"\"",
            chain(1)
        );
        assert_eq!(list(&mut c, &[&f]).await.unwrap(), ["layer1"]);
        assert_eq!(
            fs::read(layer1_mnt.join("etc/passwd")).unwrap(),
            b"root:x:0:0\n"
        );

        // Layer 2: overlay with upperdir; containerd applies with overlay whiteouts.
        let m = prepare(
            &mut c,
            "extract-2",
            "layer1",
            labels(&[("containerd.io/snapshot.ref", &chain(2))]),
        )
        .await
        .unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let upper = PathBuf::from(option(&m[0], "upperdir").unwrap());
        let md = fs::metadata(&upper).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (md.uid(), md.gid()),
            (1234, 4321),
            "upper takes the parent root's owner"
        );
        assert!(option(&m[0], "workdir").is_some());
        assert_eq!(
            option(&m[0], "lowerdir").unwrap(),
            layer1_mnt.to_str().unwrap()
        );
        nix::sys::stat::mknod(
            &upper.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o000),
            0,
        )
        .unwrap();
        fs::create_dir_all(upper.join("etc/conf.d")).unwrap();
        xattr_set(&upper.join("etc/conf.d"), "trusted.overlay.opaque", b"y");
        fs::write(upper.join("etc/conf.d/b"), b"b").unwrap();
        fs::write(upper.join("new"), b"new file").unwrap();
        commit(&mut c, "extract-2", "layer2").await.unwrap();

        let st = server.snap.status().unwrap();
        assert_eq!((st.committed, st.active, st.layers.len()), (2, 0, 2));
        assert!(
            st.layers
                .iter()
                .all(|l| l.converted && l.mounted && l.files > 0),
            "{st:?}"
        );
        let stats = server.store.stats().unwrap();
        assert_eq!(stats.layers, 2);
        assert!(
            stats.chunks >= 4,
            "layer files are stored as chunks: {stats:?}"
        );

        // A container on top: overlay of both layers plus its own upper.
        let m = prepare(&mut c, "ctr-1", "layer2", HashMap::new())
            .await
            .unwrap();
        let lower = option(&m[0], "lowerdir").unwrap().to_string();
        assert_eq!(lower.split(':').count(), 2);
        let target = root.path().join("ctr-rootfs");
        fs::create_dir_all(&target).unwrap();
        let data = m[0].options.join(",");
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .unwrap();
        root.extra_mounts.push(target.clone());
        assert!(
            !target.join("gone").exists(),
            "whiteout hides the lower file"
        );
        assert!(
            !target.join("etc/conf.d/a").exists(),
            "opaque dir hides lower entries"
        );
        assert_eq!(fs::read(target.join("etc/conf.d/b")).unwrap(), b"b");
        assert_eq!(
            fs::read(target.join("etc/passwd")).unwrap(),
            b"root:x:0:0\n"
        );
        assert_eq!(fs::read(target.join("new")).unwrap(), b"new file");
        fs::write(target.join("written"), b"by the container").unwrap();
        let ctr_upper = PathBuf::from(option(&m[0], "upperdir").unwrap());
        assert_eq!(
            fs::read(ctr_upper.join("written")).unwrap(),
            b"by the container"
        );
        assert!(!Path::new(&lower.split(':').next().unwrap())
            .join("written")
            .exists());
        nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        root.extra_mounts.pop();

        // Mounts of the same key gives the same answer; View is read-only.
        let again = c
            .mounts(pb::MountsRequest {
                snapshotter: "dedup".into(),
                key: "ctr-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(again, m);
        let v = c
            .view(pb::ViewSnapshotRequest {
                snapshotter: "dedup".into(),
                key: "view-2".into(),
                parent: "layer2".into(),
                labels: HashMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(v[0].r#type, "overlay");
        assert!(option(&v[0], "upperdir").is_none());
        let v1 = c
            .view(pb::ViewSnapshotRequest {
                snapshotter: "dedup".into(),
                key: "view-1".into(),
                parent: "layer1".into(),
                labels: HashMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(v1[0].r#type, "bind");
        assert_eq!(v1[0].source, layer1_mnt.to_str().unwrap());
        assert!(v1[0].options.contains(&"ro".to_string()));

        // Update: one label by path, then the whole set.
        let upd = c
            .update(pb::UpdateSnapshotRequest {
                snapshotter: "dedup".into(),
                info: Some(pb::Info {
                    name: "layer2".into(),
                    labels: labels(&[("k", "v")]),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["labels.k".into()],
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(upd.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            upd.labels.get("containerd.io/gc.root").map(String::as_str),
            Some("x")
        );

        // List with containerd's filters.
        assert_eq!(list(&mut c, &[]).await.unwrap().len(), 5);
        assert_eq!(
            list(&mut c, &["kind==committed"]).await.unwrap(),
            ["layer1", "layer2"]
        );
        assert_eq!(
            list(&mut c, &["parent==layer2"]).await.unwrap(),
            ["ctr-1", "view-2"]
        );
        assert_eq!(
            list(&mut c, &["labels.\"k\"==v"]).await.unwrap(),
            ["layer2"]
        );
        assert_eq!(
            list(&mut c, &["kind==view,parent==layer1", "name==ctr-1"])
                .await
                .unwrap(),
            ["ctr-1", "view-1"]
        );
        // A quoted empty string is the empty string (issue 12): `!=""` keeps only the
        // snapshots with a parent, `==""` only those without.
        assert_eq!(
            list(&mut c, &[r#"parent!="""#]).await.unwrap(),
            ["ctr-1", "layer2", "view-1", "view-2"]
        );
        assert_eq!(
            list(&mut c, &[r#"parent!="",labels."containerd.io/gc.root"==x"#])
                .await
                .unwrap(),
            ["layer2"]
        );
        assert_eq!(list(&mut c, &["parent==\"\""]).await.unwrap(), ["layer1"]);

        // Usage: the container's upper holds one file; committed layers report their data.
        let u = c
            .usage(pb::UsageRequest {
                snapshotter: "dedup".into(),
                key: "ctr-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.inodes, 2, "upper dir and the written file");
        assert!(u.size > 0);
        let u = c
            .usage(pb::UsageRequest {
                snapshotter: "dedup".into(),
                key: "layer1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(u.size > 0 && u.inodes >= 5, "{u:?}");

        // Restart: everything is still there and the container's overlay still works.
        server.stop().await;
        let server = start(root.path()).await;
        let mut c = server.client.clone();
        assert_eq!(list(&mut c, &[]).await.unwrap().len(), 5);
        assert_eq!(
            stat(&mut c, "layer2")
                .await
                .unwrap()
                .labels
                .get("k")
                .map(String::as_str),
            Some("v")
        );
        let after = c
            .mounts(pb::MountsRequest {
                snapshotter: "dedup".into(),
                key: "ctr-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(after, m);
        assert_eq!(
            fs::read(ctr_upper.join("written")).unwrap(),
            b"by the container"
        );
        assert_eq!(
            fs::read(layer1_mnt.join("etc/passwd")).unwrap(),
            b"root:x:0:0\n"
        );

        // Remove everything, children first; Cleanup leaves an empty store.
        for k in ["ctr-1", "view-2", "view-1", "layer2", "layer1"] {
            remove(&mut c, k).await.unwrap();
        }
        assert!(
            !layer1_mnt.exists(),
            "layer mount is gone with its last snapshot"
        );
        assert_eq!(server.snap.meta().layer_slots().unwrap(), []);
        c.cleanup(pb::CleanupRequest {
            snapshotter: "dedup".into(),
        })
        .await
        .unwrap();
        assert_eq!(list(&mut c, &[]).await.unwrap().len(), 0);
        assert_eq!(
            fs::read_dir(root.path().join("snapshots")).unwrap().count(),
            0
        );
        assert_eq!(fs::read_dir(root.path().join("m")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(root.path().join("layers")).unwrap().count(), 0);
        server.stop().await;
        let store = Store::open(root.path()).unwrap();
        let stats = store.stats().unwrap();
        assert_eq!((stats.layers, stats.chunks), (0, 0));
    });
}

/// mount(2) copies at most a page of options, NUL included.
const PAGE_BYTES: usize = 4096;

/// Mounts `m` at `target` with mount(2), the options joined exactly as returned.
fn mount_as_returned(m: &dedupd::snapshotter::proto::types::Mount, target: &Path) {
    fs::create_dir_all(target).unwrap();
    let data = m.options.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        Some(m.r#type.as_str()),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "mount -t {} ({} bytes of options): {e}",
            m.r#type,
            data.len()
        )
    });
}

async fn mounts(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
) -> Vec<dedupd::snapshotter::proto::types::Mount> {
    c.mounts(pb::MountsRequest {
        snapshotter: "dedup".into(),
        key: key.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .mounts
}

/// Issue 12: 128 single-file layers unpacked and committed as containerd does, then a
/// container on top. Its overlay options fit one page and mount with a plain mount(2)
/// (no rewriting, as containerd does under a long root), under a root at least as long as
/// the default one; every layer's file reads through it, the top layer wins, and writes
/// go to the container's upper dir only. Under the old layout (`mnt/<64 hex>`) the same
/// options would not fit a page, not even with containerd's relative lowerdirs.
#[test]
fn a_container_over_128_layers_mounts_with_plain_mount() {
    if !is_root() {
        eprintln!("SKIPPED a_container_over_128_layers_mounts_with_plain_mount: needs root");
        return;
    }
    const LAYERS: u8 = 128;
    let mut root = Root::new();
    let rt = runtime();
    rt.block_on(async {
        let server = start(root.path()).await;
        let mut c = server.client.clone();
        let started = std::time::Instant::now();
        let mut parent = String::new();
        for i in 1..=LAYERS {
            let key = format!("extract-{i}");
            let m = prepare(
                &mut c,
                &key,
                &parent,
                labels(&[("containerd.io/snapshot.ref", &chain(i))]),
            )
            .await
            .unwrap();
            // What the applier writes into: the bind source of the first layer, the
            // overlay's upper dir above it.
            let dir = match option(&m[0], "upperdir") {
                Some(u) => PathBuf::from(u),
                None => PathBuf::from(&m[0].source),
            };
            fs::create_dir_all(dir.join("l")).unwrap();
            fs::write(dir.join(format!("l/{i}")), format!("layer {i}\n")).unwrap();
            fs::write(dir.join("top"), format!("{i}\n")).unwrap();
            let name = format!("layer-{i}");
            commit(&mut c, &key, &name).await.unwrap();
            parent = name;
        }
        eprintln!(
            "{LAYERS} layers prepared and committed in {:?}",
            started.elapsed()
        );

        let m = prepare(&mut c, "ctr", &parent, HashMap::new())
            .await
            .unwrap();
        assert_eq!((m.len(), m[0].r#type.as_str()), (1, "overlay"));
        let lowers: Vec<&str> = option(&m[0], "lowerdir").unwrap().split(':').collect();
        assert_eq!(lowers.len(), usize::from(LAYERS));
        let mdir = root.path().join("m");
        assert!(lowers
            .iter()
            .all(|l| Path::new(l).parent() == Some(mdir.as_path())));
        let data_bytes = m[0].options.join(",").len();
        assert!(data_bytes < PAGE_BYTES, "{data_bytes} bytes of options");
        // containerd 1.6 passes options summing under a page less 512 as they are.
        let sum: usize = m[0].options.iter().map(String::len).sum();
        assert!(sum < PAGE_BYTES - 512, "{sum}");
        // The old layout's mountpoints, absolute and as containerd would rewrite them.
        let old: Vec<String> = (1..=LAYERS)
            .rev()
            .map(|i| format!("{}/mnt/{}", root.path().display(), hex::encode([i; 32])))
            .collect();
        let old_opts = |lower: String| -> usize {
            let mut o: Vec<String> = m[0]
                .options
                .iter()
                .filter(|o| !o.starts_with("lowerdir="))
                .cloned()
                .collect();
            o.push(format!("lowerdir={lower}"));
            o.join(",").len()
        };
        let old_abs = old_opts(old.join(":"));
        let old_rel = old_opts(
            (1..=LAYERS)
                .rev()
                .map(|i| hex::encode([i; 32]))
                .collect::<Vec<_>>()
                .join(":"),
        );
        assert!(
            old_abs > PAGE_BYTES && old_rel > PAGE_BYTES,
            "{old_abs} {old_rel}"
        );
        eprintln!(
            "options of a 128-layer container: {data_bytes} bytes (old layout: {old_abs}, \
             {old_rel} with relative lowerdirs)"
        );

        let target = root.path().join("rootfs");
        mount_as_returned(&m[0], &target);
        root.extra_mounts.push(target.clone());
        for i in 1..=LAYERS {
            assert_eq!(
                fs::read_to_string(target.join(format!("l/{i}"))).unwrap(),
                format!("layer {i}\n")
            );
        }
        assert_eq!(
            fs::read_dir(target.join("l")).unwrap().count(),
            usize::from(LAYERS)
        );
        assert_eq!(fs::read_to_string(target.join("top")).unwrap(), "128\n");
        fs::write(target.join("written"), b"by the container").unwrap();
        let upper = PathBuf::from(option(&m[0], "upperdir").unwrap());
        assert_eq!(
            fs::read(upper.join("written")).unwrap(),
            b"by the container"
        );
        assert!(lowers
            .iter()
            .all(|l| !Path::new(l).join("written").exists()));
        nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        root.extra_mounts.pop();

        // A restart mounts the 128 layers again at the same paths.
        server.stop().await;
        let server = start(root.path()).await;
        let mut c = server.client.clone();
        assert_eq!(mounts(&mut c, "ctr").await, m);
        mount_as_returned(&m[0], &target);
        root.extra_mounts.push(target.clone());
        assert_eq!(
            fs::read_to_string(target.join("l/64")).unwrap(),
            "layer 64\n"
        );
        assert_eq!(
            fs::read(target.join("written")).unwrap(),
            b"by the container"
        );
        nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        root.extra_mounts.pop();

        remove(&mut c, "ctr").await.unwrap();
        for i in (1..=LAYERS).rev() {
            remove(&mut c, &format!("layer-{i}")).await.unwrap();
        }
        assert_eq!(fs::read_dir(&mdir).unwrap().count(), 0);
        assert_eq!(server.snap.meta().layer_slots().unwrap(), []);
        server.stop().await;
    });
}

/// An upgrade from the layout before mount slots: a layer mounted at `mnt/<layer hex>`
/// by the old daemon, with a container's overlay over it, and no slots in the metadata.
/// At start the old mount goes (detached: the running container keeps reading through
/// it), the layer is mounted at `m/<slot>`, and Mounts names the new path.
#[test]
fn old_layout_mounts_move_to_slots_at_start() {
    if !is_root() {
        eprintln!("SKIPPED old_layout_mounts_move_to_slots_at_start: needs root");
        return;
    }
    let mut root = Root::new();
    let hex = hex::encode([3u8; 32]);
    let rt = runtime();
    rt.block_on(async {
        let server = start(root.path()).await;
        let mut c = server.client.clone();
        let m = prepare(
            &mut c,
            "extract-3",
            "",
            labels(&[("containerd.io/snapshot.ref", &chain(3))]),
        )
        .await
        .unwrap();
        fs::write(Path::new(&m[0].source).join("f"), b"from the layer").unwrap();
        commit(&mut c, "extract-3", "layer").await.unwrap();
        prepare(&mut c, "ctr", "layer", HashMap::new())
            .await
            .unwrap();
        assert_eq!(
            server.snap.layer_mountpoint(&hex).unwrap(),
            Some(root.path().join("m/1"))
        );
        server.stop().await;
    });
    // What the old daemon left: the layer at mnt/<hex>, no slot, a container over it.
    let slot_mnt = root.path().join("m/1");
    nix::mount::umount2(&slot_mnt, nix::mount::MntFlags::empty()).unwrap();
    fs::remove_dir(&slot_mnt).unwrap();
    let meta = dedupd::snapshotter::meta::Meta::open(&root.path().join("snapshots.redb")).unwrap();
    meta.free_layer_slot(&hex).unwrap();
    drop(meta);
    let legacy = root.path().join("mnt").join(&hex);
    {
        let store = Arc::new(Store::open(root.path()).unwrap());
        let record = store.layer(&hex).unwrap().unwrap();
        LocalMounter::new(store)
            .unwrap()
            .mount(&record, &legacy)
            .unwrap();
    }
    let running = root.path().join("running");
    fs::create_dir_all(&running).unwrap();
    let (up, work) = (root.path().join("old-up"), root.path().join("old-work"));
    fs::create_dir_all(&up).unwrap();
    fs::create_dir_all(&work).unwrap();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        legacy.display(),
        up.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &running,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap();
    root.extra_mounts.push(running.clone());

    rt.block_on(async {
        let server = start(root.path()).await;
        let mut c = server.client.clone();
        assert!(
            !root.path().join("mnt").exists(),
            "the old mount dir is gone"
        );
        assert_eq!(
            server.snap.layer_mountpoint(&hex).unwrap(),
            Some(slot_mnt.clone())
        );
        assert_eq!(fs::read(slot_mnt.join("f")).unwrap(), b"from the layer");
        assert_eq!(
            fs::read(running.join("f")).unwrap(),
            b"from the layer",
            "the running container still reads"
        );
        let m = mounts(&mut c, "ctr").await;
        assert_eq!(option(&m[0], "lowerdir"), slot_mnt.to_str());
        remove(&mut c, "ctr").await.unwrap();
        remove(&mut c, "layer").await.unwrap();
        server.stop().await;
    });
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the
    // call, and value points at value.len() readable bytes.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr {name} on {}", path.display());
}

/// Bad requests get the gRPC codes containerd's snapshotters give, and the server keeps
/// serving.
#[test]
fn bad_requests_get_grpc_errors() {
    if !is_root() {
        eprintln!("SKIPPED bad_requests_get_grpc_errors: needs root for EROFS mounts");
        return;
    }
    let root = Root::new();
    let rt = runtime();
    rt.block_on(async {
        let server = start(root.path()).await;
        let mut c = server.client.clone();

        assert_eq!(code(stat(&mut c, "nope").await), Code::NotFound);
        assert_eq!(
            code(
                c.mounts(pb::MountsRequest {
                    snapshotter: "dedup".into(),
                    key: "nope".into()
                })
                .await
            ),
            Code::NotFound
        );
        assert_eq!(code(remove(&mut c, "nope").await), Code::NotFound);
        assert_eq!(
            code(
                c.usage(pb::UsageRequest {
                    snapshotter: "dedup".into(),
                    key: "nope".into()
                })
                .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(prepare(&mut c, "", "", HashMap::new()).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(prepare(&mut c, "a", "nope", HashMap::new()).await),
            Code::NotFound
        );
        assert_eq!(code(commit(&mut c, "nope", "n").await), Code::NotFound);

        prepare(&mut c, "active", "", HashMap::new()).await.unwrap();
        assert_eq!(
            code(prepare(&mut c, "active", "", HashMap::new()).await),
            Code::AlreadyExists
        );
        // A parent that is not committed.
        assert_eq!(
            code(prepare(&mut c, "child", "active", HashMap::new()).await),
            Code::InvalidArgument
        );
        fs::write(root.path().join("snapshots/1/fs/f"), b"x").unwrap();
        commit(&mut c, "active", "base").await.unwrap();
        // Commit of a committed (non-active) snapshot, and onto an existing name.
        prepare(&mut c, "top", "base", HashMap::new())
            .await
            .unwrap();
        assert_eq!(
            code(commit(&mut c, "base", "other").await),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(commit(&mut c, "top", "base").await),
            Code::AlreadyExists
        );
        c.view(pb::ViewSnapshotRequest {
            snapshotter: "dedup".into(),
            key: "v".into(),
            parent: "base".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap();
        assert_eq!(
            code(commit(&mut c, "v", "other").await),
            Code::FailedPrecondition
        );
        // Mounts of a committed snapshot.
        assert_eq!(
            code(
                c.mounts(pb::MountsRequest {
                    snapshotter: "dedup".into(),
                    key: "base".into()
                })
                .await
            ),
            Code::FailedPrecondition
        );
        // Remove of a snapshot with children.
        assert_eq!(code(remove(&mut c, "base").await), Code::FailedPrecondition);
        // Malformed filter and update mask.
        assert_eq!(
            code(list(&mut c, &["kind==\"x"]).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(list(&mut c, &["parent!="]).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                c.update(pb::UpdateSnapshotRequest {
                    snapshotter: "dedup".into(),
                    info: Some(pb::Info {
                        name: "base".into(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["parent".into()]
                    }),
                })
                .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                c.update(pb::UpdateSnapshotRequest {
                    snapshotter: "dedup".into(),
                    info: Some(pb::Info {
                        name: "nope".into(),
                        ..Default::default()
                    }),
                    update_mask: None,
                })
                .await
            ),
            Code::NotFound
        );
        // Still serving, and the snapshots are intact.
        assert_eq!(list(&mut c, &[]).await.unwrap(), ["base", "top", "v"]);
        assert!(fs::metadata(root.path().join("m"))
            .unwrap()
            .file_type()
            .is_dir());
        assert!(!fs::metadata(&server.socket).unwrap().file_type().is_fifo());
        for k in ["top", "v", "base"] {
            remove(&mut c, k).await.unwrap();
        }
        server.stop().await;
    });
}

/// What a crash leaves behind (a snapshot directory with no record, a layer converted but
/// never committed, a layer mount nothing references, a half-written blob file) is
/// removed by Cleanup; what snapshots use is not.
#[test]
fn cleanup_removes_what_a_crash_leaves() {
    if !is_root() {
        eprintln!("SKIPPED cleanup_removes_what_a_crash_leaves: needs root for EROFS mounts");
        return;
    }
    let root = Root::new();
    let rt = runtime();
    rt.block_on(async {
        let server = start(root.path()).await;
        let mut c = server.client.clone();
        // A live layer and a live container.
        let m = prepare(
            &mut c,
            "extract-k",
            "",
            labels(&[("containerd.io/snapshot.ref", &chain(5))]),
        )
        .await
        .unwrap();
        fs::write(Path::new(&m[0].source).join("live"), b"live data").unwrap();
        commit(&mut c, "extract-k", "live").await.unwrap();
        prepare(&mut c, "ctr", "live", HashMap::new())
            .await
            .unwrap();

        // Crash leftovers.
        let orphan_dir = root.path().join("snapshots/999/fs");
        fs::create_dir_all(&orphan_dir).unwrap();
        fs::write(orphan_dir.join("x"), b"x").unwrap();
        let src = root.path().join("orphan-src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("orphan"), vec![7u8; 200_000]).unwrap();
        let orphan_hex = hex::encode([6u8; 32]);
        server.snap.meta().own_layer(&orphan_hex).unwrap();
        dedupd::convert::convert_dir(&server.store, &src, &format!("sha256:{orphan_hex}")).unwrap();
        let before = server.store.stats().unwrap();
        assert_eq!(before.layers, 2);
        // A mountpoint no slot names, and a slot of a layer no snapshot references.
        let stray_mnt = root.path().join("m/77");
        fs::create_dir_all(&stray_mnt).unwrap();
        let orphan_slot = server.snap.meta().assign_layer_slot(&orphan_hex).unwrap();
        let orphan_mnt = root.path().join(format!("m/{orphan_slot}"));
        fs::create_dir_all(&orphan_mnt).unwrap();
        fs::write(root.path().join("local/deadbeef.tmp"), b"partial").unwrap();

        c.cleanup(pb::CleanupRequest {
            snapshotter: "dedup".into(),
        })
        .await
        .unwrap();
        assert!(!root.path().join("snapshots/999").exists());
        assert!(!stray_mnt.exists() && !orphan_mnt.exists());
        assert_eq!(server.snap.meta().layer_slot(&orphan_hex).unwrap(), None);
        assert!(!root.path().join("local/deadbeef.tmp").exists());
        let after = server.store.stats().unwrap();
        assert_eq!(
            after.layers, 1,
            "the orphan layer is gone, the live one stays"
        );
        assert!(
            after.chunks < before.chunks && after.chunks > 0,
            "{before:?} -> {after:?}"
        );
        assert!(server.store.layer(&orphan_hex).unwrap().is_none());
        // What snapshots use is intact.
        let live_mnt = server
            .snap
            .layer_mountpoint(&hex::encode([5u8; 32]))
            .unwrap()
            .unwrap();
        assert_eq!(fs::read(live_mnt.join("live")).unwrap(), b"live data");
        let m = c
            .mounts(pb::MountsRequest {
                snapshotter: "dedup".into(),
                key: "ctr".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert!(Path::new(option(&m[0], "upperdir").unwrap()).is_dir());
        assert_eq!(list(&mut c, &[]).await.unwrap(), ["ctr", "live"]);
        remove(&mut c, "ctr").await.unwrap();
        remove(&mut c, "live").await.unwrap();
        assert_eq!(server.store.stats().unwrap().chunks, 0);
        server.stop().await;
    });
}

/// The daemon's control thread serves and stops cleanly, and the socket goes with it.
#[test]
fn control_thread_serves_and_stops() {
    let root = Root::new();
    let store = Arc::new(Store::open(root.path()).unwrap());
    let mounter: Arc<dyn LayerMounter> = Arc::new(LocalMounter::new(store.clone()).unwrap());
    let snap = Arc::new(Snapshotter::open(root.path(), store, mounter).unwrap());
    let socket = root.path().join("ctl/dedupd.sock");
    let control = dedupd::snapshotter::ControlThread::spawn(socket.clone(), snap).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let channel = connect(&socket).await;
        let mut c = SnapshotsClient::new(channel);
        assert_eq!(code(stat(&mut c, "nope").await), Code::NotFound);
        assert_eq!(list(&mut c, &[]).await.unwrap().len(), 0);
    });
    // The client's connection lives on this runtime: dropping it disconnects.
    drop(rt);
    assert!(control.is_running());
    let dir_mode = fs::metadata(root.path().join("ctl"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        dir_mode, 0o700,
        "a socket directory dedupd creates is private"
    );
    control.stop().unwrap();
    assert!(!socket.exists());
}

/// Waits (bounded) for the server's unix socket and connects a channel to it.
async fn connect(socket: &std::path::Path) -> tonic::transport::Channel {
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::]:50051")
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
        .unwrap()
}
