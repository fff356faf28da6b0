//! The network lock against the real kernel. Every test runs on its own
//! thread inside a private network namespace (`unshare(CLONE_NEWNET)` on
//! that thread, `lo` brought up), so nothing touches the host's ruleset;
//! the namespace disappears with the thread and its sockets, whatever the
//! outcome. Needs root; skipped otherwise. Where the `nft` CLI is
//! installed the tables are also checked with `nft list` (spawned from the
//! namespaced thread, so it runs in that namespace); the crate never runs it.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_netfilter::{remove_stale, remove_table, table_exists, ConnTuple, Lock, NetfilterError};
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

const MARK: u32 = 0xf10e;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_NET_ADMIN and unshare(CLONE_NEWNET))");
            return;
        }
    };
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Brings `lo` up in the calling thread's network namespace.
fn lo_up() {
    const _: () = assert!(size_of::<libc::ifreq>() == 40);
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }).unwrap();
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: req is a live ifreq, what SIOCGIFFLAGS reads and writes.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) }).unwrap();
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: req is a live ifreq, what SIOCSIFFLAGS reads.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).unwrap();
}

/// Runs `f` on a new thread in a new network namespace with `lo` up.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; it moves only this thread.
        cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) }).expect("unshare(CLONE_NEWNET)");
        lo_up();
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn nft_available() -> bool {
    Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `nft ARGS` in the calling thread's namespace; `None` without `nft`.
fn nft(args: &[&str]) -> Option<String> {
    if !nft_available() {
        eprintln!("note: nft not installed, skipping the nft cross-check");
        return None;
    }
    let out = Command::new("nft").args(args).output().unwrap();
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap())
}

fn set_mark(fd: RawFd, mark: u32) {
    let v = mark as libc::c_int;
    // SAFETY: the option value points to a live c_int whose size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .unwrap();
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let SocketAddr::V4(a) = addr else { panic!("IPv4 only here") };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
    unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
    (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
}

/// An IPv4 TCP socket bound to `local` (port 0: any), with `mark` if given.
/// Returns it and its bound address.
fn bound_socket(local: SocketAddr, mark: Option<u32>) -> (OwnedFd, SocketAddr) {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }).unwrap();
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(mark) = mark {
        set_mark(fd.as_raw_fd(), mark);
    }
    let (ss, len) = sockaddr(local);
    // SAFETY: ss holds a sockaddr_in of length len.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) }).unwrap();
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut out: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut out_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: out and out_len are live; out_len holds out's size.
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), (&mut out as *mut libc::sockaddr_storage).cast(), &mut out_len) })
        .unwrap();
    // SAFETY: getsockname stored a sockaddr_in (AF_INET socket).
    let sin: libc::sockaddr_in = unsafe { std::ptr::read((&out as *const libc::sockaddr_storage).cast()) };
    let addr = SocketAddr::from((sin.sin_addr.s_addr.to_ne_bytes(), u16::from_be(sin.sin_port)));
    (fd, addr)
}

/// Blocking `connect` that gives up after `timeout` (SO_SNDTIMEO; the
/// attempt then goes on in the kernel and a later call waits for it again).
fn connect(fd: &OwnedFd, remote: SocketAddr, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: the option value points to a live timeval whose size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    let (ss, len) = sockaddr(remote);
    // SAFETY: ss holds a sockaddr_in of length len.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) }).map(|_| ())
}

/// A connected pair (client, accepted server side).
fn tcp_pair(listener: &TcpListener, connect_to: SocketAddr) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(connect_to).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// The connection as the server side sees it.
fn tuple_of(server: &TcpStream) -> ConnTuple {
    ConnTuple::new(server.local_addr().unwrap(), server.peer_addr().unwrap())
}

/// Asserts that nothing arrives on `s` within `wait`.
fn assert_silent(s: &mut TcpStream, wait: Duration, what: &str) {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
        other => panic!("{what}: expected nothing while locked, got {other:?}"),
    }
}

fn read_exactly(s: &mut TcpStream, n: usize, wait: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Locks an established connection (server listening on `listen`, client
/// connecting to `connect_to`), checks that data stops in both directions
/// while an unlocked connection next to it still works, and that the
/// locked data arrives after unlock (retransmitted by TCP).
fn locked_connection_stalls_then_resumes(listen: &str, connect_ip: Option<&str>, table: &'static str) {
    let listener = TcpListener::bind(listen).unwrap();
    let mut target = listener.local_addr().unwrap();
    if let Some(ip) = connect_ip {
        target.set_ip(ip.parse().unwrap());
    }
    let (mut client, mut server) = tcp_pair(&listener, target);
    client.write_all(b"hello").unwrap();
    assert_eq!(read_exactly(&mut server, 5, Duration::from_secs(5)), b"hello");

    let tuple = tuple_of(&server);
    let lock = Lock::prepare(table, MARK).unwrap();
    let took = lock.lock(&[tuple]).unwrap();
    eprintln!("{table}: locked {tuple} in {took:?}");

    if let Some(listing) = nft(&["list", "table", "inet", table]) {
        let (l, r) = (tuple.local, tuple.remote);
        // nft prints the set key as remote . remote port . local . local port.
        let (lip, rip) = (l.ip().to_string(), r.ip().to_string());
        let (lip, rip) = (lip.trim_start_matches("::ffff:"), rip.trim_start_matches("::ffff:"));
        let element = format!("{rip} . {} . {lip} . {}", r.port(), l.port());
        assert!(listing.contains(&element), "element {element:?} missing from:\n{listing}");
    }

    // A connection that is not in the set keeps working.
    let (mut c2, mut s2) = tcp_pair(&listener, target);
    c2.write_all(b"free").unwrap();
    assert_eq!(read_exactly(&mut s2, 4, Duration::from_secs(5)), b"free");

    client.write_all(b"to-server").unwrap();
    server.write_all(b"to-client").unwrap();
    assert_silent(&mut server, Duration::from_millis(700), "server");
    assert_silent(&mut client, Duration::from_millis(100), "client");

    let took = lock.unlock().unwrap();
    eprintln!("{table}: unlocked in {took:?}");
    assert!(!table_exists(table).unwrap());
    let t0 = Instant::now();
    assert_eq!(read_exactly(&mut server, 9, Duration::from_secs(20)), b"to-server");
    assert_eq!(read_exactly(&mut client, 9, Duration::from_secs(20)), b"to-client");
    eprintln!("{table}: held data delivered {:?} after unlock", t0.elapsed());
}

#[test]
fn lock_holds_ipv4_connection_until_unlock() {
    require_root!();
    in_netns(|| locked_connection_stalls_then_resumes("127.0.0.1:0", None, "floe_t_v4"));
}

#[test]
fn lock_holds_ipv6_connection_until_unlock() {
    require_root!();
    in_netns(|| locked_connection_stalls_then_resumes("[::1]:0", None, "floe_t_v6"));
}

/// A dual-stack listener reports an IPv4 peer as `::ffff:a.b.c.d`; the lock
/// must match the IPv4 packets.
#[test]
fn lock_holds_ipv4_mapped_connection() {
    require_root!();
    in_netns(|| locked_connection_stalls_then_resumes("[::]:0", Some("127.0.0.1"), "floe_t_mapped"));
}

/// With a capture, what the lock drops on the way in is copied to floe,
/// and `reinject` delivers the copies. The lock stays in place, so only the
/// reinjected packets (which carry the lock's mark) can reach the server:
/// the client's own retransmissions are still dropped.
fn capture_keeps_dropped_data(listen: &str, table: &'static str) {
    let listener = TcpListener::bind(listen).unwrap();
    let (mut client, mut server) = tcp_pair(&listener, listener.local_addr().unwrap());
    client.write_all(b"hello").unwrap();
    assert_eq!(read_exactly(&mut server, 5, Duration::from_secs(5)), b"hello");
    let tuple = tuple_of(&server);
    let (lock, cap) = Lock::prepare_capturing(table, MARK).unwrap();
    let mut cap = cap.expect("nfnetlink_log is available here");
    if let Some(listing) = nft(&["list", "table", "inet", table]) {
        assert!(listing.contains(&format!("log group {}", cap.group())), "no log rule in:\n{listing}");
    }
    lock.lock(&[tuple]).unwrap();
    client.write_all(b"GET key-1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    client.write_all(b"GET key-2\r\n").unwrap();
    assert_silent(&mut server, Duration::from_millis(300), "server");
    let segs = cap.drain();
    assert!(!segs.is_empty(), "nothing captured");
    for s in &segs {
        assert_eq!(s.tuple, tuple.on_the_wire(), "segment of another connection: {s:?}");
    }
    let mut data: Vec<(u32, Vec<u8>)> = segs.iter().map(|s| (s.seq, s.payload.clone())).collect();
    data.sort();
    data.dedup();
    assert_eq!(data.concat_payloads(), b"GET key-1\r\nGET key-2\r\n");
    let sent = floe_netfilter::reinject(&segs, MARK).unwrap();
    assert_eq!(sent, segs.len());
    assert_eq!(read_exactly(&mut server, 22, Duration::from_secs(5)), b"GET key-1\r\nGET key-2\r\n");
    // The server's acknowledgements are still locked out: once they pass,
    // the client's retransmissions are duplicates the server never sees.
    lock.unlock().unwrap();
    server.write_all(b"+OK").unwrap();
    assert_eq!(read_exactly(&mut client, 3, Duration::from_secs(5)), b"+OK");
    assert_silent(&mut server, Duration::from_millis(500), "server after unlock");
}

trait ConcatPayloads {
    fn concat_payloads(&self) -> Vec<u8>;
}

impl ConcatPayloads for Vec<(u32, Vec<u8>)> {
    /// Retransmissions repeat a (seq, payload) pair; the rest follow on.
    fn concat_payloads(&self) -> Vec<u8> {
        self.iter().flat_map(|(_, p)| p.iter().copied()).collect()
    }
}

#[test]
fn capture_keeps_what_the_lock_drops_ipv4() {
    require_root!();
    in_netns(|| capture_keeps_dropped_data("127.0.0.1:0", "floe_t_cap4"));
}

#[test]
fn capture_keeps_what_the_lock_drops_ipv6() {
    require_root!();
    in_netns(|| capture_keeps_dropped_data("[::1]:0", "floe_t_cap6"));
}

/// Packets carrying the mark pass a locked 4-tuple; unmarked ones do not.
///
/// Which packets carry the mark: a socket's `SO_MARK` marks the packets it
/// sends, and over loopback the mark stays on the packet from the output to
/// the input hook. The client side therefore sets it on its socket before
/// connecting, and the listener sets it too (its SYN-ACKs carry the
/// listener's mark, and the accepted socket inherits it), so every packet
/// of that connection, both ways and including the handshake, is marked.
/// Both 4-tuples are locked before connecting (the clients bind first so
/// their ports are known): the marked connection is established and
/// carries data both ways; the unmarked one cannot even complete its
/// handshake until unlock.
#[test]
fn marked_packets_pass_the_lock() {
    require_root!();
    in_netns(|| {
        let marked_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_mark(marked_listener.as_raw_fd(), MARK);
        let plain_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (marked_client, marked_addr) = bound_socket("127.0.0.2:0".parse().unwrap(), Some(MARK));
        let (plain_client, plain_addr) = bound_socket("127.0.0.3:0".parse().unwrap(), None);

        let lock = Lock::prepare("floe_t_mark", MARK).unwrap();
        lock.lock(&[
            ConnTuple::new(marked_listener.local_addr().unwrap(), marked_addr),
            ConnTuple::new(plain_listener.local_addr().unwrap(), plain_addr),
        ])
        .unwrap();

        connect(&marked_client, marked_listener.local_addr().unwrap(), Duration::from_secs(5))
            .expect("a marked connection on a locked 4-tuple is established");
        let mut client = TcpStream::from(marked_client);
        let (mut server, peer) = marked_listener.accept().unwrap();
        assert_eq!(peer, marked_addr);
        client.write_all(b"ping").unwrap();
        assert_eq!(read_exactly(&mut server, 4, Duration::from_secs(5)), b"ping");
        server.write_all(b"pong").unwrap();
        assert_eq!(read_exactly(&mut client, 4, Duration::from_secs(5)), b"pong");

        let e = connect(&plain_client, plain_listener.local_addr().unwrap(), Duration::from_secs(1))
            .expect_err("an unmarked connection on a locked 4-tuple must not be established");
        assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "{e}");

        lock.unlock().unwrap();
        // The SYN is retransmitted (1 s, 3 s, 7 s after the first one).
        connect(&plain_client, plain_listener.local_addr().unwrap(), Duration::from_secs(15))
            .expect("the unmarked connection completes after unlock");
        let (_, peer) = plain_listener.accept().unwrap();
        assert_eq!(peer, plain_addr);
    });
}

#[test]
fn table_matches_the_documented_ruleset() {
    require_root!();
    in_netns(|| {
        let lock = Lock::prepare("floe_t_layout", MARK).unwrap();
        assert!(table_exists("floe_t_layout").unwrap());
        let Some(listing) = nft(&["list", "table", "inet", "floe_t_layout"]) else { return };
        eprintln!("{listing}");
        let norm: Vec<&str> = listing.lines().map(str::trim).collect();
        for line in [
            "type ipv4_addr . inet_service . ipv4_addr . inet_service",
            "type ipv6_addr . inet_service . ipv6_addr . inet_service",
            "chain prerouting {",
            "chain output {",
            "type filter hook prerouting priority raw; policy accept;",
            "type filter hook output priority raw; policy accept;",
            "meta mark 0x0000f10e accept",
            "ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop",
            "ip6 saddr . tcp sport . ip6 daddr . tcp dport @conns6 drop",
            "ip daddr . tcp dport . ip saddr . tcp sport @conns4 drop",
            "ip6 daddr . tcp dport . ip6 saddr . tcp sport @conns6 drop",
        ] {
            assert!(norm.contains(&line), "{line:?} missing from:\n{listing}");
        }
        // The mark rule comes first in each chain.
        let input = listing.split("chain prerouting").nth(1).unwrap();
        assert!(input.find("meta mark").unwrap() < input.find("@conns4").unwrap());
        drop(lock);
        assert!(!table_exists("floe_t_layout").unwrap(), "drop deletes the table");
    });
}

#[test]
fn remove_stale_deletes_by_prefix_only() {
    require_root!();
    in_netns(|| {
        let a = Lock::prepare("floe_stale_a", MARK).unwrap();
        std::mem::forget(Lock::prepare("floe_stale_b", MARK).unwrap()); // a crashed run's leftover
        let keep = Lock::prepare("floe_keep", MARK).unwrap();
        let with_nft = nft(&["add", "table", "inet", "other_x"]).is_some();
        if with_nft {
            // Same prefix, other family: not floe's.
            nft(&["add", "table", "ip", "floe_stale_ip"]);
        }

        let removed = remove_stale("floe_stale_").unwrap();
        assert_eq!(removed, ["floe_stale_a", "floe_stale_b"]);
        assert!(!table_exists("floe_stale_a").unwrap());
        assert!(!table_exists("floe_stale_b").unwrap());
        assert!(table_exists("floe_keep").unwrap());
        if with_nft {
            assert!(table_exists("other_x").unwrap());
            nft(&["list", "table", "ip", "floe_stale_ip"]);
        }
        assert_eq!(remove_stale("floe_stale_").unwrap(), Vec::<String>::new());

        // Dropping a lock whose table was removed is harmless.
        drop(a);
        assert!(table_exists("floe_keep").unwrap());
        assert_eq!(remove_stale("floe_").unwrap(), ["floe_keep"]);
        // So is unlocking it.
        keep.unlock().unwrap();

        for bad in ["", "other", "flo", "floe x"] {
            let e = remove_stale(bad).unwrap_err();
            assert!(matches!(e, NetfilterError::InvalidName { .. }), "{bad:?}: {e}");
        }
    });
}

#[test]
fn unlock_and_drop_are_harmless_afterwards() {
    require_root!();
    in_netns(|| {
        let tuple = ConnTuple::new("127.0.0.1:80".parse().unwrap(), "127.0.0.1:40000".parse().unwrap());
        let lock = Lock::prepare("floe_t_twice", MARK).unwrap();
        lock.lock(&[tuple]).unwrap();
        lock.lock(&[tuple]).unwrap(); // already locked: fine
        lock.lock(&[]).unwrap();
        lock.unlock().unwrap(); // consumes the lock: its drop must not act again
        assert!(!table_exists("floe_t_twice").unwrap());

        // A new lock of the same name is not disturbed by the old one.
        let again = Lock::prepare("floe_t_twice", MARK).unwrap();
        assert!(table_exists("floe_t_twice").unwrap());

        // A second prepare of a live name is refused and says why.
        let e = Lock::prepare("floe_t_twice", MARK).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("creating nftables table floe_t_twice failed: File exists"), "{msg}");
        assert!(table_exists("floe_t_twice").unwrap(), "a refused prepare leaves the existing table alone");

        // Locking after the table vanished names the operation.
        remove_stale("floe_t_twice").unwrap();
        let e = again.lock(&[tuple]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
        assert!(
            e.to_string().contains("adding 1 connections to set conns4 of nftables table floe_t_twice failed"),
            "{e}"
        );
        again.unlock().unwrap(); // already gone: fine

        let dropped = Lock::prepare("floe_t_twice", MARK).unwrap();
        remove_stale("floe_t_twice").unwrap();
        drop(dropped); // already gone: logs at most

        // A persisted lock outlives its handle until removed by name.
        let kept = Lock::prepare("floe_t_twice", MARK).unwrap();
        kept.lock(&[tuple]).unwrap();
        let name = kept.persist();
        assert_eq!(name, "floe_t_twice");
        assert!(table_exists(&name).unwrap());
        assert!(remove_table(&name).unwrap());
        assert!(!remove_table(&name).unwrap(), "a second removal finds nothing");
        assert!(remove_table("other_x").is_err(), "only floe's tables");
    });
}

#[test]
fn bad_arguments_are_refused() {
    require_root!();
    in_netns(|| {
        let long = format!("floe_{}", "x".repeat(251));
        for bad in ["", "floe_", "other_x", "floe_a b", "floe_a/b", "floe_\u{e9}", long.as_str()] {
            let e = Lock::prepare(bad, MARK).unwrap_err();
            assert!(matches!(e, NetfilterError::InvalidName { .. }), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("invalid nftables table name"), "{e}");
        }
        let e = Lock::prepare("floe_nomark", 0).unwrap_err();
        assert!(matches!(e, NetfilterError::InvalidMark { .. }), "{e}");
        assert!(!table_exists("floe_nomark").unwrap());

        let lock = Lock::prepare("floe_t_args", MARK).unwrap();
        let mixed = ConnTuple::new("127.0.0.1:80".parse().unwrap(), "[::1]:4000".parse().unwrap());
        let fine = ConnTuple::new("127.0.0.1:80".parse().unwrap(), "127.0.0.1:4000".parse().unwrap());
        let e = lock.lock(&[fine, mixed]).unwrap_err();
        assert!(matches!(e, NetfilterError::InvalidTuple { .. }), "{e}");
        if let Some(set) = nft(&["list", "set", "inet", "floe_t_args", "conns4"]) {
            assert!(!set.contains("elements"), "nothing is locked when one tuple is bad:\n{set}");
        }
    });
}

/// capset(2) structures (linux/capability.h, version 3).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const _: () = assert!(size_of::<CapHeader>() == 8);
const _: () = assert!(size_of::<CapData>() == 12);
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_NET_ADMIN: u32 = 12;

/// Clears CAP_NET_ADMIN from the calling thread's effective set (capabilities
/// are per thread; the thread ends with the test).
fn drop_net_admin_here() {
    let mut hdr = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: hdr and data are live, of the layout capget expects for version 3.
    cvt(unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } as libc::c_int).unwrap();
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: as above; capset only reads them.
    cvt(unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } as libc::c_int).unwrap();
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    require_root!();
    in_netns(|| {
        drop_net_admin_here();
        let e = Lock::prepare("floe_t_eperm", MARK).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM), "{e}");
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(msg.contains("failed: Operation not permitted (needs CAP_NET_ADMIN)"), "{msg}");
    });
}

fn tuples(n: usize, v6: bool) -> Vec<ConnTuple> {
    (0..n)
        .map(|i| {
            let port = 10000 + i as u16;
            if v6 {
                ConnTuple::new(
                    "[2001:db8::1]:443".parse().unwrap(),
                    SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 1, i as u16], port)),
                )
            } else {
                ConnTuple::new(
                    "10.0.0.1:443".parse().unwrap(),
                    SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], port)),
                )
            }
        })
        .collect()
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    format!("min {:?} median {:?} max {:?}", v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Latency of prepare / lock(100) / unlock, printed; no timed assertion.
#[test]
fn lock_latency_for_100_connections() {
    require_root!();
    in_netns(|| {
        let (mut prep, mut lock4, mut lock_mixed, mut unlock) = (vec![], vec![], vec![], vec![]);
        let v4 = tuples(100, false);
        let mut mixed = tuples(50, false);
        mixed.extend(tuples(50, true));
        for round in 0..20 {
            let name = format!("floe_bench_{round}");
            let t = Instant::now();
            let lock = Lock::prepare(&name, MARK).unwrap();
            prep.push(t.elapsed());
            lock4.push(lock.lock(&v4).unwrap());
            lock_mixed.push(lock.lock(&mixed).unwrap());
            unlock.push(lock.unlock().unwrap());
        }
        eprintln!("prepare:                      {}", stats(prep));
        eprintln!("lock 100 IPv4 connections:    {}", stats(lock4));
        eprintln!("lock 50 IPv4 + 50 IPv6:       {}", stats(lock_mixed));
        eprintln!("unlock (delete the table):    {}", stats(unlock));
    });
}

/// Elements in `nft list set` output (each has three " . " separators).
fn element_count(listing: &str) -> usize {
    listing.split("elements = {").nth(1).map_or(0, |e| e.matches(" . ").count() / 3)
}

/// Many connections: several set-element messages in one batch and a
/// batch bigger than the default socket send buffer.
#[test]
fn lock_many_connections_in_one_batch() {
    require_root!();
    in_netns(|| {
        let mut conns = tuples(5000, false);
        conns.extend(tuples(5000, true));
        let lock = Lock::prepare("floe_t_many", MARK).unwrap();
        let took = lock.lock(&conns).unwrap();
        eprintln!("lock 5000 IPv4 + 5000 IPv6 connections: {took:?}");
        if let Some(set) = nft(&["list", "set", "inet", "floe_t_many", "conns6"]) {
            assert_eq!(element_count(&set), 5000, "every IPv6 element present");
        }
        if let Some(set) = nft(&["list", "set", "inet", "floe_t_many", "conns4"]) {
            assert_eq!(element_count(&set), 5000, "every IPv4 element present");
        }
        lock.unlock().unwrap();
    });
}

/// Service addresses over rtnetlink: added, found, routed, refused twice,
/// deleted, on `lo` of a private namespace.
#[test]
fn service_addresses_move_over_rtnetlink() {
    use floe_netfilter::rtnl;
    require_root!();
    in_netns(|| {
        let lo = rtnl::interface_index("lo").unwrap();
        assert_eq!(rtnl::interface_name(lo).unwrap(), "lo");
        assert!(rtnl::interface_index("no-such-if0").is_err());
        for (ip, len) in [("10.99.0.1", 24u8), ("2001:db8:99::1", 64)] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(rtnl::find_address(ip).unwrap(), None);
            rtnl::add_address(ip, len, lo, true).unwrap();
            let found = rtnl::find_address(ip).unwrap().expect("address not found after adding it");
            assert_eq!((found.ifindex, found.ifname.as_str(), found.prefix_len), (lo, "lo", len));
            let e = rtnl::add_address(ip, len, lo, true).unwrap_err();
            assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
            // A neighbour on the new subnet is reached through lo.
            let neighbour: std::net::IpAddr =
                if ip.is_ipv4() { "10.99.0.7" } else { "2001:db8:99::7" }.parse().unwrap();
            assert_eq!(rtnl::route_interface(neighbour).unwrap(), lo);
            if let Ok(listing) = Command::new("ip").args(["-o", "addr", "show", "dev", "lo"]).output() {
                assert!(String::from_utf8_lossy(&listing.stdout).contains(&format!("{ip}/{len}")));
            }
            rtnl::delete_address(ip, len, lo).unwrap();
            assert_eq!(rtnl::find_address(ip).unwrap(), None);
            let e = rtnl::delete_address(ip, len, lo).unwrap_err();
            assert!(e.to_string().starts_with(&format!("deleting address {ip}/{len}")), "{e}");
        }
    });
}
