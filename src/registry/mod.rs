//! The registry client of lazy pull: manifests, whole and ranged blob reads, pushes and
//! referrers, over containerd's host configuration and docker's credentials.
//!
//! Built on oci-client (Range pulls, the Bearer challenge, Basic, referrers with the
//! tag-schema fallback, push). This module adds what containerd users expect around
//! it:
//! - hosts: `hosts.toml` mirrors tried in file order, then the server ([`hosts`]). A
//!   pull falls back to the next host on connection errors, timeouts, 404 and 5xx;
//!   pushes go to the first host with the `push` capability;
//! - credentials from docker's `config.json` per host ([`auth`]), anonymous without;
//! - a token rejected with 401 (expired, rotated key) is renewed once and the request
//!   retried;
//! - a bound of [`RegistryOptions::max_requests_per_host`] requests in flight per
//!   host, each host with its own keep-alive pool and TLS settings;
//! - errors that say what to do next ([`RegistryError::is_retryable`]).
//!
//! Every read that can be verified is: manifests pinned by digest, whole blobs. Ranges
//! cannot be: their caller checks them against its own chunk digests.

pub mod auth;
mod endpoint;
mod error;
pub mod hosts;
mod reference;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use oci_client::errors::OciDistributionError;
use oci_client::RegistryOperation;
use tokio::sync::Semaphore;
use tokio_stream::{Stream, StreamExt};

pub use self::auth::{Credentials, DockerConfig};
use self::endpoint::{Endpoint, EndpointSettings};
pub use self::error::{RegistryError, Target};
use self::hosts::Caps;
pub use self::reference::{check_digest, ImageRef, DOCKER_HUB};
use crate::digest::OciHasher;

/// Media type of an OCI image index (also the referrers list).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker's image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The manifest types [`Registry::get_manifest`] accepts.
const MANIFEST_TYPES: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];
/// distribution refuses manifests larger than this; so do we.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// containerd's host configuration directory (`<dir>/<host>/hosts.toml`).
    pub hosts_dir: PathBuf,
    /// Reach a registry without host configuration over plain HTTP, like
    /// `ctr --plain-http`. `http://` hosts in `hosts.toml` are plain HTTP regardless.
    pub plain_http: bool,
    /// docker's `config.json` with `auths`; `None` for anonymous access only.
    pub docker_config: Option<PathBuf>,
    /// Longest wait for a TCP (and TLS) connection; `dial_timeout` in `hosts.toml`
    /// overrides it per host.
    pub connect_timeout: Duration,
    /// Longest wait for an answer: for the headers of every response, for the whole of
    /// a manifest, a HEAD, a token or a range, and for each read of a longer body
    /// (whole blobs, streams), which may take as long as they keep moving.
    pub request_timeout: Duration,
    /// Most requests in flight to one host (streams hold theirs until dropped).
    pub max_requests_per_host: usize,
}

impl Default for RegistryOptions {
    /// `/etc/containerd/certs.d`, HTTPS, the default docker `config.json`
    /// ([`auth::default_docker_config`]), 10 s to connect, 30 s to answer, 16 requests
    /// per host.
    fn default() -> Self {
        RegistryOptions {
            hosts_dir: PathBuf::from("/etc/containerd/certs.d"),
            plain_http: false,
            docker_config: Some(auth::default_docker_config()),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_requests_per_host: 16,
        }
    }
}

/// A manifest as fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// `sha256:` digest of `bytes`.
    pub digest: String,
    /// The manifest's `mediaType`; when it has none, inferred from its fields (OCI
    /// index if it has `manifests`, else OCI manifest).
    pub media_type: String,
    /// The manifest exactly as served.
    pub bytes: Bytes,
}

/// An OCI content descriptor, as listed by the referrers API.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content (for referrers: a manifest type).
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The artifact type of a referrer (its manifest's `artifactType`, or the media
    /// type of its config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A blob body as it arrives.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, RegistryError>> + Send>>;

/// The registry client. Cheap to clone (an `Arc` inside); `Send + Sync`.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    opts: RegistryOptions,
    creds: DockerConfig,
    /// Registry -> its hosts in order, loaded on first use (restart to reload).
    routes: Mutex<HashMap<String, Arc<[Arc<Endpoint>]>>>,
    /// Host URL and TLS settings -> endpoint, shared by the registries it serves.
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// `host[:port]` -> its bound on requests in flight.
    semaphores: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("opts", &self.inner.opts)
            .field("credentials", &self.inner.creds)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A client with `opts`. Reads docker's `config.json` now (a missing file means
    /// anonymous access); host configuration is read per registry on first use.
    /// Installs rustls' `ring` crypto provider as the process default if none is.
    pub fn new(opts: RegistryOptions) -> Result<Registry, RegistryError> {
        static PROVIDER: Once = Once::new();
        PROVIDER.call_once(|| {
            // Err means another provider was installed first: that one is used.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        if opts.max_requests_per_host == 0 {
            return Err(RegistryError::Config {
                what: "RegistryOptions::max_requests_per_host".to_string(),
                reason: "must be at least 1".to_string(),
            });
        }
        let creds = match &opts.docker_config {
            Some(p) => DockerConfig::load(p)?,
            None => DockerConfig::default(),
        };
        Ok(Registry {
            inner: Arc::new(Inner {
                opts,
                creds,
                routes: Mutex::new(HashMap::new()),
                endpoints: Mutex::new(HashMap::new()),
                semaphores: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.opts
    }

    /// The hosts of `registry` in the order they are tried, as `scheme://host`.
    pub fn host_urls(&self, registry: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self.hosts(registry)?.iter().map(|e| e.cfg.url()).collect())
    }

    /// Fetches the manifest `r` names (by digest if it has one, else by tag). A digest
    /// in `r` is verified; the returned digest is always that of the bytes. By digest
    /// it asks hosts with `pull`, by tag hosts with `resolve`.
    pub async fn get_manifest(&self, r: &ImageRef) -> Result<Fetched, RegistryError> {
        if let Some(d) = &r.digest {
            check_digest(d)?;
        }
        let cap = if r.digest.is_some() {
            Caps::PULL
        } else {
            Caps::RESOLVE
        };
        let object = format!("manifest {}", r.reference());
        self.on_hosts(r, cap, &object, |ep, at| async move {
            let oref = ep.reference(r, r.tag.as_deref(), r.digest.as_deref());
            let ((bytes, _), _slot) = ep
                .call(
                    &oref,
                    RegistryOperation::Pull,
                    &at,
                    Some(ep.request_timeout),
                    || {
                        ep.manifest_client
                            .pull_manifest_raw(&oref, &ep.auth, MANIFEST_TYPES)
                    },
                )
                .await?;
            if bytes.len() > MAX_MANIFEST_BYTES {
                return Err(RegistryError::TooLarge {
                    at,
                    size: bytes.len() as u64,
                    max: MAX_MANIFEST_BYTES as u64,
                });
            }
            let digest = sha256(&bytes);
            if let Some(want) = &r.digest {
                if *want != digest {
                    return Err(RegistryError::DigestMismatch { at, actual: digest });
                }
            }
            let media_type =
                manifest_media_type(&bytes).ok_or_else(|| RegistryError::Protocol {
                    at: at.clone(),
                    reason: "the manifest is not a JSON object".to_string(),
                })?;
            Ok(Fetched {
                digest,
                media_type,
                bytes,
            })
        })
        .await
    }

    /// Fetches the whole blob `digest` of `repo`'s repository, refusing it (before
    /// reading, when the size is announced) if it is larger than `max_bytes`. The
    /// bytes are verified against `digest`.
    pub async fn get_blob(
        &self,
        repo: &ImageRef,
        digest: &str,
        max_bytes: u64,
    ) -> Result<Bytes, RegistryError> {
        check_digest(digest)?;
        let object = format!("blob {digest}");
        self.on_hosts(repo, Caps::PULL, &object, |ep, at| async move {
            let (len, mut stream) = open_blob(&ep, repo, digest, &at).await?;
            if let Some(n) = len.filter(|&n| n > max_bytes) {
                return Err(RegistryError::TooLarge {
                    at,
                    size: n,
                    max: max_bytes,
                });
            }
            let cap = len.unwrap_or(0).min(max_bytes).min(64 << 20);
            let mut buf = BytesMut::with_capacity(cap as usize);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if buf.len() as u64 + chunk.len() as u64 > max_bytes {
                    return Err(RegistryError::TooLarge {
                        at,
                        size: buf.len() as u64 + chunk.len() as u64,
                        max: max_bytes,
                    });
                }
                buf.extend_from_slice(&chunk);
            }
            // The stream ended without a digest error: oci-client verified it.
            Ok(buf.freeze())
        })
        .await
    }

    /// Opens the blob `digest` for streaming: its announced length, if any, and its
    /// body. The stream's last item is an error ([`RegistryError::DigestMismatch`]) if
    /// the bytes do not hash to `digest`; a caller that reads to the end needs no
    /// hashing of its own. The stream holds one of the host's request slots until it
    /// is dropped. Falls back to the next host only before the body starts.
    pub async fn blob_stream(
        &self,
        repo: &ImageRef,
        digest: &str,
    ) -> Result<(Option<u64>, BlobStream), RegistryError> {
        check_digest(digest)?;
        let object = format!("blob {digest}");
        self.on_hosts(repo, Caps::PULL, &object, |ep, at| async move {
            open_blob(&ep, repo, digest, &at).await
        })
        .await
    }

    /// Reads exactly `len` bytes of blob `digest` from `offset` with one Range request.
    /// A server that answers 200 with the whole blob gives
    /// [`RegistryError::RangeIgnored`] (unless the range is the whole blob), fewer bytes
    /// [`RegistryError::Short`]; both are retryable. The bytes are not verified: the
    /// caller checks them against its own digests. The whole exchange is bounded by
    /// [`RegistryOptions::request_timeout`].
    pub async fn get_blob_range(
        &self,
        repo: &ImageRef,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        check_digest(digest)?;
        if offset.checked_add(len).is_none() {
            return Err(RegistryError::InvalidRange { offset, len });
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let object = format!("blob {digest} bytes {offset}+{len}");
        self.on_hosts(repo, Caps::PULL, &object, |ep, at| async move {
            let deadline = ep.request_timeout;
            let work = async {
                let oref = ep.reference(repo, None, Some(digest));
                let (resp, _slot) = ep
                    .call(&oref, RegistryOperation::Pull, &at, None, || {
                        ep.client
                            .pull_blob_stream_partial(&oref, digest, offset, Some(len))
                    })
                    .await?;
                let (whole, sized) = match resp {
                    oci_client::client::BlobResponse::Partial(s) => (false, s),
                    oci_client::client::BlobResponse::Full(s) => (true, s),
                };
                // A 200 is the right answer to a range covering the whole blob.
                if whole && (offset != 0 || sized.content_length.is_some_and(|n| n != len)) {
                    return Err(RegistryError::RangeIgnored { at: at.clone() });
                }
                if let Some(n) = sized.content_length.filter(|&n| n > len) {
                    return Err(RegistryError::Protocol {
                        at: at.clone(),
                        reason: format!("{n} bytes announced for a {len}-byte range"),
                    });
                }
                let mut stream = sized.stream;
                let mut buf = BytesMut::with_capacity(len.min(64 << 20) as usize);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| error::from_io(at.clone(), e))?;
                    if buf.len() as u64 + chunk.len() as u64 > len {
                        if whole {
                            return Err(RegistryError::RangeIgnored { at: at.clone() });
                        }
                        return Err(RegistryError::Protocol {
                            at: at.clone(),
                            reason: format!("more than {len} bytes for a {len}-byte range"),
                        });
                    }
                    buf.extend_from_slice(&chunk);
                }
                if (buf.len() as u64) < len {
                    return Err(RegistryError::Short {
                        at: at.clone(),
                        got: buf.len() as u64,
                        want: len,
                    });
                }
                Ok(buf.freeze())
            };
            match tokio::time::timeout(deadline, work).await {
                Ok(r) => r,
                Err(_) => Err(RegistryError::Timeout {
                    at: at.clone(),
                    after: deadline,
                }),
            }
        })
        .await
    }

    /// Whether some host with `pull` has blob `digest` (a HEAD request per host, in
    /// order, until one says yes). False when every host that answered said 404.
    pub async fn blob_exists(&self, repo: &ImageRef, digest: &str) -> Result<bool, RegistryError> {
        check_digest(digest)?;
        let object = format!("blob {digest}");
        let mut last_err = None;
        let mut answered = false;
        for ep in self.hosts_with(repo, Caps::PULL)?.iter() {
            let at = ep.target(repo, object.clone());
            match head_blob(ep, repo, digest, &at).await {
                Ok(true) => return Ok(true),
                Ok(false) => answered = true,
                Err(e) if e.falls_back() => {
                    tracing::debug!(error = %e, "trying the next host");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match last_err {
            Some(e) if !answered => Err(e),
            _ => Ok(false),
        }
    }

    /// Uploads `data` as blob `digest` to the first host with `push`, unless a HEAD
    /// finds it there. `data` is checked against `digest` first. Returns whether it
    /// uploaded (false: the registry had the blob).
    pub async fn push_blob(
        &self,
        repo: &ImageRef,
        digest: &str,
        data: Bytes,
    ) -> Result<bool, RegistryError> {
        check_digest(digest)?;
        let ep = self.push_host(repo)?;
        let at = ep.target(repo, format!("blob {digest}"));
        let actual = sha256(&data);
        if actual != digest {
            return Err(RegistryError::DigestMismatch { at, actual });
        }
        if head_blob(&ep, repo, digest, &at).await? {
            return Ok(false);
        }
        let oref = ep.reference(repo, None, Some(digest));
        let len = data.len() as u64;
        let (_, _slot) = ep
            .call(
                &oref,
                RegistryOperation::Push,
                &at,
                // As long again for each MiB: bytes pushed whole are small.
                Some(ep.request_timeout + Duration::from_secs(len >> 20)),
                || {
                    let body = tokio_stream::once(Ok::<_, OciDistributionError>(data.clone()));
                    ep.client.push_blob_stream(&oref, body, digest, Some(len))
                },
            )
            .await?;
        Ok(true)
    }

    /// Uploads the file at `path` as blob `digest`, streamed in one PUT, to the first
    /// host with `push`, unless a HEAD finds it there. The registry checks the digest
    /// (a mismatch is [`RegistryError::DigestMismatch`]); the file is not read twice.
    /// Returns whether it uploaded (false: the registry had the blob).
    pub async fn push_blob_file(
        &self,
        repo: &ImageRef,
        digest: &str,
        path: &Path,
    ) -> Result<bool, RegistryError> {
        check_digest(digest)?;
        let ep = self.push_host(repo)?;
        let at = ep.target(repo, format!("blob {digest}"));
        if head_blob(&ep, repo, digest, &at).await? {
            return Ok(false);
        }
        let file_err = |e: std::io::Error| RegistryError::Config {
            what: path.display().to_string(),
            reason: format!("cannot read the blob file: {e}"),
        };
        let len = tokio::fs::metadata(path).await.map_err(file_err)?.len();
        let oref = ep.reference(repo, None, Some(digest));
        let (_, _slot) = ep
            .call(&oref, RegistryOperation::Push, &at, None, || async {
                let file = tokio::fs::File::open(path).await?;
                let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
                    .map(|r| r.map_err(OciDistributionError::from));
                ep.client
                    .push_blob_stream(&oref, body, digest, Some(len))
                    .await
            })
            .await?;
        Ok(true)
    }

    /// Uploads a manifest to the first host with `push`, under `r`'s tag, or its digest
    /// if it has no tag. Returns the digest of `bytes`; a digest in `r` must match it.
    pub async fn push_manifest(
        &self,
        r: &ImageRef,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String, RegistryError> {
        let ep = self.push_host(r)?;
        let digest = sha256(&bytes);
        let at = ep.target(r, format!("manifest {}", r.reference()));
        if let Some(want) = &r.digest {
            check_digest(want)?;
            if *want != digest {
                return Err(RegistryError::DigestMismatch { at, actual: digest });
            }
        }
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                at,
                size: bytes.len() as u64,
                max: MAX_MANIFEST_BYTES as u64,
            });
        }
        let content_type = reqwest::header::HeaderValue::from_str(media_type).map_err(|_| {
            RegistryError::Config {
                what: "media type".to_string(),
                reason: format!("{media_type:?} is not a valid header value"),
            }
        })?;
        let oref = match &r.tag {
            Some(t) => ep.reference(r, Some(t), None),
            None => ep.reference(r, None, Some(&digest)),
        };
        let (_, _slot) = ep
            .call(
                &oref,
                RegistryOperation::Push,
                &at,
                Some(ep.request_timeout),
                || {
                    ep.client
                        .push_manifest_raw(&oref, bytes.clone(), content_type.clone())
                },
            )
            .await?;
        Ok(digest)
    }

    /// The referrers of `subject` (which must have a digest), optionally only those of
    /// `artifact_type`: the OCI 1.1 referrers API, or on its 404 the referrers tag
    /// schema (`sha256-<hex>`, an OCI index). No referrers is an empty list. Asks hosts
    /// with `resolve`: a list cannot be verified by digest.
    pub async fn referrers(
        &self,
        subject: &ImageRef,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let digest = subject_digest(subject)?;
        let object = format!("referrers of {digest}");
        self.on_hosts(subject, Caps::RESOLVE, &object, |ep, at| async move {
            let oref = ep.reference(subject, None, Some(digest));
            let (index, _slot) = ep
                .call(
                    &oref,
                    RegistryOperation::Pull,
                    &at,
                    Some(ep.request_timeout),
                    || ep.client.pull_referrers(&oref, artifact_type),
                )
                .await?;
            Ok(index
                .manifests
                .into_iter()
                // The API may ignore the filter; the fallback never applies it.
                .filter(|m| artifact_type.is_none_or(|t| m.artifact_type.as_deref() == Some(t)))
                .map(|m| Descriptor {
                    media_type: m.media_type,
                    digest: m.digest,
                    size: m.size.max(0) as u64,
                    artifact_type: m.artifact_type,
                    annotations: m.annotations.unwrap_or_default(),
                })
                .collect())
        })
        .await
    }

    /// Lists `d` (a manifest already pushed, whose `subject` is `subject`) among the
    /// referrers of `subject` on the first host with `push`. A registry with the
    /// referrers API does that by itself, so nothing is done there. Otherwise the
    /// referrers tag schema index is read (or started), `d` added unless an entry with
    /// its digest is there, every other entry kept as it was, and the index put back.
    /// Idempotent. Two writers at once can lose one's entry (the specification's
    /// read-modify-write has no lock): publish from one place.
    pub async fn add_referrer(
        &self,
        subject: &ImageRef,
        d: Descriptor,
    ) -> Result<(), RegistryError> {
        let digest = subject_digest(subject)?;
        check_digest(&d.digest)?;
        let ep = self.push_host(subject)?;
        let at = ep.target(subject, format!("referrers of {digest}"));
        if ep.has_referrers_api(subject, digest, &at).await? {
            tracing::debug!(%subject, "the registry keeps referrers itself");
            return Ok(());
        }
        let tag = digest.replacen(':', "-", 1);
        let tag_ref = subject.with_tag(&tag);
        let at = ep.target(subject, format!("referrers tag {tag}"));
        let oref = ep.reference(subject, Some(&tag), None);
        let existing = ep
            .call(
                &oref,
                RegistryOperation::Pull,
                &at,
                Some(ep.request_timeout),
                || {
                    ep.manifest_client
                        .pull_manifest_raw(&oref, &ep.auth, &[OCI_INDEX])
                },
            )
            .await;
        let mut index = match existing {
            Ok(((bytes, _), _)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .filter(|v| v.get("manifests").is_some_and(|m| m.is_array()))
                .ok_or_else(|| RegistryError::Protocol {
                    at: at.clone(),
                    reason: "the tag holds something other than an OCI index: not touching it"
                        .to_string(),
                })?,
            Err(RegistryError::NotFound { .. }) => serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [],
            }),
            Err(e) => return Err(e),
        };
        let manifests = index["manifests"]
            .as_array_mut()
            .expect("checked to be an array");
        if manifests
            .iter()
            .any(|m| m.get("digest").and_then(|v| v.as_str()) == Some(d.digest.as_str()))
        {
            return Ok(());
        }
        manifests.push(serde_json::to_value(&d).expect("a descriptor serializes"));
        let bytes = serde_json::to_vec(&index).expect("a JSON value serializes");
        self.push_manifest(&tag_ref, OCI_INDEX, Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// Runs `f` on each host of `image`'s registry that has `cap`, in order, until one
    /// succeeds or fails in a way the next host cannot help with.
    async fn on_hosts<T, F, Fut>(
        &self,
        image: &ImageRef,
        cap: Caps,
        object: &str,
        mut f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Arc<Endpoint>, Target) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut last = None;
        for ep in self.hosts_with(image, cap)?.iter() {
            let at = ep.target(image, object.to_string());
            match f(ep.clone(), at).await {
                Ok(v) => return Ok(v),
                Err(e) if e.falls_back() => {
                    tracing::debug!(error = %e, "trying the next host");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("hosts_with returns at least one host"))
    }

    /// The hosts of `image`'s registry that have `cap`; at least one.
    fn hosts_with(&self, image: &ImageRef, cap: Caps) -> Result<Vec<Arc<Endpoint>>, RegistryError> {
        let all = self.hosts(&image.registry)?;
        let with: Vec<_> = all
            .iter()
            .filter(|e| e.cfg.caps.has(cap))
            .cloned()
            .collect();
        if with.is_empty() {
            return Err(RegistryError::NoHost {
                registry: image.registry.clone(),
                capability: cap.name(),
            });
        }
        Ok(with)
    }

    /// The first host with `push`.
    fn push_host(&self, image: &ImageRef) -> Result<Arc<Endpoint>, RegistryError> {
        Ok(self.hosts_with(image, Caps::PUSH)?.swap_remove(0))
    }

    /// The hosts of `registry`, built on first use.
    fn hosts(&self, registry: &str) -> Result<Arc<[Arc<Endpoint>]>, RegistryError> {
        if let Some(r) = self.inner.routes.lock().expect("routes lock").get(registry) {
            return Ok(r.clone());
        }
        let opts = &self.inner.opts;
        let configs = hosts::hosts_for(&opts.hosts_dir, registry, opts.plain_http)?;
        let settings = EndpointSettings {
            connect_timeout: opts.connect_timeout,
            request_timeout: opts.request_timeout,
        };
        let mut eps = Vec::with_capacity(configs.len());
        for cfg in configs {
            let key = format!(
                "{}|{}|{:?}|{}|{:?}|{}",
                registry,
                cfg.url(),
                cfg.ca,
                cfg.skip_verify,
                cfg.dial_timeout,
                cfg.mirror
            );
            if let Some(ep) = self
                .inner
                .endpoints
                .lock()
                .expect("endpoints lock")
                .get(&key)
            {
                eps.push(ep.clone());
                continue;
            }
            let sem = self
                .inner
                .semaphores
                .lock()
                .expect("semaphores lock")
                .entry(cfg.host.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(opts.max_requests_per_host)))
                .clone();
            let creds = self.inner.creds.lookup(&cfg.host);
            let file = self
                .inner
                .creds
                .path
                .as_ref()
                .map_or("<none>".to_string(), |p| p.display().to_string());
            let (auth, hint) = match creds {
                Some(c) => (
                    c.to_auth(),
                    format!(" with the credentials for this host in {file}"),
                ),
                None => (
                    oci_client::secrets::RegistryAuth::Anonymous,
                    format!(" anonymously (no credentials for this host in {file})"),
                ),
            };
            tracing::debug!(%registry, host = %cfg.url(), mirror = cfg.mirror, ?auth, "registry host");
            let ep = Arc::new(Endpoint::new(cfg, registry, auth, hint, sem, &settings)?);
            self.inner
                .endpoints
                .lock()
                .expect("endpoints lock")
                .insert(key, ep.clone());
            eps.push(ep);
        }
        let eps: Arc<[Arc<Endpoint>]> = eps.into();
        self.inner
            .routes
            .lock()
            .expect("routes lock")
            .insert(registry.to_string(), eps.clone());
        Ok(eps)
    }
}

/// Opens a verifying blob stream on `ep`.
async fn open_blob(
    ep: &Endpoint,
    repo: &ImageRef,
    digest: &str,
    at: &Target,
) -> Result<(Option<u64>, BlobStream), RegistryError> {
    let oref = ep.reference(repo, None, Some(digest));
    let (sized, slot) = ep
        .call(
            &oref,
            RegistryOperation::Pull,
            at,
            Some(ep.request_timeout),
            || ep.client.pull_blob_stream(&oref, digest),
        )
        .await?;
    let len = sized.content_length;
    let at = at.clone();
    let stream = sized.stream.map(move |item| {
        // The stream owns the request slot until it is dropped.
        let _slot = &slot;
        item.map_err(|e| error::from_io(at.clone(), e))
    });
    Ok((len, Box::pin(stream)))
}

/// HEAD of a blob on one host.
async fn head_blob(
    ep: &Endpoint,
    repo: &ImageRef,
    digest: &str,
    at: &Target,
) -> Result<bool, RegistryError> {
    let oref = ep.reference(repo, None, Some(digest));
    let (exists, _slot) = ep
        .call(
            &oref,
            RegistryOperation::Pull,
            at,
            Some(ep.request_timeout),
            || ep.client.blob_exists(&oref, digest),
        )
        .await?;
    Ok(exists)
}

fn subject_digest(subject: &ImageRef) -> Result<&str, RegistryError> {
    let d = subject
        .digest
        .as_deref()
        .ok_or_else(|| RegistryError::InvalidReference {
            input: subject.to_string(),
            rule: "referrers are listed for a digest: the subject needs one",
        })?;
    check_digest(d)?;
    Ok(d)
}

/// `sha256:<hex>` of `data`.
fn sha256(data: &[u8]) -> String {
    let mut h = OciHasher::new();
    h.update(data);
    h.finish()
}

/// The `mediaType` of a manifest, or the type its fields imply.
fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object()?;
    Some(match obj.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => m.to_string(),
        None if obj.contains_key("manifests") => OCI_INDEX.to_string(),
        None => OCI_MANIFEST.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn registry_is_send_sync_and_futures_are_send() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Registry>();
        let reg = Registry::new(RegistryOptions {
            docker_config: None,
            ..RegistryOptions::default()
        })
        .unwrap();
        let r = ImageRef::parse("127.0.0.1:1/a").unwrap();
        let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        // Built, never polled: only their types are checked.
        assert_send(&reg.get_manifest(&r));
        assert_send(&reg.get_blob(&r, d, 1));
        assert_send(&reg.blob_stream(&r, d));
        assert_send(&reg.get_blob_range(&r, d, 0, 1));
        assert_send(&reg.blob_exists(&r, d));
        assert_send(&reg.push_blob(&r, d, Bytes::new()));
        assert_send(&reg.push_blob_file(&r, d, Path::new("/x")));
        assert_send(&reg.push_manifest(&r, OCI_MANIFEST, Bytes::new()));
        assert_send(&reg.referrers(&r, None));
        let desc = Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d.into(),
            size: 1,
            artifact_type: None,
            annotations: BTreeMap::new(),
        };
        assert_send(&reg.add_referrer(&r, desc));
    }

    #[test]
    fn debug_never_shows_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            r#"{"auths": {"127.0.0.1:5000": {"username": "alice", "password": "s3cret-pass"},
                          "h2": {"auth": "Ym9iOnBhc3N3b3JkLXR3bw=="}}}"#,
        )
        .unwrap();
        let reg = Registry::new(RegistryOptions {
            hosts_dir: dir.path().join("certs.d"),
            plain_http: true,
            docker_config: Some(config),
            ..RegistryOptions::default()
        })
        .unwrap();
        // Build the endpoints too, which hold oci-client's form of the credentials.
        let hosts = reg.hosts("127.0.0.1:5000").unwrap();
        let dbg = format!("{reg:?} {:?} {:?}", hosts, reg.inner.creds.lookup("h2"));
        assert!(dbg.contains("alice") && dbg.contains("bob"), "{dbg}");
        for secret in ["s3cret-pass", "password-two", "Ym9iOnBhc3N3b3JkLXR3bw"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
    }

    #[test]
    fn media_type_of_manifests() {
        assert_eq!(
            manifest_media_type(br#"{"mediaType":"x/y","schemaVersion":2}"#).as_deref(),
            Some("x/y")
        );
        assert_eq!(
            manifest_media_type(br#"{"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            manifest_media_type(br#"{"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(manifest_media_type(b"[]"), None);
    }

    #[tokio::test]
    async fn refuses_bad_arguments_before_any_request() {
        let reg = Registry::new(RegistryOptions {
            docker_config: None,
            ..RegistryOptions::default()
        })
        .unwrap();
        let r = ImageRef::parse("127.0.0.1:1/a").unwrap();
        assert!(matches!(
            reg.get_blob(&r, "sha256:abc", 1).await,
            Err(RegistryError::InvalidDigest { .. })
        ));
        let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        assert!(matches!(
            reg.get_blob_range(&r, d, u64::MAX, 2).await,
            Err(RegistryError::InvalidRange { .. })
        ));
        assert_eq!(reg.get_blob_range(&r, d, 5, 0).await.unwrap(), Bytes::new());
        assert!(matches!(
            reg.referrers(&r, None).await,
            Err(RegistryError::InvalidReference { .. })
        ));
        // Data that does not hash to the digest is refused before any request.
        assert!(matches!(
            reg.push_blob(&r, d, Bytes::from_static(b"x")).await,
            Err(RegistryError::DigestMismatch { .. })
        ));
        assert!(Registry::new(RegistryOptions {
            max_requests_per_host: 0,
            docker_config: None,
            ..RegistryOptions::default()
        })
        .is_err());
    }
}
