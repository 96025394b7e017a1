//! The containerd snapshots service (`containerd.services.snapshots.v1`).
