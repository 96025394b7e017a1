//! The containerd snapshots service (`containerd.services.snapshots.v1`).

/// Generated protobuf and gRPC code of `proto/`.
pub mod proto {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.snapshots.v1`.
    pub mod snapshots {
        tonic::include_proto!("containerd.services.snapshots.v1");
    }
}
