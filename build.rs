//! Compiles proto/ (the containerd snapshots API) once the snapshotter lands.
fn main() {
    println!("cargo:rerun-if-changed=proto");
}
