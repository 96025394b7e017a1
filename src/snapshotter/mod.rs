//! The containerd snapshots service (`containerd.services.snapshots.v1`).

/// Generated protobuf and gRPC code of `proto/`, in modules that mirror the packages.
#[allow(missing_docs, clippy::all)]
pub mod proto {
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
        }
    }
    pub use self::containerd::services::snapshots::v1 as snapshots;
    pub use self::containerd::types;
}
