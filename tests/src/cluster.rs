//! Two network-namespace hosts, each with a floe-agent, for live-migration
//! tests. Everything (agents, workloads, namespaces) is torn down on drop,
//! also when a test panics.
use crate::netns::{netns_inode_of_pid, Host, Hosts, Lan};
use crate::{fixture_path, floe_bin, wait_for_file, wait_until};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The floe-agent binary next to `floe`.
pub fn agent_bin() -> PathBuf {
    floe_bin().with_file_name("floe-agent")
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where the agents run: two hosts on a veth, or a LAN with a client host.
pub enum Net {
    Pair(Hosts),
    Lan(Lan),
}

pub struct Cluster {
    pub net: Net,
    pub dir: tempfile::TempDir,
    /// Agent names (also their certificate names).
    pub names: [String; 2],
    agents: [Option<Child>; 2],
}

/// A migcounter workload.
pub struct Workload {
    pub pid: i32,
    pub dir: PathBuf,
}

impl Workload {
    pub fn log(&self) -> PathBuf {
        self.dir.join("log")
    }
}

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

impl Cluster {
    /// Hosts, a cluster CA, a certificate and a configuration per agent (not started).
    /// `extra_config` is appended to both agents' configuration.
    pub fn new(tag: &str, extra_config: &str) -> io::Result<Cluster> {
        Self::with_net(tag, extra_config, Net::Pair(Hosts::new(tag)?))
    }

    /// Like [`Cluster::new`] on a [`Lan`]: agents on hosts a and b, a client host c.
    pub fn new_lan(tag: &str, extra_config: &str) -> io::Result<Cluster> {
        Self::with_net(tag, extra_config, Net::Lan(Lan::new(tag)?))
    }

    /// The pair of hosts (panics on a LAN cluster).
    pub fn hosts(&self) -> &Hosts {
        match &self.net {
            Net::Pair(h) => h,
            Net::Lan(_) => panic!("not a two-host cluster"),
        }
    }

    /// The LAN (panics on a two-host cluster).
    pub fn lan(&self) -> &Lan {
        match &self.net {
            Net::Lan(l) => l,
            Net::Pair(_) => panic!("not a LAN cluster"),
        }
    }

    fn with_net(tag: &str, extra_config: &str, net: Net) -> io::Result<Cluster> {
        let (ha, hb) = match &net {
            Net::Pair(h) => (h.a.clone(), h.b.clone()),
            Net::Lan(l) => (l.a.clone(), l.b.clone()),
        };
        let dir = tempfile::Builder::new().prefix("floe-cluster-").tempdir()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let names = [0, 1].map(|i| format!("{tag}{}-{n}-{}", std::process::id(), ["a", "b"][i]));
        let pki = dir.path().join("pki");
        run(Command::new(floe_bin()).args(["certs", "init", "--dir"]).arg(&pki), "floe certs init")?;
        let ips = [ha.ip, hb.ip];
        for (i, name) in names.iter().enumerate() {
            run(
                Command::new(floe_bin())
                    .args(["certs", "issue", name, "--san", &ips[i].to_string(), "--dir"])
                    .arg(&pki),
                "floe certs issue",
            )?;
        }
        for i in 0..2 {
            let peer = 1 - i;
            let d = dir.path();
            let cfg = format!(
                "name = \"{name}\"\nlisten = \"{ip}:7420\"\ncontrol_socket = \"{sock}\"\ndata_dir = \"{data}\"\n\
                 ca = \"{pki}/ca.pem\"\ncert = \"{pki}/{name}.pem\"\nkey = \"{pki}/{name}.key\"\nlog = \"info,floe_agent=debug\"\n\
                 {extra_config}\n[peers]\n\"{pname}\" = \"{pip}:7420\"\n",
                name = names[i],
                ip = ips[i],
                sock = d.join(format!("agent{i}.sock")).display(),
                data = d.join(format!("data{i}")).display(),
                pki = pki.display(),
                pname = names[peer],
                pip = ips[peer],
            );
            std::fs::write(d.join(format!("agent{i}.toml")), cfg)?;
        }
        Ok(Cluster { net, dir, names, agents: [None, None] })
    }

    pub fn config(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent{i}.toml"))
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent{i}.sock"))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent{i}.log"))
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Host `i` (0: a, 1: b, 2: the LAN's client c).
    pub fn host(&self, i: usize) -> &Host {
        match (&self.net, i) {
            (Net::Pair(h), 0) => &h.a,
            (Net::Pair(h), _) => &h.b,
            (Net::Lan(l), 0) => &l.a,
            (Net::Lan(l), 1) => &l.b,
            (Net::Lan(l), _) => &l.c,
        }
    }

    /// Starts agent `i` in its host with extra environment (test hooks), and
    /// waits for its control socket. `wrap`: a command line that runs before
    /// the agent in the same process (e.g. `unshare -m sh -c '...; exec "$@"' sh`).
    pub fn start_agent_with(&mut self, i: usize, env: &[(&str, &str)], wrap: &[&str]) -> io::Result<()> {
        let _ = std::fs::remove_file(self.socket(i));
        let log = std::fs::File::create(self.log_path(i))?;
        let mut cmd = if wrap.is_empty() {
            self.host(i).command_setns(agent_bin())?
        } else {
            let mut c = self.host(i).command_setns(wrap[0])?;
            c.args(&wrap[1..]).arg(agent_bin());
            c
        };
        cmd.arg("-c").arg(self.config(i)).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        self.agents[i] = Some(child);
        let sock = self.socket(i);
        if !wait_until(Duration::from_secs(15), || sock.exists()) {
            return Err(io::Error::other(format!("agent {i} did not start:\n{}", self.agent_log(i))));
        }
        Ok(())
    }

    pub fn start_agent(&mut self, i: usize, env: &[(&str, &str)]) -> io::Result<()> {
        self.start_agent_with(i, env, &[])
    }

    pub fn start(&mut self) -> io::Result<()> {
        self.start_agent(0, &[])?;
        self.start_agent(1, &[])
    }

    /// Whether agent `i` is still running.
    pub fn agent_alive(&mut self, i: usize) -> bool {
        matches!(self.agents[i].as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits for agent `i` to exit (e.g. through a test hook); its exit code.
    pub fn wait_agent(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let c = self.agents[i].as_mut()?;
        let mut code = None;
        wait_until(timeout, || match c.try_wait() {
            Ok(Some(st)) => {
                code = st.code();
                true
            }
            _ => false,
        });
        code
    }

    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts migcounter in host `i`: `mib` MiB rewritten at `dirty_mibs` MiB/s.
    pub fn workload(&self, i: usize, mib: u32, dirty_mibs: u32) -> io::Result<Workload> {
        self.workload_at(i, mib, dirty_mibs, &fixture_path("migcounter"))
    }

    /// Like [`Cluster::workload`] with the executable at `exe`.
    pub fn workload_at(&self, i: usize, mib: u32, dirty_mibs: u32, exe: &Path) -> io::Result<Workload> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.path().join(format!("w{n}"));
        std::fs::create_dir_all(&dir)?;
        let args = [dir.join("log").into_os_string(), mib.to_string().into(), dir.clone().into_os_string()];
        let env = [("MIGCOUNTER_DIRTY_MIBS", dirty_mibs.to_string())];
        let pid = self.spawn_in(i, exe, &args, &env, &dir, &dir.join("ready"))?;
        Ok(Workload { pid, dir })
    }

    /// Starts `exe ARGS` in host `i`'s network namespace, in a session of
    /// its own, with stdout and stderr in `dir`, and waits (60 s at most)
    /// for it to create `ready`. Returns its pid; the process is not waited on.
    pub fn spawn_in(
        &self,
        i: usize,
        exe: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, String)],
        dir: &Path,
        ready: &Path,
    ) -> io::Result<i32> {
        let mut cmd = self.host(i).command_setns(exe)?;
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("out"))?)
            .stderr(std::fs::File::create(dir.join("err"))?);
        // SAFETY: setsid is async-signal-safe; nothing else runs in the child before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        if !wait_for_file(ready, Duration::from_secs(60)) {
            let _ = child.kill();
            return Err(io::Error::other(format!("{} did not become ready", exe.display())));
        }
        let pid = child.id() as i32;
        // Reaped by whoever ends up its parent; this handle is not waited on.
        std::mem::forget(child);
        Ok(pid)
    }

    /// Host pids of the migcounter processes running in host `i` (zombies excluded).
    pub fn copies_in(&self, i: usize) -> Vec<i32> {
        let Ok(want) = self.host(i).netns_inode() else { return Vec::new() };
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "migcounter" || crate::proc_state(pid) == Some('Z') {
                continue;
            }
            if netns_inode_of_pid(pid).ok() == Some(want) {
                out.push(pid);
            }
        }
        out
    }

    /// `floe migrate PID --to <other agent> --json -n ARGS` through agent `from`.
    pub fn migrate(&self, from: usize, pid: i32, args: &[&str]) -> Output {
        let mut cmd = Command::new(floe_bin());
        cmd.args(["migrate", &pid.to_string(), "--to", &self.names[1 - from], "--json", "-n"])
            .args(args)
            .env("FLOE_AGENT_SOCKET", self.socket(from));
        match cmd.output() {
            Ok(o) => o,
            Err(e) => panic!("cannot run floe migrate: {e}"),
        }
    }

    /// [`Cluster::migrate`] from host 0, which must succeed (the failure
    /// message carries the error and both agents' logs).
    pub fn migrate_ok(&self, pid: i32, args: &[&str]) -> Output {
        let out = self.migrate(0, pid, args);
        assert!(
            out.status.success(),
            "migrate failed: {}\nsource agent:\n{}\ntarget agent:\n{}",
            Self::error_of(&out),
            self.agent_log(0),
            self.agent_log(1)
        );
        out
    }

    /// The error a failed `floe migrate --json` reported (its error event,
    /// else its stderr).
    pub fn error_of(out: &Output) -> String {
        Self::events(out)
            .iter()
            .find(|e| e["event"] == "error")
            .and_then(|e| e["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| crate::stderr_text(out))
    }

    /// The JSON events a `floe migrate --json` printed.
    pub fn events(out: &Output) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_agent(0);
        self.kill_agent(1);
        // The agents' scratch directories (named after them).
        for name in &self.names {
            for base in ["/dev/shm/floe", "/run/floe"] {
                let _ = std::fs::remove_dir_all(std::path::Path::new(base).join(name));
            }
        }
        // Hosts' drop kills what still runs in the namespaces.
    }
}

/// Checks a migcounter log: consecutive sequence numbers from 1, no gap
/// and no duplicate. Returns (lines, the sequence numbers after which the
/// network namespace changed).
pub fn check_log(path: &Path) -> Result<(u64, Vec<u64>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut prev: Option<(u64, String)> = None;
    let mut moves = Vec::new();
    let mut n = 0u64;
    for line in text.lines() {
        let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(k)).map(str::to_string);
        let seq: u64 = field("seq=").and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad line {line:?}"))?;
        let ns = field("ns=").unwrap_or_default();
        match &prev {
            None if seq != 1 => return Err(format!("log starts at seq {seq}")),
            Some((p, _)) if seq != p + 1 => return Err(format!("seq {p} is followed by {seq}")),
            Some((p, pns)) if *pns != ns => moves.push(*p),
            _ => {}
        }
        prev = Some((seq, ns));
        n += 1;
    }
    Ok((n, moves))
}
