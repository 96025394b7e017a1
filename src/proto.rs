//! Generated protobuf and gRPC code of `proto/`, in modules that mirror the packages:
//! containerd's snapshots API (served by [`crate::snapshotter`], called by
//! [`crate::ctrclient`]) and the content, images, leases and diff APIs (called by
//! [`crate::ctrclient`]). The CRI messages are generated too, for the tests only.

#![allow(missing_docs, clippy::all)]

/// `containerd.*`.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        /// `containerd.services.content`.
        pub mod content {
            /// `containerd.services.content.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        /// `containerd.services.images`.
        pub mod images {
            /// `containerd.services.images.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        /// `containerd.services.leases`.
        pub mod leases {
            /// `containerd.services.leases.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        /// `containerd.services.diff`.
        pub mod diff {
            /// `containerd.services.diff.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
    }
}
/// `runtime.v1`: the kubelet's CRI (the image service `dedupd cri-pull` calls).
pub mod cri {
    tonic::include_proto!("runtime.v1");
}
pub use self::containerd::services::content::v1 as content;
pub use self::containerd::services::diff::v1 as diff;
pub use self::containerd::services::images::v1 as images;
pub use self::containerd::services::leases::v1 as leases;
pub use self::containerd::services::snapshots::v1 as snapshots;
pub use self::containerd::types;
