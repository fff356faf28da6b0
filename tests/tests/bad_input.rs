//! End-to-end: floe must fail cleanly (non-zero exit, a clear message, no
//! process created, the dumped process left alone) on damaged images and on
//! processes it does not support. Needs root; skipped otherwise.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Restoring `dir` must fail cleanly and leave no process with `pid` (and no
/// live process whose command line mentions `needle`). Returns the lower-cased
/// error message.
fn restore_must_fail(dir: &Path, pid: i32, needle: &str, what: &str) -> String {
    let out = restore_detached(dir, &[], Stdio::null());
    if out.status.success() {
        // Do not leak whatever was created.
        let _ = send_signal(pid, libc::SIGKILL);
        wait_pid_gone(pid, GONE_TIMEOUT);
    }
    let err = assert_failed_cleanly(&out, what);
    assert_no_process(pid, what);
    assert!(
        pids_with_cmdline_containing(needle).is_empty(),
        "{what}: a process was left behind: {:?}",
        pids_with_cmdline_containing(needle)
    );
    err
}

#[test]
fn corrupted_page_data_is_detected() {
    require_root!();
    let td = TestDir::new("corrupt-pages");
    let img = td.join("img");
    let mut m = Memstate::spawn(td.path());
    let pid = m.pid();
    m.report();
    dump_and_reap(&mut m.fx, &img, &[]);

    let pages = img.join("pages.img");
    let f = OpenOptions::new().read(true).write(true).open(&pages).unwrap();
    let len = f.metadata().unwrap().len();
    assert!(len > 8192, "pages.img is suspiciously small ({len} bytes)");
    let at = len - 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
    drop(f);

    let err = restore_must_fail(&img, pid, &m.ready.to_string_lossy(), "restore of an image with corrupt page data");
    assert_mentions(&err, &["checksum"], "corrupt page data");
}

#[test]
fn truncated_manifest_is_rejected() {
    require_root!();
    let td = TestDir::new("truncated");
    let img = td.join("img");
    let mut s = Sleeper::spawn(td.path(), 200);
    let pid = s.fx.pid;
    dump_and_reap(&mut s.fx, &img, &[]);

    let manifest = img.join("manifest.img");
    let len = fs::metadata(&manifest).unwrap().len();
    OpenOptions::new().write(true).open(&manifest).unwrap().set_len(len / 2).unwrap();

    let err = restore_must_fail(&img, pid, &s.ticks.to_string_lossy(), "restore of a truncated manifest");
    assert_mentions(&err, &["manifest", "truncat"], "truncated manifest");
}

#[test]
fn wrong_magic_is_rejected() {
    require_root!();
    let td = TestDir::new("magic");
    let img = td.join("img");
    let mut s = Sleeper::spawn(td.path(), 200);
    let pid = s.fx.pid;
    dump_and_reap(&mut s.fx, &img, &[]);

    let manifest = img.join("manifest.img");
    let f = OpenOptions::new().write(true).open(&manifest).unwrap();
    f.write_all_at(b"X", 0).unwrap();
    drop(f);

    let err = restore_must_fail(&img, pid, &s.ticks.to_string_lossy(), "restore of a manifest with a wrong magic");
    assert_mentions(&err, &["magic", "not a floe image"], "wrong magic");
}

#[test]
fn missing_mapped_file_is_reported() {
    require_root!();
    let td = TestDir::new("missing-file");
    let img = td.join("img");
    let mut m = Memstate::spawn(td.path());
    let pid = m.pid();
    dump_and_reap(&mut m.fx, &img, &[]);

    let moved = td.join("private.dat.moved");
    fs::rename(&m.private_file, &moved).unwrap();

    let err = restore_must_fail(&img, pid, &m.ready.to_string_lossy(), "restore with a mapped file missing");
    let name = m.private_file.file_name().unwrap().to_string_lossy().to_lowercase();
    assert_mentions(&err, &[&name], "missing mapped file");
}

#[test]
fn dump_refuses_pipe_fd() {
    require_root!();
    let td = TestDir::new("pipe");
    let mut fx = Spawn::program("sleep-pipe", "sleep", td.path()).arg("1000").stdout(Stdio::piped()).spawn();
    let pid = fx.pid;
    assert!(wait_until(Duration::from_secs(5), || proc_state(pid) == Some('S')));

    let out = dump(pid, &td.join("img"), &[]);
    let err = assert_failed_cleanly(&out, "dump of a process holding a pipe");
    assert_mentions(&err, &["pipe"], "pipe refusal");
    assert!(fx.child_running(), "the refused dump killed the process");
    assert_running_untouched(pid, "after the refused dump");
    std::thread::sleep(Duration::from_millis(300));
    assert!(fx.child_running(), "the process died after the refused dump");
    assert_running_untouched(pid, "300 ms after the refused dump");
    assert!(fx.child().unwrap().stdout.is_some(), "the pipe's read end is still ours");
}

/// A two-thread process (refused before threads were supported) round-trips:
/// both threads come back with their tids and the main thread keeps
/// answering reports.
#[test]
fn multithreaded_process_round_trip() {
    require_root!();
    let td = TestDir::new("threads");
    let img = td.join("img");
    let (ready, report) = (td.join("tt.ready"), td.join("tt.report"));
    let mut fx = Spawn::fixture("twothreads", td.path())
        .arg("--ready")
        .arg(&ready)
        .arg("--report")
        .arg(&report)
        .ready_file(&ready)
        .spawn();
    let pid = fx.pid;
    assert_eq!(thread_count(pid), 2);
    let tids = tids_of(pid);
    let r1 = request_report(pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(report_num(&r1, "threads"), 2);
    assert_eq!(report_num(&r1, "sigusr1_count"), 1);

    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert_eq!(tids_of(pid), tids, "thread ids changed");
    assert_running_untouched(pid, "after the restore");
    let r2 = request_report(pid, &report, libc::SIGUSR1, &fx.log);
    assert_eq!(report_num(&r2, "pid"), pid as u64);
    assert_eq!(report_num(&r2, "threads"), 2);
    assert_eq!(report_num(&r2, "sigusr1_count"), 2);
    std::thread::sleep(Duration::from_millis(200));
    assert!(pid_alive(pid), "restored twothreads died:\n{}", fx.log_contents());
    assert_eq!(tids_of(pid), tids);
}
