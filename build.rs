//! Compiles `proto/` (the containerd snapshots API) with protox, a pure-Rust protobuf
//! parser, so that no system `protoc` is needed; well-known types map to `prost-types`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/types/mount.proto",
        "proto/containerd/services/snapshots/v1/snapshots.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No `connect()`: the library needs no client transport; tests bring their own.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
