//! The dedupd artifact: what `dedupd publish` pushes beside an image so that a node can
//! mount its layers after fetching only their metadata. Specified in
//! `docs/artifact-format.md`; this module is its one reader and writer.
//!
//! An OCI image manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config, and
//! `subject` = the image manifest it serves (so the image itself, its digest and its
//! signatures stay as they were). Its layers, per image layer in order: one metadata
//! blob ([`META_MEDIA_TYPE`]) and the data blobs ([`DATA_MEDIA_TYPE`]) its locators name.
//! Optionally, one access trace ([`TRACE_MEDIA_TYPE`]) for prefetching.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::digest::ChunkDigest;
use crate::registry::{Descriptor, OCI_MANIFEST};
use crate::store::blob::{blob_id, decode_table, encode_table};
use crate::store::remote::LOCATOR_BYTES;
use crate::store::{Locator, RawEntry};

/// `artifactType` of the artifact manifest (version 1 of the format).
pub const ARTIFACT_TYPE: &str = "application/vnd.dedupd.artifact.v1";
/// Media type of a layer's metadata blob: zstd of [`LayerMeta::encode`]'s layout.
pub const META_MEDIA_TYPE: &str = "application/vnd.dedupd.layer.meta.v1+zstd";
/// Media type of a data blob: `DDC1` chunk records back to back.
pub const DATA_MEDIA_TYPE: &str = "application/vnd.dedupd.chunks.v1";
/// Media type of an access trace (JSON; see the prefetcher).
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.dedupd.trace.v1+json";
/// The OCI empty descriptor's media type, digest and size (the config of artifacts).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Digest of `{}`.
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Annotation on meta and data descriptors: the image layer (compressed digest) they
/// serve.
pub const ANN_LAYER: &str = "dev.dedupd.layer.digest";
/// Annotation on a meta descriptor: the layer's diff_id.
pub const ANN_DIFF_ID: &str = "dev.dedupd.layer.diff_id";
/// Annotation on the manifest: the format version.
pub const ANN_FORMAT: &str = "dev.dedupd.format";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Magic at the start of a decompressed metadata blob.
const META_MAGIC: &[u8; 8] = b"DDMETA01";
/// Largest metadata blob accepted (decompressed): bounds what a hostile artifact costs.
pub const MAX_META_BYTES: u64 = 2 << 30;
/// Largest JSON header of a metadata blob.
const MAX_HEADER_BYTES: usize = 1 << 20;
/// Most data blobs one layer may name.
pub const MAX_DATA_BLOBS: usize = 4096;

/// Why an artifact or metadata blob was refused. Names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The bytes break the format.
    #[error("dedupd artifact: {0}")]
    Format(String),
}

fn bad(why: impl Into<String>) -> ArtifactError {
    ArtifactError::Format(why.into())
}

/// The JSON header of a metadata blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetaHeader {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// `sha256:` of the layer's uncompressed tar.
    pub diff_id: String,
    /// `sha256:` of the image layer blob (compressed).
    pub layer_digest: String,
    /// Chunk size of the layer's files.
    pub chunk_bytes: u32,
    /// Length of the EROFS image that follows the header.
    pub image_bytes: u64,
    /// Entries in the layer.
    pub files: u64,
    /// Chunk references of its files.
    pub chunks: u64,
    /// Bytes of file data.
    pub logical_bytes: u64,
    /// Data blobs (`sha256:` digests) the locators index into, in order.
    pub data: Vec<String>,
    /// The layer's blobs (EROFS devices) in order: their ids and chunk counts.
    pub blobs: Vec<MetaBlob>,
}

/// One blob of a layer in the header.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetaBlob {
    /// Blob id (BLAKE3 of its encoded chunk table; the EROFS device tag).
    pub id: String,
    /// Chunks in its table.
    pub chunks: u32,
}

/// A decoded metadata blob: everything a node needs to mount one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMeta {
    /// The header.
    pub header: MetaHeader,
    /// The EROFS metadata image.
    pub image: Vec<u8>,
    /// Per blob: its chunk table and one locator per chunk.
    pub blobs: Vec<(Vec<RawEntry>, Vec<Locator>)>,
}

impl LayerMeta {
    /// The blob layout, zstd-compressed: `DDMETA01`, u32 LE header length, the JSON
    /// header, the image, then per blob a u32 LE table length, the chunk table
    /// ([`encode_table`]) and its locators (16 bytes each).
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("serializable");
        let mut raw = Vec::with_capacity(16 + header.len() + self.image.len());
        raw.extend_from_slice(META_MAGIC);
        raw.extend_from_slice(&(header.len() as u32).to_le_bytes());
        raw.extend_from_slice(&header);
        raw.extend_from_slice(&self.image);
        for (entries, locators) in &self.blobs {
            let table = encode_table(entries);
            raw.extend_from_slice(&(table.len() as u32).to_le_bytes());
            raw.extend_from_slice(&table);
            for l in locators {
                l.encode(&mut raw);
            }
        }
        zstd::bulk::compress(&raw, 3).expect("compressing into memory")
    }

    /// Decodes and checks a metadata blob (already verified against its digest): every
    /// length, every blob id against its table, every locator against the data blobs,
    /// and the image's EROFS magic.
    pub fn decode(blob: &[u8]) -> Result<LayerMeta, ArtifactError> {
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(blob)
            .map_err(|e| bad(format!("metadata blob: {e}")))?
            .take(MAX_META_BYTES + 1)
            .read_to_end(&mut raw)
            .map_err(|e| bad(format!("metadata blob does not decompress: {e}")))?;
        if raw.len() as u64 > MAX_META_BYTES {
            return Err(bad("metadata blob is larger than 2 GiB"));
        }
        let mut r = Cursor { b: &raw, at: 0 };
        if r.take(8)? != META_MAGIC {
            return Err(bad("metadata blob: bad magic (not DDMETA01)"));
        }
        let hlen = r.u32()? as usize;
        if hlen > MAX_HEADER_BYTES {
            return Err(bad("metadata header longer than 1 MiB"));
        }
        let header: MetaHeader = serde_json::from_slice(r.take(hlen)?)
            .map_err(|e| bad(format!("metadata header: {e}")))?;
        if header.version != FORMAT_VERSION {
            return Err(bad(format!(
                "metadata version {} (this dedupd reads {FORMAT_VERSION})",
                header.version
            )));
        }
        if header.data.len() > MAX_DATA_BLOBS || header.blobs.len() > MAX_DATA_BLOBS {
            return Err(bad("too many data blobs"));
        }
        for d in &header.data {
            check_sha256(d)?;
        }
        check_sha256(&header.diff_id)?;
        check_sha256(&header.layer_digest)?;
        crate::convert::check_chunk_bytes(u64::from(header.chunk_bytes))
            .map_err(|e| bad(format!("chunk size: {e}")))?;
        let image_len = usize::try_from(header.image_bytes)
            .ok()
            .filter(|&n| n <= raw.len())
            .ok_or_else(|| bad("image length past the blob's end"))?;
        let image = r.take(image_len)?.to_vec();
        if image.len() < 1028 || image[1024..1028] != 0xE0F5_E1E2u32.to_le_bytes() {
            return Err(bad("the image is not EROFS (no superblock magic)"));
        }
        let mut blobs = Vec::with_capacity(header.blobs.len());
        for mb in &header.blobs {
            let tlen = r.u32()? as usize;
            let table = r.take(tlen)?;
            if blob_id(table) != mb.id {
                return Err(bad(format!(
                    "blob {}: its table hashes to another id",
                    mb.id
                )));
            }
            let entries = decode_table(table)
                .ok_or_else(|| bad(format!("blob {}: malformed chunk table", mb.id)))?;
            if entries.len() != mb.chunks as usize {
                return Err(bad(format!("blob {}: chunk count disagrees", mb.id)));
            }
            let mut locators = Vec::with_capacity(entries.len());
            for _ in 0..entries.len() {
                let b: &[u8; LOCATOR_BYTES] = r
                    .take(LOCATOR_BYTES)?
                    .try_into()
                    .expect("LOCATOR_BYTES bytes");
                let l = Locator::decode(b)
                    .ok_or_else(|| bad(format!("blob {}: unknown or bad locator", mb.id)))?;
                let Locator::Record { data, .. } = l;
                if usize::from(data) >= header.data.len() {
                    return Err(bad(format!("blob {}: locator names no data blob", mb.id)));
                }
                locators.push(l);
            }
            blobs.push((entries, locators));
        }
        if r.at != raw.len() {
            return Err(bad("trailing bytes after the last blob"));
        }
        Ok(LayerMeta {
            header,
            image,
            blobs,
        })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ArtifactError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| bad("metadata blob truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, ArtifactError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

fn check_sha256(d: &str) -> Result<(), ArtifactError> {
    let ok = d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    });
    if ok {
        Ok(())
    } else {
        Err(bad(format!("{d:?} is not a sha256 digest")))
    }
}

/// One image layer's part of an artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactLayer {
    /// The image layer (compressed digest).
    pub layer_digest: String,
    /// Its diff_id.
    pub diff_id: String,
    /// Its metadata blob.
    pub meta: Descriptor,
    /// Its data blobs, in the order its locators index them.
    pub data: Vec<Descriptor>,
}

/// A parsed artifact manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// Digest of the image manifest it serves.
    pub subject: String,
    /// Per image layer, in the image's order.
    pub layers: Vec<ArtifactLayer>,
    /// An access trace for prefetching, if one was published.
    pub trace: Option<Descriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson {
    schema_version: u32,
    media_type: String,
    artifact_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
    subject: Descriptor,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// Role annotation on every layer descriptor: `meta`, `data` or `trace`.
const ANN_ROLE: &str = "dev.dedupd.role";

impl Artifact {
    /// The manifest's bytes: deterministic for the same content, so publishing twice
    /// pushes the same digest.
    pub fn manifest(&self, subject: &Descriptor) -> Vec<u8> {
        let mut layers = Vec::new();
        for l in &self.layers {
            let mut m = l.meta.clone();
            m.media_type = META_MEDIA_TYPE.into();
            m.annotations.insert(ANN_ROLE.into(), "meta".into());
            m.annotations
                .insert(ANN_LAYER.into(), l.layer_digest.clone());
            m.annotations.insert(ANN_DIFF_ID.into(), l.diff_id.clone());
            layers.push(m);
            for d in &l.data {
                let mut d = d.clone();
                d.media_type = DATA_MEDIA_TYPE.into();
                d.annotations.insert(ANN_ROLE.into(), "data".into());
                d.annotations
                    .insert(ANN_LAYER.into(), l.layer_digest.clone());
                layers.push(d);
            }
        }
        if let Some(t) = &self.trace {
            let mut t = t.clone();
            t.media_type = TRACE_MEDIA_TYPE.into();
            t.annotations.insert(ANN_ROLE.into(), "trace".into());
            layers.push(t);
        }
        let json = ManifestJson {
            schema_version: 2,
            media_type: OCI_MANIFEST.into(),
            artifact_type: ARTIFACT_TYPE.into(),
            config: Descriptor {
                media_type: EMPTY_MEDIA_TYPE.into(),
                digest: EMPTY_DIGEST.into(),
                size: 2,
                artifact_type: None,
                annotations: BTreeMap::new(),
            },
            layers,
            subject: Descriptor {
                media_type: subject.media_type.clone(),
                digest: subject.digest.clone(),
                size: subject.size,
                artifact_type: None,
                annotations: BTreeMap::new(),
            },
            annotations: BTreeMap::from([(ANN_FORMAT.to_string(), FORMAT_VERSION.to_string())]),
        };
        serde_json::to_vec(&json).expect("serializable")
    }

    /// Parses an artifact manifest, checking its type, version and layout.
    pub fn parse(bytes: &[u8]) -> Result<Artifact, ArtifactError> {
        let m: ManifestJson =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("manifest: {e}")))?;
        if m.artifact_type != ARTIFACT_TYPE {
            return Err(bad(format!("artifactType {:?}", m.artifact_type)));
        }
        let version = m.annotations.get(ANN_FORMAT).map(String::as_str);
        if version != Some("1") {
            return Err(bad(format!(
                "format version {version:?} (this dedupd reads {FORMAT_VERSION})"
            )));
        }
        let mut layers: Vec<ArtifactLayer> = Vec::new();
        let mut trace = None;
        let mut seen = HashSet::new();
        for d in m.layers {
            let role = d.annotations.get(ANN_ROLE).cloned().unwrap_or_default();
            let layer = d.annotations.get(ANN_LAYER).cloned();
            check_sha256(&d.digest)?;
            match (role.as_str(), layer) {
                ("meta", Some(layer)) if d.media_type == META_MEDIA_TYPE => {
                    let diff_id = d
                        .annotations
                        .get(ANN_DIFF_ID)
                        .cloned()
                        .ok_or_else(|| bad("a meta blob without its diff_id"))?;
                    check_sha256(&layer)?;
                    check_sha256(&diff_id)?;
                    if !seen.insert(layer.clone()) {
                        return Err(bad(format!("layer {layer} described twice")));
                    }
                    layers.push(ArtifactLayer {
                        layer_digest: layer,
                        diff_id,
                        meta: d,
                        data: Vec::new(),
                    });
                }
                ("data", Some(layer)) if d.media_type == DATA_MEDIA_TYPE => {
                    let last = layers
                        .last_mut()
                        .filter(|l| l.layer_digest == layer)
                        .ok_or_else(|| bad("a data blob not after its layer's meta blob"))?;
                    last.data.push(d);
                }
                ("trace", _) if d.media_type == TRACE_MEDIA_TYPE => trace = Some(d),
                _ => {
                    return Err(bad(format!(
                        "unexpected layer {} ({})",
                        d.digest, d.media_type
                    )))
                }
            }
        }
        Ok(Artifact {
            subject: m.subject.digest,
            layers,
            trace,
        })
    }

    /// The part of layer `layer_digest`.
    pub fn layer(&self, layer_digest: &str) -> Option<&ArtifactLayer> {
        self.layers.iter().find(|l| l.layer_digest == layer_digest)
    }
}

/// The digests of `entries`, distinct, in order (for building data blobs).
pub fn distinct_chunks(entries: &[RawEntry]) -> Vec<(ChunkDigest, u32)> {
    let mut seen = HashSet::new();
    entries
        .iter()
        .filter(|e| seen.insert(e.digest))
        .map(|e| (e.digest, e.raw_len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn meta() -> LayerMeta {
        let entries: Vec<RawEntry> = (0..3u8)
            .map(|i| RawEntry {
                digest: ChunkDigest::of(&[i]),
                raw_len: 65536 - u32::from(i),
            })
            .collect();
        let locators = (0..3u64)
            .map(|i| Locator::Record {
                data: (i % 2) as u16,
                offset: i * 70_000,
                len: 65_584,
            })
            .collect();
        let mut image = vec![0u8; 4096];
        image[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        LayerMeta {
            header: MetaHeader {
                version: 1,
                diff_id: sha('a'),
                layer_digest: sha('b'),
                chunk_bytes: 65536,
                image_bytes: 4096,
                files: 3,
                chunks: 3,
                logical_bytes: 196_605,
                data: vec![sha('c'), sha('d')],
                blobs: vec![MetaBlob {
                    id: blob_id(&encode_table(&entries)),
                    chunks: 3,
                }],
            },
            image,
            blobs: vec![(entries, locators)],
        }
    }

    #[test]
    fn metadata_blobs_round_trip() {
        let m = meta();
        assert_eq!(LayerMeta::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn malformed_metadata_is_refused_naming_the_rule() {
        let check = |m: LayerMeta, want: &str| {
            let err = LayerMeta::decode(&m.encode()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (want {want:?})");
        };
        let mut m = meta();
        m.header.version = 2;
        check(m, "version 2");
        let mut m = meta();
        m.header.blobs[0].id = "0".repeat(64);
        check(m, "hashes to another id");
        let mut m = meta();
        m.header.data.pop();
        check(m, "names no data blob");
        let mut m = meta();
        m.image[1024] = 0;
        check(m, "not EROFS");
        let mut m = meta();
        m.header.diff_id = "sha256:XYZ".into();
        check(m, "not a sha256");
        let enc = meta().encode();
        let raw = zstd::bulk::decompress(&enc, 1 << 20).unwrap();
        let cut = zstd::bulk::compress(&raw[..raw.len() - 3], 3).unwrap();
        assert!(LayerMeta::decode(&cut)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut long = raw.clone();
        long.push(0);
        let long = zstd::bulk::compress(&long, 3).unwrap();
        assert!(LayerMeta::decode(&long)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        assert!(LayerMeta::decode(b"not zstd").is_err());
    }

    #[test]
    fn manifests_round_trip_and_are_deterministic() {
        let desc = |d: String, size| Descriptor {
            media_type: String::new(),
            digest: d,
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        };
        let a = Artifact {
            subject: sha('e'),
            layers: vec![
                ArtifactLayer {
                    layer_digest: sha('1'),
                    diff_id: sha('2'),
                    meta: desc(sha('3'), 100),
                    data: vec![desc(sha('4'), 1000), desc(sha('5'), 2000)],
                },
                ArtifactLayer {
                    layer_digest: sha('6'),
                    diff_id: sha('7'),
                    meta: desc(sha('8'), 10),
                    data: vec![],
                },
            ],
            trace: Some(desc(sha('9'), 5)),
        };
        let mut subject = desc(sha('e'), 555);
        subject.media_type = OCI_MANIFEST.into();
        let bytes = a.manifest(&subject);
        assert_eq!(bytes, a.manifest(&subject));
        let b = Artifact::parse(&bytes).unwrap();
        assert_eq!(b.subject, a.subject);
        assert_eq!(b.layers.len(), 2);
        assert_eq!(b.layers[0].data.len(), 2);
        assert_eq!(b.layer(&sha('6')).unwrap().diff_id, sha('7'));
        assert_eq!(b.trace.unwrap().digest, sha('9'));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["artifactType"], ARTIFACT_TYPE);
        assert_eq!(v["subject"]["digest"], sha('e'));
        assert_eq!(v["config"]["digest"], EMPTY_DIGEST);
        let other = String::from_utf8(bytes)
            .unwrap()
            .replace(ARTIFACT_TYPE, "application/vnd.other");
        assert!(Artifact::parse(other.as_bytes()).is_err());
    }
}
