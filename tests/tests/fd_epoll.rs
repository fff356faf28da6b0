//! End-to-end: epoll and inotify descriptors survive `floe dump` / `floe
//! restore` (registrations with their data, edge-triggered and oneshot
//! modes, nested epolls; inotify watches with their watch descriptor
//! numbers), and dumps floe cannot restore faithfully are refused with the
//! process left running. Needs root; skipped otherwise.
//!
//! Fixtures: `fd_epoll` and `fd_epoll_inotify` (main loop in
//! `fixtures/hold.h`); their SIGUSR1 reports run self-checks that leave the
//! state unchanged, so a report before the dump and one after the restore
//! must be equal.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A fixture built on `fixtures/hold.h`.
struct Holder {
    fx: Fixture,
    ready: PathBuf,
    report_path: PathBuf,
}

impl Holder {
    fn spawn(name: &str, td: &TestDir, extra: &[&str]) -> Self {
        let ready = td.join(format!("{name}.ready"));
        let report_path = td.join(format!("{name}.report"));
        let fx = Spawn::fixture(name, td.path())
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .args(extra)
            .ready_file(&ready)
            .spawn();
        Self { fx, ready, report_path }
    }

    fn pid(&self) -> i32 {
        self.fx.pid
    }

    fn ready_info(&self) -> Report {
        read_report(&self.ready)
    }

    fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// Dumps (floe kills the original), restores, and checks the restored
    /// process answers with the same report as before.
    fn round_trip(&mut self, td: &TestDir, before: &Report) -> Report {
        let img = td.join("img");
        dump_and_reap(&mut self.fx, &img, &[]);
        restore_and_adopt(&mut self.fx, &img, &[], Stdio::null());
        let after = self.report();
        eprintln!("before: {before:#?}\nafter: {after:#?}");
        assert_eq!(report_num(&after, "pid"), self.pid() as u64);
        assert_reports_equal(before, &after, &["loops"], &format!("{} before dump vs after restore", self.fx.name));
        after
    }

    /// After a refused dump: still our running child, not stopped or
    /// traced, and reporting the same state as `before`.
    fn assert_unharmed(&mut self, before: &Report, what: &str) {
        let pid = self.pid();
        assert!(self.fx.child_running(), "{what}: the refused dump killed pid {pid}\nlog:\n{}", self.fx.log_contents());
        assert_running_untouched(pid, what);
        let after = self.report();
        assert_eq!(report_num(&after, "sigusr1_count"), report_num(before, "sigusr1_count") + 1, "{what}");
        assert_reports_equal(before, &after, &["loops"], what);
    }
}

/// `floe dump` without `--leave-running` must fail cleanly and leave no image.
fn refused_dump(pid: i32, dir: &Path, what: &str) -> String {
    let out = dump(pid, dir, &[]);
    let err = assert_failed_cleanly(&out, what);
    for f in ["manifest.img", "pages.img"] {
        assert!(!dir.join(f).exists(), "{what}: {f} exists after a refused dump");
    }
    err
}

/// Level-triggered, edge-triggered, armed and fired oneshot registrations,
/// a descriptor registered under two numbers, and an epoll inside an epoll
/// that comes later in the image.
#[test]
fn epoll_round_trip() {
    require_root!();
    let td = TestDir::new("fd-epoll");
    let mut h = Holder::spawn("fd_epoll", &td, &[]);
    let before = h.report();
    // The checks themselves behave on the original (control run).
    let expect = [
        ("ready", "1111222233334444,1111222233334445,5555000000000005"),
        ("inner_ready", "6666000000000006"),
        ("et_first", "1"),
        ("et_second", "0"),
        ("os_first", "1"),
        ("os_second", "0"),
        ("os_rearm", "0"),
        ("os3_before", "0"),
        ("os3_mod", "0"),
        ("os3_fires", "1"),
        ("excl_fires", "1"),
        ("del_dup", "0"),
        ("add_dup", "0"),
    ];
    for (k, v) in expect {
        assert_eq!(before.get(k).map(String::as_str), Some(v), "original fd_epoll: {k} in {before:#?}");
    }
    // Modes as the kernel keeps them: LT 0x19 (EPOLLIN|ERR|HUP), ET, fired
    // oneshot (only EPOLLONESHOT left), armed oneshot, EPOLLEXCLUSIVE.
    let items = &before["outer_items"];
    for needle in [":19:1111222233334444", ":80000019:2222000000000002", ":40000000:3333000000000003"] {
        assert!(items.contains(needle), "original outer_items {items} lacks {needle}");
    }
    for needle in [":40000019:4444000000000004", ":10000019:7777000000000007", "40:19:1111222233334445"] {
        assert!(items.contains(needle), "original outer_items {items} lacks {needle}");
    }
    let after = h.round_trip(&td, &before);
    for (k, v) in expect {
        assert_eq!(after.get(k).map(String::as_str), Some(v), "restored fd_epoll: {k} in {after:#?}");
    }
    // A second round of checks on the restored process still agrees.
    let again = h.report();
    assert_reports_equal(&before, &again, &["loops"], "second report after restore");
    assert!(pid_alive(h.pid()), "restored fd_epoll died:\n{}", h.fx.log_contents());
}

/// Watch descriptors 1 and 3 (2 removed) are reproduced, and a file created
/// in a watched directory after the restore is reported with the right wd.
#[test]
fn inotify_round_trip_keeps_watch_descriptors() {
    require_root!();
    let td = TestDir::new("fd-inotify");
    let watched = td.join("watched");
    fs::create_dir(&watched).unwrap();
    let mut h = Holder::spawn("fd_epoll_inotify", &td, &["--dir", watched.to_str().unwrap()]);
    let before = h.report();
    assert_eq!(before["events"], "1:100:probe,1:200:probe,3:100:probe", "original: {before:#?}");
    assert_eq!(before["watches"], "1:300,3:100", "original: {before:#?}");
    assert_eq!(before["queued_after"], "0");
    assert_eq!(before["nonblock"], "1");
    let after = h.round_trip(&td, &before);
    assert_eq!(after["events"], "1:100:probe,1:200:probe,3:100:probe", "restored: {after:#?}");
    assert_eq!(after["watches"], "1:300,3:100", "restored: {after:#?}");
    assert!(pid_alive(h.pid()), "restored fd_epoll_inotify died:\n{}", h.fx.log_contents());
}

/// Unread events cannot be put back: the dump is refused and the process
/// keeps running with its event still queued.
#[test]
fn inotify_with_queued_events_is_refused() {
    require_root!();
    let td = TestDir::new("fd-inotify-queued");
    let watched = td.join("watched");
    fs::create_dir(&watched).unwrap();
    let mut h = Holder::spawn("fd_epoll_inotify", &td, &["--dir", watched.to_str().unwrap(), "--mode", "queued"]);
    let fd = h.ready_info()["fd"].clone();
    let before = h.report();
    assert!(report_num(&before, "queued") > 0, "the fixture has no queued event: {before:?}");
    let err = refused_dump(h.pid(), &td.join("img"), "dump of an inotify with queued events");
    assert_mentions(&err, &["queued"], "queued-events refusal");
    assert_mentions(&err, &[&format!("fd {fd}")], "queued-events refusal names the fd");
    h.assert_unharmed(&before, "after the refused inotify dump");
}

/// A watch on a deleted (but still open) file cannot be re-created by path:
/// refused, process unharmed.
#[test]
fn inotify_on_deleted_file_is_refused() {
    require_root!();
    let td = TestDir::new("fd-inotify-deleted");
    let watched = td.join("watched");
    fs::create_dir(&watched).unwrap();
    let mut h = Holder::spawn("fd_epoll_inotify", &td, &["--dir", watched.to_str().unwrap(), "--mode", "deleted"]);
    let info = h.ready_info();
    let before = h.report();
    assert_eq!(report_num(&before, "queued"), 0, "{before:?}");
    let err = refused_dump(h.pid(), &td.join("img"), "dump of an inotify watching a deleted file");
    assert_mentions(&err, &["deleted", "cannot be found"], "deleted-watch refusal");
    assert_mentions(&err, &[&format!("fd {}", info["fd"])], "deleted-watch refusal names the fd");
    assert_mentions(&err, &[&format!("watch {}", info["wd4"])], "deleted-watch refusal names the wd");
    std::thread::sleep(Duration::from_millis(100));
    h.assert_unharmed(&before, "after the refused inotify dump");
}
