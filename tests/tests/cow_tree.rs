//! A tree whose children share the root's memory copy-on-write while the
//! root's mapping has other bounds than the children's (the root's private
//! region merged with the shared one into a single mapping): after restore,
//! every process must see exactly its memory. (Found by bench/tree.sh: the
//! shared region came back zero in the children.)
use floe_tests::*;
use std::process::Stdio;
use std::time::Duration;

/// Dumps the tree rooted at `fx` into `img` (which kills it), waits until
/// every one of `pids` is gone, restores it and puts `pids` in `guard`.
fn dump_and_restore_tree(fx: &mut Fixture, img: &std::path::Path, pids: &[i32], guard: &mut TreeGuard) {
    assert_ok(&dump(fx.pid, img, &[]), "dump of the tree");
    fx.reap(Duration::from_secs(10));
    for p in pids {
        assert!(wait_pid_gone(*p, Duration::from_secs(10)), "pid {p} still exists after the dump");
    }
    assert_ok(&restore_detached(img, &[], Stdio::null()), "restore of the tree");
    guard.add_all(pids);
}

fn kv(line: &str, key: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap_or_default().to_string()
}

#[test]
fn cow_shared_memory_with_different_mapping_bounds() {
    require_root!();
    let td = TestDir::new("cow-tree");
    let ready = td.join("ready");
    // 4 processes, 16 MiB filled by the root before forking, 2 MiB private each.
    let mut fx =
        Spawn::fixture("cowtree", td.path()).arg("4").arg("16").arg("2").arg(&ready).ready_file(&ready).spawn();
    let line = std::fs::read_to_string(&ready).expect("ready file");
    let pids: Vec<i32> = kv(&line, "pids").split(',').filter_map(|p| p.parse().ok()).collect();
    let sums: Vec<String> = kv(&line, "sums").split(',').map(str::to_string).collect();
    let shared = kv(&line, "shared");
    assert_eq!(pids.len(), 4, "{line}");
    let mut guard = TreeGuard::new();
    guard.add_all(&pids);

    dump_and_restore_tree(&mut fx, &td.join("img"), &pids, &mut guard);
    for (p, sum) in pids.iter().zip(&sums) {
        let check = td.join(format!("ready.check.{p}"));
        send_signal(*p, libc::SIGUSR1).expect("SIGUSR1");
        assert!(wait_for_file(&check, Duration::from_secs(10)), "pid {p} did not report");
        let got = std::fs::read_to_string(&check).expect("check file");
        assert_eq!(kv(&got, "shared"), shared, "pid {p}: shared (copy-on-write) memory differs after restore");
        assert_eq!(&kv(&got, "priv"), sum, "pid {p}: private memory differs after restore");
    }
    guard.kill_all();
}

/// A tree whose root maps memory with MADV_DONTFORK and MADV_WIPEONFORK
/// before forking: the children never had the first and filled the second
/// themselves. After restore each process has exactly its own.
#[test]
fn fork_advice_regions_come_back_per_process() {
    require_root!();
    let td = TestDir::new("cow-tree-advice");
    let ready = td.join("ready");
    let mut fx = Spawn::fixture("cowtree", td.path())
        .arg("3")
        .arg("4")
        .arg("1")
        .arg(&ready)
        .env("COWTREE_FORK_ADVICE", "1")
        .ready_file(&ready)
        .spawn();
    let line = std::fs::read_to_string(&ready).expect("ready file");
    let pids: Vec<i32> = kv(&line, "pids").split(',').filter_map(|p| p.parse().ok()).collect();
    assert_eq!(pids.len(), 3, "{line}");
    let mut guard = TreeGuard::new();
    guard.add_all(&pids);
    let check = |p: i32| {
        let f = td.join(format!("ready.check.{p}"));
        let _ = std::fs::remove_file(&f);
        send_signal(p, libc::SIGUSR1).expect("SIGUSR1");
        assert!(wait_for_file(&f, Duration::from_secs(10)), "pid {p} did not report");
        kv(&std::fs::read_to_string(&f).expect("check file"), "forkadvice")
    };
    for p in &pids {
        assert_eq!(check(*p), "ok", "pid {p} before the dump");
    }
    dump_and_restore_tree(&mut fx, &td.join("img"), &pids, &mut guard);
    for p in &pids {
        assert_eq!(check(*p), "ok", "pid {p} after restore");
    }
    guard.kill_all();
}
