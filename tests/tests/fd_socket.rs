//! End-to-end: socket descriptors. Unix socket pairs of every type keep the
//! data queued in both directions (datagram and seqpacket message
//! boundaries included); a unix listener (path or abstract name) and the
//! client a child connected to it keep talking after the restore and the
//! listener takes new clients; a TCP listener and a UDP socket come back on
//! the same port with their options and serve the test. Refused, leaving
//! the process running untouched: an established TCP connection (the
//! message points at --tcp-established), a unix socket whose peer is held
//! outside the dumped tree, and a listener with a connection not yet
//! accepted. Needs root; skipped otherwise.
//!
//! Fixture: `fd_sock` (see tests/fixtures/fd_sock.c), one mode per case.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long the killed original processes may take to vanish (PID 1 reaps
/// orphans slowly here).
const ORIGINALS_GONE: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

struct Sock {
    fx: Fixture,
    ready: PathBuf,
    report_path: PathBuf,
}

impl Sock {
    fn spawn(td: &TestDir, mode: &str, extra: &[&str]) -> Self {
        let ready = td.join("fd_sock.ready");
        let report_path = td.join("fd_sock.report");
        let fx = Spawn::fixture("fd_sock", td.path())
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .arg("--mode")
            .arg(mode)
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

    /// SIGUSR1: a report that consumes nothing.
    fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// SIGUSR2 (pair modes): drains both queues and reports what was read.
    fn drain_report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR2, &self.fx.log)
    }

    /// Dumps (floe kills the tree), reaps the root and waits for `others`
    /// (the rest of the original tree) to vanish, then restores.
    fn dump_restore(&mut self, td: &TestDir, others: &[i32]) {
        let img = td.join("img");
        dump_and_reap(&mut self.fx, &img, &[]);
        for &p in others {
            assert!(
                wait_pid_gone(p, ORIGINALS_GONE),
                "original pid {p} still in /proc {ORIGINALS_GONE:?} after the dump"
            );
        }
        restore_and_adopt(&mut self.fx, &img, &[], Stdio::null());
    }

    /// After a refused dump: still our running child, not stopped or
    /// traced, and answering reports with the same state.
    fn assert_unharmed(&mut self, before: &Report, what: &str) {
        let pid = self.fx.pid;
        assert!(self.fx.child_running(), "{what}: the refused dump killed pid {pid}\nlog:\n{}", self.fx.log_contents());
        assert_running_untouched(pid, what);
        std::thread::sleep(Duration::from_millis(200));
        assert!(self.fx.child_running(), "{what}: pid {pid} died after the refused dump");
        let after = self.report();
        assert_eq!(
            report_num(&after, "sigusr1_count"),
            report_num(before, "sigusr1_count") + 1,
            "{what}: every SIGUSR1 must be seen exactly once"
        );
        assert!(
            report_num(&after, "loops") > report_num(before, "loops"),
            "{what}: the main loop did not advance: {before:?} -> {after:?}"
        );
        assert_reports_equal(before, &after, &["loops"], what);
    }
}

/// Target of /proc/PID/fd/FD, e.g. "socket:[1234]".
fn fd_link(pid: i32, fd: u64) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/fd/{fd}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// Runs `floe dump` expecting a clean refusal without an image; returns the
/// lower-cased message.
fn refused_dump(pid: i32, dir: &Path, what: &str) -> String {
    let out = dump(pid, dir, &[]);
    let err = assert_failed_cleanly(&out, what);
    for f in ["manifest.img", "pages.img"] {
        assert!(!dir.join(f).exists(), "{what}: {} exists after a refused dump", dir.join(f).display());
    }
    err
}

// ---------------------------------------------------------------------------
// socket pairs

/// Queued data in both directions survives (checked without consuming it
/// first, then drained), message boundaries included for `mode`s other
/// than stream, and the pair still works afterwards.
fn pair_round_trip(mode: &str, a2b_sizes: &str, b2a_sizes: &str) {
    let td = TestDir::new(mode);
    let mut s = Sock::spawn(&td, mode, &[]);
    let r0 = s.report();
    let stream = mode == "pair-stream";
    let dgram = mode == "pair-dgram";
    // FIONREAD: the whole queue (stream, seqpacket) or its first datagram.
    let (inq_a, inq_b) = if dgram { (7, 11) } else { (307, 24012) };
    assert_eq!((report_num(&r0, "inq_a"), report_num(&r0, "inq_b")), (inq_a, inq_b), "before the dump: {r0:?}");

    s.dump_restore(&td, &[]);
    let r1 = s.report();
    assert_eq!(
        (report_num(&r1, "inq_a"), report_num(&r1, "inq_b")),
        (inq_a, inq_b),
        "queued bytes after the restore: {r1:?}"
    );
    let r2 = s.drain_report();
    for dir in ["a2b", "b2a"] {
        let k = |s: &str| format!("{dir}_{s}");
        assert_eq!(r2[&k("len")], r2[&k("want_len")], "{dir}: bytes read after the restore: {r2:?}");
        assert_eq!(r2[&k("fnv")], r2[&k("want_fnv")], "{dir}: contents read after the restore: {r2:?}");
        if !stream {
            assert_eq!(r2[&k("sizes")], r2[&k("want_sizes")], "{dir}: message boundaries: {r2:?}");
        }
    }
    assert_eq!(r2["a2b_want_sizes"], a2b_sizes, "{r2:?}");
    assert_eq!(r2["b2a_want_sizes"], b2a_sizes, "{r2:?}");
    assert_eq!(r2["roundtrip"], "1", "the restored pair does not carry new messages: {r2:?}");
}

#[test]
fn socketpair_stream_keeps_queued_data_both_ways() {
    require_root!();
    pair_round_trip("pair-stream", "11,20000,1,4000", "7,300");
}

#[test]
fn socketpair_dgram_keeps_message_boundaries() {
    require_root!();
    pair_round_trip("pair-dgram", "11,0,20000,1,4000", "7,300");
}

#[test]
fn socketpair_seqpacket_keeps_message_boundaries() {
    require_root!();
    pair_round_trip("pair-seqpacket", "11,0,20000,1,4000", "7,300");
}

/// `floe dump --leave-running` only peeks: the process still reads every
/// queued byte and message itself afterwards.
fn pair_survives_leave_running(mode: &str) {
    let td = TestDir::new(&format!("{mode}-live"));
    let mut s = Sock::spawn(&td, mode, &[]);
    let r0 = s.report();
    let out = dump(s.pid(), &td.join("img"), &["--leave-running"]);
    assert_ok(&out, &format!("dump --leave-running of {mode}"));
    assert!(s.fx.child_running(), "--leave-running killed the process");
    assert_running_untouched(s.pid(), "after dump --leave-running");
    let r1 = s.report();
    assert_reports_equal(&r0, &r1, &["loops"], "queues after dump --leave-running");
    let r2 = s.drain_report();
    for dir in ["a2b", "b2a"] {
        let k = |s: &str| format!("{dir}_{s}");
        assert_eq!(r2[&k("len")], r2[&k("want_len")], "{dir}: {r2:?}");
        assert_eq!(r2[&k("fnv")], r2[&k("want_fnv")], "{dir}: {r2:?}");
        if mode != "pair-stream" {
            assert_eq!(r2[&k("sizes")], r2[&k("want_sizes")], "{dir}: {r2:?}");
        }
    }
    assert_eq!(r2["roundtrip"], "1", "{r2:?}");
}

#[test]
fn dump_leave_running_does_not_consume_queues() {
    require_root!();
    pair_survives_leave_running("pair-stream");
    pair_survives_leave_running("pair-dgram");
}

// ---------------------------------------------------------------------------
// unix listener with a connected child

enum UnixName {
    Path(PathBuf),
    Abstract(String),
}

impl UnixName {
    fn connect(&self) -> UnixStream {
        match self {
            UnixName::Path(p) => UnixStream::connect(p).unwrap_or_else(|e| panic!("connect {}: {e}", p.display())),
            UnixName::Abstract(n) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(n.as_bytes()).unwrap();
                UnixStream::connect_addr(&addr).unwrap_or_else(|e| panic!("connect @{n}: {e}"))
            }
        }
    }
}

/// One line to the listener, expecting "echo: LINE" and the server closing.
fn unix_echo(name: &UnixName, line: &str) {
    let mut c = name.connect();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, format!("echo: {line}\n"), "answer of the unix listener");
}

fn unix_listener_case(td: &TestDir, name: UnixName) {
    let args: Vec<String> = match &name {
        UnixName::Path(p) => vec!["--path".into(), p.to_string_lossy().into_owned()],
        UnixName::Abstract(n) => vec!["--abstract".into(), n.clone()],
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = Sock::spawn(td, "unix-listener", &args);
    let child = report_num(&s.ready_info(), "child_pid") as i32;
    let r0 = s.report();
    assert_eq!(r0["child_roundtrip"], "1", "before the dump: {r0:?}");
    unix_echo(&name, "before");
    assert!(wait_until(IO_TIMEOUT, || report_num(&s.report(), "served") == 1), "the first client was not counted");

    s.dump_restore(td, &[child]);
    let _child_guard = KillPidOnDrop::new(child);
    assert!(pid_alive(child), "the child (pid {child}) was not restored");
    if let UnixName::Path(p) = &name {
        let m = fs::metadata(p).unwrap_or_else(|e| panic!("{} after the restore: {e}", p.display()));
        assert!(m.file_type().is_socket(), "{} is not a socket after the restore", p.display());
    }
    let r1 = s.report();
    assert_eq!(r1["child_roundtrip"], "1", "parent and child cannot talk after the restore: {r1:?}");
    assert_eq!(report_num(&r1, "served"), 1, "{r1:?}");
    unix_echo(&name, "after the restore");
    let r2 = s.report();
    assert_eq!(report_num(&r2, "served"), 2, "{r2:?}");
    assert_eq!(r2["child_roundtrip"], "1", "{r2:?}");
}

#[test]
fn unix_listener_and_child_client_keep_talking() {
    require_root!();
    let td = TestDir::new("unix-listener");
    let path = td.join("srv.sock");
    unix_listener_case(&td, UnixName::Path(path));
}

#[test]
fn abstract_unix_listener_and_child_client_keep_talking() {
    require_root!();
    let name = format!("floe-e2e-{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos());
    unix_listener_case(&TestDir::new("unix-abstract"), UnixName::Abstract(name));
}

// ---------------------------------------------------------------------------
// TCP and UDP

fn tcp_echo(host: &str, port: u16, line: &str) {
    let mut c = TcpStream::connect((host, port)).unwrap_or_else(|e| panic!("connect {host}:{port}: {e}"));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, format!("echo: {line}\n"), "answer of the TCP listener on {host}:{port}");
}

fn tcp_listener_case(tag: &str, family: &str, host: &str) {
    let td = TestDir::new(tag);
    let mut s = Sock::spawn(&td, "tcp-listener", &["--family", family]);
    let port = report_num(&s.ready_info(), "port") as u16;
    tcp_echo(host, port, "before");
    assert!(wait_until(IO_TIMEOUT, || report_num(&s.report(), "served") == 1), "the first client was not counted");
    let r0 = s.report();
    for (k, v) in [("nonblock", "1"), ("reuseaddr", "1"), ("nodelay", "1")] {
        assert_eq!(r0[k], v, "{k} before the dump: {r0:?}");
    }

    s.dump_restore(&td, &[]);
    let r1 = s.report();
    assert_eq!(report_num(&r1, "port"), port as u64, "{r1:?}");
    assert_reports_equal(&r0, &r1, &["loops"], "listener state after the restore");
    tcp_echo(host, port, "after the restore");
    let r2 = s.report();
    assert_eq!(report_num(&r2, "served"), 2, "{r2:?}");
}

#[test]
fn tcp_listener_accepts_after_restore() {
    require_root!();
    tcp_listener_case("tcp-listener", "4", "127.0.0.1");
}

#[test]
fn tcp6_listener_accepts_after_restore() {
    require_root!();
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED tcp6_listener_accepts_after_restore: no IPv6 loopback");
        return;
    }
    tcp_listener_case("tcp6-listener", "6", "::1");
}

#[test]
fn udp_socket_receives_after_restore() {
    require_root!();
    let td = TestDir::new("udp");
    let mut s = Sock::spawn(&td, "udp", &[]);
    let port = report_num(&s.ready_info(), "port") as u16;
    let me = UdpSocket::bind("127.0.0.1:0").unwrap();
    me.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let echo = |msg: &str| {
        me.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = me.recv_from(&mut buf).unwrap_or_else(|e| panic!("no answer from udp port {port}: {e}"));
        assert_eq!(from.port(), port);
        assert_eq!(&buf[..n], format!("echo: {msg}").as_bytes());
    };
    echo("before");
    assert_eq!(report_num(&s.report(), "received"), 1);

    s.dump_restore(&td, &[]);
    let r1 = s.report();
    assert_eq!((report_num(&r1, "port"), report_num(&r1, "received")), (port as u64, 1), "{r1:?}");
    echo("after the restore");
    assert_eq!(report_num(&s.report(), "received"), 2);
}

// ---------------------------------------------------------------------------
// refusals

#[test]
fn refuses_established_tcp_connection() {
    require_root!();
    let td = TestDir::new("tcp-established");
    let mut s = Sock::spawn(&td, "tcp-established", &[]);
    let r0 = s.report();
    let err = refused_dump(s.pid(), &td.join("img"), "dump of an established TCP connection");
    assert_mentions(&err, &["--tcp-established"], "established TCP refusal");
    assert_mentions(&err, &["established"], "established TCP refusal");
    s.assert_unharmed(&r0, "after the refused TCP dump");
}

#[test]
fn refuses_unix_peer_outside_the_tree() {
    require_root!();
    let td = TestDir::new("unix-outside");
    let path = td.join("outside.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut s = Sock::spawn(&td, "unix-client", &["--path", path.to_str().unwrap()]);
    let (peer, _) = listener.accept().unwrap();
    let fd = report_num(&s.ready_info(), "sock_fd");
    let link = fd_link(s.pid(), fd);
    let peer_link = format!(
        "socket:[{}]",
        fs::metadata(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            peer.as_raw_fd()
        }))
        .unwrap()
        .ino()
    );
    let r0 = s.report();

    let what = "dump of a unix socket connected outside the tree";
    let err = refused_dump(s.pid(), &td.join("img"), what);
    assert_mentions(&err, &["outside"], what);
    assert_mentions(&err, &[&link], &format!("{what}: names the socket"));
    assert_mentions(&err, &[&peer_link], &format!("{what}: names the peer"));
    assert_mentions(&err, &[&std::process::id().to_string()], &format!("{what}: names the holder"));
    assert_mentions(&err, &["--ext-unix-sk"], what);
    s.assert_unharmed(&r0, &format!("after the refused {what}"));
    drop(peer);
}

#[test]
fn refuses_listener_with_unaccepted_connection() {
    require_root!();
    let td = TestDir::new("tcp-pending");
    let mut s = Sock::spawn(&td, "tcp-listener", &["--no-accept"]);
    let port = report_num(&s.ready_info(), "port") as u16;
    let _pending = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let r0 = s.report();
    let what = "dump of a listener with a pending connection";
    let err = refused_dump(s.pid(), &td.join("img"), what);
    assert_mentions(&err, &["accept"], what);
    s.assert_unharmed(&r0, &format!("after the refused {what}"));
}
