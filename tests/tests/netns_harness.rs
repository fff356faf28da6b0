//! Self-test of the network-namespace hosts harness (tests/src/netns.rs)
//! and of the `migcounter` workload (tests/fixtures/migcounter.c) that the
//! live-migration suites run on those hosts: two hosts ping each other,
//! migcounter runs inside host a (its netns inode is a's, it logs gap-free
//! seq lines, answers the checksum and verify requests), cut/heal stop and
//! restore traffic, and dropping the hosts kills what runs inside and
//! removes the namespaces; stale namespaces of dead test processes are
//! removed, live ones are not. Needs root, `ip`, `ping` and `nft`; skipped
//! when not root.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::netns::{self, Hosts, NETNS_DIR};
use floe_tests::*;
use std::fs::{self, File};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn require_tools() {
    if let Err(e) = netns::require_tools() {
        panic!("{e}");
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Parsed `seq=N pid=P host=H ns=I` line.
struct LogLine {
    seq: u64,
    pid: i32,
    host: String,
    ns: u64,
}

/// The complete lines of a migcounter log.
fn read_log(path: &Path) -> Vec<LogLine> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            let r = parse_report(&l.split_whitespace().collect::<Vec<_>>().join("\n"));
            assert_eq!(r.len(), 4, "malformed log line {l:?}");
            LogLine {
                seq: report_num(&r, "seq"),
                pid: report_num(&r, "pid") as i32,
                host: r["host"].clone(),
                ns: report_num(&r, "ns"),
            }
        })
        .collect()
}

/// Deletes DIR/NAME, sends `sig` and waits for migcounter to write it anew.
fn request(pid: i32, dir: &Path, name: &str, sig: libc::c_int) -> String {
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    send_signal(pid, sig).expect("signal migcounter");
    assert!(wait_for_file(&path, REPORT_TIMEOUT), "migcounter (pid {pid}) wrote no {name} after signal {sig}");
    fs::read_to_string(&path).expect("read migcounter output")
}

#[test]
fn hosts_run_migcounter_cut_heal_and_clean_up() {
    require_root!();
    require_tools();
    let td = TestDir::new("netns");
    let hosts = Hosts::new("hself").expect("create hosts");
    let (a, b) = (hosts.a.clone(), hosts.b.clone());
    assert!(netns_exists(&a.name) && netns_exists(&b.name));
    assert_ne!(a.ip, b.ip);
    assert!(a.ifname.len() <= 15 && b.ifname.len() <= 15, "{} / {}", a.ifname, b.ifname);
    let (ino_a, ino_b) = (a.netns_inode().unwrap(), b.netns_inode().unwrap());
    let own_ns = netns::netns_inode_of_pid(std::process::id() as i32).unwrap();
    assert!(ino_a != ino_b && ino_a != own_ns && ino_b != own_ns);

    // The veth has the MTU asked for, and both hosts reach each other.
    let out = a.command("ip").args(["-o", "link", "show", &a.ifname]).output().expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mtu 9000"), "veth of a: {text}");
    assert!(a.can_ping(b.ip).unwrap(), "a cannot ping b");
    assert!(b.can_ping(a.ip).unwrap(), "b cannot ping a");

    // migcounter in host a, in its own session.
    let log = td.join("mig.log");
    let out = File::create(td.join("migcounter.out")).unwrap();
    let mut cmd = a.command(fixture_path("migcounter"));
    cmd.arg(&log)
        .arg("16")
        .env("MIGCOUNTER_DIRTY_MIBS", "8")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: the hook runs between fork and exec and only calls setsid,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = cmd.spawn().expect("start migcounter in host a");
    let pid = child.id() as i32;
    let ready = td.join("ready");
    assert!(
        wait_until(READY_TIMEOUT, || ready.exists() || !pid_alive(pid)) && ready.exists(),
        "migcounter not ready; output:\n{}",
        fs::read_to_string(td.join("migcounter.out")).unwrap_or_default()
    );
    assert_eq!(fs::read_to_string(&ready).unwrap(), format!("pid={pid}\n"), "ip netns exec should exec migcounter");
    assert_eq!(session_id(pid), Some(pid), "migcounter should lead its own session");
    assert_eq!(netns::netns_inode_of_pid(pid).unwrap(), ino_a, "migcounter is not in host a's netns");
    assert!(a.pids().unwrap().contains(&pid));
    assert!(!b.pids().unwrap().contains(&pid));
    let fds: Vec<_> = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(fds.len(), 4, "migcounter should hold stdin/out/err and the log only: {fds:?}");

    // Checksum and verification.
    let sum = request(pid, td.path(), "sum", libc::SIGUSR1);
    let r = parse_report(&sum.split_whitespace().collect::<Vec<_>>().join("\n"));
    assert!(sum.ends_with('\n'), "{sum:?}");
    assert_eq!(r["sum"].len(), 16, "{sum:?}");
    assert!(u64::from_str_radix(&r["sum"], 16).is_ok(), "{sum:?}");
    assert_eq!(report_num(&r, "pages"), 16 * 256, "{sum:?}");
    assert!(report_num(&r, "seq") >= 1, "{sum:?}");
    let verify = request(pid, td.path(), "verify", libc::SIGUSR2);
    assert_eq!(verify, "verify=ok pages=4096\n");

    // The log: consecutive seq from 1, this pid, host a's netns.
    assert!(wait_until(Duration::from_secs(10), || read_log(&log).len() >= 300), "migcounter logs too slowly");
    let lines = read_log(&log);
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.seq, i as u64 + 1, "gap or disorder in the log at line {}", i + 1);
        assert_eq!((l.pid, l.ns), (pid, ino_a), "line {}", i + 1);
        assert_eq!(l.host, hostname.trim_end(), "line {}", i + 1);
    }

    // Cut and heal.
    hosts.cut().expect("cut");
    assert!(hosts.is_cut());
    hosts.cut().expect("cut is idempotent");
    assert!(!a.can_ping(b.ip).unwrap(), "a still reaches b after cut");
    assert!(!b.can_ping(a.ip).unwrap(), "b still reaches a after cut");
    hosts.heal().expect("heal");
    assert!(!hosts.is_cut());
    assert!(wait_until(Duration::from_secs(5), || a.can_ping(b.ip).unwrap()), "a cannot reach b after heal");
    assert!(b.can_ping(a.ip).unwrap(), "b cannot reach a after heal");
    hosts.heal().expect("heal is idempotent");
    let sum = request(pid, td.path(), "sum", libc::SIGUSR1);
    assert!(sum.starts_with("sum="), "{sum:?}");

    // Drop (with the network cut again): everything inside dies, the
    // namespaces go.
    hosts.cut().expect("cut");
    drop(hosts);
    assert!(!netns_exists(&a.name), "{} still exists", a.name);
    assert!(!netns_exists(&b.name), "{} still exists", b.name);
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(&a.name) && !list.contains(&b.name), "ip netns list:\n{list}");
    assert!(!pid_alive(pid), "migcounter (pid {pid}) survived dropping the hosts");
    let st = child.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "migcounter: {}", describe_status(&st));
}

#[test]
fn parallel_hosts_do_not_collide() {
    require_root!();
    require_tools();
    let (h1, h2) = std::thread::scope(|s| {
        let t1 = s.spawn(|| Hosts::new("hpar").expect("hosts 1"));
        let t2 = s.spawn(|| Hosts::new("hpar").expect("hosts 2"));
        (t1.join().unwrap(), t2.join().unwrap())
    });
    assert_ne!(h1.a.name, h2.a.name);
    assert_ne!(h1.a.ip, h2.a.ip);
    // A third one of the same tag runs cleanup_stale, which must not touch
    // the namespaces of this (live) process.
    let h3 = Hosts::new("hpar").expect("hosts 3");
    for h in [&h1, &h2, &h3] {
        assert!(netns_exists(&h.a.name) && netns_exists(&h.b.name));
        assert!(h.a.can_ping(h.b.ip).unwrap());
    }
    // Each pair is isolated: h1's a does not reach h3's b.
    assert!(!h1.a.can_ping(h3.b.ip).unwrap());
    let names: Vec<String> = [&h1, &h2, &h3].iter().flat_map(|h| [h.a.name.clone(), h.b.name.clone()]).collect();
    drop((h1, h2, h3));
    for n in names {
        assert!(!netns_exists(&n), "{n} still exists");
    }
}

#[test]
fn cleanup_stale_removes_namespaces_of_dead_runs() {
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
    let stale = format!("floe-hstale-{}-0-a", to36(dead_pid));
    let unparsable = "floe-hstaleleftover".to_owned();
    let live = format!("floe-hstale-{}-zz-a", to36(std::process::id()));
    let other_tag = format!("floe-hstaleother-{}-0-a", to36(dead_pid));
    for n in [&stale, &unparsable, &live, &other_tag] {
        let st = Command::new("ip").args(["netns", "add", n]).status().unwrap();
        assert!(st.success(), "ip netns add {n}");
    }
    // A process left running in the stale namespace is killed.
    let hosts_like = netns::Host { name: stale.clone(), ip: "10.0.0.1".parse().unwrap(), ifname: "lo".into() };
    let mut sleeper = hosts_like.command("sleep").arg("600").stdin(Stdio::null()).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(5), || hosts_like
        .pids()
        .unwrap_or_default()
        .contains(&(sleeper.id() as i32))));

    netns::cleanup_stale("hstale-");
    assert!(!netns_exists(&stale), "{stale} survived cleanup_stale");
    assert!(netns_exists(&unparsable), "cleanup_stale(\"hstale-\") should only match floe-hstale-*");
    assert!(netns_exists(&live), "cleanup_stale removed a namespace of a live process");
    assert!(netns_exists(&other_tag), "cleanup_stale removed another tag's namespace");
    let st = sleeper.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));

    netns::cleanup_stale("hstale");
    assert!(!netns_exists(&unparsable) && !netns_exists(&other_tag), "unparsable/dead-owner names remain");
    assert!(netns_exists(&live));
    let st = Command::new("ip").args(["netns", "del", &live]).status().unwrap();
    assert!(st.success());
}

#[test]
fn bad_tags_are_refused() {
    for tag in ["", "UPPER", "has-dash", "waytoolongtagname"] {
        let e = Hosts::new(tag).expect_err(tag);
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{tag}: {e}");
    }
}

#[test]
fn drop_cleans_up_when_a_test_panics() {
    require_root!();
    require_tools();
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let hosts = Hosts::new("hpanic").expect("create hosts");
        let child = hosts.b.command("sleep").arg("600").stdin(Stdio::null()).spawn().expect("start sleep in b");
        let pid = child.id() as i32;
        assert!(wait_until(Duration::from_secs(5), || hosts.b.pids().unwrap_or_default().contains(&pid)));
        *seen.lock().unwrap() = Some((hosts.a.name.clone(), hosts.b.name.clone(), child));
        panic!("deliberate panic with hosts alive");
    });
    assert!(result.is_err());
    let (a, b, mut child) = seen.lock().unwrap().take().expect("the closure got as far as the panic");
    assert!(!netns_exists(&a) && !netns_exists(&b), "namespaces survived the unwind");
    let pid = child.id() as i32;
    assert!(!pid_alive(pid), "sleep (pid {pid}) survived the unwind");
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}
