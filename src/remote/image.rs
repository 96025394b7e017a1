//! OCI (and Docker schema 2) image manifests, indexes and configs: the parts dedupd
//! reads to publish an image or pull it lazily (layers, diff_ids, chain ids).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::OciHasher;
use crate::registry::{
    Descriptor, ImageRef, Registry, RegistryError, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
    OCI_INDEX, OCI_MANIFEST,
};

/// Largest image config accepted.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The registry failed (boxed: a registry error is large, and rare).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// A manifest, index or config breaks its format, or no manifest fits this platform.
    #[error("image {image}: {why}")]
    Format {
        /// The image reference.
        image: String,
        /// What is wrong.
        why: String,
    },
}

impl From<RegistryError> for ImageError {
    fn from(e: RegistryError) -> Self {
        ImageError::Registry(Box::new(e))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Json {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(flatten)]
    desc: Descriptor,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Platform {
    /// `os/architecture[/variant]`, as `ctr --platform` writes it.
    fn name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// Most platform manifests of an index that [`resolve_platforms`] reads.
pub const MAX_PLATFORMS: usize = 64;

/// An image manifest: its config and layers.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
}

/// An image as a puller needs it: where its manifest is and what it holds.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The repository, with the manifest's digest.
    pub image: ImageRef,
    /// The manifest's descriptor (media type, digest, size).
    pub manifest_desc: Descriptor,
    /// The manifest's bytes.
    pub manifest_bytes: bytes::Bytes,
    /// The manifest.
    pub manifest: Manifest,
    /// The config's bytes.
    pub config_bytes: bytes::Bytes,
    /// The config's diff_ids, one per layer.
    pub diff_ids: Vec<String>,
    /// `os/arch[/variant]` as the index names it; `None` for a manifest named directly.
    pub platform: Option<String>,
}

/// The `GOARCH` name of this machine's architecture.
pub fn this_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn format_err(image: &ImageRef, why: impl Into<String>) -> ImageError {
    ImageError::Format {
        image: image.to_string(),
        why: why.into(),
    }
}

/// Parses an image manifest.
pub fn parse_manifest(image: &ImageRef, bytes: &[u8]) -> Result<Manifest, ImageError> {
    let j: Json =
        serde_json::from_slice(bytes).map_err(|e| format_err(image, format!("manifest: {e}")))?;
    match (j.config, j.layers) {
        (Some(config), Some(layers)) => Ok(Manifest { config, layers }),
        _ => Err(format_err(image, "manifest without config or layers")),
    }
}

/// Parses an image config: its diff_ids.
pub fn parse_diff_ids(image: &ImageRef, bytes: &[u8]) -> Result<Vec<String>, ImageError> {
    #[derive(Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let c: Config =
        serde_json::from_slice(bytes).map_err(|e| format_err(image, format!("config: {e}")))?;
    Ok(c.rootfs.diff_ids)
}

/// Resolves `image` (tag or digest) to the manifest for this platform, with its
/// config. An index picks `linux` and this machine's architecture.
pub async fn resolve(registry: &Registry, image: &ImageRef) -> Result<Resolved, ImageError> {
    let fetched = registry.get_manifest(image).await?;
    let media = media_type_of(&fetched.media_type, &fetched.bytes);
    if media != OCI_INDEX && media != DOCKER_MANIFEST_LIST {
        return resolve_manifest(registry, image, fetched, None).await;
    }
    let arch = this_arch();
    let pick = index_entries(image, &fetched.bytes)?
        .into_iter()
        .find(|(_, p)| p.os == "linux" && p.architecture == arch)
        .ok_or_else(|| format_err(image, format!("no manifest for linux/{arch}")))?;
    let m = registry
        .get_manifest(&image.with_digest(&pick.0.digest))
        .await?;
    resolve_manifest(registry, image, m, Some(pick.1.name())).await
}

/// Resolves `image` to every `linux` manifest it names: the manifest itself, or each
/// entry of an index whose platform is `linux` (in index order; entries of other
/// operating systems, such as the `unknown/unknown` attestation manifests of buildx,
/// are left out). At most [`MAX_PLATFORMS`].
pub async fn resolve_platforms(
    registry: &Registry,
    image: &ImageRef,
) -> Result<Vec<Resolved>, ImageError> {
    let fetched = registry.get_manifest(image).await?;
    let media = media_type_of(&fetched.media_type, &fetched.bytes);
    if media != OCI_INDEX && media != DOCKER_MANIFEST_LIST {
        return Ok(vec![
            resolve_manifest(registry, image, fetched, None).await?,
        ]);
    }
    let linux: Vec<_> = index_entries(image, &fetched.bytes)?
        .into_iter()
        .filter(|(_, p)| p.os == "linux")
        .collect();
    if linux.is_empty() {
        return Err(format_err(image, "the index lists no linux manifest"));
    }
    if linux.len() > MAX_PLATFORMS {
        return Err(format_err(
            image,
            format!(
                "the index lists {} linux manifests, more than {MAX_PLATFORMS}",
                linux.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(linux.len());
    for (desc, platform) in linux {
        let m = registry
            .get_manifest(&image.with_digest(&desc.digest))
            .await?;
        out.push(resolve_manifest(registry, image, m, Some(platform.name())).await?);
    }
    Ok(out)
}

/// The entries of an index that name a platform.
fn index_entries(
    image: &ImageRef,
    bytes: &[u8],
) -> Result<Vec<(Descriptor, Platform)>, ImageError> {
    let j: Json =
        serde_json::from_slice(bytes).map_err(|e| format_err(image, format!("index: {e}")))?;
    Ok(j.manifests
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| Some((m.desc, m.platform?)))
        .collect())
}

/// An image manifest as fetched, with its config read and checked against its layers.
async fn resolve_manifest(
    registry: &Registry,
    image: &ImageRef,
    fetched: crate::registry::Fetched,
    platform: Option<String>,
) -> Result<Resolved, ImageError> {
    let media = media_type_of(&fetched.media_type, &fetched.bytes);
    if media != OCI_MANIFEST && media != DOCKER_MANIFEST {
        return Err(format_err(
            image,
            format!("unsupported manifest type {media}"),
        ));
    }
    let manifest = parse_manifest(image, &fetched.bytes)?;
    let repo = image.with_digest(&fetched.digest);
    let config_bytes = registry
        .get_blob(&repo, &manifest.config.digest, MAX_CONFIG_BYTES)
        .await?;
    let diff_ids = parse_diff_ids(image, &config_bytes)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(format_err(
            image,
            format!(
                "{} layers but {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    Ok(Resolved {
        manifest_desc: Descriptor {
            media_type: media,
            digest: fetched.digest.clone(),
            size: fetched.bytes.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        image: repo,
        manifest_bytes: fetched.bytes,
        manifest,
        config_bytes,
        diff_ids,
        platform,
    })
}

/// The media type a manifest declares, else the one the registry sent.
fn media_type_of(sent: &str, bytes: &[u8]) -> String {
    serde_json::from_slice::<Json>(bytes)
        .ok()
        .and_then(|j| j.media_type)
        .unwrap_or_else(|| sent.to_string())
}

/// The chain ids of a stack of diff_ids (OCI image spec: the first is its diff_id, each
/// next one `sha256(previous + " " + diff_id)`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let mut h = OciHasher::new();
                h.update(format!("{prev} {d}").as_bytes());
                h.finish()
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let mut h = OciHasher::new();
        h.update(format!("{a} {b}").as_bytes());
        assert_eq!(ids[1], h.finish());
        assert!(ids[1].starts_with("sha256:"));
    }

    #[test]
    fn manifests_and_configs_parse() {
        let img = ImageRef::parse("127.0.0.1:5000/x:1").unwrap();
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:11","size":3}]}"#;
        let p = parse_manifest(&img, m).unwrap();
        assert_eq!(p.layers[0].digest, "sha256:11");
        let c = br#"{"architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:22"]}}"#;
        assert_eq!(parse_diff_ids(&img, c).unwrap(), ["sha256:22"]);
        assert!(parse_manifest(&img, b"{}").is_err());
    }
}
