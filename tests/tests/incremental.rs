//! End-to-end: incremental checkpoints. `floe pre-dump` while a process keeps
//! rewriting its memory, `floe dump --prev-images-dir` chains built with
//! `--track-mem`, restore from every depth of a chain, `floe dedup`, broken
//! chains (parent missing, replaced, corrupted, or without per-page
//! checksums) and content deduplication. Needs root; skipped otherwise.
//!
//! The workload is the `rewriter` fixture (tests/fixtures/rewriter.c): a big
//! anonymous region whose pages are rewritten at a steady rate or in batches
//! on SIGHUP; its reports carry a checksum of the whole region, so "restored
//! state == state at the dump" is checked from inside the restored process.
//!
//! The pre-dump and chain scenarios run once with `--dirty-tracker hash` and
//! once with `--dirty-tracker uffd` (`*_uffd`, which print SKIPPED while
//! `floe dump --dirty-tracker uffd` is refused as "not available in this
//! build"); the other tests use the default tracker (auto).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// First word of every page of a `--fill random` region (rewriter.c).
const PAGE_MAGIC: u64 = 0x3130_4547_4150_5752;
const PAGE: usize = 4096;

// ---------------------------------------------------------------------------
// the rewriter fixture

struct Rewriter {
    fx: Fixture,
    ready: PathBuf,
    report_path: PathBuf,
    freeze_path: PathBuf,
}

impl Rewriter {
    /// Starts `rewriter` in `dir` with a region of `size_mb` MiB rewritten at
    /// `rate` pages/s (0: only on SIGHUP, `batch` pages per batch), filled
    /// with `fill` ("random" or a byte value).
    fn spawn(dir: &Path, size_mb: u64, rate: u64, fill: &str, batch: u64) -> Self {
        let (ready, report_path, freeze_path) =
            (dir.join("rewriter.ready"), dir.join("rewriter.report"), dir.join("rewriter.freeze"));
        let fx = Spawn::fixture("rewriter", dir)
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .arg("--freeze-report")
            .arg(&freeze_path)
            .arg("--size-mb")
            .arg(size_mb.to_string())
            .arg("--rate")
            .arg(rate.to_string())
            .arg("--fill")
            .arg(fill)
            .arg("--batch")
            .arg(batch.to_string())
            .ready_file(&ready)
            .spawn();
        Self { fx, ready, report_path, freeze_path }
    }

    fn pid(&self) -> i32 {
        self.fx.pid
    }

    /// SIGUSR1: the current state (checksum of the region, write counter).
    fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// SIGHUP: one more batch of page rewrites; returns the report written after it.
    fn batch(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGHUP, &self.fx.log)
    }

    /// SIGUSR2: stop writing for good; returns the checksum at that point.
    fn stop_writing(&self) -> Report {
        request_report(self.fx.pid, &self.freeze_path, libc::SIGUSR2, &self.fx.log)
    }

    /// Text that appears in the command line of this fixture instance only.
    fn needle(&self) -> String {
        self.ready.to_string_lossy().into_owned()
    }
}

// ---------------------------------------------------------------------------
// floe runs and their JSON reports

/// The figures of a `floe dump --json` / `floe pre-dump --json` report.
#[derive(Debug, Clone)]
struct Figures {
    page_bytes: u64,
    reused_pages: u64,
    frozen_ms: f64,
    total_ms: f64,
    tracker: String,
}

fn figures(out: &Output, what: &str) -> Figures {
    assert_ok(out, what);
    let v = parse_json_stdout(out);
    let num = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("{what}: no number {k} in {v}"))
    };
    let ms = |k: &str| {
        v.get("timings")
            .and_then(|t| t.get(k))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{what}: no timings.{k} in {v}"))
    };
    Figures {
        page_bytes: num(&v, "page_bytes"),
        reused_pages: num(&v, "reused_pages"),
        frozen_ms: ms("frozen_ms"),
        total_ms: ms("total_ms"),
        tracker: v.get("dirty_tracker").and_then(|t| t.as_str()).unwrap_or("?").to_owned(),
    }
}

/// `--dirty-tracker T` when a tracker is forced.
fn tracker_args(tracker: Option<&str>) -> Vec<&str> {
    tracker.map(|t| vec!["--dirty-tracker", t]).unwrap_or_default()
}

/// `floe pre-dump -t PID -D DIR --json [--prev-images-dir PREV] [--dirty-tracker T]`.
fn pre_dump(pid: i32, dir: &Path, prev: Option<&str>, tracker: Option<&str>) -> Output {
    let mut args: Vec<OsString> =
        vec!["pre-dump".into(), "-t".into(), pid.to_string().into(), "-D".into(), dir.into(), "--json".into()];
    if let Some(p) = prev {
        args.extend(["--prev-images-dir".into(), p.into()]);
    }
    args.extend(tracker_args(tracker).into_iter().map(OsString::from));
    floe(&args)
}

/// `floe dump -t PID -D DIR --json EXTRA... [--dirty-tracker T]`.
fn dump_json(pid: i32, dir: &Path, extra: &[&str], tracker: Option<&str>) -> Output {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    args.extend(tracker_args(tracker));
    dump(pid, dir, &args)
}

/// Whether `floe dump --dirty-tracker uffd` works in this build: dumps a
/// `sleep` with it. False when floe refuses the tracker as "not available
/// in this build"; any other failure is a test failure.
fn uffd_tracker_works(td: &TestDir) -> bool {
    let mut fx = Spawn::program("uffd-probe", "sleep", td.path()).arg("1000").spawn();
    assert!(wait_until(Duration::from_secs(5), || proc_state(fx.pid) == Some('S')));
    let out = dump(fx.pid, &td.join("uffd-probe"), &["--leave-running", "--track-mem", "--dirty-tracker", "uffd"]);
    fx.kill_child();
    if out.status.success() {
        return true;
    }
    let err = assert_failed_cleanly(&out, "probe: dump --dirty-tracker uffd");
    assert!(
        err.contains("not available in this build"),
        "floe dump --dirty-tracker uffd failed for another reason than the tracker being unavailable:\n{err}"
    );
    false
}

/// Prints the SKIPPED line of a uffd variant.
fn skip_uffd(test: &str) {
    eprintln!("SKIPPED {test}: `floe dump --dirty-tracker uffd` is not available in this build");
}

// ---------------------------------------------------------------------------
// restore helpers

/// Restores `dir` (detached), registers the process for cleanup and checks
/// from inside it that its state (region checksum, counters) is `expected`.
fn restore_expecting(rw: &mut Rewriter, dir: &Path, expected: &Report, what: &str) -> Report {
    restore_and_adopt(&mut rw.fx, dir, &[], Stdio::null());
    let r = rw.report();
    assert_reports_equal(expected, &r, &[], what);
    r
}

/// Kills the restored incarnation and waits until its pid is free again.
fn kill_restored(rw: &mut Rewriter) {
    rw.fx.kill_all();
    assert!(wait_pid_gone(rw.pid(), GONE_TIMEOUT), "restored pid {} did not vanish", rw.pid());
}

/// Asserts `floe restore -D dir` fails cleanly mentioning one of `needles`
/// and leaves no process behind. Returns the (lower-cased) message.
fn restore_refused(rw: &mut Rewriter, dir: &Path, needles: &[&str], what: &str) -> String {
    let out = restore_detached(dir, &[], Stdio::null());
    rw.fx.adopt_restored(); // cleanup even if it wrongly created one
    let err = assert_failed_cleanly(&out, what);
    assert_mentions(&err, needles, what);
    assert_no_process(rw.pid(), what);
    assert_eq!(pids_with_cmdline_containing(&rw.needle()), Vec::<i32>::new(), "{what}: a process was left behind");
    err
}

// ---------------------------------------------------------------------------
// page images

/// (offset in pages.img, page index, write counter) of every page of a
/// `--fill random` rewriter region stored in `dir`'s pages.img (page data is
/// 4096-aligned in pages.img).
fn region_pages_in(dir: &Path) -> Vec<(u64, u64, u64)> {
    let data = fs::read(dir.join("pages.img")).unwrap();
    let word = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    data.chunks_exact(PAGE)
        .enumerate()
        .filter(|(_, pg)| word(pg, 0) == PAGE_MAGIC)
        .map(|(k, pg)| ((k * PAGE) as u64, word(pg, 1), word(pg, 2)))
        .collect()
}

/// Allocated bytes of a file (holes punched by dedup do not count).
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / MIB as f64)
}

// ---------------------------------------------------------------------------
// 1. pre-dumps of a process rewriting 256 MiB

const REGION_MB: u64 = 256;
const RATE: u64 = 2000;

/// The scenario: three pre-dumps (each on the previous one) of a
/// process rewriting random pages of a 256 MiB region at 2000 pages/s, then
/// it stops writing (SIGUSR2 logs the region's checksum at that point), the
/// final `dump --prev-images-dir` kills it, and the restored region is
/// byte-identical to that checksum. The incremental images write far fewer
/// bytes than the first (full) one.
fn predump_chain_scenario(test: &str, tracker: Option<&str>) {
    let td = TestDir::new("inc-predump");
    if tracker == Some("uffd") && !uffd_tracker_works(&td) {
        skip_uffd(test);
        return;
    }
    let mut rw = Rewriter::spawn(td.path(), REGION_MB, RATE, "random", 64);
    let pid = rw.pid();
    assert!(
        wait_until(Duration::from_secs(10), || report_num(&rw.report(), "writes") >= RATE / 2),
        "rewriter is not rewriting pages:\n{}",
        rw.fx.log_contents()
    );

    let first = rw.report();
    let mut figs: Vec<(String, Figures)> = Vec::new();
    let mut writes = vec![report_num(&first, "writes")];
    let mut prev: Option<String> = None;
    for i in 1..=3 {
        let name = format!("pre{i}");
        let out = pre_dump(pid, &td.join(&name), prev.as_deref(), tracker);
        let f = figures(&out, &format!("pre-dump {name}"));
        assert!(rw.fx.child_running(), "pre-dump {name} killed the process:\n{}", rw.fx.log_contents());
        assert_running_untouched(pid, &format!("after pre-dump {name}"));
        if let Some(t) = tracker {
            assert_eq!(f.tracker, t, "pre-dump {name} used another tracker");
        }
        // The process keeps writing between (and during) the pre-dumps.
        std::thread::sleep(Duration::from_millis(300));
        let w = report_num(&rw.report(), "writes");
        assert!(w > *writes.last().unwrap(), "rewriter stopped writing after pre-dump {name}");
        writes.push(w);
        figs.push((name.clone(), f));
        prev = Some(format!("../{name}"));
    }
    // A pre-dump cannot be restored (the process still runs; refused anyway before any pid is needed).
    let out = restore_detached(&td.join("pre3"), &[], Stdio::null());
    let err = assert_failed_cleanly(&out, "restore of a pre-dump");
    assert_mentions(&err, &["pre-dump"], "restore of a pre-dump");
    assert_running_untouched(pid, "after the refused restore of a pre-dump");

    // Freeze the region's content and log its checksum; then the final dump.
    let at_freeze = rw.stop_writing();
    assert_eq!(at_freeze["stopped"], "1");
    assert_ne!(at_freeze["checksum"], first["checksum"], "the region did not change while pre-dumping");
    let fin = td.join("final");
    let out = dump_json(pid, &fin, &["--prev-images-dir", "../pre3"], tracker);
    let f = figures(&out, "final dump --prev-images-dir ../pre3");
    figs.push(("final".into(), f));
    rw.fx.reap(Duration::from_secs(10));
    assert_image_files(&fin);

    // Restoring the pre-dump now (its pid is free) is refused and creates nothing.
    restore_refused(&mut rw, &td.join("pre2"), &["pre-dump"], "restore of a pre-dump while the pid is free");

    let after = restore_expecting(&mut rw, &fin, &at_freeze, "region after restore vs at the final freeze");
    assert_eq!(after["stopped"], "1");
    assert_eq!(report_num(&after, "pid"), pid as u64);
    // Still alive and answering after the check.
    std::thread::sleep(Duration::from_millis(200));
    assert!(pid_alive(pid), "restored rewriter died:\n{}", rw.fx.log_contents());

    let full = figs[0].1.page_bytes;
    let mut lines = Vec::new();
    for (name, f) in &figs {
        lines.push(format!(
            "  {name:6} page_bytes {:>11} ({}), reused_pages {:>6}, frozen_ms {:8.1}, total_ms {:8.1}, tracker {}",
            f.page_bytes,
            mib(f.page_bytes),
            f.reused_pages,
            f.frozen_ms,
            f.total_ms,
            f.tracker
        ));
    }
    eprintln!(
        "FIGURES {test} ({} MiB region, {RATE} pages/s; writes seen {writes:?}, {} at the freeze):\n{}",
        REGION_MB,
        at_freeze["writes"],
        lines.join("\n")
    );
    assert!(full >= REGION_MB * MIB, "the first pre-dump should hold the whole region: {}", mib(full));
    for (name, f) in &figs[1..] {
        assert!(
            f.page_bytes * 4 < full,
            "{name} wrote {} but the full pre-dump wrote {}: unchanged pages were stored again",
            mib(f.page_bytes),
            mib(full)
        );
        assert!(f.reused_pages > 0, "{name} reused no page of its parent");
    }
    let last = &figs.last().unwrap().1;
    assert!(last.page_bytes * 8 < full, "the final dump (writes stopped) wrote {}", mib(last.page_bytes));
}

#[test]
fn predump_chain_restores_state_at_freeze_hash() {
    require_root!();
    predump_chain_scenario("predump_chain_restores_state_at_freeze_hash", Some("hash"));
}

#[test]
fn predump_chain_restores_state_at_freeze_uffd() {
    require_root!();
    predump_chain_scenario("predump_chain_restores_state_at_freeze_uffd", Some("uffd"));
}

// ---------------------------------------------------------------------------
// 2. chains: every depth restorable, then dedup

/// A (full, --track-mem --leave-running) <- B (--track-mem --leave-running)
/// <- C (final, kills): each of C, B, A restores its own state; after
/// `floe dedup -D C`, C still restores identically while B and A alone fail
/// with a checksum error and create no process.
fn chain_scenario(test: &str, tracker: Option<&str>) {
    let td = TestDir::new("inc-chain");
    if tracker == Some("uffd") && !uffd_tracker_works(&td) {
        skip_uffd(test);
        return;
    }
    let mut rw = Rewriter::spawn(td.path(), 32, 0, "random", 64);
    let pid = rw.pid();
    let (a, b, c) = (td.join("A"), td.join("B"), td.join("C"));

    let state_a = rw.report();
    let fa = figures(&dump_json(pid, &a, &["--track-mem", "--leave-running"], tracker), "dump A");
    assert_running_untouched(pid, "after dump A");

    let state_b = rw.batch(); // rewrites 64 pages
    assert_eq!(report_num(&state_b, "hups"), 1);
    assert_ne!(state_b["checksum"], state_a["checksum"], "batch 1 did not change the region");
    let fb = figures(
        &dump_json(pid, &b, &["--track-mem", "--leave-running", "--prev-images-dir", "../A"], tracker),
        "dump B",
    );
    assert_running_untouched(pid, "after dump B");

    let state_c = rw.batch(); // rewrites the same 64 pages and 64 more
    assert_eq!(report_num(&state_c, "hups"), 2);
    let fc = figures(&dump_json(pid, &c, &["--prev-images-dir", "../B"], tracker), "dump C");
    rw.fx.reap(Duration::from_secs(10));
    eprintln!(
        "FIGURES {test}: A page_bytes {} ({}), B {} ({}, reused {}), C {} ({}, reused {})",
        fa.page_bytes,
        mib(fa.page_bytes),
        fb.page_bytes,
        mib(fb.page_bytes),
        fb.reused_pages,
        fc.page_bytes,
        mib(fc.page_bytes),
        fc.reused_pages
    );
    assert!(fa.page_bytes >= 32 * MIB, "A should hold the whole region: {}", mib(fa.page_bytes));
    for (name, f) in [("B", &fb), ("C", &fc)] {
        assert!(f.page_bytes * 8 < fa.page_bytes, "{name} wrote {}, A {}", mib(f.page_bytes), mib(fa.page_bytes));
        assert!(f.reused_pages >= 7000, "{name} reused only {} pages", f.reused_pages);
    }

    // Every depth restores its own state.
    restore_expecting(&mut rw, &c, &state_c, "restore from C");
    kill_restored(&mut rw);
    restore_expecting(&mut rw, &b, &state_b, "restore from B");
    kill_restored(&mut rw);
    restore_expecting(&mut rw, &a, &state_a, "restore from A");
    kill_restored(&mut rw);

    // dedup: the parents keep only what C references.
    let before = (allocated(&a.join("pages.img")), allocated(&b.join("pages.img")));
    let out = floe(&["dedup", "-D", c.to_str().unwrap()]);
    assert_ok(&out, "floe dedup -D C");
    let after = (allocated(&a.join("pages.img")), allocated(&b.join("pages.img")));
    eprintln!("dedup: A pages.img {} -> {}, B {} -> {}", mib(before.0), mib(after.0), mib(before.1), mib(after.1));
    assert!(after.0 < before.0, "dedup freed nothing in A");
    assert!(after.1 < before.1, "dedup freed nothing in B");

    restore_expecting(&mut rw, &c, &state_c, "restore from C after dedup");
    kill_restored(&mut rw);
    restore_refused(&mut rw, &b, &["deduplicated"], "restore of B alone after dedup");
    restore_refused(&mut rw, &a, &["deduplicated"], "restore of A alone after dedup");
    // C is still fine after those failures.
    restore_expecting(&mut rw, &c, &state_c, "restore from C after the refused ones");
}

#[test]
fn chain_every_depth_restores_then_dedup_hash() {
    require_root!();
    chain_scenario("chain_every_depth_restores_then_dedup_hash", Some("hash"));
}

#[test]
fn chain_every_depth_restores_then_dedup_uffd() {
    require_root!();
    chain_scenario("chain_every_depth_restores_then_dedup_uffd", Some("uffd"));
}

// ---------------------------------------------------------------------------
// 3. broken chains

/// A child image whose parent is renamed, corrupted at a page the child
/// references, or rewritten by another dump (--force) is refused cleanly and
/// creates no process; a parent without per-page checksums is refused at
/// dump time and the process keeps running.
#[test]
fn broken_chains_are_refused() {
    require_root!();
    let td = TestDir::new("inc-broken");
    let mut rw = Rewriter::spawn(td.path(), 16, 0, "random", 32);
    let pid = rw.pid();
    let (parent, child) = (td.join("parent-img"), td.join("child-img"));

    assert_ok(&dump(pid, &parent, &["--track-mem", "--leave-running"]), "dump of the parent");
    let state = rw.batch();
    assert_ok(
        &dump(pid, &child, &["--track-mem", "--leave-running", "--prev-images-dir", "../parent-img"]),
        "dump of the child",
    );
    assert_running_untouched(pid, "after the child dump");

    // A parent taken without per-page checksums: refused, process untouched.
    let plain = td.join("plain-img");
    assert_ok(&dump(pid, &plain, &["--leave-running"]), "plain dump");
    for (cmd, dir) in [("dump", "on-plain"), ("pre-dump", "pre-on-plain")] {
        let mut args: Vec<OsString> = vec![cmd.into(), "-t".into(), pid.to_string().into(), "-D".into()];
        args.push(td.join(dir).into());
        args.extend(["--prev-images-dir".into(), "../plain-img".into()]);
        if cmd == "dump" {
            args.push("--leave-running".into());
        }
        let out = floe(&args);
        let what = format!("{cmd} --prev-images-dir on an image without --track-mem");
        let err = assert_failed_cleanly(&out, &what);
        assert_mentions(&err, &["pre-dump"], &what);
        assert_mentions(&err, &["track-mem"], &what);
        assert!(!td.join(dir).join("manifest.img").exists(), "{what}: an image was written");
        assert!(rw.fx.child_running(), "{what}: the process died:\n{}", rw.fx.log_contents());
        assert_running_untouched(pid, &what);
    }
    let still = rw.report();
    assert_reports_equal(&state, &still, &[], "process after the refused dumps");
    rw.fx.kill_child();
    assert!(wait_pid_gone(pid, GONE_TIMEOUT));

    // 1. parent directory renamed.
    let moved = td.join("parent-moved");
    fs::rename(&parent, &moved).unwrap();
    let err = restore_refused(&mut rw, &child, &["parent"], "restore with the parent renamed");
    assert_mentions(&err, &["parent-img"], "restore with the parent renamed (names the parent)");
    fs::rename(&moved, &parent).unwrap();

    // 2. a byte flipped in the parent's pages.img, in a page the child references.
    let in_child: std::collections::HashSet<u64> = region_pages_in(&child).iter().map(|p| p.1).collect();
    let candidates: Vec<(u64, u64, u64)> =
        region_pages_in(&parent).into_iter().filter(|(_, idx, w)| *w == 0 && !in_child.contains(idx)).collect();
    assert!(
        candidates.len() > 3000,
        "expected most of the 4096 region pages unchanged in the parent and not stored in the child, found {}",
        candidates.len()
    );
    let (off, idx, _) = candidates[candidates.len() / 2];
    let at = off + 2048;
    let pages = fs::OpenOptions::new().read(true).write(true).open(parent.join("pages.img")).unwrap();
    let mut byte = [0u8; 1];
    pages.read_exact_at(&mut byte, at).unwrap();
    pages.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    pages.sync_all().unwrap();
    eprintln!("flipped the byte at {at:#x} of parent-img/pages.img (region page {idx})");
    restore_refused(&mut rw, &child, &["checksum"], "restore with a corrupted page in the parent");
    pages.write_all_at(&byte, at).unwrap();
    pages.sync_all().unwrap();
    drop(pages);

    // Intact again: the chain restores.
    restore_expecting(&mut rw, &child, &state, "restore of the repaired chain");

    // 3. the parent rewritten by another dump (--force): a different image id.
    assert_ok(&dump(pid, &parent, &["--track-mem", "--leave-running", "--force"]), "dump --force over the parent");
    kill_restored(&mut rw);
    restore_refused(&mut rw, &child, &["replaced", "rewritten"], "restore with the parent replaced");
}

// ---------------------------------------------------------------------------
// 4. content deduplication

/// 64 MiB of identical pages dumped with --track-mem are stored once.
#[test]
fn identical_pages_are_stored_once() {
    require_root!();
    let td = TestDir::new("inc-dedup");
    let mut rw = Rewriter::spawn(td.path(), 64, 0, "0x5a", 64);
    let before = rw.report();
    assert_eq!(before["uniform"], "1", "the fixture region is not uniform: {before:?}");
    let img = td.join("img");
    let f = figures(&dump_json(rw.pid(), &img, &["--track-mem"], None), "dump --track-mem");
    rw.fx.reap(Duration::from_secs(10));
    eprintln!(
        "FIGURES identical_pages_are_stored_once: page_bytes {} ({}), reused_pages {}, pages.img {}",
        f.page_bytes,
        mib(f.page_bytes),
        f.reused_pages,
        mib(fs::metadata(img.join("pages.img")).unwrap().len())
    );
    assert!(f.page_bytes < 2 * MIB, "64 MiB of identical pages took {}", mib(f.page_bytes));
    assert!(f.reused_pages >= 64 * MIB / PAGE as u64 - 1, "only {} pages were deduplicated", f.reused_pages);
    assert!(fs::metadata(img.join("pages.img")).unwrap().len() < 4 * MIB);
    let after = restore_expecting(&mut rw, &img, &before, "uniform region after restore");
    assert_eq!(after["uniform"], "1");
}
