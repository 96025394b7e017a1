//! Compiles `proto/` with protox, a pure-Rust protobuf parser, so that no system `protoc`
//! is needed; well-known types map to `prost-types`.
//!
//! Two passes: the snapshots API, which dedupd serves (server and client), then the
//! containerd APIs `dedupd pull` calls and the CRI the tests call (clients only). Both
//! write `containerd.types.rs`; the second pass, which runs last, holds every message of
//! that package (`Mount` and `Descriptor`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let served = [
        "proto/containerd/types/mount.proto",
        "proto/containerd/services/snapshots/v1/snapshots.proto",
    ];
    let called = [
        "proto/containerd/types/mount.proto",
        "proto/containerd/types/descriptor.proto",
        "proto/containerd/services/content/v1/content.proto",
        "proto/containerd/services/images/v1/images.proto",
        "proto/containerd/services/leases/v1/leases.proto",
        "proto/containerd/services/diff/v1/diff.proto",
        "proto/cri/runtime/v1/api.proto",
    ];
    for f in served.iter().chain(&called) {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `connect()`: clients bring their own transport (a unix socket).
        .build_transport(false)
        .compile_fds(protox::compile(served, ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(false)
        .compile_fds(protox::compile(called, ["proto"])?)?;
    Ok(())
}
