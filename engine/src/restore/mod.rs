//! `floe restore`: stub → map → fill → finish.
//!
//! Restore runs in three stages with a stable API, because live migration
//! runs the first two on the target while the source still runs:
//!
//! 1. [`Stub::create`] checks the image against this host ([`preflight`]),
//!    creates a stopped child with the image's PID (clone3 `set_tid`), empties
//!    its address space, moves the vdso where the image had it and maps every
//!    mapping of the image.
//! 2. [`Stub::write_pages`] copies page data into it (callable many times;
//!    [`load_pages`] streams a whole image with checksums verified).
//! 3. [`Stub::finish`] applies the remaining state (mm fields, descriptors,
//!    signals, limits, registers) and lets the process run.
//!
//! Dropping a stub that was not finished kills it: a failed restore leaves
//! no process behind.
mod finish;
mod pages;
pub mod preflight;
mod stub;

pub use pages::load_pages;
pub use preflight::Preflight;
pub use stub::Stub;

use crate::image::{ImageError, ImageReader};
use crate::inject::InjectError;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    pub shell_job: bool,
}

/// Per-phase timings of a restore, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreTimings {
    pub open_ms: f64,
    pub preflight_ms: f64,
    pub create_ms: f64,
    pub pages_ms: f64,
    pub finish_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub pid: i32,
    pub page_bytes: u64,
    pub timings: RestoreTimings,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("pid {pid} is taken by {owner}; stop that process or restore in a new pid namespace")]
    PidTaken { pid: i32, owner: String },
    #[error(
        "pid {pid} is still held by a zombie after {secs} s (its parent has not reaped it); retry when it is gone"
    )]
    PidZombie { pid: i32, secs: u64 },
    #[error("pid {pid} is above this host's kernel.pid_max ({max}); raise /proc/sys/kernel/pid_max")]
    PidMax { pid: i32, max: i64 },
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("image does not fit this host: {what}")]
    Incompatible { what: String },
    #[error("{what}")]
    Refused { what: String },
    #[error("restore stub {pid}: {op} failed")]
    Stub {
        pid: i32,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("restore stub {pid}: cannot write memory at {addr:#x}")]
    Memory {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inject(#[from] InjectError),
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Runs all three stages on an image directory. The process is left
/// running; it is a child of the caller.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    let t0 = Instant::now();
    let mut timings = RestoreTimings::default();
    let img = ImageReader::open(&opts.dir)?;
    timings.open_ms = ms(t0);
    let t = Instant::now();
    let pre = Preflight::check(&img, opts)?;
    timings.preflight_ms = ms(t);
    let t = Instant::now();
    let mut stub = Stub::create(&img.manifest, &pre)?;
    timings.create_ms = ms(t);
    let t = Instant::now();
    let page_bytes = load_pages(&img, &mut stub)?;
    timings.pages_ms = ms(t);
    let t = Instant::now();
    let pid = stub.finish(&img, &pre)?;
    timings.finish_ms = ms(t);
    timings.total_ms = ms(t0);
    tracing::info!(pid, timings = ?timings, page_bytes, "restore complete");
    Ok(RestoreReport { pid, page_bytes, timings })
}

/// Waits for a restored process (a child of the caller) to exit and returns
/// its exit code (128 + signal when killed).
pub fn wait_exit(pid: i32) -> Result<i32, RestoreError> {
    use crate::sys::ptrace::{wait, Stop};
    loop {
        match wait(pid).map_err(|source| RestoreError::Stub {
            pid,
            op: "wait for the restored process".into(),
            source,
        })? {
            Stop::Exited(code) => return Ok(code),
            Stop::Killed(sig) => return Ok(128 + sig),
            _ => continue,
        }
    }
}
