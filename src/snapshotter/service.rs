//! The gRPC face of [`Snapshotter`]: request decoding, blocking work moved to the
//! runtime's blocking pool, errors mapped to the codes containerd expects.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::snapshots as pb;
use super::proto::types::Mount;
use super::{Kind, MountSpec, Snap, SnapError, Snapshotter};

/// Infos per List response message.
const LIST_BATCH: usize = 100;

/// The tonic service.
pub struct Service {
    inner: Arc<Snapshotter>,
}

impl Service {
    /// Wraps a snapshotter.
    pub fn new(inner: Arc<Snapshotter>) -> Service {
        Service { inner }
    }

    /// Runs `f` on the blocking pool: snapshot operations do file and database I/O, and
    /// Commit converts whole layers.
    async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T, SnapError> + Send + 'static,
    {
        let s = self.inner.clone();
        match tokio::task::spawn_blocking(move || f(&s)).await {
            Ok(r) => r.map_err(Status::from),
            Err(e) => Err(Status::internal(format!("snapshot operation failed: {e}"))),
        }
    }
}

fn mounts(m: Vec<MountSpec>) -> Vec<Mount> {
    m.into_iter()
        .map(|m| Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn labels(l: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn stamp(s: super::meta::Stamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: s.secs,
        nanos: s.nanos,
    }
}

fn info(name: String, s: Snap) -> pb::Info {
    pb::Info {
        name,
        parent: s.parent,
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(stamp(s.created)),
        updated_at: Some(stamp(s.updated)),
        labels: s.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let m = self
            .run(move |s| s.create(Kind::Active, &r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let m = self
            .run(move |s| s.create(Kind::View, &r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let m = self.run(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, labels = ?r.labels, "commit");
        self.run(move |s| s.commit(&r.key, &r.name, labels(r.labels), &r.parent))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let snap = self.run(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(key, snap)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("update: info is required"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = i.name.clone();
        let new_labels = labels(i.labels);
        let snap = self
            .run(move |s| s.update(&i.name, &new_labels, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(key, snap)),
        }))
    }

    type ListStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let all = self.run(move |s| s.list(&r.filters)).await?;
        let mut batches = Vec::new();
        let mut batch = Vec::with_capacity(LIST_BATCH);
        for (k, s) in all {
            batch.push(info(k, s));
            if batch.len() == LIST_BATCH {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
            }
        }
        if !batch.is_empty() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let (size, inodes) = self.run(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let report = self.run(|s| s.cleanup()).await?;
        tracing::info!(?report, "cleanup");
        Ok(Response::new(()))
    }
}
