//! dedupd: a containerd snapshotter and kernel-facing cache daemon.
//!
//! OCI layers are converted into EROFS metadata images whose file data lives in
//! content-addressed, deduplicated, lz4-compressed chunks ([`store`]). The kernel mounts
//! the images lazily, through cachefiles on-demand ([`frontend::cachefiles`]) or
//! fanotify pre-content events ([`frontend::fanotify`]), and the per-core io_uring data plane ([`serve`])
//! turns its page-cache misses into verified bytes.
//!
//! Module map (one concern each):
//! - [`digest`]: chunk digests (BLAKE3) and OCI digests (SHA-256).
//! - [`erofs`]: the EROFS on-disk format and our image writer.
//! - [`convert`]: OCI layer (tar, gzip, zstd) to EROFS image plus chunks.
//! - [`store`]: the chunk store, blob chunk tables, layer records.
//! - [`serve`]: the thread-per-core io_uring engine and the kernel simulator.
//! - [`frontend`]: the kernel front ends, one folder each (cachefiles on-demand,
//!   fanotify pre-content, local), with their ABI, mounter and failover.
//! - [`registry`]: the registry client (hosts.toml, credentials, ranges, referrers).
//! - [`snapshotter`]: the containerd snapshots gRPC service.
//! - [`ctrclient`]: a containerd client, and `dedupd pull` on it.
//! - [`proto`]: the generated gRPC code (containerd's APIs).
//! - [`daemon`]: `dedupd run`: front-end selection, blob registry, threads.
//! - [`metrics`]: the Prometheus endpoint (`metrics_address`).
//! - [`perms`]: root-only permissions under the root, peer credentials on sockets.
//! - [`config`]: configuration with embedded defaults.

pub mod config;
pub mod convert;
pub mod ctrclient;
pub mod daemon;
pub mod digest;
pub mod erofs;
pub mod frontend;
pub mod metrics;
pub mod perms;
pub mod proto;
pub mod registry;
pub mod remote;
pub mod serve;
pub mod snapshotter;
pub mod store;
pub mod systemd;
