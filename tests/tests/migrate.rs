//! Live migration between two network-namespace hosts, each with a
//! floe-agent (issue 5): a workload that logs a sequence number every
//! millisecond and keeps rewriting its memory moves from host a to host b
//! with no gap and no duplicate in its log and its memory intact; and every
//! failure (target agent dying at each stage, network cut, corrupted batch,
//! wrong CA, other protocol version, file missing on the target) leaves
//! exactly one copy running, intact, with an error that says what happened.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::cluster::{check_log, Cluster, Workload};
use floe_tests::*;
use std::time::Duration;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: live migration tests need root");
            return;
        }
    };
}

/// Asks migcounter to verify every page it wrote; true when all match.
fn verify(w: &Workload, pid: i32) -> bool {
    let f = w.dir.join("verify");
    let _ = std::fs::remove_file(&f);
    send_signal(pid, libc::SIGUSR2).unwrap();
    assert!(wait_for_file(&f, Duration::from_secs(30)), "no verify answer from {pid}");
    let v = std::fs::read_to_string(&f).unwrap();
    v.starts_with("verify=ok")
}

fn last_seq(w: &Workload) -> u64 {
    check_log(&w.log()).map(|(n, _)| n).unwrap_or(0)
}

/// After a failed migration: the source copy runs on in host a, untouched
/// (same pid, not stopped, still logging without gaps, memory intact), and
/// no copy exists in host b.
fn assert_source_intact(c: &Cluster, w: &Workload, what: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || c.copies_in(1).is_empty()),
        "{what}: a copy is left in host b: {:?}",
        c.copies_in(1)
    );
    assert_eq!(c.copies_in(0), vec![w.pid], "{what}: the source copy is not the only one in host a");
    let st = proc_state(w.pid);
    assert!(matches!(st, Some('S') | Some('R')), "{what}: source process state {st:?} (stopped?)");
    let before = last_seq(w);
    assert!(
        wait_until(Duration::from_secs(5), || last_seq(w) > before + 50),
        "{what}: the source process stopped logging"
    );
    check_log(&w.log()).unwrap_or_else(|e| panic!("{what}: log broken: {e}"));
    assert!(verify(w, w.pid), "{what}: memory of the source copy changed");
}

const FAST_FAIL: &str = "[tuning]\nidle_timeout_ms = 1500\nkeep_alive_ms = 300\n[limits]\nin_doubt_timeout_s = 10\n";

#[test]
fn migrates_live_workload_without_gap() {
    require_root!();
    let mut c = Cluster::new("mig", "").unwrap();
    c.start().unwrap();
    let w = c.workload(0, 512, 8).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = c.migrate_ok(w.pid, &[]);
    let events = Cluster::events(&out);
    let report = events.iter().find(|e| e["event"] == "report").expect("no report event");
    assert!(events.iter().any(|e| e["event"] == "pass"), "no pass events: {events:?}");
    assert!(report["iterations"].as_u64().unwrap() >= 1);
    assert!(report["page_bytes_sent"].as_u64().unwrap() >= 512 << 20, "{report}");
    let d = &report["downtime"];
    for k in ["freeze_ms", "final_scan_ms", "final_dump_ms", "final_transfer_ms", "restore_finish_ms", "resume_ms"] {
        assert!(d[k].as_f64().is_some(), "downtime lacks {k}: {report}");
    }
    // Exactly one copy, in host b.
    assert!(wait_until(Duration::from_secs(5), || c.copies_in(0).is_empty()), "a copy is left in host a");
    let b = c.copies_in(1);
    assert_eq!(b.len(), 1, "copies in host b: {b:?}");
    // It carries on: the log keeps growing with no gap nor duplicate, and moved namespace once.
    let before = last_seq(&w);
    assert!(wait_until(Duration::from_secs(5), || last_seq(&w) > before + 200), "the migrated process does not log");
    let (_, moves) = check_log(&w.log()).unwrap();
    assert_eq!(moves.len(), 1, "network namespace changes in the log: {moves:?}");
    assert!(verify(&w, b[0]), "memory differs after migration");
    // Pass 0 filled the stub with UFFDIO_COPY, and no userfaultfd
    // registration ("um"/"uw" in VmFlags) is left in the process.
    let log = c.agent_log(1);
    let copied: u64 = log
        .split("copied_bytes=")
        .nth(1)
        .and_then(|t| t.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(copied >= 256 << 20, "first pass barely used UFFDIO_COPY ({copied} bytes):\n{log}");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", b[0])).unwrap();
    let uffd: Vec<&str> =
        smaps.lines().filter(|l| l.starts_with("VmFlags:") && (l.contains(" um") || l.contains(" uw"))).collect();
    assert!(uffd.is_empty(), "userfaultfd registration left in the migrated process: {uffd:?}");
    // Both journals agree on the outcome.
    let status = std::process::Command::new(floe_bin())
        .args(["status", "--json"])
        .env("FLOE_AGENT_SOCKET", c.socket(1))
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(s["recent"].as_array().unwrap().iter().any(|e| e["state"] == "released"), "target journal: {s}");
}

/// The target agent exits at `point` (a test hook): the migration fails and the source runs on.
fn target_dies_at(point: &str, tag: &str) {
    let mut c = Cluster::new(tag, FAST_FAIL).unwrap();
    c.start_agent(0, &[]).unwrap();
    c.start_agent(1, &[("FLOE_TEST_HOOK", &format!("exit-at={point}"))]).unwrap();
    let w = c.workload(0, 128, 4).unwrap();
    let out = c.migrate(0, w.pid, &["--max-downtime", "1000"]);
    assert!(!out.status.success(), "migration with the target dying at {point} succeeded");
    assert_eq!(c.wait_agent(1, Duration::from_secs(10)), Some(99), "target agent did not exit at {point}");
    let err = Cluster::error_of(&out);
    assert!(!err.is_empty(), "no error message");
    assert_source_intact(&c, &w, &format!("target died at {point} ({err})"));
}

#[test]
fn target_agent_dies_mid_precopy() {
    require_root!();
    target_dies_at("precopy", "tdp");
}

#[test]
fn target_agent_dies_mid_final_transfer() {
    require_root!();
    target_dies_at("final", "tdf");
}

#[test]
fn target_agent_dies_just_before_ready() {
    require_root!();
    target_dies_at("ready", "tdr");
}

#[test]
fn network_cut_mid_transfer() {
    require_root!();
    let mut c = Cluster::new("cut", FAST_FAIL).unwrap();
    c.start().unwrap();
    let w = c.workload(0, 512, 4).unwrap();
    let pid = w.pid;
    let t = std::thread::scope(|s| {
        let h = s.spawn(|| c.migrate(0, pid, &[]));
        std::thread::sleep(Duration::from_millis(400));
        c.hosts().cut().unwrap();
        h.join().unwrap()
    });
    assert!(!t.status.success(), "migration over a cut network succeeded");
    let err = Cluster::error_of(&t);
    assert!(err.contains("connection") || err.contains("timed out"), "unexpected error: {err}");
    c.hosts().heal().unwrap();
    assert_source_intact(&c, &w, "network cut");
}

#[test]
fn corrupted_batch_is_refused() {
    require_root!();
    let mut c = Cluster::new("bad", FAST_FAIL).unwrap();
    c.start_agent(0, &[("FLOE_TEST_HOOK", "corrupt-batch=3")]).unwrap();
    c.start_agent(1, &[]).unwrap();
    let w = c.workload(0, 128, 4).unwrap();
    let out = c.migrate(0, w.pid, &[]);
    assert!(!out.status.success(), "a corrupted batch went unnoticed");
    let err = Cluster::error_of(&out);
    assert_mentions(&err, &["checksum"], "corrupted batch error");
    assert_source_intact(&c, &w, "corrupted batch");
    assert!(c.agent_log(1).contains("page batch refused"), "target log:\n{}", c.agent_log(1));
}

#[test]
fn peer_with_certificate_from_another_ca_is_refused() {
    require_root!();
    let mut c = Cluster::new("ca", FAST_FAIL).unwrap();
    // Host b gets a CA and certificate of its own: neither side trusts the other.
    let other = c.dir.path().join("other-pki");
    let f = |args: &[&str]| {
        let o = std::process::Command::new(floe_bin()).args(args).output().unwrap();
        assert!(o.status.success(), "{}", stderr_text(&o));
    };
    f(&["certs", "init", "--dir", other.to_str().unwrap()]);
    f(&["certs", "issue", &c.names[1], "--dir", other.to_str().unwrap()]);
    let cfg = std::fs::read_to_string(c.config(1)).unwrap().replace("/pki/", "/other-pki/");
    std::fs::write(c.config(1), cfg).unwrap();
    c.start().unwrap();
    let w = c.workload(0, 32, 1).unwrap();
    let out = c.migrate(0, w.pid, &[]);
    assert!(!out.status.success());
    let err = Cluster::error_of(&out);
    assert_mentions(&err, &["cannot reach"], "wrong-CA error");
    assert_source_intact(&c, &w, "wrong CA");
    assert!(
        c.agent_log(1).contains("TLS handshake failed") || c.agent_log(1).contains("refused"),
        "target did not log the refused peer:\n{}",
        c.agent_log(1)
    );
}

#[test]
fn peer_speaking_another_protocol_version_is_refused() {
    require_root!();
    let mut c = Cluster::new("ver", FAST_FAIL).unwrap();
    c.start_agent(0, &[("FLOE_TEST_HOOK", "protocol-version=99")]).unwrap();
    c.start_agent(1, &[]).unwrap();
    let w = c.workload(0, 32, 1).unwrap();
    let out = c.migrate(0, w.pid, &[]);
    assert!(!out.status.success());
    let err = Cluster::error_of(&out);
    assert_mentions(&err, &["version 99", "version 1"], "protocol version error");
    assert_source_intact(&c, &w, "protocol version");
}

#[test]
fn file_missing_on_target_is_refused_before_freezing() {
    require_root!();
    let mut c = Cluster::new("miss", FAST_FAIL).unwrap();
    // The workload runs from a directory that host b's agent cannot see
    // (a tmpfs hides it in the agent's own mount namespace).
    let bin = c.dir.path().join("only-on-a");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("migcounter");
    copy_program(&fixture_path("migcounter"), &exe);
    c.start_agent(0, &[]).unwrap();
    let hide = format!("mount -t tmpfs none {} && exec \"$@\"", bin.display());
    c.start_agent_with(1, &[], &["unshare", "-m", "--propagation", "private", "sh", "-c", &hide, "sh"]).unwrap();
    let w = c.workload_at(0, 32, 1, &exe).unwrap();
    let out = c.migrate(0, w.pid, &[]);
    assert!(!out.status.success());
    let err = Cluster::error_of(&out);
    assert_mentions(
        &err,
        &["missing on this host", exe.to_str().unwrap(), "nothing was stopped"],
        "missing file error",
    );
    assert_source_intact(&c, &w, "file missing on target");
}

/// A migration whose target agent exits at `point` of the handover (a test
/// hook), with short timeouts; returns the cluster, the workload and what
/// `floe migrate` printed.
fn in_doubt_at(tag: &str, point: &str) -> (Cluster, Workload, std::process::Output) {
    let cfg = "[tuning]\nidle_timeout_ms = 1500\nkeep_alive_ms = 300\n[limits]\nin_doubt_timeout_s = 3\n";
    let mut c = Cluster::new(tag, cfg).unwrap();
    c.start_agent(0, &[]).unwrap();
    c.start_agent(1, &[("FLOE_TEST_HOOK", &format!("exit-at={point}"))]).unwrap();
    let w = c.workload(0, 64, 2).unwrap();
    let out = c.migrate(0, w.pid, &["--max-downtime", "1000"]);
    (c, w, out)
}

/// The commit's in-doubt window. The target agent dies after releasing the
/// tree (it runs there) but before saying "done": the source keeps its copy
/// frozen, and once the target agent is back and answers "released", kills
/// it. Exactly one copy runs, and the log has no gap and no duplicate.
#[test]
fn in_doubt_after_release_resolves_to_the_target() {
    require_root!();
    let (mut c, w, out) = in_doubt_at("idr", "released");
    assert!(!out.status.success(), "no \"done\" came, yet migrate reported success");
    assert_mentions(&Cluster::error_of(&out), &["in doubt"], "in-doubt error");
    assert_eq!(c.wait_agent(1, Duration::from_secs(10)), Some(99));
    // The target copy runs; the source copy is frozen (never both running).
    assert_eq!(c.copies_in(1).len(), 1, "no copy runs on b");
    let st = proc_state(w.pid);
    assert!(matches!(st, Some('t') | Some('T')), "source copy should be stopped, is {st:?}");
    // The target agent comes back: the source learns "released" and kills its copy.
    c.start_agent(1, &[]).unwrap();
    assert!(wait_until(Duration::from_secs(20), || c.copies_in(0).is_empty()), "the source copy was not killed");
    assert_eq!(c.copies_in(1).len(), 1);
    let before = last_seq(&w);
    assert!(wait_until(Duration::from_secs(5), || last_seq(&w) > before + 50), "the migrated process stopped");
    let (_, moves) = check_log(&w.log()).unwrap();
    assert_eq!(moves.len(), 1, "the log moved namespaces {moves:?}");
}

/// The target agent dies after journalling "releasing" but before the tree
/// was let go: the kernel kills the stopped tree (EXITKILL), the target's
/// journal says "releasing" with no live process, so the source resumes
/// its own copy.
#[test]
fn in_doubt_before_release_resolves_to_the_source() {
    require_root!();
    let (mut c, w, out) = in_doubt_at("idb", "releasing");
    assert!(!out.status.success());
    assert_eq!(c.wait_agent(1, Duration::from_secs(10)), Some(99));
    assert!(wait_until(Duration::from_secs(10), || c.copies_in(1).is_empty()), "a copy runs on b");
    c.start_agent(1, &[]).unwrap();
    // The source agent keeps asking; the answer ("discarded") resumes its copy.
    assert!(
        wait_until(Duration::from_secs(20), || matches!(proc_state(w.pid), Some('S') | Some('R'))),
        "the source copy was not resumed: {:?}",
        proc_state(w.pid)
    );
    assert_source_intact(&c, &w, "in doubt before release");
}

/// A process that keeps changing the advice of a whole mapping (which
/// /proc/PID/maps does not show) migrates with the flags it had at the
/// freeze: its own check after the restore finds what it last asked for.
#[test]
fn vm_flags_changed_during_precopy_are_exact_after_migration() {
    require_root!();
    let mut c = Cluster::new("mvf", "").unwrap();
    c.start().unwrap();
    let w = c.workload_at(0, 1, 0, &fixture_path("advise")).unwrap();
    let stats = |w: &floe_tests::cluster::Workload| -> (u64, u64) {
        let f = w.dir.join("stats");
        let _ = std::fs::remove_file(&f);
        send_signal(w.pid, libc::SIGUSR1).unwrap();
        assert!(wait_for_file(&f, Duration::from_secs(10)), "no stats from the workload");
        let text = std::fs::read_to_string(&f).unwrap();
        let get = |k: &str| {
            text.split_whitespace().find_map(|kv| kv.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
        };
        (get("checks="), get("mismatches="))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(&w).1, 0, "the workload sees wrong flags before any migration");
    c.migrate_ok(w.pid, &[]);
    let (n0, _) = stats(&w);
    assert!(wait_until(Duration::from_secs(10), || stats(&w).0 > n0 + 50), "the migrated workload does not run");
    let (n, bad) = stats(&w);
    assert_eq!(bad, 0, "after {n} checks the migrated workload found flags it had not set");
}

/// A process whose executable and a mapped file were deleted while it ran
/// (a package upgrade replaced them) migrates: the source sends both files
/// before the first pass, and the target maps them in its staged tree. The
/// moved process reads the same bytes through its private, copy-on-write
/// and shared mappings, its descriptor and shared mapping are one file, and
/// it is still in a removed working directory.
#[test]
fn deleted_executable_and_mapped_file_migrate() {
    require_root!();
    let mut c = Cluster::new("del", FAST_FAIL).unwrap();
    c.start().unwrap();
    let dir = c.dir.path().join("deleted");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("deleted_maps.copy");
    copy_program(&fixture_path("deleted_maps"), &exe);
    let (ready, report) = (dir.join("ready"), dir.join("report"));
    let args: Vec<std::ffi::OsString> = vec![
        "--ready".into(),
        ready.clone().into(),
        "--report".into(),
        report.clone().into(),
        "--data".into(),
        dir.join("data.bin").into(),
        "--self".into(),
        exe.clone().into(),
        "--cwd".into(),
        dir.join("gone").into(),
    ];
    let pid = c.spawn_in(0, &exe, &args, &[], &dir, &ready).unwrap();
    let log = dir.join("err");
    let ok = |r: &Report, what: &str| {
        for k in ["ro_ok", "cow_ok", "sh_ok", "fd_sees_sh", "sh_to_fd"] {
            assert_eq!(r[k], "1", "{what}: {k} in {r:?}");
        }
        assert_eq!(r["nlink"], "0", "{what}: {r:?}");
        assert!(r["exe"].ends_with(" (deleted)"), "{what}: exe link {:?}", r["exe"]);
        assert_eq!(r["cwd"], format!("{}/gone (deleted)", dir.display()), "{what}: working directory");
    };
    ok(&request_report(pid, &report, libc::SIGUSR1, &log), "before the migration");
    let out = c.migrate_ok(pid, &[]);
    assert!(Cluster::events(&out).iter().any(|e| e["event"] == "report"), "no report");
    assert!(wait_until(Duration::from_secs(5), || !pid_alive(pid)), "the source copy still runs");
    let comm = |p: &i32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let moved: Vec<i32> =
        c.host(1).pids().unwrap().into_iter().filter(|p| comm(p).starts_with("deleted_maps")).collect();
    assert_eq!(moved.len(), 1, "copies in host b: {moved:?}");
    let _ = std::fs::remove_file(&report);
    ok(&request_report(moved[0], &report, libc::SIGUSR1, &log), "after the migration");
    assert!(c.agent_log(0).contains("sending a deleted file"), "source did not send the deleted files");
}
