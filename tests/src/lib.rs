//! Test harness for floe's end-to-end suites (`tests/tests/*.rs`).
//!
//! * [`floe_bin`] / [`floe`]: locate and run the `floe` CLI (bounded, output
//!   captured through files so a leaked pipe can never hang a test).
//! * [`Spawn`] / [`Fixture`]: start a workload (a C fixture from
//!   `tests/fixtures/` or any program) as a session leader with stdin
//!   `/dev/null` and stdout/stderr to a log file, wait for its ready marker,
//!   and clean up on drop, including restored processes that are not our
//!   children.
//! * process helpers ([`pid_alive`], [`wait_pid_gone`], [`send_signal`], ...),
//!   fixture reports ([`read_report`], [`request_report`]), a pty helper
//!   ([`Pty`]) and deterministic data generators.
//!
//! Fixture interface (see the comment at the top of each `fixtures/*.c`):
//! `--ready PATH` is written once initialised, SIGUSR1 makes the fixture
//! write a `key=value` report to `--report PATH` (atomically), and every
//! report holds `pid` and `sigusr1_count`.
#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

pub mod cluster;
pub mod netns;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory holding the compiled fixtures (set by `build.rs`).
pub const FIXTURE_DIR: &str = env!("FLOE_FIXTURE_DIR");

/// How long a fixture may take to write its ready marker.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fixture may take to answer a report request.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one `floe` invocation.
pub const FLOE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a killed process may take to vanish from /proc (PID 1 reaps
/// orphans slowly in this environment, ~1.5 s).
pub const GONE_TIMEOUT: Duration = Duration::from_secs(5);

/// `close_range(2)` flag: mark the range close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// True when running as root (every e2e test needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns from the calling test (after printing a skip note) unless root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIPPED {} ({}:{}): floe end-to-end tests need root",
                std::thread::current().name().unwrap_or("?"),
                module_path!(),
                line!()
            );
            return;
        }
    };
}

/// Copies the program `src` to `dst` (executable) with cp(1): a copy made by
/// this process would hold `dst` open for writing, and a child forked by
/// another test meanwhile would inherit that descriptor until it execs,
/// making the copy fail to run with ETXTBSY ("Text file busy").
pub fn copy_program(src: &Path, dst: &Path) {
    let st = Command::new("cp").arg(src).arg(dst).status().unwrap_or_else(|e| panic!("cannot run cp: {e}"));
    assert!(st.success(), "cp {} {} failed: {st}", src.display(), dst.display());
}

/// Path of a compiled fixture, e.g. `fixture_path("memstate")`.
pub fn fixture_path(name: &str) -> PathBuf {
    let p = Path::new(FIXTURE_DIR).join(name);
    assert!(
        p.is_file(),
        "fixture {name} not found at {} (tests/build.rs should have compiled tests/fixtures/{name}.c)",
        p.display()
    );
    p
}

/// Locates the `floe` binary: `$FLOE_BIN`, else `$CARGO_TARGET_DIR/debug/floe`,
/// else `<workspace>/target/debug/floe`, else next to this test executable
/// (`target/debug/deps/..`). Panics with instructions when it is missing.
pub fn floe_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FLOE_BIN") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(format!("FLOE_BIN={} does not exist or is not a file", p.display()))
            };
        }
        let mut candidates = Vec::new();
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
            candidates.push(PathBuf::from(t).join("debug/floe"));
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        candidates.push(workspace.join("target/debug/floe"));
        if let Ok(exe) = std::env::current_exe() {
            // target/debug/deps/<test>-<hash> -> target/debug/floe
            if let Some(debug) = exe.parent().and_then(Path::parent) {
                candidates.push(debug.join("floe"));
            }
        }
        candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            format!(
                "floe binary not found (tried: {}); build it first with `cargo build -p floe-cli`, \
                 or point FLOE_BIN at it",
                tried.join(", ")
            )
        })
    });
    match found {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Marks every inherited fd >= 3 close-on-exec in a freshly forked child, so
/// stray descriptors of the test process (pipes from the test runner, ptys
/// of tests running in parallel threads) never leak into a workload or floe.
fn cloexec_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only changes fd flags; it is async-signal-safe and
    // std's own fds in the child are already close-on-exec.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn args_display<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

/// Runs `floe ARGS` with stdin `/dev/null`; see [`floe_with_stdin`].
pub fn floe<S: AsRef<OsStr>>(args: &[S]) -> Output {
    floe_with_stdin(args, Stdio::null())
}

/// Runs `floe ARGS` with the given stdin, waits (bounded by
/// [`FLOE_TIMEOUT`]) and returns its status and captured output. Output goes
/// through anonymous temp files rather than pipes, so a restored process
/// that accidentally inherited floe's stdout cannot hang the test.
pub fn floe_with_stdin<S: AsRef<OsStr>>(args: &[S], stdin: Stdio) -> Output {
    let bin = floe_bin();
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(args).stdin(stdin).stdout(out.try_clone().unwrap()).stderr(err.try_clone().unwrap());
    // SAFETY: the closure only makes a raw close_range syscall, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(cloexec_inherited_fds);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > FLOE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`floe {}` did not finish within {FLOE_TIMEOUT:?}", args_display(args));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read_back = |f: &mut File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let output = Output { status, stdout: read_back(&mut out), stderr: read_back(&mut err) };
    eprintln!(
        "$ floe {}  -> {} in {:.2?}\n--- stdout ---\n{}--- stderr ---\n{}--------------",
        args_display(args),
        describe_status(&status),
        started.elapsed(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// "exit 0", "exit 1", "signal 9", ...
pub fn describe_status(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st:?}"),
    }
}

/// stderr of a floe run as text.
pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stdout of a floe run as text.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics (showing stdout/stderr) unless the floe run exited 0.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: floe failed with {}\nstdout:\n{}\nstderr:\n{}",
        describe_status(&out.status),
        stdout_text(out),
        stderr_text(out)
    );
}

/// Panics unless the floe run failed *cleanly*: a non-zero exit code (not a
/// signal, not a Rust panic's 101), and a non-empty message on stderr.
/// Returns stderr, lower-cased, for further checks.
pub fn assert_failed_cleanly(out: &Output, what: &str) -> String {
    let err = stderr_text(out);
    assert!(
        !out.status.success(),
        "{what}: floe unexpectedly succeeded\nstdout:\n{}\nstderr:\n{err}",
        stdout_text(out)
    );
    assert!(
        out.status.code().is_some(),
        "{what}: floe died from {} instead of exiting with an error\nstderr:\n{err}",
        describe_status(&out.status)
    );
    assert!(
        out.status.code() != Some(101) && !err.contains("panicked at"),
        "{what}: floe panicked instead of reporting an error\nstderr:\n{err}"
    );
    assert!(!err.trim().is_empty(), "{what}: floe failed without any message on stderr");
    err.to_lowercase()
}

/// Panics unless `haystack` (already lower-cased) contains one of `needles`.
pub fn assert_mentions(haystack: &str, needles: &[&str], what: &str) {
    assert!(
        needles.iter().any(|n| haystack.contains(&n.to_lowercase())),
        "{what}: expected the message to mention one of {needles:?}, got:\n{haystack}"
    );
}

// ---------------------------------------------------------------------------
// floe wrappers

/// `floe dump -t PID -D DIR EXTRA...` (creates DIR first).
pub fn dump(pid: i32, dir: &Path, extra: &[&str]) -> Output {
    fs::create_dir_all(dir).unwrap();
    let mut args: Vec<OsString> = vec!["dump".into(), "-t".into(), pid.to_string().into(), "-D".into(), dir.into()];
    args.extend(extra.iter().map(OsString::from));
    floe(&args)
}

/// `floe restore -D DIR --restore-detached EXTRA...` with the given stdin.
pub fn restore_detached(dir: &Path, extra: &[&str], stdin: Stdio) -> Output {
    let mut args: Vec<OsString> = vec!["restore".into(), "-D".into(), dir.into(), "--restore-detached".into()];
    args.extend(extra.iter().map(OsString::from));
    floe_with_stdin(&args, stdin)
}

/// `floe inspect DIR EXTRA...`
pub fn inspect(dir: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<OsString> = vec!["inspect".into(), dir.into()];
    args.extend(extra.iter().map(OsString::from));
    floe(&args)
}

/// Parses a JSON object from floe's stdout: the whole of it, or else the
/// last line that is a JSON object.
pub fn parse_json_stdout(out: &Output) -> serde_json::Value {
    let text = stdout_text(out);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
        if v.is_object() {
            return v;
        }
    }
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .find(serde_json::Value::is_object)
        .unwrap_or_else(|| panic!("floe printed no JSON object on stdout:\n{text}"))
}

/// Reads the `pid` member of a JSON object (number or numeric string).
pub fn json_pid(v: &serde_json::Value) -> i32 {
    let p = v.get("pid").unwrap_or_else(|| panic!("JSON has no \"pid\": {v}"));
    p.as_i64()
        .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("JSON \"pid\" is not a number: {v}")) as i32
}

/// Asserts the image files in `dir` start with floe's magic numbers.
pub fn assert_image_files(dir: &Path) {
    for (file, magic) in [("manifest.img", b"FLOEMAN\0"), ("pages.img", b"FLOEPGS\0")] {
        let p = dir.join(file);
        let mut head = [0u8; 8];
        File::open(&p)
            .and_then(|mut f| f.read_exact(&mut head))
            .unwrap_or_else(|e| panic!("cannot read the magic of {}: {e}", p.display()));
        assert_eq!(&head, magic, "{} has the wrong magic", p.display());
    }
}

// ---------------------------------------------------------------------------
// processes

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `path` to exist.
pub fn wait_for_file(path: &Path, timeout: Duration) -> bool {
    wait_until(timeout, || path.exists())
}

/// Fields of /proc/PID/stat after the command name (index 0 is the state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether /proc/PID exists at all (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The process state letter (R, S, D, T, t, Z, ...), if the process exists.
pub fn proc_state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(c) if c != 'Z' && c != 'X')
}

/// Start time (clock ticks after boot) of a process: with the pid it
/// identifies one process instance.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Session id of a process.
pub fn session_id(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(3)?.parse().ok()
}

/// A field of /proc/PID/status, e.g. `status_field(pid, "TracerPid")`.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(|v| v.trim().to_owned()))
}

/// Number of threads of a process.
pub fn thread_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// /proc/PID/exe target.
pub fn exe_of(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Raw /proc/PID/cmdline.
pub fn cmdline_of(pid: i32) -> Option<Vec<u8>> {
    fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// Live (non-zombie) processes whose command line contains `needle`; used to
/// check that a failed restore created nothing.
pub fn pids_with_cmdline_containing(needle: &str) -> Vec<i32> {
    let needle = needle.as_bytes();
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(cmd) = cmdline_of(pid) {
            if !cmd.is_empty() && cmd.windows(needle.len()).any(|w| w == needle) && pid_alive(pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Asserts a process is running normally: alive, not stopped, not traced.
pub fn assert_running_untouched(pid: i32, what: &str) {
    let state = proc_state(pid);
    assert!(
        matches!(state, Some('R' | 'S' | 'D')),
        "{what}: process {pid} should be running normally, state is {state:?}"
    );
    let tracer = status_field(pid, "TracerPid");
    assert_eq!(tracer.as_deref(), Some("0"), "{what}: process {pid} is still traced ({tracer:?})");
}

/// Waits until /proc/PID has vanished (the process exited *and* was reaped).
pub fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    wait_until(timeout, || !pid_exists(pid))
}

/// Sends `sig` to `pid`.
pub fn send_signal(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asserts no live process has `pid` (a failed restore must create nothing)
/// and that any leftover vanishes within [`GONE_TIMEOUT`].
pub fn assert_no_process(pid: i32, what: &str) {
    assert!(
        !pid_alive(pid),
        "{what}: a process with pid {pid} exists: state {:?}, exe {:?}",
        proc_state(pid),
        exe_of(pid)
    );
    assert!(wait_pid_gone(pid, GONE_TIMEOUT), "{what}: pid {pid} did not vanish from /proc");
}

// ---------------------------------------------------------------------------
// reports

/// A fixture report: `key=value` lines.
pub type Report = BTreeMap<String, String>;

/// Parses `key=value` lines (or a flat JSON object) into a [`Report`].
pub fn parse_report(text: &str) -> Report {
    if text.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        return v
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
            .collect();
    }
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Reads and parses a report file.
pub fn read_report(path: &Path) -> Report {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read report {}: {e}", path.display()));
    parse_report(&text)
}

/// Deletes `path`, sends `sig` to `pid` and waits for the fixture to write a
/// new report there. Panics (with `log`'s contents) on timeout.
pub fn request_report(pid: i32, path: &Path, sig: libc::c_int, log: &Path) -> Report {
    let _ = fs::remove_file(path);
    send_signal(pid, sig).unwrap_or_else(|e| panic!("cannot signal {pid}: {e}"));
    if !wait_for_file(path, REPORT_TIMEOUT) {
        panic!(
            "process {pid} wrote no report to {} within {REPORT_TIMEOUT:?} after signal {sig} (state {:?})\nlog {}:\n{}",
            path.display(),
            proc_state(pid),
            log.display(),
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    read_report(path)
}

/// Integer value of a report key.
pub fn report_num(r: &Report, key: &str) -> u64 {
    r.get(key)
        .unwrap_or_else(|| panic!("report has no {key}: {r:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("report key {key} is not a number: {r:?}"))
}

/// Asserts two reports are equal except for `sigusr1_count`, keys starting
/// with `info.` and the keys in `ignore`; lists every difference.
pub fn assert_reports_equal(before: &Report, after: &Report, ignore: &[&str], what: &str) {
    let skip = |k: &str| k == "sigusr1_count" || k.starts_with("info.") || ignore.contains(&k);
    let mut diffs = Vec::new();
    for (k, v) in before.iter().filter(|(k, _)| !skip(k)) {
        match after.get(k) {
            Some(w) if w == v => {}
            Some(w) => diffs.push(format!("  {k}: {v} -> {w}")),
            None => diffs.push(format!("  {k}: {v} -> <missing>")),
        }
    }
    for k in after.keys().filter(|k| !skip(k) && !before.contains_key(*k)) {
        diffs.push(format!("  {k}: <missing> -> {}", after[k]));
    }
    assert!(diffs.is_empty(), "{what}: reports differ:\n{}", diffs.join("\n"));
}

// ---------------------------------------------------------------------------
// spawning workloads

/// Builder for a workload process. By default it runs as a session leader
/// (setsid in the child), with stdin `/dev/null`, stdout and stderr appended
/// to `<dir>/<name>.log`, cwd `<dir>`, and every inherited fd >= 3 closed.
pub struct Spawn {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    dir: PathBuf,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    setsid: bool,
    ready: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Spawn {
    /// A compiled fixture from `tests/fixtures/NAME.c`.
    pub fn fixture(name: &str, dir: &Path) -> Self {
        Self::program(name, fixture_path(name), dir)
    }

    /// Any program (looked up in PATH when not a path).
    pub fn program(name: &str, program: impl Into<PathBuf>, dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            program: program.into(),
            args: Vec::new(),
            dir: dir.to_owned(),
            stdin: None,
            stdout: None,
            setsid: true,
            ready: None,
            env: Vec::new(),
        }
    }

    /// An environment variable for the program.
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Replaces stdin (default `/dev/null`).
    pub fn stdin(mut self, s: Stdio) -> Self {
        self.stdin = Some(s);
        self
    }

    /// Replaces stdout (default: the log file; stderr always goes there).
    pub fn stdout(mut self, s: Stdio) -> Self {
        self.stdout = Some(s);
        self
    }

    /// Whether to call setsid() in the child (default true).
    pub fn setsid(mut self, yes: bool) -> Self {
        self.setsid = yes;
        self
    }

    /// Waits for this marker file after spawning (fixtures' `--ready`).
    pub fn ready_file(mut self, p: impl Into<PathBuf>) -> Self {
        self.ready = Some(p.into());
        self
    }

    pub fn spawn(self) -> Fixture {
        let log = self.dir.join(format!("{}.log", self.name));
        let logf = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(self.stdin.unwrap_or_else(Stdio::null))
            .stdout(self.stdout.unwrap_or_else(|| Stdio::from(logf.try_clone().unwrap())))
            .stderr(Stdio::from(logf));
        let setsid = self.setsid;
        let hook = move || -> io::Result<()> {
            // SAFETY: setsid has no memory-safety preconditions.
            if setsid && unsafe { libc::setsid() } < 0 {
                return Err(io::Error::last_os_error());
            }
            cloexec_inherited_fds()
        };
        // SAFETY: the hook runs between fork and exec and only makes
        // async-signal-safe system calls (setsid, close_range).
        unsafe {
            cmd.pre_exec(hook);
        }
        let child =
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.name, self.program.display()));
        let pid = child.id() as i32;
        eprintln!("started {} as pid {pid}: {} {}", self.name, self.program.display(), args_display(&self.args));
        let fx = Fixture { name: self.name, pid, dir: self.dir, log, child: Some(child), restored: Vec::new() };
        if let Some(ready) = &self.ready {
            fx.wait_ready(ready);
        }
        fx
    }
}

/// A running workload. Dropping it SIGKILLs and reaps the original child
/// (unless already reaped) and every restored incarnation registered with
/// [`Fixture::adopt_restored`] (those are not our children: they are killed
/// by pid, after checking the start time still matches, and polled until
/// /proc/PID vanishes).
pub struct Fixture {
    pub name: String,
    pub pid: i32,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    restored: Vec<(i32, u64)>,
}

impl Fixture {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The stdout/stderr log so far.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Access to the original child (e.g. its piped stdout).
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits for the ready marker; panics with the log on timeout or if the
    /// process died first.
    pub fn wait_ready(&self, ready: &Path) {
        let ok = wait_until(READY_TIMEOUT, || ready.exists() || !pid_alive(self.pid));
        if !ok || !ready.exists() {
            panic!(
                "{} (pid {}) did not become ready ({} missing after {READY_TIMEOUT:?}; state {:?})\nlog {}:\n{}",
                self.name,
                self.pid,
                ready.display(),
                proc_state(self.pid),
                self.log.display(),
                self.log_contents()
            );
        }
    }

    /// Whether the original child is still running (false once it exited,
    /// even if not reaped yet... in which case it is reaped here).
    pub fn child_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Reaps the original child after `floe dump` killed it, so its pid is
    /// free for the restore. Panics if it does not exit within `timeout`.
    pub fn reap(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("child already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                eprintln!("{} (pid {}) exited: {}", self.name, self.pid, describe_status(&st));
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} (pid {}) still running {timeout:?} after the dump (state {:?}); floe dump should kill it",
                    self.name,
                    self.pid,
                    proc_state(self.pid)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the original child and reaps it.
    pub fn kill_child(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Registers the restored process (same pid, not our child) for cleanup,
    /// identified by pid and start time; a no-op when no such process exists.
    pub fn adopt_restored(&mut self) {
        if let Some(st) = start_time(self.pid) {
            self.restored.push((self.pid, st));
        }
    }

    /// Kills everything this fixture knows about and waits for it to vanish.
    pub fn kill_all(&mut self) {
        self.kill_child();
        for (pid, st) in self.restored.drain(..) {
            if start_time(pid) != Some(st) {
                continue; // gone, or the pid now belongs to someone else
            }
            let _ = send_signal(pid, libc::SIGKILL);
            if !wait_pid_gone(pid, Duration::from_secs(10)) {
                eprintln!("warning: restored {} (pid {pid}) still in /proc after SIGKILL", self.name);
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A fresh temporary directory for one test. Set `FLOE_TEST_KEEP=1` to keep
/// it (its path is printed) for post-mortem inspection.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(&format!("floe-e2e-{tag}-")).tempdir().unwrap();
        let path = dir.path().to_owned();
        eprintln!("test dir: {}", path.display());
        Self { dir: Some(dir), path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("FLOE_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// terminals

/// A pseudo-terminal pair with echo turned off. Both ends are close-on-exec
/// in the test process (opened via /dev/ptmx with O_CLOEXEC instead of
/// openpty(3), whose fds would leak into processes spawned concurrently by
/// other test threads); hand the slave to a child with [`Pty::slave_stdio`].
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub slave_path: PathBuf,
}

impl Pty {
    pub fn open() -> Self {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: the path is a valid NUL-terminated string.
        let m = unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags) };
        assert!(m >= 0, "open /dev/ptmx: {}", io::Error::last_os_error());
        // SAFETY: m is a freshly opened fd that nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(m) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: master is a valid ptmx fd; name is a writable buffer of the
        // given length.
        let rc = unsafe {
            if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
                -1
            } else {
                libc::ptsname_r(m, name.as_mut_ptr(), name.len())
            }
        };
        assert!(rc == 0, "grantpt/unlockpt/ptsname: {}", io::Error::last_os_error());
        // SAFETY: ptsname_r succeeded, so name holds a NUL-terminated string.
        let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        // SAFETY: slave_path is a valid NUL-terminated string.
        let s = unsafe { libc::open(slave_path.as_ptr(), flags) };
        assert!(s >= 0, "open {slave_path:?}: {}", io::Error::last_os_error());
        // SAFETY: s is a freshly opened fd that nothing else owns.
        let slave = unsafe { OwnedFd::from_raw_fd(s) };
        let slave_path = PathBuf::from(OsStr::from_bytes(slave_path.to_bytes()));

        // SAFETY: termios is plain old data; all-zero is a valid value.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: slave is a valid tty fd and t a valid termios to fill in.
        let rc = unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0, "tcgetattr: {}", io::Error::last_os_error());
        t.c_lflag &= !(libc::ECHO | libc::ECHONL);
        // SAFETY: as above; t was initialised by tcgetattr.
        let rc = unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) };
        assert_eq!(rc, 0, "tcsetattr: {}", io::Error::last_os_error());
        Self { master, slave, slave_path }
    }

    /// A new descriptor for the slave end, for a child's stdin.
    pub fn slave_stdio(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().unwrap())
    }

    /// Types `data` into the terminal.
    pub fn write_master(&self, data: &[u8]) {
        let mut f = File::from(self.master.try_clone().unwrap());
        f.write_all(data).unwrap();
    }
}

// ---------------------------------------------------------------------------
// data

/// xorshift64* step.
pub fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Writes `len` deterministic pseudo-random bytes to `path`.
pub fn write_pattern_file(path: &Path, len: usize, seed: u64) {
    let mut s = seed | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&xorshift(&mut s).to_le_bytes());
    }
    data.truncate(len);
    fs::write(path, data).unwrap();
}

/// Writes `len` bytes of deterministic, compressible (roughly 12-15x with
/// gzip, which then runs at ~50 MB/s) but non-trivial text to `path`: a
/// 4 MiB block of pseudo-randomly chosen phrases and numbers, repeated with a
/// different rotation and a header per copy (the repeats are far beyond
/// gzip's 32 KiB window, so every copy costs full work).
pub fn write_compressible_file(path: &Path, len: usize, seed: u64) {
    const WORDS: &[&str] = &[
        "checkpoint",
        "restore",
        "floe",
        "page",
        "mapping",
        "thread",
        "signal",
        "register",
        "vdso",
        "stack",
        "heap",
        "anonymous",
        "private",
        "shared",
        "file",
        "descriptor",
        "offset",
        "session",
        "terminal",
        "pid",
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "on",
        "with",
        "for",
        "kernel",
        "ptrace",
        "parasite",
        "image",
        "manifest",
        "checksum",
        "blake3",
        "x86_64",
        "linux",
        "process",
    ];
    const BLOCK: usize = 4 << 20;
    let mut s = seed | 1;
    let mut pick = |n: usize| (xorshift(&mut s) % n as u64) as usize;
    let phrases: Vec<String> = (0..256)
        .map(|_| {
            let n = 4 + pick(6);
            (0..n).map(|_| WORDS[pick(WORDS.len())]).collect::<Vec<_>>().join(" ")
        })
        .collect();
    let mut base = Vec::with_capacity(BLOCK + 128);
    while base.len() < BLOCK {
        if pick(20) == 0 {
            base.extend_from_slice(pick(100_000).to_string().as_bytes());
            base.push(b' ');
        } else {
            base.extend_from_slice(phrases[pick(phrases.len())].as_bytes());
            base.push(if pick(10) < 3 { b'\n' } else { b' ' });
        }
    }
    base.truncate(BLOCK);
    let mut out = io::BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    let mut written = 0;
    let mut i = 0u64;
    while written < len {
        let rot = (i.wrapping_mul(0x9E37_79B9) % BLOCK as u64) as usize;
        let header = format!("=== block {i} rotation {rot} ===\n");
        for part in [header.as_bytes(), &base[rot..], &base[..rot]] {
            let n = part.len().min(len - written);
            out.write_all(&part[..n]).unwrap();
            written += n;
        }
        i += 1;
    }
    out.flush().unwrap();
}

/// The real python3 interpreter found through PATH (resolving wrapper
/// scripts such as pyenv shims via `sys.executable`, so the dumped process
/// is the interpreter itself).
pub fn python3() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 from PATH: {e}"));
        assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.is_file() {
            p
        } else {
            PathBuf::from("python3")
        }
    })
    .clone()
}

/// Numbers parsed from the lines of `path` that start with `prefix`, taking
/// the first whitespace-separated field after it.
pub fn numbered_lines(path: &Path, prefix: &str) -> Vec<u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------
// workloads shared by the suites

/// Dumps `fx` (without `--leave-running` in `extra`, floe kills it), asserts
/// success and a well-formed image, and reaps the original child so its pid
/// is free for the restore.
pub fn dump_and_reap(fx: &mut Fixture, dir: &Path, extra: &[&str]) {
    let out = dump(fx.pid, dir, extra);
    assert_ok(&out, &format!("dump of {} (pid {})", fx.name, fx.pid));
    fx.reap(Duration::from_secs(10));
    assert_image_files(dir);
    // The pid is free again (nothing but our own waitpid could hold it).
    assert!(!pid_exists(fx.pid), "pid {} still in /proc after reaping", fx.pid);
}

/// `floe restore --restore-detached EXTRA` of `fx`'s image; registers the
/// restored process for cleanup, asserts success and that it runs with the
/// original pid.
pub fn restore_and_adopt(fx: &mut Fixture, dir: &Path, extra: &[&str], stdin: Stdio) -> Output {
    let out = restore_detached(dir, extra, stdin);
    fx.adopt_restored();
    assert_ok(&out, &format!("restore of {} (pid {})", fx.name, fx.pid));
    assert!(
        pid_alive(fx.pid),
        "restore of {} exited 0 but pid {} is not running (state {:?})\nlog:\n{}",
        fx.name,
        fx.pid,
        proc_state(fx.pid),
        fx.log_contents()
    );
    out
}

/// The `memstate` fixture with its input files (see fixtures/memstate.c).
pub struct Memstate {
    pub fx: Fixture,
    pub ready: PathBuf,
    pub report_path: PathBuf,
    /// Mapped MAP_PRIVATE and written to (copy-on-write): never modified on disk.
    pub private_file: PathBuf,
    /// Mapped MAP_SHARED and modified.
    pub shared_file: PathBuf,
    /// Open read-only at offset [`Memstate::RO_READ`].
    pub ro_file: PathBuf,
    /// Open O_APPEND.
    pub append_file: PathBuf,
    /// Created, opened, then unlinked by the fixture.
    pub deleted_file: PathBuf,
    /// Content of the private file as created.
    pub private_content: Vec<u8>,
}

impl Memstate {
    pub const PRIVATE_LEN: usize = (1 << 20) + 1234;
    pub const SHARED_LEN: usize = 256 << 10;
    pub const RO_LEN: usize = 64 << 10;
    pub const RO_READ: usize = 12345;

    /// Creates the input files in `dir` and starts the fixture.
    pub fn spawn(dir: &Path) -> Self {
        let p = |n: &str| dir.join(n);
        let (private_file, shared_file, ro_file) = (p("private.dat"), p("shared.dat"), p("ro.dat"));
        write_pattern_file(&private_file, Self::PRIVATE_LEN, 11);
        write_pattern_file(&shared_file, Self::SHARED_LEN, 12);
        write_pattern_file(&ro_file, Self::RO_LEN, 13);
        let (ready, report_path) = (p("memstate.ready"), p("memstate.report"));
        let (append_file, deleted_file) = (p("append.out"), p("deleted.tmp"));
        let fx = Spawn::fixture("memstate", dir)
            .arg("--ready")
            .arg(&ready)
            .arg("--report")
            .arg(&report_path)
            .arg("--private-file")
            .arg(&private_file)
            .arg("--shared-file")
            .arg(&shared_file)
            .arg("--ro-file")
            .arg(&ro_file)
            .arg("--append-file")
            .arg(&append_file)
            .arg("--deleted-file")
            .arg(&deleted_file)
            .arg("--ro-read")
            .arg(Self::RO_READ.to_string())
            .ready_file(&ready)
            .spawn();
        let private_content = fs::read(&private_file).unwrap();
        Self { fx, ready, report_path, private_file, shared_file, ro_file, append_file, deleted_file, private_content }
    }

    pub fn pid(&self) -> i32 {
        self.fx.pid
    }

    /// SIGUSR1 report.
    pub fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }

    /// SIGHUP "deep" report (also checks the never-touched hole pages read as
    /// zero; this faults them in, so only use it after the restore).
    pub fn deep_report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGHUP, &self.fx.log)
    }
}

/// The `sleeper` fixture (see fixtures/sleeper.c).
pub struct Sleeper {
    pub fx: Fixture,
    pub ticks: PathBuf,
    pub report_path: PathBuf,
}

impl Sleeper {
    pub fn spawn(dir: &Path, interval_ms: u32) -> Self {
        let (ready, ticks, report_path) =
            (dir.join("sleeper.ready"), dir.join("ticks.out"), dir.join("sleeper.report"));
        let fx = Spawn::fixture("sleeper", dir)
            .arg("--ready")
            .arg(&ready)
            .arg("--ticks")
            .arg(&ticks)
            .arg("--report")
            .arg(&report_path)
            .arg("--interval-ms")
            .arg(interval_ms.to_string())
            .ready_file(&ready)
            .spawn();
        Self { fx, ticks, report_path }
    }

    /// (N, monotonic ns) of every complete tick line so far.
    pub fn ticks(&self) -> Vec<(u64, u64)> {
        let text = fs::read_to_string(&self.ticks).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert!(f.len() == 3 && f[0] == "tick", "malformed tick line {l:?} in {}", self.ticks.display());
                (f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect()
    }

    /// Waits until at least `n` ticks were written; panics on timeout.
    pub fn wait_ticks(&self, n: usize, timeout: Duration) -> Vec<(u64, u64)> {
        if !wait_until(timeout, || self.ticks().len() >= n) {
            panic!(
                "sleeper (pid {}) wrote only {} ticks, expected {n} (state {:?})\nlog:\n{}",
                self.fx.pid,
                self.ticks().len(),
                proc_state(self.fx.pid),
                self.fx.log_contents()
            );
        }
        self.ticks()
    }

    pub fn report(&self) -> Report {
        request_report(self.fx.pid, &self.report_path, libc::SIGUSR1, &self.fx.log)
    }
}

// ---------------------------------------------------------------------------
// helpers for tests/refusals.rs

/// Starts `program ARGS` (a [`Fixture`] named `name`) in a new process
/// group of the *test's* session: `setpgid(0, 0)` but no `setsid`, so the
/// process is neither a session leader nor in the test's process group.
/// stdin `/dev/null`, stdout/stderr appended to `<dir>/<name>.log`, cwd
/// `dir`, inherited fds >= 3 close-on-exec. No ready marker is awaited.
pub fn spawn_in_own_process_group<S: AsRef<OsStr>>(
    name: &str,
    program: impl AsRef<OsStr>,
    args: &[S],
    dir: &Path,
) -> Fixture {
    let log = dir.join(format!("{name}.log"));
    let logf = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let mut cmd = Command::new(program.as_ref());
    cmd.args(args)
        .current_dir(dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf));
    // SAFETY: the hook runs between fork and exec and only makes a raw
    // close_range syscall, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(cloexec_inherited_fds);
    }
    let child =
        cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.as_ref().to_string_lossy()));
    let pid = child.id() as i32;
    eprintln!(
        "started {name} as pid {pid} in its own process group: {} {}",
        program.as_ref().to_string_lossy(),
        args_display(args)
    );
    Fixture { name: name.to_owned(), pid, dir: dir.to_owned(), log, child: Some(child), restored: Vec::new() }
}

/// Kills a process that is not our child (e.g. a grandchild) on drop, by
/// pid, provided its start time still matches, and waits until /proc/PID
/// vanishes (bounded by [`GONE_TIMEOUT`]).
pub struct KillPidOnDrop {
    pub pid: i32,
    start: Option<u64>,
}

impl KillPidOnDrop {
    /// Remembers `pid` and its current start time.
    pub fn new(pid: i32) -> Self {
        Self { pid, start: start_time(pid) }
    }

    /// The start time recorded by [`KillPidOnDrop::new`] (None once killed).
    pub fn start_time(&self) -> Option<u64> {
        self.start
    }

    /// Kills it now (if it is still the same process) and waits for it to vanish.
    pub fn kill(&mut self) {
        if let Some(st) = self.start.take() {
            if start_time(self.pid) == Some(st) {
                let _ = send_signal(self.pid, libc::SIGKILL);
                if !wait_pid_gone(self.pid, GONE_TIMEOUT) {
                    eprintln!("warning: pid {} still in /proc after SIGKILL", self.pid);
                }
            }
        }
    }
}

impl Drop for KillPidOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// process trees and threads (tests/tests/trees.rs)

/// Identity fields of one process from /proc/PID/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcIds {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// State letter (R, S, D, T, Z, ...).
    pub state: char,
}

/// pid, ppid, pgid, sid and state of `pid`, if it exists (zombies included).
pub fn proc_ids(pid: i32) -> Option<ProcIds> {
    let f = stat_fields(pid)?;
    let num = |i: usize| f.get(i)?.parse::<i32>().ok();
    Some(ProcIds { pid, ppid: num(1)?, pgid: num(2)?, sid: num(3)?, state: f.first()?.chars().next()? })
}

/// [`proc_ids`], panicking with `what` when the process does not exist.
pub fn proc_ids_of(pid: i32, what: &str) -> ProcIds {
    proc_ids(pid).unwrap_or_else(|| panic!("{what}: process {pid} does not exist"))
}

/// Direct children of `pid` (from /proc/PID/task/*/children), sorted.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for tid in tids_of(pid) {
        let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        out.extend(text.split_whitespace().filter_map(|s| s.parse::<i32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Every descendant of `pid` (not `pid` itself), parents before children.
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        for c in children_of(p) {
            if !out.contains(&c) && c != pid {
                out.push(c);
                queue.push_back(c);
            }
        }
    }
    out
}

/// Thread ids of `pid` (entries of /proc/PID/task), sorted.
pub fn tids_of(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Name (comm) of thread `tid` of process `pid`.
pub fn thread_comm(pid: i32, tid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok().map(|s| s.trim_end_matches('\n').to_owned())
}

/// State letter of thread `tid` of process `pid`.
pub fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

/// The system call thread `tid` of `pid` is blocked in (first field of
/// /proc/PID/task/TID/syscall), or None when it runs or cannot be read.
pub fn thread_syscall(pid: i32, tid: i32) -> Option<i64> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Whether fd `fd1` of `pid1` and fd `fd2` of `pid2` are one open file
/// description (`kcmp(KCMP_FILE)`).
pub fn same_file_description(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes only integers and has no memory-safety preconditions.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1 as libc::c_long, fd2 as libc::c_long) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc == 0)
}

/// Target of /proc/PID/fd/FD (e.g. "pipe:[1234]").
pub fn fd_target(pid: i32, fd: i32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok().map(|p| p.to_string_lossy().into_owned())
}

/// Waits until every pid in `pids` has vanished from /proc; panics naming
/// the ones left after `timeout`.
pub fn wait_all_gone(pids: &[i32], timeout: Duration, what: &str) {
    if !wait_until(timeout, || pids.iter().all(|&p| !pid_exists(p))) {
        let left: Vec<(i32, Option<char>)> =
            pids.iter().filter(|&&p| pid_exists(p)).map(|&p| (p, proc_state(p))).collect();
        panic!("{what}: still in /proc after {timeout:?}: {left:?}");
    }
}

/// Kills a set of processes that are not our children (a restored tree, or
/// the descendants of a fixture) on drop or on [`TreeGuard::kill_all`]: each
/// pid whose start time still matches the recorded one gets SIGKILL (all of
/// them first, then the wait), and every one of them is awaited until
/// /proc/PID vanishes (zombies go once their parent is dead and PID 1 has
/// reaped them).
#[derive(Default)]
pub struct TreeGuard {
    procs: Vec<(i32, u64)>,
}

impl TreeGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `pid` with its current start time (no-op if it does not exist
    /// or is registered already with that start time).
    pub fn add(&mut self, pid: i32) {
        if let Some(st) = start_time(pid) {
            if !self.procs.contains(&(pid, st)) {
                self.procs.push((pid, st));
            }
        }
    }

    /// Registers each of `pids`.
    pub fn add_all(&mut self, pids: &[i32]) {
        for &p in pids {
            self.add(p);
        }
    }

    /// Registers `root` and all its current descendants.
    pub fn add_tree(&mut self, root: i32) {
        self.add(root);
        for p in descendants_of(root) {
            self.add(p);
        }
    }

    /// Kills everything registered and waits (bounded) for it to vanish.
    pub fn kill_all(&mut self) {
        let procs: Vec<(i32, u64)> = self.procs.drain(..).collect();
        let mine: Vec<i32> = procs.iter().filter(|(p, st)| start_time(*p) == Some(*st)).map(|(p, _)| *p).collect();
        for &p in &mine {
            let _ = send_signal(p, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for &p in &mine {
            let st = procs.iter().find(|(q, _)| *q == p).map(|(_, s)| *s);
            // Wait while the same process (same start time) is still there.
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_until(left, || start_time(p) != st) {
                eprintln!("warning: pid {p} still in /proc after SIGKILL (state {:?})", proc_state(p));
            }
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Sends `sig` to `pid`, then requests reports (SIGUSR1, see
/// [`request_report`]) until `cond` holds for one; panics after `timeout`
/// with the last report.
pub fn signal_and_await_report(
    pid: i32,
    sig: Option<libc::c_int>,
    report: &Path,
    log: &Path,
    timeout: Duration,
    mut cond: impl FnMut(&Report) -> bool,
) -> Report {
    if let Some(sig) = sig {
        send_signal(pid, sig).unwrap_or_else(|e| panic!("cannot signal {pid}: {e}"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let r = request_report(pid, report, libc::SIGUSR1, log);
        if cond(&r) {
            return r;
        }
        if Instant::now() >= deadline {
            panic!("process {pid}: the awaited report never came within {timeout:?}; last one:\n{r:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
