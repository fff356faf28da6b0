//! Compiles the .proto files with protox (pure Rust) so no `protoc` binary is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/image.proto",
        "proto/fd_eventfd.proto",
        "proto/fd_signalfd.proto",
        "proto/fd_timerfd.proto",
        "proto/fd_epoll.proto",
        "proto/fd_inotify.proto",
        "proto/fd_memfd.proto",
        "proto/fd_socket.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    prost_build::Config::new().out_dir(&out).compile_fds(fds)?;
    Ok(())
}
