//! Network-namespace "hosts" for end-to-end tests: two named network
//! namespaces joined by a veth pair stand for two machines.
//!
//! ```text
//!   floe-<tag>-<uniq>-a                 floe-<tag>-<uniq>-b
//!   f<uniq>a  10.X.Y.1/24  <== veth, MTU 9000 ==>  f<uniq>b  10.X.Y.2/24
//! ```
//!
//! `<uniq>` is `<test pid>-<counter>` in base 36, so tests running in
//! parallel (threads of one test binary, or several binaries) never collide,
//! and the interface names stay within the kernel's 15 characters. The
//! subnet is derived from the same pid and counter; since each pair is only
//! reachable from inside its own namespaces, two pairs sharing a subnet would
//! not disturb each other anyway.
//!
//! Only the network is separated: there are no UTS, mount or pid namespaces
//! of our making, so both hosts share the hostname, the file system and the
//! pid space. Tests tell the hosts apart by network-namespace inode
//! ([`Host::netns_inode`], [`netns_inode_of_pid`]).
//!
//! Needs root and the `ip` (iproute2), `ping` (iputils-ping) and, for
//! [`Hosts::cut`], `nft` (nftables) tools; see [`require_tools`].
//!
//! Cleanup: dropping [`Hosts`] (also while a test unwinds from a panic)
//! SIGKILLs every process still inside either namespace and deletes the
//! namespaces; namespaces left behind by a test process that was killed
//! outright are removed by [`cleanup_stale`], which [`Hosts::new`] calls for
//! its tag.

use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where `ip netns add` keeps the namespaces (bind mounts of nsfs files).
pub const NETNS_DIR: &str = "/run/netns";
/// The nftables table (family `inet`, in namespace A) that [`Hosts::cut`] installs.
pub const CUT_TABLE: &str = "floe_test_cut";
/// MTU of the veth pair.
pub const MTU: u32 = 9000;
/// How long [`Hosts::new`] waits for the first ping to get through.
pub const PING_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed process may take to leave its namespace.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for one `ip` / `nft` / `ping` invocation.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest accepted tag.
const MAX_TAG_LEN: usize = 12;

/// `close_range(2)` flag: mark the range close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The tools this module runs, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping")];

/// Absolute path of `name`: searched in `$PATH`, then in the sbin/bin
/// directories (root's tools may live outside a minimal `$PATH`).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].into_iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).map(|m| m.is_file() && m.mode() & 0o111 != 0).unwrap_or(false))
}

/// Like [`find_tool`], with an error naming the package to install.
fn tool(name: &str) -> io::Result<PathBuf> {
    find_tool(name).ok_or_else(|| {
        let pkg = TOOLS.iter().find(|(t, _)| *t == name).map_or(name, |(_, p)| p);
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("`{name}` not found (in $PATH, /usr/sbin, /sbin): install the `{pkg}` package"),
        )
    })
}

/// Checks that `ip`, `nft` and `ping` are installed; the error lists the
/// missing ones and the packages that provide them.
pub fn require_tools() -> Result<(), String> {
    let missing: Vec<String> =
        TOOLS.iter().filter(|(t, _)| find_tool(t).is_none()).map(|(t, p)| format!("`{t}` (package {p})")).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("network-namespace tests need {}; install with apt-get", missing.join(", ")))
    }
}

/// Marks every inherited fd >= 3 close-on-exec (run between fork and exec),
/// so no stray descriptor of the test process leaks into a long-running
/// program started in a namespace.
fn cloexec_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only changes fd flags; it is async-signal-safe and
    // std's own fds in the child are already close-on-exec.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with the given stdin, stdout/stderr captured through temp
/// files (never pipes: nothing can hang on them), bounded by
/// [`TOOL_TIMEOUT`]. Returns the exit status, stdout and stderr.
fn run_status(cmd: &mut Command, stdin: Stdio) -> io::Result<(ExitStatus, String, String)> {
    let mut out = tempfile::tempfile()?;
    let mut err = tempfile::tempfile()?;
    cmd.stdin(stdin).stdout(out.try_clone()?).stderr(err.try_clone()?);
    let what = describe(cmd);
    let mut child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("cannot run `{what}`: {e}")))?;
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`{what}` did not finish within {TOOL_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read_back = |f: &mut File| -> io::Result<String> {
        let mut s = String::new();
        f.rewind()?;
        f.read_to_string(&mut s)?;
        Ok(s)
    };
    Ok((status, read_back(&mut out)?, read_back(&mut err)?))
}

/// [`run_status`], with a non-zero exit turned into an error carrying the
/// command and its stderr. Returns stdout.
fn run(cmd: &mut Command, stdin: Stdio) -> io::Result<String> {
    let (status, stdout, stderr) = run_status(cmd, stdin)?;
    if !status.success() {
        return Err(io::Error::other(format!("`{}` failed ({status}): {}", describe(cmd), stderr.trim())));
    }
    Ok(stdout)
}

/// `ip ARGS...`
fn ip(args: &[&str]) -> io::Result<String> {
    run(Command::new(tool("ip")?).args(args), Stdio::null())
}

/// `ip netns exec NS nft -f -` with `script` on stdin.
fn nft_script(ns: &str, script: &str) -> io::Result<()> {
    let nft = tool("nft")?;
    let mut f = tempfile::tempfile()?;
    io::Write::write_all(&mut f, script.as_bytes())?;
    f.rewind()?;
    let mut cmd = Command::new(tool("ip")?);
    cmd.args(["netns", "exec", ns]).arg(nft).args(["-f", "-"]);
    run(&mut cmd, Stdio::from(f)).map(drop)
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// (device, inode) identifying a namespace file (a bind mount under
/// /run/netns or a /proc/PID/ns/* link).
fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Inode of the network namespace of process `pid` (stat of /proc/PID/ns/net).
pub fn netns_inode_of_pid(pid: i32) -> io::Result<u64> {
    Ok(fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// Live processes whose network namespace is `id` (zombies have none).
fn pids_in_netns(id: (u64, u64)) -> Vec<i32> {
    let own = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != own && ns_id(Path::new(&format!("/proc/{p}/ns/net"))).ok() == Some(id))
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs every process in the named namespace (again and again, so that
/// processes forked meanwhile go too) until none is left or [`KILL_TIMEOUT`]
/// passes. Returns the pids still there at the end (empty on success).
fn kill_netns_processes(name: &str) -> Vec<i32> {
    let Ok(id) = ns_id(&netns_path(name)) else {
        return Vec::new();
    };
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let pids = pids_in_netns(id);
        if pids.is_empty() || Instant::now() >= deadline {
            return pids;
        }
        for &p in &pids {
            // SAFETY: kill takes only integers; signalling a pid that has
            // gone meanwhile merely fails with ESRCH.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deletes a namespace after killing what runs inside; warnings on stderr.
fn remove_netns(name: &str) {
    let left = kill_netns_processes(name);
    if !left.is_empty() {
        eprintln!("warning: processes {left:?} still in network namespace {name} after SIGKILL and {KILL_TIMEOUT:?}");
    }
    if netns_path(name).exists() {
        if let Err(e) = ip(&["netns", "del", name]) {
            eprintln!("warning: cannot delete network namespace {name}: {e}");
        }
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid of the test process that created namespace `name`
/// (`floe-<tag>-<pid36>-<counter36>-<side>`), if the name has that shape.
fn owner_pid(name: &str) -> Option<i32> {
    let mut parts = name.rsplitn(4, '-');
    let (_side, _counter, pid36) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next()?;
    i32::from_str_radix(pid36, 36).ok()
}

/// Removes leftover namespaces named `floe-<prefix>*` from earlier runs
/// that crashed without cleaning up: those whose creating process (the pid
/// encoded in the name) no longer exists, or whose name does not encode one.
/// Namespaces of live processes (this one included, e.g. parallel tests)
/// are left alone. Processes still inside a stale namespace are killed
/// first. Problems are reported on stderr only.
pub fn cleanup_stale(prefix: &str) {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    let want = format!("floe-{prefix}");
    let mut names: Vec<String> =
        dir.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n.starts_with(&want)).collect();
    names.sort();
    for name in names {
        if let Some(owner) = owner_pid(&name) {
            if Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
        }
        eprintln!("removing stale network namespace {name}");
        remove_netns(&name);
    }
}

/// One "host": a named network namespace with one end of the veth pair.
#[derive(Debug, Clone)]
pub struct Host {
    /// Name of the network namespace (`ip netns` name, file in /run/netns).
    pub name: String,
    /// Address of [`Host::ifname`] (prefix length 24).
    pub ip: Ipv4Addr,
    /// This host's end of the veth pair (exists only inside the namespace).
    pub ifname: String,
}

impl Host {
    /// /run/netns/NAME.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// A command running `program` inside this namespace, as
    /// `ip netns exec NAME PROGRAM ...` (add arguments, stdio, ... as usual).
    /// `ip` execs the program, so the spawned child's pid is the program's.
    ///
    /// Besides joining the network namespace, `ip netns exec` puts the
    /// program into a new mount namespace (a slave copy of the caller's) in
    /// which /sys is remounted for the network namespace and, if
    /// /etc/netns/NAME/ exists, each file in it is bind-mounted over its
    /// namesake in /etc. We create no such files; do not rely on that
    /// mechanism. Use [`Host::command_setns`] to keep the caller's mount
    /// namespace.
    ///
    /// Inherited fds >= 3 are marked close-on-exec in the child. If `ip`
    /// cannot be found, the command runs plain `ip`, so spawning it fails.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ip = find_tool("ip").unwrap_or_else(|| PathBuf::from("ip"));
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", &self.name]).arg(program);
        // SAFETY: the hook runs between fork and exec and only makes a raw
        // close_range syscall, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(cloexec_inherited_fds);
        }
        cmd
    }

    /// A command running `program` in this network namespace, joined with
    /// setns(2) between fork and exec: unlike [`Host::command`] no new
    /// mount namespace and no /etc/netns bind mounts (the program sees the
    /// test's /sys). Inherited fds >= 3 are marked close-on-exec.
    pub fn command_setns(&self, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
        let ns = File::open(self.netns_path())?; // O_CLOEXEC: gone in the program
        let mut cmd = Command::new(program);
        let hook = move || -> io::Result<()> {
            // SAFETY: setns takes an fd (kept open by the closure) and a
            // flag; it is a plain system call, safe between fork and exec.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            cloexec_inherited_fds()
        };
        // SAFETY: the hook only makes async-signal-safe system calls
        // (setns, close_range).
        unsafe {
            cmd.pre_exec(hook);
        }
        Ok(cmd)
    }

    /// Inode of this network namespace (stat of /run/netns/NAME); equals
    /// [`netns_inode_of_pid`] of every process inside it.
    pub fn netns_inode(&self) -> io::Result<u64> {
        Ok(fs::metadata(self.netns_path())?.ino())
    }

    /// Live processes currently inside this namespace, sorted.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        Ok(pids_in_netns(ns_id(&self.netns_path())?))
    }

    /// Whether one ping from this host to `to` is answered within 1 s
    /// (`ping -c1 -W1`). Errors only when ping cannot be run at all.
    pub fn can_ping(&self, to: Ipv4Addr) -> io::Result<bool> {
        let ping = tool("ping")?;
        let mut cmd = self.command(ping);
        cmd.args(["-c1", "-W1", "-q", &to.to_string()]);
        Ok(run_status(&mut cmd, Stdio::null())?.0.success())
    }
}

/// Two hosts `a` and `b` joined by a veth pair; see the module docs.
/// Dropping it kills everything inside and removes the namespaces.
/// Validated tag, unique suffix and subnet of a new set of hosts (shared by
/// [`Hosts::new`] and [`Lan::new`]), after stale namespaces of the tag are gone.
struct HostNames {
    tag: String,
    uniq: String,
    x: u8,
    y: u8,
}

impl HostNames {
    fn new(tag: &str) -> io::Result<HostNames> {
        if tag.is_empty()
            || tag.len() > MAX_TAG_LEN
            || !tag.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("netns tag {tag:?} must be 1 to {MAX_TAG_LEN} characters of [a-z0-9]"),
            ));
        }
        tool("ip")?;
        tool("ping")?;
        cleanup_stale(tag);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // "f" + <= 5 (pid_max 2^22) + "-" + <= 7 + "a" <= 15 characters.
        let uniq = format!("{}-{}", base36(u64::from(pid)), base36(u64::from(n)));
        Ok(HostNames { tag: tag.to_string(), uniq, x: 100 + (pid % 128) as u8, y: (n % 256) as u8 })
    }

    /// Host `side` with address 10.X.Y.`last`.
    fn host(&self, side: &str, last: u8) -> Host {
        Host {
            name: format!("floe-{}-{}-{side}", self.tag, self.uniq),
            ip: Ipv4Addr::new(10, self.x, self.y, last),
            ifname: format!("f{}{side}", self.uniq),
        }
    }
}

#[derive(Debug)]
pub struct Hosts {
    pub a: Host,
    pub b: Host,
    cut: AtomicBool,
}

impl Hosts {
    /// Creates namespaces `floe-<tag>-<uniq>-a` and `-b` (after removing
    /// stale ones of this tag, see [`cleanup_stale`]), the veth pair with
    /// MTU 9000 and addresses 10.X.Y.1/24 (a) and 10.X.Y.2/24 (b), brings
    /// lo and the veths up and waits (at most [`PING_READY_TIMEOUT`]) until
    /// a can ping b. `tag`: 1 to 12 characters of `[a-z0-9]`.
    /// On any error, what was created so far is removed again.
    pub fn new(tag: &str) -> io::Result<Hosts> {
        let names = HostNames::new(tag)?;
        let host = |side: &str, last: u8| names.host(side, last);
        // Built first so that Drop cleans up after a failure half-way.
        let hosts = Hosts { a: host("a", 1), b: host("b", 2), cut: AtomicBool::new(false) };
        hosts.setup()?;
        eprintln!(
            "netns hosts: {} ({}, {}) <-> {} ({}, {})",
            hosts.a.name, hosts.a.ip, hosts.a.ifname, hosts.b.name, hosts.b.ip, hosts.b.ifname
        );
        Ok(hosts)
    }

    fn setup(&self) -> io::Result<()> {
        let (a, b) = (&self.a, &self.b);
        let mtu = MTU.to_string();
        ip(&["netns", "add", &a.name])?;
        ip(&["netns", "add", &b.name])?;
        // Both ends are created directly inside their namespaces.
        #[rustfmt::skip]
        let veth = [
            "link", "add", &a.ifname, "netns", &a.name, "mtu", &mtu,
            "type", "veth", "peer", "name", &b.ifname, "netns", &b.name, "mtu", &mtu,
        ];
        ip(&veth)?;
        for h in [a, b] {
            ip(&["-n", &h.name, "link", "set", "lo", "up"])?;
            ip(&["-n", &h.name, "addr", "add", &format!("{}/24", h.ip), "dev", &h.ifname])?;
            ip(&["-n", &h.name, "link", "set", &h.ifname, "up"])?;
        }
        let started = Instant::now();
        while !a.can_ping(b.ip)? {
            if started.elapsed() > PING_READY_TIMEOUT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} cannot ping {} ({}) after {PING_READY_TIMEOUT:?}", a.name, b.name, b.ip),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Cuts the network between the hosts: installs in namespace a the
    /// nftables table `inet floe_test_cut` whose input and output chains
    /// drop every packet on a's veth (so nothing passes either way; sending
    /// from a fails with EPERM, packets from b vanish). Idempotent. Needs
    /// `nft` (package nftables).
    pub fn cut(&self) -> io::Result<()> {
        let dev = &self.a.ifname;
        // Creating and deleting the table first makes this idempotent.
        let script = format!(
            "table inet {CUT_TABLE}\n\
             delete table inet {CUT_TABLE}\n\
             table inet {CUT_TABLE} {{\n\
             \tchain input {{ type filter hook input priority -300; policy accept; iifname \"{dev}\" drop; }}\n\
             \tchain output {{ type filter hook output priority -300; policy accept; oifname \"{dev}\" drop; }}\n\
             }}\n"
        );
        nft_script(&self.a.name, &script)?;
        self.cut.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Undoes [`Hosts::cut`] by deleting the table (a no-op when there is none).
    pub fn heal(&self) -> io::Result<()> {
        nft_script(&self.a.name, &format!("table inet {CUT_TABLE}\ndelete table inet {CUT_TABLE}\n"))?;
        self.cut.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the network is currently cut (by [`Hosts::cut`]).
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for Hosts {
    /// Kills every process inside either namespace (SIGKILL, waiting up to
    /// [`KILL_TIMEOUT`] for them to leave), deletes the cut table, the veth
    /// and both namespaces. Problems are reported on stderr, never panics.
    fn drop(&mut self) {
        for h in [&self.a, &self.b] {
            let left = kill_netns_processes(&h.name);
            if !left.is_empty() {
                eprintln!("warning: processes {left:?} still in {} after SIGKILL and {KILL_TIMEOUT:?}", h.name);
            }
        }
        if self.is_cut() {
            if let Err(e) = self.heal() {
                eprintln!("warning: cannot delete nftables table {CUT_TABLE} in {}: {e}", self.a.name);
            }
        }
        if self.a.netns_path().exists() {
            // Deleting one end deletes the pair; an error here means it is gone already.
            let _ = ip(&["-n", &self.a.name, "link", "del", &self.a.ifname]);
        }
        for h in [&self.a, &self.b] {
            remove_netns(&h.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Lan: three hosts on one Ethernet segment

/// MTU of the [`Lan`] veths (and so of its bridge): an ordinary Ethernet LAN.
pub const LAN_MTU: u32 = 1500;
/// Last octet of [`Lan::service_ip`].
pub const LAN_SERVICE_LAST_OCTET: u8 = 100;

/// Three hosts on one switched Ethernet segment, for tests in which a
/// service (and its floating address) moves between two servers while a
/// client keeps talking to it.
///
/// ```text
///   floe-<tag>-<uniq>-a        floe-<tag>-<uniq>-b        floe-<tag>-<uniq>-c
///   f<uniq>a 10.X.Y.1/24       f<uniq>b 10.X.Y.2/24       f<uniq>c 10.X.Y.3/24
///        |  veth                    |  veth                    |  veth
///   g<uniq>a ------------- b<uniq> (bridge) ------------- g<uniq>c
///                               g<uniq>b
///                     floe-<tag>-<uniq>-s  ("switch")
/// ```
///
/// Hosts a and b are the servers, c is the client. The bridge lives in its
/// own namespace `-s`, which holds no address: it only switches frames
/// (STP off, so ports forward at once; MAC learning with the kernel's
/// default ageing of 300 s). Every veth has MTU [`LAN_MTU`].
///
/// [`Lan::service_ip`] (10.X.Y.100) is a floating address configured nowhere
/// at creation: put it on a server with [`Lan::add_address`] and take it
/// away with [`Lan::del_address`].
///
/// Naming, subnets and stale cleanup follow [`Hosts`] (same `<uniq>` and
/// counter, so a `Lan` and a `Hosts` of one process never share names or a
/// subnet); the fourth namespace ends in `-s`, which [`cleanup_stale`]
/// handles like the others (the veths and the bridge vanish with their
/// namespaces).
///
/// Neighbour caches: a client that talked to the service address keeps the
/// old server's MAC for it after the address moved, and the old server
/// drops what arrives (it no longer owns the address and does not
/// forward). Observed without an announcement: the entry stays REACHABLE
/// for the rest of its reachable time (random 15 to 45 s), then goes
/// STALE, DELAY (5 s), PROBE (3 unicast probes, 1 s apart), FAILED, and
/// only the next packet re-resolves it by broadcast: about 40 s without
/// connectivity. A gratuitous ARP from the new owner ([`Lan::announce`],
/// done by [`Lan::add_address`] when `arping` is installed) re-points the
/// existing entry at once (Linux accepts it for an existing entry even with
/// arp_accept=0; the entry becomes STALE with the new MAC and is used right
/// away); so does [`Lan::flush_neighbour`] on the client.
///
/// Dropping it (also while unwinding from a panic) SIGKILLs every process
/// in the four namespaces, deletes the veths, the bridge and the namespaces.
#[derive(Debug)]
pub struct Lan {
    /// Server a (10.X.Y.1).
    pub a: Host,
    /// Server b (10.X.Y.2).
    pub b: Host,
    /// Client c (10.X.Y.3).
    pub c: Host,
    /// The floating service address 10.X.Y.100 (not configured at creation).
    pub service_ip: Ipv4Addr,
    /// Name of the "switch" namespace holding the bridge.
    pub switch: String,
    /// Name of the bridge (inside [`Lan::switch`]).
    pub bridge: String,
    /// Switch-side veth ends, for a, b, c in that order.
    ports: [String; 3],
}

/// A neighbour-cache entry (`ip neigh show to IP dev DEV`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// Link-layer address (lowercase, colon-separated), if the entry has one
    /// (INCOMPLETE and FAILED entries have none).
    pub lladdr: Option<String>,
    /// NUD state(s) as `ip` prints them, e.g. "REACHABLE", "STALE", "FAILED".
    pub state: String,
}

impl Lan {
    /// Creates the four namespaces `floe-<tag>-<uniq>-{a,b,c,s}` (after
    /// removing stale ones of this tag, see [`cleanup_stale`]), the bridge,
    /// one veth pair per host (MTU [`LAN_MTU`]), addresses 10.X.Y.{1,2,3}/24,
    /// brings lo and all links up and waits (at most [`PING_READY_TIMEOUT`]
    /// per pair) until a, b and c can ping one another. `tag`: 1 to 12
    /// characters of `[a-z0-9]`. On any error, what was created so far is
    /// removed again.
    pub fn new(tag: &str) -> io::Result<Lan> {
        let names = HostNames::new(tag)?;
        let (uniq, x, y) = (names.uniq.clone(), names.x, names.y);
        let host = |side: &str, last: u8| names.host(side, last);
        // Built first so that Drop cleans up after a failure half-way.
        let lan = Lan {
            a: host("a", 1),
            b: host("b", 2),
            c: host("c", 3),
            service_ip: Ipv4Addr::new(10, x, y, LAN_SERVICE_LAST_OCTET),
            switch: format!("floe-{tag}-{uniq}-s"),
            bridge: format!("b{uniq}"),
            ports: ["a", "b", "c"].map(|side| format!("g{uniq}{side}")),
        };
        lan.setup()?;
        eprintln!(
            "netns lan: bridge {} in {}; a {} ({}, {}), b {} ({}, {}), c {} ({}, {}); service address {}",
            lan.bridge,
            lan.switch,
            lan.a.name,
            lan.a.ip,
            lan.a.ifname,
            lan.b.name,
            lan.b.ip,
            lan.b.ifname,
            lan.c.name,
            lan.c.ip,
            lan.c.ifname,
            lan.service_ip
        );
        Ok(lan)
    }

    fn setup(&self) -> io::Result<()> {
        let mtu = LAN_MTU.to_string();
        let sw = self.switch.as_str();
        ip(&["netns", "add", sw])?;
        for h in self.hosts() {
            ip(&["netns", "add", &h.name])?;
        }
        ip(&["-n", sw, "link", "set", "lo", "up"])?;
        ip(&["-n", sw, "link", "add", &self.bridge, "mtu", &mtu, "type", "bridge", "stp_state", "0"])?;
        ip(&["-n", sw, "link", "set", &self.bridge, "up"])?;
        for (h, port) in self.hosts().into_iter().zip(&self.ports) {
            // Both ends are created directly inside their namespaces.
            #[rustfmt::skip]
            let veth = [
                "link", "add", &h.ifname, "netns", &h.name, "mtu", &mtu,
                "type", "veth", "peer", "name", port, "netns", sw, "mtu", &mtu,
            ];
            ip(&veth)?;
            ip(&["-n", sw, "link", "set", port, "master", &self.bridge])?;
            ip(&["-n", sw, "link", "set", port, "up"])?;
            ip(&["-n", &h.name, "link", "set", "lo", "up"])?;
            ip(&["-n", &h.name, "addr", "add", &format!("{}/24", h.ip), "dev", &h.ifname])?;
            ip(&["-n", &h.name, "link", "set", &h.ifname, "up"])?;
        }
        for (from, to) in [(&self.a, &self.b), (&self.a, &self.c), (&self.b, &self.c)] {
            let started = Instant::now();
            while !from.can_ping(to.ip)? {
                if started.elapsed() > PING_READY_TIMEOUT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} cannot ping {} ({}) after {PING_READY_TIMEOUT:?}", from.name, to.name, to.ip),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The three hosts a, b, c.
    pub fn hosts(&self) -> [&Host; 3] {
        [&self.a, &self.b, &self.c]
    }

    /// The switch-side veth end (bridge port, in [`Lan::switch`]) of `host`
    /// (matched by namespace name). Errors for a host not of this Lan.
    pub fn switch_port(&self, host: &Host) -> io::Result<&str> {
        self.hosts()
            .into_iter()
            .zip(&self.ports)
            .find(|(h, _)| h.name == host.name)
            .map(|(_, p)| p.as_str())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a host of this Lan", host.name))
            })
    }

    /// `ip addr add IP/24 dev <ifname>` in `host`'s namespace, then
    /// [`Lan::announce`] (a gratuitous ARP, silently skipped when `arping`
    /// is not installed; when it is, this returns about 1 s later, as
    /// arping waits that long for replies after sending). Fails if the
    /// address is there already.
    pub fn add_address(&self, host: &Host, addr: Ipv4Addr) -> io::Result<()> {
        self.switch_port(host)?;
        ip(&["-n", &host.name, "addr", "add", &format!("{addr}/24"), "dev", &host.ifname])?;
        self.announce(host, addr).map(drop)
    }

    /// `ip addr del IP/24 dev <ifname>` in `host`'s namespace. Sockets bound
    /// to the address stay open; they just stop receiving. Fails if the
    /// address is not there.
    pub fn del_address(&self, host: &Host, addr: Ipv4Addr) -> io::Result<()> {
        self.switch_port(host)?;
        ip(&["-n", &host.name, "addr", "del", &format!("{addr}/24"), "dev", &host.ifname]).map(drop)
    }

    /// Sends one gratuitous ARP request for `addr` from `host`'s interface
    /// (`arping -U -c1 -I <ifname> <addr>`, iputils syntax; package
    /// `iputils-arping`), so the other hosts' neighbour entries for `addr`
    /// point at `host`'s MAC. The request goes out at once, but arping then
    /// waits 1 s for replies (it takes whole seconds only), so this returns
    /// after about 1 s. Returns Ok(false) without doing anything when
    /// `arping` is not installed; errors when it fails.
    pub fn announce(&self, host: &Host, addr: Ipv4Addr) -> io::Result<bool> {
        let Some(arping) = find_tool("arping") else {
            return Ok(false);
        };
        let mut cmd = host.command_setns(arping)?;
        cmd.args(["-U", "-c1", "-w1", "-I", &host.ifname, &addr.to_string()]);
        run(&mut cmd, Stdio::null())?;
        Ok(true)
    }

    /// Whether a gratuitous ARP can be sent ([`Lan::announce`] needs `arping`).
    pub fn can_announce() -> bool {
        find_tool("arping").is_some()
    }

    /// The MAC address of `host`'s interface (lowercase, colon-separated).
    pub fn mac(&self, host: &Host) -> io::Result<String> {
        // /sys/class/net of another namespace is not visible here: ask `ip`.
        let out = ip(&["-n", &host.name, "-o", "link", "show", "dev", &host.ifname])?;
        let mut words = out.split_whitespace();
        words
            .find(|w| w.starts_with("link/"))
            .and_then(|_| words.next())
            .map(str::to_owned)
            .ok_or_else(|| io::Error::other(format!("no link-layer address in `ip link show` output: {out}")))
    }

    /// `on`'s neighbour-cache entry for `addr` on its interface, if any.
    pub fn neighbour(&self, on: &Host, addr: Ipv4Addr) -> io::Result<Option<Neighbour>> {
        let out = ip(&["-n", &on.name, "neigh", "show", "to", &addr.to_string(), "dev", &on.ifname])?;
        let Some(line) = out.lines().find(|l| l.split_whitespace().next() == Some(addr.to_string().as_str())) else {
            return Ok(None);
        };
        // "10.1.2.100 lladdr 6a:..:01 REACHABLE" or "10.1.2.100 FAILED"
        let words: Vec<&str> = line.split_whitespace().collect();
        let lladdr = words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).map(|s| s.to_string());
        let state = words
            .iter()
            .skip(1)
            .filter(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .copied()
            .collect::<Vec<_>>()
            .join(",");
        Ok(Some(Neighbour { lladdr, state }))
    }

    /// Removes `on`'s neighbour-cache entry for `addr`
    /// (`ip neigh flush to ADDR dev <ifname>`), so the next packet resolves
    /// it afresh by broadcast ARP.
    pub fn flush_neighbour(&self, on: &Host, addr: Ipv4Addr) -> io::Result<()> {
        ip(&["-n", &on.name, "neigh", "flush", "to", &addr.to_string(), "dev", &on.ifname]).map(drop)
    }

    /// The four namespace names: a, b, c and the switch.
    pub fn namespaces(&self) -> [&str; 4] {
        [&self.a.name, &self.b.name, &self.c.name, &self.switch]
    }
}

impl Drop for Lan {
    /// Kills every process inside the four namespaces (SIGKILL, waiting up
    /// to [`KILL_TIMEOUT`] for them to leave), deletes the veths, the bridge
    /// and the namespaces. Problems are reported on stderr, never panics.
    fn drop(&mut self) {
        for name in self.namespaces() {
            let left = kill_netns_processes(name);
            if !left.is_empty() {
                eprintln!("warning: processes {left:?} still in {name} after SIGKILL and {KILL_TIMEOUT:?}");
            }
        }
        for h in self.hosts() {
            if h.netns_path().exists() {
                // Deleting one end deletes the pair; an error means it is gone already.
                let _ = ip(&["-n", &h.name, "link", "del", &h.ifname]);
            }
        }
        if netns_path(&self.switch).exists() {
            let _ = ip(&["-n", &self.switch, "link", "del", &self.bridge]);
        }
        for name in self.namespaces() {
            remove_netns(name);
        }
    }
}
