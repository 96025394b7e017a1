//! A small containerd client over containerd's unix socket: the content store, images,
//! leases, snapshots and the diff service, as `ctr` calls them. Every call carries the
//! namespace in the `containerd-namespace` gRPC header and, once a lease is set
//! ([`Client::with_lease`]), the lease in `containerd-lease`, so that what the call makes
//! is held by the lease until the caller is done.
//!
//! - [`pull`]: `dedupd pull`, an image pull that prepares each layer through the
//!   `dedup` snapshotter's remote path instead of downloading it first.

pub mod pull;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::Code;

use crate::proto::content::content_client::ContentClient;
use crate::proto::diff::diff_client::DiffClient;
use crate::proto::images::images_client::ImagesClient;
use crate::proto::leases::leases_client::LeasesClient;
use crate::proto::snapshots::snapshots_client::SnapshotsClient;
use crate::proto::{content, diff, images, leases, snapshots, types};

/// containerd's default socket (`ctr -a`).
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// containerd's default namespace (`ctr -n`).
pub const DEFAULT_NAMESPACE: &str = "default";
/// The gRPC header that names the namespace of a call.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The gRPC header that names the lease of a call.
const LEASE_HEADER: &str = "containerd-lease";
/// The lease label holding its expiry (RFC 3339), after which GC may drop the lease.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Longest wait for containerd's socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight on one content write stream (one answer each).
const WRITE_QUEUE: usize = 2;

/// Why a containerd call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtrError {
    /// containerd's socket did not take a connection.
    #[error("no connection to {address}")]
    Connect {
        /// The socket.
        address: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// A namespace or lease cannot be a gRPC header.
    #[error("{what} {value:?} is not a valid gRPC header value")]
    Header {
        /// Namespace or lease.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// containerd answered with an error.
    #[error("containerd {call}: {message} ({code:?})")]
    Rpc {
        /// The call (`Content.Write`, ...).
        call: &'static str,
        /// The gRPC status code.
        code: Code,
        /// containerd's message.
        message: String,
    },
    /// containerd's answer breaks the protocol.
    #[error("containerd {call}: {why}")]
    Protocol {
        /// The call.
        call: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl CtrError {
    /// The gRPC code of a failed call, if containerd answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            CtrError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> CtrError {
        move |s| CtrError::Rpc {
            call,
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// A connection to containerd in one namespace (and optionally one lease). Cheap to
/// clone: calls share one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

fn header(what: &'static str, value: &str) -> Result<AsciiMetadataValue, CtrError> {
    MetadataValue::try_from(value).map_err(|_| CtrError::Header {
        what,
        value: value.to_string(),
    })
}

impl Client {
    /// Connects to containerd's socket `address` (a path, or `unix://` and a path) for
    /// calls in `namespace`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Client, CtrError> {
        let namespace = header("namespace", namespace)?;
        let path = match address.to_str().and_then(|s| s.strip_prefix("unix://")) {
            Some(p) => PathBuf::from(p),
            None => address.to_path_buf(),
        };
        let dial = path.clone();
        // The URI is a placeholder: the connector dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://[::]:0")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let dial = dial.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(dial).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| CtrError::Connect {
                address: path,
                source,
            })?;
        Ok(Client {
            channel,
            namespace,
            lease: None,
        })
    }

    /// Pulls `image` through containerd's CRI image service (`runtime.v1.ImageService/
    /// PullImage`, as the kubelet does; the CRI plugin uses its own namespace, `k8s.io`)
    /// and returns the image reference it answers.
    pub async fn cri_pull(&self, image: &str) -> Result<String, CtrError> {
        use crate::proto::cri;
        let mut c = cri::image_service_client::ImageServiceClient::new(self.channel.clone());
        let r = c
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(CtrError::rpc("CRI ImageService.PullImage"))?;
        Ok(r.into_inner().image_ref)
    }

    /// This client, with every call made under lease `id`.
    pub fn with_lease(&self, id: &str) -> Result<Client, CtrError> {
        Ok(Client {
            lease: Some(header("lease", id)?),
            ..self.clone()
        })
    }

    /// `msg` with the namespace and lease headers.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(l) = &self.lease {
            r.metadata_mut().insert(LEASE_HEADER, l.clone());
        }
        r
    }

    /// Creates lease `id`, which containerd's GC drops by itself after `expire`.
    pub async fn create_lease(&self, id: &str, expire: SystemTime) -> Result<(), CtrError> {
        let mut labels = std::collections::HashMap::new();
        labels.insert(LABEL_GC_EXPIRE.to_string(), rfc3339(expire));
        LeasesClient::new(self.channel.clone())
            .create(self.req(leases::CreateRequest {
                id: id.to_string(),
                labels,
            }))
            .await
            .map_err(CtrError::rpc("Leases.Create"))?;
        Ok(())
    }

    /// Deletes lease `id`: what only it held becomes garbage.
    pub async fn delete_lease(&self, id: &str) -> Result<(), CtrError> {
        LeasesClient::new(self.channel.clone())
            .delete(self.req(leases::DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await
            .map_err(CtrError::rpc("Leases.Delete"))?;
        Ok(())
    }

    /// The committed blob `digest`, if the content store holds it in this namespace.
    pub async fn content_info(&self, digest: &str) -> Result<Option<content::Info>, CtrError> {
        match ContentClient::new(self.channel.clone())
            .info(self.req(content::InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(CtrError::rpc("Content.Info")(s)),
        }
    }

    /// Sets `labels` on committed blob `digest`, leaving its other labels as they are.
    pub async fn content_set_labels(
        &self,
        digest: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        if labels.is_empty() {
            return Ok(());
        }
        ContentClient::new(self.channel.clone())
            .update(self.req(content::UpdateRequest {
                info: Some(content::Info {
                    digest: digest.to_string(),
                    labels: labels.clone().into_iter().collect(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
                }),
            }))
            .await
            .map_err(CtrError::rpc("Content.Update"))?;
        Ok(())
    }

    /// Opens ingest `ref_` for blob `digest` of `size` bytes. `None`: the content store
    /// already holds the blob in this namespace (nothing to write).
    pub async fn content_writer(
        &self,
        ref_: &str,
        digest: &str,
        size: u64,
    ) -> Result<Option<ContentWriter>, CtrError> {
        const CALL: &str = "Content.Write";
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        // The first message opens the writer (and fails if the blob exists); containerd
        // answers nothing, headers included, before it has it.
        let first = content::WriteContentRequest {
            action: content::WriteAction::Stat as i32,
            r#ref: ref_.to_string(),
            total: size as i64,
            expected: digest.to_string(),
            ..Default::default()
        };
        tx.send(first)
            .await
            .map_err(|_| protocol(CALL, "request stream closed"))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut answers = match ContentClient::new(self.channel.clone())
            .write(self.req(stream))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
            Err(s) => return Err(CtrError::rpc(CALL)(s)),
        };
        match answers.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(protocol(CALL, "no answer to the first request")),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
            Err(s) => return Err(CtrError::rpc(CALL)(s)),
        }
        Ok(Some(ContentWriter {
            tx,
            answers,
            offset: 0,
            size,
            digest: digest.to_string(),
        }))
    }

    /// Drops ingest `ref_` (best effort: a finished or unknown ingest is no error).
    pub async fn content_abort(&self, ref_: &str) {
        let _ = ContentClient::new(self.channel.clone())
            .abort(self.req(content::AbortRequest {
                r#ref: ref_.to_string(),
            }))
            .await;
    }

    /// Creates image record `name` pointing at `target`, or points the existing one
    /// there (its labels are replaced by none, as `ctr image pull` does).
    pub async fn put_image(&self, name: &str, target: types::Descriptor) -> Result<(), CtrError> {
        let image = images::Image {
            name: name.to_string(),
            target: Some(target),
            ..Default::default()
        };
        let mut c = ImagesClient::new(self.channel.clone());
        match c
            .create(self.req(images::CreateImageRequest {
                image: Some(image.clone()),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                c.update(self.req(images::UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                }))
                .await
                .map_err(CtrError::rpc("Images.Update"))?;
                Ok(())
            }
            Err(s) => Err(CtrError::rpc("Images.Create")(s)),
        }
    }

    /// Snapshot `key` of `snapshotter`, if it exists in this namespace.
    pub async fn stat_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<snapshots::Info>, CtrError> {
        match SnapshotsClient::new(self.channel.clone())
            .stat(self.req(snapshots::StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(CtrError::rpc("Snapshots.Stat")(s)),
        }
    }

    /// Prepares active snapshot `key` on `parent`: its mounts. A snapshotter that
    /// already has the layer the labels name answers `ALREADY_EXISTS`
    /// ([`CtrError::code`]).
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<types::Mount>, CtrError> {
        let r = SnapshotsClient::new(self.channel.clone())
            .prepare(self.req(snapshots::PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: labels.clone().into_iter().collect(),
            }))
            .await
            .map_err(CtrError::rpc("Snapshots.Prepare"))?;
        Ok(r.into_inner().mounts)
    }

    /// Commits active snapshot `key` as `name`.
    pub async fn commit_snapshot(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        SnapshotsClient::new(self.channel.clone())
            .commit(self.req(snapshots::CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: name.to_string(),
                key: key.to_string(),
                labels: labels.clone().into_iter().collect(),
                parent: String::new(),
            }))
            .await
            .map_err(CtrError::rpc("Snapshots.Commit"))?;
        Ok(())
    }

    /// Removes snapshot `key`.
    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<(), CtrError> {
        SnapshotsClient::new(self.channel.clone())
            .remove(self.req(snapshots::RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await
            .map_err(CtrError::rpc("Snapshots.Remove"))?;
        Ok(())
    }

    /// Applies layer blob `layer` (in the content store) into `mounts` with containerd's
    /// diff service; returns the uncompressed layer's descriptor (its digest is the
    /// diff_id).
    pub async fn apply_layer(
        &self,
        layer: types::Descriptor,
        mounts: Vec<types::Mount>,
    ) -> Result<types::Descriptor, CtrError> {
        const CALL: &str = "Diff.Apply";
        let r = DiffClient::new(self.channel.clone())
            .apply(self.req(diff::ApplyRequest {
                diff: Some(layer),
                mounts,
            }))
            .await
            .map_err(CtrError::rpc(CALL))?;
        r.into_inner()
            .applied
            .ok_or_else(|| protocol(CALL, "no applied descriptor"))
    }
}

fn protocol(call: &'static str, why: &str) -> CtrError {
    CtrError::Protocol {
        call,
        why: why.to_string(),
    }
}

/// An open ingest of the content store ([`Client::content_writer`]): data in order,
/// then [`ContentWriter::commit`].
pub struct ContentWriter {
    tx: mpsc::Sender<content::WriteContentRequest>,
    answers: tonic::Streaming<content::WriteContentResponse>,
    offset: u64,
    size: u64,
    digest: String,
}

impl ContentWriter {
    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sends one request and waits for its answer (containerd answers each).
    async fn exchange(
        &mut self,
        req: content::WriteContentRequest,
    ) -> Result<content::WriteContentResponse, CtrError> {
        const CALL: &str = "Content.Write";
        let sent = self.tx.send(req).await;
        match self.answers.message().await {
            Ok(Some(a)) => Ok(a),
            // The stream ended: containerd's status says why (or the send failed first).
            Ok(None) => Err(protocol(
                CALL,
                if sent.is_err() {
                    "request stream closed"
                } else {
                    "stream ended early"
                },
            )),
            Err(s) => Err(CtrError::rpc(CALL)(s)),
        }
    }

    /// Appends `data`.
    pub async fn write(&mut self, data: Vec<u8>) -> Result<(), CtrError> {
        let n = data.len() as u64;
        let a = self
            .exchange(content::WriteContentRequest {
                action: content::WriteAction::Write as i32,
                offset: self.offset as i64,
                data,
                ..Default::default()
            })
            .await?;
        self.offset += n;
        if a.offset as u64 != self.offset {
            return Err(protocol(
                "Content.Write",
                &format!("offset {} after writing to {}", a.offset, self.offset),
            ));
        }
        Ok(())
    }

    /// Commits the blob with `labels`, after containerd checked its size and digest.
    /// False: another writer committed the same blob first (it exists; `labels` were
    /// not set).
    pub async fn commit(mut self, labels: &BTreeMap<String, String>) -> Result<bool, CtrError> {
        let r = self
            .exchange(content::WriteContentRequest {
                action: content::WriteAction::Commit as i32,
                offset: self.offset as i64,
                total: self.size as i64,
                expected: self.digest.clone(),
                labels: labels.clone().into_iter().collect(),
                ..Default::default()
            })
            .await;
        drop(self.tx);
        // containerd sends a last status when the request stream ends: drain it.
        while let Ok(Some(_)) = self.answers.message().await {}
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(Code::AlreadyExists) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// `t` as RFC 3339 in UTC, seconds precision (`2006-01-02T15:04:05Z`), the form
/// containerd parses in `containerd.io/gc.expire`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm), years >= 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.
        assert_eq!(at(951_827_696), "2000-02-29T12:34:56Z");
        // 2026-12-31T23:59:59Z and the second after.
        assert_eq!(at(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(at(1_798_761_600), "2027-01-01T00:00:00Z");
    }
}
