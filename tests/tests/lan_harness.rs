//! Self-test of the three-host LAN harness (`netns::Lan`, tests/src/netns.rs)
//! and of the `tcpclient` fixture (tests/fixtures/tcpclient.c) that talks to
//! `tcpecho` across it: the hosts reach one another over the bridge, the
//! floating service address is configured nowhere at first, tcpclient in c
//! keeps a gap-free, error-free conversation with tcpecho in a through the
//! service address, the address then moves from a to b at the IP level
//! (observing c's neighbour cache on the way; see the module docs of
//! `Lan` for what to expect), and dropping the Lan kills what runs inside
//! and removes all four namespaces. Stale Lan namespaces of dead test
//! processes are removed. Needs root, `ip` and `ping`; `arping`
//! (iputils-arping) is used when installed. Skipped when not root.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::netns::{self, Host, Lan, NETNS_DIR};
use floe_tests::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const PORT: &str = "7000";

fn require_tools() {
    if let Err(e) = netns::require_tools() {
        panic!("{e}");
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Starts `program ARGS` inside `host` (setns, as a session leader, stdout
/// and stderr to `dir/log`) and waits for `dir/ready`.
fn start_in(host: &Host, name: &str, program: PathBuf, args: &[&str], dir: &Path) -> Child {
    fs::create_dir_all(dir).unwrap();
    let log = fs::File::create(dir.join("log")).unwrap();
    let mut cmd = host.command_setns(&program).unwrap();
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
    // SAFETY: setsid is async-signal-safe and has no memory-safety preconditions.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let ready = dir.join("ready");
    let ok = wait_until(READY_TIMEOUT, || ready.exists() || child.try_wait().unwrap().is_some());
    if !ok || !ready.exists() {
        let _ = child.kill();
        panic!(
            "{name} (pid {}) in {} did not become ready: {:?}\nlog:\n{}",
            child.id(),
            host.name,
            child.try_wait(),
            fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
    }
    eprintln!("started {name} as pid {} in {}: {} {}", child.id(), host.name, program.display(), args.join(" "));
    child
}

/// tcpclient's one-line `key=value ...` stats file.
fn parse_stats(text: &str) -> BTreeMap<String, String> {
    assert!(text.ends_with('\n') && text.lines().count() == 1, "malformed stats {text:?}");
    text.split_whitespace()
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap_or_else(|| panic!("malformed stats field {w:?} in {text:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Asks tcpclient for its stats (SIGUSR1) and returns them.
fn client_stats(pid: i32, dir: &Path) -> BTreeMap<String, String> {
    let path = dir.join("stats");
    let _ = fs::remove_file(&path);
    send_signal(pid, libc::SIGUSR1).unwrap();
    assert!(
        wait_for_file(&path, REPORT_TIMEOUT),
        "tcpclient (pid {pid}) wrote no stats after SIGUSR1\nlog:\n{}",
        fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    parse_stats(&fs::read_to_string(&path).unwrap())
}

fn num(stats: &BTreeMap<String, String>, key: &str) -> f64 {
    stats.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {key} in {stats:?}"))
}

/// Waits (bounded) for a child to exit and returns its status.
fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "{what} (pid {}) still running after {timeout:?}", child.id());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pings `to` from `from` up to `tries` times (1 s each); true on the first answer.
fn ping_within(from: &Host, to: std::net::Ipv4Addr, tries: u32) -> bool {
    (0..tries).any(|_| from.can_ping(to).unwrap())
}

#[test]
fn lan_carries_tcp_moves_service_address_and_cleans_up() {
    require_root!();
    require_tools();
    let td = TestDir::new("lan");
    let lan = Lan::new("lself").expect("create lan");
    let (a, b, c) = (lan.a.clone(), lan.b.clone(), lan.c.clone());
    let svc = lan.service_ip;
    let names: Vec<String> = lan.namespaces().iter().map(|s| s.to_string()).collect();

    // Shape: four namespaces, short interface names, one subnet, distinct hosts.
    for n in &names {
        assert!(netns_exists(n), "{n} missing");
    }
    assert!(names[3].ends_with("-s"));
    for h in lan.hosts() {
        assert!(h.ifname.len() <= 15, "{}", h.ifname);
        assert!(lan.switch_port(h).unwrap().len() <= 15);
        assert_eq!(h.ip.octets()[..3], svc.octets()[..3]);
        let out = ip_out(&["-n", &h.name, "-o", "link", "show", &h.ifname]);
        assert!(out.contains("mtu 1500 "), "{out}");
        assert!(out.contains("state UP"), "{out}");
    }
    assert!(lan.bridge.len() <= 15);
    let bridge_ports = ip_out(&["-n", &lan.switch, "-o", "link", "show", "master", &lan.bridge]);
    assert_eq!(bridge_ports.lines().count(), 3, "bridge ports:\n{bridge_ports}");
    let inodes: Vec<u64> = lan.hosts().iter().map(|h| h.netns_inode().unwrap()).collect();
    assert!(inodes[0] != inodes[1] && inodes[1] != inodes[2] && inodes[0] != inodes[2]);
    assert!(lan.switch_port(&Host { name: "nope".into(), ip: svc, ifname: "x".into() }).is_err());
    let macs: Vec<String> = lan.hosts().iter().map(|h| lan.mac(h).unwrap()).collect();
    assert!(macs[0] != macs[1] && macs[1] != macs[2], "{macs:?}");
    // Everyone reaches everyone (Lan::new waited for that); the service
    // address answers nowhere yet.
    for (x, y) in [(&c, &a), (&c, &b), (&b, &a)] {
        assert!(x.can_ping(y.ip).unwrap(), "{} cannot ping {}", x.name, y.ip);
    }
    assert!(!c.can_ping(svc).unwrap(), "service address {svc} answers before it was configured");

    // The service runs on a behind the service address; c talks to it.
    lan.add_address(&a, svc).unwrap();
    let (echo_dir, client_dir) = (td.join("echo"), td.join("client"));
    let mut echo = start_in(&a, "tcpecho", fixture_path("tcpecho"), &[echo_dir.to_str().unwrap(), PORT], &echo_dir);
    let mut client = start_in(
        &c,
        "tcpclient",
        fixture_path("tcpclient"),
        &[&svc.to_string(), PORT, client_dir.to_str().unwrap(), "5"],
        &client_dir,
    );
    let (echo_pid, client_pid) = (echo.id() as i32, client.id() as i32);
    assert_eq!(netns::netns_inode_of_pid(echo_pid).unwrap(), inodes[0]);
    assert_eq!(netns::netns_inode_of_pid(client_pid).unwrap(), inodes[2]);
    assert_eq!(session_id(client_pid), Some(client_pid), "tcpclient is not a session leader");
    assert_eq!(a.pids().unwrap(), vec![echo_pid]);
    assert_eq!(c.pids().unwrap(), vec![client_pid]);
    std::thread::sleep(Duration::from_secs(1));
    let stats = client_stats(client_pid, &client_dir);
    eprintln!("tcpclient after 1 s: {stats:?}");
    assert!(num(&stats, "count") > 50.0, "{stats:?}");
    assert_eq!(stats["errors"], "0", "{stats:?}");
    assert_eq!(stats["mismatches"], "0", "{stats:?}");
    assert_eq!(stats["last_error"], "none", "{stats:?}");
    assert!(num(&stats, "max_gap_ms") >= 5.0, "a gap includes the 5 ms sleep: {stats:?}");
    let echoed = fs::read_to_string(echo_dir.join("log")).unwrap();
    assert!(echoed.lines().count() as f64 >= num(&stats, "count"), "tcpecho log:\n{echoed}");

    // c resolved the service address to a's MAC.
    let before = lan.neighbour(&c, svc).unwrap().expect("c has no neighbour entry for the service address");
    eprintln!("c's neighbour entry for {svc} before the move: {before:?} (a's MAC {})", macs[0]);
    assert_eq!(before.lladdr.as_deref(), Some(macs[0].as_str()));

    // Move the address from a to b at the IP level.
    lan.del_address(&a, svc).unwrap();
    lan.add_address(&b, svc).unwrap(); // gratuitous ARP if arping is installed
    let after = lan.neighbour(&c, svc).unwrap();
    eprintln!(
        "c's neighbour entry for {svc} right after the move (arping {}): {after:?} (b's MAC {})",
        if Lan::can_announce() { "installed: gratuitous ARP sent" } else { "not installed: no announcement" },
        macs[1]
    );
    if Lan::can_announce() {
        // The gratuitous ARP re-pointed the existing entry at b.
        let after = after.expect("entry gone after the gratuitous ARP");
        assert_eq!(after.lladdr.as_deref(), Some(macs[1].as_str()), "gratuitous ARP did not update c: {after:?}");
        assert!(ping_within(&c, svc, 3), "{svc} does not answer c after the move and the gratuitous ARP");
    } else {
        // Without an announcement c still sends to a's MAC (and a, which
        // does not forward, drops it), until the entry times out.
        assert_eq!(after.as_ref().and_then(|n| n.lladdr.as_deref()), Some(macs[0].as_str()), "{after:?}");
        let answered = c.can_ping(svc).unwrap();
        eprintln!("ping {svc} from c with the old entry: {}", if answered { "answered" } else { "no answer" });
        lan.flush_neighbour(&c, svc).unwrap();
        assert!(ping_within(&c, svc, 3), "{svc} does not answer c after the move and a neighbour flush");
    }
    let now = lan.neighbour(&c, svc).unwrap().expect("no entry after a successful ping");
    assert_eq!(now.lladdr.as_deref(), Some(macs[1].as_str()), "{now:?}");
    // The TCP connection lives on in a, so once c's packets reach b, b
    // answers them with a reset, which tcpclient reports.
    let st = wait_exit(&mut client, Duration::from_secs(30), "tcpclient");
    let stats = parse_stats(&fs::read_to_string(client_dir.join("stats")).unwrap());
    eprintln!("tcpclient after the move: {} {stats:?}", describe_status(&st));
    assert_eq!(st.code(), Some(3), "{stats:?}");
    assert_eq!(stats["errors"], "1", "{stats:?}");
    assert_eq!(stats["last_error"], "recv:ECONNRESET(104)", "{stats:?}");
    assert_eq!(stats["mismatches"], "0", "{stats:?}");

    // Something in every namespace, to see Drop kill it all.
    let mut sleepers: Vec<Child> = [&b, &c]
        .iter()
        .map(|h| h.command_setns("sleep").unwrap().arg("600").stdin(Stdio::null()).spawn().unwrap())
        .collect();
    let sw = Host { name: lan.switch.clone(), ip: svc, ifname: lan.bridge.clone() };
    sleepers.push(sw.command_setns("sleep").unwrap().arg("600").stdin(Stdio::null()).spawn().unwrap());
    assert_eq!(b.pids().unwrap(), vec![sleepers[0].id() as i32]);
    drop(lan);
    for n in &names {
        assert!(!netns_exists(n), "{n} still exists after drop");
    }
    let st = wait_exit(&mut echo, Duration::from_secs(5), "tcpecho");
    assert_eq!(st.signal(), Some(libc::SIGKILL), "tcpecho: {}", describe_status(&st));
    for s in &mut sleepers {
        let st = wait_exit(s, Duration::from_secs(5), "sleep");
        assert_eq!(st.signal(), Some(libc::SIGKILL), "sleep: {}", describe_status(&st));
    }
}

/// `ip ARGS`, stdout; panics on failure.
fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lan_rejects_bad_tags() {
    for tag in ["", "UPPER", "has-dash", "waytoolongtag1"] {
        let e = Lan::new(tag).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{tag:?}: {e}");
    }
}

#[test]
fn cleanup_stale_removes_lans_of_dead_runs() {
    require_root!();
    require_tools();
    // A pid that certainly belongs to no process now: a reaped child's.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    assert!(!pid_exists(dead_pid as i32));
    let to36 = |mut n: u32| {
        let mut s = Vec::new();
        loop {
            s.push(char::from_digit(n % 36, 36).unwrap());
            n /= 36;
            if n == 0 {
                break s.into_iter().rev().collect::<String>();
            }
        }
    };
    // What a crashed run leaves: four namespaces, a bridge, a veth to it,
    // and a process in the switch namespace.
    let uniq = format!("{}-0", to36(dead_pid));
    let stale: Vec<String> = ["a", "b", "c", "s"].iter().map(|s| format!("floe-lstale-{uniq}-{s}")).collect();
    for n in &stale {
        ip_out(&["netns", "add", n]);
    }
    let bridge = format!("b{uniq}");
    ip_out(&["-n", &stale[3], "link", "add", &bridge, "type", "bridge"]);
    #[rustfmt::skip]
    ip_out(&[
        "link", "add", &format!("f{uniq}a"), "netns", &stale[0],
        "type", "veth", "peer", "name", &format!("g{uniq}a"), "netns", &stale[3],
    ]);
    ip_out(&["-n", &stale[3], "link", "set", &format!("g{uniq}a"), "master", &bridge]);
    let sw = Host { name: stale[3].clone(), ip: "10.0.0.1".parse().unwrap(), ifname: bridge.clone() };
    let mut sleeper = sw.command("sleep").arg("600").stdin(Stdio::null()).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(5), || sw.pids().unwrap_or_default().contains(&(sleeper.id() as i32))));

    // Creating a Lan of the same tag removes them, and works.
    let lan = Lan::new("lstale").expect("create lan");
    for n in &stale {
        assert!(!netns_exists(n), "stale {n} not removed");
    }
    let st = wait_exit(&mut sleeper, Duration::from_secs(5), "sleep in stale namespace");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(lan.c.can_ping(lan.a.ip).unwrap());
    drop(lan);
}
