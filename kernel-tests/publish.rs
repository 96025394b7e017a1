//! `dedupd publish` against real registries (Debian's `docker-registry`, distribution
//! 2.8, on 127.0.0.1): generated images are pushed with the registry client, the built
//! binary publishes them, and the artifact is read back and checked byte by byte: every
//! chunk of every table located in its data blob and verified, every EROFS image equal
//! to the store's, the image itself untouched. Publishing again uploads nothing.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::registry::{docker_config, hosts_toml, TestRegistry};
use dedupd::registry::{Descriptor, ImageRef, Registry, RegistryOptions, OCI_INDEX, OCI_MANIFEST};
use dedupd::remote::artifact::{Artifact, LayerMeta, ARTIFACT_TYPE, EMPTY_DIGEST};
use dedupd::remote::LazyPuller;
use dedupd::store::chunk::verify_foreign_record;
use dedupd::store::{Locator, Store, MAX_CHUNK_BYTES};
use sha2::{Digest as _, Sha256};

/// Longest one `dedupd publish` may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(120);
/// A foreign referrer's type.
const SBOM: &str = "application/vnd.example.sbom";

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Pseudo-random bytes (xorshift): incompressible, so the records are stored raw.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// How a generated layer is compressed.
#[derive(Clone, Copy)]
enum Comp {
    Tar,
    Gzip,
    Zstd,
}

/// A generated layer: its blob and its diff_id.
#[derive(Clone)]
struct Layer {
    blob: Bytes,
    diff_id: String,
}

fn layer(files: &[(&str, Vec<u8>)], comp: Comp) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let diff_id = digest_of(&tar);
    let blob = match comp {
        Comp::Tar => tar,
        Comp::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        }
        Comp::Zstd => zstd::bulk::compress(&tar, 3).unwrap(),
    };
    Layer {
        blob: Bytes::from(blob),
        diff_id,
    }
}

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A generated image manifest with its config.
struct Image {
    layers: Vec<Layer>,
    config: Bytes,
    manifest: Bytes,
    digest: String,
}

impl Image {
    /// An image of `layers` whose config lists `diff_ids`.
    fn with_diff_ids(layers: Vec<Layer>, arch: &str, diff_ids: Vec<String>) -> Image {
        let config = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "architecture": arch, "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "config": {"Cmd": ["/app/bin"]},
            }))
            .unwrap(),
        );
        let media = |l: &Layer| match l.blob[..4] {
            [0x1f, 0x8b, ..] => GZIP,
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
            _ => "application/vnd.oci.image.layer.v1.tar",
        };
        let manifest = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": digest_of(&config), "size": config.len()},
                "layers": layers.iter().map(|l| serde_json::json!({
                    "mediaType": media(l), "digest": digest_of(&l.blob), "size": l.blob.len(),
                })).collect::<Vec<_>>(),
            }))
            .unwrap(),
        );
        Image {
            digest: digest_of(&manifest),
            layers,
            config,
            manifest,
        }
    }

    fn new(layers: Vec<Layer>, arch: &str) -> Image {
        let ids = layers.iter().map(|l| l.diff_id.clone()).collect();
        Image::with_diff_ids(layers, arch, ids)
    }

    fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: self.digest.clone(),
            size: self.manifest.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Pushes layers, config and manifest, the manifest under `tag`.
    async fn push(&self, reg: &Registry, repo: &ImageRef, tag: &str) {
        for l in &self.layers {
            reg.push_blob(repo, &digest_of(&l.blob), l.blob.clone())
                .await
                .unwrap();
        }
        reg.push_blob(repo, &digest_of(&self.config), self.config.clone())
            .await
            .unwrap();
        let d = reg
            .push_manifest(&repo.with_tag(tag), OCI_MANIFEST, self.manifest.clone())
            .await
            .unwrap();
        assert_eq!(d, self.digest);
    }
}

/// Two images (amd64, arm64) sharing their base and config layers, and files across
/// their app layers; gzip, zstd and plain tar layers.
fn two_images() -> (Image, Image) {
    let lib = noise(1, 400_000);
    let shared_data = noise(2, 150_000);
    let base = layer(
        &[
            ("etc/os-release", b"ID=dedupd-test\n".to_vec()),
            ("usr/lib/libbig.so", lib.clone()),
            ("usr/share/zeros", vec![0u8; 200_000]),
        ],
        Comp::Gzip,
    );
    let conf = layer(
        &[
            ("etc/app.conf", b"threads = 4\n".to_vec()),
            ("etc/app.d/extra", noise(3, 10_000)),
        ],
        Comp::Tar,
    );
    let app_amd64 = layer(
        &[
            ("app/bin", noise(4, 300_000)),
            ("app/data", shared_data.clone()),
            ("app/lib/libbig.so", lib),
        ],
        Comp::Zstd,
    );
    let app_arm64 = layer(
        &[("app/bin", noise(5, 280_000)), ("app/data", shared_data)],
        Comp::Gzip,
    );
    (
        Image::new(vec![base.clone(), app_amd64, conf.clone()], "amd64"),
        Image::new(vec![base, app_arm64, conf], "arm64"),
    )
}

/// An OCI index of `images` (linux, their architectures) and an `unknown/unknown`
/// attestation manifest, pushed under `tag`; returns its digest.
async fn push_index(
    reg: &Registry,
    repo: &ImageRef,
    tag: &str,
    images: &[(&Image, &str)],
) -> String {
    // An attestation like buildx's: not a linux image, never published for.
    let att_config = Bytes::from_static(br#"{"attestation":true}"#);
    reg.push_blob(repo, &digest_of(&att_config), att_config.clone())
        .await
        .unwrap();
    let att = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest_of(&att_config), "size": att_config.len()},
            "layers": [],
        }))
        .unwrap(),
    );
    reg.push_manifest(
        &repo.with_digest(&digest_of(&att)),
        OCI_MANIFEST,
        att.clone(),
    )
    .await
    .unwrap();
    let mut manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(img, arch)| {
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": img.digest,
                "size": img.manifest.len(), "platform": {"os": "linux", "architecture": arch}})
        })
        .collect();
    manifests.push(
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest_of(&att),
        "size": att.len(), "platform": {"os": "unknown", "architecture": "unknown"}}),
    );
    let index = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
        }))
        .unwrap(),
    );
    reg.push_manifest(&repo.with_tag(tag), OCI_INDEX, index.clone())
        .await
        .unwrap()
}

/// Pushes a small artifact of type `kind` whose subject is `subject` and lists it
/// among its referrers.
async fn push_foreign_referrer(reg: &Registry, repo: &ImageRef, subject: &Image, kind: &str) {
    let blob = Bytes::from(format!("{kind} of {}", subject.digest));
    let cfg = Bytes::from_static(b"{\"foreign\":1}");
    reg.push_blob(repo, &digest_of(&blob), blob.clone())
        .await
        .unwrap();
    reg.push_blob(repo, &digest_of(&cfg), cfg.clone())
        .await
        .unwrap();
    let m = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": kind,
            "config": {"mediaType": "application/vnd.example.config+json",
                       "digest": digest_of(&cfg), "size": cfg.len()},
            "layers": [{"mediaType": "application/octet-stream",
                        "digest": digest_of(&blob), "size": blob.len()}],
            "subject": subject.descriptor(),
        }))
        .unwrap(),
    );
    let d = digest_of(&m);
    reg.push_manifest(&repo.with_digest(&d), OCI_MANIFEST, m.clone())
        .await
        .unwrap();
    let subject_ref = repo.with_digest(&subject.digest);
    reg.add_referrer(
        &subject_ref,
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d,
            size: m.len() as u64,
            artifact_type: Some(kind.into()),
            annotations: BTreeMap::new(),
        },
    )
    .await
    .unwrap();
}

/// Runs the built `dedupd` with `args` (bounded); returns success, stdout, stderr.
fn dedupd(args: &[&str], home: &Path) -> (bool, String, String) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args(args)
        .env("HOME", home)
        .env_remove("DOCKER_CONFIG")
        .env("DEDUPD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > PUBLISH_TIMEOUT {
            let _ = child.kill();
            panic!("dedupd {args:?} took more than {PUBLISH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!(
        "dedupd {} took {:?}; stderr:\n{stderr}",
        args.first().unwrap_or(&""),
        start.elapsed()
    );
    (out.status.success(), stdout, stderr)
}

/// `dedupd publish IMAGE --root ROOT extra...`; the summary.
fn publish(image: &str, root: &Path, home: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["publish", image, "--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = dedupd(&args, home);
    assert!(ok, "publish failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("summary: {v:#}");
    v
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client(scratch: &Path, plain_http: bool) -> Registry {
    Registry::new(RegistryOptions {
        hosts_dir: scratch.join("certs.d"),
        plain_http,
        docker_config: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        max_requests_per_host: 8,
    })
    .unwrap()
}

/// Checks the artifact `artifact` published for `img` in `repo`, against the store at
/// `root` (closed: the publish process has exited): referrers, manifest, every meta and
/// data blob, every chunk. Returns the artifact.
async fn check_artifact(
    reg: &Registry,
    repo: &ImageRef,
    img: &Image,
    artifact: &str,
    root: &Path,
) -> Artifact {
    let subject = repo.with_digest(&img.digest);
    let ours = reg.referrers(&subject, Some(ARTIFACT_TYPE)).await.unwrap();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].digest, artifact);
    assert_eq!(ours[0].media_type, OCI_MANIFEST);

    let m = reg.get_manifest(&repo.with_digest(artifact)).await.unwrap();
    assert_eq!(ours[0].size, m.bytes.len() as u64);
    let json: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    assert_eq!(json["artifactType"], ARTIFACT_TYPE);
    assert_eq!(json["subject"]["digest"], img.digest);
    assert_eq!(json["subject"]["size"], img.manifest.len());
    assert_eq!(json["subject"]["mediaType"], OCI_MANIFEST);
    assert_eq!(json["config"]["digest"], EMPTY_DIGEST);
    assert!(reg.blob_exists(repo, EMPTY_DIGEST).await.unwrap());
    let a = Artifact::parse(&m.bytes).unwrap();
    assert_eq!(a.subject, img.digest);
    assert_eq!(a.layers.len(), img.layers.len());

    let store = Store::open(root).unwrap();
    let mut out = vec![0u8; MAX_CHUNK_BYTES];
    for (part, l) in a.layers.iter().zip(&img.layers) {
        assert_eq!(part.layer_digest, digest_of(&l.blob));
        assert_eq!(part.diff_id, l.diff_id);
        let meta_bytes = reg
            .get_blob(repo, &part.meta.digest, 1 << 30)
            .await
            .unwrap();
        assert_eq!(meta_bytes.len() as u64, part.meta.size);
        let meta = LayerMeta::decode(&meta_bytes).unwrap();
        assert_eq!(meta.header.layer_digest, part.layer_digest);
        assert_eq!(meta.header.diff_id, l.diff_id);
        let record = store.layer(&part.layer_digest).unwrap().unwrap();
        assert_eq!(
            meta.image,
            std::fs::read(store.image_path(record.id_hex())).unwrap()
        );
        let data_digests: Vec<&str> = part.data.iter().map(|d| d.digest.as_str()).collect();
        assert_eq!(meta.header.data, data_digests);
        let mut data = Vec::new();
        for d in &part.data {
            let b = reg.get_blob(repo, &d.digest, 1 << 30).await.unwrap();
            assert_eq!(b.len() as u64, d.size);
            data.push(b);
        }
        let ids: Vec<&str> = meta.header.blobs.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(
            ids,
            record.blobs.iter().map(String::as_str).collect::<Vec<_>>()
        );
        let mut records = 0u64;
        for (id, (entries, locators)) in ids.iter().zip(&meta.blobs) {
            assert_eq!(entries, &store.blob_entries(id).unwrap().unwrap());
            let mut end = (0u16, 0u64);
            for (e, l) in entries.iter().zip(locators) {
                let Locator::Record {
                    data: i,
                    offset,
                    len,
                } = *l;
                // Table order is data order: a sequential read is one range.
                assert!(
                    (i, offset) == end || (i == end.0 + 1 && offset == 0),
                    "{l:?} after {end:?}"
                );
                end = (i, offset + u64::from(len));
                let rec = &data[usize::from(i)][offset as usize..][..len as usize];
                verify_foreign_record(rec, e.raw_len, &e.digest, &mut out).unwrap();
                records += u64::from(len);
            }
        }
        // Nothing in the data blobs but the records.
        assert_eq!(records, part.data.iter().map(|d| d.size).sum::<u64>());
        // A range read of the last record, as the fetcher makes them.
        if let Some((_, locators)) = meta.blobs.first() {
            if let Some(&Locator::Record {
                data: i,
                offset,
                len,
            }) = locators.last()
            {
                let got = reg
                    .get_blob_range(
                        repo,
                        &part.data[usize::from(i)].digest,
                        offset,
                        u64::from(len),
                    )
                    .await
                    .unwrap();
                assert_eq!(got, data[usize::from(i)][offset as usize..][..len as usize]);
            }
        }
    }
    a
}

/// The files under `dir` with their sizes (a registry's storage, before and after).
fn tree(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), m.len());
            }
        }
    }
    out
}

fn artifacts_of(v: &serde_json::Value) -> Vec<String> {
    v["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["artifact"].as_str().unwrap().to_string())
        .collect()
}

fn sources(v: &serde_json::Value) -> Vec<Vec<String>> {
    v["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["source"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn publish_an_index_then_again() {
    let registry = TestRegistry::plain();
    let rt = runtime();
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("store");
    let reg = client(scratch.path(), true);
    let repo = ImageRef::parse(&format!("{}/dedupd/app:v1", registry.host)).unwrap();
    let (amd, arm) = two_images();
    let index_digest = rt.block_on(async {
        amd.push(&reg, &repo, "amd64").await;
        arm.push(&reg, &repo, "arm64").await;
        let d = push_index(&reg, &repo, "v1", &[(&amd, "amd64"), (&arm, "arm64")]).await;
        push_foreign_referrer(&reg, &repo, &amd, SBOM).await;
        d
    });
    let flags = [
        "--plain-http",
        "--hosts-dir",
        scratch.path().join("certs.d").to_str().unwrap(),
    ]
    .map(String::from);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let image = repo.to_string();
    let first = publish(&image, &root, scratch.path(), &flags);

    let arts = first["artifacts"].as_array().unwrap();
    assert_eq!(arts.len(), 2, "one per linux platform, not the attestation");
    assert_eq!(arts[0]["platform"], "linux/amd64");
    assert_eq!(arts[1]["platform"], "linux/arm64");
    assert_eq!(arts[0]["subject"], amd.digest);
    assert_eq!(arts[1]["subject"], arm.digest);
    assert_eq!(
        sources(&first),
        [["converted"; 3], ["converted"; 3]],
        "a layer the run converted stays 'converted' for the second platform"
    );
    assert_eq!(first["manifests_uploaded"], 2);
    let uploaded = first["blobs_uploaded"].as_u64().unwrap();
    // Per distinct layer (4) a meta and a data blob, and the empty config.
    assert_eq!(uploaded, 9, "{first}");
    // Shared layers are pushed once; the second artifact finds the empty config.
    assert_eq!(first["blobs_present"], 1);
    for a in arts {
        for l in a["layers"].as_array().unwrap() {
            assert_eq!(l["chunk_bytes"], 65536);
            assert!(l["meta"]["bytes"].as_u64().unwrap() > 0);
            assert_eq!(l["data"].as_array().unwrap().len(), 1);
        }
    }
    let digests = artifacts_of(&first);

    rt.block_on(async {
        check_artifact(&reg, &repo, &amd, &digests[0], &root).await;
        check_artifact(&reg, &repo, &arm, &digests[1], &root).await;
        // The foreign referrer is still listed beside ours.
        let all = reg
            .referrers(&repo.with_digest(&amd.digest), None)
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.iter().any(|d| d.artifact_type.as_deref() == Some(SBOM)));
        // The image is untouched.
        assert_eq!(reg.get_manifest(&repo).await.unwrap().digest, index_digest);
        let m = reg.get_manifest(&repo.with_tag("amd64")).await.unwrap();
        assert_eq!(m.bytes, amd.manifest);
        push_foreign_referrer(&reg, &repo, &arm, SBOM).await;
    });

    // The reader (the snapshotter's lazy puller) finds the artifact and registers a
    // layer from it in a fresh store, with the same blobs.
    {
        let published = Store::open(&root).unwrap();
        let lazy_root = scratch.path().join("lazy");
        let lazy = Arc::new(Store::open(&lazy_root).unwrap());
        let puller = LazyPuller::new(
            reg.clone(),
            lazy.clone(),
            rt.handle().clone(),
            None,
            dedupd::remote::PrefetchMode::None,
        );
        let subject = repo.with_digest(&amd.digest);
        let found = puller.artifact(&subject).unwrap().expect("artifact found");
        assert_eq!(found.digest, digests[0]);
        let base = digest_of(&amd.layers[0].blob);
        let diff_hex = &amd.layers[0].diff_id[7..];
        let rec = puller
            .register_layer(&subject, &base, diff_hex, |d| {
                assert_eq!(d, amd.layers[0].diff_id);
                Ok(())
            })
            .unwrap()
            .expect("layer covered");
        let want = published.layer(&base).unwrap().unwrap();
        assert_eq!(rec.blobs, want.blobs);
        assert_eq!(
            std::fs::read(lazy.image_path(diff_hex)).unwrap(),
            std::fs::read(published.image_path(want.id_hex())).unwrap()
        );
    }

    // Again: the same artifacts, nothing uploaded, the foreign referrers kept.
    let second = publish(&image, &root, scratch.path(), &flags);
    assert_eq!(artifacts_of(&second), digests);
    assert_eq!(second["blobs_uploaded"], 0, "{second}");
    assert_eq!(second["bytes_uploaded"], 0);
    assert_eq!(second["manifests_uploaded"], 0);
    assert_eq!(second["blobs_present"].as_u64().unwrap(), uploaded + 1);
    assert_eq!(sources(&second), [["reused"; 3], ["reused"; 3]]);
    rt.block_on(async {
        for (img, d) in [(&amd, &digests[0]), (&arm, &digests[1])] {
            check_artifact(&reg, &repo, img, d, &root).await;
            let all = reg
                .referrers(&repo.with_digest(&img.digest), None)
                .await
                .unwrap();
            assert_eq!(all.len(), 2, "{all:?}");
            assert!(all.iter().any(|d| d.artifact_type.as_deref() == Some(SBOM)));
        }
        assert_eq!(reg.get_manifest(&repo).await.unwrap().digest, index_digest);
    });

    // The amd64 manifest by its own tag: one artifact, the same one.
    let single = publish(
        &repo.with_tag("amd64").to_string(),
        &root,
        scratch.path(),
        &flags,
    );
    assert_eq!(artifacts_of(&single), digests[..1]);
    assert!(single["artifacts"][0]["platform"].is_null());
    assert_eq!(single["blobs_uploaded"], 0);
}

#[test]
fn publish_over_tls_with_basic_auth() {
    let registry = TestRegistry::tls_basic("carol", "s3cret-tls");
    let rt = runtime();
    let scratch = tempfile::tempdir().unwrap();
    let hosts_dir = hosts_toml(
        &scratch.path().join("certs.d"),
        &registry.host,
        &format!("server = \"https://{}\"\nca = \"ca.pem\"\n", registry.host),
    );
    std::fs::copy(
        registry.ca_cert.as_ref().unwrap(),
        hosts_dir.join(&registry.host).join("ca.pem"),
    )
    .unwrap();
    let config = docker_config(scratch.path(), &[(&registry.host, "carol", "s3cret-tls")]);
    let reg = Registry::new(RegistryOptions {
        hosts_dir: hosts_dir.clone(),
        docker_config: Some(config.clone()),
        ..RegistryOptions::default()
    })
    .unwrap();
    let repo = ImageRef::parse(&format!("{}/dedupd/tls:v1", registry.host)).unwrap();
    let (amd, _) = two_images();
    rt.block_on(amd.push(&reg, &repo, "v1"));
    let root = scratch.path().join("store");
    let v = publish(
        &repo.to_string(),
        &root,
        scratch.path(),
        &[
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
            "--docker-config",
            config.to_str().unwrap(),
            "--chunk-size",
            "16384",
        ],
    );
    let digests = artifacts_of(&v);
    assert_eq!(digests.len(), 1);
    assert_eq!(v["artifacts"][0]["layers"][0]["chunk_bytes"], 16384);
    rt.block_on(check_artifact(&reg, &repo, &amd, &digests[0], &root));

    // Without credentials: refused, and nothing is said about the password.
    let (ok, _, stderr) = dedupd(
        &[
            "publish",
            &repo.to_string(),
            "--root",
            root.to_str().unwrap(),
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
        ],
        scratch.path(),
    );
    assert!(!ok);
    assert!(
        stderr.contains("401") || stderr.contains("anonymous"),
        "{stderr}"
    );
}

#[test]
fn a_wrong_diff_id_is_refused_before_anything_is_pushed() {
    let registry = TestRegistry::plain();
    let rt = runtime();
    let scratch = tempfile::tempdir().unwrap();
    let reg = client(scratch.path(), true);
    let repo = ImageRef::parse(&format!("{}/dedupd/bad:v1", registry.host)).unwrap();
    let (amd, _) = two_images();
    // The config gives layer 1 the diff_id of layer 2.
    let mut ids: Vec<String> = amd.layers.iter().map(|l| l.diff_id.clone()).collect();
    ids[1] = ids[2].clone();
    let bad = Image::with_diff_ids(amd.layers.clone(), "amd64", ids.clone());
    rt.block_on(bad.push(&reg, &repo, "v1"));
    let storage = registry.dir().join("storage");
    let before = tree(&storage);

    let root = scratch.path().join("store");
    let (ok, stdout, stderr) = dedupd(
        &[
            "publish",
            &repo.to_string(),
            "--root",
            root.to_str().unwrap(),
            "--plain-http",
            "--hosts-dir",
            scratch.path().join("certs.d").to_str().unwrap(),
        ],
        scratch.path(),
    );
    assert!(!ok, "{stdout}");
    let layer = digest_of(&bad.layers[1].blob);
    for want in [&layer, &ids[1], &amd.layers[1].diff_id] {
        assert!(stderr.contains(want.as_str()), "{want} not in: {stderr}");
    }
    assert!(stderr.contains("diff_id"), "{stderr}");
    assert_eq!(tree(&storage), before, "the publish wrote to the registry");
    rt.block_on(async {
        let refs = reg
            .referrers(&repo.with_digest(&bad.digest), None)
            .await
            .unwrap();
        assert!(refs.is_empty(), "{refs:?}");
        assert!(!reg.blob_exists(&repo, EMPTY_DIGEST).await.unwrap());
    });
}
