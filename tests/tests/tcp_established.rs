//! Established TCP connections (issue 6): `floe dump --tcp-established`
//! saves them with TCP_REPAIR and `floe restore --tcp-established` brings
//! them back, so a client holding a connection to the dumped server
//! carries on without noticing; without the flag they are refused, and
//! `--tcp-close` restores them closed.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: TCP_REPAIR needs root");
            return;
        }
    };
}

/// Removes the network lock a `--tcp-established` dump into `img` left in
/// place, when the test ends before its restore did (a failing test).
struct LockGuard(std::path::PathBuf);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Ok(img) = floe_engine::image::ImageReader::open(&self.0) else { return };
        if !img.manifest.net_lock.is_empty() {
            let _ = floe_netfilter::remove_table(&img.manifest.net_lock);
        }
    }
}

/// Dumps the server with `--tcp-established` into `td/img` and restores it
/// the same way; the returned guard removes the dump's network lock if the
/// test ends before the restore did.
fn dump_and_restore(fx: &mut Fixture, td: &tempfile::TempDir, what: &str) -> LockGuard {
    let img = td.path().join("img");
    let lock = LockGuard(img.clone());
    assert_ok(&dump(fx.pid, &img, &["--tcp-established"]), &format!("dump of {what}"));
    fx.reap(Duration::from_secs(5));
    assert_ok(&restore_detached(&img, &["--tcp-established"], std::process::Stdio::null()), "restore");
    fx.adopt_restored();
    lock
}

fn port_of(dir: &std::path::Path) -> u16 {
    let text = std::fs::read_to_string(dir.join("ready")).unwrap();
    text.lines().find_map(|l| l.strip_prefix("port=")).unwrap().parse().unwrap()
}

/// Sends `msg` and reads back its uppercased echo.
fn echo(c: &mut TcpStream, msg: &str) -> String {
    c.write_all(msg.as_bytes()).unwrap();
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

fn start_server(td: &tempfile::TempDir) -> (Fixture, TcpStream) {
    start_server_on(td, false)
}

/// The echo server over IPv4 (127.0.0.1) or IPv6 (::1), and a client connected to it.
fn start_server_on(td: &tempfile::TempDir, v6: bool) -> (Fixture, TcpStream) {
    let fx = Spawn::fixture("tcpecho", td.path())
        .arg(td.path())
        .env("TCPECHO_V6", if v6 { "1" } else { "0" })
        .ready_file(td.path().join("ready"))
        .spawn();
    let host = if v6 { "::1" } else { "127.0.0.1" };
    let mut c = TcpStream::connect((host, port_of(td.path()))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(echo(&mut c, "hello"), "HELLO");
    (fx, c)
}

#[test]
fn established_connection_refused_without_flag() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let (fx, mut c) = start_server(&td);
    let img = td.path().join("img");
    let _lock = LockGuard(img.clone());
    let out = dump(fx.pid, &img, &[]);
    let err = assert_failed_cleanly(&out, "dump of a server with an established connection");
    assert_mentions(&err, &["established TCP connection", "--tcp-established"], "refusal");
    assert_running_untouched(fx.pid, "after the refused dump");
    assert_eq!(echo(&mut c, "still"), "STILL");
}

#[test]
fn established_connection_survives_dump_and_restore() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let (mut fx, mut c) = start_server(&td);
    let img = td.path().join("img");
    let _lock = LockGuard(img.clone());
    assert_ok(&dump(fx.pid, &img, &["--tcp-established"]), "dump --tcp-established");
    fx.reap(Duration::from_secs(5));
    // Without the flag, restore refuses and says what to do.
    let out = restore_detached(&img, &[], std::process::Stdio::null());
    let err = assert_failed_cleanly(&out, "restore without --tcp-established");
    assert_mentions(&err, &["--tcp-established", "--tcp-close"], "restore refusal");
    assert_ok(&restore_detached(&img, &["--tcp-established"], std::process::Stdio::null()), "restore");
    fx.adopt_restored();
    // The client never reconnected: same connection, data flows both ways.
    assert_eq!(echo(&mut c, "world"), "WORLD");
    assert_eq!(echo(&mut c, &"x".repeat(100_000)), "X".repeat(100_000));
    // A second dump/restore of the restored server works too.
    let img2 = td.path().join("img2");
    let _lock2 = LockGuard(img2.clone());
    assert_ok(&dump(fx.pid, &img2, &["--tcp-established"]), "second dump");
    assert!(wait_pid_gone(fx.pid, Duration::from_secs(5)));
    assert_ok(&restore_detached(&img2, &["--tcp-established"], std::process::Stdio::null()), "second restore");
    assert_eq!(echo(&mut c, "again"), "AGAIN");
}

#[test]
fn ipv6_connection_survives_dump_and_restore() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let (mut fx, mut c) = start_server_on(&td, true);
    assert!(c.peer_addr().unwrap().is_ipv6());
    let _lock = dump_and_restore(&mut fx, &td, "an IPv6 connection");
    assert_eq!(echo(&mut c, "over six"), "OVER SIX");
}

#[test]
fn leave_running_keeps_the_connection_working() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let (fx, mut c) = start_server(&td);
    let img = td.path().join("img");
    let _lock = LockGuard(img.clone());
    assert_ok(&dump(fx.pid, &img, &["--tcp-established", "--leave-running"]), "dump --leave-running");
    assert_running_untouched(fx.pid, "after dump --leave-running");
    assert_eq!(echo(&mut c, "after"), "AFTER");
}

#[test]
fn tcp_close_restores_the_connection_closed() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let (mut fx, _c) = start_server(&td);
    let img = td.path().join("img");
    let _lock = LockGuard(img.clone());
    assert_ok(&dump(fx.pid, &img, &["--tcp-established"]), "dump");
    fx.reap(Duration::from_secs(5));
    assert_ok(&restore_detached(&img, &["--tcp-close"], std::process::Stdio::null()), "restore --tcp-close");
    fx.adopt_restored();
    // Its read fails at once, and the echo server exits.
    assert!(wait_pid_gone(fx.pid, Duration::from_secs(10)), "the server did not see its connection closed");
}

fn wait_state(dir: &std::path::Path, want: &str) {
    let f = dir.join("state");
    let ok = wait_until(Duration::from_secs(10), || std::fs::read_to_string(&f).is_ok_and(|s| s.trim() == want));
    assert!(ok, "fixture state {:?}, {want:?} expected", std::fs::read_to_string(&f).unwrap_or_default());
}

/// The client has sent its FIN; the server has not closed yet (CLOSE_WAIT).
/// After dump and restore the server still answers, then closes, and the
/// client reads the answer and the end of the stream.
#[test]
fn close_wait_connection_survives_dump_and_restore() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let mut fx = Spawn::fixture("halfclose", td.path())
        .arg(td.path())
        .arg("closewait")
        .ready_file(td.path().join("ready"))
        .spawn();
    let mut c = TcpStream::connect(("127.0.0.1", port_of(td.path()))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    wait_state(td.path(), "eof n=5");
    let _lock = dump_and_restore(&mut fx, &td, "a CLOSE_WAIT connection");
    send_signal(fx.pid, libc::SIGUSR1).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye", "what the restored server sent before closing");
    wait_state(td.path(), "done");
}

/// The server has sent its FIN (FIN_WAIT2 once acknowledged) and still
/// reads: after dump and restore the client's data reaches it, and the
/// client's own FIN ends its reading.
#[test]
fn fin_wait_connection_survives_dump_and_restore() {
    require_root!();
    let td = tempfile::tempdir().unwrap();
    let mut fx = Spawn::fixture("halfclose", td.path())
        .arg(td.path())
        .arg("finwait")
        .ready_file(td.path().join("ready"))
        .spawn();
    let mut c = TcpStream::connect(("127.0.0.1", port_of(td.path()))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hi = Vec::new();
    c.read_to_end(&mut hi).unwrap();
    assert_eq!(hi, b"hi");
    wait_state(td.path(), "shut");
    let _lock = dump_and_restore(&mut fx, &td, "a FIN_WAIT2 connection");
    c.write_all(b"after restore").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    wait_state(td.path(), "got=13");
}
