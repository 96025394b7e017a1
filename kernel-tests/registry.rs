//! The registry client against real registries (Debian's `docker-registry`, i.e.
//! distribution 2.8) on 127.0.0.1: plain HTTP, HTTPS with a private CA and Basic auth,
//! Bearer tokens from our token issuer, a hosts.toml mirror, and faults injected by a
//! proxy. Each test pushes a generated image with the client, then reads it back.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::registry::{docker_config, hosts_toml, Fault, FaultProxy, TestRegistry};
use dedupd::registry::{
    Descriptor, ImageRef, Registry, RegistryError, RegistryOptions, OCI_INDEX, OCI_MANIFEST,
};
use sha2::{Digest as _, Sha256};

/// Longest any one test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Runs `f` with a time limit.
async fn bounded<F: Future<Output = ()>>(f: F) {
    let start = Instant::now();
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("test took more than {TEST_TIMEOUT:?}"));
    eprintln!("test body took {:?}", start.elapsed());
}

/// Client options for a test: no host configuration, no credentials, short timeouts.
fn options(dir: &Path) -> RegistryOptions {
    RegistryOptions {
        hosts_dir: dir.join("certs.d"),
        plain_http: false,
        docker_config: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        max_requests_per_host: 8,
    }
}

/// A generated image: two gzip layers of pseudo-random files, a config, a manifest.
struct Image {
    layers: Vec<Bytes>,
    config: Bytes,
    manifest: Bytes,
    manifest_digest: String,
}

impl Image {
    fn new(seed: u64) -> Image {
        let mut layers = Vec::new();
        for l in 0..2u64 {
            let mut tar = tar::Builder::new(Vec::new());
            for f in 0..3u64 {
                // Incompressible enough that the gzip layer is hundreds of KiB.
                let mut x = seed.wrapping_mul(1_000_003) ^ (l << 32) ^ (f << 16) ^ 0x9e37_79b9;
                let data: Vec<u8> = (0..100_000 + 7_777 * f)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x >> 24) as u8
                    })
                    .collect();
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                tar.append_data(&mut h, format!("dir{l}/file{f}"), &data[..])
                    .unwrap();
            }
            let tar = tar.into_inner().unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            layers.push(Bytes::from(gz.finish().unwrap()));
        }
        let config = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
                "config": {"Env": [format!("SEED={seed}")]},
            }))
            .unwrap(),
        );
        let desc = |media: &str, b: &Bytes| serde_json::json!({"mediaType": media, "digest": digest_of(b), "size": b.len()});
        let manifest = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc("application/vnd.oci.image.config.v1+json", &config),
                "layers": layers.iter()
                    .map(|l| desc("application/vnd.oci.image.layer.v1.tar+gzip", l))
                    .collect::<Vec<_>>(),
            }))
            .unwrap(),
        );
        let manifest_digest = digest_of(&manifest);
        Image {
            layers,
            config,
            manifest,
            manifest_digest,
        }
    }

    /// Pushes it with the client under `r` (a tag): layer 0 from bytes, layer 1 from a
    /// file, as the lead's publisher will.
    async fn push(&self, reg: &Registry, r: &ImageRef, scratch: &Path) {
        reg.push_blob(r, &digest_of(&self.layers[0]), self.layers[0].clone())
            .await
            .unwrap();
        let file = scratch.join(format!("layer-{}", &self.manifest_digest[7..19]));
        std::fs::write(&file, &self.layers[1]).unwrap();
        reg.push_blob_file(r, &digest_of(&self.layers[1]), &file)
            .await
            .unwrap();
        reg.push_blob(r, &digest_of(&self.config), self.config.clone())
            .await
            .unwrap();
        let d = reg
            .push_manifest(r, OCI_MANIFEST, self.manifest.clone())
            .await
            .unwrap();
        assert_eq!(d, self.manifest_digest);
        // Pushing again finds everything there (HEAD first) and succeeds.
        reg.push_blob(r, &digest_of(&self.config), self.config.clone())
            .await
            .unwrap();
        reg.push_blob_file(r, &digest_of(&self.layers[1]), &file)
            .await
            .unwrap();
    }

    /// Reads everything back through `reg` and checks every byte.
    async fn check(&self, reg: &Registry, r: &ImageRef) {
        let m = reg.get_manifest(r).await.unwrap();
        assert_eq!(m.digest, self.manifest_digest);
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert_eq!(m.bytes, self.manifest);
        let by_digest = r.with_digest(&self.manifest_digest);
        assert_eq!(reg.get_manifest(&by_digest).await.unwrap(), m);

        for layer in &self.layers {
            let d = digest_of(layer);
            assert_eq!(reg.get_blob(r, &d, 1 << 30).await.unwrap(), *layer);
            let len = layer.len() as u64;
            for (off, n) in [
                (0, 1),
                (0, 4096),
                (1, 1000),
                (len / 2, 65536),
                (len - 10, 10),
                (0, len),
            ] {
                let got = reg.get_blob_range(r, &d, off, n).await.unwrap();
                assert_eq!(
                    got,
                    layer[off as usize..(off + n) as usize],
                    "range {off}+{n}"
                );
            }
            // Past the end: an error, not a short read passed off as data.
            assert!(reg.get_blob_range(r, &d, len + 10, 5).await.is_err());
            assert!(matches!(
                reg.get_blob(r, &d, len - 1).await,
                Err(RegistryError::TooLarge { .. })
            ));
            let (announced, mut stream) = reg.blob_stream(r, &d).await.unwrap();
            assert_eq!(announced, Some(len));
            let mut all = Vec::new();
            while let Some(chunk) = tokio_stream::StreamExt::next(&mut stream).await {
                all.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(all, layer[..]);
            assert!(reg.blob_exists(r, &d).await.unwrap());
        }
        let missing = digest_of(b"not pushed anywhere");
        assert!(!reg.blob_exists(r, &missing).await.unwrap());
        let e = reg.get_blob(r, &missing, 100).await.unwrap_err();
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains(&missing), "{e}");
        let e = reg
            .get_manifest(&r.with_tag("no-such-tag"))
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    }
}

/// Pushes a small artifact manifest whose subject is `subject`; returns its descriptor.
async fn push_referrer(
    reg: &Registry,
    subject: &ImageRef,
    subject_size: u64,
    kind: &str,
) -> Descriptor {
    let empty = Bytes::from_static(b"{}");
    let blob = Bytes::from(format!("payload of {kind}"));
    reg.push_blob(subject, &digest_of(&empty), empty.clone())
        .await
        .unwrap();
    reg.push_blob(subject, &digest_of(&blob), blob.clone())
        .await
        .unwrap();
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": kind,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": digest_of(&empty), "size": 2},
            "layers": [{"mediaType": "application/octet-stream",
                        "digest": digest_of(&blob), "size": blob.len()}],
            "subject": {"mediaType": OCI_MANIFEST,
                        "digest": subject.digest.clone().unwrap(), "size": subject_size},
        }))
        .unwrap(),
    );
    let d = digest_of(&manifest);
    let pushed = reg
        .push_manifest(&subject.with_digest(&d), OCI_MANIFEST, manifest.clone())
        .await
        .unwrap();
    assert_eq!(pushed, d);
    Descriptor {
        media_type: OCI_MANIFEST.to_string(),
        digest: d,
        size: manifest.len() as u64,
        artifact_type: Some(kind.to_string()),
        annotations: BTreeMap::from([("org.example.kind".to_string(), kind.to_string())]),
    }
}

/// Two referrers of one subject through the tag-schema fallback: adding ours keeps the
/// other, adding twice changes nothing, filtering by artifact type works.
async fn referrers_round_trip(reg: &Registry, r: &ImageRef, img: &Image) {
    let subject = r.with_digest(&img.manifest_digest);
    assert!(reg.referrers(&subject, None).await.unwrap().is_empty());
    let theirs = push_referrer(
        reg,
        &subject,
        img.manifest.len() as u64,
        "application/vnd.example.sig",
    )
    .await;
    let ours = push_referrer(
        reg,
        &subject,
        img.manifest.len() as u64,
        "application/vnd.dedupd.lazy",
    )
    .await;
    reg.add_referrer(&subject, theirs.clone()).await.unwrap();
    reg.add_referrer(&subject, ours.clone()).await.unwrap();
    let tag_index = reg
        .get_manifest(&subject.with_tag(&img.manifest_digest.replace(':', "-")))
        .await
        .unwrap();
    reg.add_referrer(&subject, ours.clone()).await.unwrap();
    let again = reg
        .get_manifest(&subject.with_tag(&img.manifest_digest.replace(':', "-")))
        .await
        .unwrap();
    assert_eq!(
        again.digest, tag_index.digest,
        "adding twice rewrote the index"
    );
    assert_eq!(tag_index.media_type, OCI_INDEX);
    let all = reg.referrers(&subject, None).await.unwrap();
    assert_eq!(all, vec![theirs.clone(), ours.clone()]);
    let only = reg
        .referrers(&subject, Some("application/vnd.dedupd.lazy"))
        .await
        .unwrap();
    assert_eq!(only, vec![ours]);
}

#[tokio::test]
async fn plain_http_registry() {
    let registry = TestRegistry::plain();
    bounded(async {
        let scratch = tempfile::tempdir().unwrap();
        let reg = Registry::new(RegistryOptions {
            plain_http: true,
            ..options(scratch.path())
        })
        .unwrap();
        let r = ImageRef::parse(&format!("{}/dedupd/plain:v1", registry.host)).unwrap();
        let img = Image::new(1);
        img.push(&reg, &r, scratch.path()).await;
        img.check(&reg, &r).await;
        referrers_round_trip(&reg, &r, &img).await;

        // Without --plain-http the client speaks TLS to a plain server: a TLS error,
        // not worth retrying.
        let tls = Registry::new(options(scratch.path())).unwrap();
        let e = tls.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, RegistryError::Tls { .. }), "{e:?}");
        assert!(!e.is_retryable());
    })
    .await;
}

#[tokio::test]
async fn tls_basic_auth_with_private_ca() {
    let registry = TestRegistry::tls_basic("alice", "wonderland-9");
    bounded(async {
        let scratch = tempfile::tempdir().unwrap();
        // The CA comes from hosts.toml, relative to its directory.
        let hosts_dir = hosts_toml(
            &scratch.path().join("certs.d"),
            &registry.host,
            &format!(
                "server = \"https://{}\"\nca = \"private-ca.pem\"\n",
                registry.host
            ),
        );
        std::fs::copy(
            registry.ca_cert.as_ref().unwrap(),
            hosts_dir.join(&registry.host).join("private-ca.pem"),
        )
        .unwrap();
        let config = docker_config(
            scratch.path(),
            &[(
                &format!("https://{}", registry.host),
                "alice",
                "wonderland-9",
            )],
        );
        let reg = Registry::new(RegistryOptions {
            hosts_dir: hosts_dir.clone(),
            docker_config: Some(config),
            ..options(scratch.path())
        })
        .unwrap();
        assert!(!format!("{reg:?}").contains("wonderland-9"));
        let r = ImageRef::parse(&format!("{}/dedupd/tls:v1", registry.host)).unwrap();
        let img = Image::new(2);
        img.push(&reg, &r, scratch.path()).await;
        img.check(&reg, &r).await;

        // Anonymous: 401, saying no credentials were found.
        let anon = Registry::new(RegistryOptions {
            hosts_dir: hosts_dir.clone(),
            ..options(scratch.path())
        })
        .unwrap();
        let e = anon.get_manifest(&r).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Unauthorized { status: 401, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("anonymously"), "{e}");

        // A wrong password: 401 with the credentials named by file, not shown.
        let wrong_dir = tempfile::tempdir().unwrap();
        let wrong = Registry::new(RegistryOptions {
            hosts_dir: hosts_dir.clone(),
            docker_config: Some(docker_config(
                wrong_dir.path(),
                &[(&registry.host, "alice", "not-her-password")],
            )),
            ..options(scratch.path())
        })
        .unwrap();
        let e = wrong
            .get_blob(&r, &digest_of(&img.layers[0]), 1 << 30)
            .await
            .unwrap_err();
        assert!(
            matches!(e, RegistryError::Unauthorized { status: 401, .. }),
            "{e}"
        );
        assert!(!e.is_retryable());
        assert!(!format!("{e} {e:?}").contains("not-her-password"), "{e:?}");

        // Without the CA the certificate is not trusted.
        let no_ca = Registry::new(RegistryOptions {
            hosts_dir: scratch.path().join("no-such-dir"),
            ..options(scratch.path())
        })
        .unwrap();
        let e = no_ca.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, RegistryError::Tls { .. }), "{e:?}");
        assert!(!e.is_retryable());
    })
    .await;
}

#[tokio::test]
async fn bearer_token_auth() {
    let mut registry = TestRegistry::bearer("bob", "builder-7");
    let scratch = tempfile::tempdir().unwrap();
    let config = docker_config(scratch.path(), &[(&registry.host, "bob", "builder-7")]);
    let reg = Registry::new(RegistryOptions {
        plain_http: true,
        docker_config: Some(config),
        ..options(scratch.path())
    })
    .unwrap();
    let r = ImageRef::parse(&format!("{}/dedupd/bearer:v1", registry.host)).unwrap();
    let img = Image::new(3);
    bounded(async {
        img.push(&reg, &r, scratch.path()).await;
        img.check(&reg, &r).await;
        referrers_round_trip(&reg, &r, &img).await;
    })
    .await;

    // The registry now trusts only a new signing key: the cached tokens are rejected,
    // renewed once, and the requests succeed.
    let (issued_before, _) = registry.issuer.as_ref().unwrap().stats();
    registry.rotate_token_key();
    bounded(async {
        let m = reg.get_manifest(&r).await.unwrap();
        assert_eq!(m.digest, img.manifest_digest);
        let d = digest_of(&img.layers[0]);
        assert_eq!(
            reg.get_blob_range(&r, &d, 5, 5).await.unwrap(),
            img.layers[0][5..10]
        );
    })
    .await;
    let (issued_after, _) = registry.issuer.as_ref().unwrap().stats();
    assert!(issued_after > issued_before, "no new token was fetched");

    bounded(async {
        // A wrong password: the token server refuses, and the error says so.
        let wrong_dir = tempfile::tempdir().unwrap();
        let wrong = Registry::new(RegistryOptions {
            plain_http: true,
            docker_config: Some(docker_config(
                wrong_dir.path(),
                &[(&registry.host, "bob", "wrong")],
            )),
            ..options(scratch.path())
        })
        .unwrap();
        let e = wrong.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, RegistryError::AuthFailed { .. }), "{e:?}");
        assert!(!e.is_retryable());
        assert!(!format!("{e:?}").contains("\"wrong\""), "{e:?}");
        let (_, refused) = registry.issuer.as_ref().unwrap().stats();
        assert!(refused >= 1);

        // Anonymous: a token that grants nothing, so 401.
        let anon = Registry::new(RegistryOptions {
            plain_http: true,
            ..options(scratch.path())
        })
        .unwrap();
        let e = anon.get_manifest(&r).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Unauthorized { status: 401, .. }),
            "{e:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn hosts_toml_mirror_then_server() {
    let mut mirror = TestRegistry::plain();
    let mut server = TestRegistry::plain();
    bounded(async {
        let scratch = tempfile::tempdir().unwrap();
        // Fill the mirror directly, as a pull-through cache would have been filled.
        let direct = Registry::new(RegistryOptions {
            plain_http: true,
            ..options(scratch.path())
        })
        .unwrap();
        let on_mirror = Image::new(4);
        let mirror_ref = ImageRef::parse(&format!("{}/dedupd/app:v1", mirror.host)).unwrap();
        on_mirror.push(&direct, &mirror_ref, scratch.path()).await;

        let hosts_dir = hosts_toml(
            &scratch.path().join("certs.d"),
            &server.host,
            &format!(
                "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                server.host, mirror.host
            ),
        );
        let reg = Registry::new(RegistryOptions {
            hosts_dir,
            ..options(scratch.path())
        })
        .unwrap();
        assert_eq!(
            reg.host_urls(&server.host).unwrap(),
            [format!("http://{}", mirror.host), format!("http://{}", server.host)]
        );
        // The server lacks it; the mirror has it.
        let r = ImageRef::parse(&format!("{}/dedupd/app:v1", server.host)).unwrap();
        on_mirror.check(&reg, &r).await;

        // Pushes go to the server only (the mirror has no push capability).
        let on_server = Image::new(5);
        let r2 = ImageRef::parse(&format!("{}/dedupd/app:v2", server.host)).unwrap();
        on_server.push(&reg, &r2, scratch.path()).await;
        let server_direct = ImageRef::parse(&format!("{}/dedupd/app:v2", server.host)).unwrap();
        assert!(direct.get_manifest(&server_direct).await.is_ok());
        assert!(direct
            .get_manifest(&ImageRef::parse(&format!("{}/dedupd/app:v2", mirror.host)).unwrap())
            .await
            .is_err());
        // The mirror answers 404, the server has it.
        on_server.check(&reg, &r2).await;

        // Mirror down: the server answers.
        mirror.stop();
        let m = reg.get_manifest(&r2).await.unwrap();
        assert_eq!(m.digest, on_server.manifest_digest);
        let d = digest_of(&on_server.layers[1]);
        assert_eq!(reg.get_blob_range(&r2, &d, 100, 50).await.unwrap(), on_server.layers[1][100..150]);
        // Only the mirror had v1: the last host's answer is the error.
        let e = reg.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");

        // Server down, mirror up: the mirror serves.
        mirror.restart();
        server.stop();
        let m = reg.get_manifest(&r).await.unwrap();
        assert_eq!(m.digest, on_mirror.manifest_digest);
        let e = reg.get_manifest(&r2).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
    })
    .await;
}

#[tokio::test]
async fn faults_give_retryable_errors() {
    let registry = TestRegistry::plain();
    let proxy = FaultProxy::start(&registry.host);
    bounded(async {
        let scratch = tempfile::tempdir().unwrap();
        let reg = Registry::new(RegistryOptions {
            plain_http: true,
            request_timeout: Duration::from_secs(2),
            ..options(scratch.path())
        })
        .unwrap();
        let r = ImageRef::parse(&format!("{}/dedupd/faults:v1", proxy.host)).unwrap();
        let img = Image::new(6);
        img.push(&reg, &r, scratch.path()).await;
        let layer = &img.layers[0];
        let d = digest_of(layer);

        proxy.set(Fault::IgnoreRange);
        let e = reg.get_blob_range(&r, &d, 10, 100).await.unwrap_err();
        assert!(matches!(e, RegistryError::RangeIgnored { .. }), "{e:?}");
        assert!(e.is_retryable());

        proxy.set(Fault::Short);
        let e = reg.get_blob_range(&r, &d, 10, 1000).await.unwrap_err();
        assert!(
            matches!(
                e,
                RegistryError::Short {
                    got: 500,
                    want: 1000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_retryable());

        proxy.set(Fault::Unavailable);
        let e = reg.get_blob_range(&r, &d, 10, 100).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Status { status: 503, .. }),
            "{e:?}"
        );
        assert!(e.is_retryable());

        proxy.set(Fault::Reset);
        let e = reg.get_blob_range(&r, &d, 10, 100).await.unwrap_err();
        assert!(matches!(e, RegistryError::Network { .. }), "{e:?}");
        assert!(e.is_retryable());

        proxy.set(Fault::Truncate);
        let e = reg.get_blob(&r, &d, 1 << 30).await.unwrap_err();
        assert!(matches!(e, RegistryError::Network { .. }), "{e:?}");
        assert!(e.is_retryable());

        proxy.set(Fault::Delay(3000));
        let e = reg.get_blob_range(&r, &d, 10, 100).await.unwrap_err();
        assert!(matches!(e, RegistryError::Timeout { .. }), "{e:?}");
        assert!(e.is_retryable());

        // A flipped byte: a whole blob is refused; a range comes back as sent (its
        // caller verifies it).
        proxy.set(Fault::Flip);
        let e = reg.get_blob(&r, &d, 1 << 30).await.unwrap_err();
        assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
        assert!(!e.is_retryable());
        let got = reg.get_blob_range(&r, &d, 0, 1000).await.unwrap();
        assert_ne!(got, layer[..1000]);
        assert_eq!(got[..500], layer[..500]);

        // One 503, then the retry goes through: what a fetcher's retry loop sees.
        proxy.set_for(Fault::Unavailable, "/blobs/", Some(1));
        assert!(reg
            .get_blob_range(&r, &d, 0, 10)
            .await
            .unwrap_err()
            .is_retryable());
        assert_eq!(
            reg.get_blob_range(&r, &d, 0, 10).await.unwrap(),
            layer[..10]
        );

        // At most max_requests_per_host (2 here) in flight: six slow requests take
        // three rounds.
        let bounded_reg = Registry::new(RegistryOptions {
            plain_http: true,
            max_requests_per_host: 2,
            ..options(scratch.path())
        })
        .unwrap();
        proxy.set(Fault::Delay(300));
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..6u64 {
            let (reg, r, d) = (bounded_reg.clone(), r.clone(), d.clone());
            set.spawn(async move { reg.get_blob_range(&r, &d, i * 10, 10).await });
        }
        while let Some(res) = set.join_next().await {
            res.unwrap().unwrap();
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(850),
            "six requests, two at a time, took {took:?}"
        );

        proxy.set(Fault::Pass);
        proxy.clear();
        assert_eq!(
            reg.get_blob_range(&r, &d, 7, 9).await.unwrap(),
            layer[7..16]
        );
        let seen = proxy.requests();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].range.as_deref(), Some("bytes=7-15"));
    })
    .await;
}
