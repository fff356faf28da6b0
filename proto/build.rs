//! Compiles the .proto files with protox (pure Rust) so no `protoc` binary is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = [
        "proto/image.proto",
        "proto/fd_eventfd.proto",
        "proto/fd_signalfd.proto",
        "proto/fd_timerfd.proto",
        "proto/fd_epoll.proto",
        "proto/fd_inotify.proto",
        "proto/fd_memfd.proto",
        "proto/fd_socket.proto",
    ];
    let wire = ["proto/peer.proto", "proto/control.proto"];
    for f in image.iter().chain(&wire) {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    prost_build::Config::new().out_dir(&out).compile_fds(protox::compile(image, ["proto"])?)?;
    // The wire messages embed image messages: point them at `crate::image`.
    prost_build::Config::new()
        .out_dir(&out)
        .extern_path(".floe.image.v1", "crate::image")
        .compile_fds(protox::compile(wire, ["proto"])?)?;
    Ok(())
}
