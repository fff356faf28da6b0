//! End-to-end: eventfd, signalfd and timerfd descriptors survive a dump and
//! restore through the floe binary. The `fd_event` fixture checks its own
//! descriptors from the inside (see tests/fixtures/fd_event.c): one report
//! before the dump (non-destructive), the next after the restore (reads the
//! descriptors). Needs root; skipped otherwise.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The `fd_event` fixture for one `--kind`.
struct EventFixture {
    fx: Fixture,
    report_path: PathBuf,
}

impl EventFixture {
    fn spawn(td: &TestDir, kind: &str) -> Self {
        let ready = td.join("fd_event.ready");
        let report_path = td.join("fd_event.report");
        let fx = Spawn::fixture("fd_event", td.path())
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .arg("--kind")
            .arg(kind)
            .ready_file(&ready)
            .spawn();
        Self { fx, report_path }
    }

    fn pid(&self) -> i32 {
        self.fx.pid
    }

    fn report(&self) -> Report {
        let r = request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log);
        eprintln!("report: {r:?}");
        r
    }
}

/// CLOCK_MONOTONIC in ns (the fixture reports times on the same clock).
fn mono_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is valid for writes of one timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn num(r: &Report, key: &str) -> i64 {
    r.get(key)
        .unwrap_or_else(|| panic!("report has no {key}: {r:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("report key {key} is not a number: {r:?}"))
}

fn assert_keys(r: &Report, expected: &[(&str, &str)], what: &str) {
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, v)| r.get(*k).map(String::as_str) != Some(*v))
        .map(|(k, v)| format!("  {k}: expected {v}, got {:?}", r.get(*k)))
        .collect();
    assert!(wrong.is_empty(), "{what}:\n{}\nreport: {r:?}", wrong.join("\n"));
}

/// Whether `sig` is pending for the whole process (ShdPnd in /proc/PID/status).
fn shared_pending(pid: i32, sig: i32) -> bool {
    let v = status_field(pid, "ShdPnd").unwrap_or_default();
    u64::from_str_radix(&v, 16).map(|m| m & (1u64 << (sig - 1)) != 0).unwrap_or(false)
}

fn send_pending_sigusr2(pid: i32) {
    send_signal(pid, libc::SIGUSR2).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || shared_pending(pid, libc::SIGUSR2)),
        "SIGUSR2 (blocked) did not show up as pending for pid {pid}"
    );
}

/// A counter eventfd with 5 comes back with 5 (and O_NONBLOCK); a blocking
/// semaphore eventfd with 3 comes back in semaphore mode (three reads of 1);
/// a count above u32::MAX survives.
#[test]
fn eventfd_count_and_semaphore_survive() {
    require_root!();
    let td = TestDir::new("fd-eventfd");
    let img = td.join("img");
    let mut f = EventFixture::spawn(&td, "eventfd");

    let before = f.report();
    assert_keys(
        &before,
        &[
            ("plain_count", "5"),
            ("sem_count", "3"),
            ("big_count", "4294967301"),
            ("plain_semaphore", "0"),
            ("sem_semaphore", "1"),
            ("plain_nonblock", "1"),
            ("sem_nonblock", "0"),
            ("plain_cloexec", "1"),
            ("sem_cloexec", "0"),
        ],
        "eventfds before the dump",
    );
    assert!(!before.contains_key("checked"));

    dump_and_reap(&mut f.fx, &img, &[]);
    restore_and_adopt(&mut f.fx, &img, &[], Stdio::null());

    let after = f.report();
    let checks = ["checked", "plain_read", "plain_again_errno", "plain_reuse", "sem_reads", "big_read"];
    assert_reports_equal(&before, &after, &checks, "eventfd state before the dump vs after the restore");
    assert_keys(
        &after,
        &[
            ("checked", "1"),
            ("plain_read", "5"),
            ("plain_again_errno", &libc::EAGAIN.to_string()),
            ("plain_reuse", "3"),
            ("sem_reads", "1,1,1"),
            ("big_read", "4294967301"),
        ],
        "eventfds read after the restore",
    );
    let later = f.report();
    assert_keys(&later, &[("plain_count", "0"), ("sem_count", "0"), ("big_count", "0")], "eventfds drained");
    assert!(pid_alive(f.pid()), "restored fixture died:\n{}", f.fx.log_contents());
}

/// A signalfd for SIGUSR2 and SIGRTMIN+2 (both blocked): the signals pending
/// at the dump (a SIGUSR2 from the test, a SIGRTMIN+2 with a value queued by
/// the fixture) are read through it after the restore, and so is a SIGUSR2
/// sent after the restore.
#[test]
fn signalfd_reads_pending_and_new_signals() {
    require_root!();
    let td = TestDir::new("fd-signalfd");
    let img = td.join("img");
    let mut f = EventFixture::spawn(&td, "signalfd");
    let pid = f.pid();

    send_pending_sigusr2(pid);
    let before = f.report();
    let rt = num(&before, "rt_signo");
    let mask = (1u64 << (libc::SIGUSR2 - 1)) | (1u64 << (rt - 1));
    assert_keys(
        &before,
        &[
            ("sigmask", &format!("{mask:016x}")),
            ("blk_sigmask", &format!("{:016x}", 1u64 << rt)),
            ("nonblock", "1"),
            ("blk_nonblock", "0"),
            ("pending_usr2", "1"),
            ("pending_rt", "1"),
        ],
        "signalfds before the dump",
    );

    dump_and_reap(&mut f.fx, &img, &[]);
    restore_and_adopt(&mut f.fx, &img, &[], Stdio::null());

    let after = f.report();
    let drained = ["readable", "usr2_total", "rt_total", "rt_value", "rt_code", "pending_usr2_after"];
    assert_reports_equal(&before, &after, &drained, "signalfd state before the dump vs after the restore");
    assert_keys(
        &after,
        &[
            ("readable", "1"),
            ("usr2_total", "1"),
            ("rt_total", "1"),
            ("rt_value", "4242"),
            ("rt_code", &libc::SI_QUEUE.to_string()),
            ("pending_usr2_after", "0"),
        ],
        "signals pending at the dump, read through the restored signalfd",
    );

    send_pending_sigusr2(pid);
    let again = f.report();
    assert_keys(
        &again,
        &[("readable", "1"), ("usr2_total", "2"), ("rt_total", "1"), ("pending_usr2_after", "0")],
        "SIGUSR2 sent after the restore, read through the signalfd",
    );
    assert!(pid_alive(pid), "restored fixture died:\n{}", f.fx.log_contents());
}

/// Timers: a periodic 100 ms timer keeps firing; a 2 s one-shot fires about
/// 2 s after the dump (never early); an expired unread one-shot still holds
/// its tick; an unread periodic 50 ms timer keeps the expirations counted
/// before the dump; an absolute CLOCK_REALTIME timer with
/// TFD_TIMER_CANCEL_ON_SET keeps its flags and fires; a disarmed timer keeps
/// its interval.
#[test]
fn timerfd_timers_keep_running() {
    require_root!();
    let td = TestDir::new("fd-timerfd");
    let img = td.join("img");
    let mut f = EventFixture::spawn(&td, "timerfd");
    let pid = f.pid();

    let before = f.report();
    assert_keys(
        &before,
        &[
            ("p_clockid", &libc::CLOCK_MONOTONIC.to_string()),
            ("o_clockid", &libc::CLOCK_MONOTONIC.to_string()),
            ("x_clockid", &libc::CLOCK_BOOTTIME.to_string()),
            ("q_clockid", &libc::CLOCK_MONOTONIC.to_string()),
            ("a_clockid", &libc::CLOCK_REALTIME.to_string()),
            ("d_clockid", &libc::CLOCK_MONOTONIC.to_string()),
            ("p_flags", "00"),
            ("o_flags", "00"),
            ("a_flags", "03"),
            ("p_nonblock", "1"),
            ("o_nonblock", "0"),
            ("x_nonblock", "1"),
            ("a_nonblock", "1"),
            ("x_readable", "1"),
            ("p_interval_ns", "100000000"),
            ("d_value_ns", "0"),
            ("d_interval_ns", "300000000"),
            ("o_fired_ns", "0"),
            ("a_fired_ns", "0"),
        ],
        "timerfds before the dump",
    );

    // Let the unread 50 ms timer pile up expirations.
    std::thread::sleep(Duration::from_millis(300));
    let t_dump = mono_ns();
    dump_and_reap(&mut f.fx, &img, &[]);
    restore_and_adopt(&mut f.fx, &img, &[], Stdio::null());
    eprintln!("dump + restore took {} ms", (mono_ns() - t_dump) / 1_000_000);

    let after = f.report();
    let dynamic = [
        "now_ns",
        "p_total",
        "p_reads",
        "o_fired_ns",
        "o_ticks",
        "a_fired_ns",
        "a_ticks",
        "checked",
        "x_read",
        "x_readable_after",
        "q_read",
        "q_read_ns",
    ];
    assert_reports_equal(&before, &after, &dynamic, "timerfd state before the dump vs after the restore");
    assert_keys(&after, &[("checked", "1"), ("x_read", "1"), ("x_readable_after", "0")], "expired one-shot");

    // q was never read: at least the periods that elapsed before the dump,
    // at most those that elapsed until the read.
    let period = 50_000_000;
    let q_armed = num(&after, "q_armed_ns");
    let q_read = num(&after, "q_read");
    let min = (t_dump - q_armed) / period - 1;
    let max = (num(&after, "q_read_ns") - q_armed) / period + 1;
    assert!(
        (min..=max).contains(&q_read),
        "unread 50 ms timer: read {q_read} expirations, expected {min}..={max} (armed {} ms before the dump)",
        (t_dump - q_armed) / 1_000_000
    );

    // Wait for the one-shots.
    let deadline = Instant::now() + Duration::from_secs(10);
    let fired = loop {
        let r = f.report();
        if num(&r, "o_fired_ns") > 0 && (num(&r, "a_fired_ns") > 0 || num(&r, "a_errno") != 0) {
            break r;
        }
        assert!(Instant::now() < deadline, "the one-shot timers did not fire within 10 s of the restore: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let ms = |ns: i64| ns / 1_000_000;
    let o_fired = num(&fired, "o_fired_ns");
    assert_eq!(num(&fired, "o_ticks"), 1, "{fired:?}");
    assert!(
        o_fired - num(&fired, "o_armed_ns") >= 1_990_000_000,
        "the 2 s one-shot fired early: {} ms after it was armed",
        ms(o_fired - num(&fired, "o_armed_ns"))
    );
    assert!(
        (1_000_000_000..=4_000_000_000).contains(&(o_fired - t_dump)),
        "the 2 s one-shot fired {} ms after the dump, expected 1000..=4000 ms",
        ms(o_fired - t_dump)
    );
    assert_eq!(num(&fired, "a_errno"), 0, "absolute realtime timer: read failed: {fired:?}");
    assert_eq!(num(&fired, "a_ticks"), 1, "{fired:?}");
    let a_fired = num(&fired, "a_fired_ns");
    assert!(
        a_fired - num(&fired, "a_armed_ns") >= 2_400_000_000 && a_fired - t_dump <= 5_000_000_000,
        "the absolute 2.5 s timer fired {} ms after it was armed, {} ms after the dump",
        ms(a_fired - num(&fired, "a_armed_ns")),
        ms(a_fired - t_dump)
    );

    // The periodic timer keeps firing at its rate.
    let p1 = num(&fired, "p_total");
    assert!(p1 >= num(&before, "p_total"), "periodic tick count went back: {before:?} -> {fired:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let last = f.report();
    let dp = num(&last, "p_total") - p1;
    let dt = num(&last, "now_ns") - num(&fired, "now_ns");
    assert!(
        dp >= 5 && dp <= dt / 100_000_000 + 1,
        "periodic 100 ms timer: {dp} expirations in {} ms after the restore",
        ms(dt)
    );
    assert_keys(&last, &[("a_flags", "03"), ("d_interval_ns", "300000000"), ("d_value_ns", "0")], "after firing");
    assert!(pid_alive(pid), "restored fixture died:\n{}", f.fx.log_contents());
}
