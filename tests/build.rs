//! Compiles the C fixture workloads in `fixtures/` with gcc (no `cc` crate:
//! these are standalone executables, not libraries linked into Rust) into
//! `$OUT_DIR/fixtures/<name>` and exposes that directory to the harness as
//! the compile-time env var `FLOE_FIXTURE_DIR`.
//!
//! `fixtures/memhog.c` is skipped: it is built and owned elsewhere.
//! Sources that include `<pthread.h>` are linked with `-pthread`.
#![allow(clippy::unwrap_used)] // a build script reports errors by panicking

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const SKIP: &[&str] = &["memhog.c"];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let src_dir = manifest.join("fixtures");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("fixtures");
    fs::create_dir_all(&out_dir).unwrap();

    println!("cargo:rerun-if-changed={}", src_dir.display());
    println!("cargo:rerun-if-changed=build.rs");

    let cc = "gcc";
    match Command::new(cc).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "floe-tests: `{cc} --version` failed ({}); gcc is required to build the C fixture workloads in {}",
            o.status,
            src_dir.display()
        ),
        Err(e) => panic!(
            "floe-tests: cannot run `{cc}` ({e}); gcc is required to build the C fixture workloads in {} \
             (on Debian: apt-get install gcc libc6-dev)",
            src_dir.display()
        ),
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&src_dir)
        .unwrap_or_else(|e| panic!("floe-tests: cannot read {}: {e}", src_dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    sources.sort();

    for path in &sources {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".h") {
            println!("cargo:rerun-if-changed={}", path.display());
            continue;
        }
        if !name.ends_with(".c") || SKIP.contains(&name.as_str()) {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        compile(cc, path, &out_dir.join(name.trim_end_matches(".c")));
    }

    println!("cargo:rustc-env=FLOE_FIXTURE_DIR={}", out_dir.display());
}

fn compile(cc: &str, src: &Path, out: &Path) {
    let text = fs::read_to_string(src).unwrap_or_else(|e| panic!("floe-tests: cannot read {}: {e}", src.display()));
    let mut cmd = Command::new(cc);
    cmd.args(["-O1", "-g", "-Wall", "-o"]).arg(out).arg(src);
    if text.contains("<pthread.h>") {
        cmd.arg("-pthread");
    }
    let output = cmd.output().unwrap_or_else(|e| panic!("floe-tests: cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!("floe-tests: compiling fixture {} failed ({}):\n{cmd:?}\n{stderr}", src.display(), output.status);
    }
    for line in stderr.lines() {
        println!("cargo:warning={line}");
    }
}
