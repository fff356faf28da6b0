//! `floe check`: exercises every kernel mechanism the engine relies on, on the
//! running kernel, and reports what works and what a missing piece disables.
//!
//! Every probe is real (it makes the calls the engine will make), fast (the whole
//! run takes a few milliseconds), isolated (a failing or panicking probe only marks
//! its own feature) and cleans up every child, fd and mapping it creates, because
//! those are owned by guards from [`crate::sys::probe`].

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys::memory::{self, PageRegion, ScanQuery};
use crate::sys::probe::{self, AnonMapping, AsyncWpUffd, Child, SysError, WaitEvent};
use crate::sys::{task, track};

/// Result of `floe check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// One entry per probed feature.
    pub features: Vec<FeatureCheck>,
    /// Best available dirty-page tracker: `"uffd"`, `"soft-dirty"` or `"hash"`.
    pub dirty_tracker: String,
}

/// Outcome of one probe.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureCheck {
    /// Short feature name, e.g. `"ptrace"`.
    pub name: String,
    /// Whether the probe succeeded.
    pub ok: bool,
    /// Whether floe cannot work without it.
    pub required: bool,
    /// Measured facts: what the probe saw, or the error, and how long it took.
    pub detail: String,
    /// What is lost when the feature is missing.
    pub disables: String,
}

impl CheckReport {
    /// True when every required feature works.
    pub fn looks_good(&self) -> bool {
        self.features.iter().all(|f| f.ok || !f.required)
    }

    /// Human-readable report. It ends with a "Looks good" line when
    /// [`looks_good`](Self::looks_good); otherwise it lists each missing feature
    /// and what it disables.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "kernel: {}", self.kernel);
        let label = |f: &FeatureCheck| {
            if f.required {
                f.name.clone()
            } else {
                format!("{} (optional)", f.name)
            }
        };
        let width = self.features.iter().map(|f| label(f).len()).max().unwrap_or(0);
        for f in &self.features {
            let mark = match (f.ok, f.required) {
                (true, _) => "ok  ",
                (false, true) => "FAIL",
                (false, false) => "no  ",
            };
            let _ = writeln!(out, "  {mark}  {:<width$}  {}", label(f), f.detail);
        }
        let _ = writeln!(out, "dirty tracker: {}", self.dirty_tracker);
        for f in self.features.iter().filter(|f| !f.ok && !f.required) {
            let _ = writeln!(out, "no {}: {}", f.name, f.disables);
        }
        let missing: Vec<&FeatureCheck> = self.features.iter().filter(|f| !f.ok && f.required).collect();
        if missing.is_empty() {
            out.push_str("Looks good\n");
        } else {
            let _ = writeln!(out, "missing required features:");
            for f in &missing {
                let _ = writeln!(out, "  no {}: {} ({})", f.name, f.disables, f.detail);
            }
            let _ = writeln!(
                out,
                "Not ready: {} required feature{} missing",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" }
            );
        }
        out
    }
}

/// Runs every probe and collects the report. Never panics: a probe that fails or
/// panics is reported as a missing feature.
pub fn run_checks() -> CheckReport {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({})", probe::describe_io(&e)));

    let mut features = vec![
        run_probe("ptrace", true, "tasks cannot be seized or stopped: no checkpoint", probe_ptrace),
        run_probe("pidfd-getfd", true, "fds of running tasks cannot be taken: no fd dump", probe_pidfd),
        run_probe("clone3-set-tid", true, "tasks cannot be restored with their original pids", probe_clone3),
        run_probe(
            "pr-set-mm-map",
            true,
            "the mm layout (brk, args, env, auxv, exe link) cannot be restored",
            probe_set_mm_map,
        ),
        run_probe("uffd-wp", true, "", probe_uffd_wp),
        run_probe("vdso-layout", true, "the vdso block cannot be placed where restored tasks had it", probe_vdso),
    ];
    let (caps, sys_resource) = check_caps();
    features.push(caps);
    features.push(sys_resource);
    features.push(run_probe("soft-dirty", false, "", probe_soft_dirty));
    features.push(run_probe("tcp-repair", false, "--tcp-established is unavailable", probe_tcp_repair));
    features.push(run_probe("nftables", false, "no TCP connection lock during migration", probe_nftables));
    features.push(run_probe(
        "nflog-capture",
        false,
        "what peers send during a migration's freeze waits for their retransmission (>= 200 ms)",
        probe_capture,
    ));
    features.push(run_probe(
        "uffd-copy",
        false,
        "restore and a migration's first pass write pages with process_vm_writev (about a third more CPU per page)",
        probe_uffd_copy,
    ));
    features.push(run_probe(
        "ebpf-syscall-watch",
        false,
        "a migration's final freeze reads /proc/PID/smaps (about 15 ms more downtime per GiB)",
        probe_syscall_watch,
    ));
    features.push(run_probe(
        "cgroup-freezer",
        false,
        "trees are not frozen before seizing: tasks are seized one by one",
        probe_freezer,
    ));

    let works = |name: &str| features.iter().any(|f| f.name == name && f.ok);
    let dirty_tracker = if works("uffd-wp") {
        "uffd"
    } else if works("soft-dirty") {
        "soft-dirty"
    } else {
        "hash"
    };
    let fallback =
        if dirty_tracker == "hash" { "pre-dump falls back to page hashing" } else { "pre-dump uses soft-dirty" };
    let soft_dirty_fallback =
        if dirty_tracker == "uffd" { "pre-dump uses uffd-wp" } else { "pre-dump falls back to page hashing" };
    for f in &mut features {
        match f.name.as_str() {
            "uffd-wp" => f.disables = format!("no live dirty tracking: {fallback}"),
            "soft-dirty" => f.disables = soft_dirty_fallback.to_string(),
            _ => {}
        }
    }

    CheckReport { kernel, features, dirty_tracker: dirty_tracker.to_string() }
}

// ---------------------------------------------------------------------------
// plumbing

/// Why a probe failed: a lowercase, period-less description.
#[derive(Debug)]
struct Fail(String);

impl From<SysError> for Fail {
    fn from(err: SysError) -> Self {
        Fail(err.to_string())
    }
}

impl From<String> for Fail {
    fn from(msg: String) -> Self {
        Fail(msg)
    }
}

impl From<&str> for Fail {
    fn from(msg: &str) -> Self {
        Fail(msg.to_string())
    }
}

fn io_fail(what: &str, err: &io::Error) -> Fail {
    Fail(format!("{what}: {}", probe::describe_io(err)))
}

type ProbeResult = Result<String, Fail>;

fn feature(name: &str, ok: bool, required: bool, detail: String, disables: &str) -> FeatureCheck {
    FeatureCheck { name: name.to_string(), ok, required, detail, disables: disables.to_string() }
}

/// Runs one probe, timing it and turning a panic into a failed feature.
fn run_probe(name: &str, required: bool, disables: &str, f: fn() -> ProbeResult) -> FeatureCheck {
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(f);
    let took = started.elapsed().as_secs_f64() * 1e3;
    let (ok, detail) = match outcome {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(Fail(detail))) => (false, detail),
        Err(_) => (false, "probe panicked".to_string()),
    };
    tracing::debug!(feature = name, ok, took_ms = took, "{detail}");
    feature(name, ok, required, format!("{detail} [{took:.2} ms]"), disables)
}

const WAIT: Duration = Duration::from_millis(500);

fn read_text(path: &str) -> Result<String, Fail> {
    fs::read_to_string(path).map_err(|e| io_fail(&format!("read {path}"), &e))
}

fn read_number(path: &str) -> Result<i64, Fail> {
    let text = read_text(path)?;
    text.trim().parse().map_err(|_| Fail(format!("{path}: not a number: {:?}", text.trim())))
}

/// Fields of /proc/PID/stat after the command name; index 0 is field 3 (state).
fn stat_fields(path: &str) -> Result<Vec<String>, Fail> {
    let text = read_text(path)?;
    let rest =
        text.rfind(')').map(|i| &text[i + 1..]).ok_or_else(|| Fail(format!("{path}: no closing parenthesis")))?;
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// Field `n` (1-based, as in proc(5)) of a stat line split by [`stat_fields`].
fn stat_field(fields: &[String], n: usize) -> Result<u64, Fail> {
    fields
        .get(n.wrapping_sub(3))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Fail(format!("/proc/self/stat: field {n} missing")))
}

/// Waits until the task's state is `S` (asleep: our pausing children only sleep in pause()).
fn wait_until_sleeping(pid: i32, timeout: Duration) -> Result<(), Fail> {
    let path = format!("/proc/{pid}/stat");
    let deadline = Instant::now() + timeout;
    loop {
        let fields = stat_fields(&path)?;
        let state = fields.first().map(String::as_str).unwrap_or("?");
        if state == "S" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Fail(format!("child {pid} never went to sleep in pause() (state {state})")));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn wait_exit_code(child: &mut Child, what: &str) -> Result<i32, Fail> {
    match child.wait_timeout(WAIT)? {
        WaitEvent::Exited(code) => Ok(code),
        WaitEvent::Signaled(sig) => Err(Fail(format!("{what}: child killed by signal {sig}"))),
        WaitEvent::Stopped { sig, .. } => Err(Fail(format!("{what}: child stopped by signal {sig}"))),
    }
}

fn fmt_us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

// ---------------------------------------------------------------------------
// required probes

/// PTRACE_SEIZE + PTRACE_INTERRUPT a forked child sleeping in pause(), then read its
/// NT_PRSTATUS registers and check that they show the interrupted pause().
fn probe_ptrace() -> ProbeResult {
    let mut child = probe::spawn_pausing_child(None)?;
    let pid = child.pid();
    wait_until_sleeping(pid, WAIT)?;
    probe::ptrace_seize(pid, 0)?;
    let started = Instant::now();
    probe::ptrace_interrupt(pid)?;
    let event = child.wait_timeout(WAIT)?;
    let to_stop = started.elapsed();
    match event {
        WaitEvent::Stopped { sig, event } if sig == libc::SIGTRAP && event == probe::PTRACE_EVENT_STOP => {}
        other => return Err(Fail(format!("expected PTRACE_EVENT_STOP, got {other:?}"))),
    }
    let regs = probe::ptrace_get_prstatus(pid)?;
    const ERESTARTNOHAND: i64 = 514;
    if regs.orig_rax != libc::SYS_pause {
        return Err(Fail(format!(
            "registers do not show pause(): orig_rax={} rax={} rip={:#x}",
            regs.orig_rax, regs.rax, regs.rip
        )));
    }
    if regs.rax != -ERESTARTNOHAND {
        return Err(Fail(format!("pause() interrupted with rax={} instead of -ERESTARTNOHAND", regs.rax)));
    }
    Ok(format!(
        "seized a child in pause(), PTRACE_EVENT_STOP after {}, NT_PRSTATUS orig_rax={} rax={} rip={:#x}",
        fmt_us(to_stop),
        regs.orig_rax,
        regs.rax,
        regs.rip
    ))
}

/// Steal the write end of a pipe that only a child holds, and write through it.
fn probe_pidfd() -> ProbeResult {
    let (read_end, write_end) = probe::pipe()?;
    let target_fd = write_end.as_raw_fd();
    let child = probe::spawn_pausing_child(Some(target_fd))?;
    drop(write_end); // from now on only the child has the write end
    let pidfd = task::pidfd_open(child.pid()).map_err(SysError::of("pidfd_open"))?;
    let stolen = task::pidfd_getfd(&pidfd, target_fd).map_err(SysError::of("pidfd_getfd"))?;
    let mut reader = File::from(read_end);
    let mut writer = File::from(stolen);
    let ino_read = reader.metadata().map_err(|e| io_fail("fstat", &e))?.ino();
    let ino_stolen = writer.metadata().map_err(|e| io_fail("fstat", &e))?.ino();
    if ino_read != ino_stolen {
        return Err(Fail(format!("stolen fd {target_fd} is another file (inode {ino_stolen}, pipe is {ino_read})")));
    }
    writer.write_all(b"floe").map_err(|e| io_fail("write through stolen fd", &e))?;
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).map_err(|e| io_fail("read pipe", &e))?;
    if &buf != b"floe" {
        return Err(Fail(format!("pipe returned {buf:?}")));
    }
    drop(child);
    Ok(format!("took fd {target_fd} (a pipe) from child via pidfd_getfd and wrote through it"))
}

/// Finds a free pid at or after `from`, below `pid_max`, wrapping to 301.
fn next_free_pid(from: i64, pid_max: i64) -> Option<i32> {
    const FIRST_AFTER_WRAP: i64 = 301;
    let mut pid = from.max(FIRST_AFTER_WRAP);
    for _ in 0..4096 {
        if pid >= pid_max {
            pid = FIRST_AFTER_WRAP;
        }
        // /proc/N exists for thread ids too, even though readdir does not list them
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return i32::try_from(pid).ok();
        }
        pid += 1;
    }
    None
}

/// clone3 with set_tid onto a free pid; the child checks getpid() and exits.
fn probe_clone3() -> ProbeResult {
    let last = read_number("/proc/sys/kernel/ns_last_pid")?;
    let pid_max = read_number("/proc/sys/kernel/pid_max")?;
    let mut from = last + 1;
    for _ in 0..8 {
        let tid = next_free_pid(from, pid_max)
            .ok_or_else(|| Fail(format!("no free pid found after {last} (pid_max {pid_max})")))?;
        let mut child = match probe::clone3_with_tid(tid) {
            Ok(child) => child,
            // taken between our look and the clone: try the next one
            Err(err) if err.errno() == Some(libc::EEXIST) => {
                from = i64::from(tid) + 1;
                continue;
            }
            Err(err) => return Err(Fail(format!("{err} (requested pid {tid})"))),
        };
        if child.pid() != tid {
            return Err(Fail(format!("clone3 asked for pid {tid}, returned {}", child.pid())));
        }
        return match wait_exit_code(&mut child, "clone3 child")? {
            probe::CLONE3_PID_MATCH => Ok(format!(
                "child created on requested pid {tid} (ns_last_pid {last}, pid_max {pid_max}); waitpid and getpid agree"
            )),
            probe::CLONE3_PID_MISMATCH => Err(Fail(format!("child on pid {tid} saw another getpid()"))),
            code => Err(Fail(format!("clone3 child exited with {code}"))),
        };
    }
    Err(Fail("every candidate pid was taken (EEXIST) before clone3 got it".to_string()))
}

/// PR_SET_MM_MAP_SIZE, then PR_SET_MM_MAP in a forked child with its own current values.
fn probe_set_mm_map() -> ProbeResult {
    let size = probe::prctl_mm_map_size()?;
    if size != probe::PRCTL_MM_MAP_SIZE {
        return Err(Fail(format!("kernel prctl_mm_map is {size} bytes, floe knows {}", probe::PRCTL_MM_MAP_SIZE)));
    }
    let fields = stat_fields("/proc/self/stat")?;
    let values = probe::MmMapValues {
        start_code: stat_field(&fields, 26)?,
        end_code: stat_field(&fields, 27)?,
        start_stack: stat_field(&fields, 28)?,
        start_data: stat_field(&fields, 45)?,
        end_data: stat_field(&fields, 46)?,
        start_brk: stat_field(&fields, 47)?,
        arg_start: stat_field(&fields, 48)?,
        arg_end: stat_field(&fields, 49)?,
        env_start: stat_field(&fields, 50)?,
        env_end: stat_field(&fields, 51)?,
    };
    if values.start_code == 0 || values.start_stack == 0 {
        return Err(Fail("/proc/self/stat hides the mm addresses".to_string()));
    }
    let auxv = fs::read("/proc/self/auxv").map_err(|e| io_fail("read /proc/self/auxv", &e))?;
    let mut child = probe::spawn_set_mm_map_child(&values, &auxv)?;
    match wait_exit_code(&mut child, "PR_SET_MM_MAP child")? {
        0 => Ok(format!(
            "map size {size}; PR_SET_MM_MAP with unchanged values, auxv ({} bytes) and exe_fd -1 accepted in a child",
            auxv.len()
        )),
        errno => Err(Fail(format!("prctl(PR_SET_MM_MAP) in a child: {}", probe::errno_name(errno)))),
    }
}

/// All WRITTEN ranges of the mapping, write-protecting them again (one full walk).
fn scan_written(pagemap: &File, mapping: &AnonMapping) -> Result<Vec<(u64, u64)>, Fail> {
    let mut found = Vec::new();
    let mut regions = [PageRegion::default(); 8];
    let query = ScanQuery {
        flags: memory::PM_SCAN_WP_MATCHING | memory::PM_SCAN_CHECK_WPASYNC,
        category_mask: memory::PAGE_IS_WRITTEN,
        return_mask: memory::PAGE_IS_WRITTEN,
        ..ScanQuery::default()
    };
    let (mut start, end) = (mapping.start(), mapping.end());
    for _ in 0..64 {
        let (n, walk_end) = memory::pagemap_scan(pagemap.as_fd(), start, end, &query, Some(&mut regions))
            .map_err(SysError::of("ioctl(PAGEMAP_SCAN)"))?;
        for r in regions.iter().take(n) {
            // merge with the previous range if contiguous
            match found.last_mut() {
                Some((_, end)) if *end == r.start => *end = r.end,
                _ => found.push((r.start, r.end)),
            }
        }
        if walk_end >= end {
            return Ok(found);
        }
        if walk_end <= start {
            return Err(Fail(format!("PAGEMAP_SCAN made no progress at {walk_end:#x}")));
        }
        start = walk_end;
    }
    Err(Fail("PAGEMAP_SCAN did not finish the walk".to_string()))
}

/// uffd (user-mode only) with WP_ASYNC|WP_UNPOPULATED, registered for WP on a local
/// mapping; PAGEMAP_SCAN must report exactly the page written after a protecting scan.
fn probe_uffd_wp() -> ProbeResult {
    let uffd = AsyncWpUffd::open()?;
    let mut mapping = AnonMapping::new(4)?;
    mapping.touch(0, 1); // one populated page, three holes
    uffd.register_wp(&mapping)?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| io_fail("open /proc/self/pagemap", &e))?;
    let page = probe::page_size() as u64;

    let first = scan_written(&pagemap, &mapping)?;
    let first_pages: u64 = first.iter().map(|(s, e)| (e - s) / page).sum();

    let started = Instant::now();
    mapping.touch(2, 7);
    let fault = started.elapsed();

    let second = scan_written(&pagemap, &mapping)?;
    let expected = vec![(mapping.page_addr(2), mapping.page_addr(3))];
    if second != expected {
        return Err(Fail(format!(
            "after writing page 2 the scan reported {} instead of page 2 only",
            describe_ranges(&second, mapping.start(), page)
        )));
    }
    let third = scan_written(&pagemap, &mapping)?;
    if !third.is_empty() {
        return Err(Fail(format!(
            "re-protect failed: a rescan still reported {}",
            describe_ranges(&third, mapping.start(), page)
        )));
    }
    Ok(format!(
        "user-mode-only uffd, features {:#x}; first scan {first_pages} written pages of 4, \
         a write to page 2 ({} incl. wp fault) reported exactly, rescan clean",
        uffd.features(),
        fmt_us(fault)
    ))
}

fn describe_ranges(ranges: &[(u64, u64)], base: u64, page: u64) -> String {
    if ranges.is_empty() {
        return "nothing".to_string();
    }
    let parts: Vec<String> =
        ranges.iter().map(|(s, e)| format!("pages {}..{}", (s - base) / page, (e - base) / page)).collect();
    parts.join(", ")
}

/// A named special mapping from /proc/self/maps.
#[derive(Debug, Clone, Copy)]
struct Area {
    start: u64,
    end: u64,
}

fn parse_range(range: &str) -> Option<Area> {
    let (s, e) = range.split_once('-')?;
    Some(Area { start: u64::from_str_radix(s, 16).ok()?, end: u64::from_str_radix(e, 16).ok()? })
}

fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let k = u64::from_ne_bytes(pair.get(..8)?.try_into().ok()?);
        let v = u64::from_ne_bytes(pair.get(8..16)?.try_into().ok()?);
        (k == key).then_some(v)
    })
}

/// [vvar], [vvar_vclock] (optional) and [vdso] must be contiguous in that order, and
/// [vdso] must be the ELF image AT_SYSINFO_EHDR points at.
fn probe_vdso() -> ProbeResult {
    let maps = read_text("/proc/self/maps")?;
    let mut vvar = None;
    let mut vclock = None;
    let mut vdso = None;
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let range = cols.next().unwrap_or("");
        let name = cols.nth(4).unwrap_or("");
        let slot = match name {
            "[vvar]" => &mut vvar,
            "[vvar_vclock]" => &mut vclock,
            "[vdso]" => &mut vdso,
            _ => continue,
        };
        *slot = parse_range(range);
    }
    let vvar: Area = vvar.ok_or("no [vvar] in /proc/self/maps")?;
    let vdso: Area = vdso.ok_or("no [vdso] in /proc/self/maps")?;
    let page = probe::page_size() as u64;
    let pages = |a: Area| (a.end - a.start) / page;
    let mut layout = format!("[vvar] {} pages", pages(vvar));
    let before_vdso = match vclock {
        Some(vc) => {
            if vvar.end != vc.start {
                return Err(Fail(format!(
                    "[vvar_vclock] at {:#x} does not follow [vvar] ending at {:#x}",
                    vc.start, vvar.end
                )));
            }
            let _ = write!(layout, " + [vvar_vclock] {} pages", pages(vc));
            vc
        }
        None => vvar,
    };
    if before_vdso.end != vdso.start {
        return Err(Fail(format!(
            "[vdso] at {:#x} is not contiguous with the vvar block ending at {:#x}",
            vdso.start, before_vdso.end
        )));
    }
    let _ = write!(layout, " + [vdso] {} pages, contiguous", pages(vdso));

    let auxv = fs::read("/proc/self/auxv").map_err(|e| io_fail("read /proc/self/auxv", &e))?;
    let ehdr = auxv_value(&auxv, libc::AT_SYSINFO_EHDR).ok_or("no AT_SYSINFO_EHDR in auxv")?;
    if ehdr != vdso.start {
        return Err(Fail(format!("AT_SYSINFO_EHDR {ehdr:#x} is not the [vdso] start {:#x}", vdso.start)));
    }
    let mem = File::open("/proc/self/mem").map_err(|e| io_fail("open /proc/self/mem", &e))?;
    let mut magic = [0u8; 4];
    mem.read_exact_at(&mut magic, vdso.start).map_err(|e| io_fail("read [vdso]", &e))?;
    if &magic != b"\x7fELF" {
        return Err(Fail(format!("[vdso] does not start with an ELF header: {magic:02x?}")));
    }
    Ok(format!("{layout}; AT_SYSINFO_EHDR points at its ELF header"))
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

fn effective_caps() -> Result<u64, Fail> {
    let status = read_text("/proc/self/status")?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).ok_or("no CapEff in /proc/self/status")?;
    u64::from_str_radix(hex.trim(), 16).map_err(|_| Fail(format!("bad CapEff {:?}", hex.trim())))
}

/// CapEff: CAP_SYS_PTRACE and (CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN) are required;
/// CAP_SYS_RESOURCE is reported on its own, as optional.
fn check_caps() -> (FeatureCheck, FeatureCheck) {
    const CAPS_DISABLES: &str = "other processes cannot be traced or restored";
    const RESOURCE_DISABLES: &str = "pipe buffers above fs.pipe-max-size, RLIMIT_NOFILE above the hard limit \
        and single-field PR_SET_MM calls are not restorable (PR_SET_MM_MAP still works)";
    let caps = match effective_caps() {
        Ok(caps) => caps,
        Err(Fail(detail)) => {
            return (
                feature("capabilities", false, true, detail.clone(), CAPS_DISABLES),
                feature("cap-sys-resource", false, false, detail, RESOURCE_DISABLES),
            )
        }
    };
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let mut have = Vec::new();
    let mut lack = Vec::new();
    for (bit, name) in [
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_CHECKPOINT_RESTORE, "CAP_CHECKPOINT_RESTORE"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        if has(bit) {
            have.push(name);
        } else {
            lack.push(name);
        }
    }
    let ok = has(CAP_SYS_PTRACE) && (has(CAP_CHECKPOINT_RESTORE) || has(CAP_SYS_ADMIN));
    let mut detail =
        format!("CapEff {caps:#x}: has {}", if have.is_empty() { "none".to_string() } else { have.join(", ") });
    if !lack.is_empty() {
        let _ = write!(detail, "; lacks {}", lack.join(", "));
    }
    let caps_check = feature("capabilities", ok, true, detail, CAPS_DISABLES);
    let resource = if has(CAP_SYS_RESOURCE) {
        "CAP_SYS_RESOURCE present".to_string()
    } else {
        "CAP_SYS_RESOURCE absent from CapEff".to_string()
    };
    let resource_check = feature("cap-sys-resource", has(CAP_SYS_RESOURCE), false, resource, RESOURCE_DISABLES);
    (caps_check, resource_check)
}

// ---------------------------------------------------------------------------
// optional probes

/// clear_refs=4 then a write in a forked child; pagemap bit 55 must be set.
fn probe_soft_dirty() -> ProbeResult {
    let mut mapping = AnonMapping::new(1)?;
    mapping.touch(0, 1);
    let mut child = probe::spawn_soft_dirty_child(&mapping)?;
    match wait_exit_code(&mut child, "soft-dirty child")? {
        probe::SOFT_DIRTY_SET => Ok("pagemap bit 55 set by a write after clear_refs=4".to_string()),
        probe::SOFT_DIRTY_CLEAR => Err("pagemap bit 55 stayed clear after clear_refs=4 and a write".into()),
        probe::SOFT_DIRTY_NOT_PRESENT => Err("written page not present in pagemap".into()),
        probe::SOFT_DIRTY_CLEAR_REFS_FAILED => Err("writing 4 to /proc/self/clear_refs failed".into()),
        probe::SOFT_DIRTY_PAGEMAP_FAILED => Err("reading /proc/self/pagemap failed".into()),
        code => Err(Fail(format!("soft-dirty child exited with {code}"))),
    }
}

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_SEND_QUEUE: i32 = 2;

/// TCP_REPAIR on a fresh socket, then set and read back a send-queue sequence number.
fn probe_tcp_repair() -> ProbeResult {
    let sock = probe::socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    let fd = sock.as_fd();
    probe::setsockopt_int(fd, libc::SOL_TCP, TCP_REPAIR, 1)
        .map_err(|e| Fail(format!("TCP_REPAIR=1: {}", probe::describe_io(&e.source))))?;
    let repair = probe::getsockopt_int(fd, libc::SOL_TCP, TCP_REPAIR)?;
    if repair != 1 {
        return Err(Fail(format!("TCP_REPAIR reads back as {repair}")));
    }
    const SEQ: i32 = 0x0f10_e5e0;
    probe::setsockopt_int(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    probe::setsockopt_int(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, SEQ)?;
    let seq = probe::getsockopt_int(fd, libc::SOL_TCP, TCP_QUEUE_SEQ)?;
    if seq != SEQ {
        return Err(Fail(format!("TCP_QUEUE_SEQ reads back {seq:#x}, set {SEQ:#x}")));
    }
    probe::setsockopt_int(fd, libc::SOL_TCP, TCP_REPAIR, 0)?;
    Ok("TCP_REPAIR=1 accepted; send-queue seq set and read back".to_string())
}

/// A listener on an nfnetlink_log group, as the network lock's capture uses.
fn probe_capture() -> ProbeResult {
    let cap = floe_netfilter::Capture::open().map_err(|e| Fail(e.to_string()))?;
    Ok(format!("nfnetlink_log group {} bound, copying whole packets", cap.group()))
}

/// UFFDIO_COPY into a MISSING-registered mapping of this process, as
/// restore fills fresh memory (`restore/fill.rs`), then the page read back.
fn probe_uffd_copy() -> ProbeResult {
    use crate::sys::track as uffd;
    use std::os::fd::AsFd;
    let fd = uffd::userfaultfd().map_err(|e| io_fail("userfaultfd", &e))?;
    uffd::uffd_api(fd.as_fd(), uffd::UFFD_FEATURE_SIGBUS).map_err(|e| io_fail("UFFDIO_API (SIGBUS)", &e))?;
    let mapping = AnonMapping::new(2)?;
    let len = mapping.len() as u64;
    uffd::uffd_register_missing(fd.as_fd(), mapping.start(), len)
        .map_err(|e| io_fail("UFFDIO_REGISTER (MISSING)", &e))?;
    let page = vec![0x5au8; probe::page_size()];
    let copied = uffd::uffd_copy(fd.as_fd(), mapping.start(), &page);
    uffd::uffd_unregister(fd.as_fd(), mapping.start(), len).map_err(|e| io_fail("UFFDIO_UNREGISTER", &e))?;
    let copied = copied.map_err(|e| io_fail("UFFDIO_COPY", &e))?;
    let mut back = vec![0u8; page.len()];
    let me = std::process::id() as i32;
    crate::sys::memory::read_remote(
        me,
        &mut back,
        &[crate::sys::memory::Range { addr: mapping.start(), len: page.len() as u64 }],
    )
    .map_err(|e| io_fail("reading the page back", &e))?;
    if copied != page.len() as u64 || back != page {
        return Err(Fail(format!("UFFDIO_COPY copied {copied} bytes, and the page reads back different")));
    }
    Ok("a registered page filled with UFFDIO_COPY reads back as written".into())
}

/// The eBPF raw-tracepoint program live migration uses to know whether a
/// process may have changed a mapping's VmFlags, counting this process's getppid.
fn probe_syscall_watch() -> ProbeResult {
    let me = std::process::id() as i32;
    let w = crate::sys::syscall_watch::SyscallWatch::start(&[me], &[libc::SYS_getppid as u32])
        .map_err(|e| Fail(format!("loading the program: {}", probe::describe_io(&e))))?;
    let _ = std::os::unix::process::parent_id();
    let n = w.count(me).map_err(|e| Fail(format!("reading its counter: {}", probe::describe_io(&e))))?;
    if n == 0 {
        return Err(Fail("the program did not see this process's getppid".into()));
    }
    Ok(format!("sys_enter raw tracepoint program loaded; counted {n} getppid call(s) of this process"))
}

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

/// NFT_MSG_GETTABLE dump for every family over NETLINK_NETFILTER.
fn probe_nftables() -> ProbeResult {
    let sock = probe::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER)?;
    track::set_recv_timeout(sock.as_fd(), WAIT).map_err(SysError::of("setsockopt(SO_RCVTIMEO)"))?;
    let seq: u32 = std::process::id() ^ 0x666c_6f65;
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    req.extend_from_slice(&[libc::NFPROTO_UNSPEC as u8, 0, 0, 0]); // nfgenmsg: family, version, res_id
    probe::netlink_send(sock.as_fd(), &req)?;

    let mut buf = vec![0u8; 64 * 1024];
    let mut tables = 0usize;
    for _ in 0..256 {
        let len = probe::recv_datagram(sock.as_fd(), &mut buf)?;
        if len > buf.len() {
            return Err(Fail(format!("netlink reply of {len} bytes truncated")));
        }
        let mut off = 0;
        while off + NLMSG_HDRLEN <= len {
            let word = |at: usize| {
                buf.get(off + at..off + at + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes).unwrap_or(0)
            };
            let msg_len = word(0) as usize;
            let msg_type = (word(4) & 0xffff) as u16;
            let msg_seq = word(8);
            if msg_len < NLMSG_HDRLEN || off + msg_len > len {
                return Err(Fail(format!("malformed netlink message (length {msg_len})")));
            }
            if msg_seq == seq {
                match msg_type {
                    NLMSG_DONE => {
                        return Ok(format!("NFT_MSG_GETTABLE dump answered: {tables} tables"));
                    }
                    NLMSG_ERROR if word(NLMSG_HDRLEN) == 0 => {} // an ack, not an error
                    NLMSG_ERROR => {
                        let errno = -(word(NLMSG_HDRLEN) as i32);
                        return Err(Fail(format!("NFT_MSG_GETTABLE dump refused: {}", probe::errno_name(errno))));
                    }
                    t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE => tables += 1,
                    _ => {}
                }
            }
            off += (msg_len + 3) & !3;
        }
    }
    Err("NFT_MSG_GETTABLE dump never ended".into())
}

/// Which freezer interface a probe cgroup uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freezer {
    V1,
    V2,
}

/// A probe cgroup holding one child. Drop thaws it, kills and reaps the child
/// (a v1-frozen task cannot die before it is thawed), then removes the directory.
struct ProbeCgroup {
    dir: PathBuf,
    kind: Freezer,
    child: Option<Child>,
}

impl ProbeCgroup {
    fn write(&self, file: &str, value: &str) -> Result<(), Fail> {
        fs::write(self.dir.join(file), value).map_err(|e| io_fail(&format!("write {file}"), &e))
    }

    fn freeze(&self, frozen: bool) -> Result<(), Fail> {
        match (self.kind, frozen) {
            (Freezer::V1, true) => self.write("freezer.state", "FROZEN"),
            (Freezer::V1, false) => self.write("freezer.state", "THAWED"),
            (Freezer::V2, true) => self.write("cgroup.freeze", "1"),
            (Freezer::V2, false) => self.write("cgroup.freeze", "0"),
        }
    }

    fn is_frozen(&self) -> Result<bool, Fail> {
        match self.kind {
            Freezer::V1 => {
                let state = read_text(&self.dir.join("freezer.state").to_string_lossy())?;
                Ok(state.trim() == "FROZEN")
            }
            Freezer::V2 => {
                let events = read_text(&self.dir.join("cgroup.events").to_string_lossy())?;
                Ok(events.lines().any(|l| l.trim() == "frozen 1"))
            }
        }
    }

    fn wait_frozen(&self, frozen: bool) -> Result<Duration, Fail> {
        let started = Instant::now();
        loop {
            if self.is_frozen()? == frozen {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= WAIT {
                return Err(Fail(format!(
                    "cgroup did not become {} within {} ms",
                    if frozen { "frozen" } else { "thawed" },
                    WAIT.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        let _ = self.freeze(false);
        drop(self.child.take());
        for _ in 0..50 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        tracing::warn!(dir = %self.dir.display(), "could not remove probe cgroup");
    }
}

/// Mount points of the v1 freezer and of cgroup2, from /proc/self/mounts.
fn freezer_mounts() -> Result<(Option<PathBuf>, Option<PathBuf>), Fail> {
    let mounts = read_text("/proc/self/mounts")?;
    let mut v1 = None;
    let mut v2 = None;
    for line in mounts.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(dir), Some(fstype), Some(opts)) = (cols.get(1), cols.get(2), cols.get(3)) else {
            continue;
        };
        if *fstype == "cgroup" && opts.split(',').any(|o| o == "freezer") && v1.is_none() {
            v1 = Some(PathBuf::from(dir));
        } else if *fstype == "cgroup2" && v2.is_none() {
            v2 = Some(PathBuf::from(dir));
        }
    }
    Ok((v1, v2))
}

fn freeze_child_in(root: &Path, kind: Freezer) -> ProbeResult {
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("floe-check-{}-{serial}", std::process::id()));
    fs::create_dir(&dir).map_err(|e| io_fail(&format!("mkdir {}", dir.display()), &e))?;
    let mut cg = ProbeCgroup { dir, kind, child: None };
    let child = probe::spawn_pausing_child(None)?;
    let pid = child.pid();
    cg.child = Some(child);
    cg.write("cgroup.procs", &pid.to_string())?;
    cg.freeze(true)?;
    let to_freeze = cg.wait_frozen(true)?;
    cg.freeze(false)?;
    let to_thaw = cg.wait_frozen(false)?;
    Ok(format!("froze a child in {}, thawed in {}", fmt_us(to_freeze), fmt_us(to_thaw)))
}

/// Freeze and thaw a child in a fresh cgroup: v1 freezer and cgroup2 cgroup.freeze.
fn probe_freezer() -> ProbeResult {
    let (v1, v2) = freezer_mounts()?;
    let mut parts = Vec::new();
    let mut any_ok = false;
    for (root, kind, label) in [(v1, Freezer::V1, "v1"), (v2, Freezer::V2, "v2")] {
        let Some(root) = root else {
            parts.push(format!("{label}: not mounted"));
            continue;
        };
        match freeze_child_in(&root, kind) {
            Ok(detail) => {
                any_ok = true;
                parts.push(format!("{label}: {detail}"));
            }
            Err(Fail(detail)) => parts.push(format!("{label}: {detail}")),
        }
    }
    let detail = parts.join("; ");
    if any_ok {
        Ok(detail)
    } else {
        Err(Fail(detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_ok(name: &str, result: ProbeResult) -> String {
        match result {
            Ok(detail) => detail,
            Err(Fail(detail)) => panic!("{name} probe failed: {detail}"),
        }
    }

    #[test]
    fn check_ptrace_probe_works() {
        let detail = assert_ok("ptrace", probe_ptrace());
        assert!(detail.contains("orig_rax=34"), "{detail}");
    }

    #[test]
    fn check_clone3_set_tid_probe_works() {
        assert_ok("clone3", probe_clone3());
    }

    #[test]
    fn check_pidfd_and_set_mm_map_probes_work() {
        assert_ok("pidfd", probe_pidfd());
        assert_ok("pr-set-mm-map", probe_set_mm_map());
    }

    #[test]
    fn check_uffd_wp_probe_works() {
        assert_ok("uffd-wp", probe_uffd_wp());
    }

    #[test]
    fn check_uffd_copy_probe_works() {
        assert_ok("uffd-copy", probe_uffd_copy());
    }

    #[test]
    fn check_set_mm_map_child_reports_kernel_rejection() {
        // all-zero addresses fail the kernel's validation: the child must report EINVAL,
        // which shows the probe really reaches prctl(PR_SET_MM_MAP)
        let mut child = probe::spawn_set_mm_map_child(&probe::MmMapValues::default(), &[]).expect("fork");
        let code = wait_exit_code(&mut child, "test child").map_err(|Fail(d)| d);
        assert_eq!(code, Ok(libc::EINVAL));
    }

    #[test]
    fn check_clone3_on_a_taken_pid_gives_eexist() {
        let err = probe::clone3_with_tid(std::process::id() as i32).expect_err("own pid is taken");
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
    }

    #[test]
    fn check_vdso_and_caps() {
        assert_ok("vdso", probe_vdso());
        let (caps, _) = check_caps();
        assert!(caps.ok, "{}", caps.detail);
    }

    #[test]
    fn check_soft_dirty_is_consistent_with_pagemap() {
        // CONFIG_MEM_SOFT_DIRTY is off on the development kernel: the probe must say so
        // with a measured reason rather than an error of its own.
        match probe_soft_dirty() {
            Ok(detail) => assert!(detail.contains("bit 55 set"), "{detail}"),
            Err(Fail(detail)) => assert!(detail.contains("bit 55 stayed clear"), "{detail}"),
        }
    }

    #[test]
    fn check_report_looks_good_and_renders() {
        let report = run_checks();
        let text = report.render_text();
        assert!(!report.kernel.is_empty());
        assert_eq!(report.dirty_tracker, "uffd", "{text}");
        assert!(report.looks_good(), "{text}");
        assert!(text.trim_end().ends_with("Looks good"), "{text}");
        for f in report.features.iter().filter(|f| !f.ok) {
            assert!(text.contains(&format!("no {}: {}", f.name, f.disables)), "{text}");
        }
        let soft_dirty = report.features.iter().find(|f| f.name == "soft-dirty");
        if let Some(f) = soft_dirty.filter(|f| !f.ok) {
            assert_eq!(f.disables, "pre-dump uses uffd-wp");
        }
    }

    #[test]
    fn check_render_lists_missing_required_features() {
        let mut report = run_checks();
        if let Some(f) = report.features.iter_mut().find(|f| f.name == "ptrace") {
            f.ok = false;
            f.detail = "ptrace(PTRACE_SEIZE): EPERM".to_string();
        }
        assert!(!report.looks_good());
        let text = report.render_text();
        assert!(!text.contains("Looks good"), "{text}");
        assert!(text.contains("no ptrace: tasks cannot be seized"), "{text}");
    }

    fn count(dir: &str) -> usize {
        fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    fn children() -> usize {
        let Ok(tasks) = fs::read_dir("/proc/self/task") else {
            return 0;
        };
        tasks
            .filter_map(|t| t.ok())
            .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
            .map(|c| c.split_whitespace().count())
            .sum()
    }

    #[test]
    fn check_probes_leak_nothing_and_are_fast() {
        // Other tests may hold fds or children at any moment; a leak per run would
        // still show up as growth of at least RUNS.
        const RUNS: usize = 20;
        let _ = run_checks();
        let fds = count("/proc/self/fd");
        let maps = read_text("/proc/self/maps").map(|m| m.lines().count()).unwrap_or(0);
        let kids = children();
        let started = Instant::now();
        for _ in 0..RUNS {
            let _ = run_checks();
        }
        let per_run = started.elapsed() / RUNS as u32;
        assert!(count("/proc/self/fd") < fds + RUNS, "fd leak");
        let maps_after = read_text("/proc/self/maps").map(|m| m.lines().count()).unwrap_or(0);
        assert!(maps_after < maps + RUNS, "mapping leak: {maps} -> {maps_after}");
        assert!(children() < kids + RUNS, "child leak");
        assert!(per_run < Duration::from_secs(1), "run_checks took {per_run:?}");
        let leftover: Vec<_> = fs::read_dir("/sys/fs/cgroup/freezer")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("floe-check-{}", std::process::id())))
                    .collect()
            })
            .unwrap_or_default();
        assert!(leftover.is_empty(), "cgroups left: {leftover:?}");
    }
}
