//! `dedupd pull REF`: an image pull for containerd that lets the `dedup` snapshotter
//! mount layers lazily, which `ctr image pull` cannot (containerd 1.6's `ctr` downloads
//! every blob before it unpacks).
//!
//! Everything goes through containerd's own API, so its metadata stays what a `ctr`
//! pull would leave: under an expiring lease, the index (if the reference names one),
//! the manifest and the config are written to the content store with the GC labels
//! `ctr` sets; each layer is prepared through containerd's snapshots service with the
//! chain id and the CRI labels, which is where the snapshotter answers `ALREADY_EXISTS`
//! for a layer it mounts from the image's published artifact; then the image record is
//! created (or repointed) and the lease deleted. A layer the snapshotter prepares
//! instead (no artifact, lazy pull off) is pulled in full, as `ctr` does: its blob goes
//! to the content store, containerd's diff service applies it into the prepared
//! mounts, and the snapshot is committed under its chain id (the snapshotter converts
//! it then).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tokio_stream::StreamExt;
use tonic::Code;

use super::{Client, CtrError, DEFAULT_ADDRESS, DEFAULT_NAMESPACE};
use crate::proto::types;
use crate::registry::{
    Descriptor, ImageRef, Registry, RegistryError, RegistryOptions, DOCKER_MANIFEST_LIST, OCI_INDEX,
};
use crate::remote::image::{chain_ids, resolve, ImageError, Resolved};
use crate::snapshotter::{
    LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST, LABEL_SNAPSHOT_REF,
};

/// The CRI label listing the image's layer digests from this layer on (comma-separated,
/// cut to fit containerd's label size), as containerd's `AppendInfoHandlerWrapper`
/// sets it.
pub const LABEL_CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// containerd's bound on a label: key and value together.
const MAX_LABEL_BYTES: usize = 4096;
/// How long the pull's lease lives if `dedupd pull` dies before deleting it
/// (containerd's client uses the same).
const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Bytes per content-store write request.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// Prepares of a layer that answer `ALREADY_EXISTS` while its snapshot cannot be found
/// (a concurrent removal), before giving up; containerd's unpacker tries three times.
const PREPARE_TRIES: u32 = 3;
/// Least time between two redraws of the progress line.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// `dedupd pull`'s command line.
#[derive(Clone, Debug, clap::Args)]
pub struct PullArgs {
    /// The image (e.g. `docker.io/library/busybox:latest`); containerd's image record
    /// gets this name, as with `ctr image pull`.
    pub reference: String,
    /// containerd's socket.
    #[arg(short = 'a', long, env = "CONTAINERD_ADDRESS", default_value = DEFAULT_ADDRESS)]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(short = 'n', long, env = "CONTAINERD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The snapshotter: dedupd's proxy plugin, as named in containerd's config.
    #[arg(long, default_value = "dedup")]
    pub snapshotter: String,
    /// Reach a registry that has no `hosts.toml` over plain HTTP.
    #[arg(long)]
    pub plain_http: bool,
    /// containerd's host configuration directory (`<dir>/<host>/hosts.toml`).
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    pub hosts_dir: PathBuf,
}

/// Where and how to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// Snapshotter name.
    pub snapshotter: String,
    /// How the registry is reached.
    pub registry: RegistryOptions,
}

impl PullArgs {
    /// The options these arguments give.
    pub fn options(&self) -> PullOptions {
        PullOptions {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
            snapshotter: self.snapshotter.clone(),
            registry: RegistryOptions {
                hosts_dir: self.hosts_dir.clone(),
                plain_http: self.plain_http,
                ..RegistryOptions::default()
            },
        }
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("image reference {reference:?}")]
    Reference {
        /// As given.
        reference: String,
        /// The rule it broke.
        #[source]
        source: RegistryError,
    },
    /// The registry client could not be set up.
    #[error("registry client")]
    Registry(#[source] RegistryError),
    /// The reference's manifest could not be fetched.
    #[error("resolving {reference}")]
    Resolve {
        /// As given.
        reference: String,
        /// The registry's error.
        #[source]
        source: RegistryError,
    },
    /// The image could not be resolved (names the image).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A containerd call for the image (not for one layer) failed.
    #[error("pulling {image}: {step}")]
    Containerd {
        /// The image.
        image: String,
        /// What was being done.
        step: String,
        /// containerd's error.
        #[source]
        source: CtrError,
    },
    /// One layer failed.
    #[error("pulling {image}: layer {index}/{count} {digest}")]
    Layer {
        /// The image.
        image: String,
        /// 1-based.
        index: usize,
        /// Layers in the image.
        count: usize,
        /// The layer's digest.
        digest: String,
        /// What failed.
        #[source]
        source: LayerError,
    },
}

/// Why a layer failed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// containerd failed.
    #[error("{step}")]
    Containerd {
        /// What was being done.
        step: &'static str,
        /// containerd's error.
        #[source]
        source: CtrError,
    },
    /// The registry failed while downloading the blob (fallback pull).
    #[error("downloading the blob")]
    Download(#[source] RegistryError),
    /// The registry sent more than the manifest says the blob holds.
    #[error("the registry sent more than the {size} bytes the manifest gives")]
    TooLong {
        /// The manifest's size.
        size: u64,
    },
    /// The applied layer is not the one the image config names.
    #[error("applied, the layer has diff_id {got}; the image config says {want}")]
    DiffId {
        /// What containerd computed.
        got: String,
        /// The config's diff_id.
        want: String,
    },
    /// The snapshotter said the layer exists, but it cannot be found.
    #[error(
        "the snapshotter answered ALREADY_EXISTS {tries} times, but no snapshot {chain_id} exists"
    )]
    Vanished {
        /// The layer's chain id.
        chain_id: String,
        /// Prepares tried.
        tries: u32,
    },
}

fn ctr_step(step: &'static str) -> impl FnOnce(CtrError) -> LayerError {
    move |source| LayerError::Containerd { step, source }
}

/// How a layer got into the snapshotter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerHow {
    /// The namespace already had its snapshot.
    Present,
    /// The snapshotter answered `ALREADY_EXISTS` to the Prepare: mounted from its
    /// published artifact (or already pulled in another namespace); nothing downloaded.
    Lazy,
    /// Pulled in full: `downloaded_bytes` fetched (0 if the content store had the
    /// blob), applied by containerd's diff service, committed.
    Unpacked {
        /// Bytes fetched from the registry.
        downloaded_bytes: u64,
    },
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct PullReport {
    /// The reference as given (the image record's name).
    pub reference: String,
    /// The image record's target (index or manifest).
    pub target_digest: String,
    /// Each layer (base first) and how it came.
    pub layers: Vec<(Descriptor, LayerHow)>,
    /// Wall time.
    pub elapsed: Duration,
}

impl PullReport {
    /// Layers that came each way: (present, lazy, unpacked, bytes downloaded).
    pub fn counts(&self) -> (usize, usize, usize, u64) {
        let mut c = (0, 0, 0, 0);
        for (_, how) in &self.layers {
            match how {
                LayerHow::Present => c.0 += 1,
                LayerHow::Lazy => c.1 += 1,
                LayerHow::Unpacked { downloaded_bytes } => {
                    c.2 += 1;
                    c.3 += downloaded_bytes;
                }
            }
        }
        c
    }
}

/// `dedupd pull`: pulls, printing progress lines on a terminal, one summary line
/// otherwise.
pub fn pull_cmd(args: &PullArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut progress = Progress::new(std::io::stdout().is_terminal());
    match rt.block_on(pull(&args.options(), &args.reference, &mut progress)) {
        Ok(report) => {
            progress.finished(&report);
            Ok(())
        }
        Err(e) => {
            progress.abandon();
            Err(e.into())
        }
    }
}

/// Pulls `reference` into containerd (see the module docs).
pub async fn pull(
    opts: &PullOptions,
    reference: &str,
    progress: &mut Progress,
) -> Result<PullReport, PullError> {
    let started = Instant::now();
    let image = ImageRef::parse(reference).map_err(|source| PullError::Reference {
        reference: reference.to_string(),
        source,
    })?;
    // containerd first: a missing socket fails before any download.
    let containerd = |step: &str| {
        let step = step.to_string();
        move |source| PullError::Containerd {
            image: reference.to_string(),
            step,
            source,
        }
    };
    let client = Client::connect(&opts.address, &opts.namespace)
        .await
        .map_err(containerd("connecting to containerd"))?;
    let registry = Registry::new(opts.registry.clone()).map_err(PullError::Registry)?;
    // What the reference names first: an index is written too, as the image's target.
    let top = registry
        .get_manifest(&image)
        .await
        .map_err(|source| PullError::Resolve {
            reference: reference.to_string(),
            source,
        })?;
    let index =
        (top.media_type == OCI_INDEX || top.media_type == DOCKER_MANIFEST_LIST).then(|| {
            let desc = Descriptor {
                media_type: top.media_type.clone(),
                digest: top.digest.clone(),
                size: top.bytes.len() as u64,
                artifact_type: None,
                annotations: BTreeMap::new(),
            };
            (desc, top.bytes.clone())
        });
    // Resolved by the digest just fetched: the manifest is the one this index (or tag)
    // names, even if the tag moves meanwhile.
    let resolved = resolve(&registry, &image.with_digest(&top.digest)).await?;
    progress.resolved(reference, &resolved);
    let lease = format!("dedupd-pull-{}", unique_part());
    client
        .create_lease(&lease, SystemTime::now() + LEASE_TTL)
        .await
        .map_err(containerd("creating a lease"))?;
    let leased = client
        .with_lease(&lease)
        .map_err(containerd("using the lease"))?;
    let job = Job {
        client: &leased,
        registry: &registry,
        opts,
        reference,
        image: &image,
        resolved: &resolved,
        index: index.as_ref(),
        lease: &lease,
    };
    let result = job.run(progress).await;
    // Either way the lease goes: after a pull the image record holds what it needs,
    // after a failure GC frees what the pull made.
    let deleted = client.delete_lease(&lease).await;
    let layers = result?;
    deleted.map_err(containerd("deleting the lease"))?;
    Ok(PullReport {
        reference: reference.to_string(),
        target_digest: job.target().digest,
        layers,
        elapsed: started.elapsed(),
    })
}

/// One pull, under its lease.
struct Job<'a> {
    client: &'a Client,
    registry: &'a Registry,
    opts: &'a PullOptions,
    reference: &'a str,
    image: &'a ImageRef,
    resolved: &'a Resolved,
    /// The index the reference names, if it names one.
    index: Option<&'a (Descriptor, bytes::Bytes)>,
    lease: &'a str,
}

impl Job<'_> {
    /// The image record's target: the index if the reference named one.
    fn target(&self) -> types::Descriptor {
        match self.index {
            Some((d, _)) => descriptor(d),
            None => descriptor(&self.resolved.manifest_desc),
        }
    }

    fn source_label(&self) -> (String, String) {
        (
            format!("containerd.io/distribution.source.{}", self.image.registry),
            self.image.repository.clone(),
        )
    }

    fn err(&self, step: &str) -> impl FnOnce(CtrError) -> PullError + '_ {
        let step = step.to_string();
        move |source| PullError::Containerd {
            image: self.reference.to_string(),
            step,
            source,
        }
    }

    async fn run(&self, progress: &mut Progress) -> Result<Vec<(Descriptor, LayerHow)>, PullError> {
        let r = self.resolved;
        let m = &r.manifest;
        let chain = chain_ids(&r.diff_ids);
        // The blobs with the labels `ctr image pull` gives them: what each refers to
        // (so GC keeps it) and where it came from.
        let mut labels = BTreeMap::new();
        self.put_blob(&m.config, &r.config_bytes, labels.clone())
            .await
            .map_err(self.err("writing the config"))?;
        labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            m.config.digest.clone(),
        );
        for (i, l) in m.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        self.put_blob(&r.manifest_desc, &r.manifest_bytes, labels)
            .await
            .map_err(self.err("writing the manifest"))?;
        if let Some((desc, bytes)) = self.index {
            let mut labels = BTreeMap::new();
            labels.insert(
                "containerd.io/gc.ref.content.m.0".to_string(),
                r.manifest_desc.digest.clone(),
            );
            self.put_blob(desc, bytes, labels)
                .await
                .map_err(self.err("writing the index"))?;
        }
        let mut done = Vec::with_capacity(m.layers.len());
        for (i, layer) in m.layers.iter().enumerate() {
            progress.layer_started(i, m.layers.len(), layer);
            let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
            let how = self
                .layer(i, layer, &chain[i], parent, progress)
                .await
                .map_err(|source| PullError::Layer {
                    image: self.reference.to_string(),
                    index: i + 1,
                    count: m.layers.len(),
                    digest: layer.digest.clone(),
                    source,
                })?;
            progress.layer_done(i, m.layers.len(), layer, &how);
            done.push((layer.clone(), how));
        }
        if let Some(top) = chain.last() {
            let mut l = BTreeMap::new();
            l.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.opts.snapshotter),
                top.clone(),
            );
            self.client
                .content_set_labels(&m.config.digest, &l)
                .await
                .map_err(self.err("labelling the config with its snapshot"))?;
        }
        self.client
            .put_image(self.reference, self.target())
            .await
            .map_err(self.err("creating the image record"))?;
        Ok(done)
    }

    /// Writes a small blob (index, manifest, config) with `labels` plus the source
    /// label; a blob the store has gets the labels set.
    async fn put_blob(
        &self,
        desc: &Descriptor,
        bytes: &[u8],
        mut labels: BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        let (k, v) = self.source_label();
        labels.insert(k, v);
        let ref_ = format!("{}-{}", self.lease, desc.digest);
        let c = self.client;
        if let Some(mut w) = c.content_writer(&ref_, &desc.digest, desc.size).await? {
            let written = async {
                w.write(bytes.to_vec()).await?;
                w.commit(&labels).await
            }
            .await;
            match written {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    c.content_abort(&ref_).await;
                    return Err(e);
                }
            }
        }
        self.label_existing(&desc.digest, labels).await
    }

    /// Sets `labels` on a blob the store already had, adding this repository to its
    /// source label rather than replacing the ones there.
    async fn label_existing(
        &self,
        digest: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        let (k, repo) = self.source_label();
        if let Some(info) = self.client.content_info(digest).await? {
            if let Some(old) = info.labels.get(&k) {
                let merged = if old.split(',').any(|r| r == repo) {
                    old.clone()
                } else {
                    format!("{old},{repo}")
                };
                labels.insert(k, merged);
            }
        }
        self.client.content_set_labels(digest, &labels).await
    }

    /// Gets layer `i` (chain id `chain_id` over `parent`) into the snapshotter.
    async fn layer(
        &self,
        i: usize,
        layer: &Descriptor,
        chain_id: &str,
        parent: &str,
        progress: &mut Progress,
    ) -> Result<LayerHow, LayerError> {
        let sn = &self.opts.snapshotter;
        let c = self.client;
        if c.stat_snapshot(sn, chain_id)
            .await
            .map_err(ctr_step("looking up its snapshot"))?
            .is_some()
        {
            return Ok(LayerHow::Present);
        }
        let labels = self.prepare_labels(i, chain_id);
        for _ in 0..PREPARE_TRIES {
            let key = format!("extract-{} {chain_id}", unique_part());
            match c.prepare_snapshot(sn, &key, parent, &labels).await {
                Ok(mounts) => {
                    let r = self
                        .unpack(i, layer, &key, chain_id, mounts, &labels, progress)
                        .await;
                    if r.is_err() {
                        // The prepared snapshot goes, as containerd's unpacker does it.
                        let _ = c.remove_snapshot(sn, &key).await;
                    }
                    return r;
                }
                Err(e) if e.code() == Some(Code::AlreadyExists) => {
                    if c.stat_snapshot(sn, chain_id)
                        .await
                        .map_err(ctr_step("looking up its snapshot"))?
                        .is_some()
                    {
                        return Ok(LayerHow::Lazy);
                    }
                }
                Err(e) => return Err(ctr_step("preparing its snapshot")(e)),
            }
        }
        Err(LayerError::Vanished {
            chain_id: chain_id.to_string(),
            tries: PREPARE_TRIES,
        })
    }

    /// The labels of layer `i`'s Prepare (and Commit): its chain id, and the image,
    /// manifest and layer digests the snapshotter needs to find its artifact.
    fn prepare_labels(&self, i: usize, chain_id: &str) -> BTreeMap<String, String> {
        let r = self.resolved;
        let mut l = BTreeMap::new();
        l.insert(LABEL_SNAPSHOT_REF.to_string(), chain_id.to_string());
        l.insert(LABEL_CRI_IMAGE_REF.to_string(), self.reference.to_string());
        l.insert(
            LABEL_CRI_MANIFEST_DIGEST.to_string(),
            r.manifest_desc.digest.clone(),
        );
        l.insert(
            LABEL_CRI_LAYER_DIGEST.to_string(),
            r.manifest.layers[i].digest.clone(),
        );
        l.insert(
            LABEL_CRI_IMAGE_LAYERS.to_string(),
            image_layers(&r.manifest.layers[i..]),
        );
        l
    }

    /// The full pull of a layer the snapshotter prepared: blob into the content store,
    /// applied into `mounts`, committed as `chain_id`.
    #[allow(clippy::too_many_arguments)]
    async fn unpack(
        &self,
        i: usize,
        layer: &Descriptor,
        key: &str,
        chain_id: &str,
        mounts: Vec<types::Mount>,
        labels: &BTreeMap<String, String>,
        progress: &mut Progress,
    ) -> Result<LayerHow, LayerError> {
        let sn = &self.opts.snapshotter;
        let c = self.client;
        let downloaded_bytes = self.download(i, layer, progress).await?;
        progress.layer_applying(i, self.resolved.manifest.layers.len(), layer);
        let applied = c
            .apply_layer(descriptor(layer), mounts)
            .await
            .map_err(ctr_step("applying it"))?;
        let want = &self.resolved.diff_ids[i];
        if &applied.digest != want {
            return Err(LayerError::DiffId {
                got: applied.digest,
                want: want.clone(),
            });
        }
        match c.commit_snapshot(sn, chain_id, key, labels).await {
            Ok(()) => {}
            // Another pull committed the layer first: theirs serves.
            Err(e) if e.code() == Some(Code::AlreadyExists) => {
                let _ = c.remove_snapshot(sn, key).await;
                return Ok(LayerHow::Present);
            }
            Err(e) => return Err(ctr_step("committing its snapshot")(e)),
        }
        let mut l = BTreeMap::new();
        l.insert("containerd.io/uncompressed".to_string(), want.clone());
        c.content_set_labels(&layer.digest, &l)
            .await
            .map_err(ctr_step("labelling the blob"))?;
        Ok(LayerHow::Unpacked { downloaded_bytes })
    }

    /// Streams layer blob `layer` from the registry into the content store (unless it
    /// is there); returns the bytes fetched.
    async fn download(
        &self,
        i: usize,
        layer: &Descriptor,
        progress: &mut Progress,
    ) -> Result<u64, LayerError> {
        let c = self.client;
        let ref_ = format!("{}-{}", self.lease, layer.digest);
        let (k, v) = self.source_label();
        let mut labels = BTreeMap::new();
        labels.insert(k, v);
        let Some(mut w) = c
            .content_writer(&ref_, &layer.digest, layer.size)
            .await
            .map_err(ctr_step("opening a content writer"))?
        else {
            self.label_existing(&layer.digest, labels)
                .await
                .map_err(ctr_step("labelling the blob"))?;
            return Ok(0);
        };
        let n = self.resolved.manifest.layers.len();
        let written = async {
            let (_, mut body) = self
                .registry
                .blob_stream(self.image, &layer.digest)
                .await
                .map_err(LayerError::Download)?;
            let mut buf = Vec::with_capacity(WRITE_CHUNK_BYTES);
            let mut fetched = 0u64;
            // The stream ends with an error if the bytes do not hash to the digest;
            // containerd checks size and digest again at the commit.
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(LayerError::Download)?;
                fetched += piece.len() as u64;
                if fetched > layer.size {
                    return Err(LayerError::TooLong { size: layer.size });
                }
                buf.extend_from_slice(&piece);
                if buf.len() >= WRITE_CHUNK_BYTES {
                    w.write(std::mem::replace(
                        &mut buf,
                        Vec::with_capacity(WRITE_CHUNK_BYTES),
                    ))
                    .await
                    .map_err(ctr_step("writing the blob"))?;
                    progress.layer_bytes(i, n, layer, w.offset());
                }
            }
            if !buf.is_empty() {
                w.write(buf).await.map_err(ctr_step("writing the blob"))?;
            }
            let new = w
                .commit(&labels)
                .await
                .map_err(ctr_step("committing the blob"))?;
            Ok((fetched, new))
        }
        .await;
        match written {
            Ok((fetched, true)) => Ok(fetched),
            Ok((fetched, false)) => {
                self.label_existing(&layer.digest, labels)
                    .await
                    .map_err(ctr_step("labelling the blob"))?;
                Ok(fetched)
            }
            Err(e) => {
                c.content_abort(&ref_).await;
                Err(e)
            }
        }
    }
}

/// The comma-separated digests of `layers`, as many as fit one label (containerd's
/// `getLayers`).
fn image_layers(layers: &[Descriptor]) -> String {
    let mut out = String::new();
    for l in layers {
        let sep = usize::from(!out.is_empty());
        if LABEL_CRI_IMAGE_LAYERS.len() + out.len() + sep + l.digest.len() > MAX_LABEL_BYTES {
            break;
        }
        if sep == 1 {
            out.push(',');
        }
        out.push_str(&l.digest);
    }
    out
}

fn descriptor(d: &Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: Default::default(),
    }
}

/// A name part unique to this moment and process: nanoseconds and random bytes, as
/// containerd's unpacker makes its keys.
fn unique_part() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut b = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if random.is_err() {
        b = std::process::id().to_le_bytes();
    }
    format!("{nanos}-{}", hex::encode(b))
}

/// `sha256:` and the first 12 hex digits.
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(0, |i| i + 1) + 12;
    &digest[..end.min(digest.len())]
}

/// Bytes as `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Progress output: a line per layer (and a live byte count while one downloads) on a
/// terminal; only the summary line otherwise.
pub struct Progress {
    tty: bool,
    last_draw: Option<Instant>,
    /// A live line is on the terminal, without its newline.
    open_line: bool,
}

impl Progress {
    /// Lines per layer if `tty`, else a summary only.
    pub fn new(tty: bool) -> Progress {
        Progress {
            tty,
            last_draw: None,
            open_line: false,
        }
    }

    /// Ends a live line left open by a failed pull (the error follows on its own line).
    pub fn abandon(&mut self) {
        if self.open_line {
            println!();
            self.open_line = false;
        }
    }

    fn line(&mut self, text: &str, partial: bool) {
        if !self.tty {
            return;
        }
        self.open_line = partial;
        let mut out = std::io::stdout().lock();
        // Carriage return and erase-line redraw the live line in place.
        let _ = write!(out, "\r{text}\x1b[K");
        if !partial {
            let _ = writeln!(out);
        }
        let _ = out.flush();
    }

    fn resolved(&mut self, reference: &str, r: &Resolved) {
        let total: u64 = r.manifest.layers.iter().map(|l| l.size).sum();
        let text = format!(
            "{reference}: manifest {}, {} layers, {}",
            short(&r.manifest_desc.digest),
            r.manifest.layers.len(),
            human_bytes(total)
        );
        self.line(&text, false);
    }

    fn prefix(i: usize, n: usize, layer: &Descriptor) -> String {
        format!(
            "  layer {}/{n} {} {:>10}",
            i + 1,
            short(&layer.digest),
            human_bytes(layer.size)
        )
    }

    fn layer_started(&mut self, i: usize, n: usize, layer: &Descriptor) {
        let text = format!("{}  preparing", Self::prefix(i, n, layer));
        self.line(&text, true);
        self.last_draw = Some(Instant::now());
    }

    fn layer_bytes(&mut self, i: usize, n: usize, layer: &Descriptor, done: u64) {
        if self.last_draw.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return;
        }
        let text = format!(
            "{}  downloading {} / {}",
            Self::prefix(i, n, layer),
            human_bytes(done),
            human_bytes(layer.size)
        );
        self.line(&text, true);
        self.last_draw = Some(Instant::now());
    }

    fn layer_applying(&mut self, i: usize, n: usize, layer: &Descriptor) {
        let text = format!("{}  applying", Self::prefix(i, n, layer));
        self.line(&text, true);
    }

    fn layer_done(&mut self, i: usize, n: usize, layer: &Descriptor, how: &LayerHow) {
        let what = match how {
            LayerHow::Present => "present".to_string(),
            LayerHow::Lazy => {
                "lazy (the snapshotter answered ALREADY_EXISTS): nothing downloaded".to_string()
            }
            LayerHow::Unpacked {
                downloaded_bytes: 0,
            } => "blob already stored; applied".to_string(),
            LayerHow::Unpacked { downloaded_bytes } => {
                format!("downloaded {}, applied", human_bytes(*downloaded_bytes))
            }
        };
        let text = format!("{}  {what}", Self::prefix(i, n, layer));
        self.line(&text, false);
    }

    /// The closing line (on stdout, terminal or not).
    pub fn finished(&mut self, r: &PullReport) {
        let (present, lazy, unpacked, bytes) = r.counts();
        println!(
            "pulled {} ({}): {} layers: {lazy} lazy, {unpacked} downloaded ({}), {present} present; {:.1} s",
            r.reference,
            short(&r.target_digest),
            r.layers.len(),
            human_bytes(bytes),
            r.elapsed.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(hex: char) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: format!("sha256:{}", hex.to_string().repeat(64)),
            size: 1,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn image_layers_lists_digests_within_the_label_bound() {
        let few = [layer('a'), layer('b')];
        assert_eq!(
            image_layers(&few),
            format!("{},{}", few[0].digest, few[1].digest)
        );
        // 71 bytes a digest plus a comma: a label holds 56 of them, not 100.
        let many: Vec<Descriptor> = (0..100).map(|_| layer('c')).collect();
        let v = image_layers(&many);
        assert!(LABEL_CRI_IMAGE_LAYERS.len() + v.len() <= MAX_LABEL_BYTES);
        assert_eq!(v.split(',').count(), 56);
    }

    #[test]
    fn sizes_and_digests_print_short() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(short(&layer('d').digest), "sha256:dddddddddddd");
    }
}
